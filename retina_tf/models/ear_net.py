"""EAR-Net stage 2: error-attention refinement on top of an HMSA model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import layers, ops

from retina_tf.errors import ConfigError
from retina_tf.losses import per_replica
from retina_tf.models.base import SegmentationModel
from retina_tf.models.blocks import set_bn_momentum, weighted_output_loss
from retina_tf.models.hmsa import (
    HMSA,
    ScaleAttentionHead,
    check_nonnegative,
    fuse_scales,
    hmsa_loss_weights,
    multiscale_outputs,
    scale_passes,
)
from retina_tf.models.hrnet_ocr import ResizeByScale, check_positive_ints

# The method's modulation weight w in (1 - w) * p + w * att * p (the seed's ERROR_ATTN_WEIGHT).
ERROR_WEIGHT = 0.5
# Weight of the error-map MSE in the loss (the seed's ERR_ATTN_ALPHA).
ERROR_LOSS_WEIGHT = 0.5


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


@keras.saving.register_keras_serializable(package="retina_tf")
class TrainingSwitch(layers.Layer):
    """``inputs = [in_training, at_inference]``: the first while training, else the second.

    Both are computed (the graph is one); ``training=None`` (a plain call) counts as inference,
    as for batch normalization.
    """

    def call(self, inputs, training=None):
        return inputs[0] if training else inputs[1]

    def compute_output_shape(self, input_shapes):
        return input_shapes[1]


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
    """EAR-Net stage 2: a stage-1 HMSA model plus an error-attention head that modulates its
    logits.

    Paper: "EAR-Net: Error Attention Refining Network for Retinal Vessel Segmentation",
    Wang et al., DICTA 2021, https://arxiv.org/abs/2107.01351.

    Stage 1 is an :class:`~retina_tf.models.hmsa.HMSA` model, held whole as ``self.stage1`` and
    serialized nested in this model's config (as keras-hub tasks hold a backbone); its binary
    prediction against the ground truth on the training images gives error maps
    (``bin/make_error_maps.py``). Stage 2 starts from the stage-1 weights (``load_pretrained``)
    and adds an error-attention head of the same shape as the scale-attention head ([3x3 conv,
    BN, ReLU] x 2, 1x1 conv, sigmoid) on the OCR features of every scale's pass; the 1.0 pass's
    map is supervised by the error map (MSE inside the FOV). Logits ``p`` become ``(1 - w) * p +
    w * att * p`` with ``w = error_weight`` (0.5), where the authors' code
    (https://github.com/Markin-Wang/EARNet, ``network/ocrnet_error_attn.py``) applies it:

    - training (``two_scale_forward``): the joint logits and the joint auxiliary logits, after the
      scale fusion, by the 1.0 pass's attention;
    - inference (``nscale_forward``): each scale's logits and auxiliary logits by that scale's own
      attention, before the fusion. The factor ``1 - w + w att`` then differs between scales, so
      the sign of a fused logit (the mask) can differ from stage 1's.

    Args:
        stage1: the :class:`HMSA` model (or its serialized config). Default: built from
            ``stage1_arguments``.
        error_attention_channels: int, width of the error-attention head's 3x3 convs. Default:
            stage 1's ``attention_channels``.
        error_weight: float in [0, 1], ``w``. Default 0.5.
        error_loss_weight: float, weight of the error-map MSE (the code's ``ERR_ATTN_ALPHA``).
            Default 0.5.
        **stage1_arguments: the :class:`HMSA` arguments of a new stage 1 (``width``,
            ``scales``, ``bn_momentum``, ...: one ``--model_config`` serves both stages); they
            must match the stage-1 run.

    Input ``(B, H, W, input_channels)``, ``H``, ``W`` multiples of ``size_multiple``. Output: the
    HMSA dict, with ``"logits"`` and ``"aux"`` modulated (per the mode above; ``"logits_<s>"``
    stay each scale's own, as the code supervises them), plus ``"stage1_logits"`` and
    ``"stage1_aux"`` (HMSA's joint outputs) and ``"error_attention"`` (the 1.0 pass's, 1
    channel, input size). Targets: the segmentation target with the error
    map appended as one more channel (``K + 1`` channels); a ``K``-channel target trains the
    segmentation terms only. ``compute_loss``: the HMSA loss on the modulated logits plus
    ``error_loss_weight * MSE(error_attention, error map)`` inside the FOV.
    """

    # Tells training to append the stage-1 error maps to the training targets.
    needs_error_maps = True
    # HMSA's constructor arguments build the stage-1 model.
    argument_sources = (HMSA,)

    def __init__(self, stage1: HMSA | dict | None = None,
                 error_attention_channels: int | None = None,
                 error_weight: float = ERROR_WEIGHT,
                 error_loss_weight: float = ERROR_LOSS_WEIGHT,
                 **kwargs):
        error_head = kwargs.pop("_shared_error_head", None)  # only from with_scales()
        stage1_arguments = {k: kwargs.pop(k) for k in list(kwargs)
                            if k in HMSA.constructor_arguments()}
        if isinstance(stage1, dict):
            stage1 = keras.saving.deserialize_keras_object(stage1)
        if stage1 is None:
            stage1 = HMSA(**stage1_arguments)
        elif stage1_arguments:
            raise ValueError(f"give EARNet either stage1 or its arguments "
                             f"({', '.join(stage1_arguments)}), not both")
        if not isinstance(stage1, HMSA):
            raise TypeError(f"EARNet's stage 1 must be an HMSA model, got {type(stage1)}")
        error_attention_channels = error_attention_channels or stage1.attention_channels
        check_positive_ints(error_attention_channels=error_attention_channels)
        check_nonnegative(error_loss_weight=error_loss_weight)
        network = stage1.network

        # === Layers ===
        if error_head is None:
            error_head = ScaleAttentionHead(error_attention_channels, name="error_attention")
            error_head.build((None, None, None, network.ocr_mid_channels))

        # === Functional Model ===
        inputs = keras.Input((None, None, network.input_channels), name="image")
        passes = scale_passes(inputs, network, stage1.scale_attention, stage1.scales,
                              network.stem_stride)
        outputs = multiscale_outputs(inputs, passes)
        modulated = []  # inference: every pass modulated by its own error attention
        for p in passes:
            tag = f"x{p['scale']}".replace(".", "_")
            # Run at every scale, as the code's _fwd does: its BN statistics see them all.
            attention = error_head(p["features"])
            if network.stem_stride > 1:
                up = "error_attention_up" if p["scale"] == 1.0 else f"error_attention_{tag}_up"
                attention = ResizeByScale(network.stem_stride, name=up)(attention)
            if p["scale"] == 1.0:
                outputs["error_attention"] = attention
            modulated.append(dict(p, **{
                key: ErrorAttentionModulation(error_weight, name=f"error_modulation_{key}_{tag}")(
                    [p[key], attention]) for key in ("logits", "aux")}))
        outputs["stage1_logits"], outputs["stage1_aux"] = outputs["logits"], outputs["aux"]
        for key in ("logits", "aux"):
            # training: the fused maps modulated by the 1.0 pass's error attention
            in_training = ErrorAttentionModulation(error_weight, name=f"error_modulation_{key}")(
                [outputs[key], outputs["error_attention"]])
            at_inference = fuse_scales(modulated, key, name=f"modulated_{key}")
            outputs[key] = TrainingSwitch(name=f"{key}_select")([in_training, at_inference])
        kwargs.setdefault("name", "ear_net")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.stage1 = stage1
        self.error_attention = error_head
        set_bn_momentum(self, stage1.bn_momentum)  # the new head's BN follows stage 1
        self.error_attention_channels = error_attention_channels
        self.error_weight = float(error_weight)
        self.error_loss_weight = float(error_loss_weight)
        self.num_classes = network.num_classes

    @property
    def size_multiple(self) -> int:
        return self.stage1.size_multiple

    @property
    def scales(self) -> list[float]:
        return self.stage1.scales

    @property
    def bn_momentum(self) -> float:
        return self.stage1.bn_momentum

    def with_scales(self, scales: Sequence[float]) -> EARNet:
        """The same model evaluated at other ``scales``; shares this model's layers."""
        return EARNet(stage1=self.stage1.with_scales(scales),
                      error_attention_channels=self.error_attention_channels,
                      error_weight=self.error_weight, error_loss_weight=self.error_loss_weight,
                      name=self.name, _shared_error_head=self.error_attention)

    def load_pretrained(self, source: keras.Model) -> None:
        """Starts stage 2 from a stage-1 :class:`HMSA` (its weights become ``self.stage1``'s;
        the error-attention head keeps its initialization) or from another EARNet (all
        weights)."""
        if isinstance(source, EARNet):
            target = self
        elif isinstance(source, HMSA):
            target = self.stage1
        else:
            raise ConfigError(f"--pretrained: cannot start {self.name} from {source.name} "
                              f"({type(source).__name__}): stage 1 must be an hmsa run")
        mine, theirs = target.get_weights(), source.get_weights()
        if [w.shape for w in mine] != [w.shape for w in theirs]:
            raise ConfigError(f"--pretrained: cannot start {self.name} from {source.name}: the "
                              "weights differ in shape; give --model_config the stage-1 run's "
                              "architecture (its run.json)")
        target.set_weights(theirs)

    def _split_target(self, y):
        if y is not None and y.shape[-1] == self.num_classes + 1:
            return y[..., :self.num_classes], y[..., self.num_classes:]
        return y, None

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """HMSA's loss on the modulated logits and auxiliary logits + ``error_loss_weight`` x
        FOV-masked MSE of the 1.0 pass's error attention against the error map (the target's
        last channel, when present)."""
        y_seg, error_map = self._split_target(y)
        total = weighted_output_loss(self, y_seg, y_pred, hmsa_loss_weights(self.stage1),
                                     sample_weight)
        if error_map is not None and self.error_loss_weight:
            total = total + self.error_loss_weight * per_replica(masked_mse(
                y_pred["error_attention"], error_map, sample_weight))  # as a Keras loss is
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        y_seg, _ = self._split_target(y)
        return super().compute_metrics(x, y_seg, y_pred["logits"], sample_weight)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "trainable": self.trainable,
                "stage1": keras.saving.serialize_keras_object(self.stage1),
                "error_attention_channels": self.error_attention_channels,
                "error_weight": self.error_weight, "error_loss_weight": self.error_loss_weight}
