"""Training: strategy selection, optimizer and schedule, callbacks and the run folder.

``train(cfg)`` trains as a :class:`retina_tf.config.TrainConfig` says (``bin/train.py`` builds one
from its flags). The run folder ``<logdir>/<run_name>/`` holds
TensorBoard events (``train/``, ``validation/``), ``checkpoints/``, ``backup/`` (resume state),
``model.keras``, ``preprocessor.json``, ``run.json``, ``flags.txt`` and ``metrics.json``; how it
survives a kill is :mod:`retina_tf.run_folder`'s part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import sys
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.common import global_state  # where Keras keeps its global seed

from retina_tf import optimizers
from retina_tf.config import MAEConfig, TrainConfig, takes, to_flag_lines
from retina_tf.data.camera import CameraChange, camera_variants
from retina_tf.data.catalog import SPLITS, Sample, normalize_dataset_name
from retina_tf.data.io import SampleData, pixel_digest, read_sample
from retina_tf.data.pipeline import (
    Augment,
    SegmentationSet,
    build_set,
    data_key,
    padded_size,
    patch_dataset,
    resolve_samples,
    whole_image_dataset,
    with_context,
)
from retina_tf.data.preprocess import Preprocessor
from retina_tf.error_maps import ERROR_MAPS_DIR, model_fingerprint, read_error_maps
from retina_tf.errors import (
    ConfigError,
    DatasetError,
    ModelFileError,
    OutputError,
    RetinaTFError,
    TrainingDiverged,
)
from retina_tf.evaluation import (
    choose_av_evaluation,
    choose_threshold,
    choose_tta,
    evaluate_set,
    store_choice,
    store_threshold,
    threshold_line,
    tta_choice_line,
)
from retina_tf.inference import (
    DEFAULT_THRESHOLD,
    SCALE_TOLERANCE,
    Segmenter,
    environment,
    fov_diameter,
    inference_factor,
    label_artery_share,
    label_vessel_share,
    load_keras_model,
    native_bfloat16,
    nonfinite_weights,
    read_run_json,
    training_bright_lines,
)
from retina_tf.losses import SegmentationLoss
from retina_tf.metrics import SegmentationF1
from retina_tf.models import build_model, check_arguments, model_class
from retina_tf.progress import progress
from retina_tf.run_folder import (
    BACKUP_DIR,
    BEST_WEIGHTS,
    FLAGS_NOT_IN_TRAINING,
    LAST_WEIGHTS,
    BestCheckpoint,
    LastCheckpoint,
    RunBackup,
    RunBusyError,
    TrainingState,
    atomic_write_text,
    best_checkpoint,
    best_checkpoint_score,
    budget_stopped,
    check_run_folder,
    clear_run_folder,
    find_run,
    finish_run,
    has_backup,
    hold_run,
    parse_flag_lines,
    read_weights_attrs,
    refuse_shipped_folder,
    release_run,
    remove_stray_temporaries,
    restore_training,
    run_dir_of,
    save_model_file,
    update_metrics_json,
    weights_file_is_whole,
    worker_run_folder,
)

__all__ = ["train", "run_training", "TrainingJob", "fit_run", "already_trained",
           "open_run_folder", "make_strategy", "make_optimizer", "WarmupDecay", "AverageWeights",
           "load_training_sets", "load_pretrained", "epoch_steps", "total_epochs"]

log = logging.getLogger(__name__)

# --- distribution ----------------------------------------------------------------------------

def configure_logical_cpus(n: int, strategy: str = "mirrored") -> None:
    """Splits the CPU into ``n`` logical devices (before TensorFlow initializes its runtime);
    only ``--strategy=mirrored`` spreads a batch over them, which other strategies are told.

    Raises:
        ConfigError: TensorFlow's runtime has started in this process with another split (the
            Python API after an earlier training: a fresh process is needed).
    """
    if strategy != "mirrored":
        log.warning(f"warning: --logical_cpus={n} splits the CPU for --strategy=mirrored; "
                    f"--strategy={strategy} trains on it as one device")
    cpus = tf.config.list_physical_devices("CPU")
    if len(tf.config.get_logical_device_configuration(cpus[0]) or [None]) == n:
        return  # already so (a second training in this process)
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as err:  # "Virtual devices cannot be modified after being initialized"
        raise ConfigError(f"--logical_cpus={n}: TensorFlow has started in this process already "
                          "(an earlier training or model); split the CPU in a fresh process, "
                          "before anything else uses TensorFlow") from err


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """``auto``: MirroredStrategy when several GPUs are visible, else the default strategy.

    ``mirrored`` mirrors over all GPUs, or over all logical CPUs when there is no GPU;
    ``one_device`` uses the first GPU or the CPU; ``multi_worker`` is
    MultiWorkerMirroredStrategy over the cluster of ``TF_CONFIG`` (docs/scaling.md).
    """
    if name == "multi_worker":
        # before anything starts TensorFlow's runtime (listing devices does): collective ops
        # can only be configured at program start-up
        text = os.environ.get("TF_CONFIG")
        check_tf_config(text)
        spec = json.loads(text)
        task = spec["task"]
        here = spec["cluster"][task["type"]][int(task["index"])]
        log.info(f"{task['type']} {task['index']} at {here}: waiting for every task of TF_CONFIG "
                 f"to join ({json.dumps(spec['cluster'])}); a task never started or a wrong "
                 "host waits here, and only kill -9 stops a waiting worker")
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except tf.errors.UnknownError as err:  # "Could not start gRPC server"
            raise RetinaTFError(
                f"TF_CONFIG: {task['type']} {task['index']} cannot listen at {here} "
                f"(TensorFlow: {str(err.message).strip().splitlines()[0]}): is that port in use, "
                "or another worker started with the same task index?") from err
    if (tasks := _cluster_size(os.environ.get("TF_CONFIG"))) > 1:
        log.warning(f"warning: TF_CONFIG names a cluster of {tasks} tasks, but --strategy={name} "
                    "trains on this machine alone: give --strategy=multi_worker to every "
                    "worker to train together")
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
    raise ConfigError(f"--strategy={name}: unknown strategy")


MultiWorker = tf.distribute.MultiWorkerMirroredStrategy
TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')


def check_tf_config(text: str | None) -> None:
    """Raises ConfigError unless ``text`` (the ``TF_CONFIG`` variable) names a cluster and a
    task of it, as MultiWorkerMirroredStrategy reads them."""
    if not text:
        raise ConfigError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                          f"(the cluster and this worker's task), e.g. {TF_CONFIG_EXAMPLE}")
    try:
        spec = json.loads(text)
        task_type, index = spec["task"]["type"], int(spec["task"]["index"])
        hosts = spec["cluster"][task_type]
        ok = isinstance(hosts, list) and 0 <= index < len(hosts)
        addresses = [a for tasks in spec["cluster"].values() for a in tasks]
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ConfigError(f"TF_CONFIG={text}: give the cluster and a task in it, e.g. "
                          f"{TF_CONFIG_EXAMPLE}")
    for address in addresses:
        port = str(address).rpartition(":")[2]
        if not (":" in str(address) and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"TF_CONFIG={text}: {address!r} is not host:port; give each task "
                              f"its host and a free port, e.g. {TF_CONFIG_EXAMPLE}")
    if len(addresses) == 1:  # (Keras's logs then hold one value per replica, and fail)
        raise ConfigError(f"TF_CONFIG={text}: a cluster of one task; on one machine train "
                          "without TF_CONFIG and --strategy=multi_worker (--strategy=mirrored "
                          "over its GPUs or --logical_cpus)")


def _cluster_size(text: str | None) -> int:
    """The number of tasks of the cluster ``TF_CONFIG`` names (0: none, or unreadable)."""
    try:
        return sum(len(tasks) for tasks in json.loads(text or "")["cluster"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run folder: always, except on a worker of a
    multi-worker cluster that is not its chief (task ``chief``, else worker 0)."""
    return bool(strategy.extended.should_checkpoint)


def from_chief(strategy: tf.distribute.Strategy, values: Sequence) -> list[tf.Tensor]:
    """``values`` (tensors or variables) as the chief has them, on every worker of a
    multi-worker cluster; unchanged under the other strategies. Every worker must call it at
    the same point. A broadcast as an all-reduce sum to which only replica 0 (the chief's
    first) contributes."""
    values = [tf.convert_to_tensor(v) for v in values]
    if not isinstance(strategy, MultiWorker) or not values:
        return values
    groups: dict[str, list[int]] = {}  # one flat vector per dtype: few traces, few collectives
    for i, v in enumerate(values):
        groups.setdefault(v.dtype.name, []).append(i)
    out = list(values)
    for name, group in groups.items():
        summed = _all_sum(strategy, name, first_only=True)(
            tf.concat([tf.reshape(values[i], [-1]) for i in group], 0))
        parts = tf.split(summed, [int(tf.size(values[i])) for i in group])
        for i, part in zip(group, parts):
            out[i] = tf.reshape(part, values[i].shape)
    return out


@functools.cache
def _all_sum(strategy: tf.distribute.Strategy, dtype: str, first_only: bool = False
             ) -> Callable:
    """A traced (collectives run eagerly are slow) all-reduce sum of a vector of ``dtype``
    over the replicas; with ``first_only`` only replica 0 contributes (a broadcast)."""
    @tf.function(input_signature=[tf.TensorSpec([None], dtype)])
    def summed(flat):
        def contribute():
            ctx = tf.distribute.get_replica_context()
            if first_only:
                first = tf.equal(ctx.replica_id_in_sync_group, 0)
                flat_here = tf.where(first, flat, tf.zeros_like(flat))
            else:  # (an input tensor itself has no replica device to reduce from)
                flat_here = tf.identity(flat)
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, flat_here)

        return strategy.experimental_local_results(strategy.run(contribute))[0]

    return summed


# Flags that may differ between the workers of a cluster: where each machine keeps its files
# (the chief writes the run; the others follow its decisions).
PER_MACHINE_FLAGS = frozenset({"data_dir", "label_file_path", "extra_data", "pretrained",
                               "error_maps", "rip_patches"})


def check_same_flags(strategy: tf.distribute.Strategy, cfg) -> None:
    """Under ``multi_worker``, raises ConfigError on every worker when the workers were given
    different training flags (a batch size, a model size): their collectives would otherwise
    fail mid-training with TensorFlow's shape errors. Every worker must call it at the same
    point."""
    if not isinstance(strategy, MultiWorker):
        return
    flags = {k: v for k, v in parse_flag_lines(to_flag_lines(cfg)).items()
             if k not in FLAGS_NOT_IN_TRAINING | PER_MACHINE_FLAGS}
    if not _same_on_every_worker(strategy, flags):
        leave_together(strategy)
        raise ConfigError("the workers of TF_CONFIG were given different training flags: give "
                          "every worker the same command (only paths such as --data_dir may "
                          "differ between machines)")


def check_same_data(strategy: tf.distribute.Strategy, run_info: dict) -> None:
    """Under ``multi_worker``, raises ConfigError on every worker when the workers read
    different photographs (their pixel digests, ``run_info``'s ``data.image_digests``): each
    would train on its own data, and only the chief's would be recorded. Every worker must
    call it at the same point."""
    if not isinstance(strategy, MultiWorker):
        return
    if not _same_on_every_worker(strategy, sorted((run_info.get("data") or {})
                                                  .get("image_digests") or {})):
        leave_together(strategy)
        raise ConfigError("the workers of TF_CONFIG read different photographs (their pixels "
                          "differ): give every worker a copy of the same data (--data_dir may "
                          "name another folder on each machine)")


def _same_on_every_worker(strategy: tf.distribute.Strategy, value) -> bool:
    """Whether ``value`` (JSON) is the same on every worker: a 20-bit hash of it compared by an
    all-reduce of the hash and its square."""
    h = float(zlib.crc32(json.dumps(value, sort_keys=True).encode()) % (1 << 20))
    total, squares = _all_sum(strategy, "float64")(tf.constant([h, h * h], tf.float64)).numpy()
    return strategy.num_replicas_in_sync * squares == total * total


def leave_together(strategy: tf.distribute.Strategy) -> None:
    """Under ``multi_worker``, one more all-reduce before every worker leaves on a decision
    the last collective gave them all: a worker that left as soon as it had its result closed
    the connection that a slower one still read it from, which then said a worker had stopped
    answering. A worker still reading this one's result when the others leave knows the
    decision already, so an error here is ignored."""
    if not isinstance(strategy, MultiWorker):
        return
    try:
        _all_sum(strategy, "float64")(tf.zeros([1], tf.float64))
    except tf.errors.OpError:
        pass


def sync_from_chief(strategy: tf.distribute.Strategy, model: keras.Model,
                    trainable: bool = True) -> None:
    """Gives every worker the chief's model variables (with ``trainable``, also the optimizer
    state and trainable weights, which only differ after a resume from the chief's folder).
    Under the other strategies nothing happens."""
    if not isinstance(strategy, MultiWorker):
        return
    variables = list(model.non_trainable_variables)
    if trainable:
        variables += model.trainable_variables + model.optimizer.variables
    # metric state is summed over the workers when read, not copied
    variables = [v for v in variables if v.synchronization != "on_read"]
    for variable, value in zip(variables, from_chief(strategy, [v.value for v in variables])):
        variable.assign(value)


class SyncStatistics(keras.callbacks.Callback):
    """Multi-worker: at the end of every epoch, before validation and checkpoints, every worker
    takes the chief's non-trainable variables (batch-norm statistics, which each worker
    updates from its own batches; the trainable ones are equal by the all-reduced gradients)."""

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__()
        self.strategy = strategy

    def on_epoch_end(self, epoch, logs=None):
        sync_from_chief(self.strategy, self.model, trainable=False)


def fit_across_workers(model: keras.Model, data: tf.data.Dataset) -> None:
    """Works around two places where Keras 3's ``fit`` fails under MultiWorkerMirroredStrategy
    (keras-team/keras#20585): it learns the data's shapes by reducing the first distributed
    batch across the workers (here: a local batch of ``data``), and it averages each step's
    scalar logs over the workers along an axis 0 they lack (here: the logs have one)."""
    batch = next(iter(data))
    build, step = model._maybe_symbolic_build, model.train_step
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: build(data_batch=batch)
    model.train_step = lambda data: {k: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0
                                     else v for k, v in step(data).items()}


def state_from_chief(strategy: tf.distribute.Strategy, model: keras.Model,
                     state: TrainingState | None, best: float | None
                     ) -> tuple[TrainingState | None, float | None]:
    """Multi-worker: the chief's restored training state (None: a fresh start), best
    checkpoint score, weights and optimizer state on every worker, whatever the worker's own
    folder held; unchanged under the other strategies."""
    if not isinstance(strategy, MultiWorker):
        return state, best
    mine = ([state.epoch, state.elapsed_seconds, float(state.stopped)] if state else [0, 0, 0])
    mine += [float(best is not None), best or 0.0]
    epoch, elapsed, stopped, has_best, value = from_chief(
        strategy, [tf.constant(mine, tf.float64)])[0].numpy().tolist()
    sync_from_chief(strategy, model)
    if not epoch:
        return None, None
    if state is None or state.epoch != int(epoch):  # a worker: the chief's epoch, no history
        state = TrainingState(int(epoch), elapsed_seconds=elapsed, stopped=bool(stopped))
    return state, (value if has_best else None)


# --- optimization ----------------------------------------------------------------------------

def epoch_steps(cfg, default_steps: int) -> int:
    """Batches per epoch: ``--steps_per_epoch``, else ``default_steps`` (from
    ``--patches_per_epoch``, or one pass over the images). With ``--max_iters=M`` (a total step
    count, WILeroy/retina_unet's) training runs ``E = ceil(M / that)`` epochs of
    ``ceil(M / E)`` steps: exactly M when E divides M, else at most E - 1 more; an epoch stays
    the unit of backups, validation and resume."""
    steps = cfg.steps_per_epoch or default_steps
    if cfg.max_iters:
        steps = math.ceil(cfg.max_iters / math.ceil(cfg.max_iters / steps))
    return steps


def total_epochs(cfg, steps: int) -> int:
    """The epochs to train: ``--epochs``, or with ``--max_iters`` the epochs of
    :func:`epoch_steps` (``steps`` batches each)."""
    return math.ceil(cfg.max_iters / steps) if cfg.max_iters else cfg.epochs


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


def make_optimizer(name: str, schedule, weight_decay: float = 1e-4,
                   ema_momentum: float = 0.0) -> keras.optimizers.Optimizer:
    """``ema_momentum`` > 0: the optimizer also keeps a moving average of the weights
    (:class:`AverageWeights` puts it in the model)."""
    ema = {"use_ema": True, "ema_momentum": ema_momentum} if ema_momentum else {}
    if name == "adam":
        return optimizers.Adam(schedule, **ema)
    if name == "adamw":
        return optimizers.AdamW(schedule, weight_decay=weight_decay, **ema)
    if name == "sgd":
        return optimizers.SGD(schedule, momentum=0.9, nesterov=True, **ema)
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
        logs["learning_rate"] = current_learning_rate(self.model)


def current_learning_rate(model: keras.Model) -> float:
    """The learning rate the optimizer's schedule gives at its current step."""
    opt = model.optimizer
    lr = opt.learning_rate
    return float(keras.ops.convert_to_numpy(lr(opt.iterations) if callable(lr) else lr))


class StopOnDivergence(keras.callbacks.Callback):
    """Raises :class:`~retina_tf.errors.TrainingDiverged` at the first step whose loss is NaN or
    infinite (as ``keras.callbacks.TerminateOnNaN(raise_error=True)``, naming the epoch, step
    and learning rate), and at the end of an epoch whose weights are: they need not show in
    the loss (a batch norm's moving statistics are not used in training; a clipped
    cross-entropy stays finite). Either way before the epoch's validation, checkpoints and
    backup see the weights."""

    def __init__(self, steps_per_epoch: int):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._stop(f"the training loss became {float(loss)} in epoch {self._epoch}, step "
                       f"{batch + 1} of {self.steps_per_epoch}")

    def on_epoch_end(self, epoch, logs=None):
        bad = nonfinite_weights(self.model)
        if bad:
            self._stop(f"{len(bad)} weight variables ({bad[0]} first) became NaN or "
                       f"infinite in epoch {self._epoch}")

    def _stop(self, what: str) -> None:
        raise TrainingDiverged(f"{what} (learning rate {current_learning_rate(self.model):.3g}):"
                               " the weights diverged; train with a lower --learning_rate")


class AverageWeights(keras.callbacks.SwapEMAWeights):
    """``--ema_momentum``: the optimizer's exponential moving average of the weights (Polyak
    averaging; Polyak and Juditsky, SIAM J. Control Optim. 1992) is in the model from each
    epoch's end to the next epoch's start, so that validation, checkpoints and backups see the
    average, and the raw weights go on training. A backup is written with the average in the
    model: a run resumed from one (``resumed``) swaps back before its first epoch."""

    def __init__(self, resumed: bool = False):
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = resumed


class TimeBudget(keras.callbacks.Callback):
    """Stops training at the end of the epoch in which ``minutes`` of wall time are used up,
    counting ``elapsed_seconds`` spent before a restart. When the last epoch's pace says that
    the budget will stop training before its last epoch (a flagfile's budget on a CPU slower
    than the one it was measured on), it says so once, from a process's second epoch on, so that
    the user can go on without the budget at once. ``clock``: seconds, monotonic;
    ``resumable``: the run keeps a backup (``--resume``), so a larger budget goes on from where
    this one stops."""

    def __init__(self, minutes: float, elapsed_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, resumable: bool = True):
        super().__init__()
        self.seconds = minutes * 60.0
        self.elapsed_seconds = elapsed_seconds
        self.clock = clock
        self.resumable = resumable

    def on_train_begin(self, logs=None):
        self._start = self.clock() - self.elapsed_seconds
        self._last_end = None  # the first epoch of a process also traces: not its pace
        self._foretold = False

    def on_epoch_end(self, epoch, logs=None):
        if self.seconds <= 0:
            return
        now, total, done = self.clock(), self.params.get("epochs"), epoch + 1
        elapsed = now - self._start
        if elapsed >= self.seconds:
            said = f"time budget of {self.seconds / 60:g} min reached after epoch {done}"
            if total and done < total:
                said += (f" of {total}, before the learning rate schedule ended (" + (
                    "the same command with --time_budget_minutes=0, or a larger one, goes on "
                    f"from epoch {done}" if self.resumable else "--overwrite with "
                    f"--time_budget_minutes=0, or a larger one, trains all {total} anew") + ")")
            log.info(said)
            self.model.stop_training = True
        elif self._last_end is not None and total and not self._foretold:
            pace = max(now - self._last_end, 1e-9)
            last = done + math.ceil((self.seconds - elapsed) / pace)
            if last < total:
                self._foretold = True
                per = f"{pace:.0f} s" if pace < 90 else f"{pace / 60:.1f} min"
                how = ("run the same command with --time_budget_minutes=0 when it stops, or "
                       "stop it now (Ctrl-C) and do so: it goes on after its last completed "
                       "epoch" if self.resumable else "stop it (Ctrl-C) and run it again with "
                       "--overwrite --time_budget_minutes=0")
                log.info(f"at {per} per epoch the time budget of "
                         f"{self.seconds / 60:g} min ends training after about epoch {last} "
                         f"of {total}, before the learning rate schedule ends; to train all "
                         f"{total} (about {(elapsed + (total - done) * pace) / 60:.0f} min in "
                         f"all), {how}")
        self._last_end = now


class FollowChief(keras.callbacks.Callback):
    """Multi-worker: every worker takes the chief's epoch logs (its validation scores) and its
    decision to stop (its clock's time budget), so that all save the same checkpoints and stop
    at the same epoch; a worker that went on alone would wait for the others forever."""

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__()
        self.strategy = strategy

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float, np.number)))
        mine = [float(logs[k]) for k in keys] + [float(self.model.stop_training)]
        *values, stop = from_chief(self.strategy, [tf.constant(mine, tf.float64)])[0].numpy()
        logs.update(zip(keys, (float(v) for v in values)))
        self.model.stop_training = bool(stop)


def _to_uint8_image(x: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(x, np.float32), 0, 1)
    if x.shape[-1] not in (1, 3):
        x = x[..., :3] if x.shape[-1] > 3 else x[..., :1]
    return (x * 255).round().astype(np.uint8)


def held_out_scale_note(val_set: SegmentationSet | None, trained_fov: float) -> str | None:
    """A note of the held-out photographs that ``evaluate`` and ``predict`` would resize
    (``--inference_scale=auto``: a FOV over :data:`SCALE_TOLERANCE` from the training FOV,
    photographs of another camera): validation, the best epoch and the threshold see them at
    their own size."""
    if val_set is None:
        return None
    apart = [name for name, fov in zip(val_set.names, val_set.fovs)
             if inference_factor("auto", fov_diameter(fov), trained_fov) != 1.0]
    if not apart:
        return None
    return (f"note: {len(apart)} of the {len(val_set.names)} held-out images ("
            f"{', '.join(apart[:3])}{' ...' if len(apart) > 3 else ''}) have a FOV over "
            f"{SCALE_TOLERANCE:.0%} from the training FOV ({trained_fov:.0f} px): validation, "
            "the best epoch and the threshold see them at their own size, where evaluate and "
            "predict resize them")


class WholeImageValidation(keras.callbacks.Callback):
    """Segments the held-out training images whole and adds ``val_f1``, ``val_auc_roc``, ... to
    the epoch logs, so ModelCheckpoint can keep the best model (by validation F1, or A/V accuracy
    for A/V models) and TensorBoard plots them; writes input / label / prediction image summaries
    every ``image_every`` epochs. With ``every`` > 1 it validates every ``every``-th epoch and
    the last (the one training stops after, by ``epochs`` or the time budget); images are
    written in validated epochs only, every ``image_every``-th and the last.
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
            full = self.model.fully_convolutional
            self._segmenter = Segmenter(self.model, self.preprocessor, self.size_multiple,
                                        "auto", window=self.size_multiple, stride=self.stride,
                                        fully_convolutional=full, scales=self.scales)
        return self._segmenter

    def on_epoch_end(self, epoch, logs=None):
        # never left unvalidated: the last epoch, or one the time budget ends
        last = epoch + 1 == (self.params or {}).get("epochs") or self.model.stop_training
        if logs is None or ((epoch + 1) % self.every and not last):
            return
        result, probs = evaluate_set(self.segmenter(), self.seg, self.task)
        for key in ("f1", "auc_roc", "auc_pr", "acc", "se", "sp", "av_acc", "av_acc_ripav"):
            if key in result:
                logs[f"val_{key}"] = float(result[key])
        if self.image_every and ((epoch + 1) % self.image_every == 0 or last):
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(str(self.log_dir / "images"))
            with self._writer.as_default():
                tf.summary.image("input", _to_uint8_image(self.seg.images[0])[None], step=epoch)
                tf.summary.image("label", _to_uint8_image(self.seg.targets[0])[None], step=epoch)
                tf.summary.image("prediction", _to_uint8_image(probs[0])[None], step=epoch)
            self._writer.flush()


# --- run folder ------------------------------------------------------------------------------

def augmentation(cfg: TrainConfig | MAEConfig) -> Augment:
    """The training config's augmentations."""
    return Augment(flip=cfg.flip, rot90=cfg.rot90, rotate_degrees=cfg.rotate_degrees,
                   brightness=cfg.brightness, contrast=cfg.contrast, gamma=cfg.gamma_jitter)


def model_kwargs(cfg: TrainConfig, input_channels: int, num_classes: int) -> dict[str, Any]:
    """Constructor arguments of ``cfg.model``: ``cfg.model_config`` plus the input channels and
    (for segmentation models) the number of classes the data have."""
    kwargs = dict(cfg.model_config)
    derived = {"input_channels": input_channels}
    if "num_classes" in model_class(cfg.model).constructor_arguments():  # not MAE
        derived["num_classes"] = num_classes
    for name, value in derived.items():
        if kwargs.get(name, value) != value:
            raise ConfigError(f"--model_config: {name}={kwargs[name]!r}, but the data give "
                              f"{value} (--preprocess and --task decide it); leave it out")
    return {**kwargs, **derived}


def parse_extra_data(entry: str, flag: str = "--extra_data") -> tuple[str, str, str]:
    """``DATASET:FOLDER[:SPLIT]`` (of ``--extra_data``, or the ``flag`` named in errors) as
    (dataset, folder, split)."""
    dataset, _, rest = entry.partition(":")
    folder, split = rest, "training"
    head, _, last = rest.rpartition(":")
    if head and last in SPLITS:
        folder, split = head, last
    elif head and last.isalpha():  # a word, not a folder: a split misspelt
        raise ConfigError(f"{flag}={entry}: {last!r} is not a split; give one of "
                          f"{', '.join(SPLITS)}")
    if not dataset or not folder:
        raise ConfigError(f"{flag}={entry}: give DATASET:FOLDER[:SPLIT], e.g. "
                          "stare:data/STARE:all")
    return normalize_dataset_name(dataset), folder, split


def training_sources(cfg) -> list[list[Sample]]:
    """The samples of ``--dataset`` (or the label file) and of each ``--extra_data`` set;
    with ``--extra_data`` and no ``--dataset`` / ``--data_dir`` / label file, the extra sets
    alone."""
    extra = getattr(cfg, "extra_data", ())
    alone = extra and not cfg.names_data
    sources = [] if alone else [resolve_samples(cfg.dataset, cfg.data_dir, "training",
                                                cfg.label_file_path)]
    names = [] if alone else [f"--label_file_path={cfg.label_file_path}" if cfg.label_file_path
                              else f"--data_dir={cfg.data_dir}"]
    for entry in extra:
        dataset, folder, split = parse_extra_data(entry)
        sources.append(resolve_samples(dataset, folder, split))
        names.append(f"--extra_data={entry}")
    seen: dict[Path, str] = {}
    for name, samples in zip(names, sources):
        for s in samples:  # one image in two sets: trained on twice, held out and trained on
            first = seen.setdefault(Path(s.image).resolve(), name)
            if first != name:
                raise ConfigError(f"{name}: {s.image} is also in {first}; give each set once")
    return sources


def camera_set(datas: Sequence[SampleData], pre: Preprocessor, task: str, count: int,
               seed: int, groups: Sequence[int], channel_gamma: float = 0.0
               ) -> SegmentationSet | None:
    """``count`` camera-changed copies of each image (:mod:`retina_tf.data.camera`;
    ``channel_gamma``: :attr:`CameraChange.channel_gamma`), preprocessed like the originals,
    named ``<name>@cameraK``."""
    if count <= 0:
        return None
    change = CameraChange(channel_gamma=channel_gamma)
    copies, copy_groups = [], []
    for i, (d, g) in enumerate(zip(progress(datas, "camera variants", name=lambda d: d.name),
                                   groups)):
        for k, image in enumerate(camera_variants(d.image, count, seed * 1_000_003 + i,
                                                  change)):
            copies.append(dataclasses.replace(d, name=f"{d.name}@camera{k + 1}", image=image))
            copy_groups.append(g)
    out = build_set(copies, pre, task)
    out.groups = copy_groups
    return out


def load_training_sets(cfg) -> tuple[SegmentationSet, SegmentationSet | None, Preprocessor]:
    """Reads the training split (and each ``--extra_data`` set), holds out the last
    ``val_images`` of each, fits the preprocessor on the rest and preprocesses both; with
    ``--camera_variants``, adds that many camera-changed copies of each training image."""
    train, val = [], []  # (sample, data, source number)
    for number, samples in enumerate(training_sources(cfg)):
        datas = [read_sample(s) for s in samples]
        n_val = min(cfg.val_images, len(datas) - 1) if cfg.val_images > 0 else 0
        if n_val < cfg.val_images:  # no checkpoint or threshold choice, unless said why
            which = f"the set of {samples[0].dataset}" if len(samples) else "a set"
            log.warning(f"warning: --val_images={cfg.val_images}, but {which} has "
                        f"{len(datas)} training image(s): {n_val} held out, since one must be "
                        "trained on")
        rows = [(s, d, number) for s, d in zip(samples, datas)]
        train += rows[:len(rows) - n_val]
        val += rows[len(rows) - n_val:]
    digests = {id(d): pixel_digest(d.image) for _, d, _ in train + val}
    first: dict[str, Path] = {}
    for s, d, _ in train + val:  # the path check of training_sources, by pixels
        other = first.setdefault(digests[id(d)], Path(s.image))
        if other != Path(s.image):
            raise ConfigError(f"{s.image} has the pixels of {other}: that photograph would be "
                              "trained on twice, or held out and trained on; list it once")
    if cfg.val_images > 0 and not val:
        log.warning("warning: no image held out: the epoch with the lowest training loss is "
                    "kept and the threshold stays 0.5, none chosen on held-out images")
    pre = Preprocessor.from_steps(cfg.preprocess, channel=cfg.channel)
    if pre.standardize:
        pre.fit(d.image for _, d, _ in train)

    def built(rows):
        out = build_set([d for _, d, _ in rows], pre, cfg.task, [s for s, _, _ in rows],
                        cfg.cache_dir, [digests[id(d)] for _, d, _ in rows])
        out.groups = [g for _, _, g in rows]
        return out

    train_set = built(train)
    variants = camera_set([d for _, d, _ in train], pre, cfg.task,
                          getattr(cfg, "camera_variants", 0), cfg.seed, train_set.groups,
                          getattr(cfg, "camera_channel_gamma", 0.0))
    if variants is not None:
        train_set = train_set + variants
    return train_set, (built(val) if val else None), pre


def load_pretrained(model: keras.Model, run_dir: Path) -> None:
    """Initializes ``model`` from the model saved in ``run_dir``: by the model's own
    ``load_pretrained(source)`` when it has one (e.g. EAR-Net from its HMSA stage 1), else all
    weights when both models have the same architecture."""
    model.load_pretrained(load_keras_model(Path(run_dir) / "model.keras"))


def attach_error_maps(train_set: SegmentationSet, folder: str | None, pretrained: Path | None,
                      model_name: str, data: dict | None = None) -> SegmentationSet:
    """The training set with each image's stage-1 error map appended to its target; ``data``
    (:func:`retina_tf.data.pipeline.data_key`): what the maps must have been made from."""
    if folder is None:
        if pretrained is None:
            raise ConfigError(f"{model_name} trains on stage-1 error maps: give "
                              "--pretrained=<stage-1 run> (after bin/make_error_maps.py) or "
                              "--error_maps=<folder>")
        folder = pretrained / ERROR_MAPS_DIR
    elif pretrained is None:
        log.warning(f"warning: --error_maps without --pretrained: {model_name} starts from "
                    "random weights, not from the stage-1 model that made the maps")
    maps = read_error_maps(folder, train_set.names, [im.shape[:2] for im in train_set.images],
                           data, stage1=pretrained)
    share = np.mean([m[f].mean() for m, f in zip(maps, train_set.fovs)])
    log.info(f"error maps from {folder}: {share:.2%} of the FOV pixels wrong in stage 1")
    return train_set.with_extras(maps)


def _warn_other_preprocessing(run_dir: Path, pre: Preprocessor) -> None:
    """A warning when the run whose weights start this one saw differently preprocessed
    images (other steps or channel): its first layers were tuned to other inputs."""
    try:
        theirs = Preprocessor.load(Path(run_dir) / "preprocessor.json")
    except (OSError, ValueError, TypeError):
        return
    said, ours = (", ".join(p.steps) + (f" ({p.channel})" if p.grayscale else "")
                  for p in (theirs, pre))
    if said != ours:
        log.warning(f"warning: --pretrained={run_dir} was trained on images preprocessed by "
                    f"{said}; this run's are preprocessed by {ours}: its weights start on "
                    "other inputs")


class FreezeEncoder(keras.callbacks.Callback):
    """Keeps ``model.freezable_encoder()`` frozen for the first ``epochs`` epochs of fine-tuning
    (so a new decoder settles before it can disturb pre-trained weights), then trains
    everything."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = int(epochs)

    def _set(self, trainable: bool):
        encoder = self.model.freezable_encoder()
        if encoder.trainable != trainable:
            encoder.trainable = trainable
            # the traced train step captured the old trainable set: trace it again
            self.model.make_train_function(force=True)

    def on_train_begin(self, logs=None):
        self._set(False)

    def on_epoch_begin(self, epoch, logs=None):
        self._set(epoch >= self.epochs)


def fit_run(model: keras.Model, dataset, steps: int, pixels_per_step: int, cfg, run_dir: Path,
            validation: keras.callbacks.Callback | None = None,
            extra_callbacks: list[keras.callbacks.Callback] | None = None
            ) -> tuple[TrainingState, float, Path]:
    """``model.fit`` with the run folder's callbacks: learning rate and speed, validation (the
    best checkpoint by its ``val_f1``, ``val_av_acc`` for A/V models, else by loss), time budget,
    checkpoints, TensorBoard and, with ``cfg.resume``, a backup after every epoch.

    With ``cfg.resume`` an interrupted run first restores its newest complete backup: weights,
    optimizer state (so the learning-rate schedule goes on), the epoch, the per-epoch history,
    the wall time used and the best checkpoint's score. ``dataset`` is a ``tf.data.Dataset``, or
    a function ``start_epoch -> Dataset`` that continues the data stream where the restored
    epoch ended. The backup stays until :func:`retina_tf.run_folder.finish_run`.

    A step whose loss, or an epoch whose weights, are not finite ends ``fit`` there
    (:class:`StopOnDivergence`): the state's ``.diverged`` holds the error, and the checkpoints
    are those of the epochs before.

    Returns the state (``.history``: every epoch's logs, restored ones included; ``.epoch``),
    the minutes of training over all restarts and the best checkpoint's path.
    """
    run_dir = Path(run_dir)
    best_path, last_path = run_dir / BEST_WEIGHTS, run_dir / LAST_WEIGHTS
    best_path.parent.mkdir(parents=True, exist_ok=True)
    monitor, mode = "loss", "min"
    if validation is not None:
        # an A/V model is chosen by what it is for: artery/vein accuracy
        monitor = "val_av_acc" if validation.task == "av" else "val_f1"
        mode = "max"
    restored = restore_training(model, run_dir) if cfg.resume else None
    best = best_checkpoint_score(run_dir, monitor) if restored is not None else None
    scores = [s for s in ((restored.history or {}).get(monitor) or [])
              if s is not None] if restored is not None else []
    if best is None and scores:  # validated epochs, but their best checkpoint is unreadable
        chosen = max(scores) if mode == "max" else min(scores)
        log.warning(f"warning: the best checkpoint {best_path} cannot be read (damaged or "
                    f"removed since): the best of epochs 1-{restored.epoch} ({monitor} "
                    f"{chosen:.4f}) is lost; model.keras gets the best epoch from "
                    f"{restored.epoch + 1} on")
    strategy = model.distribute_strategy
    state, best = state_from_chief(strategy, model, restored, best)
    if state is None:  # a fresh start: checkpoints of an attempt killed in its first epoch go
        best_path.unlink(missing_ok=True)
        last_path.unlink(missing_ok=True)
        state = TrainingState()
    else:
        where = run_dir if restored is not None else "the chief's run folder"
        log.info(f"resuming {where} after epoch {state.epoch} "
                 f"({state.elapsed_seconds / 60:.1f} min of training so far)")
        budget = cfg.time_budget_minutes * 60.0
        if state.stopped and not 0 < budget <= state.elapsed_seconds:  # only a budget stops
            state.stopped = False
            log.info(f"its time budget stopped it after epoch {state.epoch} of {cfg.epochs}: "
                     + (f"--time_budget_minutes={cfg.time_budget_minutes:g} trains up to "
                        f"{(budget - state.elapsed_seconds) / 60:.1f} min more" if budget
                        else "it trains the rest"))
    callbacks: list[keras.callbacks.Callback] = [LearningRateAndSpeed(steps, pixels_per_step)]
    if isinstance(strategy, MultiWorker):
        callbacks.insert(0, SyncStatistics(strategy))
    # the average lives in the inner optimizer when Keras wraps it (mixed_float16 on a GPU)
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if getattr(optimizer, "use_ema", False):  # first: every later callback sees it
        callbacks.insert(0, AverageWeights(resumed=state.epoch > 0))
    # Order matters: the time budget's stop comes first (workers take the chief's), so that
    # the validation scores the epoch it ends as the last one; the backup records the stop,
    # and is written after the checkpoints of the same epoch.
    follow = [FollowChief(strategy)] if isinstance(strategy, MultiWorker) else []
    callbacks += [TimeBudget(cfg.time_budget_minutes, state.elapsed_seconds,
                             resumable=bool(cfg.resume)), *follow]
    if validation is not None:
        callbacks += [validation, *([FollowChief(strategy)] if follow else [])]
    callbacks += [
        BestCheckpoint(best_path, monitor, mode, best),
        LastCheckpoint(last_path),
        keras.callbacks.TensorBoard(log_dir=str(run_dir), write_graph=False,
                                    write_steps_per_second=False),
        RunBackup(run_dir, state, write=bool(cfg.resume)),
    ]
    callbacks += list(extra_callbacks or [])
    callbacks.insert(0, StopOnDivergence(steps))  # first: no callback sees a diverged step
    if state.epoch < cfg.epochs and not state.stopped:
        data = dataset(state.epoch) if callable(dataset) else dataset
        if isinstance(strategy, MultiWorker):
            fit_across_workers(model, data)
        try:
            model.fit(data, epochs=cfg.epochs, initial_epoch=state.epoch, steps_per_epoch=steps,
                      callbacks=callbacks,
                      shuffle=False,  # the tf.data pipeline already samples at random
                      verbose=1 if sys.stdout.isatty() else 2)
        except TrainingDiverged as err:  # every worker raises at the same step (one loss)
            for callback in callbacks:  # TensorBoard closes its event files, as after fit
                if isinstance(callback, keras.callbacks.TensorBoard):
                    callback.on_train_end()
            state.diverged = err
    return state, state.elapsed_seconds / 60.0, best_path


def _check_patch_options(cfg, model: keras.Model) -> None:
    """Patch options that :func:`training_dataset` cannot give this model, refused before the
    run folder is written."""
    if cfg.mode != "patch" or not model.context_fusion:
        return
    if cfg.scale_range:
        raise ConfigError("--scale_range: not with a context-fusion model, whose patches and "
                          "context are cut at the image's own scale; leave it out")
    if cfg.mixed_patch_sizes and model.context_factor > 0:
        raise ConfigError("--mixed_patch_sizes: not with a context crop (context_factor > 0); "
                          "use \"context_factor\": 0, the whole image as context")


def training_dataset(cfg, model: keras.Model, train_set: SegmentationSet, augment: Augment,
                     steps: int, start_epoch: int = 0) -> tf.data.Dataset:
    """The training stream (patches, patch + context windows, or whole images), started after
    ``start_epoch`` epochs of ``steps`` batches have been drawn."""
    start = start_epoch * steps * cfg.batch_size
    multiple = model.size_multiple
    shares = {"groups": train_set.groups if getattr(cfg, "balance_datasets", True) else None,
              "group_weights": getattr(cfg, "dataset_weights", ())}
    if cfg.mode == "whole":
        return whole_image_dataset(train_set, cfg.batch_size, multiple, augment, cfg.seed,
                                   start=start, **shares)
    sizes = cfg.mixed_patch_sizes
    if model.context_fusion and model.context_factor == 0:  # the whole image as context
        return patch_dataset(train_set, cfg.patch_size, cfg.batch_size, cfg.vessel_probability,
                             augment, cfg.seed, start=start, context_size=model.context_size,
                             crop_sizes=sizes, **shares)
    if model.context_fusion:  # wide crops, split into patch + context
        return with_context(
            patch_dataset(train_set, cfg.patch_size * model.context_factor, cfg.batch_size,
                          cfg.vessel_probability, augment, cfg.seed, start=start, **shares),
            cfg.patch_size, model.context_size)
    return patch_dataset(train_set, cfg.patch_size, cfg.batch_size, cfg.vessel_probability,
                         augment, cfg.seed, start=start, crop_sizes=sizes,
                         scale_range=getattr(cfg, "scale_range", ()), **shares)


def _check_patch_size(cfg, model: keras.Model) -> None:
    multiple = model.size_multiple
    if not model.fully_convolutional and cfg.patch_size != multiple:  # before the multiple
        raise ConfigError(f"--patch_size={cfg.patch_size}: {cfg.model} takes inputs of "
                          f"exactly {multiple} px (its image_size)")
    if cfg.patch_size % multiple:
        raise ConfigError(f"--patch_size={cfg.patch_size} must be a multiple of {multiple} "
                          f"for {cfg.model}")


def already_trained(cfg, run_dir: Path) -> bool:
    """True (and says so) when ``run_dir`` holds a finished run with these training flags;
    raises ConfigError for a run there with other flags (see
    :func:`retina_tf.run_folder.check_run_folder`). Reads only: nothing is written."""
    if check_run_folder(run_dir, to_flag_lines(cfg), cfg.overwrite, cfg.resume,
                        defaults_text=to_flag_lines(type(cfg)())) != "finished":
        return False
    _check_finished_files(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        run, diverged = metrics.get("epochs_run"), metrics.get("stopped")
    except (OSError, ValueError, AttributeError):
        run = diverged = None
    said = f"{run_dir} is already trained with these flags ({run_dir / 'model.keras'})"
    used = budget_stopped(run_dir)  # minutes, where a larger budget can go on
    if diverged:
        log.warning(f"warning: {said}, but only {run} of its {cfg.epochs} epochs: {diverged}. "
                    "--overwrite with a lower --learning_rate trains it again.")
    elif isinstance(run, int) and run < cfg.epochs and used is not None:
        log.info(f"{said}; its time budget stopped it after {run} of {cfg.epochs} epochs and "
                 f"{used:g} min: a --time_budget_minutes over {used:g} (0: none) goes on from "
                 f"epoch {run}.")
    elif isinstance(run, int) and run < cfg.epochs:  # stopped by a budget, no state kept
        log.info(f"{said}; its time budget stopped it after {run} of {cfg.epochs} epochs, and it "
                 "keeps no state to go on from: --overwrite with a larger "
                 f"--time_budget_minutes (0: none) trains all {cfg.epochs}.")
    else:
        log.info(f"{said}; nothing to do. --overwrite trains it again from scratch, another "
                 "--run_name trains a new run beside it.")
    _warn_changed_source(run_dir)
    return True


def _check_finished_files(run_dir: Path) -> None:
    """Raises ModelFileError when a finished run's files are damaged since (a truncated
    ``model.keras``, an emptied ``run.json``): "nothing to do" would leave it unusable."""
    model = run_dir / "model.keras"
    try:
        with zipfile.ZipFile(model) as archive:
            whole = archive.testzip() is None  # every member's checksum
        read_run_json(run_dir)
        Preprocessor.load(run_dir / "preprocessor.json")
        problem = "" if whole else f"{model} is corrupt (a member fails its checksum)"
    except zipfile.BadZipFile:
        problem = f"{model} is corrupt (not a complete .keras archive)"
    except (OSError, ValueError, TypeError, ModelFileError) as err:
        problem = str(err)
    if problem:
        raise ModelFileError(f"{run_dir} holds a finished run with these flags, but {problem}; "
                             "--overwrite trains it again from scratch")


def _warn_changed_source(run_dir: Path) -> None:
    """A warning when the run a finished run started from (``--pretrained``) has been trained
    again or removed since: the run keeps the weights it started from then."""
    info = _stored_run_info(run_dir)
    source, then = info.get("pretrained"), info.get("pretrained_sha256")
    if not (source and then):
        return
    now = model_fingerprint(source)
    if now != then:
        what = "has been trained again since" if now else "is gone"
        log.warning(f"warning: {run_dir.name} started from --pretrained={source}, which {what}: "
                    "it keeps what it learned from the earlier model; --overwrite trains it "
                    "from the present one")


def open_run_folder(cfg, run_dir: Path) -> None:
    """Creates the run folder, empties it of an old run with ``--overwrite`` and removes the
    temporary files a killed run left; call once the data are read and the model is built, so
    an early failure leaves no folder behind."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a --logdir that is a file, on a read-only disk: named, as a write
        raise OutputError(err.errno, err.strerror, str(run_dir)) from err
    hold_run(run_dir)  # a second training, or an evaluate, of this run is refused till the end
    if cfg.overwrite:
        clear_run_folder(run_dir)
    for path in remove_stray_temporaries(run_dir):
        log.info(f"removed {path}, left by a killed run")


def _image_size(train_set: SegmentationSet) -> dict[str, list[int]]:
    """``{"image_size": [H, W]}``: the largest height and width of the training photographs
    (camera copies aside), the size a fixed-size export (TFLite) takes by default for
    photographs like them, also for data outside the catalog's known sizes."""
    sizes = [image.shape[:2] for name, image in zip(train_set.names, train_set.images)
             if "@camera" not in name]
    return {"image_size": [max(h for h, _ in sizes), max(w for _, w in sizes)]}


def data_source(cfg, train_set: SegmentationSet, val_set: SegmentationSet | None
                ) -> dict[str, Any]:
    """What training actually read, for run.json."""
    return {"dataset": cfg.dataset or None, "data_dir": cfg.data_dir or None,
            "label_file_path": cfg.label_file_path or None,
            "extra_data": list(getattr(cfg, "extra_data", ())),
            **({"dataset_weights": list(cfg.dataset_weights)}
               if getattr(cfg, "dataset_weights", ()) else {}),
            "camera_variants": getattr(cfg, "camera_variants", 0),
            **({"camera_channel_gamma": cfg.camera_channel_gamma}
               if getattr(cfg, "camera_channel_gamma", 0.0) else {}),
            "training_images": [n for n in train_set.names if "@camera" not in n],
            "validation_images": list(val_set.names) if val_set is not None else [],
            "image_digests": {digest: name for part in (train_set, val_set) if part is not None
                              for name, digest in zip(part.names, part.digests or ()) if digest}}


@dataclasses.dataclass
class TrainingJob:
    """What one kind of training (segmentation, MAE or RIP pre-training) hands the shared
    skeleton :func:`run_training`: a model built under the strategy, its data and the rest.

    Attributes:
        model: the model (uncompiled).
        dataset: a ``tf.data.Dataset``, or ``start_epoch -> Dataset`` that continues the data
            stream after a resume.
        steps: batches per epoch.
        pixels_per_step: input pixels per batch (for the speed the logs show).
        preprocessor: saved as ``preprocessor.json``.
        run_info: entries of ``run.json`` beside the model's name, config and size.
        compile_args: ``model.compile`` arguments besides the optimizer (loss, metrics).
        jit_ok: whether ``--jit_compile`` may compile the train step (a loss may rule it out).
        validation: the whole-image validation callback (chooses the best checkpoint).
        callbacks: further callbacks, after the run folder's own.
        finish: called with the trained model (best weights loaded, saved): entries for
            ``metrics.json`` and words for the closing line.
    """

    model: keras.Model
    dataset: Any
    steps: int
    pixels_per_step: int
    preprocessor: Preprocessor
    run_info: dict[str, Any]
    compile_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    jit_ok: bool = True
    validation: WholeImageValidation | None = None
    callbacks: list[keras.callbacks.Callback] = dataclasses.field(default_factory=list)
    finish: Callable[[keras.Model], tuple[dict[str, Any], str]] | None = None


def run_training(cfg, prepare: Callable[[tf.distribute.Strategy, Path], TrainingJob]) -> Path:
    """The one training skeleton: seed, strategy, run-folder check, ``prepare`` (data and
    model, given the strategy and the folder to write), optimizer and schedule, compile, run
    folder files, :func:`fit_run`, best weights, ``model.keras``, ``metrics.json``, done.
    ``cfg`` is any training config (segmentation, MAE, RIP); returns the run folder.

    A run folder that holds an interrupted run with the same training settings is resumed; one
    that holds a finished run with the same settings is left as it is; other settings there are
    an error unless ``cfg.overwrite``.

    Under ``--strategy=multi_worker`` only the chief writes the run folder and decides (finished
    or not, the resumed state, when the time budget stops); the other workers get its decisions
    and weights through collectives and write to a temporary folder removed at the end, as
    TensorFlow's multi-worker guide prescribes (every worker runs the same saving code).

    The run is seeded with ``cfg.seed``; the caller's random state (Python's, NumPy's, the
    TensorFlow and Keras global seeds) is put back afterwards, as it was. One training at a time
    in a process: the seeds and the precision policy are the process's.

    Raises:
        RunBusyError: another thread of this process is training.
    """
    if not _ONE_TRAINING.acquire(blocking=False):
        raise RunBusyError("another thread of this process is training: Keras's random seeds "
                           "and precision policy are the whole process's, so a second training "
                           "beside it would change both; train one after the other, or each "
                           "in a process of its own")
    try:
        with _random_state_kept():
            return _run_training(cfg, prepare)
    finally:
        _ONE_TRAINING.release()


_ONE_TRAINING = threading.RLock()  # re-entered by a training that trains another first


@contextlib.contextmanager
def _random_state_kept():
    """The block's seeding (keras.utils.set_random_seed) undone after it: a library call
    leaves its caller's random numbers as it found them."""
    keras_keys = ("global_random_seed", "global_seed_generator")
    python, numpy = random.getstate(), np.random.get_state()
    tf_global = tf.compat.v1.get_seed(None)[0]  # TensorFlow's global seed, None where unset
    saved = {key: global_state.get_global_attribute(key) for key in keras_keys}
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        tf.random.set_seed(tf_global)
        for key, value in saved.items():
            global_state.set_global_attribute(key, value)


def _run_training(cfg, prepare) -> Path:
    keras.utils.set_random_seed(cfg.seed)
    run_dir = run_dir_of(cfg)
    refuse_shipped_folder(run_dir, "--logdir, --run_name")
    if run_dir.is_file():  # "cannot write ...: File exists" before
        raise ConfigError(f"{run_dir} is a file, not a run folder: move it, or give another "
                          "--run_name")
    strategy = make_strategy(cfg.strategy)
    if (cfg.jit_compile and strategy.num_replicas_in_sync > 1  # (the default has no devices)
            and any(":CPU:" in d.upper() for d in strategy.extended.worker_devices)):
        raise ConfigError(f"--jit_compile: XLA cannot compile a train step shared by several CPU "
                          f"replicas ({strategy.num_replicas_in_sync} with --strategy="
                          f"{cfg.strategy}); drop --jit_compile, or train on GPUs")
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:  # a batch is split over the replicas in equal shares
        raise ConfigError(f"--batch_size={cfg.batch_size}: {replicas} replicas (--strategy="
                          f"{cfg.strategy}) take equal shares of a batch; give a multiple of "
                          f"{replicas}")
    try:
        check_same_flags(strategy, cfg)
        chief = is_chief(strategy)
        finished = already_trained(cfg, run_dir) if chief else False
        if bool(from_chief(strategy, [float(finished)])[0]):
            leave_together(strategy)
            return run_dir
        with compute_precision(cfg.mixed_precision):
            if chief:
                try:
                    return _train_in(cfg, prepare, strategy, run_dir)
                except BaseException as err:
                    if not isinstance(err, (Exception, SystemExit)) and has_backup(run_dir):
                        log.info(f"the epochs completed are kept in {run_dir / BACKUP_DIR}: "
                                 "the same command goes on after the last of them")
                    raise  # Ctrl-C or SIGTERM above
                finally:
                    release_run(run_dir)
            with worker_run_folder(run_dir, strategy.cluster_resolver.task_id) as folder:
                try:
                    _train_in(cfg, prepare, strategy, folder)
                finally:
                    release_run(folder)
        return run_dir
    except (tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.DeadlineExceededError) as err:
        if not isinstance(strategy, MultiWorker):
            raise
        # TensorFlow cannot go on with a worker fewer: every worker has to start again
        raise RetinaTFError(
            f"another worker of the TF_CONFIG cluster stopped answering (TensorFlow: "
            f"{type(err).__name__}): start every worker again with the same command; training "
            f"resumes from the last epoch's backup in the chief's {run_dir}") from err


@contextlib.contextmanager
def compute_precision(mixed: bool):
    """Keras's global dtype policy while the model is built and trained: with ``mixed``,
    mixed_float16 on a GPU (float16 compute, float32 weights, loss scaling), mixed_bfloat16
    on the CPU; float32 otherwise. The policy before is restored after (Micikevicius et al.,
    "Mixed precision training", ICLR 2018; keras.mixed_precision)."""
    before = keras.mixed_precision.global_policy()
    if mixed:
        gpu = bool(tf.config.list_logical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
        if not gpu and not native_bfloat16():
            log.info("--mixed_precision: this CPU has no AVX512-BF16 or AMX, so TensorFlow "
                     "emulates bfloat16: expect training slower than without it")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def float32_model(model: keras.Model) -> keras.Model:
    """``model`` with every layer computing in float32 again (after mixed-precision training
    its weights are float32 already), so the saved ``model.keras`` predicts, evaluates and
    exports like any other run."""
    if model.dtype_policy.name == "float32":
        return model
    for layer in model._flatten_layers(include_self=True):
        layer.dtype_policy = "float32"
    return model


def _train_in(cfg, prepare: Callable[[tf.distribute.Strategy, Path], TrainingJob],
              strategy: tf.distribute.Strategy, run_dir: Path) -> Path:
    """:func:`run_training` from ``prepare`` on, writing ``run_dir`` (a temporary folder on a
    worker other than the chief)."""
    job = prepare(strategy, run_dir)
    check_same_data(strategy, job.run_info)
    model = job.model
    # flags.txt keeps --max_iters as given; the schedule and fit see the epochs it comes to
    fit_cfg = dataclasses.replace(cfg, epochs=total_epochs(cfg, job.steps))
    with strategy.scope():
        schedule = WarmupDecay(cfg.learning_rate, fit_cfg.epochs * job.steps, cfg.lr_schedule,
                               cfg.warmup_steps)
        model.compile(optimizer=make_optimizer(cfg.optimizer, schedule, cfg.weight_decay,
                                               cfg.ema_momentum),
                      jit_compile=bool(cfg.jit_compile) and job.jit_ok, **job.compile_args)
        # Building the optimizer now saves a second trace of the train step inside fit (and
        # gives a resumed run's optimizer state somewhere to go).
        model.optimizer.build(model.trainable_variables)

    # Only now, with the data read and the model built, does the run folder get written.
    open_run_folder(cfg, run_dir)
    run_info = {"model": cfg.model, "model_config": model.get_config(),
                "parameters": int(model.count_params()), **job.run_info,
                "environment": environment()}
    went_on = budget_stopped(run_dir) is not None  # a budget stopped it; a larger one goes on
    if has_backup(run_dir):  # a resume: on the data it began with, or not at all
        began = _stored_run_info(run_dir)  # run.json as the run's start wrote it
        _check_same_data(run_dir, began, run_info, job.preprocessor)
        _note_other_strategy(run_dir, cfg)
        started = began.get("environment_at_start") or began.get("environment")
        if started is not None and started != run_info["environment"]:
            run_info["environment_at_start"] = started  # a resumed run keeps where it began
    atomic_write_text(run_dir / "run.json", json.dumps(run_info, indent=2))
    # --overwrite was this command's action, not a setting of the run: recorded, training again
    # from flags.txt would wipe the finished run
    atomic_write_text(run_dir / "flags.txt", to_flag_lines(dataclasses.replace(cfg,
                                                                               overwrite=False)))
    job.preprocessor.save(run_dir / "preprocessor.json")

    state, minutes, best_path = fit_run(model, job.dataset, job.steps, job.pixels_per_step,
                                        fit_cfg, run_dir, job.validation, job.callbacks)
    if state.diverged is None:
        load_best_weights(model, best_path)
    else:
        kept, which = _load_finite_weights(model, best_path, run_dir / LAST_WEIGHTS)
        if kept is None:
            raise TrainingDiverged(f"{state.diverged}; no epoch was completed before, so "
                                   "nothing was saved") from state.diverged
    sync_from_chief(strategy, model)  # the chief's best checkpoint on every worker
    save_model_file(float32_model(model), run_dir / "model.keras")
    losses = state.history.get("loss", [])
    metrics: dict[str, Any] = {"training_minutes": round(minutes, 2), "epochs_run": state.epoch,
                               "loss_history": losses, "history": state.history,
                               "best_checkpoint": best_checkpoint(best_path)}
    if state.diverged is not None:
        metrics["stopped"] = f"{state.diverged}; the weights of epoch {kept} were saved"
    elif cfg.time_budget_minutes and state.epoch < fit_cfg.epochs:  # what ended it, recorded
        metrics["time_budget"] = (f"{cfg.time_budget_minutes:g} min reached after epoch "
                                  f"{state.epoch} of {fit_cfg.epochs}")
    words = f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
    if job.finish is not None:
        extra, words = job.finish(model)
        metrics.update(extra)
    # a budget-stopped run gone on from: its earlier model's figures (evaluations, error maps)
    # are not this one's
    before = update_metrics_json(run_dir, metrics, replace=went_on)
    if dropped := sorted(set(before) - set(metrics) - {"time_budget"}) if went_on else []:
        log.info(f"metrics.json: dropped {', '.join(dropped)} of the model it replaced; "
                 "evaluate it again")
    if "time_budget" not in metrics:  # a budget's stop keeps the state to go on from
        finish_run(run_dir)
    if is_chief(strategy):  # a worker's copy goes with its temporary folder
        log.info(f"saved {run_dir / 'model.keras'} after {minutes:.1f} min{words}")
    if state.diverged is not None:  # the epochs before it are kept, and the command fails
        raise TrainingDiverged(
            f"{state.diverged}. {run_dir / 'model.keras'} holds epoch {kept}, {which} of the "
            f"{state.epoch} completed before: --pretrained={run_dir} with another --run_name "
            "goes on from it, --overwrite trains the run again from the start"
        ) from state.diverged
    return run_dir


def _stored_run_info(run_dir: Path) -> dict[str, Any]:
    """A run folder's ``run.json`` as it is on disk; empty where it cannot be read."""
    try:
        return read_run_json(Path(run_dir))
    except ModelFileError:
        return {}


def _check_same_data(run_dir: Path, began: dict[str, Any], run_info: dict[str, Any],
                     pre: Preprocessor) -> None:
    """Raises ConfigError when an interrupted run would go on with other images than it began
    with, or with its preprocessing fitted anew to other values (a label file edited, images
    added or replaced since): its weights learned from the first, and run.json and
    preprocessor.json would record only the second. ``began``: run.json as the run began."""
    old, changed = began.get("data") or {}, []
    now = run_info.get("data") or {}
    for key in ("training_images", "validation_images"):
        if key in old and key in now and old[key] != now[key]:
            gone, new = sorted(set(old[key]) - set(now[key])), sorted(set(now[key]) - set(old[key]))
            words = [f"without {_some(gone)}" if gone else "", f"with {_some(new)}" if new else ""]
            changed.append(f"{key.replace('_', ' ')} {' and '.join(w for w in words if w)}"
                           if gone or new else f"{key.replace('_', ' ')} in another order")
    if not changed and "image_digests" in old and "image_digests" in now:
        replaced = sorted(set(old["image_digests"].values())
                          - {name for digest, name in now["image_digests"].items()
                             if digest in old["image_digests"]})
        if replaced:
            changed.append(f"{_some(replaced)} with other pixels")
    try:
        before = Preprocessor.load(run_dir / "preprocessor.json").get_config()
    except ValueError:
        before = None
    if not changed and before is not None and not _same_values(before, pre.get_config()):
        changed.append("images whose content changed (the preprocessing fitted on them differs "
                       "from preprocessor.json's)")
    if changed:
        raise ConfigError(f"{run_dir} began training on other data: now {'; '.join(changed)} "
                          "(the data folder or label file changed since). --overwrite trains it "
                          "again from scratch on these, another --run_name trains a new run "
                          "beside it")


def _note_other_strategy(run_dir: Path, cfg) -> None:
    """A note when an interrupted run goes on under another distribution strategy than it
    began with (train_distribute's run resumed by train.py): allowed, as on another machine,
    but its epochs then differ from a run on either strategy alone."""
    try:
        old = parse_flag_lines((run_dir / "flags.txt").read_text())
    except OSError:
        return
    default = type(cfg)()
    before = (old.get("strategy", default.strategy), old.get("logical_cpus",
                                                              str(default.logical_cpus)))
    now = (cfg.strategy, str(cfg.logical_cpus))
    if before != now:
        log.warning(f"note: {run_dir.name} began with --strategy={before[0]} --logical_cpus="
                    f"{before[1]} and goes on with --strategy={now[0]} --logical_cpus={now[1]}: "
                    "its batches are split over other replicas from here, so it will not equal "
                    "a run on either alone")


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _same_values(a: Any, b: Any) -> bool:
    """Equal configs, their floats to a relative 1e-6 (one fit, read back from JSON)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _load_finite_weights(model: keras.Model, best_path: Path, last_path: Path
                         ) -> tuple[int | None, str]:
    """After a divergence: the best checkpoint's weights in ``model``, else the last
    completed epoch's; returns that epoch and which it is, or None when neither can be read."""
    for path, which in ((best_path, "the best"), (last_path, "the last")):
        if path.is_file() and weights_file_is_whole(path):
            model.load_weights(path)
            return int(read_weights_attrs(path)["epoch"]), which
    return None, ""


@takes(TrainConfig)
def train(cfg: TrainConfig,
          extra_callbacks: list[keras.callbacks.Callback] | None = None) -> Path:
    """Trains ``cfg.model`` as ``cfg`` says and returns the run folder (see
    :func:`run_training` for resuming and finished runs). ``extra_callbacks`` run after the
    built-in ones (after the resume backup of each epoch).

    Raises:
        ConfigError: a pre-training model, a loss setting the model cannot honour, a patch size
            the model cannot take, or a run folder with other settings.
        TrainingDiverged: the loss or the weights became NaN or infinite; ``model.keras``
            holds the best epoch before, if one was completed.
    """
    if cfg.logical_cpus:
        configure_logical_cpus(cfg.logical_cpus, cfg.strategy)
    cls = model_class(cfg.model)
    script = cls.pretraining_script
    if script:
        raise ConfigError(f"--model={cfg.model} is a pre-training model: run {script} (then "
                          "bin/train.py fine-tunes from its run folder with --pretrained)")
    defaults = TrainConfig()
    changed = [f"--{n}={getattr(cfg, n)}" for n in ("loss", "pos_weight")
               if getattr(cfg, n) != getattr(defaults, n)]
    if not cls.uses_compiled_loss and changed:
        raise ConfigError(f"{' '.join(changed)}: {cfg.model} trains with its own loss, not the "
                          "compiled one; drop the flag (its loss weights go in --model_config)")
    check_arguments(cfg.model, cfg.model_config)  # before any data is read
    # task None: the model's own (rip_av: av), else vessel; the caller's config is not changed
    cfg = dataclasses.replace(cfg, task=cfg.task or cls.task or "vessel")
    return run_training(cfg, lambda strategy, run_dir: _segmentation_job(
        cfg, strategy, run_dir, extra_callbacks or []))


def _check_patch_fits(cfg: TrainConfig, sets) -> None:
    """Refuses a patch larger than the smallest training image: the model could never
    segment photographs of the training images' own size (it needs a patch's at least)."""
    sizes = [(min(image.shape[:2]), name, image.shape[1], image.shape[0])
             for s in sets if s is not None for name, image in zip(s.names, s.images)]
    if sizes and cfg.patch_size > min(sizes)[0]:
        side, name, w, h = min(sizes)
        raise ConfigError(f"--patch_size={cfg.patch_size} is larger than the training image "
                          f"{name} ({w}x{h}); give --patch_size={side} or less")


def _segmentation_job(cfg: TrainConfig, strategy: tf.distribute.Strategy, run_dir: Path,
                      extra_callbacks: list[keras.callbacks.Callback]) -> TrainingJob:
    train_set, val_set, pre = load_training_sets(cfg)
    _check_patch_fits(cfg, [train_set, val_set])
    copies = sum("@camera" in n for n in train_set.names)  # --camera_variants
    images = (f"{len(train_set) - copies} training images and {copies} camera copies of them"
              if copies else f"{len(train_set)} training images")
    weights = getattr(cfg, "dataset_weights", ())
    if weights:  # the shares, in the order the sets were given
        images += " (" + " / ".join(f"{w / sum(weights):.0%}" for w in weights) + \
            f" of the {'images' if cfg.mode == 'whole' else 'patches'} from each set)"
    log.info(f"{images}, {len(val_set) if val_set else 0} held out for "
             f"validation; preprocessing {pre.steps}; strategy {type(strategy).__name__} with "
             f"{strategy.num_replicas_in_sync} replica(s); run folder {run_dir}")
    num_classes = train_set.targets[0].shape[-1]
    augment = augmentation(cfg)
    with strategy.scope():
        model = build_model(cfg.model, **model_kwargs(cfg, pre.channels, num_classes))
    _check_patch_options(cfg, model)
    pretrained = (find_run(cfg.pretrained, cfg.logdir, flag="--pretrained", own_first=True)
                  if cfg.pretrained else None)
    if pretrained is not None:
        load_pretrained(model, pretrained)
        log.info(f"started from the weights of {pretrained}")
        _warn_other_preprocessing(pretrained, pre)
    if model.needs_error_maps:
        if cfg.camera_variants:
            raise ConfigError(f"--camera_variants: not with {cfg.model}'s stage-1 error maps, "
                              "which exist for the original images only; set it to 0")
        train_set = attach_error_maps(train_set, cfg.error_maps, pretrained, cfg.model,
                                      data_key(cfg.dataset, cfg.data_dir, cfg.label_file_path))
    extras = model.training_extras(train_set.targets)
    if extras is not None:  # targets the model derives from the labels (RIP-AV's distance maps)
        train_set = train_set.with_extras(extras)
    multiple = model.size_multiple
    if cfg.mode == "patch":
        _check_patch_size(cfg, model)
        steps = epoch_steps(cfg, max(cfg.patches_per_epoch // cfg.batch_size, 1))
        pixels_per_step = cfg.batch_size * cfg.patch_size**2
    else:
        steps = epoch_steps(cfg, max(len(train_set) // cfg.batch_size, 1))
        h, w = padded_size(train_set, multiple, square=augment.rot90)
        pixels_per_step = cfg.batch_size * h * w
    callbacks = list(extra_callbacks)
    if cfg.freeze_encoder_epochs:
        if model.freezable_encoder() is None:
            raise ConfigError(f"--freeze_encoder_epochs: {cfg.model} has no encoder to freeze")
        callbacks.insert(0, FreezeEncoder(cfg.freeze_encoder_epochs))
    loss = SegmentationLoss(cfg.loss, pos_weight=cfg.pos_weight)
    validation = None
    if val_set is not None:
        validation = WholeImageValidation(val_set, pre, multiple, cfg.task, run_dir / "validation",
                                          cfg.validate_every, cfg.image_summary_every,
                                          cfg.eval_scales, cfg.stride)

    def finish(model: keras.Model) -> tuple[dict[str, Any], str]:
        if validation is None:
            return {}, ""
        validation.set_model(model)  # also when a resumed run had no epoch left to fit
        result, probs = evaluate_set(validation.segmenter(), val_set, cfg.task,
                                     label="the kept model on the held-out images")
        # evaluate and predict use this threshold unless --threshold is given
        threshold = DEFAULT_THRESHOLD
        try:
            choice = choose_threshold(validation.segmenter(), val_set, probabilities=probs)
        except DatasetError as err:
            log.warning(f"warning: no threshold stored ({err}); the run's threshold is "
                        f"{DEFAULT_THRESHOLD}")
        else:
            store_threshold(run_dir, choice)
            log.info(threshold_line(choice))
            threshold = choice["threshold"]
        if cfg.choose_tta:  # on the same held-out images, at the threshold just stored
            if cfg.task == "av":  # TTA and the vote, by A/V accuracy
                tta = choose_av_evaluation(validation.segmenter(), val_set,
                                           transpose=cfg.rot90, threshold=threshold)
            else:
                tta = choose_tta(validation.segmenter(), val_set, threshold=threshold,
                                 probabilities=probs)
            store_choice(run_dir, tta)
            log.info(tta_choice_line(tta))
        return {"validation": result}, (f"; validation F1 {result['f1']:.4f} AUC-ROC "
                                        f"{result['auc_roc']:.4f}")

    trained_fov = float(np.median([fov_diameter(f) for f in train_set.fovs]))
    if line := held_out_scale_note(val_set, trained_fov):
        log.warning(line)
    return TrainingJob(
        model=model,
        dataset=lambda start_epoch: training_dataset(cfg, model, train_set, augment, steps,
                                                     start_epoch),
        steps=steps, pixels_per_step=pixels_per_step, preprocessor=pre,
        run_info={"task": cfg.task, "size_multiple": multiple, "patch_size": cfg.patch_size,
                  "mode": cfg.mode, "fully_convolutional": model.fully_convolutional,
                  "dataset": cfg.dataset, "data": data_source(cfg, train_set, val_set),
                  **_image_size(train_set), "input_channels": pre.channels,
                  "num_classes": num_classes,
                  "pretrained": str(pretrained) if pretrained else None,
                  "pretrained_sha256": model_fingerprint(pretrained) if pretrained else None,
                  "fov_diameter": trained_fov,
                  "vessel_share": label_vessel_share(train_set.targets, train_set.fovs),
                  "bright_line_ratio": training_bright_lines(train_set.images, train_set.fovs),
                  **({"artery_share": label_artery_share(train_set.targets, train_set.fovs)}
                     if num_classes == 3 else {})},
        # weighted_metrics: only these receive the FOV map as sample_weight
        compile_args={"loss": loss, "weighted_metrics": [SegmentationF1(name="f1")]},
        jit_ok=loss.supports_jit, validation=validation, callbacks=callbacks, finish=finish)


def load_best_weights(model: keras.Model, best_path: Path) -> None:
    """Loads the best checkpoint into ``model``; one that cannot be read (damaged after it was
    written) is reported, and the model keeps the last epoch's weights."""
    if not best_path.is_file():
        return
    if weights_file_is_whole(best_path):
        model.load_weights(best_path)
    else:
        log.warning(f"warning: the best checkpoint {best_path} cannot be read; model.keras "
                    "gets the last epoch's weights")
