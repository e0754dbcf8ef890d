"""Kill harness: a training run SIGKILLed at many moments, restarted with the same command each
time, ends exactly like the uninterrupted run (retina_tf.run_folder)."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retina_tf.data.synthetic import write_synthetic_dataset
from retina_tf.flags import parse_config
from retina_tf.inference import load_keras_model
from retina_tf.training import train
from tests import commands

REPO = Path(__file__).resolve().parents[1]

# Each restart is killed at the next moment: (RETINA_TF_KILL_AT, what it stands for). A name
# kills the process while that file's temporary copy is half written ("#n": its n-th write).
KILLS = [
    ("best.weights.h5#1", "writing epoch 1's best checkpoint"),
    ("last.weights.h5#1", "writing epoch 1's last checkpoint (before any backup)"),
    ("epoch-0002.weights.h5", "writing epoch 2's backup weights"),
    ("epoch-0003.json", "writing epoch 3's backup state, its weights already written"),
    ("inside epoch 4", "during the training steps of epoch 4"),
    ("model.keras", "writing the final model"),
    ("metrics.json", "writing metrics.json, the final model in place"),
]


def _args(data_dir, logdir):
    return ["--dataset=synthetic", f"--data_dir={data_dir}", f"--logdir={logdir}",
            "--run_name=harness", "--depth=3", "--base_filters=8", "--patch_size=32",
            "--batch_size=8", "--patches_per_epoch=256", "--epochs=4", "--val_images=1",
            "--learning_rate=0.005", "--image_summary_every=0"]


def _run(cmd, kill_at: str | None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("RETINA_TF_KILL_AT", None)
    if kill_at and not kill_at.startswith("inside"):
        env["RETINA_TF_KILL_AT"] = kill_at
    proc = commands.Command(cmd, env=env, merge_stderr=True)
    try:
        for line in proc.lines():
            if kill_at and kill_at.startswith("inside") and line.startswith("Epoch 4/4"):
                time.sleep(0.5)
                os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=600), proc.stdout()
    finally:
        proc.close()


@pytest.mark.slow
def test_killed_at_many_moments_the_run_ends_as_if_never_killed(tmp_path):
    data = write_synthetic_dataset(tmp_path / "syn", num_images=6, num_test=2, seed=3,
                                   size=(96, 96))
    reference = train(parse_config("train", _args(data, tmp_path / "reference")))
    ref = json.loads((reference / "metrics.json").read_text())

    cmd = [sys.executable, str(REPO / "bin" / "train.py"), *_args(data, tmp_path / "killed")]
    run = tmp_path / "killed" / "harness"
    for kill_at, moment in KILLS:
        code, out = _run(cmd, kill_at)
        assert code == -signal.SIGKILL, f"not killed {moment}:\n{out[-3000:]}"
    code, out = _run(cmd, None)
    assert code == 0, out[-3000:]

    # a loadable model, every epoch's history, no resume state or temporaries left
    model = load_keras_model(run / "model.keras")
    got = json.loads((run / "metrics.json").read_text())
    assert got["epochs_run"] == 4 and len(got["loss_history"]) == 4
    assert not (run / "backup").exists()
    assert not [p for p in run.rglob(".*") if p.is_file()]
    # the same epochs, the same best checkpoint and the same weights as never killed
    assert got["loss_history"] == pytest.approx(ref["loss_history"], rel=1e-4)
    assert got["best_checkpoint"]["epoch"] == ref["best_checkpoint"]["epoch"]
    ref_weights = load_keras_model(reference / "model.keras").get_weights()
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(model.get_weights(), ref_weights))
    # and a rerun of the finished command changes nothing
    code, out = _run(cmd, None)
    assert code == 0 and "nothing to do" in out
