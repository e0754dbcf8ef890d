"""WILeroy/retina_unet's four documented command lines run as `python bin/<script>.py` with the
same flags and meaning: --max_iters a total step count, --preprocess=True all four steps,
--visulize the seed's spelling of --visualize, train_distribute under MirroredStrategy, and
preprocess --data_dir writing the label files of the DRIVE / CHASE_DB1 folders it finds.

The seed's flags are kept as written; tiny-model flags (a 3-level U-Net of width 8 on 32 px
patches) and small step counts are appended so that each command takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from retina_tf.config import TrainConfig, from_run
from retina_tf.data.catalog import guess_dataset
from retina_tf.data.io import write_image_atomic
from retina_tf.data.labelfile import read_label_file
from retina_tf.data.preprocess import STEPS
from retina_tf.training import epoch_steps, total_epochs
from tests import commands

REPO = Path(__file__).resolve().parents[1]
TINY = ["--depth=3", "--base_filters=8", "--patch_size=32", "--val_images=1"]


def _run(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = commands.script(script, *args, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{script}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.parametrize("max_iters, per_epoch, steps, epochs", [
    (2000, 5000, 2000, 1),  # the seed's train.py line: batch 4, 20000 patches per epoch
    (1000, 2500, 1000, 1),  # its train_distribute.py line: batch 8
    (8, 4, 4, 2),
    (10, 4, 4, 3),  # 3 epochs cannot share 10 steps: 12
    (10, 3, 3, 4),  # 4 epochs of 3: 12
    (7, 100, 7, 1),
])
def test_max_iters_shapes_epochs_around_a_total_step_count(max_iters, per_epoch, steps, epochs):
    cfg = TrainConfig(max_iters=max_iters, epochs=50)
    assert epoch_steps(cfg, per_epoch) == steps
    assert total_epochs(cfg, steps) == epochs
    assert max_iters <= steps * epochs < max_iters + epochs
    off = TrainConfig(epochs=5, steps_per_epoch=0)
    assert (epoch_steps(off, per_epoch), total_epochs(off, per_epoch)) == (per_epoch, 5)


def test_guess_dataset_tells_drive_and_chase_db1_from_their_layouts(shared_data, tmp_path):
    assert guess_dataset(shared_data / "DRIVE") == "drive"
    assert guess_dataset(shared_data / "samples" / "CHASE_DB1") == "chase_db1"
    assert guess_dataset(shared_data / "samples" / "HRF-AV") == "hrf_av"  # not DRIVE's labels
    for other in (shared_data / "STARE", shared_data / "RITE", shared_data, tmp_path):
        assert guess_dataset(other) is None
    # mirrors' copies: CHASE_DB1's labels as TIFF, HRF-AV's names in lower case; a folder of
    # CHASE_DB1's labels alone was taken for the dataset
    chase, labels = tmp_path / "chase", tmp_path / "labels"
    for folder in (chase, labels):
        folder.mkdir()
        (folder / "Image_01L_1stHO.tif").write_bytes(b"")
    (chase / "Image_01L.jpg").write_bytes(b"")
    assert (guess_dataset(chase), guess_dataset(labels)) == ("chase_db1", None)
    for sub in ("images", "1st_manual", "mask"):
        (tmp_path / "hrfav" / "training" / sub).mkdir(parents=True)
    (tmp_path / "hrfav" / "training" / "1st_manual" / "01_h_avmanual.png").write_bytes(b"")
    assert guess_dataset(tmp_path / "hrfav") == "hrf_av"


@pytest.mark.slow
def test_preprocess_data_dir_writes_label_files_of_a_chase_db1_folder(shared_data, tmp_path):
    # The shipped sample holds images 01L and 01R (training); 11L, a copy, makes a test split.
    chase = tmp_path / "CHASEDB"
    shutil.copytree(shared_data / "samples" / "CHASE_DB1", chase)
    for suffix in (".jpg", "_1stHO.png"):
        shutil.copy(chase / f"Image_01L{suffix}", chase / f"Image_11L{suffix}")
    proc = _run(tmp_path, "preprocess.py", "--data_dir=CHASEDB", "--previews=0")
    assert "chase_db1 layout" in proc.stdout
    training, test = read_label_file(chase / "training.txt"), read_label_file(chase / "test.txt")
    assert [s.name for s in training] == ["Image_01L", "Image_01R"]
    assert [s.name for s in test] == ["Image_11L"]
    # CHASE_DB1 ships no FOV masks: estimated ones are written and named in the files
    assert all(s.fov.is_file() and s.fov.parent == chase / "fov" for s in training + test)
    # without 11L, as shipped: training.txt alone (it was "the 'test' split ... is empty"),
    # and the test.txt of before goes with it
    for suffix in (".jpg", "_1stHO.png"):
        (chase / f"Image_11L{suffix}").unlink()
    proc = _run(tmp_path, "preprocess.py", "--data_dir=CHASEDB", "--previews=0")
    assert "CHASEDB: no test split, so training.txt alone" in proc.stdout
    assert len(read_label_file(chase / "training.txt")) == 2 and not (chase / "test.txt").exists()


@pytest.mark.slow
def test_the_four_seed_command_lines_run(tiny_synthetic, tmp_path):
    # The seed's layout: data/<DATASET>/ with the label files inside, runs under log/.
    shutil.copytree(tiny_synthetic, tmp_path / "data" / "DRIVE")

    # python preprocess.py --data_dir {data_dir}: the folder holding the dataset folders
    proc = _run(tmp_path, "preprocess.py", "--data_dir", "data")
    assert "drive layout" in proc.stdout
    assert len(read_label_file(tmp_path / "data" / "DRIVE" / "training.txt")) == 4
    assert len(read_label_file(tmp_path / "data" / "DRIVE" / "test.txt")) == 2

    # python train.py ... --max_iters=2000 --preprocess=True --transpose_conv=True
    _run(tmp_path, "train.py", "--logdir=log/retina",
         "--label_file_path=data/DRIVE/training.txt", "--batch_size=4", "--max_iters=8",
         "--preprocess=True", "--transpose_conv=True", *TINY, "--patches_per_epoch=16")
    run = tmp_path / "log" / "retina" / "unet_DRIVE"
    cfg = from_run(run)
    assert cfg.max_iters == 8 and cfg.preprocess == STEPS and cfg.batch_size == 4
    assert json.loads((run / "run.json").read_text())["model_config"]["transpose_conv"] is True
    # 16 patches of 4 per epoch: 2 epochs of 4 steps
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 2

    # python train_distribute.py ... --batch_size=8 --max_iters=1000 (two CPU replicas here)
    proc = _run(tmp_path, "train_distribute.py", "--logdir=log/retina_distribute",
                "--label_file_path=data/DRIVE/training.txt", "--batch_size=8", "--max_iters=3",
                "--preprocess=True", "--transpose_conv=True", *TINY, "--logical_cpus=2")
    assert "strategy MirroredStrategy with 2 replica(s)" in proc.stdout
    run_distribute = tmp_path / "log" / "retina_distribute" / "unet_DRIVE"
    assert (run_distribute / "model.keras").is_file()
    assert json.loads((run_distribute / "metrics.json").read_text())["epochs_run"] == 1

    # python evaluate.py ... --batch_size=1 --preprocess=True --transpose_conv=True
    #     --visulize=True: the training flags are noted and ignored (the run keeps its own)
    proc = _run(tmp_path, "evaluate.py", "--logdir=log/retina",
                "--label_file_path=data/DRIVE/test.txt", "--batch_size=1", "--preprocess=True",
                "--transpose_conv=True", "--visulize=True")
    assert "--batch_size is a flag of bin/train.py" in proc.stderr
    for shown in ("Confusion matrix", "IoU ", "mIoU "):
        assert shown in proc.stdout
    out = run / "eval_DRIVE_test"
    assert (out / "contact_sheet.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["images"] == 2


@pytest.mark.slow
def test_preprocess_of_a_folder_of_datasets_writes_the_good_ones_and_names_the_bad(
        tiny_synthetic, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data / "DRIVE")
    shutil.copytree(tiny_synthetic, data / "BROKEN")  # a test label of another size
    write_image_atomic(data / "BROKEN" / "test" / "1st_manual" / "01_manual1.gif",
                       np.zeros((10, 10), bool))
    shutil.copytree(tiny_synthetic / "test", data / "HALF" / "test")  # no training/ at all
    proc = commands.script("preprocess.py", "--data_dir=data", "--previews=0", cwd=tmp_path,
                           timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 of the 2 dataset folders failed (the others were written): data/BROKEN: " \
        in proc.stderr and "01_manual1.gif is 10x10" in proc.stderr
    assert "data/HALF: no DRIVE or CHASE_DB1 layout, left alone" in proc.stdout
    assert len(read_label_file(data / "DRIVE" / "test.txt")) == 2
    # no label file lists what training would refuse
    assert not list((data / "BROKEN").glob("*.txt"))
