"""EAR-Net stage 2: error-attention refinement on top of an HMSA model."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers, ops

from retina_tf.models.base import SegmentationModel
from retina_tf.models.blocks import weighted_output_loss
from retina_tf.models.hmsa import (
    SCALE_LOSS_WEIGHT,
    ScaleAttentionHead,
    check_nonnegative,
    check_scales,
    hierarchical_multiscale,
    hmsa_config,
    hmsa_layers,
    hmsa_loss_weights,
    scales_size_multiple,
    store_hmsa_attributes,
)
from retina_tf.models.hrnet_ocr import (
    AUX_LOSS_WEIGHT,
    ResizeByScale,
    check_positive_ints,
    normalize_modules,
)

# The method's modulation weight w in (1 - w) * p + w * att * p.
ERROR_WEIGHT = 0.5


@keras.saving.register_keras_serializable(package="retina_tf")
class ErrorAttentionModulation(layers.Layer):
    """``(1 - weight) * logits + weight * attention * logits`` (EAR-Net's logit modulation).

    ``inputs = [logits, attention]`` with the same height and width; attention has one channel
    (broadcast over the classes). A zero attention map gives ``(1 - weight) * logits``; an
    all-ones map gives the logits unchanged. The factor lies in ``[1 - weight, 1]``, so it
    rescales confidence but never flips a logit's sign.
    """

    def __init__(self, weight: float = ERROR_WEIGHT, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"error-attention weight must be in [0, 1], got {weight!r}")
        self.weight = float(weight)

    def call(self, inputs):
        logits, attention = inputs
        attention = ops.cast(attention, logits.dtype)
        return (1.0 - self.weight) * logits + self.weight * attention * logits

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self) -> dict:
        return {**super().get_config(), "weight": self.weight}


def masked_mse(prediction, target, sample_weight=None):
    """Mean squared error over the pixels with weight > 0 (the FOV), weighted by it."""
    target = ops.cast(target, prediction.dtype)
    squared = ops.square(prediction - target)
    if sample_weight is None:
        return ops.mean(squared)
    weight = ops.cast(sample_weight, prediction.dtype)
    return ops.sum(squared * weight) / ops.maximum(ops.sum(weight * ops.ones_like(squared)), 1.0)


@keras.saving.register_keras_serializable(package="retina_tf")
class EARNet(SegmentationModel, keras.Model):
    """EAR-Net stage 2: an HMSA model plus an error-attention head that modulates its logits.

    Paper: "EAR-Net: Error Attention Refining Network for Retinal Vessel Segmentation",
    Wang et al., DICTA 2021, https://arxiv.org/abs/2107.01351.

    Stage 1 is :class:`~retina_tf.models.hmsa.HMSA`; its binary prediction against the ground
    truth on the training images gives error maps (``bin/make_error_maps.py``). Stage 2 starts
    from the stage-1 weights (``load_pretrained``) and adds an error-attention head of the same
    shape as the scale-attention head ([3x3 conv, BN, ReLU] x 2, 1x1 conv, sigmoid) on the OCR
    features of the 1.0-scale pass, supervised by the error map (MSE inside the FOV). The joint
    logits ``p`` become ``(1 - w) * p + w * att * p`` with ``w = error_weight`` (0.5), at training
    and at inference.

    Args:
        input_channels ... scale_loss_weight: the :class:`HMSA` arguments, which must match the
            stage-1 run.
        error_attention_channels: int, width of the error-attention head's 3x3 convs. Default:
            ``attention_channels``.
        error_weight: float in [0, 1], ``w``. Default 0.5.
        error_loss_weight: float, weight of the error-map MSE. Default 1.0.
        bn_momentum: float, BatchNormalization momentum of every layer (see :class:`HMSA`).

    Input ``(B, H, W, input_channels)``, ``H``, ``W`` multiples of ``size_multiple``. Output: the
    HMSA dict, with ``"logits"`` modulated, plus ``"stage1_logits"`` (HMSA's joint logits) and
    ``"error_attention"`` (1 channel, input size). Targets: the segmentation target with the error
    map appended as one more channel (``K + 1`` channels); a ``K``-channel target trains the
    segmentation terms only. ``compute_loss``: the HMSA loss on the modulated logits plus
    ``error_loss_weight * MSE(error_attention, error map)`` inside the FOV.
    """

    def __init__(self, input_channels: int = 1, num_classes: int = 1, width: int = 18,
                 stem_stride: int = 2, stem_channels: int = 64, num_blocks: int = 2,
                 num_modules: int | Sequence[int] = 1, ocr_mid_channels: int = 128,
                 ocr_key_channels: int = 64, attention_channels: int = 64,
                 scales: Sequence[float] = (0.5, 1.0), aux_loss_weight: float = AUX_LOSS_WEIGHT,
                 scale_loss_weight: float = SCALE_LOSS_WEIGHT,
                 error_attention_channels: int | None = None,
                 error_weight: float = ERROR_WEIGHT, error_loss_weight: float = 1.0,
                 bn_momentum: float = 0.9, **kwargs):
        shared = kwargs.pop("_shared_layers", None)  # only from with_scales()
        scale_values = check_scales(scales)
        error_attention_channels = error_attention_channels or attention_channels
        check_positive_ints(attention_channels=attention_channels,
                            error_attention_channels=error_attention_channels)
        normalize_modules(num_modules)
        check_nonnegative(aux_loss_weight=aux_loss_weight, scale_loss_weight=scale_loss_weight,
                          error_loss_weight=error_loss_weight)

        # === Layers ===
        if shared is None:
            network, attention_head = hmsa_layers(
                input_channels=input_channels, num_classes=num_classes, width=width,
                stem_stride=stem_stride, stem_channels=stem_channels, num_blocks=num_blocks,
                num_modules=num_modules, ocr_mid_channels=ocr_mid_channels,
                ocr_key_channels=ocr_key_channels, aux_loss_weight=aux_loss_weight,
                attention_channels=attention_channels)
            error_head = ScaleAttentionHead(error_attention_channels, name="error_attention")
            error_head.build((None, None, None, ocr_mid_channels))
        else:
            network, attention_head, error_head = shared

        # === Functional Model ===
        inputs = keras.Input((None, None, input_channels), name="image")
        outputs = hierarchical_multiscale(inputs, network, attention_head, scale_values,
                                          stem_stride, return_features=True)
        attention = error_head(outputs.pop("features"))
        if stem_stride > 1:
            attention = ResizeByScale(stem_stride, name="error_attention_up")(attention)
        outputs["stage1_logits"] = outputs["logits"]
        outputs["error_attention"] = attention
        outputs["logits"] = ErrorAttentionModulation(error_weight, name="error_modulation")(
            [outputs["logits"], attention])
        kwargs.setdefault("name", "ear_net")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        store_hmsa_attributes(self, network, attention_head, attention_channels, scale_values,
                              aux_loss_weight, scale_loss_weight, bn_momentum)
        self.error_attention = error_head
        self.error_attention_channels = error_attention_channels
        self.error_weight = float(error_weight)
        self.error_loss_weight = float(error_loss_weight)
        self.num_classes = num_classes

    # Tells bin/train.py to append the stage-1 error maps to the training targets.
    needs_error_maps = True

    @property
    def size_multiple(self) -> int:
        return scales_size_multiple(self.network.size_multiple, self.scales)

    def with_scales(self, scales: Sequence[float]) -> EARNet:
        """The same model evaluated at other ``scales``; shares this model's layers."""
        config = dict(self.get_config(), scales=list(scales))
        return EARNet(**config, _shared_layers=(self.network, self.scale_attention,
                                                self.error_attention))

    def load_pretrained(self, source: keras.Model) -> None:
        """Starts stage 2 from a stage-1 :class:`HMSA` (or another EARNet): copies the HRNet-OCR
        network and the scale-attention head; the error-attention head keeps its initialization
        (or is copied from an EARNet)."""
        pairs = [("network", self.network), ("scale_attention", self.scale_attention)]
        if isinstance(source, EARNet):
            pairs.append(("error_attention", self.error_attention))
        for attr, layer in pairs:
            other = getattr(source, attr, None)
            if other is None:
                raise ValueError(f"cannot start {self.name} from {source.name}: it has no "
                                 f"{attr} (stage 1 must be an hmsa run)")
            mine, theirs = layer.get_weights(), other.get_weights()
            shapes = [w.shape for w in mine], [w.shape for w in theirs]
            if shapes[0] != shapes[1]:
                raise ValueError(f"cannot start {self.name} from {source.name}: the {attr} "
                                 "weights differ in shape; give --model_config the stage-1 "
                                 "run's architecture (its run.json)")
            layer.set_weights(theirs)

    def _split_target(self, y):
        if y is not None and y.shape[-1] == self.num_classes + 1:
            return y[..., :self.num_classes], y[..., self.num_classes:]
        return y, None

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """HMSA's loss on the modulated logits + ``error_loss_weight`` x FOV-masked MSE of the
        error attention against the error map (the target's last channel, when present)."""
        y_seg, error_map = self._split_target(y)
        total = weighted_output_loss(self, y_seg, y_pred, hmsa_loss_weights(self), sample_weight)
        if error_map is not None and self.error_loss_weight:
            total = total + self.error_loss_weight * masked_mse(
                y_pred["error_attention"], error_map, sample_weight)
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        y_seg, _ = self._split_target(y)
        return super().compute_metrics(x, y_seg, y_pred["logits"], sample_weight)

    def get_config(self) -> dict:
        return {**hmsa_config(self), "error_attention_channels": self.error_attention_channels,
                "error_weight": self.error_weight, "error_loss_weight": self.error_loss_weight}


