"""Checks every architecture's tests share: save/reload and a few fit steps on a toy batch."""

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from retina_tf.losses import SegmentationLoss
from retina_tf.metrics import SegmentationF1


def to_numpy(outputs):
    """A model output (tensor or dict of tensors) as numpy arrays of the same structure."""
    return keras.tree.map_structure(keras.ops.convert_to_numpy, outputs)


def assert_reload_identical(model: keras.Model, x: np.ndarray, tmp_path: Path) -> keras.Model:
    """``model.save`` + ``keras.saving.load_model`` give the same class, config and outputs."""
    before = to_numpy(model(x, training=False))
    path = tmp_path / f"{model.name}.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    again = keras.saving.load_model(path)
    assert type(again) is type(model) and again.get_config() == model.get_config()
    keras.tree.map_structure(np.testing.assert_array_equal, to_numpy(again(x, training=False)),
                             before)
    return again


def fit_toy(model: keras.Model, x: np.ndarray, y: np.ndarray, optimizer, epochs: int,
            steps_per_epoch: int, fov: np.ndarray | None = None) -> dict:
    """Compiles as bin/train.py does (FOV-weighted BCE + Dice, F1 as a weighted metric) and fits
    one repeated (x, y, FOV) batch (FOV all ones by default); returns the history."""
    data = tf.data.Dataset.from_tensors((x, y, np.ones_like(y) if fov is None else fov)).repeat()
    model.compile(optimizer=optimizer, loss=SegmentationLoss("bce_dice"),
                  weighted_metrics=[SegmentationF1(name="f1")], jit_compile=False)
    # Built up front, the optimizer's variables do not make fit trace the step twice.
    model.optimizer.build(model.trainable_variables)
    return model.fit(data, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0,
                     shuffle=False).history
