"""ViT encoder, masked-autoencoder (MAE) pre-training and ViT segmentation for fundus images.

Papers: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021,
https://arxiv.org/abs/2010.11929 (ViT); He et al., "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022, https://arxiv.org/abs/2111.06377 (MAE); the segmentation decoder takes
features from several encoder depths as in Hatamizadeh et al., "UNETR", WACV 2022,
https://arxiv.org/abs/2103.10504, plus a full-resolution conv stem, because a decoder fed only
the last 1/patch-resolution tokens loses thin vessels.
"""

from __future__ import annotations

import logging
import math

import keras
import numpy as np
from keras import layers, ops

from retina_tf.errors import ConfigError
from retina_tf.losses import per_replica
from retina_tf.models.base import SegmentationModel, channels_hint
from retina_tf.models.blocks import conv_bn_relu

# The seed's configuration (512 px, patch 16, dim 768, depth 8, 8 heads, decoder 512 x 4).
PRESETS: dict[str, dict] = {
    "seed": dict(image_size=512, patch_size=16, dim=768, depth=8, num_heads=8,
                 decoder_dim=512, decoder_depth=4, decoder_heads=8),
    # Trains on a 2-core CPU: 96 px crops, 8 px patches (144 tokens), 2.7 M encoder parameters.
    "cpu_small": dict(image_size=96, patch_size=8, dim=192, depth=6, num_heads=6,
                      decoder_dim=128, decoder_depth=2, decoder_heads=4),
}
ENCODER_KEYS = ("input_channels", "image_size", "patch_size", "dim", "depth", "num_heads",
                "mlp_ratio")


def apply_preset(config: dict, keys: tuple[str, ...] | None = None) -> dict:
    """``config`` with the values of ``config["preset"]`` filled in (explicit keys win); with
    ``keys``, only the preset values of those keys (ViTSeg takes no MAE decoder sizes)."""
    config = dict(config)
    name = config.pop("preset", None)
    if name is None:
        return config
    if name not in PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; choose from {sorted(PRESETS)}")
    preset = {k: v for k, v in PRESETS[name].items() if keys is None or k in keys}
    return {**preset, **config}


def sincos_position_embedding(grid_h: int, grid_w: int, dim: int):
    """Fixed 2-D sin-cos position embeddings, ``(grid_h * grid_w, dim)`` float32, row-major.

    As MAE's ``get_2d_sincos_pos_embed``: half the channels encode the row, half the column, each
    as ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 1 / 10000**(k / (dim / 4))``.
    Deterministic: no parameters, the same for every model of this size.
    """
    if dim % 4:
        raise ValueError(f"ViT dim must be a multiple of 4 for 2-D sin-cos embeddings, got {dim}")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                             np.arange(grid_w, dtype=np.float64), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(rows), encode(cols)], axis=1).astype(np.float32)


def patchify(images, patch_size: int):
    """``(B, H, W, C)`` -> ``(B, N, patch_size**2 * C)``, patches in row-major order."""
    b, h, w, c = ops.shape(images)
    gh, gw = h // patch_size, w // patch_size
    x = ops.reshape(images, (b, gh, patch_size, gw, patch_size, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (b, gh * gw, patch_size * patch_size * c))


def unpatchify(patches, patch_size: int, grid_h: int, grid_w: int, channels: int):
    """Inverse of :func:`patchify`."""
    b = ops.shape(patches)[0]
    x = ops.reshape(patches, (b, grid_h, grid_w, patch_size, patch_size, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (b, grid_h * patch_size, grid_w * patch_size, channels))


def _check(**values):
    for key, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


@keras.saving.register_keras_serializable(package="retina_tf")
class TransformerBlock(layers.Layer):
    """Pre-norm transformer block: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))`` (GELU MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, **kwargs):
        super().__init__(**kwargs)
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.mlp_ratio = dim, num_heads, float(mlp_ratio)
        self.norm1 = layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.attention = layers.MultiHeadAttention(num_heads, dim // num_heads, name="attention")
        self.norm2 = layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.fc1 = layers.Dense(int(dim * mlp_ratio), activation="gelu", name="fc1")
        self.fc2 = layers.Dense(dim, name="fc2")

    def build(self, input_shape):
        shape = tuple(input_shape)
        self.norm1.build(shape)
        self.attention.build(shape, shape)
        self.norm2.build(shape)
        self.fc1.build(shape)
        self.fc2.build(shape[:-1] + (int(self.dim * self.mlp_ratio),))

    def call(self, x, training=None):
        y = self.norm1(x)
        x = x + self.attention(y, y, training=training)
        return x + self.fc2(self.fc1(self.norm2(x)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio}


@keras.saving.register_keras_serializable(package="retina_tf")
class ViTEncoder(layers.Layer):
    """ViT encoder: ``patch_size`` x ``patch_size`` patch embedding (a strided conv), fixed 2-D
    sin-cos position embeddings, ``depth`` pre-norm transformer blocks, final LayerNorm.

    Shared by :class:`MAE` (pre-training) and :class:`ViTSeg` (fine-tuning): its weights do not
    depend on the image size, so they transfer between the two.
    """

    def __init__(self, input_channels: int = 1, image_size: int = 96, patch_size: int = 8,
                 dim: int = 192, depth: int = 6, num_heads: int = 6, mlp_ratio: float = 4.0,
                 **kwargs):
        super().__init__(**kwargs)
        _check(input_channels=input_channels, image_size=image_size, patch_size=patch_size,
               dim=dim, depth=depth, num_heads=num_heads)
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size "
                             f"{patch_size}")
        self.input_channels, self.image_size, self.patch_size = (input_channels, image_size,
                                                                 patch_size)
        self.dim, self.depth, self.num_heads, self.mlp_ratio = dim, depth, num_heads, mlp_ratio
        self.grid = image_size // patch_size
        self.patch_embed = layers.Conv2D(dim, patch_size, strides=patch_size, name="patch_embed")
        self.blocks = [TransformerBlock(dim, num_heads, mlp_ratio, name=f"block{i}")
                       for i in range(depth)]
        self.norm = layers.LayerNormalization(epsilon=1e-6, name="norm")
        self.position = sincos_position_embedding(self.grid, self.grid, dim)[None]

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def build(self, input_shape=None):
        self.patch_embed.build((None, self.image_size, self.image_size, self.input_channels))
        for block in self.blocks:
            block.build((None, self.num_patches, self.dim))
        self.norm.build((None, self.num_patches, self.dim))

    def embed(self, images):
        """``(B, H, W, C)`` -> patch tokens with position embeddings ``(B, N, dim)``."""
        x = self.patch_embed(images)
        x = ops.reshape(x, (ops.shape(x)[0], self.num_patches, self.dim))
        return x + ops.cast(self.position, x.dtype)

    def encode(self, tokens, taps=(), training=None):
        """Runs the blocks; returns the normalized output and the tokens after each block in
        ``taps`` (1-based block indices)."""
        taken = []
        for i, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, training=training)
            if i in taps:
                taken.append(tokens)
        return self.norm(tokens), taken

    def call(self, images, training=None, taps=None):
        """Normalized output tokens ``(B, N, dim)``; with ``taps`` a list: the output, then the
        tokens after each distinct tapped block in block order."""
        out, taken = self.encode(self.embed(images), taps or (), training=training)
        return [out, *taken] if taps else out

    def get_config(self) -> dict:
        return {**super().get_config(), "input_channels": self.input_channels,
                "image_size": self.image_size, "patch_size": self.patch_size, "dim": self.dim,
                "depth": self.depth, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio}


@keras.saving.register_keras_serializable(package="retina_tf")
class MAE(SegmentationModel, keras.Model):
    """Masked autoencoder for self-supervised pre-training of a :class:`ViTEncoder`.

    Paper: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
    https://arxiv.org/abs/2111.06377 .

    Each image's patches are shuffled by random noise; the encoder sees only the first
    ``N - round(N * mask_ratio)`` (exactly that many, every image); a light transformer decoder
    gets the encoded visible tokens plus a shared learned mask token at every masked position
    (with its own sin-cos position embeddings) and predicts every patch's pixels. The loss is the
    mean squared error over **masked patches only**, against per-patch normalized pixels when
    ``norm_pix_loss`` (the paper's better variant).

    Args:
        input_channels, image_size, patch_size, dim, depth, num_heads, mlp_ratio: the encoder.
        decoder_dim, decoder_depth, decoder_heads: the decoder (the paper: 512, 8, 16).
        mask_ratio: float in (0, 1), share of masked patches. Default 0.75.
        norm_pix_loss: bool, normalize each target patch by its mean and std. Default True.
        seed: int, seed of the masking noise.

    Input ``(B, image_size, image_size, input_channels)``. Output dict: ``"pred"`` ``(B, N,
    patch_size**2 * C)`` predicted patches (normalized when ``norm_pix_loss``), ``"mask"``
    ``(B, N)`` 1 for masked patches. ``call(images, noise=...)`` takes fixed ``(B, N)`` noise.
    """

    pretraining_script = "bin/pretrain_mae.py"

    def __init__(self, input_channels: int = 1, image_size: int = 96, patch_size: int = 8,
                 dim: int = 192, depth: int = 6, num_heads: int = 6, mlp_ratio: float = 4.0,
                 decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio!r}")
        _check(decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads)
        self.encoder = ViTEncoder(input_channels, image_size, patch_size, dim, depth, num_heads,
                                  mlp_ratio, name="encoder")
        n = self.encoder.num_patches
        self.num_masked = int(round(n * mask_ratio))
        if not 0 < self.num_masked < n:
            raise ValueError(f"mask_ratio {mask_ratio} masks {self.num_masked} of {n} patches; "
                             "at least one must be masked and one visible")
        self.decoder_embed = layers.Dense(decoder_dim, name="decoder_embed")
        self.decoder_blocks = [TransformerBlock(decoder_dim, decoder_heads, mlp_ratio,
                                                name=f"decoder_block{i}")
                               for i in range(decoder_depth)]
        self.decoder_norm = layers.LayerNormalization(epsilon=1e-6, name="decoder_norm")
        self.decoder_pred = layers.Dense(patch_size * patch_size * input_channels,
                                         name="decoder_pred")
        self.decoder_position = sincos_position_embedding(self.encoder.grid, self.encoder.grid,
                                                          decoder_dim)[None]
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.decoder_dim, self.decoder_depth, self.decoder_heads = (decoder_dim, decoder_depth,
                                                                     decoder_heads)
        self.mask_ratio, self.norm_pix_loss, self.seed = (float(mask_ratio), bool(norm_pix_loss),
                                                          seed)
        self.build()  # the input size is fixed: weights exist (count_params, load) right away

    def build(self, input_shape=None):
        self.encoder.build()
        self.mask_token = self.add_weight(shape=(1, 1, self.decoder_dim), name="mask_token",
                                          initializer=keras.initializers.RandomNormal(stddev=0.02))
        self.decoder_embed.build((None, None, self.encoder.dim))
        for block in self.decoder_blocks:
            block.build((None, self.encoder.num_patches, self.decoder_dim))
        self.decoder_norm.build((None, None, self.decoder_dim))
        self.decoder_pred.build((None, None, self.decoder_dim))
        self.built = True

    def call(self, images, training=None, noise=None):
        tokens = self.encoder.embed(images)
        batch, n = ops.shape(tokens)[0], self.encoder.num_patches
        keep = n - self.num_masked
        if noise is None:
            noise = keras.random.uniform((batch, n), seed=self.seed_generator)
        shuffle = ops.argsort(noise, axis=1)       # ascending: the first `keep` stay visible
        restore = ops.argsort(shuffle, axis=1)
        visible = ops.take_along_axis(tokens, shuffle[:, :keep, None], axis=1)
        latent, _ = self.encoder.encode(visible, training=training)

        x = self.decoder_embed(latent)
        masks = ops.broadcast_to(ops.cast(self.mask_token, x.dtype),
                                 (batch, self.num_masked, self.decoder_dim))
        x = ops.take_along_axis(ops.concatenate([x, masks], axis=1), restore[..., None], axis=1)
        x = x + ops.cast(self.decoder_position, x.dtype)
        for block in self.decoder_blocks:
            x = block(x, training=training)
        pred = self.decoder_pred(self.decoder_norm(x))
        mask = ops.concatenate([ops.zeros((batch, keep)), ops.ones((batch, self.num_masked))], 1)
        return {"pred": pred, "mask": ops.take_along_axis(mask, restore, axis=1)}

    def target(self, images):
        """The regression target: patchified pixels, per-patch normalized if ``norm_pix_loss``."""
        target = patchify(ops.cast(images, "float32"), self.encoder.patch_size)
        if self.norm_pix_loss:
            mean = ops.mean(target, axis=-1, keepdims=True)
            var = ops.var(target, axis=-1, keepdims=True)
            target = (target - mean) / ops.sqrt(var + 1e-6)
        return target

    def reconstruction_loss(self, images, outputs):
        """Mean squared error per patch, averaged over masked patches only."""
        per_patch = ops.mean(ops.square(ops.cast(outputs["pred"], "float32")
                                        - self.target(images)), axis=-1)
        mask = ops.cast(outputs["mask"], "float32")
        return ops.sum(per_patch * mask) / ops.maximum(ops.sum(mask), 1.0)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if isinstance(x, (tuple, list)):
            x = x[0]
        total = per_replica(self.reconstruction_loss(x, y_pred))  # as a Keras loss is
        for extra in self.losses:
            total = total + ops.sum(extra)
        return total

    def reconstruct(self, images, noise=None):
        """Masked input (masked patches zero), reconstruction (visible patches pasted back,
        predictions de-normalized with each patch's own statistics) and the mask as images."""
        out = self(images, training=False, noise=noise)
        p, g, c = self.encoder.patch_size, self.encoder.grid, self.encoder.input_channels
        pixels = patchify(ops.cast(images, "float32"), p)
        pred = ops.cast(out["pred"], "float32")
        if self.norm_pix_loss:
            mean = ops.mean(pixels, axis=-1, keepdims=True)
            std = ops.sqrt(ops.var(pixels, axis=-1, keepdims=True) + 1e-6)
            pred = pred * std + mean
        mask = ops.cast(out["mask"], "float32")[..., None]
        masked = unpatchify(pixels * (1.0 - mask), p, g, g, c)
        pasted = unpatchify(pixels * (1.0 - mask) + pred * mask, p, g, g, c)
        return masked, ops.clip(pasted, 0.0, 1.0), unpatchify(ops.broadcast_to(
            mask, ops.shape(pixels)), p, g, g, c)

    def get_config(self) -> dict:
        enc = self.encoder.get_config()
        return {"name": self.name, "trainable": self.trainable,
                **{k: enc[k] for k in ENCODER_KEYS},
                "decoder_dim": self.decoder_dim, "decoder_depth": self.decoder_depth,
                "decoder_heads": self.decoder_heads, "mask_ratio": self.mask_ratio,
                "norm_pix_loss": self.norm_pix_loss, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict) -> MAE:
        return cls(**apply_preset(config))

    @classmethod
    def from_preset_config(cls, config: dict) -> dict:
        """Constructor arguments from a config that may name a ``"preset"``."""
        return apply_preset(config)


def _up2(x, filters: int, name: str):
    """x2 transposed conv then [3x3 conv, BN, ReLU]."""
    x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"{name}_tconv")(x)
    return conv_bn_relu(x, filters, name=name)


@keras.saving.register_keras_serializable(package="retina_tf")
class ViTSeg(SegmentationModel, keras.Model):
    """ViT segmentation: a :class:`ViTEncoder` (MAE-pre-trainable) and a UNETR-style decoder.

    Papers: the ViT encoder of :class:`MAE`; decoder after Hatamizadeh et al., "UNETR",
    https://arxiv.org/abs/2103.10504 .

    With ``L = log2(patch_size)`` upsampling levels, the last block's tokens (1/patch_size
    resolution) are upsampled x2 per level; at level ``k`` (1/2**k) they are joined with the
    tokens after block ``round(depth * k / L)`` brought up to that resolution by ``L - k``
    transposed convs (shallower blocks feed finer levels), and at full resolution with a
    two-conv stem on the image itself, so vessels 1-2 px wide keep a path that never went
    through 1/patch_size tokens.

    Args:
        input_channels, image_size, patch_size, dim, depth, num_heads, mlp_ratio: the encoder
            (must match the MAE run it starts from, except ``image_size``).
        num_classes: output channels. Default 1.
        decoder_channels: channels at full resolution; level ``k`` has ``decoder_channels *
            2**k`` (at most 256). Default 16.
        preset: optional name in :data:`PRESETS` ("seed", "cpu_small") for the encoder sizes.

    Input ``(B, image_size, image_size, input_channels)``; output ``(B, image_size, image_size,
    num_classes)`` logits. Not fully convolutional (fixed token grid): whole photographs are
    segmented by sliding windows of ``image_size``.
    """

    fully_convolutional = False

    def __init__(self, input_channels: int = 1, num_classes: int = 1, image_size: int = 96,
                 patch_size: int = 8, dim: int = 192, depth: int = 6, num_heads: int = 6,
                 mlp_ratio: float = 4.0, decoder_channels: int = 16, **kwargs):
        levels = int(round(math.log2(patch_size)))
        if 2**levels != patch_size:
            raise ValueError(f"ViTSeg needs a power-of-two patch_size, got {patch_size}")
        _check(num_classes=num_classes, decoder_channels=decoder_channels)
        encoder = ViTEncoder(input_channels, image_size, patch_size, dim, depth, num_heads,
                             mlp_ratio, name="encoder")
        taps = [max(1, min(depth, round(depth * k / levels))) for k in range(1, levels)]
        g = encoder.grid

        # === Functional Model ===
        inputs = keras.Input((image_size, image_size, input_channels), name="image")
        final, *taken = encoder(inputs, taps=tuple(taps))
        # taps come back in block order; a block may serve two levels when depth is small
        by_block = dict(zip(sorted(set(taps)), taken))
        grid = layers.Reshape((g, g, dim), name="tokens_to_grid")

        def channels(k):
            return min(decoder_channels * 2**k, 256)

        x = conv_bn_relu(grid(final), channels(levels), name=f"level{levels}")
        for k in range(levels - 1, -1, -1):
            x = layers.Conv2DTranspose(channels(k), 2, strides=2, name=f"up{k}")(x)
            if k > 0:
                skip = layers.Reshape((g, g, dim), name=f"tap{k}_grid")(by_block[taps[k - 1]])
                for j in range(levels - k):
                    skip = _up2(skip, channels(k), name=f"tap{k}_up{j}")
            else:
                skip = conv_bn_relu(inputs, channels(0), name="stem1")
                skip = conv_bn_relu(skip, channels(0), name="stem2")
            x = layers.Concatenate(name=f"join{k}")([x, skip])
            x = conv_bn_relu(x, channels(k), name=f"dec{k}_1")
            x = conv_bn_relu(x, channels(k), name=f"dec{k}_2")
        outputs = layers.Conv2D(num_classes, 1, name="logits")(x)
        kwargs.setdefault("name", "vit_seg")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.encoder = encoder
        self.taps = taps
        self.num_classes = num_classes
        self.decoder_channels = decoder_channels

    @property
    def size_multiple(self) -> int:
        """Training patches and sliding windows must be exactly ``image_size``."""
        return self.encoder.image_size

    def load_pretrained(self, source: keras.Model) -> None:
        """Copies the encoder of an :class:`MAE` (or ViTSeg) run; its sizes must match."""
        other = getattr(source, "encoder", None)
        if not isinstance(other, ViTEncoder):
            raise ConfigError(f"--pretrained: cannot start {self.name} from {source.name}: "
                              "it has no ViT encoder (give an MAE pre-training run folder)")
        mine, theirs = self.encoder.get_weights(), other.get_weights()
        if [w.shape for w in mine] != [w.shape for w in theirs]:
            sizes = {k: other.get_config()[k] for k in ENCODER_KEYS
                     if k not in ("image_size", "input_channels")}
            hint = channels_hint(other.get_config()["input_channels"],
                                 self.encoder.get_config()["input_channels"])
            raise ConfigError(f"--pretrained: cannot start {self.name} from {source.name}: "
                              f"the encoders differ; give --model_config the pre-training "
                              f"encoder's sizes {sizes}{hint}")
        self.encoder.set_weights(theirs)
        before, now = other.get_config()["image_size"], self.encoder.get_config()["image_size"]
        if before != now:  # the sin-cos position embedding has no weights: any size loads
            logging.getLogger(__name__).info(
                f"note: the encoder was pre-trained on {before} px crops and is fine-tuned on "
                f"{now} px ones (its position embedding is computed for each size)")

    def get_config(self) -> dict:
        enc = self.encoder.get_config()
        return {"name": self.name, "trainable": self.trainable,
                **{k: enc[k] for k in ENCODER_KEYS}, "num_classes": self.num_classes,
                "decoder_channels": self.decoder_channels}

    @classmethod
    def from_config(cls, config: dict) -> ViTSeg:
        return cls(**cls.from_preset_config(config))

    @classmethod
    def from_preset_config(cls, config: dict) -> dict:
        """Constructor arguments from a config that may name a ``"preset"`` (its encoder sizes)."""
        return apply_preset(config, ENCODER_KEYS)
