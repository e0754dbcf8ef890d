"""Building blocks shared by the architectures."""

from __future__ import annotations

import keras
from keras import layers


def conv_bn_relu(x, filters: int, kernel_size: int = 3, batch_norm: bool = True, name: str = ""):
    """3x3 conv (padded), optional batch norm, ReLU."""
    x = layers.Conv2D(filters, kernel_size, padding="same", use_bias=not batch_norm,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    if batch_norm:
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
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
        return layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_tconv")(x)
    x = layers.UpSampling2D(2, interpolation="nearest", name=f"{name}_nearest")(x)
    return layers.Conv2D(filters, 1, padding="same", name=f"{name}_1x1")(x)
