import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_tf.errors import ConfigError
from retina_tf.models import build_model, model_class
from retina_tf.models.vit_mae import (
    MAE,
    PRESETS,
    ViTSeg,
    apply_preset,
    patchify,
    sincos_position_embedding,
    unpatchify,
)
from retina_tf.optimizers import Adam
from retina_tf.training import FreezeEncoder
from tests.models.helpers import assert_reload_identical, fit_toy

ENC = dict(image_size=32, patch_size=8, dim=32, depth=2, num_heads=2)
DEC = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _images(n=2, size=32, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 1)).astype("float32")


def test_position_embeddings_are_deterministic_and_follow_the_formula():
    a = sincos_position_embedding(4, 6, 16)
    np.testing.assert_array_equal(a, sincos_position_embedding(4, 6, 16))
    assert a.shape == (24, 16)
    # token (row 2, col 3) = [sin(2 w), cos(2 w), sin(3 w), cos(3 w)], w_k = 10000**(-k / 4)
    w = 1.0 / 10000.0 ** (np.arange(4) / 4.0)
    expected = np.concatenate([np.sin(2 * w), np.cos(2 * w), np.sin(3 * w), np.cos(3 * w)])
    np.testing.assert_allclose(a[2 * 6 + 3], expected, rtol=1e-6)
    assert len({tuple(row) for row in a}) == 24  # every position distinct
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_position_embedding(2, 2, 6)
    # two models of the same size carry the same (non-trainable) embeddings
    np.testing.assert_array_equal(MAE(**ENC, **DEC).encoder.position,
                                  MAE(**ENC, **DEC, seed=5).encoder.position)


def test_patchify_round_trip():
    x = _images(2, 32)
    p = patchify(x, 8)
    assert p.shape == (2, 16, 64)
    np.testing.assert_array_equal(_np(p)[0, 1], x[0, :8, 8:16, 0].ravel())
    np.testing.assert_array_equal(_np(unpatchify(p, 8, 4, 4, 1)), x)


@pytest.mark.parametrize("ratio,masked", [(0.75, 12), (0.5, 8), (0.3, 5)])
def test_masking_keeps_exactly_the_requested_share(ratio, masked):
    model = MAE(**ENC, **DEC, mask_ratio=ratio)
    out = model(_images(3), training=False)
    mask = _np(out["mask"])
    assert mask.shape == (3, 16) and set(np.unique(mask)) == {0.0, 1.0}
    assert (mask.sum(axis=1) == masked).all()
    assert out["pred"].shape == (3, 16, 64)
    # different images get different masks
    assert not np.array_equal(mask[0], mask[1]) or not np.array_equal(mask[1], mask[2])
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(**ENC, **DEC, mask_ratio=1.0)


def test_mask_follows_the_noise_and_loss_counts_only_masked_patches():
    keras.utils.set_random_seed(0)
    model = MAE(**ENC, **DEC, norm_pix_loss=False)
    x = _images(1)
    noise = np.arange(16, dtype="float32")[None][:, ::-1].copy()  # highest noise = patch 0
    out = model(x, noise=noise, training=False)
    # the 4 patches with the lowest noise (12..15) stay visible
    np.testing.assert_array_equal(_np(out["mask"])[0], [1.0] * 12 + [0.0] * 4)
    target = _np(patchify(x, 8))
    pred = _np(out["pred"]).copy()
    base = float(model.reconstruction_loss(x, {"pred": pred, "mask": out["mask"]}))
    expected = np.mean(((pred - target) ** 2).mean(-1)[0, :12])
    assert base == pytest.approx(expected, rel=1e-5)
    pred[0, 12:] += 100.0  # wrong visible patches do not change the loss
    assert float(model.reconstruction_loss(x, {"pred": pred, "mask": out["mask"]})) == \
        pytest.approx(base, rel=1e-6)


def test_normalized_target_has_zero_mean_unit_variance_per_patch():
    target = _np(MAE(**ENC, **DEC, norm_pix_loss=True).target(_images(1)))
    np.testing.assert_allclose(target.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(target.std(-1), 1.0, atol=1e-3)


def test_mae_fit_lowers_the_loss_and_reloads(tmp_path):
    keras.utils.set_random_seed(1)
    model = MAE(**ENC, **DEC)
    x = _images(8, seed=2)
    data = tf.data.Dataset.from_tensors(x).repeat()
    model.compile(optimizer=Adam(3e-3))
    history = model.fit(data, epochs=4, steps_per_epoch=8, verbose=0, shuffle=False).history
    assert history["loss"][-1] < history["loss"][0]
    noise = np.random.default_rng(3).random((2, 16)).astype("float32")
    path = tmp_path / "mae.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    assert type(again) is MAE and again.get_config() == model.get_config()
    np.testing.assert_array_equal(_np(again(x[:2], noise=noise)["pred"]),
                                  _np(model(x[:2], noise=noise)["pred"]))
    masked, recon, mask = model.reconstruct(x[:2], noise=noise)
    m = _np(mask)
    # visible patches are pasted back unchanged; masked patches are zero in the masked input
    np.testing.assert_allclose(_np(recon)[m == 0], x[:2][m == 0], atol=1e-6)
    assert (_np(masked)[m == 1] == 0).all()


def test_vit_seg_shapes_taps_registry_and_reload(tmp_path):
    assert model_class("vit_seg") is ViTSeg and model_class("mae") is MAE
    model = build_model("vit_seg", num_classes=3, **dict(ENC, depth=6))
    # depth * k / log2(patch), k = 1, 2: shallow blocks feed fine levels
    assert model.taps == [2, 4]
    assert model(_images(2), training=False).shape == (2, 32, 32, 3)
    assert model.size_multiple == 32 and not model.fully_convolutional
    assert_reload_identical(model, _images(1, seed=4), tmp_path)


def test_encoder_weights_transfer_from_mae(caplog):
    keras.utils.set_random_seed(5)
    mae = MAE(**ENC, **DEC)
    mae(_images(1))
    seg = ViTSeg(**dict(ENC, image_size=64))  # another crop size: same encoder weights
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        seg.load_pretrained(mae)
    assert "pre-trained on 32 px crops and is fine-tuned on 64 px ones" in caplog.text
    for a, b in zip(seg.encoder.get_weights(), mae.encoder.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="--pretrained: cannot start .* encoders differ"):
        ViTSeg(**dict(ENC, depth=3)).load_pretrained(mae)
    # other input channels come from --preprocess, which --model_config cannot change
    colour = dict(ENC, input_channels=3 if ENC.get("input_channels", 1) == 1 else 1)
    with pytest.raises(ConfigError, match=r"sizes \{[^}]*\}, and --preprocess giving its") as err:
        ViTSeg(**colour).load_pretrained(mae)
    assert "input_channels" not in str(err.value)


def test_vit_seg_fit_lowers_the_loss_and_freeze_keeps_the_encoder():
    keras.utils.set_random_seed(6)
    model = ViTSeg(**ENC)
    x = _images(4, seed=7)
    y = (x > 0.7).astype("float32")
    before = [w.copy() for w in model.encoder.get_weights()]
    fit_toy(model, x, y, Adam(2e-3), epochs=1, steps_per_epoch=3)
    assert not np.array_equal(model.encoder.get_weights()[0], before[0])  # trains when not frozen
    # frozen for 2 of 4 epochs: the encoder changes only after the second
    start = model.encoder.get_weights()[0].copy()
    snapshots = []

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append(self.model.encoder.get_weights()[0].copy())

    data = tf.data.Dataset.from_tensors((x, y, np.ones_like(y))).repeat()
    history = model.fit(data, epochs=4, steps_per_epoch=3, verbose=0, shuffle=False,
                        callbacks=[FreezeEncoder(2), Snapshot()]).history
    np.testing.assert_array_equal(snapshots[0], start)
    np.testing.assert_array_equal(snapshots[1], start)
    assert not np.array_equal(snapshots[2], snapshots[1])
    assert history["loss"][-1] < history["loss"][0]


def test_presets():
    assert apply_preset({"preset": "seed", "depth": 2})["dim"] == 768
    assert apply_preset({"preset": "seed", "depth": 2})["depth"] == 2
    assert PRESETS["seed"] == dict(image_size=512, patch_size=16, dim=768, depth=8, num_heads=8,
                                   decoder_dim=512, decoder_depth=4, decoder_heads=8)
    with pytest.raises(ValueError, match="unknown ViT preset"):
        apply_preset({"preset": "huge"})
