"""Evaluation of a run on a test split, and prediction on arbitrary photographs.

``evaluate(cfg)`` and ``predict(cfg)`` (:class:`retina_tf.config.EvalConfig` /
:class:`~retina_tf.config.PredictConfig`) are what ``bin/evaluate.py`` and ``bin/predict.py`` run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from retina_tf import visualize
from retina_tf.config import (
    CompareConfig,
    DataConfig,
    ErrorMapConfig,
    EvalConfig,
    InferenceConfig,
    PredictConfig,
    RunRef,
    from_run,
    takes,
)
from retina_tf.data.catalog import dataset_key
from retina_tf.data.fov import estimate_fov, estimate_warnings
from retina_tf.data.io import (
    IMAGE_SUFFIXES,
    STAGED_WHOLE,
    STAGING_PREFIX,
    DatasetError,
    atomic_write_bytes,
    clear_killed_writes,
    file_stem,
    fsync_dir,
    is_dicom_file,
    picture_count,
    pixel_digest,
    process_exists,
    read_fov_mask,
    read_image,
    read_sample,
)
from retina_tf.data.pipeline import SegmentationSet, data_key, resolve_samples, target_of
from retina_tf.error_maps import ERROR_MAPS_DIR, ERROR_MAPS_JSON, error_map, model_fingerprint
from retina_tf.errors import ConfigError, ModelFileError, RetinaTFError
from retina_tf.inference import (
    RUN_CHOICES,
    ScalePlan,
    Segmenter,
    artery_share,
    environment,
    resolve_threshold,
    tta_line,
    vessel_share,
)
from retina_tf.losses import vessel_width_map
from retina_tf.metrics import (
    AVMetrics,
    RipavAVMetrics,
    VesselMetrics,
    counts_metrics,
    format_table,
    roc_pr_auc,
)
from retina_tf.postprocess import vote_av_segments
from retina_tf.progress import progress
from retina_tf.run_folder import (
    RunBusyError,
    atomic_write_text,
    is_shipped,
    kill_point,
    lock_open_file,
    reading_run,
    refuse_shipped_folder,
    run_dir_of,
    taking_turns,
    to_json,
    update_metrics_json,
)

log = logging.getLogger(__name__)

# A/V accuracy is also split at this vessel width (px, as vessel_width_map measures it: a 3 px
# wide vessel measures 4), because thin vessels are where A/V classification fails first.
THIN_AV_WIDTH = 4.0


# Lists, in each output folder, the files retina_tf wrote there: re-runs replace those, and
# anything else is the user's (kept unless --overwrite) and never taken for an input image.
MANIFEST_NAME = ".retina_tf_outputs.json"
CURVE_FILES = ("roc_curve.png", "pr_curve.png")
# predict's table of every photograph of a run: what was segmented, how, and what was warned of
PREDICTIONS_CSV = "predictions.csv"
# predict's record of the photographs of a folder done so far, on disk as each is written: the
# same command run again after a kill (or a failure) segments only the others
PREDICT_JOURNAL = ".retina_tf_predict.jsonl"


def read_manifest(folder: str | os.PathLike) -> set[str]:
    """Names of the files retina_tf wrote in ``folder`` (empty when it has no readable
    manifest: then every file there counts as the user's)."""
    try:
        names = json.loads((Path(folder) / MANIFEST_NAME).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str)}


class OutputFolder:
    """An output folder that may also hold the user's files.

    A file is written only when it does not exist yet, was written there by retina_tf before
    (it is in the manifest), or ``overwrite`` is set. Each name enters the manifest (written
    atomically) before its file is written, so a crash never leaves an unlisted retina_tf file.
    The folder is created with the first file: an early failure leaves no empty folder behind.

    Args:
        path: the folder.
        overwrite: ``--overwrite``: replace anybody's files.
        owned: the folder is retina_tf's own (a default evaluation folder): replace anything.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, owned: bool = False):
        self.path = Path(path)
        refuse_shipped_folder(self.path, "--output_dir")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} is a file, not a folder: give --output_dir a folder")
        self.overwrite = bool(overwrite) or owned
        self._listed = read_manifest(self.path)
        self._staging: Path | None = None
        self._remove_stale_staging()

    @contextlib.contextmanager
    def all_or_nothing(self):
        """Files saved in this block go to a hidden folder inside this one and are moved in
        when it ends without an error; on an error (or Ctrl-C) they are removed, and one left
        by a killed process is removed by the next run here (:meth:`_remove_stale_staging`,
        when the folder is opened)."""
        self._staging = self.path / f"{STAGING_PREFIX}{os.getpid()}"
        try:
            yield self
        except BaseException as err:
            shutil.rmtree(self._staging, ignore_errors=True)
            if isinstance(err, OSError) and str(self._staging) in str(err.filename or ""):
                # the file meant, not its staging copy (removed just now): a full disk's line
                err.filename = str(err.filename).replace(str(self._staging), str(self.path))
            raise
        finally:
            staging, self._staging = self._staging, None
        if staging.is_dir():
            # from here on a kill is rolled forward by the next run here: the files are whole
            atomic_write_bytes(staging / STAGED_WHOLE, b"")
            self._move_in(staging)

    def _move_in(self, staging: Path) -> None:
        for f in sorted(staging.iterdir()):
            if f.name != STAGED_WHOLE:
                os.replace(f, self.path / f.name)
        fsync_dir(self.path)
        (staging / STAGED_WHOLE).unlink(missing_ok=True)
        staging.rmdir()

    def _remove_stale_staging(self) -> None:
        """Removes what killed processes left here: staging folders and temporary files. A
        process killed while it moved whole staged files in (half of an evaluation's files
        the new ones, half the old) has the rest moved in."""
        if not self.path.is_dir():
            return
        clear_killed_writes(self.path)
        for folder in self.path.glob(f"{STAGING_PREFIX}*"):
            pid = folder.name.removeprefix(STAGING_PREFIX)
            if pid.isdigit() and not process_exists(int(pid)):
                if (folder / STAGED_WHOLE).is_file():
                    self._move_in(folder)
                else:
                    shutil.rmtree(folder, ignore_errors=True)

    def _file(self, name: str) -> Path:
        """Where ``name`` is written now: in the staging folder inside :meth:`all_or_nothing`."""
        return (self._staging or self.path) / name

    def check(self, names) -> None:
        """Raises ConfigError for the first name that is a file retina_tf must not replace."""
        for name in names:
            target = self.path / name
            if not self.overwrite and name not in self._listed and target.exists():
                raise ConfigError(f"{target} already exists and was not written by retina_tf; "
                                  "move it away, choose another --output_dir, or pass "
                                  "--overwrite to replace it")

    def claim(self, names) -> None:
        """Lists ``names`` in the manifest before their files are written (one atomic write for
        all of them, none when they are listed already).

        Raises:
            ConfigError: as :meth:`check`.
        """
        if not set(names) - self._listed:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        # another command writing here lists its files meanwhile (maybe these names): keep
        # them, and check against the manifest as it is now
        with taking_turns(self.path):
            self._listed |= read_manifest(self.path)
            self.check(names)
            self._listed |= set(names)
            text = json.dumps({"written_by": "retina_tf", "files": sorted(self._listed)},
                              indent=1)
            atomic_write_bytes(self.path / MANIFEST_NAME, text.encode())

    def save_png(self, name: str, image: np.ndarray) -> Path:
        """Writes ``image`` atomically as ``name``; returns its path."""
        self.claim([name])
        kill_point(self._file(name))
        visualize.save_png(self._file(name), image)
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        self.claim([name])
        atomic_write_bytes(self._file(name), text.encode())
        return self.path / name

    def save_npy(self, name: str, array: np.ndarray) -> Path:
        """Writes ``array`` atomically as the ``.npy`` file ``name``; returns its path."""
        self.claim([name])
        buffer = io.BytesIO()
        np.save(buffer, array)
        atomic_write_bytes(self._file(name), buffer.getvalue())
        return self.path / name

    def save_curves(self, scores: np.ndarray, labels: np.ndarray, auc_roc: float,
                    auc_pr: float, title: str = "") -> tuple[Path, Path]:
        """:func:`retina_tf.visualize.save_curves` into this folder."""
        self.claim(CURVE_FILES)
        visualize.save_curves(scores, labels, self._file(""), auc_roc, auc_pr, title=title)
        return self.path / CURVE_FILES[0], self.path / CURVE_FILES[1]


def load_segmenter(cfg: RunRef | InferenceConfig) -> Segmenter:
    """The run of ``cfg`` with its inference settings; says what it computes in, since
    ``--precision=auto`` differs by CPU (and the Python API's default is float32)."""
    # the run training would write (<model>_<dataset>): only where the config says the data
    named = cfg.run_name or (run_dir_of(cfg).name if isinstance(cfg, DataConfig)
                             and cfg.names_data else None)
    seg = Segmenter.from_run(cfg.model, cfg.logdir, named,
                             inference=cfg.inference, window=cfg.window, stride=cfg.stride,
                             tta=cfg.tta, tta_transpose=cfg.tta_transpose,
                             scales=cfg.eval_scales, av_vote=cfg.av_vote, av_link=cfg.av_link,
                             inference_scale=cfg.inference_scale, tile_size=cfg.tile_size,
                             precision=cfg.precision)
    why = " (--precision=auto on this CPU)" if cfg.precision == "auto" else ""
    log.info(f"{seg.run_dir.name} computes in {seg.precision}{why}")
    if isinstance(cfg, DataConfig):
        _note_training_flags(cfg, seg)
    return seg


def _note_training_flags(cfg: DataConfig, seg: Segmenter) -> None:
    """Notes the data flags set away from their defaults that a trained run does not follow
    (a flagfile's, the run's own values, pass silently)."""
    default, pre, name = DataConfig(), seg.preprocessor, seg.run_dir.name
    given = [step for step in cfg.preprocess if step != "none"]
    if cfg.preprocess != default.preprocess and sorted(given) != sorted(pre.steps):
        log.warning(f"note: {name} segments with its own preprocessing "
                    f"({','.join(pre.steps) or 'none'}); --preprocess={','.join(cfg.preprocess)} "
                    "is ignored (it sets a training's)")
    if cfg.channel != default.channel and pre.grayscale and cfg.channel != pre.channel:
        log.warning(f"note: {name} converts to gray with its own channel ({pre.channel}); "
                    f"--channel={cfg.channel} is ignored (it sets a training's)")
    if cfg.cache_dir:
        log.warning(f"note: --cache_dir={cfg.cache_dir} is ignored: it caches a training's "
                    "preprocessed images")


def _with_the_runs_data(cfg: EvalConfig | ErrorMapConfig, run_dir: Path, split: str
                        ) -> EvalConfig | ErrorMapConfig:
    """``cfg`` with the data ``run_dir`` was trained on (its ``flags.txt``) when ``cfg`` names
    none: ``evaluate --model=logs/<run>`` scores the run on its own test split, and
    ``make_error_maps`` maps its training split."""
    if cfg.names_data or cfg.test_label_file_path:
        return cfg
    try:
        trained = from_run(run_dir)
    except ConfigError:
        return cfg
    if trained.label_file_path:
        # the run's own test list too (a flagfile's --test_label_file_path), else test.txt beside
        cfg = dataclasses.replace(cfg, label_file_path=trained.label_file_path,
                                  test_label_file_path=trained.test_label_file_path)
        where = f"--label_file_path={trained.label_file_path}" + (
            f" --test_label_file_path={trained.test_label_file_path}"
            if trained.test_label_file_path else "")
    elif trained.dataset and trained.data_dir:
        cfg = dataclasses.replace(cfg, dataset=trained.dataset, data_dir=trained.data_dir)
        where = f"--dataset={trained.dataset} --data_dir={trained.data_dir}"
    else:
        return cfg
    log.info(f"no data given: using {run_dir.name}'s own ({where}, the {split} split)")
    for flag in ("label_file_path", "test_label_file_path", "data_dir"):  # set from the run
        path = Path(getattr(cfg, flag)) if getattr(cfg, flag) else None
        if path is not None and not path.is_absolute() and not path.exists():
            raise DatasetError(f"{path} (the run's, relative to the folder it was trained "
                               f"from) is not in {Path.cwd()}: run from that folder or give "
                               f"--{flag}")
    return cfg


def split_label_files(cfg: EvalConfig | CompareConfig) -> list[Path]:
    """The label files of ``cfg.eval_split`` for a run on label files (docs/data.md): the
    training split is ``label_file_path``, the test split ``test_label_file_path`` or else
    ``test.txt`` beside the training file, ``all`` both."""
    training = Path(cfg.label_file_path) if cfg.label_file_path else None
    test = (Path(cfg.test_label_file_path) if cfg.test_label_file_path
            else training.with_name("test.txt"))
    if training is None and cfg.eval_split != "test":
        raise ConfigError(f"--eval_split={cfg.eval_split}: give the training split's label "
                          "file with --label_file_path (--test_label_file_path lists the "
                          "test split)")
    if cfg.eval_split != "training" and not cfg.test_label_file_path and not test.is_file():
        raise DatasetError(f"{test}: no test split beside --label_file_path={training}; "
                           "give its label file with --test_label_file_path, or "
                           "--eval_split=training")
    if cfg.eval_split == "training":
        return [training]
    if cfg.eval_split == "test" or test.resolve() == training.resolve():
        return [test]
    return [training, test]


def data_name(cfg: EvalConfig | CompareConfig) -> str:
    """The data's name in folder names and metrics.json keys: the dataset, or the label
    files' folder (with a label file's own name where it is not training.txt or test.txt,
    so that two lists in one folder keep apart)."""
    if cfg.dataset:
        return cfg.dataset
    files = split_label_files(cfg)
    odd = [f.stem for f in files if f.stem not in ("training", "test")]
    return "_".join([files[0].parent.name, *odd])


def _test_samples(cfg: EvalConfig | CompareConfig):
    if not (cfg.label_file_path or cfg.test_label_file_path):
        return resolve_samples(cfg.dataset, cfg.data_dir, cfg.eval_split)
    files = split_label_files(cfg)
    samples = [s for f in files for s in resolve_samples(label_file=f)]
    names = Counter(s.name for s in samples)
    twice = sorted(n for n, k in names.items() if k > 1)
    if twice and len(files) > 1:
        raise DatasetError(f"{files[0]} and {files[1]} both list {', '.join(twice[:3])}"
                           f"{' and more' if len(twice) > 3 else ''}: an image is either "
                           "training or test; take it out of one")
    return samples


class SetScores:
    """Vessel (and, for A/V models, artery/vein) metrics accumulated image by image: the one
    metric loop behind validation during training, :func:`evaluate` and the benchmarks.

    Args:
        task: "vessel" or "av".
        threshold: probability threshold of the vessel mask.
        whole_image: count every pixel instead of the FOV's only.
        av_by_width: also split A/V accuracy at :data:`THIN_AV_WIDTH` (``av_thin_acc``,
            ``av_thick_acc``).
        per_image_auc: add each image's own AUC-ROC and AUC-PR to :attr:`per_image` (a sort
            of its pixels: off for validation during training, on for :func:`evaluate`).

    Attributes:
        per_image: one dict per image, in update order: ``name`` and the image's own counts
            metrics (acc, se, sp, precision, f1, iou, miou), its AUCs when asked, and for A/V
            models ``av_acc`` and ``av_acc_ripav``; pixels counted as for the pooled figures.
    """

    def __init__(self, task: str = "vessel", threshold: float = 0.5, whole_image: bool = False,
                 av_by_width: bool = False, per_image_auc: bool = False):
        self.vessel = VesselMetrics(threshold=threshold, whole_image=whole_image)
        self.av = AVMetrics() if task == "av" else None
        self.ripav = RipavAVMetrics() if task == "av" else None
        self.by_width = (AVMetrics(), AVMetrics()) if task == "av" and av_by_width else None
        self.per_image_auc = bool(per_image_auc)
        self.per_image: list[dict[str, Any]] = []

    def update(self, prob: np.ndarray, target: np.ndarray, fov: np.ndarray,
               name: str | None = None) -> None:
        """``prob`` (H, W, C) with the vessel channel last, ``target`` (H, W, C) booleans;
        ``name`` labels the image's row of :attr:`per_image` (default: its number)."""
        counts = _counts(self.vessel)
        av_counts = _counts(self.av) if self.av is not None else None
        self.vessel.update(prob[..., -1], target[..., -1], fov)
        if self.av is not None:
            self.av.update(prob, target, fov)
            self.ripav.update(prob, target, fov)
        if self.by_width is not None:
            thin = vessel_width_map(target[..., -1]) <= THIN_AV_WIDTH
            inside = fov.astype(bool)
            self.by_width[0].update(prob, target, inside & thin)
            self.by_width[1].update(prob, target, inside & ~thin)
        # This image's figures: the counts it added (no second pass over its pixels).
        row: dict[str, Any] = {"name": str(len(self.per_image)) if name is None else name}
        row.update(counts_metrics(*np.subtract(_counts(self.vessel), counts).tolist()))
        if self.per_image_auc:
            p, t = prob[..., -1], target[..., -1]
            if not self.vessel.whole_image:
                inside = fov.astype(bool)
                p, t = p[inside], t[inside]
            row["auc_roc"], row["auc_pr"] = roc_pr_auc(p, t)
        if self.av is not None:
            tp, fp, tn, fn = np.subtract(_counts(self.av), av_counts).tolist()
            row["av_acc"] = counts_metrics(tp, fp, tn, fn)["acc"]
            row["av_acc_ripav"] = self.ripav.acc[-1]
        self.per_image.append(row)

    def per_image_summary(self) -> dict[str, dict[str, float]]:
        """``{"mean": {...}, "std": {...}}`` of each per-image figure across the images
        (population standard deviation; an image where a figure is undefined, e.g. Se without
        vessels, is left out of that figure's)."""
        keys = [k for k in (self.per_image[0] if self.per_image else {}) if k != "name"]
        summary: dict[str, dict[str, float]] = {"mean": {}, "std": {}}
        for key in keys:
            values = np.array([row[key] for row in self.per_image], np.float64)
            values = values[np.isfinite(values)]
            summary["mean"][key] = float(values.mean()) if values.size else float("nan")
            summary["std"][key] = float(values.std()) if values.size else float("nan")
        return summary

    def result(self) -> dict:
        result = self.vessel.result()
        if self.av is not None:
            result.update({f"av_{k}": v for k, v in self.av.result().items()})
            ripav = self.ripav.result()
            result.update({"av_acc_ripav": ripav["acc"], "av_se_ripav": ripav["se"],
                           "av_sp_ripav": ripav["sp"], "av_auc_artery": ripav["auc_artery"],
                           "av_auc_vein": ripav["auc_vein"]})
        if self.by_width is not None:
            for part, metrics in zip(("thin", "thick"), self.by_width):
                r = metrics.result()
                result.update({f"av_{part}_acc": r["acc"], f"av_{part}_pixels": r["n_pixels"]})
        return result


def _counts(metrics) -> tuple[int, int, int, int]:
    return metrics.tp, metrics.fp, metrics.tn, metrics.fn


def evaluate_set(segmenter: Segmenter, seg: SegmentationSet, task: str = "vessel",
                 whole_image: bool = False, threshold: float = 0.5, label: str = "validation"
                 ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Metrics of a model over a preprocessed set (validation during training), and the
    probability maps; ``label`` names the work in progress lines."""
    scores = SetScores(task, threshold, whole_image)
    probs = []
    # validation during training: lines only when it runs long (the heartbeat)
    for image, target, fov in progress(zip(seg.images, seg.targets, seg.fovs), label,
                                       names=seg.names, level=logging.DEBUG):
        prob = segmenter.probability_preprocessed(image) * fov[..., None]
        probs.append(prob)
        scores.update(prob, target > 0.5, fov)
    return scores.result(), probs


# --- the F1-optimal threshold ----------------------------------------------------------------

# The thresholds swept: a 0.01 grid; the margins keep a few held-out pixels from pushing the mask
# to nearly all or nothing.
THRESHOLD_GRID = tuple(round(0.05 + 0.01 * i, 2) for i in range(91))  # 0.05 ... 0.95
# A stored threshold must beat 0.5 by this much F1 on the held-out images: on two DRIVE images
# the F1 curve is flat near its top and the maximum moves by 0.1-0.2 from image to image.
MIN_THRESHOLD_GAIN = 0.005


def f1_by_threshold(scores: np.ndarray, labels: np.ndarray,
                    thresholds=THRESHOLD_GRID) -> np.ndarray:
    """Pooled F1 (Dice) of the mask ``scores >= t`` for each ``t`` of ``thresholds``.

    The positives' and negatives' scores are sorted once and counted at every threshold by a
    binary search; comparisons are in float32, as the masks of :meth:`Segmenter.segment` and
    :class:`retina_tf.metrics.ConfusionMatrix` are made, so each value equals the F1 those
    count. NaN where F1 is undefined (no vessel pixel and none predicted).
    """
    scores = np.asarray(scores, np.float32).ravel()
    labels = np.asarray(labels, bool).ravel()
    t = np.asarray(thresholds, np.float32)
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    tp = pos.size - np.searchsorted(pos, t, side="left")   # positives >= t
    fp = neg.size - np.searchsorted(neg, t, side="left")
    denominator = (2 * tp + fp + (pos.size - tp)).astype(np.float64)  # 2 TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2.0 * tp / denominator, np.nan)


def _held_out_pixels(prob: np.ndarray, target: np.ndarray, fov: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The vessel probability (last channel) and label of the pixels inside the FOV."""
    inside = fov.astype(bool)
    return prob[..., -1][inside].astype(np.float32), target[..., -1][inside] > 0.5


def threshold_choice(scores: np.ndarray, labels: np.ndarray, names: list[str],
                     thresholds=THRESHOLD_GRID, min_gain: float = MIN_THRESHOLD_GAIN
                     ) -> dict[str, Any]:
    """The F1-optimal threshold of pooled held-out pixels, as ``run.json`` stores it:
    ``{"threshold", "threshold_from": {"images", "pixels", "f1", "f1_at_0.5", "thresholds"}}``.

    F1 pooled over every pixel of the images (not each image's mean), maximised over
    ``thresholds``; of equal maxima the one nearest 0.5 wins. This is the fixed "optimal dataset
    scale" threshold of Arbelaez et al., "Contour Detection and Hierarchical Image
    Segmentation", TPAMI 2011, chosen here on held-out training images, never on the test set.
    A few held-out images choose noisily: unless the best threshold beats 0.5 by ``min_gain``
    F1 there, 0.5 is kept (``threshold_from`` records the best one and its gain).

    Raises:
        DatasetError: the pixels hold no vessel (F1 is undefined at every threshold).
    """
    labels = np.asarray(labels, bool)
    if not labels.any():
        raise DatasetError(f"the held-out images ({', '.join(names)}) have no vessel pixel "
                           "inside their FOV: no threshold can be chosen on them")
    grid = np.asarray(thresholds, np.float64)
    f1 = f1_by_threshold(scores, labels, grid)
    best = np.nanmax(f1)
    ties = np.flatnonzero(f1 >= best - 1e-12)
    i = ties[np.argmin(np.abs(grid[ties] - 0.5))]
    at_default = f1_by_threshold(scores, labels, [0.5])[0]
    info = {"images": list(names), "pixels": "inside the FOV", "f1": float(f1[i]),
            "f1_at_0.5": float(at_default),
            "thresholds": f"{grid.min():g} to {grid.max():g}, {len(grid)} steps"}
    if f1[i] - at_default < min_gain:
        info.update(best=round(float(grid[i]), 6), best_f1=float(f1[i]), f1=float(at_default),
                    kept_0_5=f"the best threshold gains less than {min_gain:g} F1")
        return {"threshold": 0.5, "threshold_from": info}
    return {"threshold": round(float(grid[i]), 6), "threshold_from": info}


def threshold_line(choice: dict[str, Any]) -> str:
    """``threshold 0.43 (F1 0.821 on the 2 held-out images; 0.815 at 0.5)``."""
    info = choice["threshold_from"]
    n = len(info["images"])
    if "kept_0_5" in info:
        best = ("0.5 is the best there" if info["best"] == 0.5 else
                f"the best, {info['best']:g}, gains less than {MIN_THRESHOLD_GAIN:g}")
        return (f"threshold 0.5 kept (F1 {info['f1_at_0.5']:.3f} on the {n} held-out "
                f"image{'' if n == 1 else 's'}; {best})")
    return (f"threshold {choice['threshold']:g} (F1 {info['f1']:.3f} on the {n} held-out "
            f"image{'' if n == 1 else 's'}; {info['f1_at_0.5']:.3f} at 0.5)")


def _held_out(seg: Segmenter, images, label: str):
    """``(name, segment, target, fov)`` for each held-out image, where ``segment()`` gives
    ``seg``'s probability maps as ``seg`` is set when called: a preprocessed
    :class:`SegmentationSet` segmented as validation during training does, or samples read and
    segmented as :func:`evaluate` does (at the inference scale; ``label`` names the progress)."""
    if isinstance(images, SegmentationSet):
        for name, image, target, fov in zip(images.names, images.images, images.targets,
                                            images.fovs):
            yield name, lambda image=image: seg.probability_preprocessed(image), target, fov
        return
    for sample in progress(list(images), label, name=lambda s: Path(s.image).name):
        data = read_sample(sample)
        yield (data.name, lambda data=data, sample=sample: seg.probability_at_inference_scale(
            data.image, data.fov, source=sample.image), target_of(data, seg.task), data.fov)


def choose_threshold(run: str | os.PathLike | Segmenter, images,
                     thresholds=THRESHOLD_GRID,
                     probabilities: list[np.ndarray] | None = None) -> dict[str, Any]:
    """The F1-optimal mask threshold of a run on its held-out images (:func:`threshold_choice`).

    Args:
        run: a run folder, a shipped model name, or a loaded :class:`Segmenter`.
        images: a preprocessed :class:`SegmentationSet` (segmented as validation during
            training does), or samples (``retina_tf.data.pipeline.resolve_samples``; read and
            segmented as :func:`evaluate` does, at the inference scale). Never test images.
        probabilities: the probability maps of a :class:`SegmentationSet` when already
            computed (:func:`evaluate_set`'s, at the end of training).

    Returns:
        ``{"threshold", "threshold_from"}``, for :func:`store_threshold`.

    Raises:
        DatasetError: a bad image or label, or no vessel pixel among them.
        ModelFileError: the run cannot be loaded.
    """
    seg = run if isinstance(run, Segmenter) else Segmenter.from_run(run)
    pixels, names = [], []
    for i, (name, segment, target, fov) in enumerate(_held_out(seg, images, "threshold")):
        prob = probabilities[i] if probabilities is not None else segment()
        pixels.append(_held_out_pixels(prob, target, fov))
        names.append(name)
    if not names:
        raise DatasetError("no held-out images to choose a threshold on")
    scores, labels = (np.concatenate(part) for part in zip(*pixels))
    return threshold_choice(scores, labels, names, thresholds)


# Flip TTA costs four times the inference: a run keeps it on only for this much held-out F1.
MIN_TTA_GAIN = 0.001


def choose_tta(run: str | os.PathLike | Segmenter, images, threshold: float | None = None,
               probabilities: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Whether a run segments with flip TTA by default: on when averaging the four flips
    raises the pooled F1 of its held-out images, at its threshold, by :data:`MIN_TTA_GAIN`
    (the flips-averaging of Ronneberger et al., MICCAI 2015 and of nnU-Net, Isensee et al.,
    Nature Methods 2021, chosen as :func:`choose_threshold` chooses).

    Args:
        run: a run folder, a shipped model name, or a loaded :class:`Segmenter`.
        images: held-out images, never test images: a preprocessed :class:`SegmentationSet`
            (as validation during training), or samples
            (``retina_tf.data.pipeline.resolve_samples``; read as :func:`evaluate` does).
        threshold: the mask threshold (None: the run's stored one).
        probabilities: the maps of a :class:`SegmentationSet` without TTA when already
            computed (:func:`evaluate_set`'s, at the end of training).

    Returns:
        ``{"tta", "tta_from": {"images", "f1", "f1_tta", "threshold", "rule"}}``, for
        :func:`store_choice`.
    """
    seg = run if isinstance(run, Segmenter) else Segmenter.from_run(run, tta=False)
    threshold = seg.threshold if threshold is None else threshold
    pixels: dict[bool, list] = {False: [], True: []}
    names, given = [], seg.tta
    try:
        for i, (name, segment, target, fov) in enumerate(_held_out(seg, images, "TTA")):
            for tta in (False, True):
                seg.tta = tta  # read by each call
                prob = probabilities[i] if probabilities is not None and not tta else segment()
                pixels[tta].append(_held_out_pixels(prob, target, fov))
            names.append(name)
    finally:
        seg.tta = given
    if not names:
        raise DatasetError("no held-out images to choose on")
    f1 = {tta: float(f1_by_threshold(*(np.concatenate(part) for part in zip(*pixels[tta])),
                                     [threshold])[0]) for tta in (False, True)}
    return {"tta": f1[True] - f1[False] >= MIN_TTA_GAIN,
            "tta_from": {"images": names, "f1": f1[False], "f1_tta": f1[True],
                         "threshold": threshold,
                         "rule": f"on when flip TTA gains {MIN_TTA_GAIN:g} F1 or more"}}


# An A/V run's evaluations, cheapest first: (name, tta, tta_transpose, av_vote).
AV_EVALUATIONS = (("once", False, False, False), ("the vote", False, False, True),
                  ("flips", True, False, False), ("flips and the vote", True, False, True),
                  ("8 views", True, True, False), ("8 views and the vote", True, True, True))


def choose_av_evaluation(run: str | os.PathLike | Segmenter, images, transpose: bool = True,
                         threshold: float | None = None) -> dict[str, Any]:
    """How an A/V run segments by default: of :data:`AV_EVALUATIONS` (flip TTA, the 8 flips and
    transposes, each with and without the linked segment vote of
    :func:`retina_tf.postprocess.vote_av_segments`), the one with the highest all-pixel A/V
    accuracy on its held-out images, a costlier one only for :data:`MIN_TTA_GAIN` or more over
    every cheaper one (RIP-AV, Dai et al., MICCAI 2024, evaluates with TTA; the vote follows
    graph-based A/V labelling, Dashtbozorg et al. 2014).

    Args:
        run, images: as :func:`choose_tta` (an A/V run; held-out images, never test images).
        transpose: also try the transposes (for runs trained with ``--rot90``).
        threshold: the vessel mask the vote cuts into segments (None: the run's).

    Returns:
        ``{"tta", "tta_transpose", "av_vote", "tta_from": {"images", "av_acc" (once),
        "av_acc_chosen", "chosen" (its name), "evaluations" (each one's accuracy), "rule"}}``,
        for :func:`store_choice`.
    """
    seg = run if isinstance(run, Segmenter) else Segmenter.from_run(
        run, tta=False, tta_transpose=False, av_vote=False)
    threshold = seg.threshold if threshold is None else threshold
    candidates = [e for e in AV_EVALUATIONS if transpose or not e[2]]
    views = dict.fromkeys((tta, turned) for _, tta, turned, _ in candidates)  # the passes
    metrics = {name: AVMetrics() for name, *_ in candidates}
    names, given = [], (seg.tta, seg.tta_transpose, seg.av_vote)
    try:
        for name, segment, target, fov in _held_out(seg, images, "A/V evaluation"):
            seg.av_vote = False  # the vote is applied here, to each pass's probabilities
            for tta, turned in views:
                seg.tta, seg.tta_transpose = tta, turned
                prob = segment()
                if prob.shape[-1] != 3:
                    raise ConfigError("an A/V evaluation is chosen for artery/vein models; "
                                      "this one segments vessels only (choose_tta)")
                for evaluation, *_, vote in (e for e in candidates if e[1:3] == (tta, turned)):
                    voted = vote_av_segments(prob, link=seg.av_link, threshold=threshold) \
                        if vote else prob
                    metrics[evaluation].update(voted, np.asarray(target) > 0.5, fov)
            names.append(name)
    finally:
        seg.tta, seg.tta_transpose, seg.av_vote = given
    if not names:
        raise DatasetError("no held-out images to choose on")
    acc = {name: float(m.result()["acc"]) for name, m in metrics.items()}
    chosen = candidates[0]
    for i, candidate in enumerate(candidates[1:], 1):  # costlier: beats each cheaper by the gain
        if all(acc[candidate[0]] - acc[cheaper[0]] >= MIN_TTA_GAIN
               for cheaper in candidates[:i]):
            chosen = candidate
    return {"tta": chosen[1], "tta_transpose": chosen[2], "av_vote": chosen[3],
            "tta_from": {"images": names, "av_acc": acc["once"], "av_acc_chosen": acc[chosen[0]],
                         "chosen": chosen[0], "evaluations": acc,
                         "rule": "the most accurate (all-pixel A/V accuracy); a costlier "
                                 f"evaluation only for {MIN_TTA_GAIN:g} or more over each "
                                 "cheaper one"}}


def tta_choice_line(choice: dict[str, Any]) -> str:
    """``flip TTA made the run's default (F1 0.8187 against 0.8163 once, on the 2 held-out
    images)``, for training's log."""
    info = choice["tta_from"]
    n = len(info["images"])
    if "av_acc" in info and info["chosen"] == "once":  # nothing beat it by the gain
        best = max((k for k in info["evaluations"] if k != "once"),
                   key=info["evaluations"].get, default=None)
        than = (f"; the best other, {best}, {info['evaluations'][best]:.4f}: less than "
                f"{MIN_TTA_GAIN:g} more" if best else "")
        return (f"once (no TTA, no vote) kept as the run's default (A/V accuracy "
                f"{info['av_acc']:.4f}{than}, on the {n} held-out image{'' if n == 1 else 's'})")
    if "av_acc" in info:  # choose_av_evaluation's
        return (f"{info['chosen']} made the run's default (A/V accuracy "
                f"{info['av_acc_chosen']:.4f} against {info['av_acc']:.4f} once, on the {n} "
                f"held-out image{'' if n == 1 else 's'})")
    return (f"flip TTA {'made' if choice['tta'] else 'not made'} the run's default (F1 "
            f"{info['f1_tta']:.4f} against {info['f1']:.4f} once, on the {n} held-out "
            f"image{'' if n == 1 else 's'})")


def store_choice(run_dir: str | os.PathLike, choice: dict[str, Any]) -> None:
    """Writes a :func:`choose_threshold` or :func:`choose_tta` result into
    ``run_dir/run.json`` (atomically): from then on evaluate, predict, make_error_maps, compare
    and export use it unless ``--threshold`` (``--tta`` / ``--notta``) is given."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist: {run_dir} is not a run folder")
    info = json.loads(path.read_text())
    info.update(choice)
    atomic_write_text(path, to_json(info))


def store_threshold(run_dir: str | os.PathLike, choice: dict[str, Any]) -> None:
    """:func:`store_choice` of a :func:`choose_threshold` result."""
    store_choice(run_dir, {key: choice[key] for key in ("threshold", "threshold_from")})


def images_seen_in_training(run_info: dict, names: list[str], dataset: str | None = None,
                            split: str | None = None) -> tuple[list[str], bool]:
    """Which of the images ``names`` (of ``dataset``'s ``split``) a run trained on or chose its
    checkpoint and threshold on: by run.json's ``training_images``, ``validation_images`` and
    ``threshold_from`` names where ``dataset`` holds the photographs of one the run trained on
    (or either is a label file's: unknown), and, for a run that records no training names
    (trained before they were recorded), by its dataset's training split, all seen.

    Returns:
        (the names seen, whether ``split`` is ``all`` of the dataset the run trained on without
        names: its training half is seen, whichever names those are).
    """
    data = run_info.get("data") or {}
    trained = run_info.get("dataset")
    whole_split = bool(not data.get("training_images") and trained and dataset
                       and _photographs_of(trained) == _photographs_of(dataset))
    if whole_split and split == "training":
        return list(names), False
    seen_by = (set(data.get("training_images") or []) | set(data.get("validation_images") or [])
               | set((run_info.get("threshold_from") or {}).get("images") or []))
    sources = {trained} | {e.split(":", 1)[0] for e in data.get("extra_data") or []}
    if dataset and trained and _photographs_of(dataset) not in {_photographs_of(s)
                                                               for s in sources if s}:
        seen_by = set()  # a synthetic 22_training is not DRIVE's
    return [n for n in names if n in seen_by], whole_split and split == "all"


# Datasets that are other labels of one set of photographs: RITE is DRIVE's, HRF-AV HRF's.
_SAME_PHOTOGRAPHS = {"rite": "drive", "hrf_av": "hrf"}


def _photographs_of(dataset: str) -> str:
    key = dataset_key(dataset)
    return _SAME_PHOTOGRAPHS.get(key, key)


def trained_on_by_pixels(run_info: dict, image: np.ndarray) -> str | None:
    """The name of the image with ``image``'s pixels that a run trained on or chose its
    checkpoint and threshold on (run.json's ``image_digests``,
    :func:`~retina_tf.data.io.pixel_digest`): a test photograph copied into the training data
    under another name or format; None: none (or a run that records no digests)."""
    digests = (run_info.get("data") or {}).get("image_digests")
    return digests.get(pixel_digest(image)) if digests else None


class SeenInTraining:
    """Which of the images to be scored a run trained on or chose its checkpoint and threshold
    on: by their names before scoring (:func:`images_seen_in_training`), by their pixels as each
    is read (:meth:`check`, :func:`trained_on_by_pixels`): a test photograph copied into the
    training data under another name or format."""

    def __init__(self, seg: Segmenter, names: list[str], dataset: str | None = None,
                 split: str | None = None):
        self.seg, self.total, self.split = seg, len(names), split
        self.by_name, self.half = images_seen_in_training(seg.run_info, names, dataset, split)
        self.twins: list[tuple[str, str]] = []  # (name, the name it was trained on as)

    def name_warning(self) -> str | None:
        """A warning of the images seen by their names (or the half of an ``all`` split)."""
        run = self.seg.run_dir.name
        if self.half:
            return (f"warning: {run} trained on {self.seg.run_info['dataset']}'s training "
                    f"split, which the '{self.split}' split includes: its scores do not measure "
                    "it on new images")
        return _seen_warning(self.by_name, self.total, "have the names of images "
                             f"{run} trained on or chose its checkpoint and threshold on")

    def check(self, name: str, image: np.ndarray) -> None:
        """Notes a read image whose pixels the run trained on under another name."""
        if name not in self.by_name and (twin := trained_on_by_pixels(self.seg.run_info, image)):
            self.twins.append((name, twin))

    def pixel_warning(self) -> str | None:
        """A warning of the images :meth:`check` found, each with the name it was trained on as."""
        listed = [name if name == twin else f"{name} as {twin}" for name, twin in self.twins]
        return _seen_warning(listed, self.total, "are, pixel for pixel, photographs "
                             f"{self.seg.run_dir.name} trained on or chose its checkpoint and "
                             "threshold on")

    @property
    def names(self) -> list[str]:
        """Every image seen, by name or by pixels."""
        return sorted({*self.by_name, *(name for name, _ in self.twins)})


def _seen_warning(listed: list[str], total: int, what: str) -> str | None:
    if not listed:
        return None
    names = ", ".join(listed[:3]) + (f" and {len(listed) - 3} more" if len(listed) > 3 else "")
    return (f"warning: {len(listed)} of the {total} images ({names}) {what}: their scores do "
            "not measure it on new images")


def _warn_of_estimate(data, sample) -> None:
    """The warnings a read sample's estimated FOV calls for (none for a given mask)."""
    if data.fov_estimated:
        for warning in estimate_warnings(data.image, data.fov, str(sample.image)):
            _warn(warning)


def _probability_as_planned(seg: Segmenter, data, source: str | os.PathLike, label: str,
                            threshold: float) -> tuple[np.ndarray, ScalePlan]:
    """A read sample's probabilities at ``seg``'s inference scale, and the plan: its resize
    logged (after ``label``) and a too small enlargement warned of, as evaluate and compare
    score it."""
    plan = seg.scale_plan(data.image, data.fov)
    if plan.rescaled:
        log.info(f"{label} {data.name}: {plan.describe()}")
    _warn(plan.warning(source))
    return seg.probability_at_inference_scale(data.image, data.fov, plan, threshold,
                                              source), plan


def _vote_words(seg: Segmenter) -> str:
    if not seg.av_vote:
        return ""
    linked = f", linked across junctions (strength {seg.av_link:g})" if seg.av_link else ""
    return f", one A/V decision per vessel segment{linked}"


@takes(EvalConfig)
def evaluate(cfg: EvalConfig) -> dict:
    """Segments the test split, prints confusion matrix and metrics, writes metrics.json (the
    threshold used and where it came from, the pooled figures, each image's and their mean and
    standard deviation), per_image.csv and, with
    ``--visualize``, per-image PNGs (errors over the photograph), a contact sheet of every
    image and ROC / PR curves.

    Stops at the first bad image (the metrics need every one). The output folder is created
    with its first file; in a ``--output_dir`` only files retina_tf wrote there are replaced,
    others need ``--overwrite`` (see :class:`OutputFolder`).

    Raises:
        ConfigError: an output that would replace a file retina_tf did not write; --task=av
            with a vessel model (a bad --threshold the config itself refuses).
        DatasetError: a missing or bad test image, label or mask, or an image too small.
        ModelFileError: the model cannot be loaded.
        RunBusyError: a training writes the run.
    """
    seg = load_segmenter(cfg)
    with reading_run(seg.run_dir):  # no training --overwrite under an evaluation's feet
        return _evaluate(cfg, seg)


def _evaluate(cfg: EvalConfig, seg: Segmenter) -> dict:
    cfg = _with_the_runs_data(cfg, seg.run_dir, cfg.eval_split)
    samples = _test_samples(cfg)
    name = data_name(cfg)
    if cfg.output_dir:
        out_dir = Path(cfg.output_dir)
    elif is_shipped(seg.run_dir):
        out_dir = Path(cfg.logdir) / f"{seg.run_dir.name}_eval_{name}_{cfg.eval_split}"
    else:
        out_dir = seg.run_dir / f"eval_{name}_{cfg.eval_split}"
    # The default folders are retina_tf's own; a --output_dir may hold the user's files.
    out = OutputFolder(out_dir, cfg.overwrite, owned=not cfg.output_dir)
    task = seg.task
    if cfg.task == "av" and task != "av":
        raise ConfigError(f"--task=av: {seg.run_dir.name} segments vessels only; give an "
                          "artery/vein model (e.g. --model=ripav_rite) or leave --task out")
    no_av_labels = any(s.av is None for s in samples)
    if cfg.task == "av" and no_av_labels:
        raise ConfigError(f"--task=av: {name} has no artery/vein labels; give an A/V dataset in "
                          "its layout (e.g. --dataset=rite; label files carry vessel labels "
                          "only), or leave --task out to score the vessel map")
    vessel_channel_only = task == "av" and (cfg.task == "vessel" or no_av_labels)
    if vessel_channel_only:  # an A/V model asked for, or with labels for, vessels only
        task = "vessel"
    outputs = _evaluation_outputs([s.name for s in samples], task, cfg.visualize)
    out.check(outputs)
    sheet_rows: list = []
    log.info(f"evaluating {seg.run_dir} on {len(samples)} {name} {cfg.eval_split} images "
             f"({seg.describe_inference()}{_vote_words(seg)}; counting "
             f"{'every pixel' if cfg.whole_image_metrics else 'pixels inside the FOV'})")
    if vessel_channel_only:
        why = f"{name} has no artery/vein labels" if no_av_labels else "--task=vessel"
        log.info(f"{why}: the vessel map of {seg.run_dir.name} is scored")
    seen = SeenInTraining(seg, [s.name for s in samples], cfg.dataset, cfg.eval_split)
    _warn(seen.name_warning())
    threshold, threshold_source = resolve_threshold(seg, cfg.threshold)
    if line := tta_line(seg, cfg):
        log.info(line)
    log.info(seg.describe_inference_scale())
    factors: list[float] = []  # each image's resize factor, for per_image.csv and metrics.json
    scores = SetScores(task, threshold, cfg.whole_image_metrics, av_by_width=True,
                       per_image_auc=True)
    # all pictures, tables and metrics.json, or none: a bad image late in the split leaves
    # an earlier evaluation's files as they were
    with out.all_or_nothing():
        for sample in progress(samples, "evaluate", name=lambda s: Path(s.image).name):
            data = read_sample(sample)
            seg.check_image_size(data.image, sample.image)
            _warn_of_estimate(data, sample)
            seen.check(data.name, data.image)
            target = target_of(data, task) > 0.5
            # Outside the FOV the prediction is background, as in the shipped masks and papers; a
            # photograph of another scale is resized near the training scale, as predict does.
            prob, plan = _probability_as_planned(seg, data, sample.image, name, threshold)
            if vessel_channel_only:
                prob = prob[..., -1:]  # artery, vein, vessel
            prob = prob * data.fov[..., None]
            scores.update(prob, target, data.fov, name=data.name)
            factors.append(plan.factor)
            if cfg.visualize:
                sheet_rows.append(_write_pictures(out, data, prob, target, threshold, task,
                                                  scores.per_image[-1]))
        result = scores.result()
        _warn(seen.pixel_warning())
        log.info("")
        log.info(format_table(result))
        if scores.av is not None:
            log.info("\nArtery/vein on ground-truth vessel pixels (crossings and uncertain "
                     "excluded; Se: arteries right, Sp: veins right)")
            log.info(format_table(scores.av.result(), class_names=("vein", "artery")))
            log.info(f"RIP-AV's protocol (per image on ground-truth vessel pixels, cleaned masks, "
                     f"unclassified pixels not counted): accuracy {result['av_acc_ripav']:.4f}, "
                     f"Se {result['av_se_ripav']:.4f}, Sp {result['av_sp_ripav']:.4f}; AUC artery "
                     f"{result['av_auc_artery']:.4f}, vein {result['av_auc_vein']:.4f}")
            log.info(f"A/V accuracy on vessels up to 3 px wide: {result['av_thin_acc']:.4f} "
                     f"({result['av_thin_pixels']} px); wider: {result['av_thick_acc']:.4f} "
                     f"({result['av_thick_pixels']} px)")
        per_image = scores.per_image_summary()
        log.info(_per_image_line(per_image, len(samples), task))
        for row, factor in zip(scores.per_image, factors):
            row["scale"] = factor
        out.write_text(PER_IMAGE_CSV, per_image_csv(scores.per_image, task))
        if cfg.visualize:
            out.save_png(CONTACT_SHEET, visualize.contact_sheet(sheet_rows, _sheet_columns(task),
                                                                SHEET_ROW_HEIGHT))
            pixel_scores, labels = scores.vessel.scores_and_labels()
            out.save_curves(pixel_scores, labels, result["auc_roc"], result["auc_pr"],
                            title=f"{seg.run_dir.name} on {name} {cfg.eval_split}")
        report = {"run": str(seg.run_dir), "model": seg.run_info.get("model"),
                  "dataset": name, "split": cfg.eval_split, "images": len(samples),
                  "data_dir": str(cfg.data_dir) if cfg.dataset and cfg.data_dir else None,
                  "label_files": None if cfg.dataset else [
                      str(f) for f in split_label_files(cfg)],
                  "counting": "whole_image" if cfg.whole_image_metrics else "fov",
                  "seen_in_training": seen.names,
                  "inference": seg.inference, **seg.inference_record(), "tta": seg.tta,
                  "tta_transpose": seg.tta and seg.tta_transpose, "av_vote": seg.av_vote,
                  "av_link": seg.av_link if seg.av_vote else None,
                  "threshold": threshold, "threshold_source": threshold_source,
                  "inference_scale": seg.inference_scale, "precision": seg.precision,
                  "training_fov_diameter": seg.run_info.get("fov_diameter"),
                  "metrics": result, "per_image_mean": per_image["mean"],
                  "per_image_std": per_image["std"], "per_image": scores.per_image,
                  "environment": environment()}
        _warn(_other_data_warning(out.path / "metrics.json", report))
        out.write_text("metrics.json", to_json(report))
    if not is_shipped(seg.run_dir):
        # keyed as its folder eval_<data>_<split>: a training split is not a test
        try:
            update_metrics_json(seg.run_dir, {f"eval_{name}_{cfg.eval_split}": report})
        except OSError as err:  # a read-only run (OutputError): the results are in out_dir
            if not cfg.output_dir or err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            log.warning(f"warning: {seg.run_dir} is read-only: this evaluation is not added "
                        f"to its metrics.json ({err.strerror}); it is in {out_dir}")
    av_words = ("; A/V on the true vessels (_av_errors.png): red artery, blue vein as "
                "predicted, green the wrong class, white crossing or uncertain"
                if task == "av" else "")
    _warn(_earlier_pictures_warning(out_dir, outputs))
    log.info(f"\nwrote {out_dir / 'metrics.json'}, {PER_IMAGE_CSV}" +
             (f" and pictures (probability, mask, overlay on the photograph: green TP, red FP, "
              f"blue FN{av_words}; {CONTACT_SHEET}, roc_curve.png, pr_curve.png) in {out_dir}"
              if cfg.visualize else f" in {out_dir}"))
    return report


def _picture_names(name: str, task: str) -> list[str]:
    """The pictures ``evaluate --visualize`` writes for the image ``name``."""
    suffixes = ["_prob.png", "_mask.png", "_overlay.png"]
    if task == "av":
        suffixes += ["_av_errors.png", "_av_truth.png"]
    return [name + s for s in suffixes]


def _other_data_warning(path: Path, report: dict) -> str | None:
    """A warning when ``path``, the metrics.json this evaluation replaces, scored the same
    model's split of another copy of the data (two copies of a dataset evaluated into one
    default folder: the first was replaced without a word)."""
    try:
        before = json.loads(path.read_text())
        old = (before.get("data_dir"), before.get("label_files"))
    except (OSError, ValueError, AttributeError):
        return None
    new = (report["data_dir"], report["label_files"])
    if old == (None, None) or old == new:
        return None
    return (f"warning: {path} held the evaluation of {old[0] or ', '.join(old[1] or [])}; it "
            f"is replaced by this one of {new[0] or ', '.join(new[1] or [])} (--output_dir "
            "keeps both)")


def _earlier_pictures_warning(out_dir: Path, written: list[str]) -> str | None:
    """A warning of the pictures an earlier evaluation wrote into ``out_dir`` that this one did
    not replace (a run without --visualize, other images): beside this one's metrics.json they
    would pass for its own. Only retina_tf's files (the manifest) are counted; a folder that
    predict wrote too keeps its photographs' pictures out of it."""
    listed = read_manifest(out_dir) - set(written)
    evaluations = ("_av_errors.png", "_av_truth.png") + (
        () if PREDICTIONS_CSV in listed else ("_prob.png", "_mask.png", "_overlay.png"))
    stale = sorted(n for n in listed if (n in (CONTACT_SHEET, *CURVE_FILES)
                                         or n.endswith(evaluations))
                   and (out_dir / n).is_file())
    if not stale:
        return None
    return (f"warning: {out_dir} also holds {len(stale)} pictures of an earlier evaluation "
            f"(e.g. {stale[0]}) that this one did not write: "
            f"{'those of other images, ' if CONTACT_SHEET in written else ''}not of these "
            "figures; --visualize writes this evaluation's, another --output_dir keeps them "
            "apart")


def _evaluation_outputs(names: list[str], task: str, pictures: bool) -> list[str]:
    """The files evaluate writes: metrics.json, per_image.csv and, with pictures, per-image
    PNGs, the contact sheet and curves."""
    if not pictures:
        return ["metrics.json", PER_IMAGE_CSV]
    return ["metrics.json", PER_IMAGE_CSV, CONTACT_SHEET, *CURVE_FILES] + [
        f for n in names for f in _picture_names(n, task)]


# The per-image table and the contact sheet of ``evaluate``.
PER_IMAGE_CSV = "per_image.csv"
CONTACT_SHEET = "contact_sheet.png"
PER_IMAGE_COLUMNS = ("f1", "auc_roc", "se", "sp", "acc")
AV_PER_IMAGE_COLUMNS = ("av_acc", "av_acc_ripav")
SHEET_ROW_HEIGHT = 256  # px: a DRIVE test split's sheet stays about 750 x 5800 px
_COLUMN_TITLES = {"f1": "F1", "auc_roc": "AUC-ROC", "se": "Se", "sp": "Sp", "acc": "Acc",
                  "av_acc": "A/V acc", "av_acc_ripav": "A/V acc (RIP-AV)"}


def per_image_columns(task: str) -> tuple[str, ...]:
    """The figures of ``per_image.csv`` (after ``name``) for a model of ``task``."""
    return PER_IMAGE_COLUMNS + (AV_PER_IMAGE_COLUMNS if task == "av" else ())


def per_image_csv(rows: list[dict[str, Any]], task: str) -> str:
    """:attr:`SetScores.per_image` as CSV text: ``name`` and :func:`per_image_columns`, one
    line per image (an undefined figure, e.g. Se of an image without vessels, is ``nan``),
    and ``scale`` (the resize factor it was segmented at) when the rows hold it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = per_image_columns(task) + (("scale",) if rows and "scale" in rows[0] else ())
    writer.writerow(("name",) + columns)
    for row in rows:
        writer.writerow([row["name"]] + [f"{float(row[c]):.6f}" for c in columns])
    return buffer.getvalue()


def _per_image_line(summary: dict[str, dict[str, float]], images: int, task: str) -> str:
    figures = ", ".join(f"{_COLUMN_TITLES[k]} {summary['mean'][k]:.4f} "
                        f"(sd {summary['std'][k]:.4f})" for k in per_image_columns(task))
    return (f"\nPer image (mean and standard deviation over {images} "
            f"image{'' if images == 1 else 's'}): {figures}")


def _sheet_columns(task: str) -> list:
    errors = visualize.legend(("TP", visualize.TP_COLOUR), ("FP", visualize.FP_COLOUR),
                              ("FN", visualize.FN_COLOUR), prefix="errors: ")
    if task == "av":
        return ["photograph", visualize.legend(("artery", visualize.ARTERY_COLOUR),
                                               ("vein", visualize.VEIN_COLOUR),
                                               prefix="predicted: "),
                errors, visualize.legend(("artery", visualize.ARTERY_COLOUR),
                                         ("vein", visualize.VEIN_COLOUR),
                                         ("wrong", visualize.TP_COLOUR),
                                         ("crossing", visualize.UNCERTAIN_COLOUR),
                                         prefix="A/V: ")]
    return ["photograph", visualize.legend(("vessel", visualize.VESSEL_COLOUR),
                                           prefix="predicted: "), errors]


def _write_pictures(out: OutputFolder, data, prob: np.ndarray, target: np.ndarray,
                    threshold: float, task: str, scores: dict[str, Any]) -> tuple:
    """Writes ``evaluate --visualize``'s pictures of one image; returns its contact-sheet row
    (title and thumbnails, kept small: the sheet is built after the last image)."""
    out.claim(_picture_names(data.name, task))
    p = prob[..., -1]
    pred = p >= threshold
    errors = visualize.overlay(pred, target[..., -1], data.fov, photo=data.image)
    out.save_png(f"{data.name}_prob.png", visualize.probability_image(p))
    out.save_png(f"{data.name}_mask.png", visualize.mask_image(pred))
    out.save_png(f"{data.name}_overlay.png", errors)
    title = f"{data.name}   F1 {scores['f1']:.4f}   AUC-ROC {scores['auc_roc']:.4f}"
    if task == "av":
        av_errors = visualize.av_error_image(prob, target, photo=data.image)
        out.save_png(f"{data.name}_av_errors.png", av_errors)
        out.save_png(f"{data.name}_av_truth.png", visualize.av_label_image(target))
        pictures = [data.image, visualize.av_image(prob, threshold, photo=data.image), errors,
                    av_errors]
        title += f"   A/V acc {scores['av_acc']:.4f}"
    else:
        pictures = [data.image, visualize.vessel_overlay(data.image, p), errors]
    return title, [visualize.to_height(x, SHEET_ROW_HEIGHT) for x in pictures]


def _warn(message: str | None) -> None:
    if message:
        log.warning(message)


def _has_image_suffix(name: str) -> bool:
    """An image file's extension (:data:`IMAGE_SUFFIXES`), or the ``.gz`` of one."""
    return os.path.splitext(name.lower().removesuffix(".gz"))[1] in IMAGE_SUFFIXES


def _input_stem(path: Path) -> str:
    """A photograph's name less its image extension; the whole name where it has none (a DICOM
    file named by a UID, ``1.2.840.1.7``, keeps its last part)."""
    return file_stem(path) if _has_image_suffix(path.name) else path.name


def _image_files(folder: Path) -> list[Path]:
    """The image files of ``folder``: by extension (``.gz`` of one too), and DICOM files by
    their content whatever their names (``IM000001``, a UID), a DICOM CD's index ``DICOMDIR``
    left out; hidden files left out. A broken link named as an image is one, to be reported
    as a failure rather than passed over."""
    def is_image(p: Path) -> bool:
        if not p.is_file():
            return p.is_symlink() and not p.exists() and _has_image_suffix(p.name)
        return _has_image_suffix(p.name) or (p.name.upper() != "DICOMDIR"
                                             and is_dicom_file(p))
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_image(p))


def list_inputs(path: Path, recursive: bool = False, skip: Path | None = None) -> list[Path]:
    """The images to segment: ``path`` itself, or the image files of the folder ``path`` less
    FOV masks (names ending in ``_mask``) and the files retina_tf wrote there (its manifest);
    with ``recursive``, of the folders inside it too (:func:`input_folders`).

    Raises:
        DatasetError: when ``path`` does not exist or the folder yields no image; the message
            says what the folder's image files were taken for.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or folder")
    if recursive:
        return _tree_inputs(path, skip)
    inputs, masks, outputs = _folder_images(path)
    folders = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if folders:
        log.info(f"{len(folders)} subfolder(s) not searched: {', '.join(folders[:3])}"
                 f"{' ...' if len(folders) > 3 else ''} (give each as --input, or --recursive)")
    if inputs:
        if masks:
            log.info(f"{len(masks)} file(s) ending in '_mask' taken for FOV masks, not "
                     f"segmented: {', '.join(p.name for p in masks[:3])}"
                     f"{' ...' if len(masks) > 3 else ''} "
                     f"(the FOV is estimated unless --fov={path} is given)")
        return inputs
    if not masks and not outputs:
        raise DatasetError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, "
                           "their .gz, and DICOM files)")
    kinds = [f"{len(masks)} end in '_mask' (taken for FOV masks)"] if masks else []
    if outputs:
        kinds.append(f"{outputs} are retina_tf outputs (listed in {MANIFEST_NAME})")
    raise DatasetError(f"{path}: no images to segment: of its {len(masks) + outputs} image files, "
                       f"{' and '.join(kinds)}; put the photographs there, or rename any whose "
                       "name ends in '_mask'")


def input_folders(root: Path, skip: Path | None = None) -> list[Path]:
    """``root`` and every folder inside it, each before the folders inside it and in name
    order, less hidden ones and ``skip`` (an output folder inside ``root``) with their
    contents; links to folders are not followed (a link to a parent would never end)."""
    skip = skip.resolve() if skip else None
    found = []
    for folder, subfolders, _ in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")
                               and (Path(folder) / d).resolve() != skip)
        found.append(Path(folder))
    return found


def _folder_images(folder: Path) -> tuple[list[Path], list[Path], int]:
    """The image files of ``folder`` (:func:`_image_files`) as photographs and FOV masks (names
    ending in ``_mask``), and how many others are retina_tf's outputs (its manifest)."""
    files = _image_files(folder)
    ours = read_manifest(folder)
    theirs = [p for p in files if p.name not in ours]
    return ([p for p in theirs if not _is_mask_name(p)], [p for p in theirs if _is_mask_name(p)],
            len(files) - len(theirs))


def _tree_inputs(root: Path, skip: Path | None) -> list[Path]:
    """:func:`list_inputs` of ``root`` and the folders inside it."""
    inputs, masks = [], []
    for folder in input_folders(root, skip):
        photographs, its_masks, _ = _folder_images(folder)
        inputs += photographs
        masks += its_masks
    if masks:
        log.info(f"{len(masks)} file(s) ending in '_mask' taken for FOV masks, not segmented: "
                 f"{', '.join(str(p.relative_to(root)) for p in masks[:3])}"
                 f"{' ...' if len(masks) > 3 else ''}")
    if not inputs:
        raise DatasetError(f"{root}: no images to segment in it or the folders inside it (looked "
                           f"for {', '.join(IMAGE_SUFFIXES)}, their .gz, and DICOM files, not "
                           "ending in '_mask' and not retina_tf's outputs)")
    return inputs


# What a FOV mask's name adds to its photograph's stem in a --fov folder: DRIVE's, and
# bin/preprocess.py's fov/ folder's.
FOV_MASK_ENDS = ("_mask", "_fov")


def _is_mask_name(path: Path) -> bool:
    """A FOV mask's name, as :func:`find_fov_mask` looks for it: ``<stem>_mask.<ext>``."""
    return file_stem(path).lower().endswith("_mask")


def find_fov_mask(image_path: Path, candidates: list[Path], frame_stem: str | None = None
                  ) -> Path:
    """The FOV mask of ``image_path`` among ``candidates`` (the files of the ``--fov`` folder):
    the one whose stem is the image's stem or the stem + ``_mask`` (DRIVE: ``01_test.tif`` ->
    ``01_test_mask.gif``) or + ``_fov`` (``bin/preprocess.py``'s ``fov/``). Exact stems only:
    image ``1.png`` never takes ``10_mask.png``. A frame or page of a file of several
    (``frame_stem``, its outputs' base: ``IM0001_frame2``) takes a mask of its own name first,
    else its file's.

    Raises:
        DatasetError: when no candidate matches, or several do (both are named).
    """
    stems = [*([frame_stem] if frame_stem else []), _input_stem(image_path)]
    for stem in stems:
        names = (stem, *(stem + end for end in FOV_MASK_ENDS))
        matches = [p for p in candidates
                   if file_stem(p) in names and p.resolve() != image_path.resolve()]
        if matches:
            break
    folder = candidates[0].parent if candidates else "the --fov folder"
    if len(matches) > 1:
        raise DatasetError(f"{image_path}: several FOV masks match in {folder}: "
                           f"{', '.join(p.name for p in matches)}; keep one, or give the mask "
                           "file itself with --fov")
    if not matches:
        names = " or ".join(f"{stem}.<ext>" for stem in stems)
        ends = " or ".join(FOV_MASK_ENDS)
        raise DatasetError(f"{image_path}: no FOV mask for it in {folder} (looked for {names}, "
                           f"also with {ends} before the .<ext>); add it, or leave out --fov to "
                           "have the FOV estimated")
    return matches[0]


def _fov_source(fov_arg: str | None, inputs: list[Path] = ()) -> Path | list[Path] | None:
    """``--fov`` as one mask file for every image, or the image files of a folder less the
    photographs being segmented (``inputs``: the folder may be theirs) and retina_tf's outputs
    there (its ``<stem>_mask.png`` is a vessel mask, not a FOV)."""
    if not fov_arg:
        return None
    fov_path = Path(fov_arg)
    if fov_path.is_dir():
        skip = {p.resolve() for p in inputs}
        ours = read_manifest(fov_path)
        files = [p for p in _image_files(fov_path)
                 if p.name not in ours and p.resolve() not in skip]
        if not files:
            raise DatasetError(f"--fov={fov_arg}: the folder holds no image files "
                               f"({', '.join(IMAGE_SUFFIXES)})")
        return files
    if not fov_path.is_file():
        raise DatasetError(f"--fov={fov_arg}: no such file or folder")
    return fov_path


def _mirrored(fov_arg: str | None, rel: Path) -> str | None:
    """``--fov`` for the photographs of the folder ``rel`` under ``--input`` (``--recursive``):
    a mask file serves all; a folder of masks is read at the same place under it."""
    if not fov_arg or not rel.parts or Path(fov_arg).is_file():
        return fov_arg
    return str(Path(fov_arg) / rel)


def _folder_fov_source(fov_arg: str | None, rel: Path, inputs: list[Path]
                       ) -> Path | list[Path] | DatasetError | None:
    """:func:`_fov_source` of the folder ``rel`` under ``--input``; for a subfolder
    (``--recursive``) whose masks are missing, the error, which its photographs are skipped
    with (it stopped the whole run before any photograph)."""
    try:
        return _fov_source(_mirrored(fov_arg, rel), inputs)
    except DatasetError as err:
        if not rel.parts:
            raise
        return err


def _fov_for(photo: Photograph, image: np.ndarray,
             source: Path | list[Path] | DatasetError | None) -> tuple[np.ndarray, Path | None]:
    """The FOV of one photograph: the given mask, the matching mask of the ``--fov`` folder (a
    frame of a file of several: one of its own name first, :func:`find_fov_mask`), or an
    estimate (with a warning on stderr when the estimate looks wrong); and its file, if any."""
    if isinstance(source, DatasetError):  # its folder's masks are missing
        raise source
    if source is None:
        fov = estimate_fov(image)
        for warning in estimate_warnings(image, fov, photo.label):
            _warn(warning)
        return fov, None
    frame_stem = photo.base(_input_stem(photo.path)) if photo.index is not None else None
    mask_path = (find_fov_mask(photo.path, source, frame_stem) if isinstance(source, list)
                 else source)
    fov = read_fov_mask(mask_path)
    if fov.shape != image.shape[:2]:
        raise DatasetError(f"{photo.label}: its FOV mask {mask_path} is {fov.shape[1]}x"
                           f"{fov.shape[0]}, the image {image.shape[1]}x{image.shape[0]}")
    return fov, mask_path


class Photograph(NamedTuple):
    """One photograph for :func:`predict`: a file, or one frame of a DICOM file or page of a
    TIFF that holds several (``index``, 0 first, of ``count`` ``kind``)."""

    path: Path
    index: int | None = None
    count: int = 1
    kind: str = ""  # "frames", "pages"

    @property
    def name(self) -> str:
        """The file's name, and the frame's or page's number (1 first) in a file of several."""
        if self.index is None:
            return self.path.name
        return f"{self.path.name} {self.kind[:-1]} {self.index + 1}"

    @property
    def label(self) -> str:
        """How lines and the table name it: the path, and ``(frame 2 of 3)``."""
        if self.index is None:
            return str(self.path)
        return f"{self.path} ({self.kind[:-1]} {self.index + 1} of {self.count})"

    def base(self, stem: str) -> str:
        """Its outputs' base name from its file's (``IM0001_frame2``, ``pair_page1``; numbers
        of as many digits as the file's last, so that they sort)."""
        if self.index is None:
            return stem
        return f"{stem}_{self.kind[:-1]}{self.index + 1:0{len(str(self.count))}d}"


def _frame(photo: Photograph) -> int | str:
    """Its :data:`PREDICTIONS_CSV` ``frame``: its number in a file of several, 1 first."""
    return "" if photo.index is None else photo.index + 1


def photographs(path: Path) -> list[Photograph]:
    """The photographs of one input file: one per frame of a DICOM file or page of a TIFF
    that holds several (:func:`~retina_tf.data.io.picture_count`), else the file."""
    count, kind = picture_count(path)
    if count == 1:
        return [Photograph(path)]
    return [Photograph(path, i, count, kind) for i in range(count)]


def output_names(paths: list[Path] | list[Photograph]) -> dict:
    """The base name of each input's outputs: its stem, or its whole file name where stems
    clash (``a.png`` and ``a.jpg`` write ``a.png_prob.png`` and ``a.jpg_prob.png``) or it has
    no image extension (a DICOM file named by a UID, ``1.2.840.1.7``); a frame or page of a
    file of several adds its number (:meth:`Photograph.base`)."""
    photos = {p: p if isinstance(p, Photograph) else Photograph(p) for p in paths}
    bases = {p: ph.base(_input_stem(ph.path)) for p, ph in photos.items()}
    while True:
        counts = Counter(bases.values())
        clashing = [p for p, base in bases.items()
                    if counts[base] > 1 and base != photos[p].base(photos[p].path.name)]
        if not clashing:
            return bases
        # file names are unique in a folder, so this ends; a file's frames keep one stem
        files = {photos[p].path for p in clashing}
        for p, photo in photos.items():
            if photo.path in files:
                bases[p] = photo.base(photo.path.name)


def _one_line(photo: Photograph, err: Exception) -> str:
    """An error as one line that names the file (and the frame or page of a file of
    several)."""
    text = " ".join(str(err).split())
    if str(photo.path) in text:
        return text.replace(str(photo.path), photo.label, 1)
    return f"{photo.label}: {text}"


# An A/V model's per-class probability maps, beside the vessel map and mask.
AV_CLASS_FILES = ("_artery.png", "_vein.png", "_vessel.png")


# ``predict --visualize``: the vessel map over the photograph (A/V models: also A/V colours).
OVERLAY_FILES = ("_overlay.png",)
AV_OVERLAY_FILES = ("_av_overlay.png",)


def _prediction_suffixes(seg: Segmenter, save_probabilities: bool = False,
                         pictures: bool = False) -> list[str]:
    suffixes = ["_prob.png", "_mask.png"]
    if seg.task == "av":
        suffixes += ["_av.png", *AV_CLASS_FILES]
    if pictures:
        suffixes += [*OVERLAY_FILES, *(AV_OVERLAY_FILES if seg.task == "av" else ())]
    return suffixes + (["_prob.npy"] if save_probabilities else [])


def _predict_one(seg: Segmenter, photo: Photograph, base: str, cfg, fov_source,
                 out: OutputFolder, threshold: float) -> tuple[list[Path], dict[str, Any]]:
    """Segments and writes one photograph: the files written and its row of
    :data:`PREDICTIONS_CSV` (less its outputs' name and warnings, which the caller has)."""
    image = read_image(photo.path, photo.index)
    path = photo.label  # how the lines name it
    seg.check_image_size(image, path, warn=False)  # segment warns, once
    fov, mask_file = _fov_for(photo, image, fov_source)
    plan = seg.scale_plan(image, fov)  # segmented by, and said in the line
    prob, mask = seg.segment(image, fov, threshold, source=path, plan=plan, fov_file=mask_file)
    out.claim([base + s for s in _prediction_suffixes(seg, cfg.save_probabilities,
                                                      cfg.visualize)])
    written = [out.save_png(f"{base}_prob.png", visualize.probability_image(prob[..., -1])),
               out.save_png(f"{base}_mask.png", visualize.mask_image(mask[..., -1]))]
    if seg.task == "av":
        written.append(out.save_png(f"{base}_av.png", visualize.av_image(prob, threshold)))
        written += [out.save_png(base + suffix, visualize.probability_image(prob[..., i]))
                    for i, suffix in enumerate(AV_CLASS_FILES)]
    if cfg.visualize:
        written.append(out.save_png(f"{base}_overlay.png",
                                    visualize.vessel_overlay(image, prob[..., -1])))
        if seg.task == "av":
            written.append(out.save_png(f"{base}_av_overlay.png",
                                        visualize.av_image(prob, threshold, photo=image)))
    shown = [p.name[len(base) + 1:].removesuffix(".png") for p in written]  # every PNG written
    if cfg.save_probabilities:
        written.append(out.save_npy(f"{base}_prob.npy", prob.astype(np.float32)))
    scaled = f", {plan.segmented_at}" if plan.rescaled else ""
    if plan.training_fov_diameter and seg.inference_scale != "native":  # the rescale's reason
        scaled = (f", FOV {plan.fov_diameter:.0f} px" if plan.fov_diameter else
                  ", FOV diameter unknown") + scaled
    _warn(plan.warning(path))
    share = vessel_share(mask, fov)
    npy = " and _prob.npy" if cfg.save_probabilities else ""
    log.info(f"{path} -> {out.path / base}_{{{','.join(shown)}}}.png{npy} "
             f"({image.shape[1]}x{image.shape[0]}{scaled}, vessel on {share:.1%} of the FOV)")
    row = {"input": str(photo.path), "frame": _frame(photo), "width": image.shape[1],
           "height": image.shape[0],
           "fov_diameter": f"{plan.fov_diameter:.0f}" if plan.fov_diameter else "",
           "segmented_at": f"{plan.size[0]}x{plan.size[1]}" if plan.rescaled else "",
           "vessel_share": f"{share:.4f}"}
    if seg.task == "av":
        arteries = artery_share(mask, fov)
        row["artery_share"] = "" if arteries is None else f"{arteries:.4f}"
    return written, row


def predictions_csv(rows: list[dict[str, Any]], task: str) -> str:
    """:data:`PREDICTIONS_CSV`'s text: one line per photograph in input order, ``input``,
    ``frame`` where a file holds several (the number of its DICOM frame or TIFF page, 1
    first; empty for a file of one), ``outputs`` (the base name of its files), its ``width``
    and ``height``, ``fov_diameter`` (px; empty where unknown), ``segmented_at`` (the size it
    was resized to; empty where it was segmented as it is), ``vessel_share`` (of the FOV), for
    A/V models ``artery_share`` (of the vessel pixels called artery or vein), the ``warnings``
    logged for it (`` | `` between two) and the ``error`` that skipped it."""
    frames = any(row.get("frame") not in (None, "") for row in rows)
    columns = ["input", *(["frame"] if frames else []), "outputs", "width", "height",
               "fov_diameter", "segmented_at", "vessel_share",
               *(["artery_share"] if task == "av" else []), "warnings", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: v for k, v in row.items() if k != "frame" or frames} for row in rows)
    return buffer.getvalue()


class _Warnings(logging.Handler):
    """Keeps the warnings retina_tf logs in this thread while it is attached (one
    photograph's); another thread's (a service segmenting beside ``predict``) are not this
    photograph's, and go where they would go without it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())
        elif logging.lastResort is not None and not self._others(record.name):
            logging.lastResort.handle(record)  # as if this handler were not attached

    def _others(self, name: str) -> bool:
        """Whether a handler besides this one takes a record of the logger ``name``."""
        logger: logging.Logger | None = logging.getLogger(name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return True
            logger = logger.parent if logger.propagate else None
        return False


@contextlib.contextmanager
def _collecting_warnings():
    handler = _Warnings()
    logger = logging.getLogger("retina_tf")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


_NAMES_SHOWN = 5  # a closing line names this many photographs, then "and N more"


def _names(paths: list[Photograph]) -> str:
    more = f" and {len(paths) - _NAMES_SHOWN} more" if len(paths) > _NAMES_SHOWN else ""
    return ", ".join(p.name for p in paths[:_NAMES_SHOWN]) + more


def _report(done: int, failed: dict[Photograph, str], out_dir: Path,
            warned: list[Photograph] | None = None, warned_before: bool = False) -> None:
    """The closing summary: how many images were written, those warned of above (a long
    folder's warnings scroll away; ``warned_before``: some by an earlier, unfinished run, whose
    warnings only the table holds) and each failure with its reason."""
    where = f"in {PREDICTIONS_CSV}" if warned_before else "above"
    warned_of = f"; {len(warned)} with a warning {where}: {_names(warned)}" if warned else ""
    if warned and len(warned) > _NAMES_SHOWN and not warned_before:  # the table has them all
        warned_of += f" (all in {PREDICTIONS_CSV})"
    if not failed:
        log.info(f"done: {done} image(s) segmented, outputs in {out_dir}{warned_of}")
        return
    written = f"outputs in {out_dir}" if done else "nothing written"
    lines = [f"done: {done} image(s) segmented, {written}{warned_of}; {len(failed)} failed:"]
    lines += [f"  {reason}" for reason in failed.values()]
    log.warning("\n".join(lines))


def _failure_error(failed: dict[Photograph, str], total: int, out_dir: Path,
                   resumable: bool = True) -> RetinaTFError:
    again = " (the same command again tries only the failed ones)" if resumable else ""
    rest = f"the others were written to {out_dir}{again}" if len(failed) < total else \
        "none was written"
    return RetinaTFError(f"{len(failed)} of {total} images failed ({_names(list(failed))}; "
                         f"reasons above); {rest}")


class _Journal:
    """:data:`PREDICT_JOURNAL`: predict's record, in its output folder, of each photograph done
    (its row of :data:`PREDICTIONS_CSV`, its files, the photograph's size and modification
    time), one JSON line written to disk (fsync) as soon as its files are in place; the first
    line holds the settings. A run with the same settings (model file, threshold, inference
    flags) skips the photographs it lists whose files are all there and that have not changed
    since (and whose files no other run has written since); other settings start it afresh. It
    is removed when a run ends with every photograph it lists done. It is locked while a predict
    writes the folder: a second one at the same time is refused (:meth:`hold`)."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        self.path = folder / PREDICT_JOURNAL
        self.settings = json.loads(to_json(settings))  # as read back: tuples as lists
        self._file = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._off = False  # no record can be kept (the folder cannot be written)
        self._inputs: set[str] = set()  # this run's photographs (:meth:`done`)
        self._made_folder = False  # by :meth:`hold`: removed again if nothing is written
        if self.path.is_file() and self._open():
            self._entries = self._read()

    @staticmethod
    def _key(photo: Photograph) -> str:
        key = str(photo.path.resolve())
        return key if photo.index is None else f"{key}#{photo.index + 1}"

    @staticmethod
    def _stat(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def _open(self) -> bool:
        try:
            self._file = open(self.path, "a+", encoding="utf-8")
        except OSError:
            self._off = True
            return False
        if lock_open_file(self._file):
            return True
        self._file.close()
        self._file = None
        raise RunBusyError(f"another predict is writing {self.path.parent}: wait for it to "
                           "end, or give another --output_dir (two at once would replace each "
                           "other's files and predictions.csv)")

    def hold(self) -> None:
        """Takes the record's lock before the first photograph, creating the folder if need
        be, so that a second predict into the folder is refused from the start."""
        if self._file is not None or self._off:
            return
        self._made_folder = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # said by the first output written, naming it
            self._off = True
            return
        self._open()

    def _read(self) -> dict[str, dict[str, Any]]:
        self._file.seek(0)
        text = self._file.read()
        lines = text.splitlines()
        try:
            same = json.loads(lines[0]) == {"settings": self.settings}
        except (IndexError, ValueError):
            same = False
        if not same:
            if lines:
                log.info(f"{self.path.parent}: an unfinished run with other settings left its "
                         "record here; its photographs are segmented again")
            self._start()
            return {}
        entries = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                entries[entry["key"]] = entry
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                continue
        if not text.endswith("\n"):  # ended, so that the next line starts on its own
            self._file.write("\n")
        return entries

    def _start(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._write({"settings": self.settings})

    def _write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def done(self, files: dict[Photograph, list[str]]) -> dict[Photograph, dict[str, Any]]:
        """The rows of the photographs of ``files`` (each one's output names) that a run with
        these settings segmented, whose files are all there and that are unchanged since."""
        self._inputs = {self._key(p) for p in files}
        kept = {}
        for photo, names in files.items():
            entry = self._entries.get(self._key(photo))
            if (entry and entry.get("files") == names
                    and entry.get("stat") == self._stat(photo.path)
                    and entry.get("outputs") == self._stats(names)):
                kept[photo] = {**entry["row"], "input": str(photo.path)}
        return kept

    def _stats(self, names: list[str]) -> list[list[int]] | None:
        """Size and modification time of each output: another run may have written a file of
        the same name since (a photograph of the same stem from another folder)."""
        try:
            return [self._stat(self.path.parent / n) for n in names]
        except OSError:
            return None

    def add(self, photo: Photograph, row: dict[str, Any], names: list[str]) -> None:
        """Records a photograph whose files ``names`` are in place."""
        if self._off or (self._file is None and not self._open()):
            return
        if self._file.tell() == 0:  # a new record
            self._start()
        key = self._key(photo)
        self._entries[key] = entry = {"key": key, "stat": self._stat(photo.path),
                                      "files": names, "outputs": self._stats(names), "row": row}
        self._write(entry)

    @property
    def recording(self) -> bool:
        """Whether this run keeps the record (no other predict held it)."""
        return not self._off

    def close(self, finished: bool) -> None:
        """Closes the record; ``finished`` (every photograph done) also removes it, unless it
        lists photographs of another run (a stopped folder run, this one a file of it)."""
        if self._file is None:
            return
        if not self._entries or finished and set(self._entries) <= self._inputs:
            with contextlib.suppress(OSError):
                self.path.unlink()
                if self._made_folder:  # a failure before the first photograph: as it was
                    self.path.parent.rmdir()
        self._file.close()
        self._file = None


def _journal_settings(cfg: PredictConfig, seg: Segmenter, threshold: float) -> dict[str, Any]:
    """What decides a photograph's outputs: the model file, threshold, precision and the
    inference and output flags (not where the photographs and outputs are)."""
    flags = {k: v for k, v in dataclasses.asdict(cfg).items()
             if k not in ("input", "output_dir", "overwrite", "model", "logdir", "run_name")}
    return {**flags, "model_sha256": model_fingerprint(seg.run_dir), "threshold": threshold,
            **{key: getattr(seg, key) for key in RUN_CHOICES}, "precision": seg.precision}


def _output_layout(where: dict[Photograph, Path], out: OutputFolder, suffixes: list[str],
                   reads: dict[Path, str]
                   ) -> tuple[dict[Path, OutputFolder], dict[Photograph, str],
                              dict[Photograph, list[str]]]:
    """Where each photograph's outputs go, given its folder under ``--input`` (``where``): the
    output folder at the same place under ``out``, its files' base name (stems clash within a
    folder only: :func:`output_names`) and their names relative to ``out``. Raises ConfigError
    up front for a file retina_tf must not replace (:meth:`OutputFolder.check`), and, even with
    ``--overwrite``, for one the run reads (``reads``: resolved path -> the flag that gives it;
    a FOV mask ``<stem>_mask.png`` of ``--fov`` in the output folder)."""
    folders = sorted(set(where.values()))
    outs = {rel: OutputFolder(out.path / rel, out.overwrite) if rel.parts else out
            for rel in folders}
    bases = {}
    for rel in folders:
        bases.update(output_names([p for p in where if where[p] == rel]))
    out.check([PREDICTIONS_CSV])
    for p, rel in where.items():
        files = [bases[p] + s for s in suffixes]
        for target in (outs[rel].path / f for f in files):
            if flag := reads.get(target.resolve()):
                raise ConfigError(f"{target} is read by this prediction ({flag}) and would be "
                                  "replaced by an output of the same name: give another "
                                  "--output_dir")
        outs[rel].check(files)
    names = {p: [(rel / (bases[p] + s)).as_posix() for s in suffixes] for p, rel in where.items()}
    return outs, bases, names


@takes(PredictConfig)
def predict(cfg: PredictConfig) -> list[Path]:
    """Writes ``<stem>_prob.png`` (8-bit vessel probability) and ``<stem>_mask.png`` (at
    ``--threshold``, else the run's stored threshold) per input image, the size of the input;
    A/V models also write ``<stem>_av.png`` (arteries red, veins
    blue) and ``<stem>_artery.png``, ``_vein.png``, ``_vessel.png`` (8-bit probabilities);
    ``save_probabilities`` adds ``<stem>_prob.npy`` (float32, H x W x K); ``visualize`` adds
    ``<stem>_overlay.png`` (the vessel probability as a cyan tint over the photograph) and, for
    A/V models, ``<stem>_av_overlay.png`` (arteries red, veins blue over the photograph).
    ``predictions.csv`` lists every photograph, its vessel share, warnings and any error
    (:func:`predictions_csv`), written when the last one is done (those done so far, after a
    Ctrl-C or a failure to write). Run the same command again after a kill (or with failures)
    and the photographs already done with the same settings are kept, not segmented again
    (:data:`PREDICT_JOURNAL`).

    With ``recursive``, the folders inside ``input`` are searched too (:func:`input_folders`),
    each photograph's outputs written to the same place under ``output_dir``. Each frame of a
    DICOM file and page of a TIFF that holds several is segmented as a photograph of its own
    (:func:`photographs`; outputs ``<stem>_frame2_...``, a ``frame`` column in the table).

    Every image of a folder is tried: a bad one is reported and skipped, and after the others
    are written the run fails with the list; the closing line also names the images warned
    of. Outputs never collide (see :func:`output_names`), files in ``--output_dir`` that
    retina_tf did not write are replaced only with ``--overwrite``, and retina_tf's own outputs
    in ``--input`` are never taken for images.

    Raises:
        ConfigError: missing --input / --output_dir, or an output that would replace a file
            retina_tf did not write (a bad --threshold the config itself refuses).
        DatasetError: the input is missing, yields no image, or its one image is bad.
        ModelFileError: the model cannot be loaded.
        RetinaTFError: some images of a folder failed (the others were written).
    """
    if not cfg.input or not cfg.output_dir:
        raise ConfigError("predict needs --input (an image file or a folder of images) and "
                          "--output_dir")
    root = Path(cfg.input)
    files = list_inputs(root, cfg.recursive, Path(cfg.output_dir))
    # each file's folder under --input, and so of its outputs under --output_dir
    folder = {p: p.parent.relative_to(root) if cfg.recursive and root.is_dir() else Path()
              for p in files}
    fov_sources = {rel: _folder_fov_source(cfg.fov, rel, [p for p in files if folder[p] == rel])
                   for rel in set(folder.values())}
    inputs = [photo for path in files for photo in photographs(path)]
    where = {photo: folder[photo.path] for photo in inputs}
    seg = load_segmenter(cfg)
    of_files = f" in {len(files)} file(s)" if len(files) != len(inputs) else ""
    log.info(f"segmenting {len(inputs)} image(s){of_files} with {seg.run_dir.name} "
             f"({seg.run_dir})")
    threshold, _ = resolve_threshold(seg, cfg.threshold)
    if line := tta_line(seg, cfg):
        log.info(line)
    log.info(seg.describe_inference_scale())
    out = OutputFolder(cfg.output_dir, cfg.overwrite)
    reads = {p.resolve(): "--input" for p in files}
    for source in fov_sources.values():
        reads |= {p.resolve(): "--fov" for p in (source if isinstance(source, list)
                                                 else [source] if isinstance(source, Path)
                                                 else [])}
    outs, bases, names = _output_layout(
        where, out, _prediction_suffixes(seg, cfg.save_probabilities, cfg.visualize), reads)
    journal = _Journal(out.path, _journal_settings(cfg, seg, threshold))
    journal.hold()
    rows = journal.done(names)  # photograph -> its row of the table, in any order
    kept = set(rows)
    written = [out.path / n for p in rows for n in names[p]]
    if rows:
        log.info(f"{len(rows)} of {len(inputs)} image(s) were segmented with these settings by "
                 f"an unfinished run into {out.path}: kept, not segmented again")
    failed: dict[Photograph, str] = {}

    def write_table() -> Path:
        return out.write_text(PREDICTIONS_CSV, predictions_csv(
            [rows[p] for p in inputs if p in rows], seg.task))

    try:
        with reading_run(seg.run_dir):  # no training --overwrite of the run while it segments
            for photo in progress([p for p in inputs if p not in rows], "predict",
                                  name=lambda p: p.name):
                try:
                    # all of an image's files, or none after a Ctrl-C
                    with outs[where[photo]].all_or_nothing(), \
                            _collecting_warnings() as warnings:
                        outputs, row = _predict_one(seg, photo, bases[photo], cfg,
                                                    fov_sources[where[photo]],
                                                    outs[where[photo]], threshold)
                except (DatasetError, OSError) as err:
                    # a name too long for the file system is this photograph's alone; a full
                    # disk or a read-only folder stops the run
                    own = not isinstance(err, OSError) or err.errno == errno.ENAMETOOLONG
                    if len(inputs) == 1 or not own:
                        raise
                    if isinstance(err, OSError):
                        err = DatasetError(f"its output name {Path(err.filename).name} is too "
                                           "long for the file system: give the photograph a "
                                           "shorter name")
                    failed[photo] = _one_line(photo, err)
                    log.warning(f"skipped: {failed[photo]}")
                    rows[photo] = {"input": str(photo.path), "frame": _frame(photo),
                                   "error": failed[photo]}
                    continue
                written += outputs
                rows[photo] = {**row, "outputs": (where[photo] / bases[photo]).as_posix(),
                               "warnings": " | ".join(warnings.messages)}
                journal.add(photo, rows[photo], names[photo])
    except BaseException:  # a Ctrl-C, a full disk: the table of those done, if it can be written
        if rows:
            with contextlib.suppress(Exception):
                write_table()
        journal.close(finished=False)
        raise
    written.append(write_table())
    journal.close(finished=not failed)
    warned = [p for p in inputs if rows.get(p, {}).get("warnings")]
    _report(len(inputs) - len(failed), failed, out.path, warned if len(inputs) > 1 else None,
            warned_before=bool(set(warned) & kept))
    if failed:
        raise _failure_error(failed, len(inputs), out.path, resumable=journal.recording)
    return written


@takes(ErrorMapConfig)
def write_error_maps(cfg: ErrorMapConfig) -> Path:
    """Segments the training split with the run ``--model`` (a stage-1 hmsa run) and writes one
    0/255 PNG error map per image to ``--output_dir`` (default ``<run>/error_maps``), plus
    ``error_maps.json`` with the share of erroneous FOV pixels per image and the data the maps
    were made from (training checks it). Nothing is written until every image is segmented;
    in an ``--output_dir``, files retina_tf did not write need ``--overwrite``."""
    if cfg.precision == "auto":  # training targets: the same on every machine
        cfg = dataclasses.replace(cfg, precision="float32")
    seg = load_segmenter(cfg)
    with reading_run(seg.run_dir):
        return _write_error_maps(cfg, seg)


def _write_error_maps(cfg: ErrorMapConfig, seg: Segmenter) -> Path:
    cfg = _with_the_runs_data(cfg, seg.run_dir, "training")
    samples = resolve_samples(cfg.dataset, cfg.data_dir, "training", cfg.label_file_path)
    if cfg.output_dir:
        out_dir = Path(cfg.output_dir)
    elif is_shipped(seg.run_dir):  # the package's own folder stays as shipped
        out_dir = Path(cfg.logdir) / f"{seg.run_dir.name}_{ERROR_MAPS_DIR}"
    else:
        out_dir = seg.run_dir / ERROR_MAPS_DIR
    out = OutputFolder(out_dir, cfg.overwrite, owned=not cfg.output_dir)
    names = [f"{s.name}.png" for s in samples] + [ERROR_MAPS_JSON]
    out.check(names)
    log.info(f"writing error maps of {seg.run_dir} on {len(samples)} training images to {out_dir}")
    threshold, _ = resolve_threshold(seg, cfg.threshold)
    maps, shares = {}, {}
    for sample in progress(samples, "make_error_maps", name=lambda s: Path(s.image).name):
        data = read_sample(sample)
        seg.check_image_size(data.image, sample.image)
        _warn_of_estimate(data, sample)
        target = target_of(data, seg.task)[..., -1]
        # at the inference scale, as evaluate scores it (error_map keeps FOV pixels only)
        prob = _probability_as_planned(seg, data, sample.image, "make_error_maps",
                                       threshold)[0][..., -1]
        maps[data.name] = error_map(prob, target, data.fov, threshold)
        shares[data.name] = float(maps[data.name].sum() / max(data.fov.sum(), 1))
        log.info(f"  {data.name}: {shares[data.name]:.2%} of the FOV wrong")
    # written once every image is done: a bad image leaves the maps made before whole; and
    # all at once (a kill left some maps of this threshold among those of the last)
    out.claim(names)
    summary = {"run": str(seg.run_dir), "model_sha256": model_fingerprint(seg.run_dir),
               "threshold": threshold,
               "data": data_key(cfg.dataset, cfg.data_dir, cfg.label_file_path),
               "error_share_in_fov": shares,
               "mean_error_share_in_fov": float(np.mean(list(shares.values())))}
    with out.all_or_nothing():
        for name, errors in maps.items():
            out.save_png(f"{name}.png", visualize.mask_image(errors))
        out.write_text(ERROR_MAPS_JSON, to_json(summary))
    if not is_shipped(seg.run_dir):
        update_metrics_json(seg.run_dir, {"error_maps": {
            "folder": str(out_dir),
            "mean_error_share_in_fov": summary["mean_error_share_in_fov"]}})
    log.info(f"mean error share {summary['mean_error_share_in_fov']:.2%}; wrote {out_dir}")
    return out_dir
