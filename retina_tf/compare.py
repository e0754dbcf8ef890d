"""Several runs side by side on one labelled split: ``compare(cfg)`` is what ``bin/compare.py``
runs (:class:`retina_tf.config.CompareConfig`).

Every run segments the same images with its own inference settings and is scored by the metric
loop of :func:`retina_tf.evaluation.evaluate` (:class:`~retina_tf.evaluation.SetScores`, pixels
inside the FOV). ``compare.md`` holds the table, ``compare.png`` one image: the photograph, its
ground truth, then each run's errors over the photograph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from retina_tf import visualize
from retina_tf.config import CompareConfig, takes
from retina_tf.data.io import read_sample
from retina_tf.data.pipeline import target_of
from retina_tf.errors import ConfigError
from retina_tf.evaluation import (
    OutputFolder,
    SeenInTraining,
    SetScores,
    _probability_as_planned,
    _test_samples,
    _vote_words,
    _warn,
    _warn_of_estimate,
    data_name,
)
from retina_tf.inference import Segmenter, resolve_threshold, run_inference
from retina_tf.run_folder import find_run, reading_run

log = logging.getLogger(__name__)

COMPARE_PNG = "compare.png"
COMPARE_MD = "compare.md"
# (key, column title) of the table; the A/V columns only when every run is an A/V model.
COLUMNS = (("f1", "F1"), ("auc_roc", "AUC-ROC"), ("se", "Se"), ("sp", "Sp"), ("acc", "Acc"))
AV_COLUMNS = (("av_acc", "A/V acc"), ("av_acc_ripav", "A/V acc (RIP-AV)"))
# The panels of compare.png are this high at most (a DRIVE photograph keeps its 584 px).
PANEL_HEIGHT = 600


@dataclasses.dataclass
class _Run:
    label: str            # as given in --runs
    segmenter: Segmenter
    threshold: float
    scores: SetScores | None = None
    picture: np.ndarray | None = None   # its errors on the chosen image
    image_f1: float = float("nan")
    image_av_acc: float = float("nan")
    seen: SeenInTraining | None = None  # the scored images it trained on

    @property
    def model(self) -> str:
        return str(self.segmenter.run_info.get("model", "?"))


def _load(label: str, logdir: str, precision: str) -> _Run:
    run_dir = find_run(label, logdir, flag="--runs")
    inf = run_inference(run_dir)
    seg = Segmenter.from_run(run_dir, inference=inf.inference, window=inf.window or None,
                             stride=inf.stride, tta=inf.tta, tta_transpose=inf.tta_transpose,
                             scales=inf.eval_scales, av_vote=inf.av_vote, av_link=inf.av_link,
                             inference_scale=inf.inference_scale, tile_size=inf.tile_size,
                             precision=precision)
    threshold, _ = resolve_threshold(seg, None, label)  # each run its own
    return _Run(label=label, segmenter=seg, threshold=threshold)


def _chosen_index(image: str | None, names: list[str]) -> int:
    """The index of ``--image`` (a name of the split, else a 0-based index) in ``names``."""
    if image is None or image == "":
        return 0
    if image in names:
        return names.index(image)
    if image.strip().lstrip("-").isdigit():
        index = int(image)
        if 0 <= index < len(names):
            return index
    shown = ", ".join(names[:5]) + (f" ... ({len(names)} images)" if len(names) > 5 else "")
    raise ConfigError(f"--image={image}: not an image of the split; give a name ({shown}) or "
                      f"an index from 0 to {len(names) - 1}")


@takes(CompareConfig)
def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Evaluates every run of ``cfg.runs`` on the same split and writes ``compare.md`` (one
    table row per run: model, F1, AUC-ROC, Se, Sp, Acc, and A/V accuracies when every run is an
    A/V model) and ``compare.png`` (the chosen image: photograph, ground truth, each run's
    errors titled with its name and F1 on that image); the table is also logged.

    Runs of different tasks (vessel and A/V models) are compared on the vessel channel.

    Returns:
        ``{"task", "dataset", "split", "images", "image", "rows", "files"}``; each row holds
        ``run``, ``model``, the pooled figures and ``image_f1``.

    Raises:
        ConfigError: no --runs or --output_dir, an unknown --image, or an output that would
            replace a file retina_tf did not write.
        ModelFileError: a run cannot be found or loaded (the message names it).
        DatasetError: a missing or bad image or label, or an image too small for a run.
    """
    if not cfg.runs:
        raise ConfigError("compare needs --runs=a,b,... (run folders, shipped model names or run "
                          "names under --logdir)")
    if not cfg.output_dir:
        raise ConfigError("compare needs --output_dir, the folder for compare.png and compare.md")
    samples = _test_samples(cfg)
    names = [s.name for s in samples]
    chosen = _chosen_index(cfg.image, names)
    out = OutputFolder(cfg.output_dir, cfg.overwrite)
    out.check([COMPARE_PNG, COMPARE_MD])
    runs = [_load(label, cfg.logdir, cfg.precision) for label in cfg.runs]
    folders = [run.segmenter.run_dir.resolve() for run in runs]
    for i, folder in enumerate(folders):  # one run twice: a row that compares nothing
        if folder in folders[:i]:
            raise ConfigError(f"--runs names {folder.name} twice ({cfg.runs[folders.index(folder)]}"
                              f" and {cfg.runs[i]}): give each run once")
    with contextlib.ExitStack() as held:  # no training --overwrite of a run being compared
        for run in runs:
            held.enter_context(reading_run(run.segmenter.run_dir))
        return _compare(cfg, samples, chosen, out, runs)


def _compare(cfg: CompareConfig, samples, chosen: int, out: OutputFolder,
             runs: list[_Run]) -> dict[str, Any]:
    names = [s.name for s in samples]
    tasks = {r.label: r.segmenter.task for r in runs}
    all_av = all(t == "av" for t in tasks.values())
    task = "av" if all_av and all(s.av is not None for s in samples) else "vessel"
    note = ""
    if len(set(tasks.values())) > 1:
        note = (f"The runs differ in task ({', '.join(f'{k}: {v}' for k, v in tasks.items())}): "
                "compared on the vessel channel.")
    elif all_av and task == "vessel":  # as evaluate scores an A/V model on vessel labels
        note = "The images have no artery/vein labels: compared on the vessel channel."
    if note:
        log.info(note)
    for run in runs:
        run.scores = SetScores(task, run.threshold)
    dataset = data_name(cfg)
    log.info(f"comparing {len(runs)} runs on {len(samples)} {dataset} {cfg.eval_split} images "
             "(pixels inside the FOV; each run with its own inference settings)")
    for run in runs:  # what evaluate would say of each (flags.txt gives stride, TTA, scales)
        seg = run.segmenter
        log.info(f"{run.label}: {_computed(seg, task)} in {seg.precision}, threshold "
                 f"{run.threshold:g}; {seg.describe_inference_scale()}")
        run.seen = SeenInTraining(seg, names, cfg.dataset, cfg.eval_split)
        _warn(run.seen.name_warning())
    panels: list[tuple[visualize.Title, np.ndarray]] = []
    for i, sample in enumerate(samples):
        data = read_sample(sample)
        _warn_of_estimate(data, sample)
        target = target_of(data, task) > 0.5
        for run in runs:
            run.segmenter.check_image_size(data.image, sample.image)
            run.seen.check(data.name, data.image)
            prob, _ = _probability_as_planned(run.segmenter, data, sample.image, run.label,
                                              run.threshold)
            prob = prob[..., -1:] if task == "vessel" else prob
            prob = prob * data.fov[..., None]  # background outside the FOV, as evaluate has it
            run.scores.update(prob, target, data.fov, name=data.name)
            if i == chosen:
                run.picture = _errors(prob, target, data, run.threshold, task)
                run.image_f1 = run.scores.per_image[-1]["f1"]
                run.image_av_acc = run.scores.per_image[-1].get("av_acc", float("nan"))
        if i == chosen:
            panels = [("photograph", data.image), ("ground truth", _truth(target, data, task))]
        log.info(f"  {data.name}: " + ", ".join(
            f"{r.label} F1 {r.scores.per_image[-1]['f1']:.4f}" for r in runs))
    for run in runs:
        _warn(run.seen.pixel_warning())
    rows = [_row(run, task) for run in runs]
    table = markdown_table(rows, task)
    log.info("\n" + table)
    names_shown = _short_labels([run.label for run in runs])
    panels += [(_panel_title(run, shown, task), run.picture)
               for run, shown in zip(runs, names_shown)]
    height = min(PANEL_HEIGHT, panels[0][1].shape[0])
    figure = visualize.with_caption(visualize.titled_panels(panels, height),
                                    _caption(names[chosen], dataset, cfg.eval_split, task),
                                    height)
    header = (f"# {len(runs)} runs on {dataset} {cfg.eval_split} ({len(samples)} images, "
              f"pixels inside the FOV)\n\n")
    text = header + (note + "\n\n" if note else "") + table + (
        f"\n\n{COMPARE_PNG}: image {names[chosen]}, each run's errors over the photograph"
        f"{' (A/V classes on true vessels)' if task == 'av' else ''}.\n")
    with out.all_or_nothing():  # the picture and the table of one comparison, or neither
        written = [out.save_png(COMPARE_PNG, figure), out.write_text(COMPARE_MD, text)]
    log.info(f"\nwrote {written[0]} and {written[1]}")
    return {"task": task, "dataset": dataset, "split": cfg.eval_split, "images": len(samples),
            "image": names[chosen], "rows": rows, "files": written}


def _computed(seg: Segmenter, task: str) -> str:
    """How a run segments, as evaluate says it: the A/V vote too where A/V is scored."""
    return seg.describe_inference() + (_vote_words(seg) if task == "av" else "")


def _row(run: _Run, task: str) -> dict[str, Any]:
    result = run.scores.result()
    keys = [k for k, _ in COLUMNS + (AV_COLUMNS if task == "av" else ())]
    return {"run": run.label, "model": run.model, **{k: result[k] for k in keys},
            "image_f1": run.image_f1, "precision": run.segmenter.precision,
            "threshold": run.threshold, "inference": _computed(run.segmenter, task)}


def markdown_table(rows: list[dict[str, Any]], task: str) -> str:
    """The rows of :func:`compare` as a markdown table: run, model, the pooled figures, and
    each run's threshold and how it was run (its own settings: they may differ)."""
    columns = COLUMNS + (AV_COLUMNS if task == "av" else ())
    lines = ["| run | model | " + " | ".join(title for _, title in columns)
             + " | threshold | computed |",
             "| --- | --- | " + " | ".join("---:" for _ in columns) + " | ---: | --- |"]
    for row in rows:
        values = [("n/a" if not math.isfinite(row[k]) else f"{row[k]:.4f}") for k, _ in columns]
        lines.append(f"| {row['run']} | {row['model']} | " + " | ".join(values)
                     + f" | {row['threshold']:g} | {row['inference']}, {row['precision']} |")
    return "\n".join(lines)


def _errors(prob: np.ndarray, target: np.ndarray, data, threshold: float,
            task: str) -> np.ndarray:
    if task == "av":
        return visualize.av_error_image(prob, target, photo=data.image)
    return visualize.overlay(prob[..., -1] >= threshold, target[..., -1], data.fov,
                             photo=data.image)


def _truth(target: np.ndarray, data, task: str) -> np.ndarray:
    if task == "av":
        return visualize.av_label_image(target, photo=data.image)
    return visualize.vessel_overlay(data.image, target[..., -1].astype(np.float32))


def _short_labels(labels: list[str]) -> list[str]:
    """The runs as a panel title has room for: a run folder given as a path by its own name
    (``logs/unet_drive_fast`` -> ``unet_drive_fast``), unless two would then read alike."""
    short = [Path(label).name or label for label in labels]
    return short if len(set(short)) == len(short) else list(labels)


def _panel_title(run: _Run, shown: str, task: str) -> str:
    title = f"{shown}  F1 {run.image_f1:.4f}"
    return title + (f"  A/V {run.image_av_acc:.4f}" if task == "av" else "")


def _caption(name: str, dataset: str, split: str, task: str) -> visualize.Title:
    where = f"{name} ({dataset} {split}); "
    if task == "av":
        return visualize.legend(("artery", visualize.ARTERY_COLOUR),
                                ("vein", visualize.VEIN_COLOUR),
                                ("wrong class", visualize.TP_COLOUR),
                                ("crossing or uncertain", visualize.UNCERTAIN_COLOUR),
                                prefix=where + "A/V on true vessels: ")
    return visualize.legend(("TP", visualize.TP_COLOUR), ("FP", visualize.FP_COLOUR),
                            ("FN", visualize.FN_COLOUR), prefix=where + "errors: ")
