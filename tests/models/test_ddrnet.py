"""DDRNet-23-slim (full-resolution and the paper's 1/8 variant): shapes, branch resolutions, DAPPM,
aux loss, saving."""

import json
import re

import keras
import numpy as np
import pytest

from retina_tf.losses import SegmentationLoss
from retina_tf.metrics import SegmentationF1
from retina_tf.models import build_model, model_class, model_names
from retina_tf.models.ddrnet import DDRNet, dappm
from retina_tf.optimizers import SGD
from tests.models.helpers import assert_reload_identical, fit_toy

TINY = dict(planes=4, spp_planes=8, head_planes=8)


def tiny(**kwargs) -> DDRNet:
    return DDRNet(**{**TINY, **kwargs})


def vessel_batch(batch=2, size=32, seed=0):
    """Images with dark vertical lines, the line mask as label and a disc-shaped FOV weight."""
    rng = np.random.default_rng(seed)
    y = np.zeros((batch, size, size, 1), "float32")
    for b in range(batch):
        y[b, :, rng.choice(size, 4, replace=False)] = 1.0
    x = (1.0 - 0.6 * y + 0.05 * rng.standard_normal(y.shape)).astype("float32")
    r = np.hypot(*np.meshgrid(np.arange(size) - size / 2, np.arange(size) - size / 2))
    w = np.broadcast_to((r < size / 2)[None, :, :, None], y.shape).astype("float32")
    return x, y, w


def test_registry_builds_ddrnet_from_json_config():
    assert "ddrnet" in model_names() and model_class("ddrnet") is DDRNet
    model = build_model("ddrnet", input_channels=1, num_classes=1,
                        **json.loads('{"planes": 4, "spp_planes": 8, "layers": [1, 1, 1, 1]}'))
    assert isinstance(model, DDRNet) and model.get_config()["layers"] == [1, 1, 1, 1]
    assert model.size_multiple == 8


@pytest.mark.parametrize("height,width,classes", [(64, 64, 1), (96, 128, 3), (592, 576, 1)])
def test_output_is_logits_of_the_input_size(height, width, classes):
    model = tiny(num_classes=classes, planes=2 if height > 128 else 4)
    x = np.random.default_rng(0).random((1, height, width, 1)).astype("float32")
    assert model(x).shape == (1, height, width, classes)
    assert model.get_layer("head_2_conv").activation is keras.activations.linear  # logits


def test_high_branch_runs_at_input_resolution_and_low_branch_at_1_2_4_8():
    model = tiny()
    names = {"stem2_relu": (1, 4), "layer2_relu": (1, 8), "fuse3_high": (1, 8),
             "fuse4_high": (1, 8), "layer5_high_block1_add": (1, 16), "fuse5": (1, 16),
             "fuse3_low": (2, 16), "fuse4_low": (4, 32), "layer5_low_block1_add": (8, 64),
             "dappm_out": (8, 16)}
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    outputs = probe(np.zeros((1, 64, 96, 1), "float32"))
    for (name, (factor, channels)), out in zip(names.items(), outputs):
        assert tuple(out.shape) == (1, 64 // factor, 96 // factor, channels), name


def test_output_stride_8_is_the_papers_network_at_1_8_with_the_same_weights():
    model = tiny(output_stride=8, aux_head=True)
    assert model.size_multiple == 64
    names = {"stem1_relu": (2, 4), "stem2_relu": (4, 4), "layer2_relu": (8, 8),
             "fuse4_high": (8, 8), "fuse3_low": (16, 16), "fuse4_low": (32, 32),
             "layer5_low_block1_add": (64, 64), "fuse5": (8, 16)}
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    outputs = probe(np.zeros((1, 128, 192, 1), "float32"))
    for (name, (factor, channels)), out in zip(names.items(), outputs):
        assert tuple(out.shape) == (1, 128 // factor, 192 // factor, channels), name
    y = model(np.random.default_rng(0).random((1, 128, 192, 1)).astype("float32"))
    assert y["logits"].shape == y["aux"].shape == (1, 128, 192, 1)  # resized back
    assert model.count_params() == tiny(aux_head=True).count_params()
    assert DDRNet(output_stride=8).count_params() == DDRNet().count_params()
    clone = DDRNet.from_config(model.get_config())
    assert clone.output_stride == 8 and clone.size_multiple == 64
    for bad in (2, 4, True):
        with pytest.raises(ValueError, match="output_stride must be one of"):
            tiny(output_stride=bad)


@pytest.mark.parametrize("height,width", [(1, 1), (8, 8), (5, 7), (74, 72)])
def test_dappm_keeps_the_resolution_and_gives_out_planes(height, width):
    # 1x1 and 8x8 are smaller than the k17 pool; 74x72 is a 592x576 image at 1/8.
    inputs = keras.Input((None, None, 6))
    module = keras.Model(inputs, dappm(inputs, branch_planes=4, out_planes=5, name="spp"))
    out = module(np.random.default_rng(0).random((2, height, width, 6)).astype("float32"))
    assert tuple(out.shape) == (2, height, width, 5)
    assert np.isfinite(keras.ops.convert_to_numpy(out)).all()


def test_dappm_pools_count_the_zero_padding_like_pytorch():
    # count_include_pad=True: at a corner the k5 window covers 3x3 real pixels of 25.
    inputs = keras.Input((None, None, 1))
    module = keras.Model(inputs, dappm(inputs, 2, 2, name="spp"))
    probe = keras.Model(inputs, [module.get_layer(f"spp_pool{i}").output for i in (1, 2, 3)])
    pooled = [keras.ops.convert_to_numpy(p) for p in probe(np.ones((1, 16, 16, 1), "float32"))]
    assert [p.shape[1:3] for p in pooled] == [(8, 8), (4, 4), (2, 2)]  # ceil(16 / stride)
    assert pooled[0][0, 0, 0, 0] == pytest.approx(9 / 25)
    assert pooled[0][0, 1, 1, 0] == pytest.approx(1.0)  # centre 2: window fully inside
    assert pooled[1][0, 0, 0, 0] == pytest.approx(25 / 81)
    assert pooled[2][0, 0, 0, 0] == pytest.approx(81 / 289)


def test_aux_head_returns_a_dict_and_its_loss_is_logits_plus_0_4_aux():
    model = tiny(aux_head=True)
    model.compile(optimizer="adam", loss=SegmentationLoss("bce_dice"),
                  weighted_metrics=[SegmentationF1()])
    x, y, w = vessel_batch()
    y_pred = model(x, training=False)
    assert set(y_pred) == {"logits", "aux"}
    assert y_pred["logits"].shape == y_pred["aux"].shape == (2, 32, 32, 1)
    by_hand = SegmentationLoss("bce_dice")
    expected = (by_hand(y, y_pred["logits"], w) + 0.4 * by_hand(y, y_pred["aux"], w))
    got = model.compute_loss(x, y, y_pred, w)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert float(got) > float(by_hand(y, y_pred["logits"], w))  # the aux term counts

    plain = tiny()
    plain.compile(optimizer="adam", loss=SegmentationLoss("bce_dice"))
    logits = plain(x, training=False)
    assert float(plain.compute_loss(x, y, logits, w)) == pytest.approx(
        float(by_hand(y, logits, w)), rel=1e-6)


def test_a_few_training_steps_lower_the_loss():
    keras.utils.set_random_seed(0)
    model = tiny(aux_head=True, layers=(1, 1, 1, 1))
    # SGD: tracing Adam's update of this many variables costs ~15 s more CPU (same loss path).
    x, y, w = vessel_batch(batch=4)
    history = fit_toy(model, x, y, SGD(0.05, momentum=0.9), epochs=15,
                      steps_per_epoch=1, fov=w)
    assert history["loss"][-1] < 0.9 * history["loss"][0]
    assert "f1" in history and len(history["f1"]) == 15


@pytest.mark.parametrize("aux_head", [False, True])
def test_save_and_reload_give_identical_predictions(tmp_path, aux_head):
    model = tiny(aux_head=aux_head, num_classes=3, layers=(1, 2, 1, 1))
    x = np.random.default_rng(1).random((1, 40, 48, 1)).astype("float32")
    assert isinstance(assert_reload_identical(model, x, tmp_path), DDRNet)


def test_get_config_round_trip():
    model = tiny(input_channels=3, num_classes=2, layers=(2, 1, 2, 1), aux_head=True)
    config = model.get_config()
    assert config["layers"] == [2, 1, 2, 1] and isinstance(config["layers"], list)
    json.dumps(config)
    clone = DDRNet.from_config(config)
    assert clone.get_config() == config and clone.count_params() == model.count_params()


def test_default_is_ddrnet_23_slim_size():
    # 5.7 M parameters in the paper's Table; the stem and the classes change only a few hundred.
    assert DDRNet().count_params() == pytest.approx(5.7e6, rel=0.01)


@pytest.mark.parametrize("kwargs,quoted", [
    (dict(layers=(2, 2, 2)), "(2, 2, 2)"), (dict(layers=(2, 0, 2, 2)), "(2, 0, 2, 2)"),
    (dict(planes=0), "0"), (dict(spp_planes=-8), "-8"), (dict(num_classes=1.5), "1.5"),
    (dict(aux_head="yes"), "'yes'")])
def test_invalid_arguments_are_quoted(kwargs, quoted):
    with pytest.raises(ValueError, match=re.escape(quoted)):
        DDRNet(**kwargs)


def test_bn_momentum_sets_every_batch_norm():
    def momenta(model):
        return {layer.momentum for layer in model._flatten_layers(include_self=False)
                if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta(tiny()) == {0.9}  # PyTorch's BatchNorm2d(momentum=0.1), as DDRNet's code
    model = tiny(bn_momentum=0.99)
    assert momenta(model) == {0.99}
    assert momenta(DDRNet.from_config(model.get_config())) == {0.99}


def test_a_narrow_ddrnet_trains_on_64_px_patches():
    """Its strided 1x1 shortcuts of 8 channels hit a oneDNN backward pass that corrupted
    memory and aborted the process (a --model_config of planes 4 at --patch_size=64)."""
    model = tiny(layers=[1, 1, 1, 1])
    x, y, _ = vessel_batch(batch=2, size=64)
    # SGD: the backward pass is the point, and Keras's Adam doubled the test's time tracing
    model.compile(optimizer=SGD(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
