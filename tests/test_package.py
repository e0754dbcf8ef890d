"""The package as a library: what `import retina_tf` gives a user."""

import dataclasses
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from absl import flags as absl_flags

import retina_tf
from retina_tf.flags import parse_config
from tests import commands
from tests.conftest import tiny_train_args


def test_import_alone_lets_keras_load_a_trained_run(tiny_synthetic, tmp_path):
    run = retina_tf.train(parse_config("train", tiny_train_args(tiny_synthetic, tmp_path,
                                                                "--epochs=1")))
    # a fresh interpreter, Keras's defaults (compile=True needs the loss, metric and schedule)
    code = ("import sys, keras, retina_tf; m = keras.saving.load_model(sys.argv[1]); "
            "print(type(m).__name__, type(m.loss).__name__, type(m.optimizer).__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(run / "model.keras")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["UNet", "SegmentationLoss", "Adam"]


def test_shipped_models_load_by_name():
    seg = retina_tf.Segmenter.from_pretrained("unet_drive")
    assert seg.task == "vessel" and seg.run_dir.name == "unet_drive"
    with pytest.raises(retina_tf.ModelFileError, match="unet_drive"):
        retina_tf.Segmenter.from_pretrained("no_such_model")


def test_public_names_exist():
    assert all(hasattr(retina_tf, name) for name in retina_tf.__all__)


def test_train_and_evaluate_from_python_with_configs_only(tiny_synthetic, tmp_path):
    """The demo's path with no flags at all: configs in, a run folder and metrics out."""
    cfg = retina_tf.TrainConfig(
        dataset="synthetic", data_dir=str(tiny_synthetic), logdir=str(tmp_path),
        run_name="py", model="unet", model_config={"depth": 3, "base_filters": 8},
        patch_size=32, batch_size=8, patches_per_epoch=64, epochs=2, val_images=1,
        learning_rate=0.005, lr_schedule="cosine", image_summary_every=0)
    run = retina_tf.train(cfg)
    assert cfg.task is None  # the caller's config is never changed (the run's task: vessel)
    losses = json.loads((run / "metrics.json").read_text())["loss_history"]
    assert len(losses) == 2 and losses[1] < losses[0]
    report = retina_tf.evaluate(retina_tf.EvalConfig(
        model=str(run), dataset="synthetic", data_dir=str(tiny_synthetic), visualize=True))
    # two tiny epochs learn little (F1 0.29 on one CPU, over 0.3 on another): the report is
    # what evaluate wrote, with a score that counted pixels
    written = json.loads((run / "eval_synthetic_test" / "metrics.json").read_text())
    assert report["images"] == 2 and 0.0 < report["metrics"]["f1"] <= 1.0
    assert written["metrics"] == report["metrics"] and written["images"] == 2
    assert (run / "eval_synthetic_test" / "roc_curve.png").is_file()
    # flags.txt records the whole configuration: the run is re-created from it
    again = retina_tf.config.from_run(run)
    assert again == dataclasses.replace(cfg, task="vessel")
    assert keras.saving.load_model(run / "model.keras").count_params() == \
        json.loads((run / "run.json").read_text())["parameters"]
    # nothing of absl was needed or touched
    assert "epochs" not in absl_flags.FLAGS and "model" not in absl_flags.FLAGS


def test_a_bad_config_value_is_an_error_naming_it(tmp_path):
    with pytest.raises(retina_tf.ConfigError, match="'unet' does not take widths"):
        retina_tf.train(retina_tf.TrainConfig(dataset="synthetic", data_dir=str(tmp_path),
                                               logdir=str(tmp_path),
                                               model_config={"widths": [1]}))


def test_the_shipped_av_model_segments_a_photograph_in_a_fresh_interpreter(tmp_path):
    from retina_tf.data.io import write_image_atomic
    from retina_tf.data.synthetic import generate_fundus

    assert "ripav_rite" in retina_tf.shipped_models()
    photos = tmp_path / "photos"
    write_image_atomic(photos / "p.png", generate_fundus(1, (256, 256)).image)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "retina_tf", "predict", "--model=ripav_rite",
                           f"--input={photos}", f"--output_dir={out}", "--save_probabilities"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("p_av.png", "p_artery.png", "p_vein.png", "p_vessel.png", "p_prob.png",
                 "p_mask.png"):
        assert (out / name).is_file(), name
    prob = np.load(out / "p_prob.npy")
    assert prob.shape == (256, 256, 3) and 0.0 <= prob.min() and prob.max() <= 1.0


def test_predict_without_a_model_uses_the_general_vessel_model(tmp_path, shared_data):
    from retina_tf.data.io import read_mask

    assert "vessel_general" in retina_tf.shipped_models()
    assert retina_tf.PredictConfig().model == "vessel_general"
    photo = shared_data / "DRIVE" / "test" / "images" / "01_test.tif"
    out = tmp_path / "out"
    proc = commands.run([sys.executable, "-m", "retina_tf", "predict", f"--input={photo}",
                         f"--output_dir={out}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "vessel_general" in proc.stdout + proc.stderr
    mask = read_mask(out / "01_test_mask.png")
    truth = read_mask(shared_data / "DRIVE" / "test" / "1st_manual" / "01_manual1.gif")
    fov = read_mask(shared_data / "DRIVE" / "test" / "mask" / "01_test_mask.gif")
    tp = np.sum(mask & truth & fov)
    assert 2 * tp / (np.sum(mask & fov) + np.sum(truth & fov)) > 0.8  # a real vessel map
