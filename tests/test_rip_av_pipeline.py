"""RIP-AV end to end on tiny synthetic A/V data: bin/generate_rip_patches.py, bin/pretrain_rip.py,
rip_av training from the RIP run (task inferred, distance targets, context crops), sliding-window
evaluation with A/V metrics and pictures."""

import json
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_tf.data.catalog import list_samples
from retina_tf.data.io import DatasetError, read_image, read_sample
from retina_tf.data.labelfile import write_label_file
from retina_tf.data.pipeline import with_context
from retina_tf.data.synthetic import write_synthetic_dataset
from retina_tf.evaluation import evaluate, predict
from retina_tf.flags import parse_config
from retina_tf.inference import Segmenter, artery_share
from retina_tf.models.rip_av import RIPAV
from retina_tf.pretraining import pretrain_rip, read_rip_records
from retina_tf.training import train
from tests import commands

REPO = Path(__file__).resolve().parents[1]
ENCODER = '"widths": [8, 8, 16, 16], "depths": [1, 1, 1]'


def test_with_context_splits_wide_crops_into_centre_and_context():
    x = tf.reshape(tf.range(2 * 8 * 8, dtype=tf.float32), (2, 8, 8, 1))
    y, w = x + 1000, tf.ones_like(x)
    (inputs, y2, w2), = with_context(tf.data.Dataset.from_tensors((x, y, w)), 4, 2).take(1)
    np.testing.assert_array_equal(inputs["image"], x[:, 2:6, 2:6])
    np.testing.assert_array_equal(y2, y[:, 2:6, 2:6])
    assert w2.shape == (2, 4, 4, 1)
    # area resize of the whole 8x8 crop to 2x2: the mean of each 4x4 quarter
    np.testing.assert_allclose(inputs["context"][0, 0, 0, 0], np.mean(x[0, :4, :4, 0]))


@pytest.fixture(scope="module")
def rip_run(tmp_path_factory):
    data = write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_images=6, num_test=2,
                                   seed=4, size=(96, 96))
    logdir = tmp_path_factory.mktemp("runs")
    patches = logdir / "rip_patches"
    common = ["--dataset=synthetic", f"--data_dir={data}", f"--rip_patches={patches}",
              "--preprocess=standardize,clahe,gamma"]
    for script, extra in (("generate_rip_patches.py", ["--rip_sizes=24,48", "--rip_out_size=32",
                                                       "--rip_per_class=20",
                                                       "--rip_min_fraction=0.02"]),
                          ("pretrain_rip.py", [f"--logdir={logdir}", "--run_name=rip",
                                               "--val_images=1",
                                               "--model_config={" + ENCODER + "}",
                                               "--epochs=2", "--patches_per_epoch=64",
                                               "--batch_size=16", "--learning_rate=0.003"])):
        proc = commands.script(script, *common, *extra, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return data, logdir, proc.stdout


@pytest.mark.slow
def test_rip_pretraining_writes_a_run_folder(rip_run):
    data, logdir, stdout = rip_run
    run = logdir / "rip"
    for name in ("model.keras", "preprocessor.json", "run.json", "flags.txt", "metrics.json"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["model"] == "rip_classifier" and info["input_channels"] == 3
    # patches of the validation image (the last training image) are left out
    records, _ = read_rip_records(logdir / "rip_patches")
    assert info["patches"] < len(records) and "06_training" not in info["images"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["loss_history"]) == 2 and 0 <= metrics["held_out"]["accuracy"] <= 1
    assert "held-out patches: accuracy" in stdout
    # the same image names in another folder: the patches are not that folder's
    copy = logdir / "syn_copy"
    shutil.copytree(data, copy)
    cfg = parse_config("pretrain_rip", ["--dataset=synthetic", f"--data_dir={copy}",
                                        f"--rip_patches={logdir / 'rip_patches'}",
                                        f"--logdir={logdir}", "--run_name=rip_copy"])
    with pytest.raises(DatasetError, match=rf"its patches come from synthetic in {data}, not "
                                           rf"from the training images of .* in {copy}"):
        pretrain_rip(cfg)
    assert not (logdir / "rip_copy").exists()


@pytest.mark.slow
def test_rip_av_fine_tunes_from_the_rip_run_and_evaluates(rip_run, tmp_path):
    data, logdir, _ = rip_run
    cfg = parse_config("train", [
        "--dataset=synthetic", f"--data_dir={data}", f"--logdir={logdir}", "--run_name=ripav",
        "--model=rip_av", "--model_config={" + ENCODER + ', "context_size": 32, "av_weight": 1.0}',
        "--pretrained=rip", "--preprocess=standardize,clahe,gamma", "--patch_size=32",
        "--batch_size=4", "--patches_per_epoch=16", "--epochs=2", "--val_images=1",
        "--inference=sliding", "--stride=16", "--image_summary_every=0"])
    assert cfg.task is None  # not given: rip_av makes it av
    run = train(cfg)
    info = json.loads((run / "run.json").read_text())
    assert info["task"] == "av" and info["num_classes"] == 3
    assert info["pretrained"] == str(logdir / "rip")
    # the artery share of its training labels, for the warning of a far-off A/V decision
    shares = [artery_share(d.av, d.fov) for d in map(read_sample, list_samples(
        "synthetic", data, "training")) if d.name in info["data"]["training_images"]]
    assert info["artery_share"] == {"min": pytest.approx(min(shares)),
                                    "max": pytest.approx(max(shares)), "images": len(shares)}
    assert 0 < min(shares) < max(shares) < 1
    model = keras.saving.load_model(run / "model.keras", compile=False)
    assert isinstance(model, RIPAV) and model.distance_head and model.context_fusion
    assert model.av_weight == 1.0

    # every sliding window gets the whole image as context: a window equal to the image gives
    # the whole-image result
    seg = Segmenter.from_run(run)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    whole = Segmenter.from_run(run, inference="whole").probability(image)
    sliding = Segmenter.from_run(run, inference="sliding", window=64, stride=64).probability(image)
    np.testing.assert_allclose(sliding, whole, atol=1e-5)
    assert seg.probability(image).shape == (64, 64, 3)
    # a zero override is a setting of its own here, not "the default"
    assert seg.av_link == 1.0 and Segmenter.from_run(run, av_link=0.0).av_link == 0.0

    out = tmp_path / "eval"
    # predict writes the A/V picture and each class's probability map
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sorted((data / "test" / "images").iterdir())[0], photos / "p.tif")
    predict(parse_config("predict", [f"--model={run}", f"--input={photos}",
                                     f"--output_dir={tmp_path / 'pred'}", "--save_probabilities",
                                     "--inference=sliding"]))
    prob = np.load(tmp_path / "pred" / "p_prob.npy")
    assert prob.shape[-1] == 3 and prob.dtype == np.float32
    for i, name in enumerate(("artery", "vein", "vessel")):
        png = read_image(tmp_path / "pred" / f"p_{name}.png")[..., 0]  # grey, read as RGB
        assert np.abs(png / 255.0 - prob[..., i]).max() <= 0.5 / 255 + 1e-6, name
    assert read_image(tmp_path / "pred" / "p_av.png").shape[-1] == 3
    # flags.txt holds the training settings; how to evaluate is evaluate's own flags
    # in float32, as error_sources below, also where --precision=auto means bfloat16
    result = evaluate(parse_config("evaluate", [f"--flagfile={run / 'flags.txt'}",
                                                "--precision=float32",
                                                f"--output_dir={out}", "--visualize",
                                                "--inference=sliding"]))["metrics"]
    for key in ("av_acc", "av_se", "av_sp", "av_f1", "f1", "auc_roc", "av_auc_artery",
                "av_auc_vein"):
        assert 0.0 <= result[key] <= 1.0, key
    # RIP-AV's own protocol is reported beside the all-pixel figure (NaN only if nothing counts)
    assert "av_acc_ripav" in result and "av_se_ripav" in result
    assert (out / "01_test_av_errors.png").is_file() and (out / "01_test_av_truth.png").is_file()
    assert not (out / "01_test_av.png").exists()  # predict's A/V map: another picture
    # The thin / thick split partitions the counted pixels, and its accuracies average back.
    thin, thick = result["av_thin_pixels"], result["av_thick_pixels"]
    assert thin > 0 and thick > 0 and thin + thick == result["av_n_pixels"]
    # on a set with vessel labels only, the model's vessel channel is scored: the figures of the
    # A/V evaluation's vessel table
    labels = write_label_file(tmp_path / "vessels.txt", list_samples("synthetic", data, "test"))
    vessels = evaluate(parse_config("evaluate", [
        f"--model={run}", f"--test_label_file_path={labels}", "--precision=float32",
        f"--output_dir={tmp_path / 'eval_vessels'}", "--inference=sliding"]))["metrics"]
    assert "av_acc" not in vessels
    for key in ("f1", "auc_roc", "tp", "fp", "fn"):
        assert vessels[key] == pytest.approx(result[key], abs=1e-6), key
    np.testing.assert_allclose(result["av_thin_acc"] * thin + result["av_thick_acc"] * thick,
                               result["av_acc"] * (thin + thick), rtol=1e-9)
    # one decision per vessel segment changes the A/V decisions only, never the vessel map
    voted = evaluate(parse_config("evaluate", [f"--flagfile={run / 'flags.txt'}",
                                               "--precision=float32",
                                               f"--output_dir={out}_vote", "--av_vote",
                                               "--inference=sliding"]))
    assert voted["av_vote"] is True and voted["av_link"] == 1.0
    for key in ("f1", "auc_roc", "tp", "fp"):
        assert voted["metrics"][key] == result[key], key
    assert voted["metrics"]["av_n_pixels"] == result["av_n_pixels"]

    # the error-source benchmark runs on such a run; true A/V evidence is its ceiling row
    def error_sources(models):
        proc = commands.run([sys.executable, REPO / "bench" / "av_error_sources.py",
                             f"--model={models}", "--dataset=synthetic", f"--data_dir={data}",
                             "--stride=16", "--notta"], timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.splitlines()
        return lines[-6], {line[:46].strip(): [float(v) for v in line[46:].split()]
                           for line in lines[-4:]}

    _, rows = error_sources(str(run))
    assert list(rows) == ["network alone", "+ segment vote (av_link 1)",
                          "the vote on the ground-truth vessel map",
                          "true A/V evidence on the predicted segments"]
    assert all(0.0 <= v <= 1.0 for values in rows.values() for v in values[:3])
    # RIP-AV's protocol counts nothing when the clean-up removes every (tiny) predicted vessel
    assert all(np.isnan(v) or 0.0 <= v <= 1.0 for values in rows.values() for v in values[3:])
    # its network row is what evaluate counts
    assert rows["network alone"][0] == pytest.approx(result["av_acc"], abs=5e-4)
    assert rows["true A/V evidence on the predicted segments"][0] > rows["network alone"][0]
    # an ensemble scores the mean of its runs' probabilities: a run twice scores as the run
    title, twice = error_sources(f"{run},{run}")
    assert title.startswith("the mean of 2 runs")
    np.testing.assert_equal(twice, rows)  # NaN (nothing counted) equals NaN here
    # both protocols for every evaluation; its sliding + flip TTA row is evaluate's with --tta
    proc = commands.run([sys.executable, REPO / "bench" / "av_protocols.py", f"--model={run}",
                         "--dataset=synthetic", f"--data_dir={data}", "--stride=16"],
                        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in proc.stdout.splitlines()[-10:]}
    assert len(table) == 10 and {"whole, 8-view TTA + linked vote",
                                 "sliding, 8-view TTA + linked vote"} <= set(table)
    # its plain sliding row is av_error_sources' "network alone", by both protocols
    assert float(table["sliding windows"][2]) == pytest.approx(rows["network alone"][0],
                                                               abs=5e-4)
    assert float(table["sliding windows"][3]) == pytest.approx(rows["network alone"][3],
                                                               abs=5e-4, nan_ok=True)


def test_pretrain_rip_without_patches_says_what_to_run(tmp_path):
    from retina_tf.pretraining import pretrain_rip
    data = write_synthetic_dataset(tmp_path / "syn", num_images=3, num_test=1, seed=6,
                                   size=(64, 64))
    cfg = parse_config("pretrain_rip", ["--dataset=synthetic", f"--data_dir={data}",
                       f"--rip_patches={tmp_path / 'none'}", f"--logdir={tmp_path}"])
    with pytest.raises(DatasetError, match="run bin/generate_rip_patches.py"):
        pretrain_rip(cfg)


@pytest.mark.parametrize("model,script", [("rip_classifier", "pretrain_rip.py"),
                                          ("mae", "pretrain_mae.py")])
def test_train_refuses_pre_training_models(model, script, tmp_path):
    data = write_synthetic_dataset(tmp_path / "syn", num_images=2, num_test=1, seed=6,
                                   size=(32, 32))
    cfg = parse_config("train", ["--dataset=synthetic", f"--data_dir={data}", f"--model={model}",
                       f"--logdir={tmp_path}"])
    with pytest.raises(ValueError, match=f"pre-training model: run bin/{script}"):
        train(cfg)


def test_rip_pre_training_batches_are_the_same_for_a_seed():
    """Its flips and turns were unseeded: --seed gave other batches, and losses, every run."""
    from retina_tf.pretraining import rip_dataset
    rng = np.random.default_rng(0)
    x = rng.random((12, 8, 8, 1), np.float32)
    y = rng.random((12, 2)).astype(np.float32)

    def batches(seed):
        return [b[0].numpy() for b in rip_dataset(x, y, 4, seed).take(6)]

    first = batches(3)
    np.testing.assert_array_equal(np.stack(first), np.stack(batches(3)))
    assert not np.array_equal(np.stack(first), np.stack(batches(4)))
    # augmented: some patches are not any patch as it was
    assert any(not any(np.array_equal(p, q) for q in x) for b in first for p in b)
