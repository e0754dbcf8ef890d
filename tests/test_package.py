"""The package as a library: what `import retina_tf` gives a user."""

import subprocess
import sys

import pytest

import retina_tf
from retina_tf.flags import parse_flags
from tests.conftest import tiny_train_args


def test_import_alone_lets_keras_load_a_trained_run(tiny_synthetic, tmp_path):
    run = retina_tf.train(parse_flags(tiny_train_args(tiny_synthetic, tmp_path, "--epochs=1")))
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
