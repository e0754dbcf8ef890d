import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_tf.models import build_model, model_class
from retina_tf.models.ear_net import EARNet, ErrorAttentionModulation, TrainingSwitch, masked_mse
from retina_tf.models.hmsa import HMSA
from retina_tf.optimizers import Adam
from tests.models.helpers import assert_reload_identical, fit_toy

TINY = dict(width=4, stem_channels=8, num_blocks=1, ocr_mid_channels=16, ocr_key_channels=8,
            attention_channels=8)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _image(h=32, w=32, seed=0, n=1):
    return np.random.default_rng(seed).random((n, h, w, 1)).astype("float32")


def _force_error_attention(model: EARNet, value: float):
    """Makes the error-attention head output ``value`` (0 or 1) everywhere."""
    out = model.error_attention.out
    out.kernel.assign(np.zeros(out.kernel.shape, "float32"))
    out.bias.assign(np.full(out.bias.shape, -1e4 if value == 0 else 1e4, "float32"))


def _modulate(logits, attention, weight=0.5):
    return (1 - weight) * logits + weight * attention * logits


def _nscale_reference(model: EARNet, x: np.ndarray, key: str, modulate: bool) -> np.ndarray:
    """The authors' ``nscale_forward`` (github.com/Markin-Wang/EARNet,
    network/ocrnet_error_attn.py) written out with ``tf.image.resize`` on the model's parts:
    from the highest scale down, each scale's map (``modulate``: times ``1 - w + w e_s``, its own
    error attention) is blended into the running prediction by its scale attention."""
    net = model.stage1.network

    def resize(t, size):
        return tf.image.resize(t, size, method="bilinear")

    pred = None
    for s in sorted(model.scales, reverse=True):
        size = [round(s * x.shape[1]), round(s * x.shape[2])]
        out = net(x if s == 1.0 else resize(x, size), training=False)
        value = out[key]
        if modulate:
            error = resize(model.error_attention(out["features"], training=False), size)
            value = _modulate(value, error, model.error_weight)
        if pred is None:
            pred = value
            continue
        attention = resize(model.stage1.scale_attention(out["features"], training=False), size)
        if s >= 1.0:
            pred = attention * value + (1 - attention) * resize(pred, size)
        else:
            up = pred.shape[1:3]
            pred = resize(attention * value, up) + (1 - resize(attention, up)) * pred
    return _np(pred)


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    return EARNet(**TINY)


def test_registry_and_outputs(tiny):
    assert model_class("ear_net") is EARNet
    assert build_model("ear_net", num_classes=3, **TINY).output["logits"].shape[-1] == 3
    out = tiny(np.zeros((2, 64, 96, 1), "float32"), training=False)
    assert set(out) == {"logits", "stage1_logits", "error_attention", "aux", "stage1_aux",
                        "logits_0.5", "logits_1.0", "attention_0.5"}
    for key, value in out.items():
        assert value.shape == (2, 64, 96, 1), key
    att = _np(out["error_attention"])
    assert (att >= 0).all() and (att <= 1).all()


def test_modulation_layer_formula():
    logits = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    att = np.random.default_rng(2).random((2, 8, 8, 1)).astype("float32")
    got = _np(ErrorAttentionModulation(0.5)([logits, att]))
    np.testing.assert_allclose(got, 0.5 * logits + 0.5 * att * logits, rtol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        ErrorAttentionModulation(1.5)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("value,factor", [(0.0, 0.5), (1.0, 1.0)])
def test_zero_attention_halves_the_logits_and_the_aux_logits(value, factor, training):
    # (1 - w) * p + w * att * p: att = 0 -> (1 - w) * p; att = 1 -> p (w = 0.5). A constant
    # attention scales every pass alike, so fusing before or after modulating agrees.
    keras.utils.set_random_seed(3)
    model = EARNet(**TINY)
    _force_error_attention(model, value)
    out = model(_image(32, 64, seed=4), training=training)
    for key in ("logits", "aux"):
        np.testing.assert_allclose(_np(out[key]), factor * _np(out[f"stage1_{key}"]),
                                   rtol=1e-5, atol=1e-6)
    assert np.abs(_np(out["aux"])).max() > 0.1  # not a vacuous check on zeros


def test_training_modulates_the_fused_maps_by_the_1x_error_attention(tiny):
    # The code's two_scale_forward: joint_pred and joint_aux, after the fusion, by err_attn of
    # the 1.0 pass. Same call: the OCR dropout draws once.
    out = tiny(_image(64, 64, seed=14), training=True)
    error = _np(out["error_attention"])
    assert error.std() > 1e-3  # a real map, not a constant
    for key in ("logits", "aux"):
        np.testing.assert_allclose(_np(out[key]), _modulate(_np(out[f"stage1_{key}"]), error),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scales", [(0.5, 1.0), (0.5, 1.0, 2.0)])
def test_inference_modulates_each_scale_by_its_own_error_attention_before_fusion(tiny, scales):
    model = tiny.with_scales(scales)
    x = _image(64, 64, seed=15)
    out = model(x, training=False)
    for key in ("logits", "aux"):
        np.testing.assert_allclose(_np(out[key]), _nscale_reference(model, x, key, True),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_np(out[f"stage1_{key}"]),
                                   _nscale_reference(model, x, key, False), rtol=1e-4, atol=1e-5)
    # ... which is not the 1.0 map applied after the fusion (the order the check tells apart)
    after_fusion = _modulate(_np(out["stage1_logits"]), _np(out["error_attention"]))
    assert np.abs(_np(out["logits"]) - after_fusion).max() > 1e-3


def test_training_switch_picks_by_mode():
    a, b = np.zeros((1, 2, 2, 1), "float32"), np.ones((1, 2, 2, 1), "float32")
    switch = TrainingSwitch()
    assert _np(switch([a, b], training=True)).max() == 0
    assert _np(switch([a, b], training=False)).min() == 1
    assert _np(switch([a, b])).min() == 1  # a plain call is inference


def test_stage1_logits_are_the_hmsa_output_after_load_pretrained():
    keras.utils.set_random_seed(5)
    hmsa = HMSA(**TINY)
    ear = EARNet(**TINY)
    ear.load_pretrained(hmsa)
    x = _image(64, 64, seed=6)
    for key in ("logits", "aux"):
        np.testing.assert_allclose(_np(ear(x, training=False)[f"stage1_{key}"]),
                                   _np(hmsa(x, training=False)[key]), rtol=1e-5, atol=1e-6)


def test_stage1_is_a_whole_hmsa_model_serialized_nested(tmp_path):
    keras.utils.set_random_seed(7)
    hmsa = HMSA(**TINY)
    ear = EARNet(stage1=hmsa)
    assert ear.stage1 is hmsa and ear.scales == hmsa.scales
    x = _image(64, 64, seed=8)
    np.testing.assert_allclose(_np(ear(x, training=False)["stage1_logits"]),
                               _np(hmsa(x, training=False)["logits"]), rtol=1e-5, atol=1e-6)
    config = ear.get_config()
    assert config["stage1"]["class_name"] == "HMSA" and "width" not in config
    ear.save(tmp_path / "ear.keras")
    again = keras.saving.load_model(tmp_path / "ear.keras")
    np.testing.assert_allclose(_np(again(x, training=False)["logits"]),
                               _np(ear(x, training=False)["logits"]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="either stage1 or its arguments"):
        EARNet(stage1=hmsa, width=8)


def test_load_pretrained_refuses_another_architecture():
    with pytest.raises(ValueError, match="differ in shape"):
        EARNet(**TINY).load_pretrained(HMSA(**dict(TINY, width=6)))
    with pytest.raises(ValueError, match="hmsa run"):
        EARNet(**TINY).load_pretrained(keras.Sequential([keras.layers.Dense(1)], name="other"))


def test_masked_mse_counts_only_the_fov():
    pred = np.array([[0.0, 1.0], [0.5, 0.5]], "float32")[None, ..., None]
    target = np.array([[1.0, 1.0], [0.0, 0.0]], "float32")[None, ..., None]
    fov = np.array([[0.0, 1.0], [1.0, 1.0]], "float32")[None, ..., None]
    # inside the FOV: (0, 0.25, 0.25) -> 1/6; the masked-out pixel (error 1) does not count
    assert float(masked_mse(pred, target, fov)) == pytest.approx(1 / 6)
    assert float(masked_mse(pred, target)) == pytest.approx((1 + 0 + 0.25 + 0.25) / 4)


def test_error_loss_weight_is_the_seeds_0_5_and_old_configs_keep_theirs(tiny):
    assert tiny.error_loss_weight == 0.5 == tiny.get_config()["error_loss_weight"]
    config = tiny.get_config()
    del config["error_loss_weight"]  # a config without the key: the default
    assert EARNet.from_config(config).error_loss_weight == 0.5
    # a run trained with 1.0 keeps it when it is rebuilt
    assert EARNet.from_config(dict(config, error_loss_weight=1.0)).error_loss_weight == 1.0


def test_loss_adds_the_error_term_only_with_an_error_channel():
    keras.utils.set_random_seed(7)
    model = EARNet(**TINY)
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
    x = _image(32, 32, seed=8)
    y = (np.random.default_rng(9).random((1, 32, 32, 1)) > 0.8).astype("float32")
    err = (np.random.default_rng(10).random((1, 32, 32, 1)) > 0.9).astype("float32")
    pred = model(x, training=False)
    seg_only = float(model.compute_loss(x, y, pred))
    with_error = float(model.compute_loss(x, np.concatenate([y, err], -1), pred))
    expected = 0.5 * float(masked_mse(pred["error_attention"], err))  # ERR_ATTN_ALPHA
    assert with_error - seg_only == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_fit_lowers_both_losses(tmp_path):
    keras.utils.set_random_seed(11)
    model = EARNet(**TINY)
    x = _image(32, 32, seed=12, n=2)
    vessel = (x > 0.6).astype("float32")
    error = np.zeros_like(vessel)
    error[:, 8:16] = 1.0
    y = np.concatenate([vessel, error], -1)
    fov = np.ones_like(vessel)

    def error_loss():
        # with the batch's own statistics, as the steps saw it: the moving statistics of a
        # few batches of two images lag behind, and whether the inference loss had fallen
        # yet depended on the CPU's float order (0.267 -> 0.343 after 40 steps on an AVX2 one)
        return float(masked_mse(model(x, training=True)["error_attention"], error))

    before = error_loss()
    # 1e-2: at 3e-3 the steps moved the error loss (weighted 0.5) by less than the float
    # differences between CPUs with and without AVX-512 (0.2666 -> 0.2685 on an AVX2 one)
    history = fit_toy(model, x, y, Adam(1e-2), epochs=4, steps_per_epoch=5, fov=fov)
    assert history["loss"][-1] < history["loss"][0]
    assert "f1" in history  # metrics see the segmentation channel only
    assert error_loss() < 0.5 * before  # about a quarter of it after 20 steps, for each seed


def test_with_scales_shares_weights_and_reload(tiny, tmp_path):
    three = tiny.with_scales([0.5, 1.0, 2.0])
    assert three.error_attention is tiny.error_attention and three.size_multiple == 32
    out = three(_image(64, 64), training=False)
    assert out["logits"].shape == (1, 64, 64, 1) and "attention_1.0" in out
    assert_reload_identical(tiny, _image(64, 32, seed=13), tmp_path)


def test_bn_momentum_reaches_every_batch_norm_and_survives_reload(tmp_path):
    model = EARNet(**TINY, bn_momentum=0.99)
    norms = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) > 10 and {n.momentum for n in norms} == {0.99}
    path = tmp_path / "ear.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    assert again.bn_momentum == 0.99 and again.stage1.network.layers  # rebuilt from the config
    assert {n.momentum for n in again._flatten_layers(include_self=False, recursive=True)
            if isinstance(n, keras.layers.BatchNormalization)} == {0.99}
    with pytest.raises(ValueError, match="bn_momentum"):
        EARNet(**TINY, bn_momentum=1.0)
