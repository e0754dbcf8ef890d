"""DDRNet-23-slim with a full-resolution high branch, for thin retinal vessels, or at the
paper's 1/8 resolution (``output_stride=8``)."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from retina_tf.models.base import SegmentationModel
from retina_tf.models.blocks import (
    BatchNormalization,
    LogitsMetricsMixin,
    ResizeToMatch,
    basic_block,
    bottleneck_block,
    resnet_conv_bn,
    set_bn_momentum,
    weighted_output_loss,
)

# PyTorch's BatchNorm2d(momentum=0.1, eps=1e-5), as in the DDRNet code.
_BN = {"momentum": 0.9, "epsilon": 1e-5}
# DAPPM's average pools (kernel, stride) in the paper; a fifth, global, scale follows them.
_DAPPM_POOLS = ((5, 2), (9, 4), (17, 8))
_AUX_WEIGHT = 0.4
OUTPUT_STRIDES = (1, 8)


def bn_relu_conv(x, filters: int, kernel_size: int, name: str, use_bias: bool = False):
    """Pre-activation [BN, ReLU, conv], the unit of DAPPM and of the segmentation heads."""
    x = BatchNormalization(**_BN, name=f"{name}_bn")(x)
    x = layers.ReLU(name=f"{name}_relu")(x)
    return layers.Conv2D(filters, kernel_size, padding="same", use_bias=use_bias,
                         kernel_initializer="he_normal", name=f"{name}_conv")(x)


def dappm(x, branch_planes: int, out_planes: int, name: str = "dappm"):
    """Deep Aggregation Pyramid Pooling Module (DDRNet, Hong et al. 2021).

    Average pools k5/s2, k9/s4, k17/s8 and a global pool, each [BN, ReLU, 1x1 conv]; each scale is
    upsampled to the input size, added to the previous scale's processed map and processed by
    [BN, ReLU, 3x3 conv] (the cascade); the five maps are concatenated, compressed by
    [BN, ReLU, 1x1 conv] and added to a [BN, ReLU, 1x1 conv] shortcut.

    The pools pad ``k // 2`` zeros per side and average over the whole window, as PyTorch's
    ``AvgPool2d(count_include_pad=True)``; the pooled map is ``ceil(h / s)`` high, so it is at
    least 1x1 for any input (a 1x1 input too), and is resized back to the input size.

    Input (B, h, w, C); output (B, h, w, out_planes).
    """
    previous = bn_relu_conv(x, branch_planes, 1, name=f"{name}_scale0")
    scales = [previous]
    for i, (kernel, stride) in enumerate(_DAPPM_POOLS + ((None, None),), start=1):
        if kernel is None:
            pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool{i}")(x)
        else:
            pooled = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad{i}")(x)
            pooled = layers.AveragePooling2D(kernel, stride, padding="valid",
                                             name=f"{name}_pool{i}")(pooled)
        y = bn_relu_conv(pooled, branch_planes, 1, name=f"{name}_scale{i}")
        y = ResizeToMatch(name=f"{name}_up{i}")([y, x])
        y = layers.Add(name=f"{name}_add{i}")([y, previous])
        previous = bn_relu_conv(y, branch_planes, 3, name=f"{name}_process{i}")
        scales.append(previous)
    y = layers.Concatenate(name=f"{name}_concat")(scales)
    y = bn_relu_conv(y, out_planes, 1, name=f"{name}_compression")
    shortcut = bn_relu_conv(x, out_planes, 1, name=f"{name}_shortcut")
    return layers.Add(name=f"{name}_out")([y, shortcut])


def segmentation_head(x, head_planes: int, num_classes: int, name: str):
    """[BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv] to ``num_classes`` logits (DDRNet's segmenthead)."""
    x = bn_relu_conv(x, head_planes, 3, name=f"{name}_1")
    return bn_relu_conv(x, num_classes, 1, name=f"{name}_2", use_bias=True)


def residual_stage(x, block: str, filters: int, blocks: int, strides: int = 1, name: str = ""):
    """``blocks`` residual blocks, the first strided; the last skips its ReLU (DDRNet's
    ``_make_layer``: the stage output is fused or activated by the caller)."""
    for i in range(blocks):
        kwargs = dict(strides=strides if i == 0 else 1, final_relu=i < blocks - 1,
                      name=f"{name}_block{i + 1}")
        if block == "basic":
            x = basic_block(x, filters, **kwargs)
        else:
            x = bottleneck_block(x, filters, expansion=2, **kwargs)
    return x


def _relu(x, name: str):
    return layers.ReLU(name=name)(x)


@keras.saving.register_keras_serializable(package="retina_tf")
class DDRNet(LogitsMetricsMixin, SegmentationModel, keras.Model):
    """DDRNet-23-slim, full-resolution variant (or the paper's, at 1/8), for fundus vessels.

    Paper: Hong, Pan, Sun, Jia, "Deep Dual-resolution Networks for Real-time and Accurate Semantic
    Segmentation of Road Scenes", 2021, https://arxiv.org/abs/2101.06085 .

    Two stride-1 3x3 stems and a stride-1 layer2 keep the high-resolution branch at the input
    resolution (the paper's is at 1/8, too coarse for 1-2 pixel capillaries). From layer3 on, a
    low-resolution branch goes to 1/2, 1/4 and 1/8 (``planes * 4``, ``* 8``, ``* 16`` channels)
    while the high branch keeps ``planes * 2``. After layers 3 and 4 the branches exchange
    features both ways (high -> low: strided 3x3 conv(s) + BN; low -> high: 1x1 conv + BN, bilinear
    upsampling), and are added. Layer5 is one Bottleneck (expansion 2) per branch; DAPPM turns the
    1/8 map into ``planes * 4`` channels, which are upsampled and added to the high branch before
    the head [BN, ReLU, 3x3, BN, ReLU, 1x1]. The last block of every stage skips its ReLU, as in
    the DDRNet code.

    ``output_stride=8`` is the paper's network: the two stems and layer2's first block have
    stride 2, so the high branch runs at 1/8 and the low branch reaches 1/64; the logits (and the
    auxiliary ones) are resized bilinearly to the input size, as DDRNet's training code does. The
    weights are the same in both forms; only the strides differ.

    Args:
        input_channels: int, channels of the preprocessed image (1 for grayscale). Default 1.
        num_classes: int, output channels (1 vessel; 3 artery/vein/vessel). Default 1.
        planes: int, stem width; the high branch has ``2 * planes`` channels. Default 32.
        spp_planes: int, channels of each DAPPM scale. Default 128.
        head_planes: int, channels of the 3x3 conv of the segmentation head(s). Default 64.
        layers: four ints, BasicBlocks of layers 1-4; layers 3 and 4 use the same count on
            both branches (DDRNet-23's code fixes 2 on the high branch). Default (2, 2, 2, 2).
        aux_head: bool, add DDRNet's auxiliary head on the high branch after layer 3 (its loss
            weighs 0.4; see ``compute_loss``). Default False.
        bn_momentum: float, BatchNormalization moving-average momentum. Default 0.9 (the
            code's PyTorch 0.1); 0.99 averages the eval-mode statistics over more of the small
            CPU batches (see ``set_bn_momentum``).
        output_stride: 1 or 8, the high branch's resolution against the input: 1 (this
            variant) or 8 (the paper's DDRNet-23-slim). Default 1.

    Input (B, H, W, input_channels) float32, H and W multiples of ``size_multiple`` (8, or 64
    with ``output_stride=8``). Output
    (B, H, W, num_classes) logits, or with ``aux_head`` a dict ``{"logits", "aux"}`` of two such
    tensors ("logits" is the prediction).

    Example:
        >>> import numpy as np
        >>> model = DDRNet(planes=8, spp_planes=16, head_planes=16)
        >>> model(np.zeros((1, 64, 64, 1), "float32")).shape
        TensorShape([1, 64, 64, 1])
    """

    def __init__(self, input_channels: int = 1, num_classes: int = 1, planes: int = 32,
                 spp_planes: int = 128, head_planes: int = 64,
                 layers: Sequence[int] = (2, 2, 2, 2), aux_head: bool = False,
                 bn_momentum: float = 0.9, output_stride: int = 1, **kwargs):
        # `layers` (DDRNet's name) shadows the keras.layers module here: use keras.layers.X.
        if isinstance(layers, str) or len(layers) != 4 or any(
                not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in layers):
            raise ValueError(f"layers must be four ints >= 1, got {layers!r}")
        for arg, value in (("input_channels", input_channels), ("num_classes", num_classes),
                           ("planes", planes), ("spp_planes", spp_planes),
                           ("head_planes", head_planes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
        if output_stride not in OUTPUT_STRIDES or isinstance(output_stride, bool):
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got "
                             f"{output_stride!r}")
        if not isinstance(aux_head, bool):
            raise ValueError(f"aux_head must be a bool, got {aux_head!r}")
        blocks = [int(n) for n in layers]
        high = planes * 2
        stride = 2 if output_stride == 8 else 1  # of each stem and of layer2

        # === Functional Model ===
        inputs = keras.Input((None, None, input_channels), name="image")
        x = _relu(resnet_conv_bn(inputs, planes, 3, stride, name="stem1"), "stem1_relu")
        x = _relu(resnet_conv_bn(x, planes, 3, stride, name="stem2"), "stem2_relu")
        x = residual_stage(x, "basic", planes, blocks[0], name="layer1")
        x = residual_stage(_relu(x, "layer1_relu"), "basic", high, blocks[1], stride,
                           name="layer2")
        x = _relu(x, "layer2_relu")  # 1/output_stride: the start of both branches

        # Layer 3: low branch to 1/2, then the bilateral fusion.
        low = residual_stage(x, "basic", planes * 4, blocks[2], 2, name="layer3_low")
        hi = residual_stage(x, "basic", high, blocks[2], name="layer3_high")
        down = resnet_conv_bn(_relu(hi, "down3_relu"), planes * 4, 3, 2, name="down3")
        up = resnet_conv_bn(_relu(low, "compression3_relu"), high, 1, name="compression3")
        low = keras.layers.Add(name="fuse3_low")([low, down])
        hi = keras.layers.Add(name="fuse3_high")(
            [hi, ResizeToMatch(name="compression3_up")([up, hi])])
        aux_features = hi

        # Layer 4: low branch to 1/4, then the bilateral fusion (two strided convs down).
        low = residual_stage(_relu(low, "layer4_low_relu"), "basic", planes * 8, blocks[3], 2,
                             name="layer4_low")
        hi = residual_stage(_relu(hi, "layer4_high_relu"), "basic", high, blocks[3],
                            name="layer4_high")
        down = resnet_conv_bn(_relu(hi, "down4_relu"), planes * 4, 3, 2, name="down4_1")
        down = resnet_conv_bn(_relu(down, "down4_1_relu"), planes * 8, 3, 2, name="down4_2")
        up = resnet_conv_bn(_relu(low, "compression4_relu"), high, 1, name="compression4")
        low = keras.layers.Add(name="fuse4_low")([low, down])
        hi = keras.layers.Add(name="fuse4_high")(
            [hi, ResizeToMatch(name="compression4_up")([up, hi])])

        # Layer 5: one Bottleneck per branch (low to 1/8), DAPPM, upsample, add, head.
        hi = residual_stage(_relu(hi, "layer5_high_relu"), "bottleneck", high, 1,
                            name="layer5_high")
        low = residual_stage(_relu(low, "layer5_low_relu"), "bottleneck", planes * 8, 1, 2,
                             name="layer5_low")
        low = dappm(low, spp_planes, planes * 4, name="dappm")
        x = keras.layers.Add(name="fuse5")([hi, ResizeToMatch(name="dappm_up")([low, hi])])
        def to_input_size(y, name):
            return y if output_stride == 1 else ResizeToMatch(name=f"{name}_up")([y, inputs])

        logits = keras.layers.Identity(name="logits")(
            to_input_size(segmentation_head(x, head_planes, num_classes, name="head"), "head"))
        if aux_head:
            aux = keras.layers.Identity(name="aux")(to_input_size(
                segmentation_head(aux_features, head_planes, num_classes, name="aux_head"),
                "aux_head"))
            outputs = {"logits": logits, "aux": aux}
        else:
            outputs = logits
        kwargs.setdefault("name", "ddrnet")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        set_bn_momentum(self, bn_momentum)

        # === Config ===
        self.bn_momentum = float(bn_momentum)
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.planes = planes
        self.spp_planes = spp_planes
        self.head_planes = head_planes
        self.stage_blocks = blocks  # not `self.layers`: keras.Model.layers lists the layers
        self.aux_head = aux_head
        self.output_stride = output_stride

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (the low branch reaches 1/8 of the high
        branch)."""
        return 8 * self.output_stride

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """``loss(logits) + 0.4 * loss(aux)`` with the compiled loss, as DDRNet trains.

        Without ``aux_head`` this is Keras's default loss.
        """
        if not self.aux_head:
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        return weighted_output_loss(self, y, y_pred, {"logits": 1.0, "aux": _AUX_WEIGHT},
                                    sample_weight)

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable,
                "input_channels": self.input_channels, "num_classes": self.num_classes,
                "planes": self.planes, "spp_planes": self.spp_planes,
                "head_planes": self.head_planes, "layers": list(self.stage_blocks),
                "aux_head": self.aux_head, "bn_momentum": self.bn_momentum,
                "output_stride": self.output_stride}

