"""The lineage's four preprocessing steps as one fitted, serializable object.

The steps come from the orobix / WILeroy retina U-Net code (Ronneberger et al. 2015 applied to
DRIVE): grayscale, dataset standardization, CLAHE and gamma correction, always in that order.
The seed recomputed the statistics on whatever images were at hand; here the mean and standard
deviation are fitted once on the training images and travel with the model in
``preprocessor.json``. Since standardization is followed, as in the seed, by each image's own
min/max rescale, which undoes any shift and scale, they change the result only where the 8-bit
conversion after it truncates a value the arithmetic left just under a whole level (CLAHE can
widen that one level to a few): each photograph is stretched between its own darkest and
brightest pixel.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from retina_tf.data.io import atomic_write_bytes

STEPS = ("grayscale", "standardize", "clahe", "gamma")


@dataclasses.dataclass
class Preprocessor:
    """Grayscale -> standardize -> CLAHE -> gamma, each switchable (the lineage's four steps).

    Args:
        grayscale: keep one luminance channel (0.299 R + 0.587 G + 0.114 B), or the green channel
            when ``channel="green"``. Off: the three RGB channels go through every later step.
        standardize: subtract the fitted training-set mean, divide by its std, then rescale each
            image to 0..255 with its own min/max (as the lineage does).
        clahe: OpenCV CLAHE with ``clahe_clip`` and ``clahe_tiles`` x ``clahe_tiles`` tiles.
        gamma: gamma correction by lookup table (``gamma`` = 1.2 in the lineage).
        channel: "luminance" or "green"; only used when ``grayscale`` is on.
        mean, std: fitted statistics (None until :meth:`fit`).

    Output: float32 HxWxC in [0, 1], C = 1 with grayscale else 3.

    Example:
        >>> from retina_tf.data.synthetic import generate_fundus
        >>> train_images = [generate_fundus(i, size=(96, 96)).image for i in range(3)]
        >>> pre = Preprocessor().fit(train_images)
        >>> x = pre(train_images[0])
        >>> x.shape, x.dtype
        ((96, 96, 1), dtype('float32'))
    """

    grayscale: bool = True
    standardize: bool = True
    clahe: bool = True
    gamma: bool = True
    channel: str = "luminance"
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    gamma_value: float = 1.2
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.channel not in ("luminance", "green"):
            raise ValueError(f"channel must be 'luminance' or 'green', got {self.channel!r}")
        # a damaged or hand-edited preprocessor.json would otherwise turn every photograph
        # flat grey (std 0 or NaN) or invert it (std < 0) without a word
        if not 0 < self.gamma_value < math.inf:
            raise ValueError(f"gamma_value must be positive and finite, got {self.gamma_value!r}")
        if not 0 < self.clahe_clip < math.inf:
            raise ValueError(f"clahe_clip must be positive and finite, got {self.clahe_clip!r}")
        if self.clahe_tiles < 1:
            raise ValueError(f"clahe_tiles must be >= 1, got {self.clahe_tiles!r}")
        if self.mean is not None and not math.isfinite(self.mean):
            raise ValueError(f"mean must be finite, got {self.mean!r}")
        if self.std is not None and not 0 < self.std < math.inf:
            raise ValueError(f"std must be positive and finite, got {self.std!r}")

    @classmethod
    def from_steps(cls, steps: str | Sequence[str], **kwargs) -> Preprocessor:
        """Builds from a step list such as ``"grayscale,standardize,clahe,gamma"`` or ``"none"``."""
        if isinstance(steps, str):
            steps = [s.strip() for s in steps.split(",") if s.strip()]
        steps = [s for s in steps if s != "none"]
        unknown = sorted(set(steps) - set(STEPS))
        if unknown:
            raise ValueError(f"unknown preprocessing step(s) {unknown}; choose from {list(STEPS)}")
        return cls(**{s: s in steps for s in STEPS}, **kwargs)

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    @property
    def steps(self) -> list[str]:
        return [s for s in STEPS if getattr(self, s)]

    # --- fitting ---------------------------------------------------------------------------
    def _to_channels(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} "
                             f"{image.shape}")
        if not self.grayscale:
            return image.astype(np.float32)
        if self.channel == "green":
            return image[..., 1:2].astype(np.float32)
        rgb = image.astype(np.float32)
        return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])[..., None]

    def fit(self, images: Iterable[np.ndarray]) -> Preprocessor:
        """Fits mean and std over all pixels of the training images (as the lineage does)."""
        total, total_sq, count = 0.0, 0.0, 0
        for image in images:
            x = self._to_channels(image).astype(np.float64)
            total += x.sum()
            total_sq += np.square(x).sum()
            count += x.size
        if count == 0:
            raise ValueError("Preprocessor.fit got no images")
        self.mean = float(total / count)
        self.std = float(np.sqrt(max(total_sq / count - self.mean**2, 1e-12)))
        return self

    # --- applying --------------------------------------------------------------------------
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Preprocesses one uint8 RGB image into float32 (H, W, C) in [0, 1]."""
        x = self._to_channels(image)
        if self.standardize:
            if self.mean is None or self.std is None:
                raise ValueError("Preprocessor.standardize is on but the statistics are not "
                                 "fitted: call fit(training_images) or load preprocessor.json")
            x = (x - self.mean) / self.std
            # Per-image min/max rescale, as the lineage does after standardization.
            lo, hi = x.min(axis=(0, 1), keepdims=True), x.max(axis=(0, 1), keepdims=True)
            x = (x - lo) / np.maximum(hi - lo, 1e-6) * 255.0
        x = np.clip(x, 0, 255).astype(np.uint8)
        if self.clahe:
            op = cv2.createCLAHE(clipLimit=self.clahe_clip,
                                 tileGridSize=(self.clahe_tiles, self.clahe_tiles))
            x = np.stack([op.apply(np.ascontiguousarray(x[..., c]))
                          for c in range(x.shape[-1])], axis=-1)
        if self.gamma:
            table = (np.power(np.arange(256) / 255.0, 1.0 / self.gamma_value) * 255.0)
            x = cv2.LUT(x, table.astype(np.uint8))
            if x.ndim == 2:
                x = x[..., None]
        return (x.astype(np.float32) / 255.0).reshape(image.shape[0], image.shape[1], -1)

    def apply_all(self, images: Iterable[np.ndarray]) -> list[np.ndarray]:
        return [self(im) for im in images]

    # --- serialization ---------------------------------------------------------------------
    def get_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> Preprocessor:
        return cls(**config)

    def save(self, path: str | os.PathLike) -> None:
        """Writes JSON atomically (temporary name, then rename)."""
        atomic_write_bytes(path, json.dumps(self.get_config(), indent=2).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Preprocessor:
        path = Path(path)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the preprocessor config: {e}") from e
        unknown = set(config) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown preprocessor keys {sorted(unknown)}")
        return cls.from_config(config)
