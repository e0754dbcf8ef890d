"""Progress lines of the loops over images (retina_tf.progress, evaluate, predict), and the
commands' quiet start (retina_tf/_startup.py): no TensorFlow C++ log line unless --verbose, one
OpenBLAS thread."""

import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from retina_tf import progress as progress_module
from retina_tf._startup import wants_verbose
from retina_tf.evaluation import evaluate, predict
from retina_tf.flags import parse_config
from retina_tf.progress import progress
from retina_tf.training import train
from tests.conftest import tiny_train_args

REPO = Path(__file__).resolve().parents[1]
# What TensorFlow's C++ log looks like (absl's prefixes, its oneDNN / CUDA / TensorRT lines).
TF_LOG = ("oneDNN", "cuInit", "I0000", "W0000", "E0000", "TF-TRT")
LINE = re.compile(r"^(\w+): (\d+)/(\d+) images \((\S+)\), (\d+:\d\d) elapsed(, ~\d+:\d\d left)?$")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def lines():
    """The progress module's log lines, every level: ``lines()``."""
    logger = logging.getLogger("retina_tf.progress")
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lambda: list(handler.messages)
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_line_per_item_counts_names_and_estimates_the_time_left(lines):
    names = ["a.tif", "b.tif", "c.tif"]
    seen = []
    for item in progress(names, "evaluate", every=0, heartbeat=0):
        seen.append(item)
        time.sleep(0.01)
    assert seen == names  # the items themselves, in order
    got = [LINE.match(line) for line in lines()]
    assert all(got), lines()
    assert [(m[1], int(m[2]), int(m[3]), m[4]) for m in got] == [
        ("evaluate", 1, 3, "a.tif"), ("evaluate", 2, 3, "b.tif"), ("evaluate", 3, 3, "c.tif")]
    assert [bool(m[6]) for m in got] == [True, True, False]  # no estimate once done


def test_fast_items_share_lines_at_round_counts_and_a_quick_loop_none(lines):
    for _ in progress(range(500), "reading", names=[f"{i}.png" for i in range(500)],
                      every=3600.0, heartbeat=0):
        pass
    assert lines() == []
    for _ in progress(range(30), "reading", every=0.05, heartbeat=0):
        time.sleep(0.01)  # about 5 items a line: counts in round steps, the last one
    counts = [int(LINE.match(line)[2]) for line in lines()]
    assert counts[-1] == 30 and 2 <= len(counts) < 30
    assert all(c % 2 == 0 or c % 5 == 0 for c in counts[:-1]), counts


def test_a_slow_item_gets_a_heartbeat_also_when_item_lines_are_hidden(lines):
    before = threading.active_count()
    logging.getLogger("retina_tf.progress").setLevel(logging.INFO)  # as without --verbose
    for _ in progress(["big.tif"], "validation", level=logging.DEBUG, heartbeat=0.2):
        time.sleep(1.0)
    beats = lines()
    assert beats and all(re.fullmatch(r"validation: 0/1 images, big\.tif running for 0:0\d", b)
                         for b in beats), beats
    time.sleep(0.5)  # the watcher ended with the loop: no line after it
    assert lines() == beats and threading.active_count() == before


def test_an_empty_loop_logs_nothing(lines):
    assert list(progress([], "evaluate")) == [] and lines() == []


# --- evaluate and predict on tiny synthetic data ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tiny_synthetic, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("progress_logs")
    cfg = parse_config("train", tiny_train_args(tiny_synthetic, logdir, "--epochs=1", "--depth=2",
                                                "--patches_per_epoch=8", "--val_images=0"))
    return tiny_synthetic, train(cfg)


def _progress_lines(text: str, what: str) -> list[tuple[int, int, str]]:
    found = [LINE.match(line) for line in text.splitlines()]
    return [(int(m[2]), int(m[3]), m[4]) for m in found if m and m[1] == what]


@pytest.mark.slow
def test_evaluate_and_predict_report_each_image(tiny_run, tmp_path, capsys, monkeypatch):
    data, run = tiny_run
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)  # a line per image, however fast
    evaluate(parse_config("evaluate", [f"--model={run}", "--dataset=synthetic",
                                       f"--data_dir={data}", "--eval_split=all",
                                       f"--output_dir={tmp_path / 'eval'}"]))
    images = sorted(p.name for split in ("test", "training")
                    for p in (data / split / "images").iterdir())
    assert _progress_lines(capsys.readouterr().out, "evaluate") == [
        (n, 6, name) for n, name in enumerate(images, 1)]
    predict(parse_config("predict", [f"--model={run}", f"--input={data / 'test' / 'images'}",
                                     f"--output_dir={tmp_path / 'pred'}"]))
    assert _progress_lines(capsys.readouterr().out, "predict") == [
        (1, 2, "01_test.tif"), (2, 2, "02_test.tif")]


# --- the commands' quiet start ---------------------------------------------------------------

@pytest.mark.parametrize("argv, verbose", [
    (["--verbose"], True), (["-verbose"], True), (["--verbose=true"], True),
    (["--verbose=0"], False), (["--verbose", "--noverbose"], False), ([], False),
    (["--", "--verbose"], False), (["--model=verbose"], False)])
def test_verbose_is_read_before_absl_parses_the_command_line(argv, verbose):
    assert wants_verbose(["predict.py", *argv]) is verbose


def _command(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user
    return subprocess.run([sys.executable, str(REPO / "bin" / "predict.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def _tf_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines()
            if any(mark in line for mark in TF_LOG)]


@pytest.mark.slow
def test_a_command_prints_no_tensorflow_log_unless_verbose(tiny_run, tmp_path):
    data, run = tiny_run
    args = [f"--model={run}", f"--input={data / 'test' / 'images' / '01_test.tif'}"]
    quiet = _command(*args, f"--output_dir={tmp_path / 'quiet'}")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert _tf_lines(quiet) == [], quiet.stderr
    assert "01_test.tif ->" in quiet.stdout
    verbose = _command(*args, f"--output_dir={tmp_path / 'verbose'}", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    if not _tf_lines(verbose):  # TensorFlow may print nothing at all on some machine
        bare = subprocess.run([sys.executable, "-c", "import tensorflow as tf; "
                               "tf.config.list_physical_devices()"], capture_output=True,
                              text=True, timeout=300)
        assert not _tf_lines(bare), "TensorFlow logs, but --verbose does not show it"
        pytest.skip("TensorFlow prints no start-up log on this machine")
    assert any("oneDNN" in line or "cuda" in line.lower() for line in _tf_lines(verbose))


_BLAS_THREADS = """
import ctypes, glob, importlib.util, os, sys
spec = importlib.util.spec_from_file_location("s", {startup!r})
startup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(startup)
if sys.argv[1] == "command":
    startup.one_blas_thread()
import numpy as np
libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*.so*"))
calls = [getattr(ctypes.CDLL(p), n, None) for p in libs for n in (
    "scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")]
calls = [c for c in calls if c is not None]
print(calls[0]() if calls else "no bundled OpenBLAS")
"""


@pytest.mark.parametrize("preset, how, expected", [
    (None, "command", "1"), ("2", "command", "2"), (None, "library", None)])
def test_a_command_starts_numpy_with_one_blas_thread_unless_told(preset, how, expected):
    # NumPy's OpenBLAS reads the variable once, when NumPy loads: a fresh interpreter each
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    code = _BLAS_THREADS.format(startup=str(REPO / "retina_tf" / "_startup.py"))
    proc = subprocess.run([sys.executable, "-c", code, how], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if proc.stdout.strip() == "no bundled OpenBLAS":
        pytest.skip("this NumPy has no bundled OpenBLAS to ask")
    threads = proc.stdout.strip()
    if expected is None:  # imported as a library: OpenBLAS's own default, a thread per core
        assert int(threads) > 1 or os.cpu_count() == 1, threads
    else:
        assert threads == expected


def test_a_command_start_sets_one_blas_thread_and_a_library_import_does_not(monkeypatch):
    from retina_tf import _startup
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delitem(sys.modules, "_bootstrap", raising=False)  # what bin/ scripts import
    monkeypatch.setattr(sys, "argv", ["retina-predict", "--help"])  # a console script
    _startup.quiet_start_for_commands()  # TensorFlow is imported already: only the variable
    _startup.loaded()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setattr(sys, "argv", ["pytest"])  # not a command: left alone
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    _startup.quiet_start_for_commands()
    assert "OPENBLAS_NUM_THREADS" not in os.environ
