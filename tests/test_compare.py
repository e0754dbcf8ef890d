"""Per-image scores, evaluate's per-image table and contact sheet, and bin/compare.py."""

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from retina_tf.compare import compare
from retina_tf.config import CompareConfig, EvalConfig
from retina_tf.data.io import read_image, write_image_atomic
from retina_tf.errors import ConfigError, DatasetError
from retina_tf.evaluation import (
    SHEET_ROW_HEIGHT,
    STAGING_PREFIX,
    SetScores,
    evaluate,
    per_image_csv,
)
from retina_tf.flags import parse_config
from retina_tf.inference import Segmenter
from retina_tf.training import train
from retina_tf.visualize import BAND_HEIGHT, GAP
from tests import commands
from tests.conftest import tiny_train_args

REPO = Path(__file__).resolve().parents[1]


def _sheet_height(rows: int) -> int:
    return BAND_HEIGHT + rows * (GAP + BAND_HEIGHT + SHEET_ROW_HEIGHT)


# --- per-image scores ------------------------------------------------------------------------

def test_a_perfect_prediction_scores_one_on_every_image():
    rng = np.random.default_rng(0)
    scores = SetScores("vessel", per_image_auc=True)
    for name in ("a", "b", "c"):
        label = rng.random((20, 30)) < 0.2
        fov = np.ones_like(label)
        scores.update(label[..., None].astype(np.float32), label[..., None], fov, name=name)
    assert [row["name"] for row in scores.per_image] == ["a", "b", "c"]
    assert all(row["f1"] == row["acc"] == row["auc_roc"] == 1.0 for row in scores.per_image)
    summary = scores.per_image_summary()
    assert summary["mean"]["f1"] == 1.0 and summary["std"]["f1"] == 0.0
    assert scores.result()["f1"] == 1.0


def test_per_image_figures_are_each_images_own_and_average_to_the_mean():
    fov = np.ones((1, 10), bool)
    scores = SetScores("vessel")
    # image 1: TP 2, FP 2, FN 0 -> F1 4/6; image 2: TP 1, FP 0, FN 3 -> F1 2/5
    scores.update(np.array([[[1], [1], [1], [1], [0], [0], [0], [0], [0], [0]]], np.float32),
                  np.array([[[1], [1], [0], [0], [0], [0], [0], [0], [0], [0]]], bool), fov)
    scores.update(np.array([[[1], [0], [0], [0], [0], [0], [0], [0], [0], [0]]], np.float32),
                  np.array([[[1], [1], [1], [1], [0], [0], [0], [0], [0], [0]]], bool), fov)
    f1 = [row["f1"] for row in scores.per_image]
    assert f1 == pytest.approx([4 / 6, 2 / 5])
    assert [row["name"] for row in scores.per_image] == ["0", "1"]
    assert "auc_roc" not in scores.per_image[0]  # only when asked: validation stays cheap
    summary = scores.per_image_summary()
    assert summary["mean"]["f1"] == pytest.approx((4 / 6 + 2 / 5) / 2)
    assert summary["std"]["f1"] == pytest.approx(abs(4 / 6 - 2 / 5) / 2)
    assert scores.result()["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 3))  # pooled counts
    # an undefined figure (Se of an image without vessels) is left out of the mean
    scores.update(np.zeros((1, 10, 1), np.float32), np.zeros((1, 10, 1), bool), fov)
    assert np.isnan(scores.per_image[-1]["se"])
    assert scores.per_image_summary()["mean"]["se"] == pytest.approx((1.0 + 0.25) / 2)


def test_av_per_image_scores_and_csv_columns():
    target = np.zeros((8, 8, 3), bool)
    target[1, :, 0] = target[1, :, 2] = True   # an artery
    target[5, :, 1] = target[5, :, 2] = True   # a vein
    prob = target.astype(np.float32)
    prob[5, :4, :2] = (0.9, 0.1)               # half the vein called artery
    scores = SetScores("av", per_image_auc=True)
    scores.update(prob, target, np.ones((8, 8), bool), name="x,1")
    row = scores.per_image[0]
    assert row["av_acc"] == pytest.approx(12 / 16) and row["f1"] == 1.0
    lines = list(csv.reader(per_image_csv(scores.per_image, "av").splitlines()))
    assert lines[0] == ["name", "f1", "auc_roc", "se", "sp", "acc", "av_acc", "av_acc_ripav"]
    assert lines[1][0] == "x,1" and float(lines[1][6]) == pytest.approx(0.75)
    assert per_image_csv(scores.per_image, "vessel").splitlines()[0] == \
        "name,f1,auc_roc,se,sp,acc"


# --- evaluate and compare on tiny runs -------------------------------------------------------

@pytest.fixture(scope="module")
def av_run(tiny_synthetic, tmp_path_factory):
    """A tiny artery/vein U-Net (one epoch: its figures only need to exist)."""
    logdir = tmp_path_factory.mktemp("compare_logs")
    return train(parse_config("train", tiny_train_args(
        tiny_synthetic, logdir, "--task=av", "--run_name=tiny_av", "--epochs=1",
        "--image_summary_every=0")))


def test_evaluate_writes_a_per_image_table_and_a_contact_sheet(tiny_synthetic, av_run,
                                                                tmp_path, caplog):
    report = evaluate(EvalConfig(model=str(av_run), dataset="synthetic",
                                 data_dir=str(tiny_synthetic), visualize=True,
                                 output_dir=str(tmp_path)))
    with open(tmp_path / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = sorted(p.name.split(".")[0] for p in (tiny_synthetic / "test" / "images").iterdir())
    assert [r["name"] for r in rows] == names
    assert set(rows[0]) == {"name", "f1", "auc_roc", "se", "sp", "acc", "av_acc",
                            "av_acc_ripav", "scale"}
    assert [float(r["scale"]) for r in rows] == [1.0] * len(names)  # the training size
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["name"] for r in saved["per_image"]] == names == [
        r["name"] for r in report["per_image"]]
    for key in ("f1", "auc_roc", "av_acc"):
        values = [float(r[key]) for r in rows]
        assert saved["per_image_mean"][key] == pytest.approx(np.mean(values), abs=1e-6)
        assert saved["per_image_std"][key] == pytest.approx(np.std(values), abs=1e-6)
    # the pooled F1 lies between the images' own
    assert min(float(r["f1"]) for r in rows) - 1e-9 <= saved["metrics"]["f1"] <= \
        max(float(r["f1"]) for r in rows) + 1e-9
    sheet = read_image(tmp_path / "contact_sheet.png")
    assert sheet.shape[0] == _sheet_height(len(names))
    assert sheet.shape[1] == 4 * SHEET_ROW_HEIGHT + 3 * GAP  # photo, A/V, errors, A/V errors
    manifest = json.loads((tmp_path / ".retina_tf_outputs.json").read_text())["files"]
    assert {"per_image.csv", "contact_sheet.png"} <= set(manifest)
    # again without pictures (another threshold): the earlier pictures beside these figures
    # were taken for theirs without a word
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        evaluate(EvalConfig(model=str(av_run), dataset="synthetic", threshold=0.2,
                            data_dir=str(tiny_synthetic), output_dir=str(tmp_path)))
    assert (f"warning: {tmp_path} also holds {5 * len(names) + 3} pictures of an earlier "
            f"evaluation (e.g. {names[0]}_av_errors.png) that this one did not write: not of "
            "these figures") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        evaluate(EvalConfig(model=str(av_run), dataset="synthetic", visualize=True,
                            data_dir=str(tiny_synthetic), output_dir=str(tmp_path)))
    assert "pictures of an earlier evaluation" not in caplog.text
    assert json.loads((tmp_path / "metrics.json").read_text())["data_dir"] == str(tiny_synthetic)
    # another copy of the data into the same folder: the first evaluation's figures go, said
    copy = tmp_path.parent / f"{tmp_path.name}_copy"
    shutil.copytree(tiny_synthetic, copy)
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        evaluate(EvalConfig(model=str(av_run), dataset="synthetic", visualize=True,
                            data_dir=str(copy), output_dir=str(tmp_path)))
    assert (f"warning: {tmp_path / 'metrics.json'} held the evaluation of {tiny_synthetic}; it "
            f"is replaced by this one of {copy} (--output_dir keeps both)") in caplog.text


def test_a_bad_image_late_in_the_split_leaves_the_earlier_evaluation_whole(
        tiny_synthetic, av_run, tmp_path):
    """All of an evaluation's files or none: a label of the wrong size in the last image used
    to leave the first image's new pictures beside the previous run's metrics.json."""
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data)
    out = tmp_path / "out"
    cfg = EvalConfig(model=str(av_run), dataset="synthetic", data_dir=str(data), visualize=True,
                     output_dir=str(out))
    evaluate(cfg)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "01_test_overlay.png" in before and "metrics.json" in before
    label = data / "test" / "1st_manual" / "02_manual1.gif"
    write_image_atomic(label, np.zeros((50, 50), np.uint8))
    first = data / "test" / "images" / "01_test.tif"  # so that 01's pictures would differ
    write_image_atomic(first, read_image(first)[::-1].copy())
    with pytest.raises(DatasetError, match="02"):
        evaluate(cfg)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a folder a killed evaluation left is removed by the next one
    stale = out / f"{STAGING_PREFIX}999999999"
    stale.mkdir()
    (stale / "01_test_prob.png").write_bytes(b"")
    write_image_atomic(label, np.zeros((96, 96), np.uint8))
    evaluate(cfg)
    assert not stale.exists() and not list(out.glob(f"{STAGING_PREFIX}*"))
    assert (out / "01_test_overlay.png").read_bytes() != before["01_test_overlay.png"]


def test_compare_writes_the_picture_and_a_table_row_per_run(tiny_synthetic, av_run,
                                                            tmp_path, capsys):
    test = tiny_synthetic / "test"
    labels = tmp_path / "one" / "test.txt"   # a one-image split keeps the shipped model quick
    labels.parent.mkdir()
    labels.write_text(f"{test / 'images'},{test / '1st_manual'},{test / 'mask'}\n"
                      "02_test.tif,02_manual1.gif,02_test_mask.gif\n")
    out = tmp_path / "out"
    result = compare(CompareConfig(runs=("unet_drive", str(av_run)),
                                   test_label_file_path=str(labels), image="02_test",
                                   output_dir=str(out)))
    assert result["task"] == "vessel" and result["image"] == "02_test"
    assert [r["run"] for r in result["rows"]] == ["unet_drive", str(av_run)]
    assert [r["model"] for r in result["rows"]] == ["unet", "unet"]
    # each run computes as evaluate's default (--precision=auto) would on this machine
    auto = Segmenter.from_pretrained("unet_drive", precision="auto").precision
    assert [r["precision"] for r in result["rows"]] == [auto, auto]
    # one image: the pooled F1 is the image's own
    assert all(r["f1"] == pytest.approx(r["image_f1"]) for r in result["rows"])
    text = (out / "compare.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| run | model | F1 | AUC-ROC | Se | Sp | Acc | threshold | computed |"
    assert len(table) == 2 + 2 and table[2].startswith("| unet_drive | unet | ")
    shipped = Segmenter.from_pretrained("unet_drive")
    assert table[2].endswith(f" | {shipped.threshold:g} | whole inference, {auto} |")
    assert "compared on the vessel channel" in text   # a vessel and an A/V model
    assert "| unet_drive | unet | " in capsys.readouterr().out
    picture = read_image(out / "compare.png")
    # photograph, ground truth and one panel per run, at the images' 96 px
    assert picture.shape[1] == 4 * 96 + 3 * GAP and picture.shape[0] > 96


def test_compare_of_av_runs_adds_the_av_columns(tiny_synthetic, av_run, tmp_path):
    result = compare(CompareConfig(runs=(str(av_run),), dataset="synthetic",
                                   data_dir=str(tiny_synthetic), image="1",
                                   output_dir=str(tmp_path)))
    assert result["task"] == "av" and set(result["rows"][0]) >= {"av_acc", "av_acc_ripav"}
    assert result["image"] == "02_test"   # by 0-based index
    header = (tmp_path / "compare.md").read_text().splitlines()[2]
    assert header.endswith("| A/V acc | A/V acc (RIP-AV) | threshold | computed |")
    # one run twice, however named, would be a row that compares nothing
    with pytest.raises(ConfigError, match=rf"--runs names {av_run.name} twice \({av_run} and "
                                          rf".*{av_run.name}/\): give each run once"):
        compare(CompareConfig(runs=(str(av_run), f"{av_run}/"), dataset="synthetic",
                              data_dir=str(tiny_synthetic), output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="--image=7: not an image of the split"):
        compare(CompareConfig(runs=(str(av_run),), dataset="synthetic",
                              data_dir=str(tiny_synthetic), image="7",
                              output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="--runs"):
        compare(CompareConfig(dataset="synthetic", data_dir=str(tiny_synthetic),
                              output_dir=str(tmp_path)))


def test_av_runs_on_images_without_av_labels_compare_their_vessel_maps(tiny_synthetic,
                                                                       av_run, tmp_path):
    """As evaluate scores an A/V model on a vessel-only set (it failed for want of A/V labels)."""
    test = tiny_synthetic / "test"
    labels = tmp_path / "one" / "test.txt"   # vessel labels only
    labels.parent.mkdir()
    labels.write_text(f"{test / 'images'},{test / '1st_manual'},{test / 'mask'}\n"
                      "02_test.tif,02_manual1.gif,02_test_mask.gif\n")
    result = compare(CompareConfig(runs=(str(av_run),), test_label_file_path=str(labels),
                                   output_dir=str(tmp_path / "c")))
    assert result["task"] == "vessel"
    assert "no artery/vein labels: compared on the vessel channel" in \
        (tmp_path / "c" / "compare.md").read_text()
    metrics = evaluate(EvalConfig(model=str(av_run), test_label_file_path=str(labels),
                                  output_dir=str(tmp_path / "e")))
    assert result["rows"][0]["f1"] == pytest.approx(metrics["metrics"]["f1"])
    with pytest.raises(ConfigError, match="--task=av: one has no artery/vein labels"):
        evaluate(EvalConfig(model=str(av_run), test_label_file_path=str(labels), task="av",
                            output_dir=str(tmp_path / "f")))  # asked for: not scored otherwise


def test_an_av_model_warns_of_a_gray_photograph(av_run, tiny_synthetic, caplog):
    photo = read_image(tiny_synthetic / "test" / "images" / "01_test.tif")
    seg = Segmenter.from_run(av_run)
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        seg.check_image_size(photo, "colour.png")
        seg.check_image_size(np.repeat(photo[..., 1:2], 3, axis=-1), "gray.png")
    assert "gray.png is a gray photograph: telling arteries from veins needs colour" in \
        caplog.text and "colour.png" not in caplog.text


def test_compare_on_training_images_warns_as_evaluate_does(tiny_synthetic, av_run, tmp_path,
                                                           caplog):
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        compare(CompareConfig(runs=(str(av_run),), dataset="synthetic",
                              data_dir=str(tiny_synthetic), eval_split="training",
                              output_dir=str(tmp_path)))
    assert f"have the names of images {av_run.name} trained on" in caplog.text
    # a training photograph as a test one (its labels too): told by its pixels
    data = shutil.copytree(tiny_synthetic, tmp_path / "data")
    trained_on = json.loads((av_run / "run.json").read_text())["data"]["training_images"][0]
    number = trained_on.split("_")[0]
    for folder, test, training in (("images", "01_test.tif", f"{trained_on}.tif"),
                                   ("1st_manual", "01_manual1.gif", f"{number}_manual1.gif"),
                                   ("mask", "01_test_mask.gif", f"{trained_on}_mask.gif"),
                                   ("av", "01_test.png", f"{trained_on}.png")):
        shutil.copy(data / "training" / folder / training, data / "test" / folder / test)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        compare(CompareConfig(runs=(str(av_run),), dataset="synthetic", data_dir=str(data),
                              output_dir=str(tmp_path / "test")))
    assert f"(01_test as {trained_on}) are, pixel for pixel, photographs " \
        f"{av_run.name} trained on" in caplog.text


@pytest.mark.slow
def test_compare_command_prints_the_table_and_names_a_bad_run(tiny_synthetic, av_run,
                                                              tmp_path):
    args = ["--dataset=synthetic", f"--data_dir={tiny_synthetic}", f"--output_dir={tmp_path}"]
    proc = commands.script("compare.py", *args, f"--runs={av_run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(f"| {av_run} | unet | ") == 1
    assert {p.name for p in tmp_path.iterdir()} >= {"compare.png", "compare.md"}
    proc = commands.script("compare.py", *args, "--runs=nowhere_run")
    assert proc.returncode == 1 and "--runs=nowhere_run" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_shipped_drive_model_per_image_on_two_real_images(shared_data, tmp_path):
    drive = shared_data / "DRIVE" / "test"
    labels = tmp_path / "drive2" / "test.txt"
    labels.parent.mkdir()
    labels.write_text(f"{drive / 'images'},{drive / '1st_manual'},{drive / 'mask'}\n"
                      "01_test.tif,01_manual1.gif,01_test_mask.gif\n"
                      "02_test.tif,02_manual1.gif,02_test_mask.gif\n")
    out = tmp_path / "out"
    report = evaluate(EvalConfig(model="unet_drive", test_label_file_path=str(labels),
                                 visualize=True, output_dir=str(out)))
    rows = report["per_image"]
    assert [r["name"] for r in rows] == ["01_test", "02_test"]
    assert all(0.78 < r["f1"] < 0.9 and 0.97 < r["auc_roc"] < 1 for r in rows)
    assert (out / "per_image.csv").read_text().count("\n") == 3
    assert read_image(out / "contact_sheet.png").shape[0] == _sheet_height(2)
    # the error overlay is drawn over the photograph: inside the FOV, most pixels are gray
    overlay = read_image(out / "01_test_overlay.png").astype(int)
    gray = (overlay[..., 0] == overlay[..., 1]) & (overlay[..., 1] == overlay[..., 2])
    assert gray.mean() > 0.8 and np.median(overlay[gray]) > 60


def test_runs_given_as_paths_are_titled_by_their_folder_names():
    from retina_tf.compare import _short_labels
    assert _short_labels(["logs/unet_drive_fast", "unet_drive"]) == ["unet_drive_fast",
                                                                     "unet_drive"]
    # two folders of one name keep their paths
    assert _short_labels(["a/run", "b/run"]) == ["a/run", "b/run"]


def test_compare_says_an_av_run_votes_where_it_does():
    """compare's log and computed column left the vote out where evaluate names it."""
    from retina_tf.compare import _computed
    seg = Segmenter.from_run("ripav_rite")
    assert seg.av_vote and seg.av_link
    assert _computed(seg, "av") == (seg.describe_inference() + ", one A/V decision per vessel "
                                    f"segment, linked across junctions (strength {seg.av_link:g})")
    assert _computed(seg, "vessel") == seg.describe_inference()  # the vote leaves vessels be
