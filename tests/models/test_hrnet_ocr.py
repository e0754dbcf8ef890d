import keras
import numpy as np
import pytest

from retina_tf.losses import SegmentationLoss
from retina_tf.models import build_model, model_class, model_names
from retina_tf.models.hrnet_ocr import (
    HRNetOCR,
    ObjectAttention,
    SpatialGather,
    spatial_gather_weights,
)
from retina_tf.optimizers import Adam
from tests.models.helpers import assert_reload_identical, fit_toy

# A tiny network so a test builds in seconds on a shared CPU.
TINY = dict(width=4, stem_channels=8, num_blocks=1, ocr_mid_channels=16, ocr_key_channels=8)


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    return HRNetOCR(**TINY)


def test_registry_builds_hrnet_ocr():
    assert "hrnet_ocr" in model_names() and model_class("hrnet_ocr") is HRNetOCR
    model = build_model("hrnet_ocr", input_channels=3, num_classes=3, **TINY)
    assert model.input_shape == (None, None, None, 3)
    assert model.output["logits"].shape == (None, None, None, 3)


@pytest.mark.parametrize("h,w", [(64, 64), (96, 128)])
def test_output_shapes(tiny, h, w):
    out = tiny(np.zeros((2, h, w, 1), "float32"), training=False)
    assert set(out) == {"logits", "aux", "features"}
    assert out["logits"].shape == out["aux"].shape == (2, h, w, 1)
    # OCR features stay at the backbone's highest resolution, 1/stem_stride
    assert out["features"].shape == (2, h // 2, w // 2, TINY["ocr_mid_channels"])


@pytest.mark.parametrize("stem_stride", [1, 4])
def test_stem_stride_sets_the_backbone_resolution(stem_stride):
    model = HRNetOCR(stem_stride=stem_stride, num_modules=[1, 1, 1], **TINY)
    assert model.size_multiple == 8 * stem_stride
    out = model(np.zeros((1, 64, 64, 1), "float32"), training=False)
    assert out["logits"].shape == (1, 64, 64, 1)
    assert out["features"].shape == (1, 64 // stem_stride, 64 // stem_stride, 16)


def test_hrnet_branch_widths(tiny):
    # HRNetV2: four branches w, 2w, 4w, 8w concatenated at the highest resolution (15 w)
    concat = tiny.get_layer("hrnet_concat")
    assert concat.output.shape[-1] == 15 * TINY["width"]
    fused = [tiny.get_layer(f"hrnet_s4_m0_fuse_out{i}").output for i in range(4)]
    assert [t.shape[-1] for t in fused] == [4, 8, 16, 32]
    assert tiny.size_multiple == 16


def test_spatial_gather_weights_sum_to_one_over_pixels():
    logits = np.random.default_rng(0).normal(size=(2, 6, 5, 3)).astype("float32") * 10
    weights = _np(spatial_gather_weights(logits))
    np.testing.assert_allclose(weights.sum(axis=(1, 2)), np.ones((2, 3)), rtol=1e-5)
    assert (weights >= 0).all()


def test_spatial_gather_is_the_region_weighted_mean_with_complement_regions():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 4, 5, 3)).astype("float32")
    aux = rng.normal(size=(2, 4, 5, 1)).astype("float32")
    regions = _np(SpatialGather()([features, aux]))
    assert regions.shape == (2, 2, 3)  # vessel and background regions
    for k, sign in enumerate((1.0, -1.0)):
        e = np.exp(sign * aux[..., 0])
        w = e / e.sum(axis=(1, 2), keepdims=True)
        expected = np.einsum("bhw,bhwc->bc", w, features)
        np.testing.assert_allclose(regions[:, k], expected, rtol=1e-5, atol=1e-6)


def test_object_attention_matches_scaled_dot_product():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(1, 3, 4, 8)).astype("float32")
    k = rng.normal(size=(1, 2, 8)).astype("float32")
    v = rng.normal(size=(1, 2, 8)).astype("float32")
    sim = np.einsum("bhwd,bkd->bhwk", q, k) / np.sqrt(8.0)
    sim = np.exp(sim - sim.max(-1, keepdims=True))
    sim /= sim.sum(-1, keepdims=True)
    np.testing.assert_allclose(_np(ObjectAttention()([q, k, v])),
                               np.einsum("bhwk,bkd->bhwd", sim, v), rtol=1e-5, atol=1e-6)


def test_compute_loss_is_main_plus_weighted_aux(tiny):
    loss = SegmentationLoss("bce_dice")
    tiny.compile(optimizer="adam", loss=loss)
    rng = np.random.default_rng(3)
    x = rng.random((2, 32, 32, 1)).astype("float32")
    y = (rng.random((2, 32, 32, 1)) > 0.8).astype("float32")
    w = (rng.random((2, 32, 32, 1)) > 0.2).astype("float32")
    y_pred = tiny(x, training=False)
    expected = loss(y, y_pred["logits"], w) + 0.4 * loss(y, y_pred["aux"], w)
    np.testing.assert_allclose(_np(tiny.compute_loss(x, y, y_pred, w)), _np(expected), rtol=1e-6)


def test_a_few_training_steps_lower_the_loss():
    keras.utils.set_random_seed(0)
    model = HRNetOCR(**TINY)
    rng = np.random.default_rng(4)
    y = (rng.random((2, 32, 32, 1)) > 0.85).astype("float32")
    x = (0.6 * y + 0.4 * rng.random((2, 32, 32, 1))).astype("float32")
    history = fit_toy(model, x, y, Adam(3e-3), epochs=4, steps_per_epoch=3)
    assert history["loss"][-1] < history["loss"][0]
    assert "f1" in history


def test_save_and_reload_give_identical_predictions(tmp_path):
    model = HRNetOCR(num_classes=3, num_modules=[1, 2, 1], aux_loss_weight=0.2, **TINY)
    x = np.random.default_rng(5).random((1, 32, 48, 1)).astype("float32")
    assert_reload_identical(model, x, tmp_path)


def test_get_config_round_trip(tiny):
    config = tiny.get_config()
    assert HRNetOCR.from_config(config).get_config() == config
    assert set(config) - {"name", "trainable"} == {
        "input_channels", "num_classes", "width", "stem_stride", "stem_channels", "num_blocks",
        "num_modules", "ocr_mid_channels", "ocr_key_channels", "aux_loss_weight"}


@pytest.mark.parametrize("kwargs,quoted", [
    ({"width": 0}, "0"), ({"stem_stride": 3}, "3"), ({"num_blocks": 1.5}, "1.5"),
    ({"num_modules": [1, 2]}, "[1, 2]"), ({"aux_loss_weight": -1.0}, "-1.0"),
    ({"ocr_key_channels": "64"}, "'64'"),
])
def test_invalid_arguments_are_quoted(kwargs, quoted):
    with pytest.raises(ValueError, match=quoted.replace("[", r"\[").replace("]", r"\]")):
        HRNetOCR(**kwargs)
