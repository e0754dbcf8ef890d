"""Shared fixtures: the real datasets in ../shared/data and small synthetic data."""

import importlib.util
import os
from pathlib import Path

import pytest


def _start_tensorflow_quietly() -> None:
    """One OpenBLAS thread and TensorFlow's start-up log lines held back, as a command does
    (each pytest-xdist worker would print them after pytest's summary). retina_tf/_startup.py
    is loaded from its file: importing it through the package would import TensorFlow first."""
    path = Path(__file__).resolve().parents[1] / "retina_tf" / "_startup.py"
    spec = importlib.util.spec_from_file_location("_retina_tf_test_startup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.one_blas_thread()  # as a command; the tests' own commands inherit it
    module.start_tensorflow_quietly()


_start_tensorflow_quietly()

from retina_tf.flags import configure_logging  # noqa: E402

# The library logs through logging; show it on stdout / stderr as the scripts do, so tests read
# what a user sees (capsys).
configure_logging()

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RETINA_TF_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


# The longest files first (about 55 s down to 23 s each on 2 cores, `--durations=0` of
# 2026-12-06): make test's pytest-xdist workers take whole files in collection order, so a long
# file started last would leave one worker running alone at the end. A stale list costs only
# that balance.
LONGEST_FILES = ("test_export.py", "test_run_folder.py", "test_error_maps.py", "test_inputs.py",
                 "test_multi_worker.py", "test_evaluation.py", "test_ear_net.py",
                 "test_rip_av.py", "test_training.py", "test_rip_av_pipeline.py", "test_cli.py",
                 "test_contract.py", "test_ddrnet.py", "test_kill_harness.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep order


def _require_shared() -> bool:
    return os.environ.get("RETINA_TF_REQUIRE_SHARED", "") not in ("", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real datasets; skips (or fails in CI) when absent."""
    if not SHARED_DATA.is_dir():
        reason = (f"real datasets not found at {SHARED_DATA}; set RETINA_TF_SHARED_DATA "
                  "to the folder holding DRIVE/, RITE/, STARE/ and samples/")
        if _require_shared():
            pytest.fail(reason + " (RETINA_TF_REQUIRE_SHARED=1)")
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """Six 96 x 96 synthetic fundus images (four training, two test) for training tests."""
    from retina_tf.data.synthetic import write_synthetic_dataset
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_images=6, num_test=2,
                                   seed=3, size=(96, 96))


def tiny_train_args(data_dir, logdir, *extra) -> list[str]:
    """Flags of a training run that takes seconds: a 3-level U-Net of width 8 on 32 px patches,
    four epochs of 8 steps, one validation image; ``extra`` flags override them."""
    return ["--dataset=synthetic", f"--data_dir={data_dir}", f"--logdir={logdir}",
            "--run_name=tiny", "--depth=3", "--base_filters=8", "--patch_size=32",
            "--batch_size=8", "--patches_per_epoch=64", "--epochs=4", "--val_images=1",
            "--learning_rate=0.005", *extra]
