"""MAE pre-training end to end on tiny synthetic data (bin/pretrain_mae.py), then fine-tuning a
ViT segmentation model from the run folder."""

import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest

from retina_tf.config import MAEConfig, RipPretrainConfig
from retina_tf.data.io import DatasetError, read_image, write_image_atomic
from retina_tf.data.synthetic import write_synthetic_dataset
from retina_tf.errors import ConfigError
from retina_tf.flags import parse_config
from retina_tf.models import build_model
from retina_tf.pretraining import (
    _mae_fields,
    held_out_digests,
    held_out_names,
    pretrain_mae,
    pretrain_rip,
    pretraining_images,
)
from retina_tf.training import load_pretrained, train
from tests import commands
from tests.data.dicom import write_dicom

REPO = Path(__file__).resolve().parents[1]
ENCODER = '"image_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "num_heads": 2'
MAE_CONFIG = "{" + ENCODER + ', "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}'


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    data = write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_images=6, num_test=2,
                                   seed=5, size=(96, 96))
    logdir = tmp_path_factory.mktemp("runs")
    proc = commands.script(
        "pretrain_mae.py", "--dataset=synthetic",
         f"--data_dir={data}", f"--pretrain_dirs={data / 'training' / 'images'}",
         f"--logdir={logdir}", "--run_name=mae", f"--model_config={MAE_CONFIG}", "--epochs=3",
         "--patches_per_epoch=64", "--batch_size=8", "--learning_rate=0.003",
         "--image_summary_every=1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, logdir, logdir / "mae", proc.stdout


@pytest.mark.slow
def test_pretraining_writes_a_run_folder_and_lowers_the_loss(pretrained):
    data, _, run, stdout = pretrained
    assert "pre-training on 4 unlabelled images" in stdout
    for name in ("model.keras", "preprocessor.json", "run.json", "flags.txt", "metrics.json",
                 "reconstruction.png"):
        assert (run / name).is_file(), name
    assert list((run / "images").glob("events.out.tfevents.*")), "no reconstruction summaries"
    losses = json.loads((run / "metrics.json").read_text())["loss_history"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    info = json.loads((run / "run.json").read_text())
    assert info["model"] == "mae" and info["model_config"]["mask_ratio"] == 0.75
    # an encoder's training, not a model to segment with (compare gave a TensorFlow error)
    proc = commands.script("compare.py", "--dataset=synthetic", f"--data_dir={data}",
                           f"--runs={run}", f"--output_dir={run.parent / 'compared'}")
    assert proc.returncode == 1 and proc.stderr.strip().endswith(
        f"{run} is a pre-training run (mae): it does not segment; fine-tune it first with "
        f"bin/train.py --pretrained={run}"), proc.stderr[-2000:]
    assert not (run.parent / "compared").exists()


@pytest.mark.slow
def test_encoder_transfers_from_the_run_folder_and_fine_tunes(pretrained, tmp_path):
    data, logdir, run, _ = pretrained
    seg = build_model("vit_seg", input_channels=1, num_classes=1,
                      **json.loads("{" + ENCODER + "}"))
    load_pretrained(seg, run)
    mae = keras.saving.load_model(run / "model.keras")
    for a, b in zip(seg.encoder.get_weights(), mae.encoder.get_weights()):
        np.testing.assert_array_equal(a, b)
    cfg = parse_config("train", [
        "--dataset=synthetic", f"--data_dir={data}", f"--logdir={logdir}", "--run_name=vit",
        "--model=vit_seg", "--model_config={" + ENCODER + "}", "--pretrained=mae",
        "--freeze_encoder_epochs=1", "--patch_size=32", "--batch_size=4",
        "--patches_per_epoch=32", "--epochs=2", "--val_images=1", "--stride=16",
        "--loss=seed_vit", "--image_summary_every=0"])
    out = train(cfg)
    info = json.loads((out / "run.json").read_text())
    assert info["pretrained"] == str(run) and info["fully_convolutional"] is False
    assert len(json.loads((out / "metrics.json").read_text())["loss_history"]) == 2
    for size in (64, 48):  # 48 was told "must be a multiple of 32", and 64 then refused
        with pytest.raises(ValueError, match="exactly 32 px"):
            train(parse_config("train", [f"--flagfile={out / 'flags.txt'}",
                                         f"--patch_size={size}", "--run_name=bad"]))


def test_test_images_of_the_evaluation_dataset_are_refused(tmp_path):
    data = write_synthetic_dataset(tmp_path / "syn", num_images=3, num_test=1, seed=6,
                                   size=(64, 64))
    with pytest.raises(DatasetError, match="test image of the evaluation dataset"):
        pretraining_images([str(data / "test" / "images")], {"01_test", "03_test"})
    names, images = pretraining_images([str(data / "training" / "images")], {"03_test"})
    assert len(names) == len(images) == 2 and images[0].shape == (64, 64, 3)
    # a test photograph under another name and format: told by its pixels
    copy = tmp_path / "mine" / "eye.png"
    write_image_atomic(copy, read_image(data / "test" / "images" / "01_test.tif"))
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(copy))}: its pixels are those of "
                                           r"01_test, a test image of the evaluation dataset"):
        pretraining_images([str(copy.parent)], {"01_test"},
                           held_out_digests("synthetic", str(data)))
    # every frame of a file of several is a photograph to pre-train on
    folder = tmp_path / "series"
    folder.mkdir()
    write_dicom(folder / "IM0001", images[0], "RGB", more=(images[1],))
    names, frames = pretraining_images([str(folder)], {"03_test"})
    assert names == ["IM0001_frame1", "IM0001_frame2"]
    assert np.array_equal(frames[0], images[0]) and np.array_equal(frames[1], images[1])
    with pytest.raises(ValueError, match="pretrain_dirs"):
        pretraining_images([], set())


def test_held_out_names_lists_the_test_images_or_says_why_not(tmp_path):
    data = write_synthetic_dataset(tmp_path / "syn", num_images=3, num_test=2, seed=6,
                                   size=(64, 64))
    assert held_out_names("synthetic", str(data)) == {"01_test", "02_test"}
    assert held_out_names(None, str(data)) == set()
    with pytest.raises(DatasetError, match="--data_dir=.*nowhere.*--dataset="):
        held_out_names("synthetic", str(tmp_path / "nowhere"))


def test_model_config_keys_are_used_or_refused_never_dropped(tmp_path):
    """MAE's mask_ratio, norm_pix_loss and seed in --model_config were replaced by the flags'
    defaults, and RIP pre-training dropped any key it did not know, a misspelt one too."""
    cfg = MAEConfig(pretrain_dirs=("x",), model_config={"mask_ratio": 0.5, "seed": 3})
    assert _mae_fields(cfg, dict(cfg.model_config)) == {"mask_ratio": 0.5, "norm_pix_loss": True,
                                                        "seed": 3}
    cfg = MAEConfig(pretrain_dirs=("x",), mask_ratio=0.6, model_config={"mask_ratio": 0.6})
    assert _mae_fields(cfg, dict(cfg.model_config))["mask_ratio"] == 0.6
    cfg = MAEConfig(pretrain_dirs=("x",), mask_ratio=0.6, model_config={"mask_ratio": 0.5})
    with pytest.raises(ConfigError, match=r"--mask_ratio=0.6 and --model_config's "
                                          r"mask_ratio=0.5 disagree"):
        _mae_fields(cfg, dict(cfg.model_config))
    logdir = tmp_path / "runs"
    with pytest.raises(ConfigError, match=r"model 'mae' does not take mask_ratoi"):
        pretrain_mae(MAEConfig(pretrain_dirs=(str(tmp_path),), logdir=str(logdir),
                               model_config={"preset": "cpu_small", "mask_ratoi": 0.5}))
    # one config for the classifier and its rip_av run: rip_av's keys are left to rip_av
    shared = {"widths": [8, 8, 16, 16, 16], "context_size": 32, "av_weight": 1.0}
    with pytest.raises(ConfigError, match=r"model 'rip_classifier' does not take widhts "):
        pretrain_rip(RipPretrainConfig(rip_patches=str(tmp_path), logdir=str(logdir),
                                       model_config={**shared, "widhts": [8, 8, 16, 16, 16]}))
    with pytest.raises(DatasetError, match="run bin/generate_rip_patches.py"):  # passed the check
        pretrain_rip(RipPretrainConfig(rip_patches=str(tmp_path / "none"), logdir=str(logdir),
                                       model_config=shared))
    with pytest.raises(ConfigError, match="--rip_patches is required"):  # was a TypeError
        pretrain_rip(RipPretrainConfig(logdir=str(logdir)))
    assert not logdir.exists() or not any(logdir.iterdir())
