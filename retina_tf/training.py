"""Training: strategy selection, optimizer and schedule, callbacks and the run folder.

``train(cfg)`` is what ``bin/train.py`` runs; ``cfg`` is an absl FlagValues (``FLAGS`` or
``retina_tf.flags.parse_flags([...])``). The run folder ``<logdir>/<run_name>/`` holds
TensorBoard events (``train/``, ``validation/``), ``checkpoints/``, ``backup/`` (resume state),
``model.keras``, ``preprocessor.json``, ``run.json``, ``flags.txt`` and ``metrics.json``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from retina_tf.data.io import atomic_write_bytes, read_sample
from retina_tf.data.pipeline import (Augment, SegmentationSet, build_set, patch_dataset,
                                     resolve_samples, whole_image_dataset, with_context)
from retina_tf.data.preprocess import Preprocessor
from retina_tf.error_maps import ERROR_MAPS_DIR, read_error_maps, resolve_pretrained
from retina_tf.inference import Segmenter, atomic_save_model, fov_diameter
from retina_tf.losses import SegmentationLoss
from retina_tf.metrics import AVMetrics, SegmentationF1, VesselMetrics
from retina_tf.models import build_model, model_class

# --- distribution ----------------------------------------------------------------------------

def configure_logical_cpus(n: int) -> None:
    """Splits the CPU into ``n`` logical devices (before TensorFlow initializes its runtime)."""
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """``auto``: MirroredStrategy when several GPUs are visible, else the default strategy.

    ``mirrored`` mirrors over all GPUs, or over all logical CPUs when there is no GPU;
    ``one_device`` uses the first GPU or the CPU; ``multi_worker`` reads ``TF_CONFIG``.
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        # NCCL all-reduce needs GPUs; reduce on one device instead.
        return tf.distribute.MirroredStrategy(
            cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                             "(cluster and task of this worker)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}")


# --- optimization ----------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="retina_tf")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up then constant, cosine, poly (power 0.9) or linear decay to zero."""

    def __init__(self, learning_rate: float, total_steps: int, kind: str = "constant",
                 warmup_steps: int = 0):
        if kind not in ("constant", "cosine", "poly", "linear"):
            raise ValueError(f"unknown learning-rate schedule {kind!r}")
        self.learning_rate = float(learning_rate)
        self.total_steps = max(int(total_steps), 1)
        self.kind = kind
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.learning_rate, tf.float32)
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        t = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.kind == "cosine":
            lr = lr * 0.5 * (1.0 + tf.cos(math.pi * t))
        elif self.kind == "poly":
            lr = lr * (1.0 - t) ** 0.9
        elif self.kind == "linear":
            lr = lr * (1.0 - t)
        if self.warmup_steps > 0:
            lr = lr * tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return lr

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate, "total_steps": self.total_steps,
                "kind": self.kind, "warmup_steps": self.warmup_steps}


def make_optimizer(name: str, schedule, weight_decay: float = 1e-4) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(schedule)
    if name == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    if name == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}")


# --- callbacks -------------------------------------------------------------------------------

class LearningRateAndSpeed(keras.callbacks.Callback):
    """Adds the learning rate and steps/s of each epoch to the logs (TensorBoard shows them)."""

    def __init__(self, steps_per_epoch: int, pixels_per_step: int):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.pixels_per_step = pixels_per_step

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        seconds = time.perf_counter() - self._start
        logs["steps_per_second"] = self.steps_per_epoch / seconds
        logs["pixels_per_second"] = self.steps_per_epoch * self.pixels_per_step / seconds
        opt = self.model.optimizer
        lr = opt.learning_rate
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(
            lr(opt.iterations) if callable(lr) else lr))


class TimeBudget(keras.callbacks.Callback):
    """Stops training at the end of the epoch in which ``minutes`` of wall time are used up."""

    def __init__(self, minutes: float):
        super().__init__()
        self.seconds = minutes * 60.0

    def on_train_begin(self, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if self.seconds > 0 and time.monotonic() - self._start >= self.seconds:
            print(f"time budget of {self.seconds / 60:.1f} min reached after epoch {epoch + 1}",
                  flush=True)
            self.model.stop_training = True


def evaluate_set(segmenter: Segmenter, seg: SegmentationSet, task: str = "vessel",
                 whole_image: bool = False, threshold: float = 0.5
                 ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Vessel (and A/V) metrics of a model over a preprocessed set, and the probability maps."""
    vessel = VesselMetrics(threshold=threshold, whole_image=whole_image)
    av = AVMetrics() if task == "av" else None
    probs = []
    for image, target, fov in zip(seg.images, seg.targets, seg.fovs):
        prob = segmenter.probability_preprocessed(image) * fov[..., None]
        probs.append(prob)
        vessel.update(prob[..., -1], target[..., -1] > 0.5, fov)
        if av is not None:
            av.update(prob, target > 0.5, fov)
    result = vessel.result()
    if av is not None:
        result.update({f"av_{k}": v for k, v in av.result().items()})
    return result, probs


def _to_uint8_image(x: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(x, np.float32), 0, 1)
    if x.shape[-1] not in (1, 3):
        x = x[..., :3] if x.shape[-1] > 3 else x[..., :1]
    return (x * 255).round().astype(np.uint8)


class WholeImageValidation(keras.callbacks.Callback):
    """Segments the held-out training images whole and adds ``val_f1``, ``val_auc_roc``, ... to
    the epoch logs, so ModelCheckpoint can keep the best model (by validation F1, or A/V accuracy
    for A/V models) and TensorBoard plots them; writes input / label / prediction image summaries
    every ``image_every`` epochs.
    """

    def __init__(self, seg: SegmentationSet, preprocessor: Preprocessor, size_multiple: int,
                 task: str, log_dir: Path, every: int = 1, image_every: int = 1,
                 scales: list[float] | None = None, stride: int = 16):
        super().__init__()
        self.scales = scales
        self.stride = stride
        self._segmenter = None
        self.seg = seg
        self.preprocessor = preprocessor
        self.size_multiple = size_multiple
        self.task = task
        self.every = max(every, 1)
        self.image_every = image_every
        self.log_dir = Path(log_dir)
        self._writer = None

    def segmenter(self) -> Segmenter:
        """Built once: its traced forward pass serves every epoch and the final evaluation."""
        if self._segmenter is None:
            # whole images unless the model needs fixed-size windows (e.g. vit_seg)
            full = bool(getattr(self.model, "fully_convolutional", True))
            self._segmenter = Segmenter(self.model, self.preprocessor, self.size_multiple,
                                        "auto", window=self.size_multiple, stride=self.stride,
                                        fully_convolutional=full, scales=self.scales)
        return self._segmenter

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        result, probs = evaluate_set(self.segmenter(), self.seg, self.task)
        for key in ("f1", "auc_roc", "auc_pr", "acc", "se", "sp", "av_acc"):
            if key in result:
                logs[f"val_{key}"] = float(result[key])
        if self.image_every and (epoch + 1) % self.image_every == 0:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(str(self.log_dir / "images"))
            with self._writer.as_default():
                tf.summary.image("input", _to_uint8_image(self.seg.images[0])[None], step=epoch)
                tf.summary.image("label", _to_uint8_image(self.seg.targets[0])[None], step=epoch)
                tf.summary.image("prediction", _to_uint8_image(probs[0])[None], step=epoch)
            self._writer.flush()


# --- run folder ------------------------------------------------------------------------------

def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def flags_text(cfg) -> str:
    """The run's flags as a flagfile (only retina_tf's own flags)."""
    from retina_tf.flags import OWN_FLAGS
    lines = []
    for name in sorted(OWN_FLAGS):
        if name in cfg:
            value = cfg[name].value
            if value is None:
                continue
            if isinstance(value, list):
                value = ",".join(map(str, value))
            elif isinstance(value, bool):
                lines.append(f"--{name}" if value else f"--no{name}")
                continue
            lines.append(f"--{name}={value}")
    return "\n".join(lines) + "\n"


def run_dir_of(cfg) -> Path:
    if cfg.run_name:
        return Path(cfg.logdir) / cfg.run_name
    source = cfg.dataset or (Path(cfg.label_file_path).parent.name if cfg.label_file_path
                             else "data")
    name = f"{cfg.model}_{source}"
    return Path(cfg.logdir) / name


def model_kwargs(cfg, input_channels: int, num_classes: int) -> dict[str, Any]:
    """Constructor arguments of ``cfg.model``: the flags its class lists in ``flag_arguments``
    (the U-Net's --depth, --base_filters, ...), then ``--model_config`` on top. Only listed flags:
    a flag that happens to share a constructor argument's name (--patch_size vs. a ViT's
    patch_size) must not leak into another architecture."""
    cls = model_class(cfg.model)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {name: getattr(cfg, name) for name in getattr(cls, "flag_arguments", ())
              if name in params and name in cfg}
    kwargs.update(input_channels=input_channels)
    if "num_classes" in params:  # not for pre-training models (MAE)
        kwargs["num_classes"] = num_classes
    if cfg.model_config:
        kwargs.update(json.loads(cfg.model_config))
    return kwargs


def load_training_sets(cfg) -> tuple[SegmentationSet, SegmentationSet | None, Preprocessor]:
    """Reads the training split, holds out the last ``val_images``, fits the preprocessor on the
    rest and preprocesses both."""
    samples = resolve_samples(cfg.dataset, cfg.data_dir, "training", cfg.label_file_path)
    datas = [read_sample(s) for s in samples]
    n_val = min(cfg.val_images, len(datas) - 1) if cfg.val_images > 0 else 0
    train_idx = list(range(len(datas) - n_val))
    val_idx = list(range(len(datas) - n_val, len(datas)))
    pre = Preprocessor.from_steps(cfg.preprocess, channel=cfg.channel)
    if pre.standardize:
        pre.fit(datas[i].image for i in train_idx)
    train_set = build_set([datas[i] for i in train_idx], pre, cfg.task,
                          [samples[i] for i in train_idx], cfg.cache_dir)
    val_set = build_set([datas[i] for i in val_idx], pre, cfg.task,
                        [samples[i] for i in val_idx], cfg.cache_dir) if val_idx else None
    return train_set, val_set, pre


def load_pretrained(model: keras.Model, run_dir: Path) -> None:
    """Initializes ``model`` from the model saved in ``run_dir``: by the model's own
    ``load_pretrained(source)`` when it has one (e.g. EAR-Net from its HMSA stage 1), else all
    weights when both models have the same architecture."""
    from retina_tf.models import load_all
    load_all()
    source = keras.saving.load_model(Path(run_dir) / "model.keras", compile=False)
    if hasattr(model, "load_pretrained"):
        model.load_pretrained(source)
        return
    mine, theirs = model.get_weights(), source.get_weights()
    if type(source) is not type(model) or [w.shape for w in mine] != [w.shape for w in theirs]:
        raise ValueError(f"--pretrained={run_dir}: its {type(source).__name__} does not match "
                         f"this {type(model).__name__} (architecture or size differs)")
    model.set_weights(theirs)


def attach_error_maps(train_set: SegmentationSet, folder: str | None, pretrained: Path | None,
                      model_name: str) -> SegmentationSet:
    """The training set with each image's stage-1 error map appended to its target."""
    if folder is None:
        if pretrained is None:
            raise ValueError(f"{model_name} trains on stage-1 error maps: give --pretrained=<stage-1 "
                             "run> (after bin/make_error_maps.py) or --error_maps=<folder>")
        folder = pretrained / ERROR_MAPS_DIR
    maps = read_error_maps(folder, train_set.names, [im.shape[:2] for im in train_set.images])
    share = np.mean([m[f].mean() for m, f in zip(maps, train_set.fovs)])
    print(f"error maps from {folder}: {share:.2%} of the FOV pixels wrong in stage 1", flush=True)
    return train_set.with_extras(maps)


class FreezeEncoder(keras.callbacks.Callback):
    """Keeps ``model.encoder`` frozen for the first ``epochs`` epochs of fine-tuning (so a new
    decoder settles before it can disturb pre-trained weights), then trains everything."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = int(epochs)

    def _set(self, trainable: bool):
        if self.model.encoder.trainable != trainable:
            self.model.encoder.trainable = trainable
            # the traced train step captured the old trainable set: trace it again
            self.model.make_train_function(force=True)

    def on_train_begin(self, logs=None):
        self._set(False)

    def on_epoch_begin(self, epoch, logs=None):
        self._set(epoch >= self.epochs)


def fit_run(model: keras.Model, dataset: tf.data.Dataset, steps: int, pixels_per_step: int,
            cfg, run_dir: Path, validation: keras.callbacks.Callback | None = None,
            extra_callbacks: list[keras.callbacks.Callback] | None = None
            ) -> tuple[keras.callbacks.History, float, Path]:
    """``model.fit`` with the run folder's callbacks: learning rate and speed, validation (the
    best checkpoint by its ``val_f1``, ``val_av_acc`` for A/V models, else by loss), time budget, checkpoints, TensorBoard and
    resume. Returns the history, the minutes it took and the best checkpoint's path."""
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    best_path = run_dir / "checkpoints" / "best.weights.h5"
    callbacks: list[keras.callbacks.Callback] = [LearningRateAndSpeed(steps, pixels_per_step)]
    monitor, mode = "loss", "min"
    if validation is not None:
        callbacks.append(validation)
        # an A/V model is chosen by what it is for: artery/vein accuracy
        monitor = "val_av_acc" if getattr(validation, "task", "vessel") == "av" else "val_f1"
        mode = "max"
    callbacks += [
        TimeBudget(cfg.time_budget_minutes),
        keras.callbacks.ModelCheckpoint(best_path, monitor=monitor, mode=mode,
                                        save_best_only=True, save_weights_only=True),
        keras.callbacks.ModelCheckpoint(run_dir / "checkpoints" / "last.weights.h5",
                                        save_weights_only=True),
        keras.callbacks.TensorBoard(log_dir=str(run_dir), write_graph=False,
                                    write_steps_per_second=False),
    ]
    if cfg.resume:
        # Restores model, optimizer and epoch after an interruption; deleted when fit completes.
        callbacks.insert(0, keras.callbacks.BackupAndRestore(str(run_dir / "backup")))
    callbacks += list(extra_callbacks or [])
    start = time.monotonic()
    history = model.fit(dataset, epochs=cfg.epochs, steps_per_epoch=steps, callbacks=callbacks,
                        shuffle=False,  # the tf.data pipeline already samples at random
                        verbose=1 if sys.stdout.isatty() else 2)
    return history, (time.monotonic() - start) / 60.0, best_path


def train(cfg, extra_callbacks: list[keras.callbacks.Callback] | None = None) -> Path:
    """Trains ``cfg.model`` as the flags say and returns the run folder.

    ``extra_callbacks`` run after the built-in ones (after the resume backup of each epoch).
    """
    keras.utils.set_random_seed(cfg.seed)
    if cfg.logical_cpus:
        configure_logical_cpus(cfg.logical_cpus)
    strategy = make_strategy(cfg.strategy)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)

    cls = model_class(cfg.model)
    script = getattr(cls, "pretraining_script", None)
    if script:
        raise ValueError(f"--model={cfg.model} is a pre-training model: run {script} (then "
                         "bin/train.py fine-tunes from its run folder with --pretrained)")
    model_task = getattr(cls, "task", None)
    if model_task and not cfg["task"].present:  # --task inferred from the model (rip_av: av)
        cfg.task = model_task
    train_set, val_set, pre = load_training_sets(cfg)
    print(f"{len(train_set)} training images, {len(val_set) if val_set else 0} held out for "
          f"validation; preprocessing {pre.steps}; strategy {type(strategy).__name__} with "
          f"{strategy.num_replicas_in_sync} replica(s); run folder {run_dir}", flush=True)
    num_classes = train_set.targets[0].shape[-1]
    augment = Augment(flip=cfg.flip, rot90=cfg.rot90, rotate_degrees=cfg.rotate_degrees,
                      brightness=cfg.brightness, contrast=cfg.contrast, gamma=cfg.gamma_jitter)

    with strategy.scope():
        model = build_model(cfg.model, **model_kwargs(cfg, pre.channels, num_classes))
    pretrained = resolve_pretrained(cfg.pretrained, cfg.logdir) if cfg.pretrained else None
    if pretrained is not None:
        load_pretrained(model, pretrained)
        print(f"started from the weights of {pretrained}", flush=True)
    if getattr(model, "needs_error_maps", False):
        train_set = attach_error_maps(train_set, cfg.error_maps, pretrained, cfg.model)
    extras = model.training_extras(train_set.targets) if hasattr(model, "training_extras") else None
    if extras is not None:  # targets the model derives from the labels (RIP-AV's distance maps)
        train_set = train_set.with_extras(extras)
    multiple = getattr(model, "size_multiple", 16)
    if cfg.mode == "patch":
        if cfg.patch_size % multiple:
            raise ValueError(f"--patch_size={cfg.patch_size} must be a multiple of {multiple} "
                             f"for {cfg.model}")
        if not getattr(model, "fully_convolutional", True) and cfg.patch_size != multiple:
            raise ValueError(f"--patch_size={cfg.patch_size}: {cfg.model} takes inputs of "
                             f"exactly {multiple} px (its image_size)")
        if getattr(model, "context_fusion", False):  # wide crops, split into patch + context
            dataset = with_context(
                patch_dataset(train_set, cfg.patch_size * model.context_factor, cfg.batch_size,
                              cfg.vessel_probability, augment, cfg.seed),
                cfg.patch_size, model.context_size)
        else:
            dataset = patch_dataset(train_set, cfg.patch_size, cfg.batch_size,
                                    cfg.vessel_probability, augment, cfg.seed)
        steps = cfg.steps_per_epoch or max(cfg.patches_per_epoch // cfg.batch_size, 1)
        pixels_per_step = cfg.batch_size * cfg.patch_size**2
    else:
        dataset = whole_image_dataset(train_set, cfg.batch_size, multiple, augment, cfg.seed)
        steps = cfg.steps_per_epoch or max(len(train_set) // cfg.batch_size, 1)
        h, w = dataset.element_spec[0].shape[1:3]
        pixels_per_step = cfg.batch_size * h * w

    with strategy.scope():
        schedule = WarmupDecay(cfg.learning_rate, cfg.epochs * steps, cfg.lr_schedule,
                               cfg.warmup_steps)
        loss = SegmentationLoss(cfg.loss, pos_weight=cfg.pos_weight)
        model.compile(optimizer=make_optimizer(cfg.optimizer, schedule, cfg.weight_decay),
                      # weighted_metrics: only these receive the FOV map as sample_weight
                      loss=loss, weighted_metrics=[SegmentationF1(name="f1")],
                      jit_compile=bool(cfg.jit_compile) and loss.supports_jit)
        # Building the optimizer now saves a second trace of the train step inside fit.
        model.optimizer.build(model.trainable_variables)

    run_info = {"model": cfg.model, "model_config": model.get_config(), "task": cfg.task,
                "size_multiple": multiple, "patch_size": cfg.patch_size, "mode": cfg.mode,
                "fully_convolutional": bool(getattr(model, "fully_convolutional", True)),
                "dataset": cfg.dataset, "input_channels": pre.channels,
                "num_classes": num_classes, "parameters": int(model.count_params()),
                "pretrained": str(pretrained) if pretrained else None,
                "fov_diameter": float(np.median([fov_diameter(f) for f in train_set.fovs]))}
    atomic_write_text(run_dir / "run.json", json.dumps(run_info, indent=2))
    atomic_write_text(run_dir / "flags.txt", flags_text(cfg))
    pre.save(run_dir / "preprocessor.json")

    validation = None
    if val_set is not None:
        validation = WholeImageValidation(val_set, pre, multiple, cfg.task, run_dir / "validation",
                                          cfg.validate_every, cfg.image_summary_every,
                                          cfg.eval_scales, cfg.stride)
    if cfg.freeze_encoder_epochs:
        if not hasattr(model, "encoder"):
            raise ValueError(f"--freeze_encoder_epochs: {cfg.model} has no encoder to freeze")
        extra_callbacks = [FreezeEncoder(cfg.freeze_encoder_epochs)] + list(extra_callbacks or [])
    history, minutes, best_path = fit_run(model, dataset, steps, pixels_per_step, cfg, run_dir,
                                          validation, extra_callbacks)
    if best_path.is_file():
        model.load_weights(best_path)
    atomic_save_model(model, run_dir / "model.keras")
    metrics: dict[str, Any] = {"training_minutes": round(minutes, 2),
                               "epochs_run": len(history.history.get("loss", [])),
                               "loss_history": history.history.get("loss", [])}
    if validation is not None:  # the callback's segmenter runs the best weights loaded above
        val_result, _ = evaluate_set(validation.segmenter(), val_set, cfg.task)
        metrics["validation"] = {k: v for k, v in val_result.items()}
    update_metrics_json(run_dir, metrics)
    print(f"saved {run_dir / 'model.keras'} after {minutes:.1f} min"
          + (f"; validation F1 {metrics['validation']['f1']:.4f} AUC-ROC "
             f"{metrics['validation']['auc_roc']:.4f}" if val_set is not None else ""), flush=True)
    return run_dir


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None  # strict JSON has no NaN
    if isinstance(value, np.integer):
        return int(value)
    return value


def to_json(data) -> str:
    """JSON text with NaN / inf written as null and numpy scalars as numbers."""
    return json.dumps(_json_safe(data), indent=2)


def update_metrics_json(run_dir: Path, update: dict[str, Any]) -> dict[str, Any]:
    """Merges ``update`` into ``run_dir/metrics.json`` (written atomically)."""
    path = Path(run_dir) / "metrics.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(update)
    atomic_write_text(path, to_json(data))
    return data
