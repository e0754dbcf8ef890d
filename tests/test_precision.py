"""--precision=bfloat16: a copy of the model computing in bfloat16 with the float32 weights
(retina_tf.inference.computing_in), in Segmenter, the commands' flags and export."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_tf.config import ExportConfig
from retina_tf.data.io import read_image
from retina_tf.errors import ConfigError
from retina_tf.export import export_model
from retina_tf.flags import parse_config
from retina_tf.inference import Segmenter, computing_in, cpu_flags, resolve_precision
from retina_tf.models import build_model


@pytest.mark.parametrize("arch,kwargs", [
    ("unet", dict(depth=2, base_filters=4)),
    ("ddrnet", dict(planes=4, spp_planes=8, head_planes=8)),
])
def test_the_bfloat16_copy_computes_in_bfloat16_and_leaves_the_model_alone(arch, kwargs):
    keras.utils.set_random_seed(0)
    model = build_model(arch, **kwargs)
    copy = computing_in(model, "bfloat16")
    assert computing_in(model, "float32") is model
    assert type(copy) is type(model) and copy.size_multiple == model.size_multiple
    assert {v.dtype for v in copy.weights} == {"float32"}
    for a, b in zip(copy.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    convs = [layer for layer in copy._flatten_layers() if isinstance(layer, keras.layers.Conv2D)]
    assert convs and {layer.compute_dtype for layer in convs} == {"bfloat16"}
    assert {layer.compute_dtype for layer in model._flatten_layers()} == {"float32"}

    x = np.random.default_rng(0).random((1, 64, 64, 1)).astype("float32")
    exact = keras.ops.convert_to_numpy(model(x, training=False))
    approx = keras.ops.convert_to_numpy(copy(x, training=False)).astype("float32")
    assert approx.shape == exact.shape
    # bfloat16 keeps 8 bits of mantissa: about 2-3 significant digits
    assert 0 < np.abs(approx - exact).max() < 0.05 * (np.abs(exact).max() + 1)
    with pytest.raises(ConfigError, match="--precision=float16: choose one of"):
        computing_in(model, "float16")


def test_bfloat16_segments_a_drive_photograph_as_float32_does(shared_data):
    # a 224 px crop in the FOV: TensorFlow emulates bfloat16 where the CPU lacks AVX512-BF16
    image = read_image(shared_data / "DRIVE" / "test" / "images" / "01_test.tif")[200:424, 180:404]
    f32 = Segmenter.from_pretrained("unet_drive")
    bf16 = Segmenter.from_pretrained("unet_drive", precision="bfloat16")
    assert (f32.precision, bf16.precision) == ("float32", "bfloat16")
    # bfloat16 runs the network with its batch norms folded into the convolutions
    assert f32.network is f32.model
    assert not [layer for layer in bf16.network.layers
                if isinstance(layer, keras.layers.BatchNormalization)]
    assert {layer.compute_dtype for layer in bf16.network.layers
            if isinstance(layer, keras.layers.Conv2D)} == {"bfloat16"}
    p32, p16 = f32.probability(image), bf16.probability(image)
    assert p16.dtype == np.float32 and p16.shape == p32.shape
    assert np.abs(p16 - p32).mean() < 0.01
    assert np.mean((p16 >= 0.5) == (p32 >= 0.5)) > 0.995
    assert 0.05 < np.mean(p32 >= 0.5) < 0.3  # vessels there to agree on


def test_a_bfloat16_segmenter_copies_the_whole_model_only_when_asked_for(monkeypatch):
    """The folded network is the forward pass's own copy; ``Segmenter.model``, the whole model
    in bfloat16, is made on first use, eagerly also when first used inside a traced function."""
    import retina_tf.inference as inference
    keras.utils.set_random_seed(0)
    model = build_model("unet", depth=2, base_filters=4)
    copies, copy = [], inference._bfloat16_copy
    monkeypatch.setattr(inference, "_bfloat16_copy", lambda m: copies.append(m) or copy(m))
    seg = Segmenter(model, None, model.size_multiple, precision="bfloat16")
    assert copies == [] and seg.network is not model
    x = np.random.default_rng(0).random((1, 16, 16, 1)).astype("float32")
    folded = keras.ops.convert_to_numpy(seg._forward(x))
    traced = keras.ops.convert_to_numpy(
        tf.function(lambda t: seg.model(t, training=False))(x)).astype("float32")
    assert copies == [model] and seg.model is seg.model  # made once, in the trace
    assert {v.dtype for v in seg.model.weights} == {"float32"}
    assert {layer.compute_dtype for layer in seg.model._flatten_layers()
            if isinstance(layer, keras.layers.Conv2D)} == {"bfloat16"}
    np.testing.assert_allclose(folded, keras.ops.sigmoid(traced), atol=0.02)


def test_emulated_bfloat16_is_said_once_per_segmenter(monkeypatch, caplog):
    """The folded network and the whole model are two bfloat16 copies of one choice."""
    import retina_tf.inference as inference
    monkeypatch.setattr(inference, "native_bfloat16", lambda *args: False)
    model = build_model("unet", depth=2, base_filters=4)
    seg = Segmenter(model, None, model.size_multiple, precision="bfloat16")
    assert seg.model is not seg.network  # both copies made
    said = [r for r in caplog.records if "TensorFlow emulates it" in r.getMessage()]
    assert len(said) == 1
    computing_in(model, "bfloat16")  # a choice of its own
    assert len([r for r in caplog.records if "TensorFlow emulates it" in r.getMessage()]) == 2


def test_the_precision_flag_reaches_the_commands():
    for script in ("evaluate", "predict", "compare"):
        assert parse_config(script, ["--precision=bfloat16"]).precision == "bfloat16"
        assert parse_config(script, []).precision == "auto"
    cfg = parse_config("export_model", ["--run=unet_drive", "--out=e", "--precision=bfloat16"])
    assert cfg.precision == "bfloat16"
    with pytest.raises(ConfigError, match="--precision=bfloat16 is for --format=saved_model"):
        export_model(ExportConfig(run="unet_drive", out="e", format="onnx",
                                  precision="bfloat16"))


def test_auto_computes_in_bfloat16_only_where_the_cpu_has_it_natively_and_it_pays():
    sapphire_rapids = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    zen4 = {"avx512f", "avx512_bf16"}
    unet = build_model("unet", depth=2, base_filters=4)
    ddrnet = build_model("ddrnet", planes=4, spp_planes=8, head_planes=8)  # not measured faster
    assert resolve_precision("auto", unet, sapphire_rapids) == "bfloat16"
    assert resolve_precision("auto", None, sapphire_rapids) == "bfloat16"
    assert resolve_precision("auto", ddrnet, sapphire_rapids) == "float32"
    assert resolve_precision("auto", unet, zen4) == "bfloat16"
    assert resolve_precision("auto", ddrnet, zen4) == "float32"
    assert resolve_precision("auto", unet, {"avx2", "fma"}) == "float32"
    assert resolve_precision("auto", unet, set()) == "float32"
    for explicit in ("float32", "bfloat16"):
        assert resolve_precision(explicit, ddrnet, zen4) == explicit
    with pytest.raises(ConfigError, match="--precision=fp16: choose one of auto, float32"):
        resolve_precision("fp16")
    seg = Segmenter.from_pretrained("unet_drive", precision="auto")
    native = cpu_flags() & {"amx_bf16", "avx512_bf16"}
    assert seg.precision == ("bfloat16" if native else "float32")
    assert Segmenter.from_pretrained("ripav_rite", precision="auto").precision == "float32"
