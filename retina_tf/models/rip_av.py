"""RIP-AV: artery/vein segmentation with representative-instance pre-training (RIP), Patch Context
Fusion (PCF) and a Distance Aware (DA) head.

Paper: Dai et al., "RIP-AV: Joint Representative Instance Pre-training with Context
Aware Network for Retinal Artery/Vein Segmentation", 2024.

* :func:`build_encoder`: the encoder both stages share; ConvNeXt-style stages (the seed's choice,
  Liu et al., "A ConvNet for the 2020s", CVPR 2022) or plain U-Net conv stages. It keeps a
  full-resolution stem so 1-2 px vessels never have to pass through strided features.
* :class:`RIPClassifier`: the encoder + global pooling + two sigmoid logits (artery present, vein
  present), trained on the representative patches of ``bin/generate_rip_patches.py``.
* :class:`RIPAV`: encoder-decoder with three sigmoid outputs (artery, vein, vessel), PCF at the
  bottleneck and the DA head; it starts from a RIP run's encoder (``--pretrained``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import layers, ops

from retina_tf import optimizers
from retina_tf.data.rip import distance_targets, seed_distance_targets
from retina_tf.errors import ConfigError
from retina_tf.losses import bce_loss, dice_loss, per_replica, replicas_in_sync
from retina_tf.models.base import SegmentationModel, channels_hint
from retina_tf.models.blocks import conv_bn_relu

ENCODER_KINDS = ("convnext", "conv")
FUSIONS = ("pgfusion", "gate")
DISTANCE_FORMS = ("centreline", "seed")
ENCODER_KEYS = ("input_channels", "encoder", "widths", "depths", "layer_scale_init")


def _check(**values) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")


@keras.saving.register_keras_serializable(package="retina_tf")
class LayerScale(layers.Layer):
    """Per-channel learned scale of a residual branch (ConvNeXt's layer scale, CaiT 2021)."""

    def __init__(self, init_value: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), name="gamma",
                                     initializer=keras.initializers.Constant(self.init_value))

    def call(self, x):
        return x * ops.cast(self.gamma, x.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "init_value": self.init_value}


def convnext_block(x, layer_scale_init: float, name: str):
    """7x7 depthwise conv, LayerNorm, 1x1 to 4C, GELU, 1x1 back to C, layer scale, residual."""
    dim = x.shape[-1]
    y = layers.DepthwiseConv2D(7, padding="same", name=f"{name}_dw")(x)
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln")(y)
    y = layers.Dense(4 * dim, name=f"{name}_pw1")(y)
    y = layers.Activation("gelu", name=f"{name}_gelu")(y)
    y = layers.Dense(dim, name=f"{name}_pw2")(y)
    y = LayerScale(layer_scale_init, name=f"{name}_scale")(y)
    return layers.Add(name=f"{name}_add")([x, y])


def build_encoder(input_channels: int = 3, encoder: str = "convnext",
                  widths: Sequence[int] = (16, 32, 64, 128, 192),
                  depths: Sequence[int] = (1, 1, 2, 1), layer_scale_init: float = 1e-6,
                  name: str = "encoder") -> keras.Model:
    """The shared encoder: a functional model image -> features at 1, 1/2, ... 1/2**len(depths).

    ``widths[0]`` is the full-resolution stem (two 3x3 conv-BN-ReLU); stage ``i`` halves the
    resolution and has ``widths[i]`` channels: ConvNeXt (LayerNorm + 2x2 stride-2 conv, then
    ``depths[i-1]`` ConvNeXt blocks) or conv (max-pool, then ``depths[i-1]`` pairs of 3x3
    conv-BN-ReLU, the U-Net level).
    """
    if encoder not in ENCODER_KINDS:
        raise ValueError(f"encoder must be one of {ENCODER_KINDS}, got {encoder!r}")
    if len(widths) != len(depths) + 1:
        raise ValueError(f"widths needs one entry more than depths (the stem), got widths "
                         f"{list(widths)} and depths {list(depths)}")
    _check(input_channels=input_channels, **{f"width{i}": w for i, w in enumerate(widths)},
           **{f"depth{i}": d for i, d in enumerate(depths)})
    inputs = keras.Input((None, None, input_channels), name="image")
    x = conv_bn_relu(inputs, widths[0], name="stem1")
    x = conv_bn_relu(x, widths[0], name="stem2")
    features = [x]
    for i, (width, depth) in enumerate(zip(widths[1:], depths), start=1):
        if encoder == "convnext":
            x = layers.LayerNormalization(epsilon=1e-6, name=f"down{i}_ln")(x)
            x = layers.Conv2D(width, 2, strides=2, name=f"down{i}")(x)
            for j in range(depth):
                x = convnext_block(x, layer_scale_init, name=f"stage{i}_block{j}")
        else:
            x = layers.MaxPooling2D(2, name=f"down{i}")(x)
            for j in range(depth):
                x = conv_bn_relu(x, width, name=f"stage{i}_block{j}a")
                x = conv_bn_relu(x, width, name=f"stage{i}_block{j}b")
        features.append(x)
    return keras.Model(inputs, features, name=name)


def _encoder_config(model) -> dict:
    return {"input_channels": model.input_channels, "encoder": model.encoder_kind,
            "widths": list(model.widths), "depths": list(model.depths),
            "layer_scale_init": model.layer_scale_init}


def _store_encoder_config(model, input_channels, encoder, widths, depths, layer_scale_init):
    model.input_channels = int(input_channels)
    model.encoder_kind = encoder
    model.widths = tuple(int(w) for w in widths)
    model.depths = tuple(int(d) for d in depths)
    model.layer_scale_init = float(layer_scale_init)


@keras.saving.register_keras_serializable(package="retina_tf")
class RIPClassifier(SegmentationModel, keras.Model):
    """RIP pre-training model: the encoder, global average pooling of its deepest features and
    two logits, artery present and vein present (multi-label, sigmoid).

    Paper: RIP-AV (Dai et al., MICCAI 2024), representative instance pre-training. Here it
    replaces the ImageNet weights the seed starts from (they cannot be downloaded on this
    machine).

    Input ``(B, S, S, input_channels)`` patches; output ``(B, 2)`` logits.
    """

    pretraining_script = "bin/pretrain_rip.py"

    def __init__(self, input_channels: int = 3, encoder: str = "convnext",
                 widths: Sequence[int] = (16, 32, 64, 128, 192),
                 depths: Sequence[int] = (1, 1, 2, 1), layer_scale_init: float = 1e-6,
                 dropout: float = 0.1, **kwargs):
        net = build_encoder(input_channels, encoder, widths, depths, layer_scale_init)
        inputs = keras.Input((None, None, input_channels), name="patch")
        x = layers.GlobalAveragePooling2D(name="pool")(net(inputs)[-1])
        x = layers.LayerNormalization(epsilon=1e-6, name="pool_ln")(x)
        if dropout:
            x = layers.Dropout(dropout, name="dropout")(x)
        outputs = layers.Dense(2, name="artery_vein_logits")(x)
        kwargs.setdefault("name", "rip_classifier")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.encoder = net
        self.dropout = float(dropout)
        _store_encoder_config(self, input_channels, encoder, widths, depths, layer_scale_init)

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable, **_encoder_config(self),
                "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="retina_tf")
class PatchContextFusion(layers.Layer):
    """Patch Context Fusion (RIP-AV, Dai et al. 2024): channel attention between the features of
    a patch and of its wider context, fused with learned gates.

    ``p`` and ``c`` are the global averages of the patch features ``fp`` (B, h, w, C) and of the
    context features ``fc`` (B, h', w', C; any size: in training the crop around the patch, at
    inference the whole image resized). From ``[p, c]`` a bottleneck MLP predicts a channel
    attention ``a`` (sigmoid) and, per channel, two gates ``(g_patch, g_context)`` (softmax, so
    they sum to one). The output keeps ``fp``'s shape::

        out = g_patch * fp + g_context * (a * fp + W c)

    where ``W c`` is a learned projection of the context vector broadcast over the patch.
    """

    def __init__(self, reduction: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.reduction = int(reduction)
        _check(reduction=self.reduction)

    def build(self, input_shape):
        channels = input_shape[0][-1]
        hidden = max(channels // self.reduction, 8)
        self.squeeze = layers.Dense(hidden, activation="relu", name="squeeze")
        self.attention = layers.Dense(channels, activation="sigmoid", name="attention")
        self.gate = layers.Dense(2 * channels, name="gate")
        self.context_proj = layers.Dense(channels, name="context_proj")
        self.squeeze.build((None, 2 * channels))
        self.attention.build((None, hidden))
        self.gate.build((None, hidden))
        self.context_proj.build((None, channels))

    def _descriptors(self, inputs):
        fp, fc = inputs
        p, c = ops.mean(fp, axis=(1, 2)), ops.mean(fc, axis=(1, 2))
        hidden = self.squeeze(ops.concatenate([p, c], axis=-1))
        gates = ops.softmax(ops.reshape(self.gate(hidden), (-1, fp.shape[-1], 2)), axis=-1)
        return c, hidden, gates

    def gates(self, inputs):
        """(B, C, 2) gates (patch, context) per channel; they sum to one."""
        return self._descriptors(inputs)[2]

    def call(self, inputs):
        fp, _ = inputs
        c, hidden, gates = self._descriptors(inputs)
        attention = self.attention(hidden)[:, None, None, :]
        context = self.context_proj(c)[:, None, None, :]
        g_patch, g_context = gates[:, None, None, :, 0], gates[:, None, None, :, 1]
        return g_patch * fp + g_context * (attention * fp + context)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self) -> dict:
        return {**super().get_config(), "reduction": self.reduction}


@keras.saving.register_keras_serializable(package="retina_tf")
class PatchGlobalFusion(layers.Layer):
    """Patch Context Fusion as RIP-AV builds it (``PGFusion`` in its code; Dai et al., "RIP-AV",
    MICCAI 2024): channel self-attention of the patch features and channel cross-attention of
    the patch against the global (whole-image) features, mixed per position and channel.

    With ``fp`` (B, h, w, C) the patch features and ``fg`` the global ones (resized to h x w when
    their size differs; the seed gives both the same size), and 1x1 projections ``q``, ``k``,
    ``v`` (values without bias)::

        self  = gamma_s * softmax(q(fp) k(fp)^T / sqrt(h w)) v(fp)      (C x C attention)
        cross = gamma_g * softmax(q'(fp) k'(fg)^T / sqrt(h w)) v'(fg)
        s_self, s_cross = sigmoid(fuse([self, cross]))                 (1x1 conv, 2C -> 2C)
        w = softmax over the two branches of (s_self, s_cross)
        out = fp + w * self + (1 - w) * cross

    Initialization as the seed's: conv kernels N(0, 0.01), biases 0, ``gamma_s = gamma_g = 1``.
    """

    def build(self, input_shape):
        channels = input_shape[0][-1]
        init = keras.initializers.RandomNormal(0.0, 0.01)

        def conv(name: str, filters: int = channels, bias: bool = True) -> layers.Conv2D:
            layer = layers.Conv2D(filters, 1, use_bias=bias, kernel_initializer=init,
                                  bias_initializer="zeros", name=name)
            layer.build((None, None, None, filters if name == "fuse" else channels))
            return layer

        self.patch_query, self.patch_key = conv("patch_query"), conv("patch_key")
        self.patch_value = conv("patch_value", bias=False)
        self.cross_query, self.global_key = conv("cross_query"), conv("global_key")
        self.global_value = conv("global_value", bias=False)
        self.fuse = conv("fuse", 2 * channels)
        self.gamma_self = self.add_weight(shape=(1,), initializer="ones", name="gamma_self")
        self.gamma_global = self.add_weight(shape=(1,), initializer="ones", name="gamma_global")

    @staticmethod
    def _attend(query, key, value, scale):
        """``softmax(Q^T K / scale) V^T`` over channels: (B, h, w, C) maps in, one out."""
        shape = ops.shape(query)
        q, k, v = (ops.reshape(t, (shape[0], -1, shape[-1])) for t in (query, key, value))
        similarity = ops.softmax(ops.matmul(ops.transpose(q, (0, 2, 1)), k) / scale, axis=-1)
        out = ops.matmul(similarity, ops.transpose(v, (0, 2, 1)))  # (B, C, N)
        return ops.reshape(ops.transpose(out, (0, 2, 1)), shape)

    def _branches(self, inputs):
        fp, fg = inputs
        size = ops.shape(fp)[1:3]
        if fg.shape[1:3] != fp.shape[1:3] or None in fp.shape[1:3]:
            fg = ops.cast(tf.image.resize(fg, size, method="bilinear"), fp.dtype)
        scale = ops.sqrt(ops.cast(size[0] * size[1], fp.dtype))
        attended_self = self.gamma_self * self._attend(
            self.patch_query(fp), self.patch_key(fp), self.patch_value(fp), scale)
        attended_global = self.gamma_global * self._attend(
            self.cross_query(fp), self.global_key(fg), self.global_value(fg), scale)
        scores = ops.sigmoid(self.fuse(ops.concatenate([attended_self, attended_global], -1)))
        s_self, s_global = ops.split(scores, 2, axis=-1)
        weight = ops.softmax(ops.stack([s_self, s_global], axis=0), axis=0)[0]
        return fp, attended_self, attended_global, weight

    def branch_weights(self, inputs):
        """(B, h, w, C, 2): the weights of the self and the cross branch; they sum to one."""
        _, _, _, weight = self._branches(inputs)
        return ops.stack([weight, 1.0 - weight], axis=-1)

    def call(self, inputs):
        fp, attended_self, attended_global, weight = self._branches(inputs)
        return fp + weight * attended_self + (1.0 - weight) * attended_global

    def compute_output_shape(self, input_shape):
        return input_shape[0]


def patch_gan(input_channels: int, width: int = 32, name: str = "discriminator") -> keras.Model:
    """PatchGAN discriminator (Isola et al., "pix2pix", CVPR 2017): three stride-2 4x4 convs and a
    1x1 conv to one real/fake logit per receptive-field patch, on (image, A/V maps) pairs."""
    inputs = keras.Input((None, None, input_channels), name="image_and_maps")
    x = inputs
    for i in range(3):
        x = layers.Conv2D(width * 2**i, 4, strides=2, padding="same", name=f"d{i}")(x)
        x = layers.LeakyReLU(0.2, name=f"d{i}_lrelu")(x)
    return keras.Model(inputs, layers.Conv2D(1, 1, name="patch_logits")(x), name=name)


def smooth_l1(y_true, y_pred, mask, beta: float = 1.0):
    """Mean smooth-L1 (Huber) over the pixels where ``mask`` is set (channels broadcast)."""
    diff = ops.abs(ops.cast(y_pred, "float32") - ops.cast(y_true, "float32"))
    loss = ops.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    mask = ops.broadcast_to(ops.cast(mask, "float32"), ops.shape(loss))
    return ops.sum(loss * mask) / ops.maximum(ops.sum(mask), 1.0)


def _times_sample_weight(mask, sample_weight):
    """A per-pixel (B, H, W, K) loss mask times the per-pixel sample weight (the FOV), if any."""
    if sample_weight is None:
        return mask
    weight = ops.reshape(ops.cast(sample_weight, "float32"), ops.shape(mask)[:3])
    return mask * weight[..., None]


@keras.saving.register_keras_serializable(package="retina_tf")
class RIPAV(SegmentationModel, keras.Model):
    """The RIP-AV artery/vein network.

    Paper: Dai et al., "RIP-AV: Joint Representative Instance Pre-training with Context Aware
    Network for Retinal Artery/Vein Segmentation", 2024.

    The encoder of :func:`build_encoder` runs on the image and, with the same weights, on its
    context (resized to ``context_size``); Patch Context Fusion (:class:`PatchGlobalFusion`, or
    the :class:`PatchContextFusion` gate) joins them at the bottleneck; a U-Net decoder
    (nearest x2, concat the skip, two 3x3 conv-BN-ReLU) returns to full resolution, where a 1x1
    conv gives the three logits artery, vein, vessel. The Distance Aware head (3x3
    conv-BN-ReLU, 1x1) on the early, full-resolution features (the encoder stem joined with the
    decoder's last level) regresses the per-class normalized distance maps
    (:func:`retina_tf.data.rip.distance_targets`).

    Loss (:meth:`compute_loss`): ``seg_weight * sum_k w_k (BCE_k + Dice_k)`` with ``w`` =
    artery:vein:vessel = 3:3:2 normalized to sum to one, ``+ distance_weight * smooth-L1`` of the
    distance maps on vessel pixels, ``+ adversarial_weight *`` the PatchGAN generator term when
    that weight is set (a discriminator on (image, maps) pairs is then trained alongside),
    ``+ av_weight *`` :meth:`av_decision_loss` when that weight is set (not in the seed).
    Targets ``y`` for ``fit``: (B, H, W, 3) artery, vein, vessel, followed by the 3 distance
    maps of :meth:`training_extras` (6 channels) when ``distance_head`` is on; without them
    the DA head gets no gradient (Keras then warns of variables without gradients).

    Args:
        input_channels: channels of the preprocessed image (3: colour tells arteries from veins).
        num_classes: 3 (artery, vein, vessel).
        encoder, widths, depths, layer_scale_init: :func:`build_encoder`.
        context_fusion: use PCF; off, the context is not computed at all.
        fusion: "pgfusion", the seed's module (:class:`PatchGlobalFusion`; the context features
            get no gradient, as the seed's synchronized encoder copy), or "gate", this library's
            channel gate (:class:`PatchContextFusion`).
        context_size: side of the context input; inference (and training with
            ``context_factor=0``) resizes the whole image to it. Must be a multiple of
            ``size_multiple``.
        context_factor: training context: a crop ``context_factor`` x the patch around it, or 0
            for the whole image (the seed's).
        distance_head: add the DA head and its loss.
        distance_form: "centreline": targets normalized per vessel, 1 on every centreline
            (:func:`~retina_tf.data.rip.distance_targets`), smooth-L1 on vessel pixels; "seed":
            RIP-AV's own form, the distance transform min-max normalized per image
            (:func:`~retina_tf.data.rip.seed_distance_targets`) and its loss, smooth-L1 on each
            class's pixels divided by the target (edges weigh more).
        seg_weight, distance_weight, adversarial_weight: loss weights (5, 1, 0; the seed's
            optional adversarial weight is 0.01).
        class_weights: artery, vein, vessel weights of the segmentation loss.
        av_weight: weight of :meth:`av_decision_loss` (0: off, as in the seed).

    Inputs: ``(B, H, W, C)`` images (the context is then the image resized), or a dict
    ``{"image": ..., "context": (B, context_size, context_size, C)}`` or, the context already
    encoded, ``{"image": ..., "context_features": ...}`` (:meth:`context_features`). H and W must be
    multiples of ``size_multiple``. Output: ``{"logits": (B, H, W, 3)}`` and, with the DA head,
    ``"distance"`` (B, H, W, 3) logits of the normalized distances.
    """

    task = "av"
    fully_convolutional = True
    uses_compiled_loss = False  # RIP-AV's weighted BCE + Dice, distance and adversarial terms

    def __init__(self, input_channels: int = 3, num_classes: int = 3, encoder: str = "convnext",
                 widths: Sequence[int] = (16, 32, 64, 128, 192),
                 depths: Sequence[int] = (1, 1, 2, 1), layer_scale_init: float = 1e-6,
                 context_fusion: bool = True, fusion: str = "pgfusion", context_size: int = 96,
                 context_factor: int = 0,
                 distance_head: bool = True, distance_form: str = "centreline",
                 seg_weight: float = 5.0, distance_weight: float = 1.0,
                 adversarial_weight: float = 0.0,
                 class_weights: Sequence[float] = (3.0, 3.0, 2.0), av_weight: float = 0.0,
                 **kwargs):
        super().__init__(**{"name": "rip_av", **kwargs})
        _check(num_classes=num_classes, context_size=context_size)
        if context_factor < 0:
            raise ValueError(f"context_factor must be >= 0 (0: the whole image), got "
                             f"{context_factor!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if distance_form not in DISTANCE_FORMS:
            raise ValueError(f"distance_form must be one of {', '.join(DISTANCE_FORMS)}, got "
                             f"{distance_form!r}")
        if len(class_weights) != num_classes or min(class_weights) < 0 or sum(class_weights) <= 0:
            raise ValueError(f"class_weights needs {num_classes} non-negative weights, got "
                             f"{list(class_weights)}")
        self.encoder = build_encoder(input_channels, encoder, widths, depths, layer_scale_init)
        _store_encoder_config(self, input_channels, encoder, widths, depths, layer_scale_init)
        if context_size % self.size_multiple:
            raise ValueError(f"context_size={context_size} must be a multiple of "
                             f"{self.size_multiple}")
        self.num_classes = int(num_classes)
        self.context_fusion = bool(context_fusion)
        self.fusion = fusion
        self.context_size = int(context_size)
        self.context_factor = int(context_factor)
        self.distance_head = bool(distance_head)
        self.distance_form = distance_form
        self.seg_weight = float(seg_weight)
        self.distance_weight = float(distance_weight)
        self.adversarial_weight = float(adversarial_weight)
        self.class_weights = tuple(float(w) for w in class_weights)
        if av_weight < 0:
            raise ValueError(f"av_weight must be >= 0, got {av_weight!r}")
        self.av_weight = float(av_weight)
        self.decoder = self._build_decoder()
        self.discriminator = None
        if self.adversarial_weight:
            self.discriminator = patch_gan(input_channels + num_classes)
            self.d_optimizer = optimizers.Adam(2e-4, beta_1=0.5)
            self.d_optimizer.build(self.discriminator.trainable_variables)
            self.d_loss_tracker = keras.metrics.Mean(name="discriminator_loss")
        self.build()

    @property
    def size_multiple(self) -> int:
        return 2 ** len(self.depths)

    def _build_decoder(self) -> keras.Model:
        """Functional decoder: encoder features (+ context bottleneck) -> logits (+ distance)."""
        widths = self.widths
        feats = [keras.Input((None, None, w), name=f"feature{i}") for i, w in enumerate(widths)]
        inputs = list(feats)
        x = feats[-1]
        if self.context_fusion:
            context = keras.Input((None, None, widths[-1]), name="context_feature")
            inputs.append(context)
            fusion = PatchGlobalFusion if self.fusion == "pgfusion" else PatchContextFusion
            x = fusion(name="pcf")([x, context])
        for level in range(len(widths) - 2, -1, -1):
            x = layers.UpSampling2D(2, interpolation="nearest", name=f"up{level}")(x)
            x = layers.Concatenate(name=f"skip{level}")([x, feats[level]])
            x = conv_bn_relu(x, widths[level], name=f"dec{level}_1")
            x = conv_bn_relu(x, widths[level], name=f"dec{level}_2")
        outputs = {"logits": layers.Conv2D(self.num_classes, 1, name="logits")(x)}
        if self.distance_head:
            early = layers.Concatenate(name="distance_in")([feats[0], x])
            d = conv_bn_relu(early, widths[0], name="distance")
            outputs["distance"] = layers.Conv2D(self.num_classes, 1, name="distance_logits")(d)
        return keras.Model(inputs, outputs, name="decoder")

    def build(self, input_shape=None):
        # encoder, decoder (and discriminator) are functional models, built on construction
        self.built = True

    def context_of(self, images):
        """The inference context: the whole (batch of) image(s) resized to ``context_size``."""
        size = (self.context_size, self.context_size)
        return ops.cast(tf.image.resize(images, size, method="area"), images.dtype)

    def context_features(self, context, training=None):
        """The encoder's deepest features of a context (what the fusion takes).

        Windows of one image share its context: sliding-window inference computes these once
        per image (per TTA view) and passes them as ``{"image": ..., "context_features": ...}``
        instead of encoding the same context again for every window; features of batch 1 are
        shared by every image of the batch.
        """
        features = self.encoder(context, training=training)[-1]
        if self.fusion == "pgfusion":  # the seed's encoder copy: same weights, no gradient
            features = ops.stop_gradient(features)
        return features

    def call(self, inputs, training=None):
        if isinstance(inputs, dict):
            images, context = inputs["image"], inputs.get("context")
            global_features = inputs.get("context_features")
        else:
            images, context, global_features = inputs, None, None
        feats = self.encoder(images, training=training)
        decoder_inputs = list(feats)
        if self.context_fusion:
            if global_features is None:
                if context is None:
                    context = self.context_of(images)
                global_features = self.context_features(context, training=training)
            else:  # one encoded context (batch 1) for every window of the batch
                global_features = tf.broadcast_to(global_features, tf.concat(
                    [tf.shape(images)[:1], tf.shape(global_features)[1:]], 0))
            decoder_inputs.append(global_features)
        return self.decoder(decoder_inputs, training=training)

    # --- training ----------------------------------------------------------------------------
    def _split_target(self, y):
        """A/V targets and, when appended (training extras), the distance maps."""
        k = self.num_classes
        y = ops.cast(y, "float32")
        return y[..., :k], (y[..., k:2 * k] if y.shape[-1] >= 2 * k else None)

    def segmentation_loss(self, y_av, logits, sample_weight=None):
        """``sum_k w_k (BCE_k + Dice_k)`` with the class weights normalized to sum to one."""
        total = 0.0
        norm = sum(self.class_weights)
        for k, weight in enumerate(self.class_weights):
            if weight:
                yk, lk = y_av[..., k:k + 1], logits[..., k:k + 1]
                total = total + (weight / norm) * (bce_loss(yk, lk, sample_weight)
                                                   + dice_loss(yk, lk, sample_weight))
        return total

    def distance_loss(self, y_av, distance, distance_logits, sample_weight=None):
        """Smooth-L1 of the predicted normalized distances on vessel pixels (inside the FOV);
        with ``distance_form="seed"``, RIP-AV's: on each class's own pixels, each term divided
        by its target (``centernessLoss`` in its code)."""
        if self.distance_form == "centreline":
            mask = _times_sample_weight(y_av[..., -1:], sample_weight)
            return smooth_l1(distance, ops.sigmoid(distance_logits), mask)
        mask = _times_sample_weight(y_av, sample_weight)
        diff = ops.abs(ops.sigmoid(distance_logits) * mask - ops.cast(distance, "float32"))
        term = ops.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5) / (distance + 1e-12)
        return ops.sum(term * mask) / ops.maximum(ops.sum(mask), 1.0)

    def av_decision_loss(self, y_av, logits, sample_weight=None):
        """BCE of ``sigmoid(logit_artery - logit_vein)`` against "artery" on the pixels that A/V
        accuracy counts (artery XOR vein; crossings and uncertain pixels excluded).

        A/V accuracy calls a pixel artery when ``p_artery >= p_vein``, i.e. when the logit
        difference is >= 0. The per-class BCE + Dice trains that difference only indirectly,
        and on thin vessels, where both probabilities are small, hardly at all; this term trains
        the decision itself. It is this library's addition, not part of RIP-AV.
        """
        artery, vein = y_av[..., 0:1], y_av[..., 1:2]
        counted = _times_sample_weight(artery * (1.0 - vein) + vein * (1.0 - artery),
                                       sample_weight)
        diff = logits[..., 0:1] - logits[..., 1:2]
        return bce_loss(artery, diff, counted)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        y_av, distance = self._split_target(y)
        total = self.seg_weight * self.segmentation_loss(y_av, y_pred["logits"], sample_weight)
        if self.av_weight:
            total = total + self.av_weight * self.av_decision_loss(
                y_av, y_pred["logits"], sample_weight)
        if self.distance_head and distance is not None and self.distance_weight:
            total = total + self.distance_weight * self.distance_loss(
                y_av, distance, y_pred["distance"], sample_weight)
        total = per_replica(total)  # a replica's share, as a Keras loss is
        for extra in self.losses:
            total = total + ops.sum(ops.cast(extra, total.dtype))
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        y_av, _ = self._split_target(y)
        return super().compute_metrics(x, y_av, y_pred["logits"], sample_weight)

    def _pairs(self, x, maps):
        images = x["image"] if isinstance(x, dict) else x
        return ops.concatenate([ops.cast(images, "float32"), maps], axis=-1)

    def train_step(self, data):
        """Keras' step, plus the PatchGAN update when ``adversarial_weight`` is set: the
        generator loss adds ``adversarial_weight * BCE(D(image, sigmoid(logits)), real)``, then
        the discriminator learns ground-truth pairs as real and predicted pairs as fake."""
        if not self.adversarial_weight:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        disc = self.discriminator
        disc_vars = {id(v) for v in disc.trainable_variables}
        gen_vars = [v for v in self.trainable_variables if id(v) not in disc_vars]
        bce = keras.losses.BinaryCrossentropy(from_logits=True)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
            fake = disc(self._pairs(x, ops.sigmoid(y_pred["logits"])), training=False)
            loss = loss + self.adversarial_weight * bce(ops.ones_like(fake), fake)
        self.optimizer.apply(tape.gradient(loss, gen_vars), gen_vars)
        y_av, _ = self._split_target(y)
        with tf.GradientTape() as tape:
            real = disc(self._pairs(x, y_av), training=True)
            fake = disc(self._pairs(x, ops.stop_gradient(ops.sigmoid(y_pred["logits"]))),
                        training=True)
            d_loss = bce(ops.ones_like(real), real) + bce(ops.zeros_like(fake), fake)
        self.d_optimizer.apply(tape.gradient(d_loss, disc.trainable_variables),
                               disc.trainable_variables)
        # the losses are a replica's shares (per_replica): logged whole, as Keras logs them
        self._loss_tracker.update_state(loss * replicas_in_sync(), sample_weight=ops.shape(y)[0])
        self.d_loss_tracker.update_state(d_loss * replicas_in_sync())
        return self.compute_metrics(x, y, y_pred, sample_weight)

    # --- pre-training, extras, config --------------------------------------------------------
    def training_extras(self, targets):
        """Extra training targets appended after the A/V channels: the distance maps."""
        if not self.distance_head:
            return None
        form = distance_targets if self.distance_form == "centreline" else seed_distance_targets
        return [form(t > 0.5) for t in targets]

    def load_pretrained(self, source: keras.Model) -> None:
        """Copies every weight of a RIP-AV run of the same configuration (fine-tuning it), else
        the encoder of a RIP pre-training run or of a RIP-AV run with other heads; the encoder
        configuration must match."""
        if isinstance(source, RIPAV) and [w.shape for w in source.get_weights()] == [
                w.shape for w in self.get_weights()]:
            self.set_weights(source.get_weights())
            return
        other = getattr(source, "encoder", None)
        if not isinstance(source, (RIPClassifier, RIPAV)) or other is None:
            raise ConfigError(f"--pretrained: cannot start {self.name} from {source.name}: "
                              "give a RIP pre-training run folder (bin/pretrain_rip.py) or a "
                              "rip_av run")
        mine, theirs = self.encoder.get_weights(), other.get_weights()
        if [w.shape for w in mine] != [w.shape for w in theirs]:
            config = _encoder_config(source)
            hint = channels_hint(config.pop("input_channels"), self.input_channels)
            raise ConfigError(f"--pretrained: cannot start {self.name} from {source.name}: "
                              "the encoders differ; give --model_config the pre-training "
                              f"encoder {config}{hint}")
        self.encoder.set_weights(theirs)
        if isinstance(source, RIPAV):  # said: the decoder and heads start afresh
            logging.getLogger(__name__).warning(
                f"--pretrained: {source.name}'s decoder and heads differ from this model's "
                "(--model_config); only its encoder is copied")

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable, **_encoder_config(self),
                "num_classes": self.num_classes, "context_fusion": self.context_fusion,
                "fusion": self.fusion, "context_size": self.context_size,
                "context_factor": self.context_factor,
                "distance_head": self.distance_head, "distance_form": self.distance_form,
                "seg_weight": self.seg_weight,
                "distance_weight": self.distance_weight,
                "adversarial_weight": self.adversarial_weight,
                "class_weights": list(self.class_weights), "av_weight": self.av_weight}

