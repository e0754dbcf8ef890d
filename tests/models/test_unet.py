import keras
import numpy as np
import pytest

from retina_tf.models import build_model, model_class, model_names
from retina_tf.models.unet import UNet
from tests.models.helpers import assert_reload_identical


def test_registry_lists_and_builds_unet():
    assert "unet" in model_names()
    assert model_class("unet") is UNet
    with pytest.raises(ValueError, match="'segnet'"):
        build_model("segnet")


@pytest.mark.parametrize("depth,transpose,classes", [(2, False, 1), (3, True, 3), (4, False, 1)])
def test_output_is_logits_of_the_input_size(depth, transpose, classes):
    model = build_model("unet", depth=depth, base_filters=4, transpose_conv=transpose,
                        num_classes=classes)
    x = np.random.default_rng(0).random((2, 48, 64, 1)).astype("float32")
    y = model(x)
    assert y.shape == (2, 48, 64, classes)
    assert model.layers[-1].activation is keras.activations.linear  # logits, not probabilities
    assert model.size_multiple == 2 ** (depth - 1)


def test_lineage_widths_and_parameter_count():
    model = UNet(depth=4, base_filters=32)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)
             and layer.name.endswith("_conv")]
    assert sorted({c.filters for c in convs}) == [32, 64, 128, 256]
    # [3x3 conv, BN] x 2 per level: a known closed-form count for the nearest+1x1 variant
    small = UNet(depth=2, base_filters=2, batch_norm=False)
    enc = (9 * 1 * 2 + 2) + (9 * 2 * 2 + 2)
    bottom = (9 * 2 * 4 + 4) + (9 * 4 * 4 + 4)
    up = 4 * 2 + 2
    dec = (9 * 4 * 2 + 2) + (9 * 2 * 2 + 2)
    head = 2 * 1 + 1
    assert small.count_params() == enc + bottom + up + dec + head


def test_invalid_arguments_are_quoted():
    with pytest.raises(ValueError, match="1"):
        UNet(depth=1)
    with pytest.raises(ValueError, match="1.5"):
        UNet(dropout=1.5)


def test_save_and_reload_give_identical_predictions(tmp_path):
    model = UNet(depth=3, base_filters=4, transpose_conv=True, dropout=0.1, num_classes=3)
    x = np.random.default_rng(1).random((1, 32, 32, 1)).astype("float32")
    assert isinstance(assert_reload_identical(model, x, tmp_path), UNet)
