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
import zipfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf

from retina_tf.config import InferenceConfig, from_flag_lines
from retina_tf.data.fov import estimate_fov
from retina_tf.data.io import atomic_write_bytes
from retina_tf.data.patches import extract_patches, pad_to_multiple, recompose_patches
from retina_tf.data.preprocess import Preprocessor
from retina_tf.errors import ConfigError, DatasetError, ModelFileError
from retina_tf.models import load_all
from retina_tf.models.base import SegmentationModel
from retina_tf.postprocess import vote_av_segments
from retina_tf.run_folder import (
    PRETRAINED_DIR,
    RUN_FILES,
    find_run,
    save_model_file,
    shipped_models,
)


def load_keras_model(path: str | os.PathLike) -> keras.Model:
    """Loads a ``.keras`` file for inference (no optimizer), with retina_tf's models registered.

    Keras reports any unreadable file as "File not found"; this names what is wrong instead.

    Raises:
        ModelFileError: when the file is missing, truncated, or not a Keras model file.
    """
    load_all()
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a model file" if path.is_dir() else "does not exist"
        raise ModelFileError(f"{path} {what}")
    # A .keras file is a zip archive; a truncated copy loses the archive's closing directory.
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is corrupt or not a Keras model file (not a complete "
                             ".keras archive: truncated or another format); copy or export "
                             "it again")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as err:  # Keras raises many types for damaged archives; a bug chains too
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{path} is corrupt or not a Keras model file ({first_line}); "
                             "copy or export it again") from err


def _read_run_json(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} cannot be read as the run's settings ({err}); the run "
                             "folder is damaged: export or train it again") from err
    if not isinstance(info, dict):
        raise ModelFileError(f"{path} is not a JSON object of run settings")
    return info


def check_threshold(threshold: float) -> float:
    """Raises ConfigError unless ``0 < threshold < 1`` (0 or 1 would make every pixel, or
    none, a vessel)."""
    if not 0.0 < float(threshold) < 1.0:
        raise ConfigError(f"--threshold={threshold} must lie strictly between 0 and 1 "
                          "(e.g. 0.5)")
    return float(threshold)


def run_inference(run_dir: str | Path) -> InferenceConfig:
    """The inference settings of a run: those its ``flags.txt`` records (``stride``,
    ``eval_scales``, a shipped model's ``inference``, ``threshold``...), the defaults for the
    rest."""
    path = Path(run_dir) / "flags.txt"
    if not path.is_file():
        return InferenceConfig()
    return from_flag_lines(InferenceConfig, path.read_text(), ignore_unknown=True)


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
        >>> from retina_tf.data.synthetic import generate_fundus
        >>> image = generate_fundus(0, size=(128, 128)).image      # any uint8 RGB photograph
        >>> seg = Segmenter.from_run("unet_drive")
        >>> prob = seg.probability(image)       # (H, W, K) float32 in [0, 1]
        >>> prob.shape, prob.dtype
        ((128, 128, 1), dtype('float32'))
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
        contract = isinstance(model, SegmentationModel)  # a plain Keras model gets the defaults
        if scales:
            if not contract:
                raise ConfigError(f"{type(model).__name__} has no inference scales: drop "
                                  "--eval_scales")
            model = model.with_scales([float(s) for s in scales])
        self.model = model
        self.preprocessor = preprocessor
        # the model knows its own constraint best (it changes with the inference scales)
        self.size_multiple = int(model.size_multiple if contract else size_multiple)
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
                 run_name: str | None = None, **overrides) -> Segmenter:
        """Loads ``model.keras``, ``preprocessor.json`` and ``run.json`` from a run folder.

        Raises:
            ModelFileError: when the run folder is not found, lacks one of those files, or one
                of them is corrupt (the message names it).
        """
        run_dir = find_run(model, logdir, run_name)
        missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
        if missing:
            raise ModelFileError(f"the run folder {run_dir} lacks {', '.join(missing)}; it is "
                                 "incomplete: export or train it again")
        info = _read_run_json(run_dir)
        net = load_keras_model(run_dir / "model.keras")
        try:
            pre = Preprocessor.load(run_dir / "preprocessor.json")
        except (ValueError, TypeError) as err:
            raise ModelFileError(f"{err}; the run folder is damaged: export or train it "
                                 "again") from err
        kwargs = dict(size_multiple=info.get("size_multiple", 16),
                      window=info.get("patch_size", 48),
                      fully_convolutional=info.get("fully_convolutional", True), run_info=info)
        # None keeps the run's value (or the default); anything else, 0 and False included, is set
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        seg = cls(net, pre, **kwargs)
        seg.run_dir = run_dir
        return seg

    @classmethod
    def from_pretrained(cls, name: str, **overrides) -> Segmenter:
        """A model shipped with the package (:func:`shipped_models`, e.g. ``"unet_drive"``);
        ``overrides`` as in :meth:`from_run`.

        Raises:
            ModelFileError: when no shipped model has that name.
        """
        if name not in shipped_models():
            raise ModelFileError(f"no shipped model named {name!r}; shipped: "
                                 f"{', '.join(shipped_models()) or 'none'}")
        return cls.from_run(PRETRAINED_DIR / name, **overrides)

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
        if isinstance(self.model, SegmentationModel) and self.model.context_fusion:
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

    @property
    def min_image_size(self) -> int:
        """The shortest image side this model can meaningfully segment, in pixels.

        One training patch (run.json ``patch_size``), and at least one size multiple: the model
        never learned from less context than a patch. A whole fundus photograph that small is
        also beyond rescuing by the FOV rescale in :meth:`segment`: DRIVE's 540 px FOV in 96 px
        is a 5.6x enlargement that leaves the thin vessels under a pixel wide in the source.
        """
        return max(int(self.run_info.get("patch_size") or 0), self.size_multiple, 1)

    def check_image_size(self, image: np.ndarray, source: str | os.PathLike = "the image"
                         ) -> None:
        """Raises DatasetError naming ``source`` when ``image`` is below :attr:`min_image_size`
        (a 32x32 image would otherwise come back as 0 % vessel, in silence)."""
        h, w = image.shape[:2]
        if min(h, w) < self.min_image_size:
            raise DatasetError(f"{source} is {w}x{h} pixels, too small to segment: this model "
                               f"needs at least {self.min_image_size}x{self.min_image_size} "
                               "(its training patch size)")

    def segment(self, image: np.ndarray, fov: np.ndarray | None = None, threshold: float = 0.5,
                match_scale: bool = True, source: str | os.PathLike = "the image"
                ) -> tuple[np.ndarray, np.ndarray]:
        """Probability (H, W, K) and binary mask (H, W, K), zeroed outside the FOV.

        With ``match_scale``, a photograph whose FOV diameter differs from the training images'
        by more than 20 % is resized to the training scale for inference (vessel widths in
        pixels are what the model learned) and the probabilities are resized back.

        Args:
            source: where the image came from (a file name), for messages.

        Raises:
            ConfigError: for a threshold outside (0, 1).
            DatasetError: for an image smaller than :attr:`min_image_size`.
        """
        check_threshold(threshold)
        self.check_image_size(image, source)
        if fov is None:
            fov = estimate_fov(image)
        prob = self.probability_at_training_scale(image, fov) if match_scale else \
            self.probability(image)
        prob = prob * fov[..., None]
        return prob, prob >= threshold

    def probability_at_training_scale(self, image: np.ndarray, fov: np.ndarray) -> np.ndarray:
        """:meth:`probability`, with a photograph whose FOV diameter differs from the training
        images' by more than 20 % resized to the training scale first (vessel widths in pixels
        are what the model learned) and the probabilities resized back; ``predict`` and
        ``evaluate`` both segment this way."""
        h, w = image.shape[:2]
        trained = self.run_info.get("fov_diameter")
        diameter = fov_diameter(fov)
        if not (trained and diameter and abs(diameter / trained - 1.0) > 0.2):
            return self.probability(image)
        scale = trained / diameter
        size = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        prob = cv2.resize(self.probability(small), (w, h), interpolation=cv2.INTER_LINEAR)
        return prob.reshape(h, w, -1)


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
    """``model.save`` written durably: staged in memory, then temporary name, fsync, rename."""
    save_model_file(model, Path(path))


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copies what inference needs from a run folder, without optimizer state (3x smaller):
    ``model.keras``, ``preprocessor.json``, ``run.json``, ``flags.txt``, ``metrics.json``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model = load_keras_model(run_dir / "model.keras")
    bare = model.__class__.from_config(model.get_config())
    bare.set_weights(model.get_weights())
    atomic_save_model(bare, out_dir / "model.keras")
    for name in ("preprocessor.json", "run.json", "flags.txt", "metrics.json"):
        if (run_dir / name).is_file():
            atomic_write_bytes(out_dir / name, (run_dir / name).read_bytes())
    return out_dir
