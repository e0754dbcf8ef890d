"""Evaluate and predict CLIs on tiny synthetic data, and the inference helpers."""

import gzip
import json
import logging
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from retina_tf.config import EvalConfig
from retina_tf.data.io import DatasetError, read_image, read_sample
from retina_tf.data.patches import extract_patches, recompose_patches
from retina_tf.data.synthetic import generate_fundus, write_synthetic_dataset
from retina_tf.errors import ConfigError, ModelFileError
from retina_tf.evaluation import evaluate
from retina_tf.flags import parse_config
from retina_tf.inference import Segmenter, sliding_window_predict
from retina_tf.run_folder import find_run
from retina_tf.training import train
from tests import commands

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = write_synthetic_dataset(root / "syn", num_images=6, num_test=2, seed=5, size=(96, 96))
    cfg = parse_config("train", [
        "--dataset=synthetic", f"--data_dir={data}", f"--logdir={root / 'logs'}",
        "--run_name=tiny", "--depth=3", "--base_filters=8", "--patch_size=32",
        "--batch_size=8", "--patches_per_epoch=128", "--epochs=3", "--val_images=1",
        "--learning_rate=0.005"])
    return data, train(cfg)


def _run(script, *args):
    return commands.script(script, *args)


def test_sliding_window_of_an_identity_model_returns_the_image():
    x = np.random.default_rng(0).random((50, 70, 1)).astype(np.float32)
    out = sliding_window_predict(tf.function(lambda t: t), x, window=16, stride=5, batch_size=7)
    np.testing.assert_allclose(out, x, rtol=1e-6)


def test_whole_and_sliding_inference_agree_inside_the_image(trained):
    _, run = trained
    whole = Segmenter.from_run(run, inference="whole")
    sliding = Segmenter.from_run(run, inference="sliding", window=64, stride=16)
    image = generate_fundus(11, (96, 96)).image
    a, b = whole.probability(image), sliding.probability(image)
    assert a.shape == b.shape == (96, 96, 1)
    # same network, different borders: the maps agree closely, not exactly
    assert np.mean(np.abs(a - b)) < 0.05


def test_sliding_windows_in_flight_equal_one_window_at_a_time(trained):
    _, run = trained
    seg = Segmenter.from_run(run, inference="sliding", window=32, stride=12, batch_size=4)
    x = seg.preprocessor(generate_fundus(12, (70, 90)).image)
    # the reference: each window through the model alone, overlaps averaged
    patches, positions = extract_patches(x, 32, 12)
    alone = [seg._forward(tf.constant(p[None])).numpy()[0] for p in patches]
    expected = recompose_patches(np.stack(alone), positions, x.shape[:2])
    assert len(patches) % 4  # the last batch is filled up with blank windows
    for in_flight in (1, 2, 4):
        seg.batches_in_flight = in_flight
        np.testing.assert_allclose(seg.probability_preprocessed(x), expected, atol=1e-6)


def test_sliding_windows_share_a_tensor_given_once():
    x = np.random.default_rng(4).random((40, 50, 2)).astype(np.float32)
    shared = tf.constant([[[[10.0, 20.0]]]])

    def forward(batch, shared):  # each window plus the shared tensor, broadcast
        return batch + shared

    out = sliding_window_predict(forward, x, window=16, stride=6, batch_size=4, shared=shared)
    np.testing.assert_allclose(out, x + [10.0, 20.0], rtol=1e-6)


def test_evaluate_prints_the_table_and_writes_metrics_and_pictures(trained, tmp_path):
    data, run = trained
    proc = _run("evaluate.py", f"--model={run}", "--dataset=synthetic", f"--data_dir={data}",
                "--visualize", f"--output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for word in ("Confusion matrix", "F1 (Dice)", "AUC-ROC", "mIoU"):
        assert word in proc.stdout
    report = json.loads((tmp_path / "metrics.json").read_text())
    m = report["metrics"]
    assert report["images"] == 2 and report["counting"] == "fov"
    assert (report["run"], report["model"]) == (str(run), "unet")  # what was scored
    assert report["environment"]["tensorflow"] == tf.__version__  # what computed the figures
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == m["n_pixels"]
    assert 0.5 < m["auc_roc"] <= 1.0
    for name in ("01_test_prob.png", "01_test_mask.png", "01_test_overlay.png",
                 "roc_curve.png", "pr_curve.png"):
        assert (tmp_path / name).is_file(), name
    overlay = read_image(tmp_path / "01_test_overlay.png")
    assert overlay.shape == (96, 96, 3)
    assert (overlay[..., 1] == 255).any()  # some true positives drawn green
    # evaluation results are also merged into the run's metrics.json
    assert "eval_synthetic_test" in json.loads((run / "metrics.json").read_text())
    assert (report["inference"], report["window"], report["scales"]) == ("whole", None, None)
    whole = _run("evaluate.py", f"--model={run}", "--dataset=synthetic", f"--data_dir={data}",
                 "--whole_image_metrics", f"--output_dir={tmp_path / 'whole'}",
                 "--inference=sliding", "--window=64", "--stride=24")
    assert whole.returncode == 0, whole.stderr[-3000:]
    report = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert report["metrics"]["n_pixels"] == 2 * 96 * 96 > m["n_pixels"]
    # the settings the figures were computed with, as the log says them
    assert (report["inference"], report["window"], report["stride"]) == ("sliding", 64, 24)


def test_evaluate_without_data_scores_the_run_on_its_own_test_split(trained, tmp_path, caplog,
                                                                     monkeypatch):
    data, run = trained
    given = evaluate(EvalConfig(model=str(run), dataset="synthetic", data_dir=str(data),
                                output_dir=str(tmp_path / "given")))
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        own = evaluate(EvalConfig(model=str(run), output_dir=str(tmp_path / "own")))
    said = f"using tiny's own (--dataset=synthetic --data_dir={data}, the test split)"
    assert said in caplog.text
    assert own["images"] == given["images"] == 2 and own["metrics"] == given["metrics"]
    # half a source is not completed, and the missing half is named
    with pytest.raises(ConfigError, match=r"^--dataset=synthetic needs --data_dir: the folder it "
                                          r"is unpacked in \(e.g. --data_dir=data/synthetic\)"):
        evaluate(EvalConfig(model=str(run), dataset="synthetic", output_dir=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match=rf"^--data_dir={data} needs --dataset"):
        evaluate(EvalConfig(model=str(run), data_dir=str(data), output_dir=str(tmp_path / "x")))
    # trained with a relative --data_dir, evaluated from another folder: named, not "missing"
    moved = tmp_path / "logs" / "moved"
    shutil.copytree(run, moved)
    flags_txt = moved / "flags.txt"
    flags_txt.write_text(flags_txt.read_text().replace(f"--data_dir={data}", "--data_dir=syn"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"syn \(the run's, relative to the folder it was "
                                           r"trained from\) is not in .*: run from that folder "
                                           r"or give --data_dir"):
        evaluate(EvalConfig(model=str(moved), output_dir=str(tmp_path / "y")))
    shutil.copytree(data, tmp_path / "syn")  # from the folder it was trained from: found
    assert evaluate(EvalConfig(model=str(moved), output_dir=str(tmp_path / "z")))["images"] == 2


def test_predict_writes_probability_and_mask_of_the_input_size(trained, tmp_path):
    _, run = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "a.jpg"), generate_fundus(21, (96, 96)).image[..., ::-1])
    cv2.imwrite(str(inputs / "b.png"), generate_fundus(22, (120, 110)).image[..., ::-1])
    out = tmp_path / "out"
    proc = _run("predict.py", f"--model={run}", f"--input={inputs}", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = cv2.imread(str(out / "a_prob.png"), cv2.IMREAD_UNCHANGED)
    b = cv2.imread(str(out / "b_mask.png"), cv2.IMREAD_UNCHANGED)
    assert a.shape == (96, 96) and a.dtype == np.uint8 and a.max() > 0
    assert b.shape == (120, 110) and set(np.unique(b)) <= {0, 255}
    # plus the manifest of what retina_tf wrote there (so re-runs may replace those files)
    assert sorted(p.name for p in out.iterdir()) == [".retina_tf_outputs.json", "a_mask.png",
                                                     "a_prob.png", "b_mask.png", "b_prob.png",
                                                     "predictions.csv"]


def test_predict_names_a_missing_input(trained, tmp_path):
    _, run = trained
    proc = _run("predict.py", f"--model={run}", f"--input={tmp_path / 'nope.jpg'}",
                f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode != 0 and "nope.jpg" in proc.stderr


def test_unknown_model_lists_where_it_looked(tmp_path):
    looked = r"--model=unet_nowhere.*logs/unet_nowhere.*unet_drive"  # where, and what is shipped
    with pytest.raises(ModelFileError, match=looked):
        find_run("unet_nowhere", "logs")
    shipped = find_run("unet_drive")
    assert find_run(shipped / "model.keras") == find_run(str(shipped / "model.keras")) == shipped


def test_tta_transpose_without_tta_is_said_to_do_nothing(caplog):
    """From the command line and from Python (a warning: a script logs no info)."""
    from retina_tf.config import PredictConfig
    from retina_tf.evaluation import load_segmenter
    load_segmenter(PredictConfig(model="unet_drive", tta_transpose=True))
    assert "tta_transpose (--tta_transpose) adds views to tta's: without tta it does " \
        "nothing" in caplog.text
    caplog.clear()
    Segmenter.from_pretrained("unet_drive", tta_transpose=True)
    assert "without tta it does nothing" in caplog.text
    caplog.clear()
    Segmenter.from_pretrained("unet_drive", tta=True, tta_transpose=True)
    assert not caplog.records


def test_windows_of_a_whole_image_model_are_said_to_be_unused(caplog):
    """--window / --stride only shape sliding windows: unet_drive segments whole images."""
    from retina_tf.config import PredictConfig
    from retina_tf.evaluation import load_segmenter
    load_segmenter(PredictConfig(model="unet_drive", window=96, stride=32))
    assert "window=96, stride=32 (--window, --stride) set the sliding windows; unet_drive " \
        "segments whole images, so they are unused" in caplog.text
    caplog.clear()
    load_segmenter(PredictConfig(model="unet_drive"))  # the defaults say nothing
    Segmenter.from_pretrained("unet_drive", inference="sliding", window=96)
    assert "unused" not in caplog.text
    Segmenter.from_pretrained("unet_drive", window=64)
    assert "window=64 (--window, --stride)" in caplog.text


def test_many_segmenters_in_one_process_are_no_excessive_retracing(caplog):
    """TensorFlow warned of "excessive retracing" from the sixth Segmenter of a process (a
    notebook cell run again, compare of several runs), though each traced once."""
    image = generate_fundus(1, size=(96, 96)).image
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for _ in range(7):
            seg = Segmenter.from_pretrained("unet_drive", tta=False, inference_scale="native")
            seg.probability(image)
    assert "retracing" not in caplog.text
    assert seg._forward.experimental_get_tracing_count() == 1


def test_segment_warns_of_its_fov_estimate_and_resize_as_predict_does(caplog):
    """Segmenter.segment estimated the FOV and planned the resize without the warnings that
    predict gives for the same photograph; a caller's fov and plan stay the caller's to warn."""
    seg = Segmenter.from_pretrained("unet_drive", tta=False)
    small = generate_fundus(3, size=(128, 128)).image  # FOV ~110 px: enlarged x3 at most
    seg.segment(small, source="small.png")
    assert "warning: small.png: its FOV is" in caplog.text and "enlarged x3.00 at most" \
        in caplog.text
    caplog.clear()
    inside = generate_fundus(3, size=(384, 384)).image[128:256, 128:256]  # no dark frame
    seg.segment(inside, source="inside.png")
    assert "inside.png: the estimated field of view covers 100% of the image" in caplog.text
    caplog.clear()
    seg.segment(small, np.ones(small.shape[:2], bool), plan=seg.scale_plan(small, np.ones(
        small.shape[:2], bool)), source="given.png")
    assert "given.png: its FOV" not in caplog.text and "estimated" not in caplog.text


def test_a_segmenters_threshold_keyword_sets_its_masks(caplog):
    """The README's "evaluation options as keywords": threshold= was a TypeError."""
    image = generate_fundus(2, size=(128, 128)).image
    seg = Segmenter.from_pretrained("unet_drive", threshold=0.3)
    assert (seg.threshold, seg.threshold_source) == (0.3, "given: threshold=")
    default = Segmenter.from_pretrained("unet_drive")
    mask = seg.segment(image)[1]
    np.testing.assert_array_equal(mask, default.segment(image, threshold=0.3)[1])
    assert mask.sum() > default.segment(image)[1].sum()
    with pytest.raises(ConfigError, match="threshold=1.5 must lie strictly between 0 and 1"):
        Segmenter.from_pretrained("unet_drive", threshold=1.5)
    Segmenter.from_pretrained("unet_drive", av_link=0.5)  # like tta_transpose without tta
    assert "av_link (--av_link) links av_vote's segments: without av_vote it does nothing" \
        in caplog.text
    # a keyword that is no number, and a float image given to probability: retina_tf's errors
    # (a ValueError from float() or int(), and from the preprocessor)
    with pytest.raises(ConfigError, match="--threshold=abc must lie strictly between 0 and 1"):
        seg.segment(image, threshold="abc")
    with pytest.raises(ConfigError, match=r"batch_size='x' \(--batch_size\): give a whole"):
        Segmenter.from_pretrained("unet_drive", batch_size="x")
    with pytest.raises(DatasetError, match=r"float32 array .* scale floats to 0-255 first"):
        seg.probability(image.astype(np.float32) / 255)


def test_training_data_flags_a_run_does_not_follow_are_noted(caplog):
    """evaluate's --preprocess, --channel and --cache_dir (data flags it shares with train) were
    ignored without a word; a flagfile's values, the run's own, pass silently."""
    from retina_tf.evaluation import load_segmenter
    load_segmenter(EvalConfig(model="unet_drive", preprocess=("none",), channel="green",
                              cache_dir="cache"))
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("note:")]
    assert notes == [
        "note: unet_drive segments with its own preprocessing (grayscale,standardize,clahe,"
        "gamma); --preprocess=none is ignored (it sets a training's)",
        "note: unet_drive converts to gray with its own channel (luminance); --channel=green is "
        "ignored (it sets a training's)",
        "note: --cache_dir=cache is ignored: it caches a training's preprocessed images"]
    caplog.clear()
    load_segmenter(parse_config("evaluate", [f"--flagfile={REPO / 'configs/rite_ripav.cfg'}",
                                             "--model=ripav_rite", "--channel=green"]))
    assert "note:" not in caplog.text  # its own steps; no gray conversion for a channel to pick


def test_pretrained_takes_ones_own_run_before_the_shipped_model_of_its_name(tmp_path, caplog):
    """configs/drive_unet.cfg writes logs/unet_drive and vessel_general.cfg starts from
    --pretrained=unet_drive: the shipped model was taken instead, without a word."""
    shipped = find_run("unet_drive")
    own = tmp_path / "unet_drive"
    shutil.copytree(shipped, own)
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        assert find_run("unet_drive", str(tmp_path), flag="--pretrained", own_first=True) \
            == own
        assert find_run("unet_drive", str(tmp_path)) == shipped   # --model: the shipped one
    assert f"--pretrained=unet_drive: {own} is taken, not {shipped}; give a path" in caplog.text
    assert f"--model=unet_drive: {shipped} is taken, not {own}; give a path" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        assert find_run("unet_drive", str(tmp_path / "elsewhere"), flag="--pretrained",
                        own_first=True) == shipped
    assert "is taken" not in caplog.text


def test_flip_tta_of_an_identity_model_returns_the_image():
    import keras

    from retina_tf.data.preprocess import Preprocessor
    identity = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Identity()])
    seg = Segmenter(identity, Preprocessor(), size_multiple=8, inference="whole", tta=True)
    seg._forward = tf.function(lambda t: t)  # probabilities = the input itself
    x = np.random.default_rng(2).random((21, 30, 1)).astype(np.float32)
    np.testing.assert_allclose(seg.probability_preprocessed(x), x, rtol=1e-6)


def test_transpose_tta_averages_the_eight_views_in_the_image_frame():
    import keras

    from retina_tf.data.preprocess import Preprocessor
    identity = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Identity()])
    x = np.random.default_rng(3).random((21, 30, 1)).astype(np.float32)
    seg = Segmenter(identity, Preprocessor(), size_multiple=8, inference="whole", tta=True,
                    tta_transpose=True)
    seg._forward = tf.function(lambda t: t)
    np.testing.assert_allclose(seg.probability_preprocessed(x), x, rtol=1e-6)
    # a "model" that answers each pixel's column number (1..width of what it is shown): the four
    # flips average to the middle column; the transposed views see rows as columns
    seg._forward = tf.function(lambda t: tf.cumsum(tf.ones_like(t), axis=2))
    # (padding to a multiple of 8 is cropped off before a flip is undone)
    h, w = x.shape[:2]
    np.testing.assert_allclose(seg.probability_preprocessed(x), ((w + 1) / 2 + (h + 1) / 2) / 2,
                               rtol=1e-6)
    seg.tta_transpose = False
    np.testing.assert_allclose(seg.probability_preprocessed(x), (w + 1) / 2, rtol=1e-6)


def test_sliding_window_tta_probabilities_do_not_depend_on_the_batch_size():
    import keras

    from retina_tf.data.preprocess import Preprocessor
    # Windows per forward pass only trade memory for speed (on a 2-core CPU 8 ran the RIP-AV
    # evaluation faster than 64, bench/av_eval_time.py). A random network with batch
    # normalization: were its batch statistics used, a window would depend on its batch-mates.
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((None, None, 3)),
                              keras.layers.Conv2D(8, 3, padding="same"),
                              keras.layers.BatchNormalization(), keras.layers.ReLU(),
                              keras.layers.Conv2D(3, 3, padding="same")])
    x = np.random.default_rng(4).random((37, 45, 3)).astype(np.float32)

    def probability(batch_size):
        seg = Segmenter(model, Preprocessor(), inference="sliding", window=16, stride=8,
                        batch_size=batch_size, tta=True, tta_transpose=True)
        return seg.probability_preprocessed(x)

    reference = probability(64)  # every view's windows in one batch
    for batch_size in (1, 7):  # 7: each view ends in a smaller batch
        np.testing.assert_allclose(probability(batch_size), reference, atol=1e-6)


def test_shipped_drive_model_segments_a_real_drive_test_image(shared_data):
    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.metrics import VesselMetrics

    seg = Segmenter.from_run("unet_drive")
    data = read_sample(list_samples("drive", shared_data / "DRIVE", "test")[0])
    prob, mask = seg.segment(data.image, data.fov)
    assert prob.shape == (584, 565, 1) and mask.dtype == bool
    metrics = VesselMetrics()
    metrics.update(prob[..., 0], data.vessel, data.fov)
    result = metrics.result()
    assert result["f1"] > 0.78 and result["auc_roc"] > 0.97


def test_shipped_model_on_a_stare_photograph_of_another_size(shared_data):
    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.metrics import VesselMetrics

    seg = Segmenter.from_run("unet_drive")
    data = read_sample(list_samples("stare", shared_data / "STARE", "test")[0])
    prob, _ = seg.segment(data.image)  # FOV estimated
    assert prob.shape == data.image.shape[:2] + (1,)
    metrics = VesselMetrics()
    metrics.update(prob[..., 0], data.vessel, data.fov)
    assert metrics.result()["auc_roc"] > 0.9  # a DRIVE model transfers, if imperfectly


def _readme_python_blocks() -> list[str]:
    """The README's indented code blocks that are Python (start with an import)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"(?:^    .*\n)+", text, re.M)]
    return [b for b in blocks if b.startswith(("import ", "from "))]


def test_readme_python_snippets_run_in_a_fresh_interpreter(tmp_path):
    # the README's own snippets, as a user pastes them into a fresh interpreter (Keras cannot
    # load a model.keras before importing retina_tf registers the classes); the training one
    # needs DRIVE and minutes: its config is checked, not run
    blocks = _readme_python_blocks()
    training = [b for b in blocks if "retina_tf.train(" in b]
    assert len(blocks) == 3 and len(training) == 1, blocks
    image = generate_fundus(seed=2, size=(120, 128)).image
    (tmp_path / "my_photos").mkdir()
    for path in (tmp_path / "my_photo.png", tmp_path / "my_photos" / "p.png"):
        cv2.imwrite(str(path), image[..., ::-1])
    train_config = training[0].split("run = retina_tf.train(")[1].split("))")[0] + ")"
    code = "\n".join(b for b in blocks if b not in training) + f"""
import keras
from retina_tf.run_folder import find_run
net = keras.saving.load_model(find_run("vessel_general") / "model.keras")
cfg = {train_config}
print(prob.shape, prob.dtype, mask.dtype, float(prob.min()) >= 0.0, float(prob.max()) <= 1.0,
      type(net).__name__, cfg.model, cfg.epochs)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "(120, 128, 1) float32 bool True True UNet unet 10"
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert written == ["p_mask.png", "p_prob.png", "predictions.csv"]


def _drive_label_file(path: Path, drive: Path, split: str, name: str) -> Path:
    """A one-line label file of DRIVE's ``split`` image ``name`` (``21``, ``01``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{0}/images,{0}/1st_manual,{0}/mask\n".format(drive / split)
                    + f"{name}_{split}.tif,{name}_manual1.gif,{name}_{split}_mask.gif\n")
    return path


def test_a_label_files_all_split_is_training_and_test_and_trained_images_are_named(
        shared_data, tmp_path, caplog):
    drive = shared_data / "DRIVE"
    own = tmp_path / "own"
    training = str(_drive_label_file(own / "training.txt", drive, "training", "21"))
    with pytest.raises(DatasetError, match="no test split beside"):
        evaluate(EvalConfig(model="vessel_general", label_file_path=training,
                            output_dir=str(tmp_path / "a")))
    _drive_label_file(own / "test.txt", drive, "test", "01")
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        report = evaluate(EvalConfig(model="vessel_general", label_file_path=training,
                                     eval_split="all", output_dir=str(tmp_path / "b"),
                                     tta=False))
    assert [r["name"] for r in report["per_image"]] == ["21_training", "01_test"]
    # vessel_general trained on 21_training: said, and 01_test not named
    assert "1 of the 2 images (21_training) have the names of images vessel_general trained on" \
        in caplog.text
    _drive_label_file(own / "test.txt", drive, "training", "21")
    with pytest.raises(DatasetError, match="both list 21_training"):
        evaluate(EvalConfig(model="vessel_general", label_file_path=training, eval_split="all",
                            output_dir=str(tmp_path / "c")))


def test_a_photograph_trained_on_is_told_by_its_pixels_under_another_name(
        trained, tmp_path, caplog):
    """A training photograph copied into the test data under another name and format was
    scored as a new image in silence (the check went by names)."""
    data, run = trained
    seen = json.loads((run / "run.json").read_text())["data"]["image_digests"]
    assert sorted(seen.values()) == sorted(p.stem for p in (data / "training" / "images")
                                           .glob("*.tif"))
    own = tmp_path / "own"
    own.mkdir()
    for name, split, number in (("copy", "training", "03"), ("new", "test", "01")):
        image = read_image(data / split / "images" / f"{number}_{split}.tif")
        cv2.imwrite(str(own / f"{name}.png"), image[..., ::-1])  # OpenCV writes BGR
        shutil.copy(data / split / "1st_manual" / f"{number}_manual1.gif",
                    own / f"{name}_label.gif")
        shutil.copy(data / split / "mask" / f"{number}_{split}_mask.gif",
                    own / f"{name}_mask.gif")
    (own / "test.txt").write_text(f"{own},{own},{own}\n" + "".join(
        f"{n}.png,{n}_label.gif,{n}_mask.gif\n" for n in ("copy", "new")))
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        report = evaluate(EvalConfig(model=str(run), test_label_file_path=str(own / "test.txt"),
                                     output_dir=str(tmp_path / "out")))
    assert ("1 of the 2 images (copy as 03_training) are, pixel for pixel, photographs "
            "tiny trained on") in caplog.text
    assert report["seen_in_training"] == ["copy"]


def test_the_split_of_label_files_is_the_one_asked_for_and_a_runs_own_test_list_is_used(
        shared_data, tmp_path, caplog):
    drive = shared_data / "DRIVE"
    own = tmp_path / "own"
    files = dict(
        label_file_path=str(_drive_label_file(own / "training.txt", drive, "training", "21")),
        test_label_file_path=str(_drive_label_file(own / "val.txt", drive, "test", "01")))
    # --eval_split=training scores the training list, not --test_label_file_path's
    report = evaluate(EvalConfig(model="vessel_general", eval_split="training", tta=False,
                                 output_dir=str(tmp_path / "a"), **files))
    assert [r["name"] for r in report["per_image"]] == ["21_training"]
    assert report["dataset"] == "own" and report["label_files"] == [files["label_file_path"]]
    with pytest.raises(ConfigError, match="--eval_split=all: give the training split's"):
        evaluate(EvalConfig(model="vessel_general", eval_split="all",
                            test_label_file_path=files["test_label_file_path"]))
    # a run trained with its own test list is scored on it, into eval_own_val_test: apart
    # from a test.txt in the same folder
    run = tmp_path / "run"
    shutil.copytree(find_run("vessel_general"), run)
    lines = [line for line in (run / "flags.txt").read_text().splitlines()
             if not line.startswith(("--dataset", "--data_dir", "--extra_data"))]
    (run / "flags.txt").write_text("\n".join(lines + [f"--{k}={v}" for k, v in files.items()]))
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        report = evaluate(EvalConfig(model=str(run), tta=False))
    assert [r["name"] for r in report["per_image"]] == ["01_test"]
    assert f"--test_label_file_path={files['test_label_file_path']}, the test split" \
        in caplog.text
    assert (run / "eval_own_val_test" / "metrics.json").is_file()
    assert list(json.loads((run / "metrics.json").read_text()))[-1] == "eval_own_val_test"


def test_only_names_ending_in_mask_are_taken_for_fov_masks(tmp_path, caplog):
    from retina_tf.evaluation import list_inputs
    image = generate_fundus(1, size=(64, 64)).image
    for name in ("eye.png", "eye_masked_lens.png", "eye_mask.png", "sub/eye2.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / name), image)
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        inputs = list_inputs(tmp_path)
    assert [p.name for p in inputs] == ["eye.png", "eye_masked_lens.png"]
    assert (f"taken for FOV masks, not segmented: eye_mask.png (the FOV is estimated unless "
            f"--fov={tmp_path} is given)") in caplog.text
    assert "1 subfolder(s) not searched: sub (give each as --input, or --recursive)" in caplog.text


def test_a_folder_lists_every_image_type_read_image_reads_and_nothing_else(tmp_path):
    from retina_tf.evaluation import list_inputs
    image = generate_fundus(1, size=(64, 64)).image
    for name, ext in (("a.webp", ".webp"), ("b.jfif", ".jpg"), ("c.pgm", ".pgm"),
                      ("d.bmp", ".bmp")):
        (tmp_path / name).write_bytes(cv2.imencode(ext, image[..., :3 if ext != ".pgm" else 1])
                                      [1].tobytes())
    (tmp_path / "e.ppm.gz").write_bytes(gzip.compress(cv2.imencode(".ppm", image)[1].tobytes()))
    (tmp_path / "f_mask.ppm.gz").write_bytes((tmp_path / "e.ppm.gz").read_bytes())
    (tmp_path / "backup.tar.gz").write_bytes(gzip.compress(b"not an image"))
    (tmp_path / "notes.txt").write_text("")
    inputs = list_inputs(tmp_path)
    assert [p.name for p in inputs] == ["a.webp", "b.jfif", "c.pgm", "d.bmp", "e.ppm.gz"]
    for path in inputs:
        assert read_image(path).shape == (64, 64, 3)


def test_a_sliding_window_off_the_size_multiple_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="--window=100: .* of 8 px; give e.g. --window=96"):
        Segmenter.from_pretrained("unet_drive", inference="sliding", window=100)
    # a stride over the window (a ValueError of window_starts, exit 1, naming no flag)
    with pytest.raises(ConfigError, match="--stride=97 is over --window=96: the windows would "
                                          "leave pixels between them"):
        Segmenter.from_pretrained("unet_drive", inference="sliding", stride=97)


def test_an_output_dir_that_is_a_file_is_named_as_such(tmp_path):
    from retina_tf.evaluation import OutputFolder
    (tmp_path / "out.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="out.png is a file, not a folder"):
        OutputFolder(tmp_path / "out.png")


def test_images_a_run_was_selected_on_or_trained_on_unrecorded_are_warned_of():
    from types import SimpleNamespace

    from retina_tf.evaluation import SeenInTraining
    seg = Segmenter.from_pretrained("unet_drive")  # chose its threshold on 39 and 40

    def _trained_on_warning(seg, samples, dataset=None, split=None):
        return SeenInTraining(seg, [s.name for s in samples], dataset, split).name_warning()
    images = [SimpleNamespace(name=n) for n in ("39_training", "01_test")]
    assert "1 of the 2 images (39_training) have the names of images unet_drive trained on or " \
        "chose its checkpoint and threshold on" in _trained_on_warning(seg, images)
    # its run.json names no training images: its dataset's training split is what it saw,
    # every image of it (21 was counted out when 39 was named)
    training = [SimpleNamespace(name=n) for n in ("21_training", "39_training")]
    assert "2 of the 2 images (21_training, 39_training) have the names of images unet_drive " \
        "trained on" in _trained_on_warning(seg, training, "DRIVE", "training")
    assert "unet_drive trained on drive's training split, which the 'all' split includes" \
        in _trained_on_warning(seg, training + images, "drive", "all")
    assert _trained_on_warning(seg, training[:1], "stare", "training") is None
    # names count where the photographs are those it trained on: RITE's are DRIVE's
    assert "1 of the 2 images (39_training)" in _trained_on_warning(seg, images, "rite", "test")
    assert "2 of the 2 images" in _trained_on_warning(seg, training, "rite", "training")
    assert _trained_on_warning(seg, images, "synthetic", "test") is None
    assert _trained_on_warning(seg, [SimpleNamespace(name="01_test")], "drive", "test") is None


def test_two_commands_writing_one_output_folder_keep_each_others_files_listed(tmp_path):
    from retina_tf.evaluation import OutputFolder, read_manifest
    first, second = OutputFolder(tmp_path / "out"), OutputFolder(tmp_path / "out")  # at once
    first.save_png("a_mask.png", np.zeros((4, 4), np.uint8))
    second.save_png("b_mask.png", np.zeros((4, 4), np.uint8))
    assert read_manifest(tmp_path / "out") == {"a_mask.png", "b_mask.png"}
    # the same name from both (two predicts of one folder): the second replaces the first's
    # file, which was listed after it opened the folder (it was refused as the user's)
    first.save_png("c_mask.png", np.zeros((4, 4), np.uint8))
    second.save_png("c_mask.png", np.ones((4, 4), np.uint8))
    OutputFolder(tmp_path / "out").check(["a_mask.png", "b_mask.png"])  # a re-run may replace
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".retina_tf_outputs.json", "a_mask.png", "b_mask.png", "c_mask.png"]


def test_the_av_picture_colours_the_mask_at_the_threshold_given(shared_data, tmp_path, caplog):
    from retina_tf.config import PredictConfig
    from retina_tf.data.fov import estimate_fov
    from retina_tf.data.io import read_mask
    from retina_tf.evaluation import predict
    out = tmp_path / "out"
    photo = shared_data / "RITE/test/images/01_test.tif"
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        predict(PredictConfig(model="ripav_rite", input=str(photo), output_dir=str(out),
                              threshold=0.3, tta=False))  # the vote on, as by default
    mask = read_mask(out / "01_test_mask.png")
    coloured = read_image(out / "01_test_av.png").any(axis=-1)
    np.testing.assert_array_equal(coloured, mask)  # arteries and veins exactly on the mask
    # the line per photograph gives the share of the FOV segmented, as the warnings count it
    fov = estimate_fov(read_image(photo))
    assert f"vessel on {mask[fov].mean():.1%} of the FOV)" in caplog.text


def test_a_vessel_map_far_from_the_training_labels_share_is_warned_of():
    from retina_tf.inference import label_vessel_share, vessel_share_warning
    fov = np.zeros((10, 10), bool)
    fov[:, :5] = True  # 50 FOV pixels
    labels = [np.zeros((10, 10, 1), np.float32) for _ in range(2)]
    labels[0][:4, :1] = 1    # 4 of 50: 8 %
    labels[1][:8, :1] = 1    # 16 %
    labels[1][:, 9] = 1      # outside the FOV: not counted
    known = label_vessel_share(labels, [fov, fov])
    assert known == {"min": pytest.approx(0.08), "max": pytest.approx(0.16), "images": 2}
    mask = np.zeros((10, 10), bool)
    for vessel_pixels, warned in ((2, False), (1, True), (16, False), (17, True)):
        mask[:] = False
        mask.flat[np.flatnonzero(fov)[:vessel_pixels]] = True  # 4 %, 2 %, 32 %, 34 %
        warning = vessel_share_warning(mask, fov, known, "eye.png")
        assert (warning is not None) == warned, vessel_pixels
    low = vessel_share_warning(np.zeros((10, 10, 3), bool), fov, known, "eye.png")
    assert low.startswith("warning: eye.png: 0.0% of its FOV") and "8.0%-16.0%" in low
    assert "missed" in low
    assert "not vessel" in vessel_share_warning(np.ones((10, 10), bool), fov, known, "eye.png")
    for unknown in (None, {}, {"min": 0.08}, {"min": "?", "max": 0.16}):  # none recorded
        assert vessel_share_warning(np.zeros((10, 10), bool), fov, unknown, "eye.png") is None


def test_a_gray_photograph_with_bright_vessels_is_warned_of(shared_data, tmp_path, caplog):
    from retina_tf.config import PredictConfig
    from retina_tf.evaluation import predict
    from retina_tf.inference import BRIGHT_LINE_RATIO, bright_line_ratio, bright_vessels_warning
    drive = shared_data / "DRIVE" / "test"
    photo = read_image(drive / "images" / "01_test.tif")
    fov = read_image(drive / "mask" / "01_test_mask.gif")[..., 0] > 0
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    angiogram = np.where(fov, 255 - gray, 0).astype(np.uint8)  # vessels bright, as in one
    assert bright_line_ratio(gray, fov) < 1 < BRIGHT_LINE_RATIO < bright_line_ratio(angiogram,
                                                                                    fov)
    # the shipped models learned dark vessels (run.json's record of their training images)
    known = Segmenter.from_pretrained("vessel_general").run_info["bright_line_ratio"]
    assert known["max"] < 1 and known["images"] == 36
    gray_angiogram = np.dstack([angiogram] * 3)
    assert "angiogram?" in bright_vessels_warning(gray_angiogram, fov, known, "fa.png")
    # dark vessels of a red-free (gray) photograph are no angiogram, nor is any colour picture
    assert bright_vessels_warning(np.dstack([gray] * 3), fov, known, "redfree.png") is None
    assert bright_vessels_warning(np.where(fov[..., None], 255 - photo, 0).astype(np.uint8),
                                  fov, known, "negative.png") is None
    # a model of angiograms (bright training vessels), or a run without the record: no warning
    for other in ({"min": 1.3, "max": 1.7, "images": 9}, None, {}):
        assert bright_vessels_warning(gray_angiogram, fov, other, "fa.png") is None
    # twice the size, a mask of a few pixels: measured at the same FOV, or not at all
    big = cv2.resize(angiogram, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    big_fov = cv2.resize(fov.astype(np.uint8), None, fx=2, fy=2) > 0
    assert bright_line_ratio(big, big_fov) == pytest.approx(bright_line_ratio(angiogram, fov),
                                                            rel=0.05)
    assert bright_line_ratio(angiogram, np.pad(np.ones((5, 5), bool), 40)) is None
    cv2.imwrite(str(tmp_path / "fa.png"), angiogram)
    cv2.imwrite(str(tmp_path / "redfree.png"), gray)
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        predict(PredictConfig(input=str(tmp_path), output_dir=str(tmp_path / "out"), tta=False))
    warned = [r.getMessage() for r in caplog.records  # not TensorFlow's retracing notice
              if r.levelno == logging.WARNING and r.name.startswith("retina_tf")]
    assert warned == [f"warning: {tmp_path / 'fa.png'} is gray with bright thin structures (a "
                      "fluorescein or ICG angiogram?): the model learned photographs whose "
                      "vessels are dark, so this map is probably wrong; angiograms need a model "
                      "trained on labelled ones (docs/data.md)"]
    assert caplog.records[-1].getMessage().endswith("1 with a warning above: fa.png")


def test_predict_lists_every_photograph_in_predictions_csv(shared_data, tmp_path, caplog):
    import csv

    from retina_tf.config import PredictConfig
    from retina_tf.errors import RetinaTFError
    from retina_tf.evaluation import predict
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(shared_data / "DRIVE/test/images/01_test.tif", photos)
    gray = cv2.cvtColor(read_image(photos / "01_test.tif"), cv2.COLOR_RGB2GRAY)
    negative = cv2.resize(np.where(gray > 20, 255 - gray, 0).astype(np.uint8), (200, 200))
    for i in range(6):  # six angiogram-like pictures: more than the closing line names
        cv2.imwrite(str(photos / f"fa{i}.png"), negative)
    cv2.imwrite(str(photos / "tiny.png"), negative[:40, :40])
    (photos / "moved.jpg").symlink_to(tmp_path / "gone.jpg")  # was passed over in silence
    with caplog.at_level(logging.INFO, logger="retina_tf"), \
            pytest.raises(RetinaTFError, match="2 of 9 images failed"):
        predict(PredictConfig(input=str(photos), output_dir=str(tmp_path / "out"), tta=False))
    messages = [r.getMessage() for r in caplog.records]
    assert "6 with a warning above: fa0.png, fa1.png, fa2.png, fa3.png, fa4.png and 1 more " \
           "(all in predictions.csv); 2 failed:" in messages[-1]
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["input"] for r in rows] == [str(photos / n) for n in (
        "01_test.tif", *(f"fa{i}.png" for i in range(6)), "moved.jpg", "tiny.png")]
    drive = rows[0]
    # the figures the photograph's line gives, and no warning
    line = next(m for m in messages if m.startswith(str(photos / "01_test.tif")))
    assert (drive["outputs"], drive["width"], drive["height"]) == ("01_test", "565", "584")
    assert f"FOV {drive['fov_diameter']} px" in line and drive["segmented_at"] == ""
    shown = float(re.search(r"vessel on ([0-9.]+)% of the FOV", line)[1])
    assert abs(100 * float(drive["vessel_share"]) - shown) <= 0.05 + 1e-6
    assert drive["warnings"] == drive["error"] == ""
    assert all("angiogram?" in r["warnings"] and r["error"] == "" for r in rows[1:7])
    assert rows[1]["segmented_at"]  # 200 px: enlarged towards the training FOV
    assert rows[-1]["error"].endswith("too small to segment: this model needs at least 96x96 "
                                      "(its training patch size)")
    assert rows[-1]["vessel_share"] == ""
    assert rows[-2]["error"] == (f"{photos / 'moved.jpg'} is a link to {tmp_path / 'gone.jpg'}, "
                                 "which does not exist")


def test_predict_warns_once_of_a_gray_photograph_given_to_an_av_model(tmp_path, caplog):
    from retina_tf.config import PredictConfig
    from retina_tf.data.io import write_image_atomic
    from retina_tf.evaluation import predict
    photo = generate_fundus(5, size=(160, 160)).image.mean(axis=-1).astype(np.uint8)
    write_image_atomic(tmp_path / "gray.png", photo)
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        predict(PredictConfig(model="ripav_general", input=str(tmp_path / "gray.png"),
                              output_dir=str(tmp_path / "out"), tta=False, av_vote=False))
    assert caplog.text.count("gray.png is a gray photograph: telling arteries from veins") == 1
    said = [m for m in caplog.messages if "gray photograph" in m]
    assert said[0].startswith("warning: "), said  # counted among the warnings: so marked


def test_predict_names_the_photographs_of_a_folder_it_warned_of(shared_data, tmp_path, caplog):
    from retina_tf.config import PredictConfig
    from retina_tf.evaluation import predict
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(shared_data / "samples/CHASE_DB1/Image_01L.jpg", photos)  # arteries warned of
    shutil.copy(shared_data / "RITE/test/images/01_test.tif", photos)
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        predict(PredictConfig(model="ripav_general", input=str(photos),
                              output_dir=str(tmp_path / "out"), tta=False, av_vote=False))
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert done == [f"done: 2 image(s) segmented, outputs in {tmp_path / 'out'}; 1 with a "
                    "warning above: Image_01L.jpg"]
    # predictions.csv gives each A/V map's artery share, beside the warning it called for
    import csv
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = {Path(r["input"]).name: r for r in csv.DictReader(f)}
    chase, rite = rows["Image_01L.jpg"], rows["01_test.tif"]
    assert float(chase["artery_share"]) > 0.652 and "called artery" in chase["warnings"]
    assert 0.317 < float(rite["artery_share"]) < 0.652 and rite["warnings"] == ""


def test_an_av_decision_far_from_the_training_labels_artery_share_is_warned_of():
    from retina_tf.inference import artery_share, artery_share_warning, label_artery_share
    fov = np.ones((10, 10), bool)
    fov[:, 9] = False
    label = np.zeros((10, 10, 3), bool)  # artery, vein, vessel
    label[0, :4, 0] = True              # 4 artery pixels
    label[1, :6, 1] = True              # 6 vein pixels
    label[2, :3, :2] = True             # 3 crossings (both): not counted
    label[3, 9, 0] = True               # outside the FOV: not counted
    label[..., 2] = label[..., 0] | label[..., 1]
    assert artery_share(label, fov) == pytest.approx(0.4)
    other = np.zeros_like(label)
    other[0, :6, 0] = other[1, :4, 1] = True
    assert artery_share(np.zeros_like(label), fov) is None
    known = label_artery_share([label, other, np.zeros((10, 10, 1))], [fov] * 3)
    assert known == {"min": pytest.approx(0.4), "max": pytest.approx(0.6), "images": 2}
    # bounds: artery-to-vein ratios 2/3 of 4:6 and 1.5x 6:4, i.e. shares 4/13 and 9/13
    mask = np.zeros((10, 10, 3), bool)
    for arteries, warned in ((6, True), (7, False), (13, False), (14, True)):  # of 20
        mask[:] = False
        mask[..., 0].flat[:arteries] = True
        mask[..., 1].flat[arteries:20] = True
        warning = artery_share_warning(mask, np.ones((10, 10)), known, "eye.png")
        assert (warning is not None) == warned, arteries
    assert warning.startswith("warning: eye.png: 70% of its vessel pixels called artery, "
                              "against 40%-60% in the labels")
    for unknown in (None, {}, {"min": 0.4}, {"min": "?", "max": 0.6}):  # none recorded
        assert artery_share_warning(mask, fov, unknown, "eye.png") is None
    assert artery_share_warning(mask[..., :1], fov, known) is None  # a vessel model's mask
    assert artery_share_warning(np.zeros_like(mask), fov, known) is None  # no vessel pixel


def test_the_av_model_warns_of_a_photograph_where_it_misses_most_vessels(shared_data, caplog):
    # ripav_rite, trained on RITE, finds 0.2 % vessel on STARE's im0324 (its labels: 8 %), whose
    # blue channel is nearly empty; on a RITE test photograph it stays silent
    from retina_tf.data.catalog import list_samples
    seg = Segmenter.from_pretrained("ripav_rite", tta=False, av_vote=False)  # segmenting once
    stare = [s for s in list_samples("stare", str(shared_data / "STARE"), "all")
             if s.name == "im0324"]
    rite = [s for s in list_samples("rite", str(shared_data / "RITE"), "test")
            if s.name == "01_test"]
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        for sample in stare + rite:
            data = read_sample(sample)
            seg.segment(data.image, data.fov, source=sample.image)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name.startswith("retina_tf")]
    assert warnings and all(str(stare[0].image) in w for w in warnings), warnings
    assert "most vessels are probably missed" in warnings[0]


def test_the_av_model_for_other_cameras_finds_the_vessels_ripav_rite_misses(shared_data, caplog):
    # a CHASE_DB1 photograph: ripav_rite (RITE alone) finds a fifth of its vessels and warns;
    # ripav_general (camera changes) most of them, but calls 73 % of them arteries (RITE's
    # labels: 41-56 %) and says so
    from retina_tf.data.catalog import list_samples
    from retina_tf.data.pipeline import target_of
    sample = list_samples("chase_db1", str(shared_data / "samples/CHASE_DB1"), "all")[0]
    data = read_sample(sample)
    truth = target_of(data, "vessel")[..., -1] > 0.5
    f1 = {}
    for name in ("ripav_rite", "ripav_general"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="retina_tf"):
            _, mask = Segmenter.from_pretrained(name, tta=False, av_vote=False).segment(
                data.image, data.fov)
        vessel = mask[..., -1][data.fov]
        tp = np.sum(vessel & truth[data.fov])
        f1[name] = 2 * tp / (vessel.sum() + truth[data.fov].sum())
        assert ("most vessels are probably missed" in caplog.text) == (name == "ripav_rite")
        if name == "ripav_general":
            assert "of its vessel pixels called artery, against 41%-56%" in caplog.text
    assert f1["ripav_rite"] < 0.5 < 0.65 < f1["ripav_general"], f1


def test_the_av_vote_of_a_vessel_model_is_refused_before_segmenting():
    with pytest.raises(ConfigError, match="--av_vote is for artery/vein models"):
        Segmenter.from_pretrained("vessel_general", av_vote=True)


def test_task_av_needs_an_av_model_and_task_vessel_scores_its_vessel_map(shared_data, tmp_path):
    lesav = dict(dataset="les_av", data_dir=str(shared_data / "samples/LES-AV"), eval_split="all")
    with pytest.raises(ConfigError, match="--task=av: vessel_general segments vessels only"):
        evaluate(EvalConfig(model="vessel_general", task="av", output_dir=str(tmp_path / "a"),
                            **lesav))
    assert not (tmp_path / "a").exists()
    out = tmp_path / "v"  # LES-AV has A/V labels: without --task, A/V figures too
    evaluate(EvalConfig(model="ripav_rite", task="vessel", output_dir=str(out), tta=False,
                        av_vote=False, **lesav))
    header = (out / "per_image.csv").read_text().splitlines()[0].split(",")
    assert "f1" in header and not [c for c in header if c.startswith("av_")]


def test_a_runs_own_recorded_stride_is_not_called_unused(caplog):
    """compare passes each run's flags.txt settings: ripav_rite's --stride=48 (whole images)."""
    from retina_tf.inference import run_inference
    own = run_inference(find_run("ripav_rite")).stride
    assert own != 16
    Segmenter.from_pretrained("ripav_rite", stride=own)
    assert "unused" not in caplog.text
    Segmenter.from_pretrained("ripav_rite", stride=own + 8)
    assert f"stride={own + 8} (--window, --stride)" in caplog.text


def test_files_a_killed_command_had_begun_to_move_in_are_moved_in_by_the_next(tmp_path):
    """Killed while it moved its staged files in, evaluate left half of them the new
    evaluation's and half the old one's, and the next command removed the rest."""
    import subprocess

    from retina_tf.evaluation import STAGED_WHOLE, STAGING_PREFIX, OutputFolder
    out = OutputFolder(tmp_path)
    with out.all_or_nothing():
        out.write_text("metrics.json", "old")
        out.write_text("per_image.csv", "old")
    dead = subprocess.Popen(["true"])
    dead.wait()
    moving = tmp_path / f"{STAGING_PREFIX}{dead.pid}"  # killed after per_image.csv went in
    moving.mkdir()
    (moving / "metrics.json").write_text("new")
    (moving / STAGED_WHOLE).write_text("")
    (tmp_path / "per_image.csv").write_text("new")
    OutputFolder(tmp_path)
    assert (tmp_path / "metrics.json").read_text() == "new" and not moving.exists()
    # one killed while it wrote them: removed, the old files kept
    moving.mkdir()
    (moving / "metrics.json").write_text("half")
    OutputFolder(tmp_path)
    assert (tmp_path / "metrics.json").read_text() == "new" and not moving.exists()
