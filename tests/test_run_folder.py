"""Run folders that survive kills, full disks and reruns (retina_tf.run_folder via train())."""

import errno
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from retina_tf.config import EvalConfig
from retina_tf.errors import ConfigError, DatasetError, ModelFileError, OutputError
from retina_tf.evaluation import evaluate
from retina_tf.flags import parse_config
from retina_tf.inference import Segmenter, load_keras_model
from retina_tf.run_folder import (
    RunBusyError,
    clear_run_folder,
    find_run,
    flag_differences,
    hold_run,
    parse_flag_lines,
    reading_run,
    remove_stray_temporaries,
    save_weights_file,
    weights_file_is_whole,
)
from retina_tf.training import TimeBudget, train
from tests import commands
from tests.conftest import tiny_train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def synthetic(tiny_synthetic) -> Path:
    return tiny_synthetic


def tiny_args(data_dir, logdir, *extra):
    return tiny_train_args(data_dir, logdir, "--image_summary_every=0", *extra)


def tiny_flags(data_dir, logdir, *extra):
    return parse_config("train", tiny_args(data_dir, logdir, *extra))


class _Interrupt(keras.callbacks.Callback):
    """Stands in for a kill after the backup of ``after_epoch`` (1-based) is written."""

    def __init__(self, after_epoch: int):
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.after_epoch:
            raise KeyboardInterrupt(f"simulated kill after epoch {self.after_epoch}")


def _interrupted(synthetic, logdir, after_epoch=2, *extra) -> Path:
    with pytest.raises(KeyboardInterrupt):
        train(tiny_flags(synthetic, logdir, *extra), extra_callbacks=[_Interrupt(after_epoch)])
    return Path(logdir) / "tiny"


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_a_resumed_run_equals_an_uninterrupted_one(synthetic, tmp_path, capsys):
    # dropout: the random generators' state is restored too (Keras does not save it); the
    # weight average: backups hold it in the model, the raw weights in the optimizer (the kill
    # harness resumes runs without it)
    extra = ("--dropout=0.2", "--ema_momentum=0.9")
    whole = train(tiny_flags(synthetic, tmp_path / "whole", *extra))
    run = _interrupted(synthetic, tmp_path / "killed", 2, *extra)
    assert (f"the epochs completed are kept in {run / 'backup'}: the same command goes on "
            "after the last of them") in capsys.readouterr().out
    train(tiny_flags(synthetic, tmp_path / "killed", *extra))
    a, b = _metrics(whole), _metrics(run)
    # data order, optimizer state and schedule continue: the same losses and scores per epoch
    assert b["loss_history"] == pytest.approx(a["loss_history"], rel=1e-4)
    assert b["history"]["val_f1"] == pytest.approx(a["history"]["val_f1"], abs=1e-4)
    # the best score was restored, so the same epoch is chosen (not the first after restart)
    assert b["best_checkpoint"]["epoch"] == a["best_checkpoint"]["epoch"]
    assert b["training_minutes"] >= 0 and b["epochs_run"] == 4
    wa = load_keras_model(whole / "model.keras").get_weights()
    wb = load_keras_model(run / "model.keras").get_weights()
    assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(wa, wb))


def test_a_run_does_not_go_on_with_other_data_than_it_began_with(synthetic, tmp_path):
    """A label file edited or an image replaced between the kill and the rerun: the run went on
    with its preprocessing fitted anew and run.json rewritten, in silence."""
    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    run = _interrupted(data, tmp_path)
    images = sorted((data / "training" / "images").glob("*.tif"))
    first = images[0].read_bytes()
    # the same names, another photograph (a test one: one of the set twice is refused anyway)
    images[0].write_bytes((data / "test" / "images" / "01_test.tif").read_bytes())
    with pytest.raises(ConfigError, match=rf"{run} began training on other data: now "
                                          rf"{images[0].stem} with other pixels .*--overwrite"):
        train(tiny_flags(data, tmp_path))
    images[0].write_bytes(first)
    for folder in ("images", "1st_manual", "mask", "av"):  # one training image fewer
        for path in (data / "training" / folder).glob(images[-1].name.split("_")[0] + "_*"):
            path.unlink()
    with pytest.raises(ConfigError, match=r"began training on other data: now training images "
                                          r"without \d+_training; validation images without "
                                          r"06_training"):
        train(tiny_flags(data, tmp_path))
    assert (run / "backup").is_dir()  # the interrupted run is kept as it was


def test_a_second_training_in_the_same_process_is_refused_while_one_runs(synthetic, tmp_path):
    """Two threads trained at once in one process: the run folder was no one's to lock (the
    second got 'cannot write run.json') and the global seeds both set changed the other's
    losses."""
    done = {}
    first = threading.Thread(target=lambda: done.update(run=train(tiny_flags(
        synthetic, tmp_path / "a", "--epochs=3"))))
    first.start()
    deadline = time.monotonic() + 120
    while not (tmp_path / "a" / "tiny").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(RunBusyError, match="another thread of this process is training"):
        train(tiny_flags(synthetic, tmp_path / "b"))
    first.join()
    assert (done["run"] / "model.keras").is_file() and not (tmp_path / "b").exists()


def test_a_logdir_or_run_folder_that_is_a_file_is_said_in_one_line(synthetic, tmp_path):
    """From Python it was a NotADirectoryError (the commands map any OSError to two lines)."""
    (tmp_path / "logs").write_text("a file")
    with pytest.raises(ConfigError, match=rf"--logdir={tmp_path / 'logs'} is a file, not a "
                                          "folder: give a folder"):
        train(tiny_flags(synthetic, tmp_path / "logs"))
    (tmp_path / "logs").unlink()
    (tmp_path / "logs").mkdir()  # a file where the run folder goes
    (tmp_path / "logs" / "tiny").write_text("a file")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'logs' / 'tiny'} is a file, not a run "
                                          "folder: move it, or give another --run_name"):
        train(tiny_flags(synthetic, tmp_path / "logs"))


def test_a_run_going_on_under_another_strategy_is_noted(synthetic, tmp_path, caplog):
    """train_distribute's run resumed by train.py went on with other replicas in silence."""
    run = _interrupted(synthetic, tmp_path, 2, "--strategy=mirrored")
    train(tiny_flags(synthetic, tmp_path))
    assert f"note: {run.name} began with --strategy=mirrored --logical_cpus=0 and goes on " \
        "with --strategy=auto --logical_cpus=0" in caplog.text
    assert _metrics(run)["epochs_run"] == 4


def test_an_unreadable_backup_is_moved_aside_and_the_previous_one_used(synthetic, tmp_path,
                                                                         capsys):
    run = _interrupted(synthetic, tmp_path)
    newest = run / "backup" / "epoch-0002.weights.h5"
    newest.write_bytes(newest.read_bytes()[:1000])  # a partial file
    # the best checkpoint damaged too: the best epoch so far cannot be kept, and it is said
    best = run / "checkpoints" / "best.weights.h5"
    best.write_bytes(best.read_bytes()[:1000])
    train(tiny_flags(synthetic, tmp_path))
    out = "".join(capsys.readouterr())
    assert f"backup {newest} cannot be read (incomplete or corrupt); moved to " in out
    assert "with epoch-0002.json and resuming from an older state" in out
    assert "resuming" in out and "after epoch 1" in out
    assert f"warning: the best checkpoint {best} cannot be read (damaged or removed since): the " \
        "best of epochs 1-1 (val_f1 " in out
    m = _metrics(run)
    assert m["epochs_run"] == 4 and len(m["loss_history"]) == 4
    assert not (run / "backup").exists()  # removed, with unreadable/, once the run is done


def test_a_zero_byte_backup_of_keras_layout_does_not_block_the_run(synthetic, tmp_path, capsys):
    # What a kill during Keras's own BackupAndRestore write left (earlier retina_tf versions).
    run = _interrupted(synthetic, tmp_path, 1, "--epochs=2")
    shutil.rmtree(run / "backup")
    (run / "backup").mkdir()
    (run / "backup" / "latest.weights.h5").write_bytes(b"")
    (run / "backup" / "training_metadata.json").write_text('{"epoch": 2, "batch": 0}')
    train(tiny_flags(synthetic, tmp_path, "--epochs=2"))
    assert "latest.weights.h5 cannot be read" in capsys.readouterr().out
    assert _metrics(run)["epochs_run"] == 2


def test_a_damaged_best_checkpoint_falls_back_to_the_last_weights(synthetic, tmp_path, capsys):
    run = _interrupted(synthetic, tmp_path, 2, "--epochs=2")  # both epochs done, not saved
    best = run / "checkpoints" / "best.weights.h5"
    best.write_bytes(best.read_bytes()[:500])
    train(tiny_flags(synthetic, tmp_path, "--epochs=2"))
    assert f"the best checkpoint {best} cannot be read" in capsys.readouterr().err
    last = load_keras_model(run / "model.keras")
    ref = keras.models.clone_model(last)
    ref.load_weights(run / "checkpoints" / "last.weights.h5")
    assert all(np.array_equal(a, b) for a, b in zip(last.get_weights(), ref.get_weights()))


def test_stray_temporaries_of_a_killed_save_are_removed(synthetic, tmp_path):
    run = _interrupted(synthetic, tmp_path, 1, "--epochs=2")
    stray = [run / ".model.4242.tmp.keras", run / "checkpoints" / ".best.weights.h5.x1.tmp",
             run / "backup" / ".epoch-0002.json.abc.tmp"]
    for p in stray:
        p.write_bytes(b"")
    train(tiny_flags(synthetic, tmp_path, "--epochs=2"))
    assert not any(p.exists() for p in stray)
    assert remove_stray_temporaries(run) == []


def test_overwrite_clears_only_a_run_folder(tmp_path):
    """--overwrite into a dataset's training/ (no run there) deleted its images/ folder."""
    data = tmp_path / "training"
    for name in ("images/01_training.tif", "1st_manual/01_manual1.gif", "train/notes.txt"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(b"someone else's")
    clear_run_folder(data)
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()) == \
        ["1st_manual/01_manual1.gif", "images/01_training.tif", "train/notes.txt"]
    (data / "flags.txt").write_text("--epochs=1\n")  # a run's folder: its own files go
    clear_run_folder(data)
    assert not (data / "flags.txt").exists() and not (data / "images").exists()
    assert (data / "1st_manual" / "01_manual1.gif").exists()


def test_a_finished_run_is_not_trained_over(synthetic, tmp_path, capsys):
    run = train(tiny_flags(synthetic, tmp_path, "--epochs=1"))
    stamp = (run / "model.keras").stat().st_mtime_ns
    # the same flags: nothing to do (a rerun of a finished command is harmless)
    train(tiny_flags(synthetic, tmp_path, "--epochs=1", "--visualize"))
    assert "nothing to do" in capsys.readouterr().out
    assert (run / "model.keras").stat().st_mtime_ns == stamp
    # damaged since: said (it was "nothing to do", exit 0, for a run evaluate cannot read)
    for name, cut in (("model.keras", 100000), ("run.json", 0)):
        whole = (run / name).read_bytes()
        (run / name).write_bytes(whole[:cut])
        with pytest.raises(ModelFileError, match=rf"{run} holds a finished run with these flags, "
                                                 rf"but .*{name}.*; --overwrite trains it again"):
            train(tiny_flags(synthetic, tmp_path, "--epochs=1"))
        (run / name).write_bytes(whole)
    stamp = (run / "model.keras").stat().st_mtime_ns
    # other training flags: refused, naming the flag and the ways out
    with pytest.raises(ConfigError, match=r"--epochs: 1 -> 2.*--overwrite.*--run_name"):
        train(tiny_flags(synthetic, tmp_path, "--epochs=2"))
    assert (run / "model.keras").stat().st_mtime_ns == stamp
    # --overwrite retrains and drops the old run's test metrics
    from retina_tf.run_folder import update_metrics_json
    update_metrics_json(run, {"eval_drive_test": {"f1": 0.5}})
    (run / "error_maps").mkdir()  # the old model's: EAR-Net stage 2 must not take them
    (run / "error_maps" / "01_training.png").write_bytes(b"")
    train(tiny_flags(synthetic, tmp_path, "--epochs=2", "--overwrite"))
    m = _metrics(run)
    assert m["epochs_run"] == 2 and "eval_drive_test" not in m
    assert not (run / "error_maps").exists()
    # the run's flags.txt records its settings, not that action: training from it does nothing
    stamp = (run / "model.keras").stat().st_mtime_ns
    train(parse_config("train", [f"--flagfile={run / 'flags.txt'}"]))
    assert "nothing to do" in capsys.readouterr().out
    assert (run / "model.keras").stat().st_mtime_ns == stamp
    # stopped early by its time budget: said, with the way to train every epoch
    update_metrics_json(run, {"epochs_run": 1})  # as --time_budget_minutes leaves it
    train(parse_config("train", [f"--flagfile={run / 'flags.txt'}", "--time_budget_minutes=0"]))
    assert ("its time budget stopped it after 1 of 2 epochs, and it keeps no state to go on "
            "from") in capsys.readouterr().out


def test_a_finished_fine_tune_whose_source_changed_says_so(synthetic, tmp_path, caplog):
    source = train(tiny_flags(synthetic, tmp_path, "--epochs=1", "--run_name=source"))
    args = ("--epochs=1", "--run_name=tuned", f"--pretrained={source}")
    tuned = train(tiny_flags(synthetic, tmp_path, *args))
    train(tiny_flags(synthetic, tmp_path, *args))
    assert "nothing to do" in caplog.text and "has been trained again" not in caplog.text
    with open(source / "model.keras", "ab") as f:  # as --overwrite of the source leaves it
        f.write(b" ")
    train(tiny_flags(synthetic, tmp_path, *args))
    assert (f"warning: tuned started from --pretrained={source}, which has been trained again "
            "since: it keeps what it learned from the earlier model; --overwrite trains it from "
            "the present one") in caplog.text
    shutil.rmtree(source)
    train(tiny_flags(synthetic, tmp_path, *args))
    assert f"--pretrained={source}, which is gone" in caplog.text
    assert (tuned / "model.keras").is_file()


def test_an_interrupted_run_with_other_flags_or_noresume_is_refused(synthetic, tmp_path):
    run = _interrupted(synthetic, tmp_path, 1)
    # named as a model: said to be unfinished, with the way to finish it
    with pytest.raises(ModelFileError, match=rf"--pretrained=tiny: {run} holds a training that "
                                             r"has not finished .*run its training command"):
        find_run("tiny", tmp_path, flag="--pretrained")
    with pytest.raises(ConfigError, match="interrupted run with other training flags"):
        train(tiny_flags(synthetic, tmp_path, "--base_filters=4"))
    with pytest.raises(ConfigError, match="--noresume"):
        train(tiny_flags(synthetic, tmp_path, "--noresume"))


def test_an_early_failure_leaves_no_run_folder(tmp_path):
    with pytest.raises(DatasetError):
        train(parse_config("train", ["--dataset=synthetic", f"--data_dir={tmp_path / 'missing'}",
                           f"--logdir={tmp_path / 'logs'}", "--epochs=1"]))
    assert not (tmp_path / "logs").exists()


def test_a_patch_larger_than_the_images_is_refused_before_training(synthetic, tmp_path):
    with pytest.raises(ConfigError, match=r"--patch_size=256 is larger than the training image "
                                          r".*; give --patch_size=\d+ or less"):
        train(tiny_flags(synthetic, tmp_path, "--patch_size=256"))
    assert not list(tmp_path.rglob("model.keras"))


def test_the_history_has_one_entry_per_epoch_with_validation_every_other(synthetic, tmp_path):
    run = train(tiny_flags(synthetic, tmp_path, "--epochs=3", "--validate_every=2"))
    history = _metrics(run)["history"]
    assert len(history["loss"]) == 3
    assert history["val_f1"][0] is None  # validated after epoch 2 and the last, epoch 3
    assert 0 <= history["val_f1"][1] <= 1 and 0 <= history["val_f1"][2] <= 1


def test_the_epoch_a_time_budget_ends_is_validated_and_a_larger_budget_goes_on(
        synthetic, tmp_path, caplog):
    """The epoch was not validated, so a budget-stopped run kept an earlier epoch, or no
    validated one at all; and a run its budget stopped kept no state, so training the rest
    meant training all again."""
    args = ("--epochs=3", "--validate_every=5")
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        run = train(tiny_flags(synthetic, tmp_path, *args, "--time_budget_minutes=0.0001"))
    assert ("time budget of 0.0001 min reached after epoch 1 of 3, before the learning rate "
            "schedule ended (the same command with --time_budget_minutes=0, or a larger one, "
            "goes on from epoch 1)") in caplog.messages
    metrics = _metrics(run)
    assert metrics["epochs_run"] == 1 and 0 <= metrics["history"]["val_f1"][0] <= 1
    assert metrics["time_budget"] == "0.0001 min reached after epoch 1 of 3"  # what ended it
    assert metrics["best_checkpoint"]["epoch"] == 1
    first_loss = metrics["history"]["loss"][0]
    # a usable model, and the state to go on from
    assert find_run("tiny", tmp_path) == run and (run / "backup").is_dir()
    # the same budget again: nothing to do, and said how to go on
    stamp = (run / "model.keras").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        train(tiny_flags(synthetic, tmp_path, *args, "--time_budget_minutes=0.0001"))
    used = _metrics(run)["training_minutes"]
    assert f"its time budget stopped it after 1 of 3 epochs and {used:g} min: a " \
        f"--time_budget_minutes over {used:g} (0: none) goes on from epoch 1" in caplog.text
    assert (run / "model.keras").stat().st_mtime_ns == stamp
    from retina_tf.run_folder import update_metrics_json
    update_metrics_json(run, {"eval_drive_test": {"f1": 0.5}})  # the budget-stopped model's
    with pytest.raises(ConfigError, match="holds a run its time budget stopped and --noresume"):
        train(tiny_flags(synthetic, tmp_path, *args, "--noresume"))
    # no budget: it trains epochs 2 and 3 from the state epoch 1 left
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        train(tiny_flags(synthetic, tmp_path, *args, "--time_budget_minutes=0"))
    assert f"resuming {run} after epoch 1" in caplog.text
    assert "its time budget stopped it after epoch 1 of 3: it trains the rest" in caplog.text
    assert "metrics.json: dropped eval_drive_test of the model it replaced" in caplog.text
    metrics = _metrics(run)
    assert metrics["epochs_run"] == 3 and len(metrics["history"]["loss"]) == 3
    assert "time_budget" not in metrics and "eval_drive_test" not in metrics
    assert metrics["history"]["loss"][0] == first_loss  # epoch 1 was not trained again
    assert not (run / "backup").exists()  # finished now


def _budget_run(minutes, epochs, ends, elapsed=0.0, resumable=True):
    """Drives TimeBudget through epochs ending at ``ends`` (seconds on its clock, from 0 at the
    start of training); returns the epoch that stopped training (None: none did)."""
    clock = iter([0.0, *ends])
    budget = TimeBudget(minutes, elapsed, clock=lambda: next(clock), resumable=resumable)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.stop_training = False
    budget.set_model(model)
    budget.set_params({"epochs": epochs})
    budget.on_train_begin()
    for epoch in range(len(ends)):
        budget.on_epoch_end(epoch)
        if model.stop_training:
            return epoch + 1
    return None


def test_a_time_budget_that_will_cut_the_schedule_says_so_early(caplog):
    """drive_unet_fast.cfg on a CPU without AVX-512: 5 minutes, 17 epochs of 34 s after a first
    of 40 s (tracing). At the second epoch the pace foretells the stop after epoch 9, once."""
    ends = [40.0 + 34 * k for k in range(17)]
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        assert _budget_run(5, 17, ends) == 9
    said = [m for m in caplog.messages if "budget" in m]
    assert said == [
        "at 34 s per epoch the time budget of 5 min ends training after about epoch 9 of "
        "17, before the learning rate schedule ends; to train all 17 (about 10 min in all), run "
        "the same command with --time_budget_minutes=0 when it stops, or stop it now (Ctrl-C) "
        "and do so: it goes on after its last completed epoch",
        "time budget of 5 min reached after epoch 9 of 17, before the learning rate schedule "
        "ended (the same command with --time_budget_minutes=0, or a larger one, goes on from "
        "epoch 9)"]
    caplog.clear()
    # a budget that holds every epoch says nothing; a resumed run counts the time before and
    # takes no pace from its first (tracing) epoch
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        assert _budget_run(5, 8, ends[:8]) is None
        assert _budget_run(5, 17, [10.0, 60.0], elapsed=250.0) == 2
    assert [m for m in caplog.messages if "budget" in m] == [
        "time budget of 5 min reached after epoch 2 of 17, before the learning rate schedule "
        "ended (the same command with --time_budget_minutes=0, or a larger one, goes on from "
        "epoch 2)"]
    # --noresume keeps no state: the ways out say so
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        assert _budget_run(5, 17, ends, resumable=False) == 9
    assert [m for m in caplog.messages if "budget" in m] == [
        "at 34 s per epoch the time budget of 5 min ends training after about epoch 9 of "
        "17, before the learning rate schedule ends; to train all 17 (about 10 min in all), "
        "stop it (Ctrl-C) and run it again with --overwrite --time_budget_minutes=0",
        "time budget of 5 min reached after epoch 9 of 17, before the learning rate schedule "
        "ended (--overwrite with --time_budget_minutes=0, or a larger one, trains all 17 anew)"]


def test_run_json_records_what_was_read(synthetic, tmp_path):
    run = train(tiny_flags(synthetic, tmp_path, "--epochs=1"))
    data = json.loads((run / "run.json").read_text())["data"]
    assert data["dataset"] == "synthetic" and data["data_dir"] == str(synthetic)
    assert data["label_file_path"] is None
    assert len(data["training_images"]) == 3 and len(data["validation_images"]) == 1


def test_weights_files_are_written_whole_with_their_attributes(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = tmp_path / "best.weights.h5"
    save_weights_file(model, path, {"epoch": 3, "value": 0.5})
    assert weights_file_is_whole(path)
    with h5py.File(path) as f:
        assert f.attrs["epoch"] == 3 and f.attrs["value"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["best.weights.h5"]  # no temporaries
    path.write_bytes(path.read_bytes()[:-100])
    assert not weights_file_is_whole(path)


def test_one_state_is_serialized_once_for_its_files_and_a_changed_one_again(tmp_path,
                                                                            monkeypatch):
    """An epoch's best, last and backup files hold one state: Keras writes it once; a change to
    any variable (a weight, the optimizer's) is written anew, and each file keeps its own
    attributes."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    calls = []
    save = keras.Model.save_weights
    monkeypatch.setattr(keras.Model, "save_weights",
                        lambda self, p, **kw: calls.append(p) or save(self, p, **kw))

    def saved(name, attrs):
        save_weights_file(model, tmp_path / name, attrs)
        with h5py.File(tmp_path / name) as f:
            return dict(f.attrs), [np.asarray(f[k]) for k in sorted(_datasets(f))]

    attrs_a, a = saved("best.weights.h5", {"epoch": 1, "value": 0.5})
    attrs_b, b = saved("last.weights.h5", {"epoch": 1})
    assert len(calls) == 1 and attrs_a == {"epoch": 1, "value": 0.5} and attrs_b == {"epoch": 1}
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    for variable in (model.layers[0].bias, model.optimizer.variables[-1]):
        variable.assign(variable + 1.0)
        _, c = saved("backup.weights.h5", None)
        assert len(calls) == (2 if variable is model.layers[0].bias else 3)
        assert any(not np.array_equal(x, y) for x, y in zip(b, c, strict=True))
        b = c
    fresh = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    fresh.compile(optimizer="adam", loss="mse")
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(tmp_path / "backup.weights.h5")
    np.testing.assert_array_equal(fresh.layers[0].bias.numpy(), model.layers[0].bias.numpy())


def _datasets(f: h5py.File) -> list[str]:
    names = []
    f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset)
                 else None)
    return names


def test_flag_differences_ignore_output_flags_and_read_booleans():
    old = parse_flag_lines("--epochs=2\n--flip\n--visualize\n--logdir=a\n")
    new = parse_flag_lines("--epochs=2\n--noflip\n--novisualize\n--logdir=b\n")
    assert flag_differences(old, new) == ["--flip: true -> false"]
    assert flag_differences(old, old) == []


def test_a_folder_spelt_another_way_is_the_same_training_flag(tmp_path, monkeypatch):
    """A killed run given its --data_dir with a trailing slash, through a symlink or from
    another folder was "other training flags", and only --overwrite went on."""
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    old = parse_flag_lines(f"--data_dir={data}\n--pretrained=vessel_general\n")
    for spelt in (f"{data}/", str(tmp_path / "link"), "../data", f"{tmp_path}//data"):
        new = parse_flag_lines(f"--data_dir={spelt}\n--pretrained=vessel_general\n")
        assert flag_differences(old, new) == [], spelt
    other = tmp_path / "other"
    other.mkdir()
    assert flag_differences(old, parse_flag_lines(
        f"--data_dir={other}\n--pretrained=./vessel_general\n")) == [
        f"--data_dir: {data} -> {other}"]
    assert flag_differences(old, parse_flag_lines(
        f"--data_dir={data}\n--pretrained=unet_drive\n")) == [
        "--pretrained: vessel_general -> unet_drive"]


def test_a_flag_added_since_a_run_was_written_reads_as_its_default():
    old = parse_flag_lines("--epochs=2\n")  # written before --mixed_patch_sizes and --rot90
    defaults = parse_flag_lines("--epochs=60\n--mixed_patch_sizes=\n--norot90\n")
    same = parse_flag_lines("--epochs=2\n--mixed_patch_sizes=\n--norot90\n")
    assert flag_differences(old, same, defaults) == []
    other = parse_flag_lines("--epochs=2\n--mixed_patch_sizes=64\n--norot90\n")
    assert flag_differences(old, other, defaults) == ["--mixed_patch_sizes:  -> 64"]
    assert flag_differences(old, same) != []  # without the defaults they differ


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_with_a_clear_error_and_the_run_resumes_after(synthetic, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1400k"):
        if os.environ.get("RETINA_TF_REQUIRE_SHARED"):
            pytest.fail("cannot mount a small tmpfs (CI runs as root and must)")
        pytest.skip("mounting a small tmpfs needs root")
    try:
        cmd = [sys.executable, str(REPO / "bin" / "train.py"),
               *tiny_args(synthetic, disk, "--epochs=6")]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        full = commands.run(cmd, timeout=600, env=env)
        assert full.returncode == 1, full.stderr[-2000:]  # not a segfault (139)
        assert "No space left on device" in full.stderr and str(disk) in full.stderr
        assert "Traceback" not in full.stderr
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = commands.run(cmd, timeout=600, env=env)
        assert again.returncode == 0, again.stderr[-2000:]
        m = _metrics(disk / "tiny")
        assert m["epochs_run"] == 6 and len(m["loss_history"]) == 6
        assert "resuming" in again.stdout or m["history"]  # resumed if any epoch completed
        assert load_keras_model(disk / "tiny" / "model.keras").count_params() > 0
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
        shutil.rmtree(disk, ignore_errors=True)


def _held_elsewhere(run: Path, reading: bool):
    """Another process holding ``run`` as a training does (or as an evaluate reads it) until
    the returned event is set."""
    ctx = multiprocessing.get_context("fork")  # only os calls in the child: no TensorFlow
    ready, done = ctx.Event(), ctx.Event()

    def hold():
        if reading:
            with reading_run(run):
                ready.set()
                done.wait(60)
        else:
            hold_run(run)
            ready.set()
            done.wait(60)

    process = ctx.Process(target=hold)
    process.start()
    assert ready.wait(30)
    return process, done


def test_a_run_is_written_by_one_command_at_a_time(synthetic, tmp_path):
    run = train(tiny_flags(synthetic, tmp_path, "--epochs=1"))
    before = _metrics(run)
    # a training writes it: a second training and an evaluate are refused, nothing written
    process, done = _held_elsewhere(run, reading=False)
    try:
        with pytest.raises(RunBusyError, match="another training is writing it"):
            train(tiny_flags(synthetic, tmp_path, "--epochs=2", "--overwrite"))
        with pytest.raises(RunBusyError, match="a training is writing this run"):
            evaluate(EvalConfig(model=str(run)))
    finally:
        done.set()
        process.join()
    assert _metrics(run) == before and (run / "model.keras").is_file()
    # a first training, no model yet: named as a model, it is said to be running now (not to
    # be trained again, which would be refused)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    process, done = _held_elsewhere(fresh, reading=False)
    try:
        with pytest.raises(RunBusyError, match=rf"--model=fresh: a training is writing {fresh} "
                                               "now; use it when the training has ended"):
            find_run("fresh", tmp_path)
    finally:
        done.set()
        process.join()
    # an evaluate reads it: training over it is refused, reading it beside is not
    process, done = _held_elsewhere(run, reading=True)
    try:
        with pytest.raises(RunBusyError, match="another command is reading it"):
            train(tiny_flags(synthetic, tmp_path, "--epochs=2", "--overwrite"))
        assert Segmenter.from_run(run).run_dir == run
    finally:
        done.set()
        process.join()
    assert _metrics(run) == before
    # a killed holder leaves nothing locked
    process, _ = _held_elsewhere(run, reading=False)
    process.kill()
    process.join()
    train(tiny_flags(synthetic, tmp_path, "--epochs=2", "--overwrite"))
    assert _metrics(run)["epochs_run"] == 2


def test_two_commands_merging_one_json_file_keep_both_entries(tmp_path):
    from retina_tf.run_folder import atomic_write_text, taking_turns, update_metrics_json
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    path = tmp_path / "metrics.json"

    def slow_merge():  # an evaluate between its read and its write
        with taking_turns(tmp_path.parent):  # the folder holding the run
            ready.set()
            done.wait(60)
            atomic_write_text(path, json.dumps({"eval_a": 1}))

    process = ctx.Process(target=slow_merge)
    process.start()
    assert ready.wait(30)
    merging = threading.Thread(target=update_metrics_json, args=(tmp_path, {"eval_b": 2}))
    merging.start()
    merging.join(0.5)
    assert merging.is_alive()  # waits its turn
    done.set()
    process.join()
    merging.join(30)
    assert json.loads(path.read_text()) == {"eval_a": 1, "eval_b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no lock file left


def test_predict_keeps_a_training_off_the_run_while_it_segments(synthetic, tmp_path,
                                                                 monkeypatch):
    from retina_tf import evaluation
    from retina_tf.config import PredictConfig
    from retina_tf.run_folder import _READING
    run = train(tiny_flags(synthetic, tmp_path, "--epochs=1"))
    held = []
    segment_one = evaluation._predict_one

    def watched(seg, *args):
        held.append(run.resolve() in _READING)
        return segment_one(seg, *args)

    monkeypatch.setattr(evaluation, "_predict_one", watched)
    images = sorted((synthetic / "test" / "images").iterdir())[:2]
    folder = tmp_path / "in"
    folder.mkdir()
    for image in images:
        shutil.copy(image, folder / image.name)
    evaluation.predict(PredictConfig(model=str(run), input=str(folder),
                                     output_dir=str(tmp_path / "out")))
    assert held == [True, True] and not _READING


def test_an_evaluation_elsewhere_of_a_read_only_run_is_kept(synthetic, tmp_path, monkeypatch,
                                                            caplog):
    run = train(tiny_flags(synthetic, tmp_path, "--epochs=1"))
    inside = (run.resolve(), run.resolve() / "eval_synthetic_test")
    real_open = os.open

    def read_only_run(path, flags, *args, **kwargs):  # the system's answer to a file made in a
        # read-only run folder (a read-only mount; as root, permissions would not stop it)
        if flags & os.O_CREAT and Path(path).parent.resolve() in inside:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_run)
    report = evaluate(EvalConfig(model=str(run), output_dir=str(tmp_path / "eval")))
    assert (tmp_path / "eval" / "metrics.json").is_file() and 0 <= report["metrics"]["f1"] <= 1
    assert f"warning: {run} is read-only: this evaluation is not added to its metrics.json" \
        in caplog.text
    # its own folder inside the run: an error, as before
    with pytest.raises(OutputError, match="Read-only file system"):
        evaluate(EvalConfig(model=str(run)))


def test_a_run_not_found_names_where_it_looked_and_the_shipped_model_of_its_name(tmp_path):
    """``evaluate --flagfile=configs/drive_unet.cfg`` before training: its --model is the
    architecture, its --run_name that of the shipped model."""
    with pytest.raises(ModelFileError, match=rf"--model=unet: no trained model found; looked for "
                                             rf"model.keras in unet, {tmp_path}/unet, "
                                             rf"{tmp_path}/unet_drive and among the shipped "
                                             r"models .*train that run first, or give "
                                             r"--model=unet_drive, the shipped model of that "
                                             r"name$"):
        find_run("unet", tmp_path, "unet_drive")
    with pytest.raises(ModelFileError, match=r"train that run first$"):
        find_run("unet", tmp_path, "my_run")
