"""Exports that leave retina_tf (retina_tf.export, bin/export_model.py): each format against
retina_tf's own inference of the same run.

The quick tests export a tiny untrained U-Net written as a run folder (an export must reproduce
whatever the weights compute); the shipped models' exports are slow-marked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from retina_tf.config import ExportConfig
from retina_tf.data.fov import estimate_fov
from retina_tf.data.io import read_image
from retina_tf.data.patches import pad_to_multiple
from retina_tf.data.preprocess import Preprocessor
from retina_tf.data.synthetic import generate_fundus
from retina_tf.errors import ConfigError, ModelFileError
from retina_tf.export import (
    _check_onnx_output,
    _network_specs,
    _Serving,
    _squeeze_added_axis,
    deployer_notes,
    export_model,
    run_threshold,
)
from retina_tf.flags import parse_config
from retina_tf.inference import Segmenter, fov_diameter
from retina_tf.models import build_model
from retina_tf.run_folder import find_run
from tests import commands

REPO = Path(__file__).resolve().parents[1]
DEPLOY_DOC = REPO / "docs" / "deploy.md"


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return commands.script("export_model.py", *args, cwd=REPO,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=600)


def _write_run(folder: Path, model: keras.Model, steps: str, info: dict) -> Path:
    """A run folder as training leaves it (model, preprocessor fitted on synthetic
    photographs, run.json, flags.txt with --threshold=0.4)."""
    folder.mkdir(parents=True)
    images = [generate_fundus(i, size=(96, 96)).image for i in range(3)]
    Preprocessor.from_steps(steps).fit(images).save(folder / "preprocessor.json")
    model.save(folder / "model.keras")
    diameter = float(np.median([fov_diameter(estimate_fov(im)) for im in images]))
    (folder / "run.json").write_text(json.dumps({
        "size_multiple": model.size_multiple, "patch_size": 32,
        "fully_convolutional": model.fully_convolutional, "fov_diameter": diameter, **info}))
    (folder / "flags.txt").write_text("--threshold=0.4\n")
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """An untrained two-level U-Net of width 4 (size multiple 2), "trained" on DRIVE."""
    keras.utils.set_random_seed(0)
    model = build_model("unet", depth=2, base_filters=4)
    return _write_run(tmp_path_factory.mktemp("runs") / "tiny", model,
                      "grayscale,standardize,clahe,gamma",
                      {"model": "unet", "task": "vessel", "dataset": "drive", "num_classes": 1})


@pytest.fixture(scope="module")
def tiny_saved_model(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "tiny_sm"
    export_model(ExportConfig(run=str(tiny_run), format="saved_model", out=str(out)))
    return out


def _tflite_interpreter(path: Path):
    """LiteRT's interpreter where installed, else TensorFlow's (deprecated, still there)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter  # noqa: N806
    return Interpreter(model_path=str(path))


def _network_output(seg: Segmenter, x: np.ndarray) -> np.ndarray:
    return tf.sigmoid(seg.model(x, training=False)).numpy()


def _drive_input(shared_data: Path, seg: Segmenter) -> np.ndarray:
    """DRIVE's first test photograph preprocessed by the run and padded: the network's input."""
    image = read_image(shared_data / "DRIVE" / "test" / "images" / "01_test.tif")
    return pad_to_multiple(seg.preprocessor(image), seg.size_multiple)[None]


def test_the_fov_estimate_followed_from_the_recipe_is_retina_tfs(shared_data):
    """export.json named the FOV estimate's module only: a deployer of the network alone had
    to guess it (a guess resized a CHASE_DB1 photograph to 587 px wide where retina_tf does
    591, flipping 0.55 % of the mask)."""
    from retina_tf.export import FOV_RECIPE
    number = r"([\d.]+)"
    gap, ratio, edge = (float(re.search(pattern, FOV_RECIPE)[1]) for pattern in (
        rf"retina - frame < {number}", rf"frame > {number} retina", rf"frame \+ {number} "))
    ellipse = functools.partial(cv2.getStructuringElement, cv2.MORPH_ELLIPSE)
    for path in (shared_data / "DRIVE" / "test" / "images" / "01_test.tif",
                 shared_data / "samples" / "CHASE_DB1" / "Image_01L.jpg"):
        image = read_image(path)
        r = cv2.medianBlur(image[..., 0], 5)  # as the recipe says, step by step
        t = int(cv2.threshold(r, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0])
        c = np.cumsum(np.bincount(r.ravel(), minlength=256))
        frame, retina = np.argmax(c >= c[t] / 2), np.argmax(c >= c[t] + (c[-1] - c[t]) / 2)
        assert retina - frame >= gap and frame <= ratio * retina  # a dark frame
        m = cv2.morphologyEx((r > frame + edge * (retina - frame)).astype(np.uint8),
                             cv2.MORPH_OPEN, ellipse((5, 5)))
        contours = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
        fov = cv2.drawContours(np.zeros_like(m), [max(contours, key=cv2.contourArea)], -1, 1,
                               cv2.FILLED)
        np.testing.assert_array_equal(cv2.erode(fov, ellipse((7, 7))) > 0, estimate_fov(image))


# --- flags --------------------------------------------------------------------------------------

def test_the_flags_build_the_export_config():
    cfg = parse_config("export_model", ["--run=unet_drive", "--format=onnx", "--out=e"])
    assert cfg == ExportConfig(run="unet_drive", format="onnx", out="e", threshold=None)
    # the older flag names still work; --threshold only when given
    cfg = parse_config("export_model", ["--run_dir=logs/a", "--out_dir=b", "--threshold=0.3"])
    assert (cfg.run, cfg.out, cfg.format, cfg.threshold) == ("logs/a", "b", "keras", 0.3)
    with pytest.raises(ConfigError, match="--run and --run_dir"):
        parse_config("export_model", ["--run=a", "--run_dir=b", "--out=c"])
    with pytest.raises(flags.IllegalFlagValueError, match="HEIGHTxWIDTH"):
        parse_config("export_model", ["--run=a", "--out=c", "--input_size=592"])
    with pytest.raises(flags.IllegalFlagValueError, match="format"):
        parse_config("export_model", ["--run=a", "--out=c", "--format=pb"])


def test_missing_run_or_out_is_an_error_naming_them():
    with pytest.raises(ConfigError, match="--run and --out are required"):
        export_model(ExportConfig(format="onnx"))


# --- keras: the copy the shipped models are made with ------------------------------------------

def test_keras_format_with_the_older_flag_names_copies_a_loadable_run(tiny_run, tmp_path):
    out = tmp_path / "copy"
    proc = _run_script(f"--run_dir={tiny_run}", f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "README.txt", "export.json", "flags.txt", "model.keras", "preprocessor.json", "run.json"]
    assert json.loads((out / "export.json").read_text())["format"] == "keras"
    image = generate_fundus(5, size=(96, 96)).image
    np.testing.assert_array_equal(Segmenter.from_run(out).probability(image),
                                  Segmenter.from_run(tiny_run).probability(image))
    # as every format: an existing folder only with --overwrite, never the run folder itself
    before = (out / "model.keras").read_bytes()
    proc = _run_script(f"--run={tiny_run}", f"--out={out}")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "model.keras").read_bytes() == before
    for target in (tiny_run, tiny_run.parent):
        with pytest.raises(ConfigError, match="is the run folder or holds it"):
            export_model(ExportConfig(run=str(tiny_run), out=str(target), overwrite=True))
    assert (tiny_run / "model.keras").is_file()
    with pytest.raises(ConfigError, match="--threshold is for --format=saved_model"):
        export_model(ExportConfig(run=str(tiny_run), out=str(tmp_path / "t"), threshold=0.3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temporary left


# --- SavedModel ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_saved_model_segments_a_photograph_as_segmenter_does(tiny_run, tiny_saved_model):
    loaded = tf.saved_model.load(str(tiny_saved_model))
    seg = Segmenter.from_run(tiny_run)
    info = json.loads((tiny_saved_model / "export.json").read_text())
    assert info["threshold"] == run_threshold(tiny_run) == 0.4
    assert info["preprocessing"]["settings"] == seg.preprocessor.get_config()
    assert "serving_default" in (tiny_saved_model / "README.txt").read_text()

    sample = generate_fundus(8, size=(101, 90))  # odd sizes: padding and cropping
    out = loaded.signatures["serving_default"](image=tf.constant(sample.image))
    prob, mask = seg.segment(sample.image, threshold=0.4)
    assert out["probability"].shape == sample.image.shape[:2] and out["mask"].dtype == tf.uint8
    np.testing.assert_allclose(out["probability"].numpy(), prob[..., 0], atol=1e-5)
    np.testing.assert_array_equal(out["mask"].numpy(), mask[..., 0])

    # a given FOV (here the synthetic one, not the estimate) is used as given
    fov = sample.fov.astype(np.uint8) * 255
    out = loaded.signatures["segment_with_fov"](image=tf.constant(sample.image),
                                                fov=tf.constant(fov))
    prob, mask = seg.segment(sample.image, sample.fov, threshold=0.4)
    np.testing.assert_allclose(out["probability"].numpy(), prob[..., 0], atol=1e-5)
    np.testing.assert_array_equal(out["mask"].numpy(), mask[..., 0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="the FOV mask is empty"):
        loaded.signatures["segment_with_fov"](image=tf.constant(sample.image),
                                              fov=tf.constant(np.zeros_like(fov)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"fov must be one mask, uint8 "
                                                              r"\[height, width\] \(one channel"):
        loaded.signatures["segment_with_fov"](image=tf.constant(sample.image),
                                              fov=tf.constant(fov[..., None]))

    # a photograph at 1.8x the training scale is segmented at the training scale; TensorFlow's
    # area resize differs from OpenCV's by a grey level at a few pixels
    big = generate_fundus(9, size=(180, 170)).image
    assert fov_diameter(estimate_fov(big)) / seg.run_info["fov_diameter"] > 1.2
    out = loaded.signatures["serving_default"](image=tf.constant(big))
    prob, mask = seg.segment(big, threshold=0.4)
    diff = np.abs(out["probability"].numpy() - prob[..., 0])
    assert diff.mean() < 5e-3, diff.mean()
    assert np.mean(out["mask"].numpy() != mask[..., 0]) < 0.01
    unscaled = seg.probability(big)[..., 0] * estimate_fov(big)
    assert np.abs(out["probability"].numpy() - unscaled).mean() > 10 * diff.mean()

    noise = np.random.default_rng(0).integers(0, 256, (20, 40, 3), np.uint8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="too small"):
        loaded.signatures["serving_default"](image=tf.constant(noise))
    # what predict refuses, refused with a message saying why (a batch failed as "too small",
    # a gray photograph at a strided slice; RGBA and a flat colour were segmented in silence)
    for image, said in ((sample.image[None], "not a batch"),
                        (sample.image[..., 0], "a gray one as 3 equal channels"),
                        (np.dstack([sample.image, sample.image[..., :1]]), "without its alpha"),
                        (np.full((96, 96, 3), 255, np.uint8), "one flat colour")):
        for name in ("serving_default", "preprocess"):
            with pytest.raises(tf.errors.InvalidArgumentError, match=said):
                loaded.signatures[name](image=tf.constant(image))
    multiple = info["preprocessing"]["size_multiple"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"multiples of {multiple}"):
        loaded.signatures["network"](image=tf.zeros((1, 2 * multiple + 1, 2 * multiple,
                                                     seg.preprocessor.channels)))


def test_an_export_for_serving_given_as_a_run_is_named_as_one(tiny_saved_model):
    # it said "not a complete run ... (or one written by bin/export_model.py)", which it was
    with pytest.raises(ModelFileError, match=r"--model=\S+: \S+tiny_sm is a saved_model export "
                       r"of tiny \(export.json\), for serving without retina_tf"):
        find_run(tiny_saved_model, flag="--model")
    with pytest.raises(ModelFileError, match="is a saved_model export of tiny"):
        Segmenter.from_run(tiny_saved_model)


@pytest.mark.slow
def test_a_bfloat16_saved_model_keeps_float32_weights_and_segments_alike(tiny_run, tmp_path):
    out = tmp_path / "bf16"
    export_model(ExportConfig(run=str(tiny_run), format="saved_model", out=str(out),
                              precision="bfloat16"))
    assert json.loads((out / "export.json").read_text())["precision"] == "bfloat16"
    dtypes = tf.train.load_checkpoint(str(out / "variables" / "variables")
                                      ).get_variable_to_dtype_map()
    assert {d for name, d in dtypes.items() if "kernel" in name} == {tf.float32}
    loaded = tf.saved_model.load(str(out))
    image = generate_fundus(8, size=(101, 90)).image
    prob = loaded.signatures["serving_default"](image=tf.constant(image))["probability"].numpy()
    exact = Segmenter.from_run(tiny_run).segment(image, threshold=0.4)[0][..., 0]
    assert 0 < np.abs(prob - exact).max() < 0.02  # computed in bfloat16, not float32


@pytest.mark.slow
def test_a_runs_flips_are_averaged_in_its_saved_model_as_predict_averages_them(tiny_run,
                                                                                 tmp_path):
    """The SavedModel of a run that segments with test-time augmentation by default
    (vessel_general, the A/V models) gave other probabilities than predict: one view."""
    run = tmp_path / "tta_run"
    shutil.copytree(tiny_run, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "tta": True, "tta_transpose": True}))
    image = generate_fundus(8, size=(101, 90)).image  # not square: transposed views differ
    views = Segmenter.from_run(run).probability(image)
    assert np.abs(views - Segmenter.from_run(run, tta=False).probability(image)).max() > 1e-3
    out = tmp_path / "export"
    export_model(ExportConfig(run=str(run), format="saved_model", out=str(out)))
    described = json.loads((out / "export.json").read_text())
    assert described["test_time_augmentation"] == "8 flips and transposes"
    got = tf.saved_model.load(str(out)).signatures["serving_default"](image=tf.constant(image))
    prob, mask = Segmenter.from_run(run).segment(image, threshold=0.4)
    np.testing.assert_allclose(got["probability"].numpy(), prob[..., 0], atol=1e-5)
    np.testing.assert_array_equal(got["mask"].numpy(), mask[..., 0])
    # a deployer is told to add the flips only where the export lacks them (--notta)
    assert not any("flips" in note for note in described["deployer_must_add"])
    assert any("flips" in note for note in deployer_notes(Segmenter.from_run(run, tta=False),
                                                          "saved_model"))
    # and to add the transposes to a SavedModel of the flips alone (--notta_transpose)
    four = deployer_notes(Segmenter.from_run(run, tta_transpose=False), "saved_model")
    assert any("on the transposed photograph too" in note for note in four), four
    # the network alone holds no views: its notes list them, and --tta is refused
    assert any("flips" in note for note in deployer_notes(Segmenter.from_run(run), "onnx"))
    with pytest.raises(ConfigError, match="--tta is for --format=saved_model only"):
        export_model(ExportConfig(run=str(run), format="onnx", out=str(tmp_path / "o"),
                                  tta=True))


def test_the_export_folder_is_replaced_only_with_overwrite(tiny_run, tmp_path):
    out = tmp_path / "export"
    export_model(ExportConfig(run=str(tiny_run), format="tflite", out=str(out),
                              input_size="32x32"))
    before = (out / "model.tflite").read_bytes()
    with pytest.raises(ConfigError, match="--overwrite"):
        export_model(ExportConfig(run=str(tiny_run), format="tflite", out=str(out),
                                  input_size="64x64"))
    assert (out / "model.tflite").read_bytes() == before
    export_model(ExportConfig(run=str(tiny_run), format="tflite", out=str(out),
                              input_size="64x64", overwrite=True))
    assert json.loads((out / "export.json").read_text())["input_size"] == [64, 64]
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "export.json",
                                                      "model.tflite"]
    # no temporary or old folder is left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["export"]



def test_overwrite_replaces_only_an_earlier_export(tiny_run, tmp_path, monkeypatch):
    """--overwrite deleted whatever the folder held (a project's sources, a training run)."""
    mine = tmp_path / "project"
    (mine / "src").mkdir(parents=True)
    (mine / "src" / "important.py").write_text("keep me\n")
    logdir = tmp_path / "logs"
    shutil.copytree(tiny_run, logdir / "other_run")
    for out, held in ((mine, "src, not an earlier export"),
                      (logdir / "other_run", "a training run, not an earlier export")):
        with pytest.raises(ConfigError, match=rf"^--out={re.escape(str(out))} holds {held}: "
                                              "--overwrite replaces only an export"):
            export_model(ExportConfig(run=str(tiny_run), out=str(out), overwrite=True))
    assert (mine / "src" / "important.py").read_text() == "keep me\n"
    assert (logdir / "other_run" / "model.keras").is_file()
    monkeypatch.chdir(mine)
    with pytest.raises(ConfigError, match=r"^--out=\. is the current folder or holds it"):
        export_model(ExportConfig(run=str(tiny_run), out="."))
    (tmp_path / "empty").mkdir()
    export_model(ExportConfig(run=str(tiny_run), out=str(tmp_path / "empty"), overwrite=True))
    assert (tmp_path / "empty" / "export.json").is_file()


# --- the network alone: ONNX, TFLite ----------------------------------------------------------

def test_onnx_network_matches_keras_on_a_drive_image(tiny_run, shared_data, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    export_model(ExportConfig(run=str(tiny_run), format="onnx", out=str(out)))
    assert "a deployer must add: (1) everything around the network" in capsys.readouterr().out
    seg = Segmenter.from_run(tiny_run)
    # the preprocessing a deployer reproduces from export.json is the run's
    info = json.loads((out / "export.json").read_text())
    pre = Preprocessor.from_config(info["preprocessing"]["settings"])
    x = _drive_input(shared_data, seg)
    np.testing.assert_array_equal(pad_to_multiple(pre(read_image(
        shared_data / "DRIVE" / "test" / "images" / "01_test.tif")), 2)[None], x)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    (prob,) = session.run(["probability"], {"image": x})
    assert prob.shape == x.shape
    assert np.abs(prob - _network_output(seg, x)).max() <= 1e-4


def _slipped_onnx(declared_leading: int = 1):
    """A one-channel network's tail as tf2onnx 1.17 sometimes leaves it: the NHWC transpose as
    a reshape to [1, N, H, W, 1] whose squeeze of the first axis was dropped."""
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Reshape", ["nchw", "shape"], ["probability"])]
    shape = onnx.numpy_helper.from_array(np.array([1, -1, 0, 0, 1], np.int64), "shape")
    graph = helper.make_graph(
        nodes, "slipped",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", "H", "W", 1])],
        [helper.make_tensor_value_info("probability", onnx.TensorProto.FLOAT,
                                       [declared_leading, "N", "H", "W", 1])], [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_squeeze_tf2onnx_drops_is_put_back():
    ort = pytest.importorskip("onnxruntime")
    proto = _slipped_onnx()
    x = np.random.default_rng(0).random((2, 5, 6, 1)).astype(np.float32)
    before = ort.InferenceSession(proto.SerializeToString()).run(["probability"], {"image": x})
    assert before[0].shape == (1, 2, 5, 6, 1)  # the slip as it reaches a deployer
    _squeeze_added_axis(proto)
    (after,) = ort.InferenceSession(proto.SerializeToString()).run(["probability"], {"image": x})
    np.testing.assert_array_equal(after, x)
    assert len(proto.graph.output[0].type.tensor_type.shape.dim) == 4


def test_an_onnx_network_of_the_wrong_shape_is_not_written(tiny_run):
    pytest.importorskip("onnxruntime")
    seg = Segmenter.from_run(tiny_run)
    proto = _slipped_onnx(declared_leading=2)  # not the known slip: left as it is
    _squeeze_added_axis(proto)
    with pytest.raises(ModelFileError, match=r"answers shape \(1, 1, \d+, \d+, 1\).*saved_model"):
        _check_onnx_output(proto, seg, _network_specs(seg, (None, None), None))


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_network_of_builtin_ops_matches_keras_on_a_drive_image(tiny_run, shared_data,
                                                                         tmp_path):
    out = tmp_path / "tflite"
    export_model(ExportConfig(run=str(tiny_run), format="tflite", out=str(out)))
    info = json.loads((out / "export.json").read_text())
    assert info["input_size"] == [584, 566]  # DRIVE's 584 x 565, padded to the multiple 2
    seg = Segmenter.from_run(tiny_run)
    x = _drive_input(shared_data, seg)
    interpreter = _tflite_interpreter(out / "model.tflite")
    prob = interpreter.get_signature_runner()(image=x)["probability"]
    assert prob.shape == (1, 584, 566, 1)
    assert np.abs(prob - _network_output(seg, x)).max() <= 1e-4


def test_tflite_default_size_holds_every_training_photograph_and_its_transpose():
    """vessel_general's default was DRIVE's alone (its STARE photographs did not fit) and
    ripav_general's 592 x 576 (its transposed views, which its notes say to average, did
    not)."""
    from retina_tf.export import _recipe, tflite_input_size
    segs = {name: Segmenter.from_pretrained(name)
            for name in ("unet_drive", "vessel_general", "ripav_general")}
    sizes = {name: tflite_input_size(seg, None) for name, seg in segs.items()}
    # DRIVE 584 x 565; STARE 605 x 700; each padded to the model's multiple (8, 8, 16)
    assert sizes == {"unet_drive": (584, 568), "vessel_general": (608, 704),
                     "ripav_general": (592, 592)}
    # the recipe pads to that size, and says how an A/V mask pixel is artery or vein
    steps = _recipe(segs["ripav_general"], [592, 592])
    assert "zero-pad at the bottom and right to the network's fixed input, 592 x 592" in \
        steps[-2] and "artery where the artery probability >= the vein" in steps[-1]
    assert "multiples of 8, run the network" in _recipe(segs["unet_drive"])[-2]


def test_a_tflite_input_size_off_the_size_multiple_is_refused(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="multiples of 2"):
        export_model(ExportConfig(run=str(tiny_run), format="tflite", out=str(tmp_path / "t"),
                                  input_size="585x566"))
    with pytest.raises(ConfigError, match="tflite only"):
        export_model(ExportConfig(run=str(tiny_run), format="onnx", out=str(tmp_path / "o"),
                                  input_size="584x566"))
    assert not any(tmp_path.iterdir())


# --- models no format holds whole ---------------------------------------------------------------

@pytest.mark.slow
def test_context_and_sliding_window_models_export_what_they_can(tmp_path):
    """RIP-AV with its whole-image context input: the SavedModel is its whole inference, the
    ONNX network takes the context as a second input. A ViT (fixed windows): the SavedModel
    slides the windows itself."""
    ort = pytest.importorskip("onnxruntime")
    keras.utils.set_random_seed(1)
    ripav = _write_run(tmp_path / "ripav", build_model(
        "rip_av", widths=(8, 8, 16, 16, 16), depths=(1, 1, 1, 1), context_size=32),
        "standardize,clahe,gamma",
        {"model": "rip_av", "task": "av", "dataset": "rite", "num_classes": 3})
    vit = _write_run(tmp_path / "vit", build_model(
        "vit_seg", image_size=32, patch_size=8, dim=32, depth=2, num_heads=2),
        "grayscale,standardize,clahe,gamma",
        {"model": "vit_seg", "task": "vessel", "dataset": "drive", "num_classes": 1})
    image = generate_fundus(4, size=(100, 90)).image
    # the same RIP-AV served in windows (a run with fully_convolutional false): the windows
    # share the context, encoded once (run eagerly here; the saving is tested below)
    windows = Segmenter.from_run(ripav, inference="sliding", window=32, stride=16)
    np.testing.assert_allclose(_Serving(windows, 0.4)._probability(tf.constant(image)).numpy(),
                               windows.probability(image), atol=1e-5)
    for run in (ripav, vit):
        out = tmp_path / f"{run.name}_sm"
        export_model(ExportConfig(run=str(run), format="saved_model", out=str(out)))
        got = tf.saved_model.load(str(out)).signatures["serving_default"](
            image=tf.constant(image))
        prob, mask = Segmenter.from_run(run).segment(image, threshold=0.4)
        np.testing.assert_allclose(got["probability"].numpy().reshape(prob.shape), prob,
                                   atol=1e-5)
        np.testing.assert_array_equal(got["mask"].numpy(), mask[..., -1])

    seg = Segmenter.from_run(ripav)
    assert any("'context'" in note for note in deployer_notes(seg, "onnx"))
    assert not any("'context'" in note for note in deployer_notes(seg, "saved_model"))
    export_model(ExportConfig(run=str(ripav), format="onnx", out=str(tmp_path / "ripav_onnx")))
    session = ort.InferenceSession(str(tmp_path / "ripav_onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = pad_to_multiple(seg.preprocessor(image), seg.size_multiple)[None]
    context = seg.model.context_of(tf.constant(x[:, :100, :90]))
    (prob,) = session.run(["probability"], {"image": x, "context": context.numpy()})
    expected = seg.model({"image": x, "context": context}, training=False)["logits"]
    assert np.abs(prob - tf.sigmoid(expected).numpy()).max() <= 1e-4


# --- the shipped models ---------------------------------------------------------------------------

# Runs with TensorFlow and NumPy from site-packages but nothing else: no retina_tf (its
# editable install is a .pth file, which -S leaves unread), no repository on the path.
_FRESH = """
import sys
sys.path.append(sys.argv[1])
try:
    import retina_tf
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("retina_tf is importable")
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[2]).signatures["serving_default"]
for path in sys.argv[3:]:
    out = serve(image=tf.constant(np.load(path)))
    np.save(path[:-4] + "_prob.npy", out["probability"].numpy())
    np.save(path[:-4] + "_mask.npy", out["mask"].numpy())
print("ok")
"""


@pytest.mark.slow
def test_shipped_unet_saved_model_runs_without_retina_tf(shared_data, tmp_path):
    out = tmp_path / "unet_drive" / "1"
    export_model(ExportConfig(run="unet_drive", format="saved_model", out=str(out)))
    seg = Segmenter.from_pretrained("unet_drive")
    names = ["01_test", "02_test"]
    for name in names:
        np.save(tmp_path / f"{name}.npy",
                read_image(shared_data / "DRIVE" / "test" / "images" / f"{name}.tif"))
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _FRESH, sysconfig.get_paths()["purelib"], str(out),
         *(str(tmp_path / f"{n}.npy") for n in names)],
        cwd=tmp_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "ok"
    for name in names:
        prob, mask = seg.segment(np.load(tmp_path / f"{name}.npy"))  # the run's threshold
        exported = np.load(tmp_path / f"{name}_prob.npy")
        assert exported.shape == (584, 565)
        assert np.abs(exported - prob[..., 0]).max() <= 1e-3
        assert np.mean(np.load(tmp_path / f"{name}_mask.npy") != mask[..., 0]) < 1e-4


@pytest.mark.slow
def test_shipped_av_model_exports_to_saved_model_and_says_what_it_lacks(tmp_path):
    out = tmp_path / "ripav"
    proc = _run_script("--run=ripav_rite", "--format=saved_model", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    note = next(line for line in proc.stdout.splitlines() if line.startswith("note: "))
    assert "vote_av_segments" in note and "flips" not in note  # the views are in the graph
    assert note in " ".join(DEPLOY_DOC.read_text().split())  # the same words in the docs
    info = json.loads((out / "export.json").read_text())
    assert info["channels"] == ["artery", "vein", "vessel"] and info["deployer_must_add"]
    assert info["test_time_augmentation"] == "8 flips and transposes"
    # the shares behind predict's warnings, for a service that wants them
    run_info = Segmenter.from_pretrained("ripav_rite").run_info
    assert info["training_labels"] == {key: run_info[key]
                                       for key in ("vessel_share", "artery_share")}
    assert info["training_images"] == {"bright_line_ratio": run_info["bright_line_ratio"]}
    readme = (out / "README.txt").read_text()
    assert "artery_share_warning" in readme and "bright_vessels_warning" in readme
    assert "channel_order_warning" in readme
    image = generate_fundus(2, size=(128, 128)).image
    got = tf.saved_model.load(str(out)).signatures["serving_default"](image=tf.constant(image))
    assert got["probability"].shape == (128, 128, 3) and got["mask"].shape == (128, 128)
    prob, _ = Segmenter.from_pretrained("ripav_rite", av_vote=False).segment(image)
    np.testing.assert_allclose(got["probability"].numpy(), prob, atol=1e-5)


def test_a_terminated_export_leaves_nothing_behind(tmp_path):
    # SIGTERM (kill, timeout, docker stop) cleans up as Ctrl-C does: the temporary folder goes
    out = tmp_path / "exports" / "unet_drive"
    for _ in range(3):  # an export that finished before the signal came proves nothing: again
        command = commands.Command([sys.executable, REPO / "bin" / "export_model.py",
                                    "--run=unet_drive", "--format=saved_model", f"--out={out}"],
                                   cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            while not list(out.parent.glob(".*.tmp")) and command.poll() is None:
                assert time.monotonic() < deadline, "the export never started writing"
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError):  # it may have ended already
                os.kill(command.pid, signal.SIGTERM)
            code = command.wait(120)
            if code == 0 and out.is_dir():
                shutil.rmtree(out)
                continue
            assert code == 143, command.stderr()[-2000:]
            assert command.stderr().strip().endswith("export_model.py: terminated")
            break
        finally:
            command.close()
    else:
        pytest.fail("the export finished before SIGTERM reached it, three times")
    assert list(out.parent.iterdir()) == []
