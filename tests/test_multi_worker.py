"""Training on several workers (``--strategy=multi_worker``, MultiWorkerMirroredStrategy): two
worker processes on this machine, CPU only, each with its own TF_CONFIG; a worker killed during
an epoch; mixed precision and XLA checked on the CPU (docs/scaling.md)."""

import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_tf.data.io import read_image, write_image_atomic
from retina_tf.errors import ConfigError
from retina_tf.flags import parse_config
from retina_tf.inference import load_keras_model
from retina_tf.training import check_tf_config, train
from tests import commands
from tests.conftest import tiny_train_args

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
# Each worker saves the weights it ends fit with: a worker's own files are removed at the end.
DRIVER = """
import sys
import keras
import numpy as np
from retina_tf.flags import configure_logging, parse_config
from retina_tf.training import train

class SaveWeights(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        np.savez(sys.argv[1], *self.model.get_weights())

configure_logging()
train(parse_config("train", sys.argv[2:]), [SaveWeights()])
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    """Two workers on localhost ports, each in its own folder (``--logdir=logs`` is relative,
    so a worker writing its run folder would show there) with its own TMPDIR."""

    def __init__(self, root: Path, data_dir: Path):
        self.root, self.data_dir = root, data_dir
        self.ports = _free_ports(2)
        self.procs: list[commands.Command] = []

    def folder(self, index: int) -> Path:
        return self.root / f"worker{index}"

    def tmpdir(self, index: int) -> Path:
        return self.root / f"tmp{index}"

    def worker_folders(self, index: int) -> list[Path]:
        return list(self.tmpdir(index).glob("retina_tf-worker*"))

    def log(self, index: int, attempt: int) -> Path:
        return self.root / f"worker{index}-{attempt}.log"

    def start(self, command: list[str], attempt: int = 1) -> None:
        args = tiny_train_args(self.data_dir, "logs", "--strategy=multi_worker",
                               f"--epochs={EPOCHS}", "--patches_per_epoch=128",
                               "--image_summary_every=0")
        self.procs = []
        for index in (0, 1):
            for path in (self.folder(index), self.tmpdir(index)):
                path.mkdir(parents=True, exist_ok=True)
            tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in self.ports]},
                         "task": {"type": "worker", "index": index}}
            env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "CUDA_VISIBLE_DEVICES": "-1",
                   "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
                   "TMPDIR": str(self.tmpdir(index))}
            cmd = [a.replace("{index}", str(index)) for a in command + args]
            self.procs.append(commands.Command(cmd, cwd=self.folder(index), env=env,
                                               log=self.log(index, attempt)))

    def output(self, index: int, attempt: int = 1) -> str:
        return self.log(index, attempt).read_text()

    def wait(self, index: int, timeout: float) -> int:
        return self.procs[index].wait(timeout=timeout)

    def stop(self) -> None:
        for proc in self.procs:
            proc.close()


@pytest.fixture(scope="module")
def uninterrupted(tiny_synthetic, tmp_path_factory):
    """Two workers train two epochs through ``train`` (as bin/train.py does)."""
    root = tmp_path_factory.mktemp("multi_worker")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    cluster = Cluster(root, tiny_synthetic)
    cluster.start([sys.executable, str(driver), str(root / "weights{index}.npz")])
    try:
        codes = [cluster.wait(i, timeout=300) for i in (0, 1)]
    finally:
        cluster.stop()
    assert codes == [0, 0], cluster.output(0)[-3000:] + cluster.output(1)[-3000:]
    return cluster


@pytest.mark.slow
def test_two_workers_end_with_the_same_weights_and_only_the_chief_writes(uninterrupted):
    cluster = uninterrupted
    ends = [np.load(cluster.root / f"weights{i}.npz") for i in (0, 1)]
    assert len(ends[0].files) == len(ends[1].files) > 0
    for key in ends[0].files:  # batch-norm statistics included
        np.testing.assert_array_equal(ends[0][key], ends[1][key], err_msg=key)

    run = cluster.folder(0) / "logs" / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == EPOCHS and len(metrics["loss_history"]) == EPOCHS
    assert (run / "model.keras").is_file() and not (run / "backup").exists()
    assert "2 replica(s)" in cluster.output(0)
    # the worker wrote to a temporary folder, now removed, and never to its own run folder
    assert not (cluster.folder(1) / "logs").exists()
    assert f"this worker writes {cluster.tmpdir(1)}" in cluster.output(1)
    assert "worker 1: done; removed" in cluster.output(1)
    assert not cluster.worker_folders(1) and not cluster.worker_folders(0)


@pytest.mark.slow
def test_a_worker_killed_during_an_epoch_and_the_cluster_restarted_resumes(uninterrupted,
                                                                          tiny_synthetic,
                                                                          tmp_path):
    cluster = Cluster(tmp_path, tiny_synthetic)
    train_py = [sys.executable, str(REPO / "bin" / "train.py")]
    cluster.start(train_py)
    try:
        deadline = time.monotonic() + 300
        while f"Epoch {EPOCHS}/{EPOCHS}" not in cluster.output(1):  # the last epoch began
            assert cluster.procs[1].poll() is None, cluster.output(1)[-3000:]
            assert time.monotonic() < deadline, "epoch 2 never began"
            time.sleep(0.05)
        os.kill(cluster.procs[1].pid, signal.SIGKILL)
        # TensorFlow cannot go on with a worker fewer: the chief stops with an error
        code = cluster.wait(0, timeout=180)
    finally:
        cluster.stop()
    chief = cluster.output(0)
    assert code == 1, chief[-3000:]
    assert "start every worker again with the same command" in chief
    run = cluster.folder(0) / "logs" / "tiny"
    assert sorted(p.name for p in (run / "backup").glob("*.json")) == ["epoch-0001.json"]
    assert cluster.worker_folders(1)  # what the killed worker left

    cluster.start(train_py, attempt=2)  # every worker again, the same command
    try:
        codes = [cluster.wait(i, timeout=300) for i in (0, 1)]
    finally:
        cluster.stop()
    assert codes == [0, 0], cluster.output(0, 2)[-3000:] + cluster.output(1, 2)[-3000:]
    assert f"resuming {Path('logs') / 'tiny'} after epoch 1" in cluster.output(0, 2)
    assert "resuming the chief's run folder after epoch 1" in cluster.output(1, 2)
    assert not cluster.worker_folders(1)  # the killed worker's folder too

    # the same history and weights as the run that was never interrupted
    reference = uninterrupted.folder(0) / "logs" / "tiny"
    got = json.loads((run / "metrics.json").read_text())
    ref = json.loads((reference / "metrics.json").read_text())
    assert got["epochs_run"] == EPOCHS and not (run / "backup").exists()
    assert got["loss_history"] == pytest.approx(ref["loss_history"], rel=1e-4)
    weights = load_keras_model(run / "model.keras").get_weights()
    for a, b in zip(weights, load_keras_model(reference / "model.keras").get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)

    # the same command once more: every worker learns from the chief that the run is finished
    before = (run / "model.keras").stat().st_mtime_ns
    cluster.start(train_py, attempt=3)
    try:
        codes = [cluster.wait(i, timeout=120) for i in (0, 1)]
    finally:
        cluster.stop()
    assert codes == [0, 0], cluster.output(0, 3)[-3000:] + cluster.output(1, 3)[-3000:]
    assert "is already trained with these flags" in cluster.output(0, 3)
    assert (run / "model.keras").stat().st_mtime_ns == before


def test_tf_config_is_checked_before_tensorflow_reads_it():
    check_tf_config('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", '
                    '"index": 1}}')
    for text, words in [(None, "needs the TF_CONFIG environment variable"),
                        ("{cluster", "give the cluster and a task in it"),
                        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", '
                         '"index": 1}}', "give the cluster and a task in it"),
                        ('{"cluster": {"worker": ["a:1"]}}', "give the cluster and a task"),
                        # TensorFlow's tracebacks before
                        ('{"cluster": {"worker": ["localhost", "b:2"]}, "task": {"type": '
                         '"worker", "index": 1}}', "'localhost' is not host:port"),
                        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", '
                         '"index": 0}}', "a cluster of one task; on one machine train without "
                                         "TF_CONFIG")]:
        with pytest.raises(ConfigError, match=words):
            check_tf_config(text)


def test_tf_config_of_a_cluster_without_multi_worker_is_warned_of(monkeypatch, caplog):
    """Each worker trained alone, a model per machine, without a word."""
    from retina_tf.training import make_strategy
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:2"]}, "task": '
                                    '{"type": "worker", "index": 1}}')
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        make_strategy("default")
    assert "warning: TF_CONFIG names a cluster of 2 tasks, but --strategy=default trains on " \
        "this machine alone: give --strategy=multi_worker" in caplog.text


def test_a_worker_whose_port_is_taken_says_so_in_one_line(tiny_synthetic, tmp_path):
    taken = socket.socket()
    taken.bind(("localhost", 0))
    taken.listen()
    try:
        ports = [taken.getsockname()[1], *_free_ports(1)]
        tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                     "task": {"type": "worker", "index": 0}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "CUDA_VISIBLE_DEVICES": "-1"}
        proc = commands.script("train.py", *tiny_train_args(
            tiny_synthetic, tmp_path / "logs", "--strategy=multi_worker"), env=env, timeout=120)
    finally:
        taken.close()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().endswith(
        f"train.py: error: TF_CONFIG: worker 0 cannot listen at localhost:{ports[0]} "
        "(TensorFlow: Could not start gRPC server): is that port in use, or another worker "
        "started with the same task index?"), proc.stderr[-3000:]
    assert f"worker 0 at localhost:{ports[0]}: waiting for every task" in proc.stdout
    assert not (tmp_path / "logs").exists()


def _both_refused(cluster: Cluster, extra: list[str], message: str) -> None:
    """Both workers of ``cluster`` started with train.py and ``extra`` end with ``message``
    (exit 2) before any run folder is written."""
    cluster.start([sys.executable, str(REPO / "bin" / "train.py"), *extra])
    try:
        codes = [cluster.wait(i, timeout=120) for i in (0, 1)]
    finally:
        cluster.stop()
    for index in (0, 1):
        out = cluster.output(index)
        assert codes[index] == 2 and out.strip().endswith(f"train.py: error: {message}"), \
            out[-3000:]
        assert not (cluster.folder(index) / "logs").exists()


@pytest.mark.slow
def test_workers_given_different_flags_are_told_before_training(tiny_synthetic, tmp_path):
    # one seed per worker (a batch size or a model size would do as well): each would fail
    # mid-training in a collective of mismatched shapes, with a traceback
    _both_refused(Cluster(tmp_path, tiny_synthetic), ["--seed={index}"],
                  "the workers of TF_CONFIG were given different training flags: give every "
                  "worker the same command (only paths such as --data_dir may differ between "
                  "machines)")


@pytest.mark.slow
def test_workers_reading_different_photographs_are_told_before_training(tiny_synthetic,
                                                                        tmp_path):
    """Each trained on its own data without a word, and only the chief's was recorded: the
    folders may differ between machines, the pixels may not."""
    for index in (0, 1):
        shutil.copytree(tiny_synthetic, tmp_path / f"data{index}")
    photo = sorted((tmp_path / "data1" / "training" / "images").iterdir())[0]
    write_image_atomic(photo, read_image(photo)[::-1])  # another photograph, the same size
    _both_refused(Cluster(tmp_path, tmp_path / "data{index}"), [],
                  "the workers of TF_CONFIG read different photographs (their pixels differ): "
                  "give every worker a copy of the same data (--data_dir may name another "
                  "folder on each machine)")


def test_logical_cpus_say_what_they_can_and_cannot_do(caplog):
    from retina_tf.training import configure_logical_cpus
    # this process's TensorFlow has started (listing devices starts it): the split needs a fresh
    # one, said as such
    assert len(tf.config.list_logical_devices("CPU")) == 1
    with pytest.raises(ConfigError, match="--logical_cpus=2: TensorFlow has started in this "
                                          "process already"):
        configure_logical_cpus(2, "default")
    assert "--strategy=default trains on it as one device" in caplog.text


def _tiny_run(data_dir, logdir, name, *extra, callbacks=()):
    args = tiny_train_args(data_dir, logdir, f"--run_name={name}", "--epochs=3",
                           "--image_summary_every=0", *extra)
    return train(parse_config("train", args), list(callbacks))


@pytest.fixture(scope="module")
def float32_run(tiny_synthetic, tmp_path_factory):
    return _tiny_run(tiny_synthetic, tmp_path_factory.mktemp("float32"), "float32")


class _PolicyDuringTraining(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.policies = {layer.dtype_policy.name for layer in self.model._flatten_layers()}


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--mixed_precision"], ["--mixed_precision", "--jit_compile"]])
def test_mixed_precision_trains_like_float32_on_the_cpu(tiny_synthetic, tmp_path, float32_run,
                                                        flags):
    policy = _PolicyDuringTraining()
    mixed = _tiny_run(tiny_synthetic, tmp_path, "mixed", *flags, callbacks=[policy])
    assert policy.policies == {"mixed_bfloat16"}  # bfloat16 compute on a CPU
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after
    losses = json.loads((mixed / "metrics.json").read_text())["loss_history"]
    ref = json.loads((float32_run / "metrics.json").read_text())["loss_history"]
    assert losses[-1] < 0.8 * losses[0]
    assert losses == pytest.approx(ref, rel=0.03)
    model = load_keras_model(mixed / "model.keras")  # saved to compute in float32
    assert {layer.dtype_policy.name for layer in model._flatten_layers()} == {"float32"}


def test_jit_compile_over_several_cpu_replicas_is_refused_before_anything_is_written(
        tiny_synthetic, tmp_path):
    # XLA has no collectives for CPU devices; logical CPUs need a process of their own
    proc = commands.script(
        "train.py", *tiny_train_args(tiny_synthetic, tmp_path, "--logical_cpus=2",
                                     "--strategy=mirrored", "--jit_compile"),
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "train.py: error: --jit_compile: XLA cannot compile a train step shared by several CPU "
        "replicas (2 with --strategy=mirrored); drop --jit_compile, or train on GPUs")
    assert not list(tmp_path.iterdir())
