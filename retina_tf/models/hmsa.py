"""Hierarchical multi-scale attention (HMSA) over an HRNetV2-OCR network."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import keras
import tensorflow as tf
from keras import layers, ops

from retina_tf.models.base import SegmentationModel
from retina_tf.models.blocks import (
    BatchNormalization,
    LogitsMetricsMixin,
    ResizeToMatch,
    set_bn_momentum,
    weighted_output_loss,
)
from retina_tf.models.hrnet_ocr import (
    AUX_LOSS_WEIGHT,
    HRNetOCR,
    ResizeByScale,
    check_positive_ints,
    normalize_modules,
)

# Supervision of each scale's own prediction (NVIDIA's SUPERVISED_MSCALE_WT).
SCALE_LOSS_WEIGHT = 0.05


@keras.saving.register_keras_serializable(package="retina_tf")
class ScaleAttentionHead(layers.Layer):
    """Attention map in [0, 1] from features: [3x3 conv, BN, ReLU] x 2, 1x1 conv, sigmoid.

    Input ``(B, H, W, C)``, output ``(B, H, W, 1)``. The last conv has a bias, so a large
    negative (positive) bias and a zero kernel force the attention to exactly 0 (1).

    Args:
        channels: int, width of the two 3x3 convs (NVIDIA's code: 256). Default 64.
    """

    def __init__(self, channels: int = 64, **kwargs):
        super().__init__(**kwargs)
        check_positive_ints(channels=channels)
        self.channels = channels
        self.conv1 = layers.Conv2D(channels, 3, padding="same", use_bias=False,
                                   kernel_initializer="he_normal", name="conv1")
        self.bn1 = BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn1")
        self.conv2 = layers.Conv2D(channels, 3, padding="same", use_bias=False,
                                   kernel_initializer="he_normal", name="conv2")
        self.bn2 = BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn2")
        self.out = layers.Conv2D(1, 1, name="attention_logit")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in (self.conv1, self.bn1, self.conv2, self.bn2, self.out):
            layer.build(shape)
            shape = layer.compute_output_shape(shape)

    def call(self, x, training=None):
        x = ops.relu(self.bn1(self.conv1(x), training=training))
        x = ops.relu(self.bn2(self.conv2(x), training=training))
        return ops.sigmoid(self.out(x))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:3]) + (1,)

    def get_config(self) -> dict:
        return {**super().get_config(), "channels": self.channels}


@keras.saving.register_keras_serializable(package="retina_tf")
class ScaleAttentionBlend(layers.Layer):
    """HMSA's pairwise combination ``up(a * p_low) + (1 - up(a)) * p_high``.

    ``inputs = [p_low, a, p_high]``: the lower scale's logits and attention (same size) and the
    prediction of the higher scale(s); ``up`` is a bilinear resize to ``p_high``'s size (the
    identity when the sizes agree). Output: ``p_high``'s shape.
    """

    def call(self, inputs):
        low, attention, high = inputs
        size = tf.shape(high)[1:3]
        weighted = ops.cast(tf.image.resize(attention * low, size, method="bilinear"), high.dtype)
        attention = ops.cast(tf.image.resize(attention, size, method="bilinear"), high.dtype)
        return weighted + (1.0 - attention) * high

    def compute_output_shape(self, input_shapes):
        return input_shapes[2]


def scale_key(prefix: str, scale: float) -> str:
    """Output name of one scale's map, e.g. ``scale_key("logits", 0.5) == "logits_0.5"``."""
    return f"{prefix}_{float(scale)}"


def scale_passes(inputs, network: keras.Model, attention_head: layers.Layer,
                 scales: Sequence[float], stem_stride: int) -> list[dict]:
    """Runs ``network`` on ``inputs`` resized by each scale, highest scale first.

    Each pass is a dict: ``"scale"``; ``"logits"`` and ``"aux"`` at that pass's input size;
    ``"features"``, the OCR features (at ``1 / stem_stride`` of it); ``"attention"``, the
    scale attention brought to the pass's input size (``None`` for the highest scale, which
    no lower scale is blended into).
    """
    passes = []
    for s in sorted(scales, reverse=True):
        tag = f"{float(s)}".replace(".", "_")
        x = inputs if s == 1.0 else ResizeByScale(s, name=f"input_x{tag}")(inputs)
        out = network(x)
        attention = None
        if passes:
            attention = attention_head(out["features"])
            if stem_stride > 1:
                attention = ResizeByScale(stem_stride, name=f"attention_x{tag}_up")(attention)
        passes.append({"scale": float(s), "logits": out["logits"], "aux": out["aux"],
                       "features": out["features"], "attention": attention})
    return passes


def fuse_scales(passes: Sequence[dict], key: str, name: str):
    """Combines ``pass[key]`` of the :func:`scale_passes` from the highest scale down.

    As NVIDIA's ``nscale_forward`` (Tao et al. 2020): the running prediction ``pred`` (at
    ``max(s, 1)`` times the input size) is combined with scale ``s``'s map by the attention
    predicted at ``s``, the lower scale of the pair: ``pred = up(a_s * p_s) + (1 - up(a_s)) *
    pred``. ``name`` prefixes the layer names (one fusion per key and model).
    """
    pred = None
    for p in passes:
        value = p[key]
        if pred is None:
            pred = value
            continue
        tag = f"{p['scale']}".replace(".", "_")
        if p["scale"] >= 1.0:  # the running prediction comes from a larger input: bring it down
            pred = ResizeToMatch(name=f"{name}_to_x{tag}")([pred, value])
        pred = ScaleAttentionBlend(name=f"{name}_blend_x{tag}")([value, p["attention"], pred])
    return pred


def multiscale_outputs(inputs, passes: Sequence[dict]) -> dict:
    """HMSA's output dict from the :func:`scale_passes`: ``"logits"`` and ``"aux"`` fused by
    :func:`fuse_scales`, and per scale ``"logits_<s>"`` and (but the highest) ``"attention_<s>"``
    resized to the input size."""
    outputs = {}
    for p in passes:
        s, tag = p["scale"], f"{p['scale']}".replace(".", "_")
        outputs[scale_key("logits", s)] = (
            p["logits"] if s == 1.0
            else ResizeToMatch(name=f"logits_x{tag}_to_input")([p["logits"], inputs]))
        if p["attention"] is not None:
            outputs[scale_key("attention", s)] = (
                p["attention"] if s == 1.0
                else ResizeToMatch(name=f"attention_x{tag}_to_input")([p["attention"], inputs]))
    outputs["logits"] = fuse_scales(passes, "logits", "logits")
    outputs["aux"] = fuse_scales(passes, "aux", "aux")
    return outputs


def hierarchical_multiscale(inputs, network: keras.Model, attention_head: layers.Layer,
                            scales: Sequence[float], stem_stride: int) -> dict:
    """Runs ``network`` on ``inputs`` resized by each scale and combines the logits.

    As NVIDIA's ``nscale_forward`` (Tao et al. 2020), see :func:`fuse_scales`. A lower scale
    claims the pixels it is confident about first: for (0.5, 1.0, 2.0) the weights are
    ``a_0.5`` on ``p_0.5``, ``(1 - a_0.5) a_1.0`` on ``p_1.0`` and ``(1 - a_0.5)(1 - a_1.0)`` on
    ``p_2.0``. Each pass's logits and attention are first upsampled to that pass's input size.
    The auxiliary logits are combined with the same attention. 1.0 must be one of the scales
    (the output size).

    Returns a dict: ``"logits"``, ``"aux"`` (joint), and per scale ``"logits_<s>"`` and, except
    for the highest scale, ``"attention_<s>"``, all resized to the input size.
    """
    return multiscale_outputs(inputs, scale_passes(inputs, network, attention_head, scales,
                                                   stem_stride))


def scales_size_multiple(base: int, scales: Sequence[float]) -> int:
    """Smallest multiple ``m`` of ``base`` with ``m * s`` a multiple of ``base`` for every scale."""
    fractions = [Fraction(float(s)).limit_denominator(1000) for s in scales]
    m = base
    while any((m * f) % base for f in fractions):
        m += base
    return m


def hmsa_layers(attention_channels: int, **network_kwargs) -> tuple[HRNetOCR, ScaleAttentionHead]:
    """The :class:`HRNetOCR` network and the scale-attention head of an HMSA model."""
    network = HRNetOCR(**network_kwargs, name="hrnet_ocr")
    attention_head = ScaleAttentionHead(attention_channels, name="scale_attention")
    # Built now so its weights exist (and save) even when one scale never calls it.
    attention_head.build((None, None, None, network.ocr_mid_channels))
    return network, attention_head


def check_nonnegative(**values: float) -> None:
    for key, value in values.items():
        if not value >= 0:
            raise ValueError(f"{key} must be >= 0, got {value!r}")


def hmsa_loss_weights(model) -> dict[str, float]:
    """Output name -> loss weight: joint logits 1, joint aux ``aux_loss_weight``, each scale's
    logits ``scale_loss_weight``."""
    weights = {"logits": 1.0, "aux": model.aux_loss_weight}
    weights.update({scale_key("logits", s): model.scale_loss_weight for s in model.scales})
    return weights


def store_hmsa_attributes(model: keras.Model, network: HRNetOCR, attention_head: layers.Layer,
                          attention_channels: int, scales: Sequence[float],
                          aux_loss_weight: float, scale_loss_weight: float,
                          bn_momentum: float) -> None:
    """Sets an HMSA-based model's BN momentum and the attributes :func:`hmsa_config` reads
    (the HRNetOCR arguments live in, and are read back from, ``model.network``'s config)."""
    set_bn_momentum(model, bn_momentum)
    model.bn_momentum = float(bn_momentum)
    model.network = network
    model.scale_attention = attention_head
    model.attention_channels = attention_channels
    model.scales = list(scales)
    model.aux_loss_weight = float(aux_loss_weight)
    model.scale_loss_weight = float(scale_loss_weight)


def hmsa_config(model) -> dict:
    """The config of an HMSA-based model: the HRNetOCR arguments read from its network, the
    attention width, scales and loss weights."""
    network = {k: v for k, v in model.network.get_config().items()
               if k not in ("name", "trainable")}
    return {"name": model.name, "trainable": model.trainable, **network,
            "attention_channels": model.attention_channels, "scales": list(model.scales),
            "aux_loss_weight": model.aux_loss_weight,
            "scale_loss_weight": model.scale_loss_weight, "bn_momentum": model.bn_momentum}


def check_scales(scales) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(f"scales must be a list of numbers, got {scales!r}") from None
    if not values or any(not s > 0 for s in values) or 1.0 not in values \
            or len(set(values)) != len(values):
        raise ValueError(f"scales must be distinct positive numbers including 1.0, got {scales!r}")
    return values


@keras.saving.register_keras_serializable(package="retina_tf")
class HMSA(LogitsMetricsMixin, SegmentationModel, keras.Model):
    """HRNetV2-OCR with hierarchical multi-scale attention, for fundus vessel segmentation.

    Paper: Tao, Sapra, Catanzaro, "Hierarchical Multi-Scale Attention for Semantic
    Segmentation", https://arxiv.org/abs/2005.10821 ; network :class:`HRNetOCR`.

    One :class:`HRNetOCR` (``self.network``) runs on the input resized by each of ``scales``; a
    scale-attention head (``self.scale_attention``, [3x3 conv, BN, ReLU] x 2, 1x1 conv, sigmoid)
    on the OCR features gives each pass an attention map, and the passes are combined from the
    highest scale down (see :func:`hierarchical_multiscale`). With the training scales
    (0.5, 1.0): ``p = up(a_0.5 * p_0.5) + (1 - up(a_0.5)) * p_1.0``.

    Other scales at inference: ``model.with_scales([0.5, 1.0, 2.0])`` returns an HMSA that shares
    this model's layers and weights (use its ``size_multiple`` for padding).

    Args:
        input_channels, num_classes, width, stem_stride, stem_channels, num_blocks, num_modules,
        ocr_mid_channels, ocr_key_channels: the :class:`HRNetOCR` arguments (defaults 1, 1, 18,
            2, 64, 2, 1, 128, 64).
        attention_channels: int, width of the scale-attention head's 3x3 convs. Default 64.
        scales: distinct positive floats including 1.0, input scales of the passes.
            Default (0.5, 1.0), the paper's training scales.
        aux_loss_weight: float, weight of the joint auxiliary logits' loss. Default 0.4.
        scale_loss_weight: float, weight of each scale's own logits' loss. Default 0.05.
        bn_momentum: float, BatchNormalization moving-average momentum of every layer. Default
            0.9 (PyTorch's 0.1, as NVIDIA's code); 0.99 averages the eval-mode statistics over
            more of the small CPU batches (see ``set_bn_momentum``).

    Input ``(B, H, W, input_channels)``, ``H``, ``W`` multiples of ``size_multiple``. Output dict
    of ``(B, H, W, ...)`` maps: ``"logits"`` (joint, ``num_classes``), ``"aux"`` (joint auxiliary
    logits), ``"logits_<s>"`` per scale (e.g. ``"logits_0.5"``, ``"logits_1.0"``) and
    ``"attention_<s>"`` (1 channel) for every scale but the highest. ``compute_loss``:
    ``loss(logits) + aux_loss_weight * loss(aux) + scale_loss_weight * sum_s loss(logits_<s>)``.

    Example:
        >>> import numpy as np
        >>> model = HMSA(width=8, stem_channels=16, ocr_mid_channels=32, ocr_key_channels=16,
        ...              attention_channels=16)
        >>> model(np.zeros((1, 64, 64, 1), "float32"))["logits"].shape
        TensorShape([1, 64, 64, 1])
        >>> model.with_scales([0.5, 1.0, 2.0]).size_multiple
        32
    """

    def __init__(self, input_channels: int = 1, num_classes: int = 1, width: int = 18,
                 stem_stride: int = 2, stem_channels: int = 64, num_blocks: int = 2,
                 num_modules: int | Sequence[int] = 1, ocr_mid_channels: int = 128,
                 ocr_key_channels: int = 64, attention_channels: int = 64,
                 scales: Sequence[float] = (0.5, 1.0), aux_loss_weight: float = AUX_LOSS_WEIGHT,
                 scale_loss_weight: float = SCALE_LOSS_WEIGHT, bn_momentum: float = 0.9,
                 **kwargs):
        shared = kwargs.pop("_shared_layers", None)  # only from with_scales()
        scale_values = check_scales(scales)
        check_positive_ints(attention_channels=attention_channels)
        normalize_modules(num_modules)
        check_nonnegative(aux_loss_weight=aux_loss_weight, scale_loss_weight=scale_loss_weight)

        # === Layers ===
        if shared is None:
            network, attention_head = hmsa_layers(
                input_channels=input_channels, num_classes=num_classes, width=width,
                stem_stride=stem_stride, stem_channels=stem_channels, num_blocks=num_blocks,
                num_modules=num_modules, ocr_mid_channels=ocr_mid_channels,
                ocr_key_channels=ocr_key_channels, aux_loss_weight=aux_loss_weight,
                attention_channels=attention_channels)
        else:
            network, attention_head = shared

        # === Functional Model ===
        inputs = keras.Input((None, None, input_channels), name="image")
        outputs = hierarchical_multiscale(inputs, network, attention_head, scale_values,
                                          stem_stride)
        kwargs.setdefault("name", "hmsa")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        store_hmsa_attributes(self, network, attention_head, attention_channels, scale_values,
                              aux_loss_weight, scale_loss_weight, bn_momentum)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: every scaled input a multiple of the
        network's ``8 * stem_stride`` (64 -> 32 for scales 0.5, 1 and stem stride 2)."""
        return scales_size_multiple(self.network.size_multiple, self.scales)

    def with_scales(self, scales: Sequence[float]) -> HMSA:
        """The same model evaluated at other ``scales`` (e.g. [0.5, 1.0, 2.0] for inference).

        The returned HMSA shares this model's layers, so its weights follow this model's
        training; only its graph (and ``size_multiple``) differ.
        """
        config = dict(self.get_config(), scales=list(scales))
        return HMSA(**config, _shared_layers=(self.network, self.scale_attention))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """``loss(logits) + aux_loss_weight * loss(aux) + scale_loss_weight * sum_s
        loss(logits_<s>)`` with the compiled loss."""
        return weighted_output_loss(self, y, y_pred, hmsa_loss_weights(self), sample_weight)

    def get_config(self) -> dict:
        return hmsa_config(self)

