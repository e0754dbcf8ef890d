"""Segmenting images with a trained model: whole-image or sliding-window inference.

Whole-image inference pads the preprocessed image to the model's size multiple and runs one
forward pass (a DRIVE image in well under a second on a CPU); sliding-window inference
(``sliding_window_predict``) averages overlapping windows for models that need a fixed input
size. Both run the model inside a ``tf.function`` over batched tensors, never ``model.predict``
on numpy (which sometimes uses one core).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import cv2
import keras
import numpy as np
import tensorflow as tf

from retina_tf.data.fov import estimate_fov
from retina_tf.data.patches import extract_patches, pad_to_multiple, recompose_patches
from retina_tf.data.preprocess import Preprocessor
from retina_tf.postprocess import vote_av_segments

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def shipped_models() -> list[str]:
    """Names of the trained models shipped with the package (``retina_tf/pretrained/``)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "model.keras").is_file())


def resolve_run_dir(model: str, logdir: str | None = None, run_name: str | None = None) -> Path:
    """A run folder from a path, a shipped model name, or an architecture + logdir/run_name."""
    path = Path(model)
    if (path / "model.keras").is_file():
        return path
    if (PRETRAINED_DIR / model / "model.keras").is_file():
        return PRETRAINED_DIR / model
    if logdir and run_name and (Path(logdir) / run_name / "model.keras").is_file():
        return Path(logdir) / run_name
    tried = [str(path), f"shipped {shipped_models()}"]
    if logdir and run_name:
        tried.append(str(Path(logdir) / run_name))
    raise FileNotFoundError(f"no trained model found for --model={model!r}; looked for "
                            f"model.keras in: {', '.join(tried)}")


def logits_to_probability(logits: tf.Tensor) -> tf.Tensor:
    return tf.sigmoid(tf.cast(logits, tf.float32))


def model_logits(outputs) -> tf.Tensor:
    """The segmentation logits of a model output (a tensor or a dict with ``"logits"``)."""
    return outputs["logits"] if isinstance(outputs, dict) else outputs


class Segmenter:
    """Runs a model on uint8 RGB fundus photographs, preprocessing included.

    Args:
        model: a Keras model returning logits (or a dict holding ``"logits"``).
        preprocessor: the fitted :class:`Preprocessor` the model was trained with.
        size_multiple: whole-image inputs are zero-padded to a multiple of this.
        inference: "whole", "sliding", or "auto" (whole when the model is fully convolutional).
        window, stride: sliding-window size and stride.
        batch_size: windows per forward pass.
        scales: inference scales for multi-scale models (those with ``with_scales``, e.g.
            HMSA); None keeps the training scales.
        tta: test-time augmentation: average the predictions of the image and its horizontal,
            vertical and double flips (flips undone before averaging); about 4x the time.
        tta_transpose: with ``tta``, also average the four flips of the transposed image (all
            eight symmetries of the square; about 8x the time). Only for models trained with
            90-degree rotations (``--rot90``): a transposed fundus is otherwise unseen.
        av_vote: A/V models: one artery/vein decision per vessel segment between junctions
            (:func:`retina_tf.postprocess.vote_av_segments`), after TTA.
        av_link: with ``av_vote``, the strength of the links between segments across
            junctions (0: every segment decides alone).

    Example:
        >>> seg = Segmenter.from_run("unet_drive")
        >>> prob = seg.probability(image)       # (H, W, K) float32 in [0, 1]
    """

    def __init__(self, model: keras.Model, preprocessor: Preprocessor, size_multiple: int = 16,
                 inference: str = "auto", window: int = 48, stride: int = 16,
                 batch_size: int = 64, fully_convolutional: bool = True,
                 run_info: dict | None = None, tta: bool = False,
                 scales: Sequence[float] | None = None, av_vote: bool = False,
                 av_link: float = 1.0, tta_transpose: bool = False):
        if inference not in ("auto", "whole", "sliding"):
            raise ValueError(f"inference must be auto, whole or sliding, got {inference!r}")
        if inference == "auto":
            inference = "whole" if fully_convolutional else "sliding"
        if scales and hasattr(model, "with_scales"):
            model = model.with_scales([float(s) for s in scales])
        self.model = model
        self.preprocessor = preprocessor
        # the model knows its own constraint best (it changes with the inference scales)
        self.size_multiple = int(getattr(model, "size_multiple", size_multiple))
        self.inference = inference
        self.window = int(window)
        self.stride = int(stride)
        self.batch_size = int(batch_size)
        self.run_info = run_info or {}
        self.tta = bool(tta)
        self.tta_transpose = bool(tta_transpose)
        self.av_vote = bool(av_vote)
        if av_link < 0:
            raise ValueError(f"av_link must be >= 0, got {av_link}")
        self.av_link = float(av_link)
        self._forward = tf.function(
            lambda x: logits_to_probability(model_logits(self.model(x, training=False))),
            reduce_retracing=True)

    @classmethod
    def from_run(cls, model: str | os.PathLike, logdir: str | None = None,
                 run_name: str | None = None, **overrides) -> "Segmenter":
        """Loads ``model.keras``, ``preprocessor.json`` and ``run.json`` from a run folder."""
        from retina_tf.models import load_all
        load_all()
        run_dir = resolve_run_dir(str(model), logdir, run_name)
        info = json.loads((run_dir / "run.json").read_text())
        net = keras.saving.load_model(run_dir / "model.keras", compile=False)
        pre = Preprocessor.load(run_dir / "preprocessor.json")
        kwargs = dict(size_multiple=info.get("size_multiple", 16),
                      window=info.get("patch_size", 48),
                      fully_convolutional=info.get("fully_convolutional", True), run_info=info)
        # None keeps the run's value (or the default); anything else, 0 and False included, is set
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        seg = cls(net, pre, **kwargs)
        seg.run_dir = run_dir
        return seg

    @property
    def task(self) -> str:
        return self.run_info.get("task", "vessel")

    @property
    def tta_name(self) -> str:
        """What TTA averages over, for reports ("" without TTA)."""
        if not self.tta:
            return ""
        return "flip and transpose TTA" if self.tta_transpose else "flip TTA"

    def probability_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """(H, W, C) preprocessed float image -> (H, W, K) probabilities."""
        if not self.tta:
            prob = self._probability(x)
        else:
            views = [(f, t) for t in ((False, True) if self.tta_transpose else (False,))
                     for f in ((), (1,), (0,), (0, 1))]
            prob = np.mean([self._view_probability(x, f, t) for f, t in views], axis=0)
        if self.av_vote:
            if prob.shape[-1] != 3:
                raise ValueError(f"av_vote needs an artery/vein/vessel model, this one gives "
                                 f"{prob.shape[-1]} channel(s)")
            prob = vote_av_segments(prob, link=self.av_link)
        return prob

    def _view_probability(self, x: np.ndarray, flip: tuple, transpose: bool) -> np.ndarray:
        """Probabilities of a flipped (and transposed) view, mapped back to ``x``'s frame."""
        if transpose:
            x = x.transpose(1, 0, 2)
        prob = np.flip(self._probability(np.flip(x, flip)), flip)
        return prob.transpose(1, 0, 2) if transpose else prob

    def _probability(self, x: np.ndarray) -> np.ndarray:
        h, w = x.shape[:2]
        forward = self._forward
        if getattr(self.model, "context_fusion", False):
            # RIP-AV: every window (or the padded image) sees the whole image as its context
            context = self.model.context_of(tf.constant(x[None]))

            def forward(batch):
                return self._forward({"image": batch, "context": tf.repeat(
                    context, tf.shape(batch)[0], axis=0)})
        if self.inference == "whole":
            padded = pad_to_multiple(x, self.size_multiple)
            return forward(tf.constant(padded[None]))[0, :h, :w].numpy()
        return sliding_window_predict(forward, x, self.window, self.stride, self.batch_size)

    def probability(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> (H, W, K) float32 probabilities."""
        return self.probability_preprocessed(self.preprocessor(image))

    def segment(self, image: np.ndarray, fov: np.ndarray | None = None, threshold: float = 0.5,
                match_scale: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Probability (H, W, K) and binary mask (H, W, K), zeroed outside the FOV.

        With ``match_scale``, a photograph whose FOV diameter differs from the training images'
        by more than 20 % is resized to the training scale for inference (vessel widths in
        pixels are what the model learned) and the probabilities are resized back.
        """
        if fov is None:
            fov = estimate_fov(image)
        h, w = image.shape[:2]
        trained = self.run_info.get("fov_diameter")
        diameter = fov_diameter(fov)
        if match_scale and trained and diameter and abs(diameter / trained - 1.0) > 0.2:
            scale = trained / diameter
            size = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            prob = cv2.resize(self.probability(small), (w, h), interpolation=cv2.INTER_LINEAR)
            prob = prob.reshape(h, w, -1)
        else:
            prob = self.probability(image)
        prob = prob * fov[..., None]
        return prob, prob >= threshold


def fov_diameter(fov: np.ndarray) -> float:
    """Horizontal extent of the FOV in pixels (0 for an empty mask)."""
    cols = np.flatnonzero(fov.any(axis=0))
    return float(cols[-1] - cols[0] + 1) if cols.size else 0.0


def sliding_window_predict(forward, x: np.ndarray, window: int, stride: int,
                           batch_size: int = 64) -> np.ndarray:
    """Averages ``forward`` over overlapping ``window`` x ``window`` crops of ``x`` (H, W, C)."""
    patches, positions = extract_patches(x, window, stride)
    outs = [forward(tf.constant(patches[i:i + batch_size])).numpy()
            for i in range(0, len(patches), batch_size)]
    return recompose_patches(np.concatenate(outs), positions, x.shape[:2])


def atomic_save_model(model: keras.Model, path: Path) -> None:
    """``model.save`` to a temporary ``.keras`` name beside ``path``, then rename."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copies what inference needs from a run folder, without optimizer state (3x smaller):
    ``model.keras``, ``preprocessor.json``, ``run.json``, ``flags.txt``, ``metrics.json``."""
    import shutil

    from retina_tf.models import load_all
    load_all()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    bare = model.__class__.from_config(model.get_config())
    bare.set_weights(model.get_weights())
    atomic_save_model(bare, out_dir / "model.keras")
    for name in ("preprocessor.json", "run.json", "flags.txt", "metrics.json"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out_dir / name)
    return out_dir
