"""Run folders: durable files, resumable training state and the checks before a run starts.

A run folder ``<logdir>/<run_name>/`` is written so that a kill at any moment loses at most the
epoch in progress:

- every file is written to a temporary name in its folder, flushed to disk (fsync) and renamed
  (:func:`retina_tf.data.io.atomic_write_bytes`); Keras writes HDF5 and ``.keras`` files into a
  staging folder in memory first, so a full disk raises an error naming the file instead of
  crashing inside HDF5;
- ``backup/epoch-NNNN.weights.h5`` (model and optimizer) and ``backup/epoch-NNNN.json`` (the
  epoch, the per-epoch history, the wall time used, whether training had stopped) are written at
  the end of every epoch, the JSON last: it marks the backup complete. The previous complete
  backup is kept until the next one is whole;
- ``checkpoints/best.weights.h5`` carries its epoch and score as HDF5 attributes, so the best
  score survives a restart with the file it belongs to;
- ``backup/`` is removed only after ``model.keras`` and ``metrics.json`` are on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock, and no guard against two commands on one run
    fcntl = None
import h5py
import keras
import numpy as np

from retina_tf.config import DataConfig, RunRef
from retina_tf.data.io import atomic_write_bytes, process_exists, temporary_name
from retina_tf.error_maps import ERROR_MAPS_DIR
from retina_tf.errors import ConfigError, ModelFileError, RetinaTFError

log = logging.getLogger(__name__)

BACKUP_DIR = "backup"
UNREADABLE_DIR = "unreadable"
BEST_WEIGHTS = Path("checkpoints") / "best.weights.h5"
LAST_WEIGHTS = Path("checkpoints") / "last.weights.h5"
# What a finished run folder has; training writes model.keras, then metrics.json, then removes
# backup/, so a folder with model.keras and no backup is finished.
MODEL_FILE = "model.keras"
# What a run folder needs for inference (export_run copies these).
RUN_FILES = (MODEL_FILE, "run.json", "preprocessor.json")
EXPORT_JSON = "export.json"  # in every export folder (retina_tf.export)
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
# Flags that change what is printed or where, not the trained weights: they may differ when an
# interrupted run is resumed or a finished one is run again.
FLAGS_NOT_IN_TRAINING = frozenset({
    "logdir", "run_name", "resume", "overwrite", "verbose", "strategy", "logical_cpus",
    "time_budget_minutes", "image_summary_every", "cache_dir", "jit_compile",
    "eval_split", "visualize", "whole_image_metrics", "inference", "tta", "tta_transpose",
    "av_vote", "av_link", "window", "threshold", "output_dir", "input", "fov",
    "test_label_file_path"})


# --- finding runs ----------------------------------------------------------------------------

def shipped_models() -> list[str]:
    """Names of the trained models shipped with the package (``retina_tf/pretrained/``)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / MODEL_FILE).is_file())


def is_shipped(run_dir: Path) -> bool:
    return PRETRAINED_DIR in Path(run_dir).resolve().parents


def refuse_shipped_folder(path: str | os.PathLike, flag: str) -> None:
    """Raises ConfigError for a folder to write inside the shipped models: a run or outputs
    there change what ``--model=<name>`` gives every user of the installation (making a
    shipped model is ``bin/export_model.py --format=keras``'s job)."""
    resolved = Path(path).resolve()
    if resolved == PRETRAINED_DIR or PRETRAINED_DIR in resolved.parents:
        raise ConfigError(f"{flag}: {path} is inside retina_tf's shipped models "
                          f"({PRETRAINED_DIR}); give a folder of your own")


def default_run_dir(logdir: str, run_name: str | None, model: str, dataset: str | None = None,
                    label_file_path: str | None = None) -> Path:
    """Where training writes a run: ``<logdir>/<run_name>``, by default
    ``<logdir>/<model>_<dataset or the label file's folder>``."""
    if run_name:
        return Path(logdir) / run_name
    source = dataset or (Path(label_file_path).parent.name if label_file_path else "data")
    return Path(logdir) / f"{model}_{source}"


def run_dir_of(cfg: RunRef) -> Path:
    """The run folder a config names (:func:`default_run_dir` of its ``logdir``, ``run_name``,
    ``model`` and, for configs with data, the dataset or label file)."""
    data = cfg if isinstance(cfg, DataConfig) else DataConfig()
    return default_run_dir(cfg.logdir, cfg.run_name, cfg.model, data.dataset,
                           data.label_file_path)


def _refuse_an_export(folder: Path, given: str) -> None:
    """Raises ModelFileError when ``folder`` is a SavedModel, ONNX or TFLite export: made to
    leave retina_tf, it is no run folder (a keras export is one)."""
    try:
        info = json.loads((folder / EXPORT_JSON).read_text())
    except (OSError, ValueError):
        return
    if isinstance(info, dict) and info.get("format") not in (None, "keras"):
        raise ModelFileError(
            f"{given}: {folder} is a {info['format']} export of {info.get('run', 'a run')} "
            f"({EXPORT_JSON}), for serving without retina_tf (docs/deploy.md); retina_tf's "
            "commands take the run folder itself or a --format=keras export of it")


def find_run(name: str | os.PathLike, logdir: str | None = None, run_name: str | None = None,
             flag: str = "--model", own_first: bool = False) -> Path:
    """A trained run folder (one with ``model.keras``) from a path (the folder or its
    ``model.keras``), a shipped model name, a run name under ``logdir``, or
    ``logdir/run_name``. Where a run under ``logdir`` has a shipped model's name, a line says
    which is taken: the shipped model, or with ``own_first`` the run (``--pretrained``, whose
    flagfiles name the runs of the recipes before them: ``configs/drive_unet.cfg`` writes
    ``logs/unet_drive``, ``configs/vessel_general.cfg`` starts from it).

    Raises:
        ModelFileError: naming ``flag`` and every place looked in; a folder given by path that
            lacks run files is named with the files it lacks.
    """
    path = Path(name)
    if path.name == MODEL_FILE and path.is_file():  # the model file itself: its run folder
        path = name = path.parent
    shipped = PRETRAINED_DIR / str(name)
    own = [Path(logdir) / str(name)] if logdir else []
    named = [Path(logdir) / run_name] if logdir and run_name else []
    candidates = [path, *(own + [shipped] if own_first else [shipped] + own), *named]
    for candidate in candidates:
        if (candidate / MODEL_FILE).is_file():
            other = {*own, shipped} - {candidate}
            if candidate != path and all((o / MODEL_FILE).is_file() for o in other) and other:
                log.info(f"{flag}={name}: {candidate} is taken, not {other.pop()}; give a path "
                         "to choose")
            return candidate
    places = [path, *own, *named]  # the user's folders, not the package's
    for folder in (p for p in places if p.is_dir()):
        if _being_trained(folder):
            raise RunBusyError(f"{flag}={name}: a training is writing {folder} now; use it "
                               "when the training has ended")
        if has_backup(folder):
            raise ModelFileError(f"{flag}={name}: {folder} holds a training that has not "
                                 f"finished (its completed epochs are in {BACKUP_DIR}/): run "
                                 "its training command again to finish it")
        _refuse_an_export(folder, f"{flag}={name}")
        missing = [f for f in RUN_FILES if not (folder / f).is_file()]
        raise ModelFileError(f"{flag}={name}: the folder {folder} is not a complete run: it lacks "
                             f"{', '.join(missing)}; point {flag} at a run folder that training "
                             "finished (or one written by bin/export_model.py)")
    tried = ", ".join(str(p) for p in dict.fromkeys(places))
    # a recipe's flagfile gives its architecture as --model and its run as --run_name; the
    # shipped model of a recipe has that run's name
    shipped_run = (f", or give {flag}={run_name}, the shipped model of that name"
                   if run_name and run_name in shipped_models() else "")
    raise ModelFileError(f"{flag}={name}: no trained model found; looked for {MODEL_FILE} in "
                         f"{tried} and among the shipped models "
                         f"({', '.join(shipped_models()) or 'none'}); train that run "
                         f"first{shipped_run}")


# --- durable files ---------------------------------------------------------------------------

_KILL_COUNTS: dict[str, int] = {}  # writes seen per file name, for RETINA_TF_KILL_AT


def kill_point(path: Path) -> None:
    """Test hook of the kill harness (tests/test_kill_harness.py, and predict's resume test):
    ``RETINA_TF_KILL_AT=<name>`` or ``<name>#<n>`` SIGKILLs this process while the n-th
    (default first) file of that name is being written: its temporary file exists and is half
    full."""
    spec = os.environ.get("RETINA_TF_KILL_AT")
    if not spec:
        return
    name, _, nth = spec.partition("#")
    if path.name != name:
        return
    _KILL_COUNTS[name] = _KILL_COUNTS.get(name, 0) + 1
    if _KILL_COUNTS[name] == int(nth or 1):
        tmp = temporary_name(path)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"\0" * 1024)  # what a kill in the middle of a write leaves
        os.kill(os.getpid(), signal.SIGKILL)


def write_durably(path: Path, data: bytes) -> None:
    """:func:`atomic_write_bytes` with the kill harness's hook."""
    kill_point(Path(path))
    atomic_write_bytes(path, data)


def _staging_dir() -> str | None:
    """A folder in memory (Linux /dev/shm) where Keras can write HDF5 without touching the
    run's disk; None (the system's temporary folder) elsewhere."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


# Each live model's last weights file: (fingerprint of its variables, the file's bytes before
# attributes). An epoch's end writes the same state up to three times (best, last and backup
# checkpoints); Keras serializes it once. Dropped with the model.
_LAST_SERIALIZED: weakref.WeakKeyDictionary[keras.Model, tuple[bytes, bytes]] = (
    weakref.WeakKeyDictionary())


def _fingerprint(model: keras.Model) -> bytes:
    """A digest of the names, shapes and values of the variables a weights file holds (the
    model's, seed generators' included, and its optimizer's)."""
    digest = hashlib.blake2b(digest_size=16)
    optimizer = getattr(model, "optimizer", None)
    for v in [*model.variables, *(optimizer.variables if optimizer is not None else [])]:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(v))
        digest.update(f"{v.path}:{value.dtype}:{value.shape};".encode())
        digest.update(value.data)
    return digest.digest()


def save_weights_file(model: keras.Model, path: Path, attrs: dict[str, Any] | None = None
                      ) -> None:
    """``model.save_weights`` (model and optimizer variables) written durably to ``path``,
    with ``attrs`` stored as HDF5 attributes of the file."""
    with tempfile.TemporaryDirectory(dir=_staging_dir()) as tmp:
        staged = Path(tmp) / "staged.weights.h5"
        fingerprint = _fingerprint(model)
        last = _LAST_SERIALIZED.get(model)
        if last is not None and last[0] == fingerprint:
            staged.write_bytes(last[1])
        else:
            model.save_weights(staged)
            _LAST_SERIALIZED[model] = (fingerprint, staged.read_bytes())
        if attrs:
            with h5py.File(staged, "a") as f:
                f.attrs.update({k: v for k, v in attrs.items() if v is not None})
        data = staged.read_bytes()
    write_durably(Path(path), data)


def save_model_file(model: keras.Model, path: Path) -> None:
    """``model.save`` (a ``.keras`` file) written durably to ``path``."""
    with tempfile.TemporaryDirectory(dir=_staging_dir()) as tmp:
        staged = Path(tmp) / "staged.keras"
        model.save(staged)
        data = staged.read_bytes()
    write_durably(Path(path), data)


def read_weights_attrs(path: Path) -> dict[str, Any] | None:
    """The attributes of a weights file, or None when it is missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except (OSError, ValueError):
        return None


def weights_file_is_whole(path: Path) -> bool:
    """True when ``path`` is an HDF5 file every dataset of which can be read."""
    try:
        with h5py.File(path, "r") as f:
            datasets = []
            f.visititems(lambda _, obj: datasets.append(obj)
                         if isinstance(obj, h5py.Dataset) else None)
            for d in datasets:
                d[()]
        return True
    except (OSError, ValueError, KeyError, RuntimeError):
        return False


def remove_stray_temporaries(run_dir: Path) -> list[Path]:
    """Deletes temporary files a killed process left in the run folder (``.<name>.*.tmp`` and
    the ``.model.<pid>.tmp.keras`` of earlier versions); returns them."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / BACKUP_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_file() and p.name.startswith(".") and ".tmp" in p.name:
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# --- JSON ------------------------------------------------------------------------------------

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


def atomic_write_text(path: Path, text: str) -> None:
    write_durably(Path(path), text.encode())


def update_metrics_json(run_dir: Path, update: dict[str, Any], replace: bool = False
                        ) -> dict[str, Any]:
    """Merges ``update`` into ``run_dir/metrics.json`` (written atomically; ``replace``: it
    alone is written) and returns what the file held before; two commands merging at once take
    turns, so neither result is lost."""
    path = Path(run_dir) / "metrics.json"
    # the lock is on the folder holding the run (its logdir): the run's own is shared by the
    # commands that read it, and a lock file would stay in the run folder
    with taking_turns(Path(run_dir).resolve().parent):
        before = json.loads(path.read_text()) if path.is_file() else {}
        atomic_write_text(path, to_json(update if replace else {**before, **update}))
    return before


# --- one command writing a run at a time --------------------------------------------------------
# flock locks on the run folder itself: the system drops them when the process ends, however it
# ends, so a killed command never leaves a run locked.

_TRAINING: dict[Path, int] = {}  # the runs this process trains: their locked folders
_READING: dict[Path, int] = {}  # the runs this process reads: how many times over


class RunBusyError(RetinaTFError):
    """Another command is training the run, or reading it while this one would train it."""


def _flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_open_file(f) -> bool:
    """Takes an exclusive lock on the open file ``f`` for as long as it stays open (the system
    drops it however the process ends); False where another process holds it. True where the
    system has no such locks."""
    return fcntl is None or _flock(f.fileno(), fcntl.LOCK_EX)


def hold_run(run_dir: Path) -> None:
    """Keeps other commands off ``run_dir`` while this process trains it (an exclusive lock
    until :func:`release_run` or the process ends); nothing once held, or where the folder does
    not exist yet (call again once it does).

    Raises:
        RunBusyError: another training writes the run, or a command reads it (evaluate,
            predict, make_error_maps).
    """
    run_dir = Path(run_dir).resolve()
    if fcntl is None or run_dir in _TRAINING or not run_dir.is_dir():
        return
    fd = os.open(run_dir, os.O_RDONLY)
    if _flock(fd, fcntl.LOCK_EX):
        _TRAINING[run_dir] = fd
        return
    read = _flock(fd, fcntl.LOCK_SH)  # only readers hold it
    os.close(fd)
    who = ("another command is reading it (evaluate, predict, make_error_maps)" if read else
           "another training is writing it")
    raise RunBusyError(f"{run_dir}: {who}; train when that has ended, or give another "
                       "--run_name")


def _being_trained(run_dir: Path) -> bool:
    """Whether another process trains ``run_dir`` now (holds :func:`hold_run`'s lock)."""
    if fcntl is None or Path(run_dir).resolve() in _TRAINING:
        return False
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        return not _flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def release_run(run_dir: Path) -> None:
    """Ends :func:`hold_run`."""
    fd = _TRAINING.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def reading_run(run_dir: Path) -> Iterator[None]:
    """Keeps a training off ``run_dir`` while a command reads it or writes an evaluation into
    it (a shared lock: readers do not wait for one another).

    Raises:
        RunBusyError: a training writes the run.
    """
    run_dir = Path(run_dir).resolve()
    if fcntl is None or run_dir in _TRAINING or not run_dir.is_dir():
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        if not _flock(fd, fcntl.LOCK_SH):
            raise RunBusyError(f"{run_dir}: a training is writing this run; use it when the "
                               "training has ended")
        _READING[run_dir] = _READING.get(run_dir, 0) + 1
        try:
            yield
        finally:
            _READING[run_dir] -= 1
            if not _READING[run_dir]:
                del _READING[run_dir]
    finally:
        os.close(fd)


@contextlib.contextmanager
def taking_turns(path: Path) -> Iterator[None]:
    """Waits for any other command's turn at the folder ``path`` to end and holds the others
    off this one's (an exclusive lock on it, for the few milliseconds of a JSON file's read,
    merge and replace inside it). A folder this process holds as a run (:func:`hold_run`,
    :func:`reading_run`) is its own already."""
    path = Path(path)
    if fcntl is None or path.resolve() in _TRAINING or path.resolve() in _READING:
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- training state --------------------------------------------------------------------------

def seed_generators(model: keras.Model) -> list[keras.random.SeedGenerator]:
    """The model's random-number generators (dropout, MAE masking), in a fixed order. Keras
    does not save their state with the weights."""
    found: list[keras.random.SeedGenerator] = []
    seen: set[int] = set()

    def walk(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, keras.random.SeedGenerator):
            found.append(obj)
        elif isinstance(obj, keras.layers.Layer):
            for value in vars(obj).values():
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(item, (keras.layers.Layer, keras.random.SeedGenerator)):
                        walk(item)

    walk(model)
    return found


class TrainingState:
    """What a resumed run restores besides the weights: epochs done, the per-epoch history,
    the wall time used, whether training had already stopped (time budget) and the state of
    the model's random-number generators."""

    def __init__(self, epoch: int = 0, history: dict[str, list] | None = None,
                 elapsed_seconds: float = 0.0, stopped: bool = False,
                 seed_states: list | None = None):
        self.epoch = int(epoch)
        self.history = history or {}
        self.elapsed_seconds = float(elapsed_seconds)
        self.stopped = bool(stopped)
        self.seed_states = seed_states or []
        # the error when this process's training diverged (StopOnDivergence); never backed up
        self.diverged: Exception | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history,
                "elapsed_seconds": self.elapsed_seconds, "stopped": self.stopped,
                "seed_states": self.seed_states}


def _backup_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _backups(backup_dir: Path) -> list[tuple[int, Path]]:
    """Complete-looking backups (their JSON exists), newest first."""
    found = []
    for p in backup_dir.glob("epoch-*.json"):
        try:
            found.append((int(p.stem.split("-")[1]), p))
        except (IndexError, ValueError):
            continue
    return sorted(found, reverse=True)


def _move_aside(backup_dir: Path, paths: list[Path]) -> Path:
    aside = backup_dir / UNREADABLE_DIR
    aside.mkdir(exist_ok=True)
    for p in paths:
        if p.exists():
            os.replace(p, aside / p.name)
    return aside


def has_backup(run_dir: Path) -> bool:
    backup = Path(run_dir) / BACKUP_DIR
    return bool(_backups(backup)) or (backup / "training_metadata.json").is_file()


def restore_training(model: keras.Model, run_dir: Path) -> TrainingState | None:
    """Loads the newest complete backup of ``run_dir`` into ``model`` (weights and optimizer)
    and returns its state; None when there is none. A backup that cannot be read is reported by
    path, moved to ``backup/unreadable/`` and the next older one is tried."""
    backup_dir = Path(run_dir) / BACKUP_DIR
    for epoch, meta in _backups(backup_dir):
        weights = meta.with_suffix(".weights.h5")
        bad = meta  # the file that fails is the one named
        try:
            state = json.loads(meta.read_text())
            if not isinstance(state, dict):
                raise ValueError("not a backup's state")
            bad = weights
            ok = weights_file_is_whole(weights)
        except (OSError, ValueError):
            ok = False
        if not ok:
            aside = _move_aside(backup_dir, [meta, weights])
            log.info(f"warning: backup {bad} cannot be read (incomplete or corrupt); moved to "
                     f"{aside} with {(weights if bad == meta else meta).name} and resuming from "
                     "an older state")
            continue
        model.load_weights(weights)
        generators = seed_generators(model)
        seed_states = state.get("seed_states") or []
        if len(seed_states) == len(generators):
            for generator, value in zip(generators, seed_states):
                generator.state.assign(np.asarray(value, generator.state.dtype))
        return TrainingState(epoch, state.get("history"), state.get("elapsed_seconds", 0.0),
                             state.get("stopped", False), seed_states)
    # Keras's own BackupAndRestore layout, written by earlier retina_tf versions.
    legacy_meta, legacy = backup_dir / "training_metadata.json", backup_dir / "latest.weights.h5"
    if legacy_meta.is_file():
        try:
            epoch = int(json.loads(legacy_meta.read_text())["epoch"])
            ok = weights_file_is_whole(legacy)
        except (OSError, ValueError, KeyError):
            ok = False
        if ok:
            model.load_weights(legacy)
            return TrainingState(epoch)
        aside = _move_aside(backup_dir, [legacy_meta, legacy])
        log.info(f"warning: backup {legacy} cannot be read (incomplete or corrupt); moved to "
                 f"{aside}; training starts from epoch 1")
    return None


class RunBackup(keras.callbacks.Callback):
    """Keeps the training state and writes it to ``backup/`` at the end of every epoch (after
    the checkpoints and the time budget have run, so it records whether training stops here).
    Keeps the previous complete backup until the new one is whole, and no older ones. With
    ``write=False`` (``--noresume``) it only records the history."""

    def __init__(self, run_dir: Path, state: TrainingState | None = None, write: bool = True):
        super().__init__()
        self.backup_dir = Path(run_dir) / BACKUP_DIR
        self.state = state or TrainingState()
        self.write = write

    def on_train_begin(self, logs=None):
        self._start = time.monotonic()
        self._elapsed_before = self.state.elapsed_seconds

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        # one entry per recorded epoch in every list, None where an epoch has no such value
        # (validation every --validate_every epochs), so that the lists line up (a worker that
        # joins a resumed run records from there on)
        recorded = max((len(v) for v in self.state.history.values()), default=0)
        for key in self.state.history.keys() | logs.keys():
            values = self.state.history.setdefault(key, [])
            values.extend([None] * (recorded - len(values)))
            values.append(_json_safe(float(logs[key])) if key in logs else None)
        self.state.epoch = epoch + 1
        self.state.elapsed_seconds = self._elapsed_before + time.monotonic() - self._start
        self.state.stopped = bool(self.model.stop_training)
        self.state.seed_states = [np.asarray(keras.ops.convert_to_numpy(g.state)).tolist()
                                  for g in seed_generators(self.model)]
        if not self.write:
            return
        name = _backup_name(epoch + 1)
        save_weights_file(self.model, self.backup_dir / f"{name}.weights.h5")
        atomic_write_text(self.backup_dir / f"{name}.json", to_json(self.state.to_dict()))
        for _, meta in _backups(self.backup_dir)[2:]:
            meta.unlink(missing_ok=True)
            meta.with_suffix(".weights.h5").unlink(missing_ok=True)
        for legacy in ("training_metadata.json", "latest.weights.h5"):
            (self.backup_dir / legacy).unlink(missing_ok=True)


class BestCheckpoint(keras.callbacks.Callback):
    """Keeps the weights of the best epoch by ``monitor`` in ``path``, written durably with
    its epoch and score as attributes; ``best`` continues a resumed run's comparison."""

    def __init__(self, path: Path, monitor: str = "val_f1", mode: str = "max",
                 best: float | None = None):
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.mode = mode
        self.best = best

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:  # e.g. an epoch without validation (--validate_every)
            return
        value = float(value)
        if self._better(value):
            save_weights_file(self.model, self.path,
                              {"epoch": epoch + 1, "monitor": self.monitor, "value": value})
            self.best = value


class LastCheckpoint(keras.callbacks.Callback):
    """The weights of the last completed epoch, written durably."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    def on_epoch_end(self, epoch, logs=None):
        save_weights_file(self.model, self.path, {"epoch": epoch + 1})


def best_checkpoint(path: Path) -> dict[str, Any] | None:
    """The epoch, monitor and score stored with a best checkpoint (None without one)."""
    attrs = read_weights_attrs(path)
    return ({"epoch": int(attrs["epoch"]), "monitor": attrs.get("monitor"),
             "value": attrs.get("value")} if attrs and "epoch" in attrs else None)


def best_checkpoint_score(run_dir: Path, monitor: str) -> float | None:
    """The score stored with ``checkpoints/best.weights.h5`` when it was chosen by ``monitor``."""
    best = best_checkpoint(Path(run_dir) / BEST_WEIGHTS)
    if best and best["monitor"] == monitor and best["value"] is not None:
        return float(best["value"])
    return None


def finish_run(run_dir: Path) -> None:
    """Removes the resume state; call only once ``model.keras`` and ``metrics.json`` are on
    disk, so that a kill at any earlier moment still resumes. A run its time budget stopped
    keeps it (:func:`budget_stopped`), to go on from with a larger budget."""
    shutil.rmtree(Path(run_dir) / BACKUP_DIR, ignore_errors=True)


@contextlib.contextmanager
def worker_run_folder(run_dir: Path, task_id: int) -> Iterator[Path]:
    """The folder a multi-worker worker other than the chief writes instead of ``run_dir``: a
    temporary one, removed when training ends or fails (TensorFlow's multi-worker guide: all
    workers save, only the chief's files are kept). The folders that killed workers left in
    the system's temporary folder are removed first."""
    for old in Path(tempfile.gettempdir()).glob("retina_tf-worker*-pid*-*"):
        pid = old.name.partition("-pid")[2].partition("-")[0]
        if (pid.isdigit() and not process_exists(int(pid))
                and old.stat().st_uid == os.getuid()):
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(
            prefix=f"retina_tf-worker{task_id}-pid{os.getpid()}-") as tmp:
        folder = Path(tmp) / Path(run_dir).name
        log.info(f"worker {task_id}: the chief writes {run_dir}; this worker writes {folder}, "
                 "removed at the end")
        yield folder
    log.info(f"worker {task_id}: done; removed {folder}")


# --- before a run starts ---------------------------------------------------------------------

def parse_flag_lines(text: str) -> dict[str, str]:
    """The ``--name=value`` / ``--name`` / ``--noname`` lines of a flagfile as {name: value}
    (a bare ``--name`` is "true")."""
    flags = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("--"):
            name, eq, value = line[2:].partition("=")
            flags[name] = value if eq else "true"
    return flags


def flag_differences(old: dict[str, str], new: dict[str, str],
                     defaults: dict[str, str] | None = None) -> list[str]:
    """Training flags whose values differ, as ``--name: old -> new`` (``--noflip`` and
    ``--flip`` compare as flip false / true). A flag missing from ``old`` (a run written before
    the flag existed) reads as its value in ``defaults``."""
    names = old.keys() | new.keys() | (defaults or {}).keys()

    def normal(flags: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, value in flags.items():
            if name.startswith("no") and value == "true" and name[2:] in names:
                name, value = name[2:], "false"  # --noflip
            out[name] = value
        return out

    old, new = normal(old), normal(new)
    old = {**normal(defaults or {}), **old}
    return [f"--{name}: {old.get(name, '(unset)')} -> {new.get(name, '(unset)')}"
            for name in sorted(old.keys() | new.keys())
            if name not in FLAGS_NOT_IN_TRAINING and not name.startswith("rip_")
            and old.get(name) != new.get(name)
            and not (name in PATH_FLAGS and _same_path(old.get(name), new.get(name)))]


# Training flags naming one file or folder: the same one however spelt (a trailing slash, a
# symlink, ../); its contents are compared by their digests on resume.
PATH_FLAGS = frozenset({"data_dir", "label_file_path", "pretrained"})


def _same_path(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is gone (or a shipped model's name): by their spelling
        return os.path.normpath(a) == os.path.normpath(b)


def check_run_folder(run_dir: Path, flags_text: str, overwrite: bool, resume: bool,
                     defaults_text: str = "") -> str:
    """Decides what training does with an existing run folder before anything is written.

    Returns ``"new"`` (no run there, or ``overwrite``), ``"resume"`` (an interrupted run with
    the same training flags, or one its time budget stopped, given a larger budget or none) or
    ``"finished"`` (a finished run with the same training flags: nothing to do).

    Raises:
        ConfigError: a finished or interrupted run with other training flags (or ``--noresume``
            on an interrupted run), unless ``overwrite``; the message names the differences
            and the ways out.
    """
    run_dir = Path(run_dir)
    if overwrite or not run_dir.is_dir():
        return "new"
    interrupted = has_backup(run_dir)
    finished = (run_dir / MODEL_FILE).is_file() and not interrupted
    used = budget_stopped(run_dir) if interrupted else None  # it keeps its state to go on from
    stopped = used is not None
    if not (finished or interrupted):
        return "new"
    old_flags = run_dir / "flags.txt"
    diffs = (flag_differences(parse_flag_lines(old_flags.read_text()),
                              parse_flag_lines(flags_text), parse_flag_lines(defaults_text))
             if old_flags.is_file() else ["(its flags.txt is missing)"])
    what = "a finished run" if finished or stopped else "an interrupted run"
    ways = "add --overwrite to train it again from scratch, or give another --run_name to keep it"
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ConfigError(f"{run_dir} holds {what} with other training flags ({shown}): {ways}")
    if stopped:  # a budget no larger than the minutes it trained would stop it at once
        given = {**parse_flag_lines(defaults_text), **parse_flag_lines(flags_text)}
        if 0 < float(given.get("time_budget_minutes") or 0) <= used:
            return "finished"
    if interrupted and not resume:
        what = "a run its time budget stopped" if stopped else "an interrupted run"
        raise ConfigError(f"{run_dir} holds {what} and --noresume was given: run without "
                          f"--noresume to continue it, or {ways}")
    return "finished" if finished else "resume"


def budget_stopped(run_dir: Path) -> float | None:
    """The minutes of training of the run in ``run_dir`` when its time budget stopped it before
    its last epoch, with the state to go on from (``model.keras``, ``metrics.json``'s
    ``time_budget`` and the backup); None otherwise."""
    run_dir = Path(run_dir)
    if not ((run_dir / MODEL_FILE).is_file() and has_backup(run_dir)):
        return None
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        return float(metrics["training_minutes"]) if "time_budget" in metrics else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


# What makes a folder a run's, for --overwrite: files every run writes first (flags.txt,
# run.json at the start; checkpoints/ and backup/ during training; the end's model.keras).
RUN_MARKERS = (MODEL_FILE, "metrics.json", "run.json", "flags.txt", "preprocessor.json",
               "checkpoints", BACKUP_DIR)


def clear_run_folder(run_dir: Path) -> None:
    """Removes what a previous run wrote (``--overwrite``), leaving files retina_tf does not
    write untouched. A folder without a run's own files (``flags.txt``, ``run.json``, ...) is
    left as it is: its ``images/`` or ``train/`` are someone else's (a dataset's ``training/``
    given as the run folder lost its photographs)."""
    run_dir = Path(run_dir)
    if not any((run_dir / name).exists() for name in RUN_MARKERS):
        return
    for name in (MODEL_FILE, "metrics.json", "run.json", "flags.txt", "preprocessor.json"):
        (run_dir / name).unlink(missing_ok=True)
    # error maps too: EAR-Net's stage 2 would read the old model's as this one's
    for name in ("checkpoints", BACKUP_DIR, "train", "validation", "images", ERROR_MAPS_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for p in run_dir.glob("eval_*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
