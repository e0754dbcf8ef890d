"""Building blocks shared by the architectures."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops


@keras.saving.register_keras_serializable(package="retina_tf")
class BatchNormalization(layers.BatchNormalization):
    """Keras's BatchNormalization (Ioffe & Szegedy 2015, "Batch Normalization"), a training
    batch normalized by TensorFlow's fused kernel (FusedBatchNormV3) forward and backward.

    Keras 3 normalizes a training batch in separate operations (the moments, then the affine
    map), in float32 even under ``mixed_bfloat16``, casting each activation there and back; the
    fused kernel makes one pass over float32 or bfloat16 input: U-Net training 1.2x faster in
    float32 and 1.7-1.8x in bfloat16 on 2 cores (docs/results/speed.md). Inference, the weights and
    the moving-average update (of the biased batch variance) are Keras's; the cases the fused
    kernel does not cover (masks, renorm, synchronized, not 4-D channels-last, float64 or
    pure-bfloat16 policies) are Keras's too.
    Keras's class name, since model files key the weights by it: the run folders saved with
    Keras's layer load into this one.
    """

    def call(self, inputs, training=None, mask=None):
        if (not (training and self.trainable) or mask is not None or self.renorm
                or self.synchronized or len(inputs.shape) != 4 or self.axis % 4 != 3
                # the kernel takes 16-bit or float32 input and float32 statistics
                or self.variable_dtype != "float32"
                or inputs.dtype not in (tf.float16, tf.bfloat16, tf.float32)):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        gamma = self.gamma if self.scale else tf.ones((channels,), "float32")
        beta = self.beta if self.center else tf.zeros((channels,), "float32")
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
        # the kernel's variance is the unbiased one; Keras averages the biased one
        count = ops.cast(ops.size(inputs) // channels, "float32")
        variance = variance * (count - 1.0) / ops.maximum(count, 1.0)
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + variance * (1.0 - m))
        return ops.cast(outputs, self.compute_dtype)


def conv_bn_relu(x, filters: int, kernel_size: int = 3, batch_norm: bool = True, name: str = ""):
    """3x3 conv (padded), optional batch norm, ReLU."""
    x = layers.Conv2D(filters, kernel_size, padding="same", use_bias=not batch_norm,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    if batch_norm:
        x = BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def double_conv(x, filters: int, batch_norm: bool = True, dropout: float = 0.0, name: str = ""):
    """[conv, BN, ReLU] x 2 with optional dropout between, the U-Net level (Ronneberger 2015)."""
    x = conv_bn_relu(x, filters, batch_norm=batch_norm, name=f"{name}_1")
    if dropout > 0:
        x = layers.SpatialDropout2D(dropout, name=f"{name}_dropout")(x)
    return conv_bn_relu(x, filters, batch_norm=batch_norm, name=f"{name}_2")


def upsample(x, filters: int, transpose_conv: bool, name: str = ""):
    """x2 upsampling: transposed conv, or nearest neighbour followed by a 1x1 conv."""
    if transpose_conv:
        return layers.Conv2DTranspose(filters, 2, strides=2, padding="same",
                                      name=f"{name}_tconv")(x)
    x = layers.UpSampling2D(2, interpolation="nearest", name=f"{name}_nearest")(x)
    return layers.Conv2D(filters, 1, padding="same", name=f"{name}_1x1")(x)


# --- ResNet residual blocks (He et al., https://arxiv.org/abs/1512.03385) -----------------------
# PyTorch-style: BN momentum 0.1 (Keras 0.9) and epsilon 1e-5; a strided 3x3 conv pads one pixel on
# every side, like PyTorch's padding=1, so it samples the same pixels as the strided 1x1 shortcut.

def resnet_conv_bn(x, filters: int, kernel_size: int = 3, strides: int = 1, name: str = ""):
    """Conv (no bias) + batch norm, no activation; a strided conv pads kernel_size // 2 per side.

    A strided 1x1 conv is every ``strides``-th pixel, then the conv: the same numbers, and
    oneDNN's strided 1x1 backward pass (TensorFlow 2.21, AVX-512) corrupts memory and aborts
    the process for inputs of under 16 channels at 48 px and more (a DDRNet of planes 4).
    """
    if strides > 1 and kernel_size > 1:
        x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    if strides > 1 and kernel_size == 1:
        x = layers.MaxPooling2D(1, strides, padding="same", name=f"{name}_every")(x)
        strides = 1
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=False,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    return BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)


def _residual_shortcut(x, filters: int, strides: int, name: str):
    """Identity, or a strided 1x1 conv + BN when the resolution or the channel count changes."""
    if strides == 1 and x.shape[-1] == filters:
        return x
    return resnet_conv_bn(x, filters, 1, strides, name=f"{name}_down")


def basic_block(x, filters: int, strides: int = 1, final_relu: bool = True, name: str = ""):
    """ResNet BasicBlock: [3x3 conv, BN, ReLU, 3x3 conv, BN] + shortcut, then ReLU.

    Output ``filters`` channels at ``1 / strides`` of the input size. ``final_relu=False`` returns
    the sum before the ReLU (DDRNet's ``no_relu``: the last block of a stage feeds a fusion).
    """
    shortcut = _residual_shortcut(x, filters, strides, name)
    y = resnet_conv_bn(x, filters, 3, strides, name=f"{name}_1")
    y = layers.ReLU(name=f"{name}_1_relu")(y)
    y = resnet_conv_bn(y, filters, 3, 1, name=f"{name}_2")
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_relu")(y) if final_relu else y


def bottleneck_block(x, filters: int, strides: int = 1, expansion: int = 4,
                     final_relu: bool = True, name: str = ""):
    """ResNet Bottleneck: [1x1, BN, ReLU, 3x3 (strided), BN, ReLU, 1x1 to filters * expansion, BN]
    + shortcut, then ReLU (skipped when ``final_relu=False``).

    Output ``filters * expansion`` channels (ResNet 4; DDRNet 2) at ``1 / strides`` of the input.
    """
    out = filters * expansion
    shortcut = _residual_shortcut(x, out, strides, name)
    y = layers.ReLU(name=f"{name}_1_relu")(resnet_conv_bn(x, filters, 1, 1, name=f"{name}_1"))
    y = layers.ReLU(name=f"{name}_2_relu")(resnet_conv_bn(y, filters, 3, strides, name=f"{name}_2"))
    y = resnet_conv_bn(y, out, 1, 1, name=f"{name}_3")
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_relu")(y) if final_relu else y


@keras.saving.register_keras_serializable(package="retina_tf")
class ResizeToMatch(layers.Layer):
    """Bilinear resize of ``inputs[0]`` to the height and width of ``inputs[1]``.

    Half-pixel centres (PyTorch's ``align_corners=False``); the size is read at run time.
    Resizing to the same size is the identity.
    """

    def call(self, inputs):
        x, reference = inputs
        resized = tf.image.resize(x, tf.shape(reference)[1:3], method="bilinear")
        return ops.cast(resized, x.dtype)

    def compute_output_shape(self, input_shapes):
        x_shape, ref_shape = input_shapes
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[3])


def weighted_output_loss(model: keras.Model, y, y_pred: dict, weights: dict, sample_weight=None):
    """``sum_k weights[k] * model.loss(y, y_pred[k], sample_weight)`` plus the model's own
    losses (regularizers, ``add_loss``); ``model.loss`` is the loss given to ``compile``."""
    if model.loss is None:
        raise ValueError(f"{model.name}: compile the model with a loss first")
    total = None
    for key, weight in weights.items():
        if weight:
            term = weight * model.loss(y, y_pred[key], sample_weight)
            total = term if total is None else total + term
    for extra in model.losses:
        total = total + ops.sum(ops.cast(extra, total.dtype))
    return total


class LogitsMetricsMixin:
    """For models returning a dict: compiled metrics see only the final ``"logits"``."""

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, dict):
            y_pred = y_pred["logits"]
        return super().compute_metrics(x, y, y_pred, sample_weight)


def set_bn_momentum(model: keras.Model, momentum: float) -> None:
    """Sets the moving-average momentum of every BatchNormalization layer inside ``model``.

    The PyTorch-parity 0.9 (PyTorch's 0.1) averages the statistics of the last ~10 batches,
    noisy with CPU-sized batches of 8 patches; 0.99 averages ~100. DDRNet trained with 0.99 gave
    a steady validation F1; HMSA's validation F1 swung between epochs with either value, so
    there the cause is not only the BN statistics.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1), got {momentum!r}")
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = float(momentum)
