"""The F1-optimal threshold: chosen on the held-out training images at the end of training,
stored in run.json, and used by evaluate, predict, compare, make_error_maps and export unless
--threshold is given."""

import json
import logging
import shutil

import keras
import numpy as np
import pytest

from retina_tf.compare import compare
from retina_tf.config import CompareConfig, ErrorMapConfig
from retina_tf.data.io import read_image, read_mask, read_sample
from retina_tf.data.pipeline import SegmentationSet, resolve_samples
from retina_tf.errors import ConfigError, DatasetError, ModelFileError
from retina_tf.evaluation import (
    AV_EVALUATIONS,
    MIN_TTA_GAIN,
    THRESHOLD_GRID,
    choose_av_evaluation,
    choose_threshold,
    choose_tta,
    evaluate,
    f1_by_threshold,
    predict,
    store_choice,
    threshold_choice,
    threshold_line,
    tta_choice_line,
    write_error_maps,
)
from retina_tf.export import deployer_notes, run_threshold
from retina_tf.flags import parse_config
from retina_tf.inference import Segmenter, stored_threshold
from retina_tf.metrics import ConfusionMatrix
from retina_tf.training import train

from .conftest import tiny_train_args

# --- the choice on hand-made scores ----------------------------------------------------------


def test_the_f1_optimal_threshold_is_where_the_scores_put_it():
    rng = np.random.default_rng(0)
    # vessels score in [0.415, 1), background in [0, 0.405): of the grid only 0.41 separates them
    vessel = rng.uniform(0.415, 1.0, 3000)
    background = rng.uniform(0.0, 0.405, 20000)
    scores = np.concatenate([vessel, background]).astype(np.float32)
    labels = np.arange(scores.size) < vessel.size
    choice = threshold_choice(scores, labels, ["a", "b"])
    assert choice["threshold"] == 0.41
    info = choice["threshold_from"]
    assert info["f1"] == 1.0 and info["images"] == ["a", "b"]
    found = np.sum(vessel >= 0.5)  # at 0.5: no false positive, the vessels below 0.5 missed
    assert info["f1_at_0.5"] == pytest.approx(2 * found / (found + vessel.size))


def test_a_gain_within_the_noise_keeps_one_half():
    rng = np.random.default_rng(1)
    labels = rng.random(20000) < 0.1
    # vessels a little more confident than 0.5 would need: the best threshold gains ~0.003 F1
    scores = np.where(labels, rng.uniform(0.45, 1.0, labels.size), rng.uniform(0, 0.6, labels.size))
    loose = threshold_choice(scores, labels, ["a"], min_gain=0.0)
    gain = loose["threshold_from"]["f1"] - loose["threshold_from"]["f1_at_0.5"]
    assert loose["threshold"] != 0.5 and 0 < gain
    kept = threshold_choice(scores, labels, ["a"], min_gain=gain + 1e-6)
    assert kept["threshold"] == 0.5 and kept["threshold_from"]["best"] == loose["threshold"]
    assert kept["threshold_from"]["f1"] == kept["threshold_from"]["f1_at_0.5"]
    assert "0.5 kept" in threshold_line(kept)


def test_equal_f1_prefers_the_threshold_nearest_one_half():
    scores = np.array([0.8] * 10 + [0.2] * 90, np.float32)  # any t in (0.2, 0.8] is perfect
    choice = threshold_choice(scores, np.arange(100) < 10, ["x"])
    assert choice["threshold"] == 0.5
    assert threshold_line(choice).endswith("; 0.5 is the best there)")


def test_the_sweep_counts_exactly_as_the_confusion_matrix():
    rng = np.random.default_rng(1)
    prob = rng.random((64, 64)).astype(np.float32)
    prob[:8, :8] = 0.37  # pixels exactly at a grid threshold are vessel (>=)
    label = rng.random((64, 64)) < prob
    for t, f1 in zip(THRESHOLD_GRID, f1_by_threshold(prob, label)):
        cm = ConfusionMatrix(threshold=t)
        cm.update(prob, label)
        assert f1 == pytest.approx(cm.result()["f1"], abs=1e-12), t


def _logit(p):
    return np.log(p / (1.0 - p)).astype(np.float32)


def test_only_vessel_labels_inside_the_fov_count():
    # a Segmenter over an identity network: the "preprocessed image" is the logit map itself
    inputs = keras.Input((None, None, 1))
    seg = Segmenter(keras.Model(inputs, keras.layers.Identity()(inputs)), None,
                    size_multiple=1, inference="whole")
    target = np.zeros((40, 40, 1), np.float32)
    target[10:20, 10:30] = 1
    fov = np.zeros((40, 40), bool)
    fov[5:35, 5:35] = True
    prob = np.where(target > 0, 0.625, 0.585)
    prob[:4] = 0.615  # background outside the FOV: counted, it would move the choice to 0.62
    images = SegmentationSet(["one"], [_logit(prob)], [target], [fov])
    choice = choose_threshold(seg, images)
    # perfect for every t in (0.585, 0.625]: of 0.59 ... 0.62 the one nearest 0.5
    assert choice["threshold"] == 0.59 and choice["threshold_from"]["f1"] == pytest.approx(1.0)
    with pytest.raises(DatasetError, match="no vessel pixel"):
        choose_threshold(seg, SegmentationSet(["none"], [_logit(prob)], [target * 0], [fov]))


def test_where_a_run_without_a_stored_threshold_gets_one(tmp_path):
    assert stored_threshold({}, tmp_path) == (0.5, "the default: the run stores none")
    (tmp_path / "flags.txt").write_text("--model=unet\n--threshold=0.4\n")  # an older version's
    assert stored_threshold({}, tmp_path)[0] == 0.4
    assert stored_threshold({"threshold": 0.3}, tmp_path)[0] == 0.3  # run.json comes first
    for bad in (1.5, 0.0, "0.4", float("nan")):
        with pytest.raises(ModelFileError, match=r"run\.json.*threshold"):
            stored_threshold({"threshold": bad}, tmp_path)


def test_a_runs_flags_txt_as_flagfile_gives_no_threshold(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "flags.txt").write_text("--model=unet\n--threshold=0.5\n")
    assert parse_config("evaluate", [f"--flagfile={tmp_path / 'flags.txt'}"]).threshold is None
    (tmp_path / "mine.cfg").write_text("--threshold=0.5\n")  # the user's flagfile: given
    assert parse_config("predict", [f"--flagfile={tmp_path / 'mine.cfg'}"]).threshold == 0.5
    assert parse_config("predict", []).threshold is None


# --- a tiny training run ---------------------------------------------------------------------

class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny_run(tiny_synthetic, tmp_path_factory):
    lines = _Lines()
    logging.getLogger("retina_tf").addHandler(lines)
    try:
        run = train(parse_config("train", tiny_train_args(
            tiny_synthetic, tmp_path_factory.mktemp("threshold_logs"), "--epochs=2",
            "--image_summary_every=0", "--choose_tta")))
    finally:
        logging.getLogger("retina_tf").removeHandler(lines)
    return tiny_synthetic, run, lines.lines


@pytest.mark.slow
def test_training_stores_the_threshold_of_its_held_out_images(tiny_run):
    data, run, lines = tiny_run
    info = json.loads((run / "run.json").read_text())
    chosen, source = info["threshold"], info["threshold_from"]
    assert chosen in THRESHOLD_GRID and source["f1"] >= source["f1_at_0.5"]
    assert source["images"] == info["data"]["validation_images"] and len(source["images"]) == 1
    assert threshold_line(info) in lines
    # the same image read and segmented as evaluate does gives the same figures
    held_out = [s for s in resolve_samples("synthetic", data, "training")
                if s.name in source["images"]]
    plain = Segmenter.from_run(run, tta=False)  # as the threshold was chosen
    again = choose_threshold(plain, held_out)["threshold_from"]
    assert again["f1_at_0.5"] == pytest.approx(source["f1_at_0.5"], abs=1e-4)
    assert max(f1_by_threshold(*_pixels(run, held_out))) == pytest.approx(
        source.get("best_f1", source["f1"]), abs=1e-4)
    # --choose_tta: the flips' choice on the same image, at that threshold
    tta = info["tta_from"]
    assert tta["images"] == source["images"] and tta["threshold"] == chosen
    assert info["tta"] == (tta["f1_tta"] - tta["f1"] >= MIN_TTA_GAIN)
    assert tta_choice_line(info) in lines
    again = choose_tta(run, held_out, threshold=chosen)["tta_from"]
    assert (again["f1"], again["f1_tta"]) == pytest.approx((tta["f1"], tta["f1_tta"]), abs=1e-4)


def _pixels(run, samples):
    seg = Segmenter.from_run(run, tta=False)
    data = read_sample(samples[0])
    prob = seg.probability_at_inference_scale(data.image, data.fov)[..., -1]
    return prob[data.fov], data.vessel[data.fov]


def _copy_of(run, tmp_path, **fields):
    """A copy of the run folder with these run.json fields set; the copy and its run.json."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**info, **fields}))
    return copy, info


@pytest.mark.slow
def test_every_command_uses_the_stored_threshold_unless_given_one(tiny_run, tmp_path, capsys):
    data, run, _ = tiny_run
    copy, _ = _copy_of(run, tmp_path, threshold=0.9, tta=False)
    with open(copy / "flags.txt", "a") as f:
        f.write("--threshold=0.5\n")  # an older version's line: no override
    # evaluated with the run's own flags.txt as flagfile (it names the dataset); in float32,
    # as the Segmenter and compare below, also on CPUs where --precision=auto means bfloat16
    args = [f"--flagfile={copy / 'flags.txt'}", f"--model={copy}", "--precision=float32"]

    def evaluated(name, *extra):
        return evaluate(parse_config("evaluate", args + [f"--output_dir={tmp_path / name}",
                                                         *extra]))

    stored = evaluated("stored")
    assert stored["threshold"] == 0.9
    assert json.loads((tmp_path / "stored" / "metrics.json").read_text())["threshold"] == 0.9
    given = evaluated("given", "--threshold=0.9")
    assert given["metrics"] == stored["metrics"] and given["threshold_source"] == "--threshold"
    half = evaluated("half", "--threshold=0.5")
    m, h = stored["metrics"], half["metrics"]
    assert h["tp"] + h["fp"] > m["tp"] + m["fp"]  # 0.5 marks more
    out = capsys.readouterr().out
    assert "threshold 0.9 (the run's, chosen on its 1 held-out training image)" in out
    assert "threshold 0.5 (--threshold)" in out

    photo = resolve_samples("synthetic", data, "test")[0].image
    masks = {}
    for name, extra in (("stored", []), ("half", ["--threshold=0.5"])):
        predict(parse_config("predict", [f"--model={copy}", f"--input={photo}",
                                         f"--output_dir={tmp_path / ('p_' + name)}",
                                         "--precision=float32", *extra]))
        masks[name] = read_mask(tmp_path / f"p_{name}" / f"{photo.stem}_mask.png")
    prob, mask = Segmenter.from_run(copy).segment(read_image(photo))  # the run's threshold
    np.testing.assert_array_equal(mask[..., 0], prob[..., 0] >= 0.9)
    np.testing.assert_array_equal(masks["stored"], mask[..., 0])
    assert masks["half"].sum() > masks["stored"].sum()

    rows = compare(CompareConfig(runs=(str(copy),), dataset="synthetic", data_dir=str(data),
                                 output_dir=str(tmp_path / "compare"),
                                 precision="float32"))["rows"]
    assert rows[0]["f1"] == pytest.approx(stored["metrics"]["f1"])
    maps = write_error_maps(ErrorMapConfig(model=str(copy), dataset="synthetic",
                                           data_dir=str(data), output_dir=str(tmp_path / "maps")))
    assert json.loads((maps / "error_maps.json").read_text())["threshold"] == 0.9
    assert run_threshold(copy) == 0.9


@pytest.mark.slow
def test_a_runs_tta_choice_is_used_unless_the_flag_says_otherwise(tiny_run, tmp_path, capsys):
    data, run, _ = tiny_run
    copy, info = _copy_of(run, tmp_path, threshold=0.5, tta=False)
    held_out = [s for s in resolve_samples("synthetic", data, "training")
                if s.name in info["data"]["validation_images"]]
    choice = choose_tta(copy, held_out)
    # its two F1s are those the threshold's choice counts with and without the flips
    for tta, key in ((False, "f1"), (True, "f1_tta")):
        again = choose_threshold(Segmenter.from_run(copy, tta=tta), held_out)["threshold_from"]
        assert choice["tta_from"][key] == pytest.approx(again["f1_at_0.5"], abs=1e-6)
    gain = choice["tta_from"]["f1_tta"] - choice["tta_from"]["f1"]
    assert choice["tta"] == (gain >= MIN_TTA_GAIN)
    assert Segmenter.from_run(copy).tta is False  # the run's choice: off
    store_choice(copy, {**choice, "tta": True})
    assert Segmenter.from_run(copy).tta is True
    assert Segmenter.from_run(copy, tta=False).tta is False

    photo = resolve_samples("synthetic", data, "test")[0].image
    masks = {}
    for name, extra in (("run", []), ("notta", ["--notta"])):
        predict(parse_config("predict", [f"--model={copy}", f"--input={photo}",
                                         f"--output_dir={tmp_path / name}",
                                         "--precision=float32", *extra]))
        masks[name] = read_mask(tmp_path / name / f"{photo.stem}_mask.png")
    out = capsys.readouterr().out
    assert out.count("flip TTA (the run's choice: F1 ") == 1  # not with --notta
    for tta, name in ((True, "run"), (False, "notta")):
        mask = Segmenter.from_run(copy, tta=tta, precision="float32").segment(
            read_image(photo))[1]
        np.testing.assert_array_equal(masks[name], mask[..., 0])
    # an export without the flips tells a deployer to add them (a SavedModel holds them)
    assert any("flip TTA" in note for note in deployer_notes(Segmenter.from_run(copy), "onnx"))
    assert not any("flip" in note for note in deployer_notes(Segmenter.from_run(copy),
                                                             "saved_model"))
    (copy / "run.json").write_text(json.dumps({**info, "tta": "yes"}))
    with pytest.raises(ModelFileError, match="\"tta\": 'yes' is neither true nor false"):
        Segmenter.from_run(copy, tta=False)
    (copy / "run.json").write_text(json.dumps({**info, "av_vote": 1}))
    with pytest.raises(ModelFileError, match="\"av_vote\": 1 is neither true nor false"):
        Segmenter.from_run(copy)


def test_an_av_models_own_tta_and_vote_are_used_unless_the_flags_say_otherwise(tmp_path, caplog):
    # the shipped A/V models hold the evaluation chosen on ripav_rite's held-out images: the 8
    # flips and transposes, and one decision per vessel segment
    from retina_tf.data.io import write_image_atomic
    from retina_tf.data.synthetic import generate_fundus
    assert {(s.tta, s.tta_transpose, s.av_vote) for s in (
        Segmenter.from_pretrained("ripav_rite"), Segmenter.from_pretrained("ripav_general"))} \
        == {(True, True, True)}
    photo = tmp_path / "photo.png"
    write_image_atomic(photo, generate_fundus(6, size=(128, 128)).image)
    settings = {"run": [], "plain": ["--notta", "--noav_vote"], "notta": ["--notta"]}
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        for name, extra in settings.items():
            predict(parse_config("predict", ["--model=ripav_rite", f"--input={photo}",
                                             f"--output_dir={tmp_path / name}",
                                             "--inference_scale=native",
                                             "--save_probabilities", *extra]))
    assert "tta_transpose" not in caplog.text  # --notta drops the run's transposes with it
    out = caplog.text
    assert out.count("flip and transpose TTA and one A/V decision per vessel segment (the run's "
                     "choice: A/V accuracy 0.934 against 0.905 on its 2 held-out training "
                     "images); --notta --noav_vote is about 7x faster") == 1
    assert out.count("one A/V decision per vessel segment (the run's choice); --noav_vote") == 1
    for name, (tta, vote) in {"run": (True, True), "plain": (False, False),
                              "notta": (False, True)}.items():
        seg = Segmenter.from_pretrained("ripav_rite", tta=tta, tta_transpose=tta, av_vote=vote,
                                        inference_scale="native")
        np.testing.assert_allclose(np.load(tmp_path / name / "photo_prob.npy"),
                                   seg.segment(read_image(photo))[0], atol=1e-6)


@pytest.mark.slow
def test_an_av_training_chooses_its_tta_and_vote_on_its_held_out_images(tiny_synthetic,
                                                                        tmp_path):
    lines = _Lines()
    logging.getLogger("retina_tf").addHandler(lines)
    try:
        run = train(parse_config("train", tiny_train_args(
            tiny_synthetic, tmp_path, "--task=av", "--epochs=1", "--image_summary_every=0",
            "--choose_tta")))
    finally:
        logging.getLogger("retina_tf").removeHandler(lines)
    info = json.loads((run / "run.json").read_text())
    source = info["tta_from"]
    acc = source["evaluations"]
    assert list(acc) == [name for name, *_ in AV_EVALUATIONS]  # trained with --rot90
    # the chosen one beats each cheaper one by the gain, and no costlier one beats it so
    names = list(acc)
    chosen = names.index(source["chosen"])
    assert all(acc[names[chosen]] - acc[n] >= MIN_TTA_GAIN for n in names[:chosen])
    assert not any(all(acc[n] - acc[m] >= MIN_TTA_GAIN for m in names[:i])
                   for i, n in enumerate(names) if i > chosen)
    switches = dict(zip(names, (e[1:] for e in AV_EVALUATIONS)))[source["chosen"]]
    assert (info["tta"], info["tta_transpose"], info["av_vote"]) == switches
    assert source["av_acc"] == acc["once"] and source["av_acc_chosen"] == acc[source["chosen"]]
    assert tta_choice_line(info) in lines.lines
    # the same image read and segmented as evaluate does gives the same accuracies
    held_out = [s for s in resolve_samples("synthetic", tiny_synthetic, "training")
                if s.name in source["images"]]
    again = choose_av_evaluation(run, held_out, threshold=info["threshold"])["tta_from"]
    assert again["evaluations"] == pytest.approx(acc, abs=1e-3)
    seg = Segmenter.from_run(run)  # and evaluate, predict segment so
    assert (seg.tta, seg.tta_transpose, seg.av_vote) == switches
    # an export of the network tells a deployer to add what the run chose, and only that; a
    # SavedModel holds the views, not the vote
    notes = " ".join(deployer_notes(seg, "onnx"))
    assert ("flips" in notes, "transposes" in notes, "vote_av_segments" in notes) == switches
    notes = " ".join(deployer_notes(seg, "saved_model"))
    assert ("flips" in notes, "vote_av_segments" in notes) == (False, switches[2])
    with pytest.raises(ConfigError, match="segments vessels only"):
        choose_av_evaluation("unet_drive", held_out)


def test_the_av_choice_line_says_once_was_kept_and_by_how_little_another_won():
    # it read "once made the run's default (A/V accuracy 0.4364 against 0.4364 once, ...)"
    acc = {"once": 0.4364, "the vote": 0.4370, "flips": 0.4350}
    info = {"tta_from": {"images": ["a", "b"], "av_acc": 0.4364, "av_acc_chosen": 0.4364,
                         "chosen": "once", "evaluations": acc}}
    assert tta_choice_line(info) == (
        "once (no TTA, no vote) kept as the run's default (A/V accuracy 0.4364; the best "
        f"other, the vote, 0.4370: less than {MIN_TTA_GAIN:g} more, on the 2 held-out images)")
    info["tta_from"].update(chosen="the vote", av_acc_chosen=0.4370)
    assert tta_choice_line(info).startswith("the vote made the run's default (A/V accuracy "
                                            "0.4370 against 0.4364 once")
