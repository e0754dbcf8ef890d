import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_tf.losses import SegmentationLoss
from retina_tf.models import build_model, model_class, model_names
from retina_tf.models.hmsa import HMSA, scales_size_multiple
from retina_tf.models.hrnet_ocr import HRNetOCR
from retina_tf.optimizers import Adam
from tests.models.helpers import assert_reload_identical, fit_toy

# A tiny network so a test builds in seconds on a shared CPU.
NET = dict(width=4, stem_channels=8, num_blocks=1, ocr_mid_channels=16, ocr_key_channels=8)
TINY = dict(NET, attention_channels=8)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _image(h=32, w=32, seed=0):
    return np.random.default_rng(seed).random((1, h, w, 1)).astype("float32")


def _force_attention(model: HMSA, value: float):
    """Sets the scale-attention head's output to ``value`` everywhere (zero kernel, bias logit)."""
    out = model.scale_attention.out
    logit = -1e4 if value == 0 else 1e4 if value == 1 else np.log(value / (1.0 - value))
    out.kernel.assign(np.zeros(out.kernel.shape, "float32"))
    out.bias.assign(np.full(out.bias.shape, logit, "float32"))


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    return HMSA(**TINY)


def test_registry_builds_hmsa():
    assert "hmsa" in model_names() and model_class("hmsa") is HMSA
    model = build_model("hmsa", input_channels=3, num_classes=3, **TINY)
    assert model.output["logits"].shape == (None, None, None, 3)


@pytest.mark.parametrize("h,w", [(64, 64), (96, 128)])
def test_output_shapes(tiny, h, w):
    out = tiny(np.zeros((2, h, w, 1), "float32"), training=False)
    assert set(out) == {"logits", "aux", "logits_0.5", "logits_1.0", "attention_0.5"}
    for key, value in out.items():
        assert value.shape == (2, h, w, 1), key
    attention = _np(out["attention_0.5"])
    assert (attention >= 0).all() and (attention <= 1).all()



def test_the_inference_scales_are_recorded_as_said():
    from retina_tf.data.preprocess import Preprocessor
    from retina_tf.inference import Segmenter
    seg = Segmenter(HMSA(**TINY), Preprocessor(), scales=[0.5, 1.0, 2.0])
    assert seg.inference_record() == {"window": None, "stride": None, "scales": [0.5, 1.0, 2.0]}
    assert seg.describe_inference().endswith("at scales 0.5, 1, 2")


def test_size_multiple_covers_every_scaled_input(tiny):
    assert tiny.size_multiple == 32  # the 0.5 pass must reach 1/16 too
    assert scales_size_multiple(16, [1.0]) == 16
    assert scales_size_multiple(16, [0.5, 1.0, 2.0]) == 32
    assert scales_size_multiple(16, [0.75, 1.0]) == 64
    assert scales_size_multiple(8, [0.25, 1.0, 1.5]) == 32


def test_single_scale_is_the_plain_hrnet_ocr():
    model = HMSA(scales=(1.0,), **TINY)
    plain = HRNetOCR(**NET)
    plain.set_weights(model.network.get_weights())
    x = _image(32, 64)
    out = model(x, training=False)
    np.testing.assert_array_equal(_np(out["logits"]), _np(plain(x, training=False)["logits"]))
    np.testing.assert_array_equal(_np(out["aux"]), _np(plain(x, training=False)["aux"]))


def test_two_scales_follow_the_paper_formula(tiny):
    # p = up(a_0.5 * p_0.5) + (1 - up(a_0.5)) * p_1.0, with a_0.5 and p_0.5 at the 0.5 input size
    x = _image(64, 96, seed=1)
    half = tf.image.resize(x, (32, 48), method="bilinear")
    low = tiny.network(half, training=False)
    a = tf.image.resize(tiny.scale_attention(low["features"], training=False), (32, 48))
    p10 = tiny.network(x, training=False)["logits"]
    expected = (tf.image.resize(a * low["logits"], (64, 96))
                + (1.0 - tf.image.resize(a, (64, 96))) * p10)
    np.testing.assert_allclose(_np(tiny(x, training=False)["logits"]), _np(expected),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value,keep", [(0.0, "logits_1.0"), (1.0, "logits_0.5")])
def test_forced_attention_selects_one_scale(value, keep):
    model = HMSA(**TINY)
    _force_attention(model, value)
    out = model(_image(64, 64, seed=2), training=False)
    np.testing.assert_allclose(_np(out["logits"]), _np(out[keep]), rtol=0, atol=1e-6)
    assert not np.allclose(_np(out["logits_0.5"]), _np(out["logits_1.0"]), atol=1e-3)


def test_inference_scales_share_weights_and_chain_from_the_highest_scale():
    model = HMSA(**TINY)
    multi = model.with_scales([0.5, 1.0, 2.0])
    assert isinstance(multi, HMSA) and multi.scales == [0.5, 1.0, 2.0]
    assert multi.network is model.network and multi.scale_attention is model.scale_attention
    assert {id(v) for v in multi.weights} == {id(v) for v in model.weights}
    assert multi.size_multiple == 32
    # Constant attention c: weights c on p_0.5, (1 - c) c on p_1.0, (1 - c)^2 on p_2.0
    c = 0.3
    _force_attention(model, c)  # shared: changes `multi` as well
    out = multi(_image(64, 64, seed=3), training=False)
    assert {"logits_2.0", "attention_1.0", "attention_0.5"} <= set(out)
    np.testing.assert_allclose(_np(out["attention_1.0"]), c, rtol=1e-5)
    expected = c * _np(out["logits_0.5"]) + (1 - c) * (
        c * _np(out["logits_1.0"]) + (1 - c) * _np(out["logits_2.0"]))
    np.testing.assert_allclose(_np(out["logits"]), expected, rtol=1e-5, atol=1e-5)


def test_compute_loss_is_the_weighted_sum_of_outputs(tiny):
    loss = SegmentationLoss("bce_dice")
    tiny.compile(optimizer="adam", loss=loss)
    rng = np.random.default_rng(4)
    x = rng.random((2, 32, 32, 1)).astype("float32")
    y = (rng.random((2, 32, 32, 1)) > 0.8).astype("float32")
    w = (rng.random((2, 32, 32, 1)) > 0.2).astype("float32")
    p = tiny(x, training=False)
    expected = (loss(y, p["logits"], w) + 0.4 * loss(y, p["aux"], w)
                + 0.05 * (loss(y, p["logits_0.5"], w) + loss(y, p["logits_1.0"], w)))
    np.testing.assert_allclose(_np(tiny.compute_loss(x, y, p, w)), _np(expected), rtol=1e-6)


def test_a_few_training_steps_lower_the_loss():
    keras.utils.set_random_seed(0)
    model = HMSA(**TINY)
    rng = np.random.default_rng(5)
    y = (rng.random((2, 32, 32, 1)) > 0.85).astype("float32")
    x = (0.6 * y + 0.4 * rng.random((2, 32, 32, 1))).astype("float32")
    history = fit_toy(model, x, y, Adam(3e-3), epochs=4, steps_per_epoch=3)
    assert history["loss"][-1] < history["loss"][0]
    assert "f1" in history


def test_save_and_reload_give_identical_predictions(tmp_path):
    model = HMSA(num_classes=2, scale_loss_weight=0.1, **TINY)
    _force_attention(model, 0.4)
    multi = model.with_scales([0.5, 1.0, 2.0])
    x = _image(32, 64, seed=6)
    for i, m in enumerate((model, multi)):
        assert_reload_identical(m, x, tmp_path / str(i))


def test_get_config_round_trip(tiny):
    config = tiny.get_config()
    assert HMSA.from_config(config).get_config() == config
    assert config["scales"] == [0.5, 1.0]
    assert set(config) - {"name", "trainable"} == {
        "input_channels", "num_classes", "width", "stem_stride", "stem_channels", "num_blocks",
        "num_modules", "ocr_mid_channels", "ocr_key_channels", "attention_channels", "scales",
        "aux_loss_weight", "scale_loss_weight", "bn_momentum"}


@pytest.mark.parametrize("kwargs,quoted", [
    ({"scales": [0.5]}, "0.5"), ({"scales": [1.0, -0.5]}, "-0.5"), ({"scales": [1.0, 1.0]}, "1.0"),
    ({"scales": "ab"}, "'ab'"), ({"attention_channels": 0}, "0"),
    ({"scale_loss_weight": -0.1}, "-0.1"), ({"stem_stride": 8}, "8"), ({"width": -2}, "-2"),
])
def test_invalid_arguments_are_quoted(kwargs, quoted):
    with pytest.raises(ValueError, match=quoted):
        HMSA(**kwargs)
