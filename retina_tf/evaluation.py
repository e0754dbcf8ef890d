"""Evaluation of a run on a test split, and prediction on arbitrary photographs.

``evaluate(cfg)`` and ``predict(cfg)`` are what ``bin/evaluate.py`` and ``bin/predict.py`` run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retina_tf.data.io import DatasetError, file_stem, read_image, read_mask, read_sample
from retina_tf.data.pipeline import resolve_samples, target_of
from retina_tf.inference import PRETRAINED_DIR, Segmenter
from retina_tf.losses import vessel_width_map
from retina_tf.metrics import AVMetrics, VesselMetrics, format_table
from retina_tf.training import atomic_write_text, run_dir_of, to_json, update_metrics_json
from retina_tf import visualize

# A/V accuracy is also split at this vessel width (px, as vessel_width_map measures it: a 3 px
# wide vessel measures 4), because thin vessels are where A/V classification fails first.
THIN_AV_WIDTH = 4.0

IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".gif", ".ppm", ".bmp", ".gz")


def load_segmenter(cfg) -> Segmenter:
    return Segmenter.from_run(cfg.model, cfg.logdir, run_dir_of(cfg).name,
                              # --window=0 means the training patch size
                              inference=cfg.inference, window=cfg.window or None,
                              stride=cfg.stride,
                              tta=cfg.tta, tta_transpose=cfg.tta_transpose,
                              scales=cfg.eval_scales, av_vote=cfg.av_vote, av_link=cfg.av_link)


def _is_shipped(run_dir: Path) -> bool:
    return PRETRAINED_DIR in Path(run_dir).resolve().parents


def _test_samples(cfg):
    if cfg.test_label_file_path:
        return resolve_samples(label_file=cfg.test_label_file_path)
    if cfg.label_file_path:
        test_file = Path(cfg.label_file_path).with_name("test.txt")
        if cfg.eval_split == "training":
            test_file = Path(cfg.label_file_path)
        return resolve_samples(label_file=test_file)
    return resolve_samples(cfg.dataset, cfg.data_dir, cfg.eval_split)


def _vote_words(seg: Segmenter) -> str:
    if not seg.av_vote:
        return ""
    linked = f", linked across junctions (strength {seg.av_link:g})" if seg.av_link else ""
    return f", one A/V decision per vessel segment{linked}"


def evaluate(cfg) -> dict:
    """Segments the test split, prints confusion matrix and metrics, writes metrics.json and,
    with ``--visualize``, per-image PNGs and ROC / PR curves."""
    seg = load_segmenter(cfg)
    samples = _test_samples(cfg)
    name = cfg.dataset or Path(cfg.test_label_file_path or cfg.label_file_path).parent.name
    if cfg.output_dir:
        out_dir = Path(cfg.output_dir)
    elif _is_shipped(seg.run_dir):
        out_dir = Path(cfg.logdir) / f"{seg.run_dir.name}_eval_{name}_{cfg.eval_split}"
    else:
        out_dir = seg.run_dir / f"eval_{name}_{cfg.eval_split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    task = seg.task
    vessel = VesselMetrics(threshold=cfg.threshold, whole_image=cfg.whole_image_metrics)
    av = AVMetrics() if task == "av" else None
    if av is not None:
        av_thin, av_thick = AVMetrics(), AVMetrics()
    print(f"evaluating {seg.run_dir} on {len(samples)} {name} {cfg.eval_split} images "
          f"({seg.inference} inference{' with ' + seg.tta_name if seg.tta else ''}"
          f"{_vote_words(seg)}; counting "
          f"{'every pixel' if cfg.whole_image_metrics else 'pixels inside the FOV'})", flush=True)
    for sample in samples:
        data = read_sample(sample)
        target = target_of(data, task) > 0.5
        # Outside the FOV the prediction is background, as in the shipped masks and papers.
        prob = seg.probability(data.image) * data.fov[..., None]
        vessel.update(prob[..., -1], target[..., -1], data.fov)
        if av is not None:
            av.update(prob, target, data.fov)
            thin = vessel_width_map(target[..., -1]) <= THIN_AV_WIDTH
            fov = data.fov.astype(bool)
            av_thin.update(prob, target, fov & thin)
            av_thick.update(prob, target, fov & ~thin)
        if cfg.visualize:
            p = prob[..., -1]
            pred = p >= cfg.threshold
            visualize.save_png(out_dir / f"{data.name}_prob.png", visualize.probability_image(p))
            visualize.save_png(out_dir / f"{data.name}_mask.png", visualize.mask_image(pred))
            visualize.save_png(out_dir / f"{data.name}_overlay.png",
                               visualize.overlay(pred, target[..., -1], data.fov))
            if av is not None:
                visualize.save_png(out_dir / f"{data.name}_av.png",
                                   visualize.av_error_image(prob, target))
                visualize.save_png(out_dir / f"{data.name}_av_truth.png",
                                   visualize.av_image(target.astype(np.float32)))
    result = vessel.result()
    if av is not None:
        result.update({f"av_{k}": v for k, v in av.result().items()})
        for part, metrics in (("thin", av_thin), ("thick", av_thick)):
            r = metrics.result()
            result.update({f"av_{part}_acc": r["acc"], f"av_{part}_pixels": r["n_pixels"]})
    print()
    print(format_table(result), flush=True)
    if av is not None:
        print("\nArtery/vein on ground-truth vessel pixels (crossings and uncertain excluded; "
              "Se: arteries right, Sp: veins right)")
        print(format_table(av.result(), class_names=("vein", "artery")), flush=True)
        print(f"A/V accuracy on vessels up to 3 px wide: {result['av_thin_acc']:.4f} "
              f"({result['av_thin_pixels']} px); wider: {result['av_thick_acc']:.4f} "
              f"({result['av_thick_pixels']} px)", flush=True)
    if cfg.visualize:
        scores, labels = vessel.scores_and_labels()
        visualize.save_curves(scores, labels, out_dir, result["auc_roc"], result["auc_pr"],
                              title=f"{seg.run_dir.name} on {name} {cfg.eval_split}")
    report = {"dataset": name, "split": cfg.eval_split, "images": len(samples),
              "counting": "whole_image" if cfg.whole_image_metrics else "fov",
              "inference": seg.inference, "tta": seg.tta,
              "tta_transpose": seg.tta and seg.tta_transpose, "av_vote": seg.av_vote,
              "av_link": seg.av_link if seg.av_vote else None,
              "metrics": result}
    atomic_write_text(out_dir / "metrics.json", to_json(report))
    if not _is_shipped(seg.run_dir):
        update_metrics_json(seg.run_dir, {f"test_{name}_{cfg.eval_split}": report})
    print(f"\nwrote {out_dir / 'metrics.json'}" +
          (f" and pictures (probability, mask, overlay: green TP, red FP, blue FN; "
           f"roc_curve.png, pr_curve.png) in {out_dir}" if cfg.visualize else ""), flush=True)
    return report


def _list_inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem)
        if not files:
            raise DatasetError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
        return files
    raise DatasetError(f"{path}: no such file or folder")


def _fov_for(image_path: Path, fov_arg: str | None) -> np.ndarray | None:
    if not fov_arg:
        return None
    fov_path = Path(fov_arg)
    if fov_path.is_dir():
        matches = sorted(p for p in fov_path.iterdir() if p.name.startswith(file_stem(image_path)))
        if not matches:
            return None
        fov_path = matches[0]
    return read_mask(fov_path, what="fov")


def predict(cfg) -> list[Path]:
    """Writes ``<stem>_prob.png`` (8-bit probability) and ``<stem>_mask.png`` per input image,
    the size of the input; A/V models also write ``<stem>_av.png``."""
    if not cfg.input or not cfg.output_dir:
        raise ValueError("predict needs --input (file or folder) and --output_dir")
    seg = load_segmenter(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in _list_inputs(Path(cfg.input)):
        image = read_image(path)
        fov = _fov_for(path, cfg.fov)
        if fov is not None and fov.shape != image.shape[:2]:
            raise DatasetError(f"FOV mask for {path} has size {fov.shape[::-1]}, the image "
                               f"{image.shape[1::-1]}")
        prob, mask = seg.segment(image, fov, cfg.threshold)
        stem = file_stem(path)
        written.append(visualize.save_png(out_dir / f"{stem}_prob.png",
                                          visualize.probability_image(prob[..., -1])))
        written.append(visualize.save_png(out_dir / f"{stem}_mask.png",
                                          visualize.mask_image(mask[..., -1])))
        if seg.task == "av":
            written.append(visualize.save_png(out_dir / f"{stem}_av.png",
                                              visualize.av_image(prob)))
        print(f"{path} -> {out_dir / stem}_{{prob,mask}}.png "
              f"({image.shape[1]}x{image.shape[0]}, {mask[..., -1].mean():.1%} vessel)", flush=True)
    return written
