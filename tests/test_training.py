"""Training end to end on tiny synthetic data: loss goes down, run folder, resume, strategies."""

import dataclasses
import json
import logging
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_tf.data.io import read_sample
from retina_tf.data.pipeline import resolve_samples
from retina_tf.errors import ModelFileError, TrainingDiverged
from retina_tf.flags import parse_config
from retina_tf.inference import load_keras_model
from retina_tf.models.base import SegmentationModel
from retina_tf.optimizers import Adam
from retina_tf.training import StopOnDivergence, WarmupDecay, make_strategy, train
from tests import commands
from tests.conftest import tiny_train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def synthetic(tiny_synthetic) -> Path:
    return tiny_synthetic


def tiny_flags(data_dir, logdir, *extra):
    return parse_config("train", tiny_train_args(data_dir, logdir, "--image_summary_every=2",
                                                 *extra))


def test_schedules_known_values():
    cos = WarmupDecay(1.0, 100, "cosine")
    assert float(cos(0)) == pytest.approx(1.0)
    assert float(cos(50)) == pytest.approx(0.5)
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-6)
    assert float(WarmupDecay(1.0, 100, "linear")(25)) == pytest.approx(0.75)
    assert float(WarmupDecay(1.0, 100, "poly")(50)) == pytest.approx(0.5**0.9)
    assert float(WarmupDecay(1.0, 100, "constant", warmup_steps=10)(4)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'exp'"):
        WarmupDecay(1.0, 100, "exp")


def test_auto_strategy_on_a_cpu_machine_is_the_default_one():
    assert not tf.config.list_physical_devices("GPU")
    assert make_strategy("auto") is tf.distribute.get_strategy()
    assert isinstance(make_strategy("one_device"), tf.distribute.OneDeviceStrategy)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        make_strategy("multi_worker")


def test_training_lowers_the_loss_and_writes_a_complete_run_folder(synthetic, tmp_path):
    cfg = tiny_flags(synthetic, tmp_path, "--image_summary_every=3")
    run = train(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    losses = metrics["loss_history"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    for name in ("model.keras", "preprocessor.json", "flags.txt", "run.json",
                 "checkpoints/best.weights.h5"):
        assert (run / name).is_file(), name
    assert list((run / "train").glob("events.out.tfevents.*"))
    assert list((run / "validation").glob("events.out.tfevents.*"))
    # held-out image summaries every third epoch and at the last (a run shorter than
    # --image_summary_every had none)
    steps = {event.step for path in (run / "validation" / "images").glob("events.out.*")
             for event in tf.compat.v1.train.summary_iterator(str(path))
             if any(v.tag == "prediction" for v in event.summary.value)}
    assert steps == {2, 3}
    assert 0.0 <= metrics["validation"]["f1"] <= 1.0
    assert not (run / "backup").exists()  # removed once training completes
    # flags.txt is a flagfile that reproduces the run's settings
    again = parse_config("train", [f"--flagfile={run / 'flags.txt'}"])
    assert again == dataclasses.replace(cfg, task="vessel")  # task: the run's, resolved
    assert again.model_config["base_filters"] == 8 and again.patch_size == 32
    info = json.loads((run / "run.json").read_text())
    assert info["model"] == "unet" and info["size_multiple"] == 4
    # what made it: the versions this process runs, and the machine
    env = info["environment"]
    assert (env["tensorflow"], env["keras"], env["numpy"]) == (tf.__version__, keras.__version__,
                                                               np.__version__)
    assert env["retina_tf"] and env["python"] and env["cpu"] and env["gpus"] == []
    assert "environment_at_start" not in info
    model = keras.saving.load_model(run / "model.keras", compile=False)
    assert model.count_params() == info["parameters"]
    # the vessel share of the training labels, for predict's warning of a far-off vessel map
    shares = []
    for sample in resolve_samples("synthetic", str(synthetic), "training"):
        if sample.name in info["data"]["training_images"]:
            data = read_sample(sample)
            shares.append(data.vessel[data.fov].mean())
    assert len(shares) == info["vessel_share"]["images"] == len(info["data"]["training_images"])
    assert info["vessel_share"]["min"] == pytest.approx(min(shares))
    assert info["vessel_share"]["max"] == pytest.approx(max(shares))
    assert "artery_share" not in info  # a vessel model's run
    # how bright its training images' thin structures are, for predict's angiogram warning:
    # the synthetic photographs' vessels are dark
    ratio = info["bright_line_ratio"]
    assert ratio["images"] == len(shares) and 0 < ratio["min"] <= ratio["max"] < 1


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill after epoch 2")


def test_an_interrupted_run_resumes_where_it_stopped(synthetic, tmp_path):
    cfg = tiny_flags(synthetic, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, extra_callbacks=[_Interrupt()])
    assert sorted(p.name for p in (tmp_path / "tiny" / "backup").glob("*.json")) == [
        "epoch-0001.json", "epoch-0002.json"]  # the previous complete backup is kept
    # as if begun with another TensorFlow: the resumed run keeps both environments
    info_path = tmp_path / "tiny" / "run.json"
    info = json.loads(info_path.read_text())
    info["environment"]["tensorflow"] = "2.0.0"
    info_path.write_text(json.dumps(info))
    run = train(tiny_flags(synthetic, tmp_path))
    info = json.loads(info_path.read_text())
    assert info["environment_at_start"]["tensorflow"] == "2.0.0"
    assert info["environment"]["tensorflow"] == tf.__version__
    metrics = json.loads((run / "metrics.json").read_text())
    # the history before the interruption is kept, and only epochs 3 and 4 ran again
    assert metrics["epochs_run"] == 4 and len(metrics["loss_history"]) == 4
    assert len(metrics["history"]["val_f1"]) == 4
    assert not (run / "backup").exists()


class _Poison(keras.callbacks.Callback):
    """Sets the first kernel to NaN before step ``step`` of epoch ``epoch`` (1-based): the
    weights of a training that diverged there. ``statistic``: the first batch norm's moving
    mean instead, which training does not use, so that only the weights show it."""

    def __init__(self, epoch: int, step: int, statistic: bool = False):
        super().__init__()
        self.at = (epoch - 1, step - 1)
        self.statistic = statistic

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self._epoch, batch) == self.at:
            weight = (next(w for w in self.model.non_trainable_weights if "moving_mean" in
                           w.path) if self.statistic else self.model.trainable_weights[0])
            weight.assign(np.full(weight.shape, np.nan, weight.dtype))


def test_a_diverged_training_stops_at_once_and_keeps_the_epochs_before(synthetic, tmp_path,
                                                                     caplog):
    cfg = tiny_flags(synthetic, tmp_path)
    # a moving statistic, not in the loss: the weights at the epoch's end tell
    with pytest.raises(TrainingDiverged, match=r"moving_mean.* became NaN or infinite in epoch 3 "
                       r"\(learning rate .*\): the weights diverged; train with a lower "
                       r"--learning_rate\. "
                       r".*model\.keras holds epoch [12], the best of the 2 completed before"):
        train(cfg, extra_callbacks=[_Poison(3, 2, statistic=True)])
    run = tmp_path / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and "in epoch 3" in metrics["stopped"]
    assert np.isfinite(metrics["loss_history"]).all() and not (run / "backup").exists()
    # the same command again trains nothing and says why the run is short
    caplog.clear()
    assert train(cfg) == run
    assert "but only 2 of its 4 epochs: " in caplog.text and "in epoch 3" in caplog.text
    # model.keras holds the best checkpoint's weights (finite: it loads)
    model = load_keras_model(run / "model.keras")
    best = load_keras_model(run / "model.keras")
    best.load_weights(run / "checkpoints" / "best.weights.h5")
    for a, b in zip(model.get_weights(), best.get_weights()):
        np.testing.assert_array_equal(a, b)
    # a model file with weights that are not finite is refused by name, not segmented empty
    model.trainable_weights[0].assign(np.full(model.trainable_weights[0].shape, np.nan))
    model.save(tmp_path / "nan.keras")
    with pytest.raises(ModelFileError, match=r"nan\.keras holds weights that are not finite"):
        load_keras_model(tmp_path / "nan.keras")


def test_a_loss_that_is_not_finite_stops_at_its_step():
    # whether a real divergence reaches the loss first depends on the CPU (see above): the
    # per-step check, on its own
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=Adam(0.005), loss="mse")
    stop = StopOnDivergence(steps_per_epoch=8)
    stop.set_model(model)
    stop.on_epoch_begin(2)
    stop.on_train_batch_end(0, {"loss": 0.7})
    for loss in (float("nan"), float("inf")):
        with pytest.raises(TrainingDiverged, match=rf"^the training loss became {loss} in epoch "
                           r"3, step 2 of 8 \(learning rate 0\.005\): the weights diverged; "
                           r"train with a lower --learning_rate$"):
            stop.on_train_batch_end(1, {"loss": loss})


def test_a_training_diverged_in_its_first_epoch_saves_nothing(synthetic, tmp_path):
    cfg = tiny_flags(synthetic, tmp_path)
    with pytest.raises(TrainingDiverged, match=r"in epoch 1\b.* no epoch was completed before, "
                       r"so nothing was saved"):
        train(cfg, extra_callbacks=[_Poison(1, 1)])
    assert not (tmp_path / "tiny" / "model.keras").exists()
    # with nothing kept, the next command with other flags needs no --overwrite
    train(tiny_flags(synthetic, tmp_path, "--epochs=1"))


def test_train_cli_says_in_one_line_that_the_training_diverged(synthetic, tmp_path):
    proc = commands.script("train.py", *tiny_train_args(synthetic, tmp_path),
                           "--learning_rate=1e30")
    assert proc.returncode == 1, proc.stderr
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "the weights diverged; train with a lower --learning_rate" in \
        error[0] and "learning rate 1e+30" in error[0], proc.stderr
    assert not (tmp_path / "tiny" / "model.keras").exists()


def test_same_seed_same_model(synthetic, tmp_path):
    """Seeded runs repeat; the caller's random numbers go on as if no training ran (it reseeded
    Python, NumPy, TensorFlow and Keras with the run's seed and left them so)."""
    import random

    def draws():
        return random.random(), np.random.rand(), float(keras.random.uniform(()))

    keras.utils.set_random_seed(5)
    draws()
    expected = draws()
    keras.utils.set_random_seed(5)
    draws()
    a = train(tiny_flags(synthetic, tmp_path / "a", "--epochs=1", "--noresume"))
    assert draws() == expected
    assert tf.compat.v1.get_seed(None)[0] == 5  # TensorFlow's global seed
    b = train(tiny_flags(synthetic, tmp_path / "b", "--epochs=1", "--noresume"))
    la = json.loads((a / "metrics.json").read_text())["loss_history"]
    lb = json.loads((b / "metrics.json").read_text())["loss_history"]
    assert la == pytest.approx(lb, rel=1e-5)


def test_ema_momentum_saves_the_moving_average_of_the_weights(synthetic, tmp_path):
    momentum = 0.8

    class RawWeights(keras.callbacks.Callback):  # the weights after every step, as trained
        def __init__(self):
            super().__init__()
            self.steps = []

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append([v.numpy().copy() for v in self.model.trainable_variables])

    raw = RawWeights()
    run = train(tiny_flags(synthetic, tmp_path, "--epochs=1", f"--ema_momentum={momentum}"),
                extra_callbacks=[raw])
    assert len(raw.steps) == 8
    average = raw.steps[0]  # Keras's average starts at the first step's weights
    for weights in raw.steps[1:]:
        average = [momentum * a + (1 - momentum) * w for a, w in zip(average, weights)]
    saved = [v.numpy() for v in load_keras_model(run / "model.keras").trainable_variables]
    assert all(np.allclose(s, a, atol=1e-6) for s, a in zip(saved, average))
    assert max(np.abs(s - w).max() for s, w in zip(saved, raw.steps[-1])) > 1e-3  # not raw


def test_whole_image_mode_trains(synthetic, tmp_path):
    run = train(tiny_flags(synthetic, tmp_path, "--mode=whole", "--batch_size=2", "--epochs=3",
                           "--steps_per_epoch=4"))
    losses = json.loads((run / "metrics.json").read_text())["loss_history"]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(synthetic, tmp_path):
    # Logical devices must be configured before TensorFlow starts, hence a process of its own.
    proc = commands.script(
        "train.py", "--dataset=synthetic",
         f"--data_dir={synthetic}", f"--logdir={tmp_path}", "--run_name=mirrored",
         "--logical_cpus=2", "--strategy=mirrored", "--depth=3", "--base_filters=8",
         "--patch_size=32", "--batch_size=8", "--patches_per_epoch=64", "--epochs=2",
         "--val_images=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in proc.stdout
    losses = json.loads((tmp_path / "mirrored" / "metrics.json").read_text())["loss_history"]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert (tmp_path / "mirrored" / "model.keras").is_file()
    # the same training on one device: the same loss (each replica's share is divided, as
    # Keras's losses are; it was twice as large, and so were the gradients); batch norm sees
    # half batches on each replica, hence a tolerance
    one = train(parse_config("train", [
        "--dataset=synthetic", f"--data_dir={synthetic}", f"--logdir={tmp_path}",
        "--run_name=one", "--depth=3", "--base_filters=8", "--patch_size=32", "--batch_size=8",
        "--patches_per_epoch=64", "--epochs=2", "--val_images=1"]))
    single = json.loads((one / "metrics.json").read_text())["loss_history"]
    assert losses[0] == pytest.approx(single[0], rel=0.05), (losses, single)
    proc = commands.script(  # a batch the replicas cannot share equally: refused, nothing written
        "train.py", "--dataset=synthetic", f"--data_dir={synthetic}", f"--logdir={tmp_path}",
        "--run_name=odd", "--logical_cpus=2", "--strategy=mirrored", "--batch_size=3")
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        "--batch_size=3: 2 replicas (--strategy=mirrored) take equal shares of a batch; give a "
        "multiple of 2"), proc.stderr[-3000:]
    assert not (tmp_path / "odd").exists()


def test_starting_from_a_run_of_other_preprocessing_is_warned(caplog):
    from retina_tf.data.preprocess import Preprocessor
    from retina_tf.inference import PRETRAINED_DIR
    from retina_tf.training import _warn_other_preprocessing
    run = PRETRAINED_DIR / "unet_drive"
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        _warn_other_preprocessing(run, Preprocessor.load(run / "preprocessor.json"))
        assert not caplog.text  # the same steps: nothing to say
        _warn_other_preprocessing(run, Preprocessor.from_steps(["grayscale"], channel="green"))
    assert ("preprocessed by grayscale, standardize, clahe, gamma (luminance); this run's are "
            "preprocessed by grayscale (green)") in caplog.text


def test_fewer_training_images_than_val_images_is_said(tiny_synthetic, tmp_path, caplog):
    from retina_tf.training import load_training_sets
    cfg = parse_config("train", tiny_train_args(tiny_synthetic, tmp_path, "--val_images=5",
                                                "--task=vessel"))
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        train_set, val_set, _ = load_training_sets(cfg)
    assert len(val_set.images) == 3 and len(train_set.images) == 1
    assert "--val_images=5, but the set of synthetic has 4 training image(s): 3 held out" \
        in caplog.text and "no image held out" not in caplog.text
    caplog.clear()
    one = tmp_path / "one.txt"  # a label file of one photograph
    split = tiny_synthetic / "training"
    one.write_text(f"{split / 'images'},{split / '1st_manual'},{split / 'mask'}\n"
                   "03_training.tif,03_manual1.gif,03_training_mask.gif\n")
    cfg = parse_config("train", tiny_train_args(tiny_synthetic, tmp_path, "--dataset=",
                                                "--data_dir=", f"--label_file_path={one}",
                                                "--val_images=2", "--task=vessel"))
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        assert load_training_sets(cfg)[1] is None
    assert "has 1 training image(s): 0 held out" in caplog.text
    assert "no image held out: the epoch with the lowest training loss is kept" in caplog.text


@keras.saving.register_keras_serializable(package="retina_tf_tests")
class _OutsideNet(SegmentationModel, keras.Model):
    """A model defined outside the package (docs/adding_a_model.md, "From outside")."""

    def __init__(self, input_channels: int = 1, num_classes: int = 1, width: int = 4, **kwargs):
        inputs = keras.Input((None, None, input_channels), name="image")
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
        outputs = keras.layers.Conv2D(num_classes, 1, name="logits")(x)
        kwargs.setdefault("name", "outside_net")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.input_channels, self.num_classes, self.width = input_channels, num_classes, width

    @property
    def size_multiple(self) -> int:
        return 1

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable, "width": self.width,
                "input_channels": self.input_channels, "num_classes": self.num_classes}


def test_a_model_registered_from_outside_trains_and_segments(synthetic, tmp_path, monkeypatch):
    """A pip user could not add a model without editing the package's private registry."""
    from retina_tf import models
    from retina_tf.errors import ConfigError
    from retina_tf.inference import Segmenter
    from retina_tf.models import model_names, register_model
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # the other tests' as it was
    register_model("outside_net", _OutsideNet)
    assert "outside_net" in model_names()
    with pytest.raises(ConfigError, match="'unet' is the name of another model"):
        register_model("unet", _OutsideNet)
    with pytest.raises(ConfigError, match="give a class of both SegmentationModel"):
        register_model("plain", keras.Model)
    cfg = dataclasses.replace(tiny_flags(synthetic, tmp_path, "--epochs=1"), model="outside_net",
                              model_config={"width": 6})
    run = train(cfg)
    seg = Segmenter.from_run(run)
    assert isinstance(seg.model, _OutsideNet) and seg.model.width == 6
    prob, _ = seg.segment(read_sample(resolve_samples("synthetic", synthetic, "test")[0]).image)
    assert prob.shape[-1] == 1 and 0 <= prob.min() and prob.max() <= 1


def test_held_out_photographs_of_another_scale_are_noted_where_evaluate_would_resize_them():
    """The threshold and best epoch were chosen on held-out images at their own size, where
    evaluate resizes one whose FOV is over 20 % from the training FOV: said, not hidden."""
    from retina_tf.data.pipeline import SegmentationSet
    from retina_tf.training import held_out_scale_note

    def disc(diameter: int, size: int = 200) -> np.ndarray:
        yy, xx = np.mgrid[:size, :size]
        return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (diameter / 2) ** 2

    fovs = [disc(100), disc(118), disc(150)]
    held_out = SegmentationSet(["a", "b", "c"], [None] * 3, [None] * 3, fovs)
    assert held_out_scale_note(held_out, 100.0) == (
        "note: 1 of the 3 held-out images (c) have a FOV over 20% from the training FOV "
        "(100 px): validation, the best epoch and the threshold see them at their own size, "
        "where evaluate and predict resize them")
    assert held_out_scale_note(held_out.subset([0, 1]), 100.0) is None
    assert held_out_scale_note(None, 100.0) is None
