"""Photometric changes that imitate other fundus cameras, applied to the raw RGB photograph.

A model trained on one camera over-segments on others (FIVES, Fadugba et al. 2024: the variety of
the training data decides transfer more than the architecture). These changes act on the uint8
photograph *before* the preprocessing (grayscale, standardization, CLAHE, gamma), where a real
camera's differences arise: white balance and colour cast, contrast and gamma, optical blur,
sensor noise, JPEG compression and uneven illumination. Geometry is untouched, so labels and FOV
stay aligned; the change of scale (vessel width) is done per patch in the ``tf.data`` pipeline
(:func:`retina_tf.data.pipeline.patch_dataset`, ``scale_range``).

Training uses :func:`camera_variants`: a few randomly drawn versions of each training image,
preprocessed once like the originals, so the hot loop stays in TensorFlow.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class CameraChange:
    """Ranges of the camera changes; each variant draws one value per change.

    Attributes:
        white_balance: per-channel gain exp(u), u in [-w, w].
        saturation: mix with the grey image, factor in [1 - s, 1 + s].
        contrast: factor around the FOV mean in [1 - c, 1 + c].
        gamma: exponent exp(u), u in [-g, g].
        blur: Gaussian blur sigma in [0.3, b] px, applied with probability 1/2.
        noise: Gaussian sensor noise sigma in [0, n] grey levels, with probability 1/2.
        jpeg_quality: JPEG re-compression at a quality in [q, 95], with probability 1/2.
        illumination: strength of a smooth multiplicative field (a tilted plane and a radial
            fall-off about a random centre) in [0, i].
        channel_gamma: a tone curve of each colour channel's own, exponent exp(u_c) with u_c in
            [-g, g] drawn per channel, with probability 1/2; 0: off. Cameras differ in how much
            of the blue and red they record, not only by a gain, which the preprocessing's
            per-channel stretch undoes: CHASE_DB1's blue channel sits far below its brightest
            pixels, RITE's much less (configs/ripav_general.cfg).
    """

    white_balance: float = 0.15
    saturation: float = 0.3
    contrast: float = 0.3
    gamma: float = 0.4
    blur: float = 1.5
    noise: float = 6.0
    jpeg_quality: int = 30
    illumination: float = 0.35
    channel_gamma: float = 0.0


def _illumination_field(shape: tuple[int, int], rng: np.random.Generator, strength: float
                        ) -> np.ndarray:
    """A smooth field around 1: a random tilt plus a radial fall-off, scaled to ``strength``."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = x / max(w - 1, 1) - 0.5, y / max(h - 1, 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    tilt = np.cos(angle) * x + np.sin(angle) * y                   # in [-0.71, 0.71]
    cx, cy = rng.uniform(-0.3, 0.3, size=2)
    radial = (x - cx) ** 2 + (y - cy) ** 2                          # in [0, ~0.6]
    field = rng.uniform(-1, 1) * tilt - rng.uniform(0, 1) * radial
    field -= field.mean()
    scale = np.abs(field).max()
    return (1.0 + rng.uniform(0, strength) * field / max(scale, 1e-6)).astype(np.float32)


def apply_camera_change(image: np.ndarray, rng: np.random.Generator,
                        change: CameraChange = CameraChange()) -> np.ndarray:
    """One random camera change of a uint8 RGB photograph (H, W, 3); same size, uint8 RGB."""
    out = image.astype(np.float32) / 255.0
    out = out * np.exp(rng.uniform(-change.white_balance, change.white_balance, size=3)
                       ).astype(np.float32)
    grey = out @ np.array([0.299, 0.587, 0.114], np.float32)
    out = grey[..., None] + (out - grey[..., None]) * rng.uniform(1 - change.saturation,
                                                                  1 + change.saturation)
    lit = grey > 0.02                                              # the FOV, roughly
    mean = float(grey[lit].mean()) if lit.any() else 0.5
    out = (out - mean) * rng.uniform(1 - change.contrast, 1 + change.contrast) + mean
    if change.illumination > 0:
        out = out * _illumination_field(image.shape[:2], rng, change.illumination)[..., None]
    out = np.clip(out, 0.0, 1.0) ** np.exp(rng.uniform(-change.gamma, change.gamma))
    if change.channel_gamma > 0 and rng.random() < 0.5:  # off: the random stream as before
        out = out ** np.exp(rng.uniform(-change.channel_gamma, change.channel_gamma, size=3)
                            ).astype(np.float32)
    if change.blur > 0 and rng.random() < 0.5:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, change.blur))
    out = out * 255.0
    if change.noise > 0 and rng.random() < 0.5:
        out = out + rng.normal(0.0, rng.uniform(0, change.noise), out.shape).astype(np.float32)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if change.jpeg_quality < 95 and rng.random() < 0.5:
        quality = int(rng.integers(change.jpeg_quality, 96))
        ok, data = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            out = np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])
    return out


def camera_variants(image: np.ndarray, count: int, seed: int,
                    change: CameraChange = CameraChange()) -> list[np.ndarray]:
    """``count`` camera changes of ``image``, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [apply_camera_change(image, rng, change) for _ in range(count)]
