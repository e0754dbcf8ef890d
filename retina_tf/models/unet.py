"""U-Net as in the retina U-Net lineage (orobix/retina-unet, WILeroy/retina_unet)."""

from __future__ import annotations

import keras
from keras import layers

from retina_tf.models.base import SegmentationModel
from retina_tf.models.blocks import double_conv, upsample


@keras.saving.register_keras_serializable(package="retina_tf")
class UNet(SegmentationModel, keras.Model):
    """U-Net for fundus vessel segmentation.

    Paper: Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
    Segmentation", MICCAI 2015, https://arxiv.org/abs/1505.04597 .

    ``depth`` levels with ``base_filters * 2**i`` filters, each [3x3 conv, BN, ReLU] x 2; max-pool
    between levels; a symmetric decoder with skip connections; padded convolutions, so the output
    has the input's size when height and width are multiples of ``2**(depth - 1)``
    (``size_multiple``). Fully convolutional: any such size works, so whole images are segmented
    in one pass.

    Args:
        input_channels: int, channels of the preprocessed image (1 for grayscale). Default 1.
        num_classes: int, output channels (1 vessel; 3 artery/vein/vessel). Default 1.
        depth: int >= 2, number of resolution levels. Default 4 (filters 32/64/128/256).
        base_filters: int, filters of the first level. Default 32.
        transpose_conv: bool, transposed-conv upsampling; else nearest + 1x1 conv. Default False.
        batch_norm: bool. Default True.
        dropout: float in [0, 1), spatial dropout inside each level. Default 0.

    Input (B, H, W, input_channels) float32 in [0, 1]; output (B, H, W, num_classes) logits.

    Example:
        >>> import numpy as np
        >>> model = UNet(depth=3, base_filters=8)
        >>> model(np.zeros((1, 48, 48, 1), "float32")).shape
        TensorShape([1, 48, 48, 1])
    """

    # Constructor arguments bin/train.py takes from flags of the same name.
    flag_arguments = ("depth", "base_filters", "transpose_conv", "batch_norm", "dropout")
    bfloat16_pays = True  # 1.9x faster on DRIVE with AMX, F1 unchanged

    def __init__(self, input_channels: int = 1, num_classes: int = 1, depth: int = 4,
                 base_filters: int = 32, transpose_conv: bool = False, batch_norm: bool = True,
                 dropout: float = 0.0, **kwargs):
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth!r}")
        if base_filters < 1 or num_classes < 1 or input_channels < 1:
            raise ValueError(f"base_filters, num_classes and input_channels must be >= 1, got "
                             f"{base_filters!r}, {num_classes!r}, {input_channels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

        # === Functional Model ===
        inputs = keras.Input((None, None, input_channels), name="image")
        x, skips = inputs, []
        for level in range(depth - 1):
            x = double_conv(x, base_filters * 2**level, batch_norm, dropout, name=f"enc{level}")
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
        x = double_conv(x, base_filters * 2**(depth - 1), batch_norm, dropout, name="bottom")
        for level in reversed(range(depth - 1)):
            filters = base_filters * 2**level
            x = upsample(x, filters, transpose_conv, name=f"up{level}")
            x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
            x = double_conv(x, filters, batch_norm, dropout, name=f"dec{level}")
        outputs = layers.Conv2D(num_classes, 1, name="logits")(x)
        kwargs.setdefault("name", "unet")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.depth = depth
        self.base_filters = base_filters
        self.transpose_conv = transpose_conv
        self.batch_norm = batch_norm
        self.dropout = dropout

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this for whole-image inference."""
        return 2 ** (self.depth - 1)

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable,
                "input_channels": self.input_channels, "num_classes": self.num_classes,
                "depth": self.depth, "base_filters": self.base_filters,
                "transpose_conv": self.transpose_conv, "batch_norm": self.batch_norm,
                "dropout": self.dropout}

