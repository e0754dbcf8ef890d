"""FOV-weighted segmentation losses for vessel and artery/vein maps (Keras 3, TF backend).

Every term has the signature ``fn(y_true, logits, weight=None, **params) -> scalar`` with
``y_true`` and ``logits`` of shape ``(B, H, W, C)`` (labels in {0, 1}) and ``weight`` the field of
view (FOV) map of shape ``(B, H, W, 1)``, ``(B, H, W)``, ``(B, H, W, C)`` or ``(B,)``; ``None``
means all ones. Pixels with weight 0 do not influence the loss or its gradient, so the dark
corners outside the fundus (and any padding) never count.

* Pixel terms (``bce``, ``focal``, ``thin_bce``) are the weighted mean
  ``sum(w * l) / max(sum(w broadcast to (B, H, W, C)), eps)``, i.e. ``sum(w * l) / (C * sum(w))``
  for a one-channel FOV map.
* Region terms (``dice``, ``tversky``) are computed over the whole batch for each channel, with
  soft counts weighted by the FOV, then averaged over channels.

:class:`SegmentationLoss` sums named terms with weights (``{"bce": 1.0, "dice": 1.0}``) and takes
the FOV map as ``sample_weight``, so ``model.compile(loss=SegmentationLoss(...))`` followed by
``fit`` on ``(x, y, fov_weight)`` batches applies the FOV to every term, Dice included.
``thin_bce`` measures vessel widths on the host (``tf.numpy_function``), which XLA cannot compile:
compile with ``jit_compile=loss.supports_jit`` (Keras turns XLA on by default on GPUs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from scipy import ndimage
from skimage.morphology import skeletonize

from retina_tf.config import (  # noqa: F401  (the spec API, re-exported here)
    LOSS_MIXES,
    parse_loss_spec,
)

_EPS = 1e-7
# Mirror padding for vessel widths: covers vessels up to ~2 x 16 px wide (HRF main arcades).
_WIDTH_PAD = 16

# ----------------------------------------------------------------------------------------------
# Helpers


def _prepare(y_true: Any, logits: Any, weight: Any) -> tuple[Any, Any, Any]:
    """Casts to float32 and brings ``weight`` to a rank that broadcasts against ``logits``."""
    # Compute in float32 even under mixed precision: the log/exp of BCE and the batch-wide Dice
    # sums lose too much in float16.
    logits = ops.cast(logits, "float32")
    y_true = ops.cast(y_true, "float32")
    rank = len(logits.shape)
    if weight is None:
        return y_true, logits, ops.ones_like(logits[..., :1])
    weight = ops.cast(weight, "float32")
    w_rank = len(weight.shape)
    if w_rank == rank - 1:
        weight = ops.expand_dims(weight, -1)  # (B, H, W) FOV map -> (B, H, W, 1)
    elif w_rank == 1 and rank > 1:
        weight = ops.reshape(weight, (-1,) + (1,) * (rank - 1))  # one weight per image
    elif w_rank != rank:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match logits of shape "
                         f"{tuple(logits.shape)}; expected (B,H,W), (B,H,W,1) or (B,H,W,C)")
    return y_true, logits, weight


def _weighted_mean(values: Any, weight: Any) -> Any:
    """``sum(w * v) / max(sum(w broadcast to v), eps)``: the mean of ``v`` over the FOV."""
    total = ops.sum(ops.broadcast_to(weight, ops.shape(values)))
    return ops.sum(values * weight) / ops.maximum(total, _EPS)


def _reduce_axes(x: Any) -> tuple[int, ...]:
    """All axes except the channel axis (batch, height, width)."""
    return tuple(range(len(x.shape) - 1))


def _soft_counts(y_true: Any, logits: Any, weight: Any) -> tuple[Any, Any, Any]:
    """FOV-weighted soft TP, FP, FN per channel from sigmoid probabilities, over the whole batch."""
    prob = ops.sigmoid(logits)
    axes = _reduce_axes(logits)
    tp = ops.sum(weight * prob * y_true, axis=axes)
    fp = ops.sum(weight * prob * (1.0 - y_true), axis=axes)
    fn = ops.sum(weight * (1.0 - prob) * y_true, axis=axes)
    return tp, fp, fn


# ----------------------------------------------------------------------------------------------
# Loss terms


def bce_loss(y_true: Any, logits: Any, weight: Any = None,
             pos_weight: float | list[float] = 1.0) -> Any:
    """Binary cross-entropy from logits, FOV-weighted mean over pixels and channels.

    ``pos_weight`` multiplies the loss of vessel (label 1) pixels, the usual remedy for the
    ~1:8 vessel/background imbalance of DRIVE; a list gives one factor per channel (e.g. the
    RIP-AV artery:vein:vessel weights). Value: ``sum(w * c * bce) / (C * sum(w))`` with
    ``c = 1 + (pos_weight - 1) * y``.
    """
    y_true, logits, weight = _prepare(y_true, logits, weight)
    per_pixel = ops.binary_crossentropy(y_true, logits, from_logits=True)
    if not (isinstance(pos_weight, (int, float)) and pos_weight == 1.0):
        pos = ops.convert_to_tensor(np.asarray(pos_weight, dtype=np.float32))
        per_pixel = per_pixel * (1.0 + (pos - 1.0) * y_true)
    return _weighted_mean(per_pixel, weight)


def dice_loss(y_true: Any, logits: Any, weight: Any = None, smooth: float = 1.0) -> Any:
    """Soft Dice loss on sigmoid probabilities: ``1 - mean_c (2 TP + s) / (2 TP + FP + FN + s)``.

    Soft counts are FOV-weighted sums over the whole batch (not per image), one per channel,
    so patches without vessels do not produce a Dice of 0/0 (Milletari et al., V-Net, 2016).
    """
    y_true, logits, weight = _prepare(y_true, logits, weight)
    tp, fp, fn = _soft_counts(y_true, logits, weight)
    dice = (2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth)
    return 1.0 - ops.mean(dice)


def tversky_loss(y_true: Any, logits: Any, weight: Any = None, alpha: float = 0.2,
                 beta: float = 0.8, smooth: float = 1.0) -> Any:
    """Tversky loss ``1 - mean_c (TP + s) / (TP + alpha FP + beta FN + s)`` (Salehi et al., 2017).

    ``alpha`` weighs false positives and ``beta`` false negatives; the ViT-MAE seed's 0.2 / 0.8
    (the defaults) push towards recall of thin vessels. ``alpha = beta = 0.5`` gives Dice.
    Soft counts as in :func:`dice_loss` (whole batch, per channel, FOV-weighted).
    """
    y_true, logits, weight = _prepare(y_true, logits, weight)
    tp, fp, fn = _soft_counts(y_true, logits, weight)
    index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return 1.0 - ops.mean(index)


def focal_loss(y_true: Any, logits: Any, weight: Any = None, gamma: float = 2.0,
               alpha: float | None = None) -> Any:
    """Binary focal loss ``a_t (1 - p_t)^gamma BCE`` from logits (Lin et al., RetinaNet, 2017).

    ``p_t`` is the probability given to the true class; ``alpha`` (optional) weighs vessel pixels
    by ``alpha`` and background by ``1 - alpha``. Same formula as
    ``keras.losses.binary_focal_crossentropy`` but with the BCE taken from logits (no clipping).
    FOV-weighted mean over pixels and channels.
    """
    y_true, logits, weight = _prepare(y_true, logits, weight)
    bce = ops.binary_crossentropy(y_true, logits, from_logits=True)
    prob = ops.sigmoid(logits)
    p_t = y_true * prob + (1.0 - y_true) * (1.0 - prob)
    per_pixel = ops.power(1.0 - p_t, gamma) * bce
    if alpha is not None:
        per_pixel = per_pixel * (y_true * alpha + (1.0 - y_true) * (1.0 - alpha))
    return _weighted_mean(per_pixel, weight)


# ----------------------------------------------------------------------------------------------
# Thin-vessel weighting


def vessel_width_map(label: np.ndarray) -> np.ndarray:
    """Local vessel width in pixels at every vessel pixel (float32 HxW, 0 off-vessel).

    Width is twice the Euclidean distance transform sampled on the skeleton (the distance from the
    centre line to the nearest background pixel); every vessel pixel takes the width of its
    nearest skeleton pixel. A line ``n`` px wide gets ``n + 1`` for odd ``n`` and ``n`` for even
    ``n`` (the EDT counts the centre pixel), so 1 and 2 px lines get 2 and a 3 px line 4.

    The label is mirrored (``symmetric`` padding, ``_WIDTH_PAD`` px) before skeletonizing so a
    vessel cut by the image or patch border continues instead of ending in skeleton spurs towards
    the corners, which would give its border pixels a small width. Thick vessels that end inside
    the image still get such spurs at their ends (a few pixels).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"vessel_width_map expects a HxW label, got shape {label.shape}")
    label = label.astype(bool)
    width = np.zeros(label.shape, np.float32)
    if not label.any():
        return width
    pad = _WIDTH_PAD
    padded = np.pad(label, pad, mode="symmetric")
    skeleton = skeletonize(padded)
    if not skeleton.any():  # cannot happen for a non-empty mask, but never index an empty set
        skeleton = padded
    centre_width = 2.0 * ndimage.distance_transform_edt(padded)
    _, (rows, cols) = ndimage.distance_transform_edt(~skeleton, return_indices=True)
    nearest = centre_width[rows, cols][pad:-pad, pad:-pad]
    width[label] = nearest[label]
    return width


def thin_vessel_weight_map(label: np.ndarray, thin_factor: float = 4.0, thin_width: float = 3.0
                           ) -> np.ndarray:
    """Per-pixel weight: ``thin_factor`` on vessel pixels narrower than ``thin_width`` px, else 1.

    Pure numpy (float32 HxW) so it can also run in a ``tf.data`` pipeline.
    """
    width = vessel_width_map(label)
    weight = np.ones(width.shape, np.float32)
    weight[(width > 0) & (width < thin_width)] = thin_factor
    return weight


def _thin_weight_batch(labels: np.ndarray, thin_factor: float, thin_width: float) -> np.ndarray:
    """(B, H, W, C) labels -> (B, H, W, C) float32 thin-vessel weights, per image and channel."""
    labels = np.asarray(labels) > 0.5
    out = np.ones(labels.shape, np.float32)
    for b in range(labels.shape[0]):
        for c in range(labels.shape[-1]):
            out[b, ..., c] = thin_vessel_weight_map(labels[b, ..., c], thin_factor, thin_width)
    return out


def thin_vessel_weight(y_true: Any, thin_factor: float = 4.0, thin_width: float = 3.0) -> Any:
    """Tensor version of :func:`thin_vessel_weight_map` for a ``(B, H, W, C)`` label batch.

    Runs on the host through ``tf.numpy_function``, which works eagerly, in ``tf.function`` and
    under ``tf.distribute`` on one host, but not inside an XLA-compiled step: compile the model with
    ``jit_compile=False`` when this is used (see ``SegmentationLoss.supports_jit``).
    """
    import tensorflow as tf  # only the host callback needs TensorFlow itself

    y_true = ops.cast(y_true, "float32")
    weight = tf.numpy_function(
        lambda labels: _thin_weight_batch(labels, float(thin_factor), float(thin_width)),
        [y_true], tf.float32, stateful=False, name="thin_vessel_weight")
    weight.set_shape(y_true.shape)
    return ops.stop_gradient(weight)


def thin_bce_loss(y_true: Any, logits: Any, weight: Any = None, thin_factor: float = 4.0,
                  thin_width: float = 3.0) -> Any:
    """BCE with ``thin_factor`` weight on vessels narrower than ``thin_width`` px (ViT-MAE seed).

    Value: ``sum(w * t * bce) / (C * sum(w))`` where ``t`` is :func:`thin_vessel_weight_map`
    (widths from :func:`vessel_width_map`); normalised by the FOV pixel count like the seed's
    ``mean(bce * t)``. The seed computed the width wrongly so that every pixel got weight 1.
    Widths come from the whole label, so labels just outside the FOV can change the width (not
    the weight 0) of a vessel crossing the FOV border.
    """
    y_true, logits, weight = _prepare(y_true, logits, weight)
    per_pixel = ops.binary_crossentropy(y_true, logits, from_logits=True)
    per_pixel = per_pixel * thin_vessel_weight(y_true, thin_factor, thin_width)
    return _weighted_mean(per_pixel, weight)


# ----------------------------------------------------------------------------------------------
# Mixtures

LOSS_TERMS: dict[str, Callable[..., Any]] = {
    "bce": bce_loss,
    "dice": dice_loss,
    "tversky": tversky_loss,
    "focal": focal_loss,
    "thin_bce": thin_bce_loss,
}

# A loss spec (term weights or a mix name, LOSS_MIXES) is read by config.parse_loss_spec, so that
# a config refuses a bad one when it is made; config.LOSS_TERM_NAMES names the terms above.


def replicas_in_sync() -> int:
    """The replicas that each compute a share of a batch under the current tf.distribute
    strategy (1 without one)."""
    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def per_replica(value: Any) -> Any:
    """A replica's share of a batch's loss: ``value / replicas_in_sync()``, as every Keras
    loss returns it (keras.losses.Loss, ``scale_loss_for_distribution``). The replicas'
    gradients are summed, so a loss that is not divided trains N replicas at N times the
    learning rate; Keras multiplies the logged loss back."""
    n = replicas_in_sync()
    return value if n == 1 else value * ops.cast(1.0 / n, value.dtype)


@keras.saving.register_keras_serializable(package="retina_tf")
class SegmentationLoss(keras.losses.Loss):
    """Weighted sum of FOV-weighted loss terms for logits ``(B, H, W, C)``.

    ``__call__`` takes the FOV map as ``sample_weight`` and hands it to every term, instead of
    letting Keras multiply a per-pixel loss by it and reduce (which cannot express Dice); the
    ``reduction`` argument is therefore ignored. The result is a scalar per (local) batch.

    Args:
        terms: term weights, a mix name of ``LOSS_MIXES`` or a spec such as ``"bce:1,dice:1"``
            (see :func:`parse_loss_spec`). Defaults to ``"bce_dice"``.
        pos_weight: factor on vessel pixels in ``bce`` (float or one per channel).
        tversky_alpha: Tversky weight of false positives.
        tversky_beta: Tversky weight of false negatives.
        focal_gamma: focusing exponent of ``focal``.
        focal_alpha: optional class balance of ``focal`` (weight of vessel pixels).
        thin_factor: ``thin_bce`` weight of thin-vessel pixels.
        thin_width: vessels narrower than this (px) are thin.
        smooth: smoothing constant of ``dice`` and ``tversky``.

    Example:
        >>> import numpy as np
        >>> loss = SegmentationLoss("bce_dice")
        >>> y = np.zeros((1, 8, 8, 1), "float32")
        >>> y[:, 2:4] = 1.0
        >>> perfect = float(loss(y, 20.0 * (2.0 * y - 1.0)))  # logits, FOV weight optional
        >>> wrong = float(loss(y, -20.0 * (2.0 * y - 1.0)))
        >>> perfect < 0.01 < 1.0 < wrong
        True
    """

    def __init__(self, terms: str | Mapping[str, float] = "bce_dice",
                 pos_weight: float | list[float] = 1.0, tversky_alpha: float = 0.2,
                 tversky_beta: float = 0.8, focal_gamma: float = 2.0,
                 focal_alpha: float | None = None, thin_factor: float = 4.0,
                 thin_width: float = 3.0, smooth: float = 1.0, name: str = "segmentation_loss",
                 reduction: str | None = "sum_over_batch_size", dtype: Any = None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.terms = parse_loss_spec(terms)
        self.pos_weight = (list(pos_weight) if isinstance(pos_weight, (list, tuple))
                           else float(pos_weight))
        self.tversky_alpha = float(tversky_alpha)
        self.tversky_beta = float(tversky_beta)
        self.focal_gamma = float(focal_gamma)
        self.focal_alpha = None if focal_alpha is None else float(focal_alpha)
        self.thin_factor = float(thin_factor)
        self.thin_width = float(thin_width)
        self.smooth = float(smooth)

    @property
    def supports_jit(self) -> bool:
        """False when a term needs a host callback (``thin_bce``), which XLA cannot compile."""
        return self.terms.get("thin_bce", 0.0) == 0.0

    def _term_params(self, name: str) -> dict[str, Any]:
        return {
            "bce": {"pos_weight": self.pos_weight},
            "dice": {"smooth": self.smooth},
            "tversky": {"alpha": self.tversky_alpha, "beta": self.tversky_beta,
                        "smooth": self.smooth},
            "focal": {"gamma": self.focal_gamma, "alpha": self.focal_alpha},
            "thin_bce": {"thin_factor": self.thin_factor, "thin_width": self.thin_width},
        }[name]

    def compute_terms(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> dict[str, Any]:
        """Unweighted value of each term with a non-zero weight (for logging)."""
        return {name: LOSS_TERMS[name](y_true, y_pred, sample_weight, **self._term_params(name))
                for name, w in self.terms.items() if w != 0.0}

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        with keras.name_scope(self.name):
            values = self.compute_terms(y_true, y_pred, sample_weight)
            total = None
            for name, value in values.items():
                term = self.terms[name] * value
                total = term if total is None else total + term
            if total is None:  # every weight is 0
                total = ops.convert_to_tensor(0.0, "float32")
            return per_replica(ops.cast(total, self.dtype))

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self(y_true, y_pred)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "terms": dict(self.terms),
            "pos_weight": self.pos_weight,
            "tversky_alpha": self.tversky_alpha,
            "tversky_beta": self.tversky_beta,
            "focal_gamma": self.focal_gamma,
            "focal_alpha": self.focal_alpha,
            "thin_factor": self.thin_factor,
            "thin_width": self.thin_width,
            "smooth": self.smooth,
        })
        return config
