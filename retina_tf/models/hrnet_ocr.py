"""HRNetV2 backbone with an OCR head (object-contextual representations)."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import layers, ops

from retina_tf.models.base import SegmentationModel
from retina_tf.models.blocks import (
    BatchNormalization,
    LogitsMetricsMixin,
    basic_block,
    bottleneck_block,
    resnet_conv_bn,
    weighted_output_loss,
)

# Weight of the auxiliary (soft object region) loss, OCR's and HMSA's 0.4.
AUX_LOSS_WEIGHT = 0.4
# Dropout after OCR's fusion conv, as in the OCR code (PyTorch Dropout2d).
_OCR_DROPOUT = 0.05
_STEM_STRIDES = {1: (1, 1), 2: (2, 1), 4: (2, 2)}


# --- layers ----------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="retina_tf")
class ResizeByScale(layers.Layer):
    """Bilinear resize of an image batch by ``scale`` (new size ``round(scale * size)``).

    At 0.5 this is the mean of each 2x2 block, like PyTorch's ``F.interpolate(scale_factor=0.5,
    mode="bilinear", align_corners=False)``.
    """

    def __init__(self, scale: float, **kwargs):
        super().__init__(**kwargs)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.scale = float(scale)

    def call(self, x):
        size = ops.cast(ops.round(ops.cast(tf.shape(x)[1:3], "float32") * self.scale), "int32")
        return ops.cast(tf.image.resize(x, size, method="bilinear"), x.dtype)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        h = None if h is None else round(h * self.scale)
        w = None if w is None else round(w * self.scale)
        return (b, h, w, c)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}


def spatial_gather_weights(region_logits):
    """Softmax over the pixels of each region map: ``(B, H, W, K)`` -> weights summing to 1 over
    ``H, W`` for every image and region."""
    x = ops.cast(region_logits, "float32")
    x = x - ops.max(x, axis=(1, 2), keepdims=True)
    e = ops.exp(x)
    return e / ops.sum(e, axis=(1, 2), keepdims=True)


@keras.saving.register_keras_serializable(package="retina_tf")
class SpatialGather(layers.Layer):
    """OCR's object region representations from pixel features and soft object regions.

    ``inputs = [features (B, H, W, C), aux_logits (B, H, W, N)]``. Each of the ``N`` sigmoid
    channels of the auxiliary head defines two soft regions: the class (region logit ``a``) and
    its complement (``-a``, the log-odds of "not this class"), so one vessel channel gives the
    background and vessel regions of a two-class softmax. Each region's representation is the
    mean of the features weighted by the softmax of its region logit over the pixels
    (:func:`spatial_gather_weights`). Output ``(B, 2 N, C)``: class regions, then complements.
    """

    def call(self, inputs):
        features, aux_logits = inputs
        regions = ops.concatenate([aux_logits, -aux_logits], axis=-1)
        weights = ops.cast(spatial_gather_weights(regions), features.dtype)
        return ops.einsum("bhwk,bhwc->bkc", weights, features)

    def compute_output_shape(self, input_shapes):
        f_shape, a_shape = input_shapes
        return (f_shape[0], 2 * a_shape[-1], f_shape[-1])


@keras.saving.register_keras_serializable(package="retina_tf")
class ObjectAttention(layers.Layer):
    """OCR's pixel-region relation: ``softmax_k(q . k / sqrt(d)) v`` for every pixel.

    ``inputs = [query (B, H, W, d), key (B, K, d), value (B, K, d)]`` -> ``(B, H, W, d)``: each
    pixel's object context, the regions' values weighted by their similarity to the pixel.
    """

    def call(self, inputs):
        query, key, value = inputs
        depth = ops.cast(ops.shape(query)[-1], query.dtype)
        sim = ops.einsum("bhwd,bkd->bhwk", query, key) / ops.sqrt(depth)
        return ops.einsum("bhwk,bkd->bhwd", ops.softmax(sim, axis=-1), value)

    def compute_output_shape(self, input_shapes):
        return input_shapes[0][:3] + (input_shapes[2][-1],)


# --- HRNetV2 -----------------------------------------------------------------------------------

def _conv_bn_relu(x, filters: int, kernel_size: int = 3, strides: int = 1, name: str = ""):
    return layers.ReLU(name=f"{name}_relu")(resnet_conv_bn(x, filters, kernel_size, strides, name))


def _dense_bn_relu(x, units: int, name: str):
    """A 1x1 conv on a set of region vectors ``(B, K, C)``: dense (no bias), BN, ReLU."""
    x = layers.Dense(units, use_bias=False, kernel_initializer="he_normal", name=f"{name}_dense")(x)
    x = BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def hr_fuse(branches: list, widths: Sequence[int], name: str) -> list:
    """HRNet's multi-resolution fusion: every output branch sums all input branches.

    A lower-resolution branch ``j > i`` is brought to branch ``i`` by a 1x1 conv + BN then a
    bilinear x``2**(j - i)`` upsampling; a higher-resolution one ``j < i`` by ``i - j`` strided
    3x3 convs (BN, ReLU between; the last to branch ``i``'s width, BN only); then ReLU.
    """
    fused = []
    for i in range(len(branches)):
        terms = []
        for j, x in enumerate(branches):
            tag = f"{name}_{j}to{i}"
            if j > i:
                x = resnet_conv_bn(x, widths[i], 1, 1, name=tag)
                x = ResizeByScale(2 ** (j - i), name=f"{tag}_up")(x)
            elif j < i:
                for k in range(i - j):
                    if k == i - j - 1:
                        x = resnet_conv_bn(x, widths[i], 3, 2, name=f"{tag}_{k}")
                    else:
                        x = _conv_bn_relu(x, widths[j], 3, 2, name=f"{tag}_{k}")
            terms.append(x)
        x = layers.Add(name=f"{name}_sum{i}")(terms) if len(terms) > 1 else terms[0]
        fused.append(layers.ReLU(name=f"{name}_out{i}")(x))
    return fused


def hrnet_v2(x, width: int, stem_stride: int, stem_channels: int, num_blocks: int,
             num_modules: Sequence[int], name: str = "hrnet"):
    """HRNetV2 features of an image batch: the four branches (widths ``w, 2w, 4w, 8w`` at
    ``1/s, 1/2s, 1/4s, 1/8s`` with ``s = stem_stride``) upsampled to ``1/s`` and concatenated,
    ``15 w`` channels."""
    first, second = _STEM_STRIDES[stem_stride]
    x = _conv_bn_relu(x, stem_channels, 3, first, name=f"{name}_stem1")
    x = _conv_bn_relu(x, stem_channels, 3, second, name=f"{name}_stem2")
    # Stage 1: Bottleneck blocks at the highest resolution, 4 * stem_channels wide.
    for b in range(num_blocks):
        x = bottleneck_block(x, stem_channels, name=f"{name}_s1_b{b}")
    branches = [x]
    for stage, modules in enumerate(num_modules, start=2):
        widths = [width * 2**i for i in range(stage)]
        # Transition: existing branches change width by a 3x3 conv when needed; a new,
        # half-resolution branch comes from the lowest one by a strided 3x3 conv.
        new = _conv_bn_relu(branches[-1], widths[-1], 3, 2, name=f"{name}_t{stage}_new")
        branches = [b if b.shape[-1] == widths[i]
                    else _conv_bn_relu(b, widths[i], 3, 1, name=f"{name}_t{stage}_{i}")
                    for i, b in enumerate(branches)] + [new]
        for m in range(modules):
            tag = f"{name}_s{stage}_m{m}"
            branches = [_repeat_basic(b, widths[i], num_blocks, f"{tag}_br{i}")
                        for i, b in enumerate(branches)]
            branches = hr_fuse(branches, widths, name=f"{tag}_fuse")
    ups = [branches[0]] + [
        ResizeByScale(2**i, name=f"{name}_final_up{i}")(b)
        for i, b in enumerate(branches[1:], start=1)]
    return layers.Concatenate(name=f"{name}_concat")(ups)


def _repeat_basic(x, filters: int, blocks: int, name: str):
    for b in range(blocks):
        x = basic_block(x, filters, name=f"{name}_b{b}")
    return x


def ocr_head(features, num_classes: int, mid_channels: int, key_channels: int, name: str = "ocr"):
    """OCR on backbone features: returns ``(logits, aux_logits, ocr_features)`` at the features'
    resolution (``num_classes``, ``num_classes`` and ``mid_channels`` channels)."""
    in_channels = features.shape[-1]
    pixels = _conv_bn_relu(features, mid_channels, 3, 1, name=f"{name}_pixels")
    aux = _conv_bn_relu(features, in_channels, 1, 1, name=f"{name}_aux1")
    aux = layers.Conv2D(num_classes, 1, name=f"{name}_aux_logits")(aux)
    regions = SpatialGather(name=f"{name}_gather")([pixels, aux])
    query = _conv_bn_relu(pixels, key_channels, 1, 1, name=f"{name}_query1")
    query = _conv_bn_relu(query, key_channels, 1, 1, name=f"{name}_query2")
    key = _dense_bn_relu(regions, key_channels, name=f"{name}_key1")
    key = _dense_bn_relu(key, key_channels, name=f"{name}_key2")
    value = _dense_bn_relu(regions, key_channels, name=f"{name}_value")
    context = ObjectAttention(name=f"{name}_attention")([query, key, value])
    context = _conv_bn_relu(context, mid_channels, 1, 1, name=f"{name}_context")
    x = layers.Concatenate(name=f"{name}_concat")([context, pixels])
    x = _conv_bn_relu(x, mid_channels, 1, 1, name=f"{name}_fuse")
    x = layers.SpatialDropout2D(_OCR_DROPOUT, name=f"{name}_dropout")(x)
    logits = layers.Conv2D(num_classes, 1, name=f"{name}_logits")(x)
    return logits, aux, x


# --- losses shared with HMSA ---------------------------------------------------------------------

def check_positive_ints(**values) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


def normalize_modules(num_modules: int | Sequence[int]) -> list[int]:
    """``num_modules`` as one count per stage 2-4."""
    modules = [num_modules] * 3 if isinstance(num_modules, int) else list(num_modules)
    if len(modules) != 3 or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                for m in modules):
        raise ValueError(f"num_modules must be an integer >= 1 or three of them (stages 2-4), "
                         f"got {num_modules!r}")
    return modules


# --- the model ---------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="retina_tf")
class HRNetOCR(LogitsMetricsMixin, SegmentationModel, keras.Model):
    """HRNetV2 backbone with an object-contextual representations (OCR) head.

    Papers: Wang et al., "Deep High-Resolution Representation Learning for Visual Recognition",
    https://arxiv.org/abs/1908.07919 (HRNetV2); Yuan, Chen, Wang, "Object-Contextual
    Representations for Semantic Segmentation", https://arxiv.org/abs/1909.11065 (OCR).

    Backbone: a stem of two 3x3 convs (strides 2, 2 in the paper; ``stem_stride`` 4, 2 or 1),
    ``num_blocks`` Bottleneck blocks, then stages 2-4 with 2, 3, 4 parallel branches of widths
    ``w, 2w, 4w, 8w`` at ``1/s .. 1/8s`` (``s = stem_stride``), each module ``num_blocks``
    BasicBlocks per branch and a multi-resolution fusion. All branches are upsampled to ``1/s``
    and concatenated (``15 w`` channels). OCR: 3x3 conv to ``ocr_mid_channels`` pixel features;
    an auxiliary head (1x1 conv-BN-ReLU, 1x1 conv) gives ``num_classes`` sigmoid logits, each
    channel two soft object regions (class and complement, see :class:`SpatialGather`); region
    representations, pixel-region attention with ``ocr_key_channels`` keys, concatenation with
    the pixel features, 1x1 conv-BN-ReLU (the OCR features), 1x1 classifier.

    Args:
        input_channels: int, channels of the preprocessed image. Default 1.
        num_classes: int, output channels (1 vessel; 3 artery/vein/vessel). Default 1.
        width: int, width ``w`` of the highest-resolution branch (HRNetV2-W18: 18). Default 18.
        stem_stride: 1, 2 or 4, resolution of the highest branch is ``1/stem_stride`` (the paper
            uses 4; thin vessels want 2 or 1). Default 2.
        stem_channels: int, width of the stem; stage 1 outputs 4 times it. Default 64.
        num_blocks: int, residual blocks per branch in every module (paper: 4). Default 2.
        num_modules: int, or three ints, modules in stages 2, 3, 4 (paper: 1, 4, 3). Default 1.
        ocr_mid_channels: int, channels of the pixel and OCR features (paper: 512). Default 128.
        ocr_key_channels: int, channels of OCR's queries, keys and values (paper: 256).
            Default 64.
        aux_loss_weight: float >= 0, weight of the auxiliary loss in ``compute_loss``.
            Default 0.4.

    Input ``(B, H, W, input_channels)``, ``H`` and ``W`` multiples of ``size_multiple``
    (``8 * stem_stride``). Output dict: ``"logits"`` and ``"aux"`` ``(B, H, W, num_classes)``
    (bilinearly upsampled), ``"features"`` ``(B, H/s, W/s, ocr_mid_channels)``.
    ``compute_loss`` is ``loss(logits) + aux_loss_weight * loss(aux)`` with the compiled loss.

    Example:
        >>> import numpy as np
        >>> model = HRNetOCR(width=8, stem_channels=16, ocr_mid_channels=32, ocr_key_channels=16)
        >>> model(np.zeros((1, 64, 64, 1), "float32"))["logits"].shape
        TensorShape([1, 64, 64, 1])
    """

    def __init__(self, input_channels: int = 1, num_classes: int = 1, width: int = 18,
                 stem_stride: int = 2, stem_channels: int = 64, num_blocks: int = 2,
                 num_modules: int | Sequence[int] = 1, ocr_mid_channels: int = 128,
                 ocr_key_channels: int = 64, aux_loss_weight: float = AUX_LOSS_WEIGHT, **kwargs):
        check_positive_ints(input_channels=input_channels, num_classes=num_classes, width=width,
                            stem_channels=stem_channels, num_blocks=num_blocks,
                            ocr_mid_channels=ocr_mid_channels, ocr_key_channels=ocr_key_channels)
        if stem_stride not in _STEM_STRIDES:
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride!r}")
        modules = normalize_modules(num_modules)
        if not aux_loss_weight >= 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {aux_loss_weight!r}")

        # === Functional Model ===
        inputs = keras.Input((None, None, input_channels), name="image")
        features = hrnet_v2(inputs, width, stem_stride, stem_channels, num_blocks, modules)
        logits, aux, ocr_features = ocr_head(features, num_classes, ocr_mid_channels,
                                             ocr_key_channels)
        if stem_stride > 1:
            logits = ResizeByScale(stem_stride, name="logits_up")(logits)
            aux = ResizeByScale(stem_stride, name="aux_up")(aux)
        outputs = {"logits": logits, "aux": aux, "features": ocr_features}
        kwargs.setdefault("name", "hrnet_ocr")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.width = width
        self.stem_stride = stem_stride
        self.stem_channels = stem_channels
        self.num_blocks = num_blocks
        self.num_modules = num_modules if isinstance(num_modules, int) else list(num_modules)
        self.ocr_mid_channels = ocr_mid_channels
        self.ocr_key_channels = ocr_key_channels
        self.aux_loss_weight = float(aux_loss_weight)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (the lowest branch is at 1/(8 s))."""
        return 8 * self.stem_stride

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """``loss(logits) + aux_loss_weight * loss(aux)`` with the compiled loss (OCR's 0.4)."""
        return weighted_output_loss(self, y, y_pred,
                                    {"logits": 1.0, "aux": self.aux_loss_weight}, sample_weight)

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable,
                "input_channels": self.input_channels, "num_classes": self.num_classes,
                "width": self.width, "stem_stride": self.stem_stride,
                "stem_channels": self.stem_channels, "num_blocks": self.num_blocks,
                "num_modules": self.num_modules, "ocr_mid_channels": self.ocr_mid_channels,
                "ocr_key_channels": self.ocr_key_channels,
                "aux_loss_weight": self.aux_loss_weight}

