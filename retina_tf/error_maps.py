"""EAR-Net's stage-1 error maps: where a trained model's binary prediction disagrees with the
ground truth on the training images (Wang et al., DICTA 2021, https://arxiv.org/abs/2107.01351).

``write_error_maps(cfg)`` is what ``bin/make_error_maps.py`` runs; ``bin/train.py`` reads the
maps back with ``read_error_maps`` when the model is ``ear_net``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retina_tf.data.io import DatasetError, read_mask, read_sample
from retina_tf.data.pipeline import resolve_samples, target_of
from retina_tf.errors import ModelFileError
from retina_tf.run_folder import atomic_write_text, to_json, update_metrics_json

ERROR_MAPS_DIR = "error_maps"


def error_map(probability: np.ndarray, target: np.ndarray, fov: np.ndarray,
              threshold: float = 0.5) -> np.ndarray:
    """Bool (H, W): inside the FOV, pixels whose thresholded prediction differs from the
    target (false positives and false negatives alike)."""
    return ((probability >= threshold) != (target > 0.5)) & fov.astype(bool)


def resolve_pretrained(pretrained: str | os.PathLike, logdir: str | None = None) -> Path:
    """A run folder from a path or a run name under ``logdir``."""
    for candidate in (Path(pretrained), Path(logdir or ".") / str(pretrained)):
        if (candidate / "model.keras").is_file():
            return candidate
    raise ModelFileError(f"--pretrained={pretrained}: no model.keras in {pretrained} or in "
                         f"{Path(logdir or '.') / str(pretrained)}; train that run first")


def write_error_maps(cfg) -> Path:
    """Segments the training split with the run ``--model`` (a stage-1 hmsa run) and writes one
    0/255 PNG error map per image to ``--output_dir`` (default ``<run>/error_maps``), plus
    ``error_maps.json`` with the share of erroneous FOV pixels per image."""
    from retina_tf import visualize
    from retina_tf.evaluation import load_segmenter

    seg = load_segmenter(cfg)
    samples = resolve_samples(cfg.dataset, cfg.data_dir, "training", cfg.label_file_path)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else seg.run_dir / ERROR_MAPS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"writing error maps of {seg.run_dir} on {len(samples)} training images to {out_dir}",
          flush=True)
    shares = {}
    for sample in samples:
        data = read_sample(sample)
        target = target_of(data, seg.task)[..., -1]
        prob = seg.probability(data.image)[..., -1]  # error_map keeps FOV pixels only
        errors = error_map(prob, target, data.fov, cfg.threshold)
        visualize.save_png(out_dir / f"{data.name}.png", visualize.mask_image(errors))
        shares[data.name] = float(errors.sum() / max(data.fov.sum(), 1))
        print(f"  {data.name}: {shares[data.name]:.2%} of the FOV wrong", flush=True)
    summary = {"run": str(seg.run_dir), "threshold": cfg.threshold,
               "error_share_in_fov": shares,
               "mean_error_share_in_fov": float(np.mean(list(shares.values())))}
    atomic_write_text(out_dir / "error_maps.json", to_json(summary))
    update_metrics_json(seg.run_dir, {"error_maps": {"folder": str(out_dir),
                                                     "mean_error_share_in_fov":
                                                     summary["mean_error_share_in_fov"]}})
    print(f"mean error share {summary['mean_error_share_in_fov']:.2%}; wrote {out_dir}",
          flush=True)
    return out_dir


def read_error_maps(folder: str | os.PathLike, names: Sequence[str],
                    shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """The float32 (H, W) error maps ``<folder>/<name>.png`` of the named training images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no error-map folder; run bin/make_error_maps.py on the "
                           "stage-1 run first")
    maps = []
    for name, shape in zip(names, shapes):
        path = folder / f"{name}.png"
        if not path.is_file():
            raise DatasetError(f"{path}: missing error map of training image {name!r}; run "
                               "bin/make_error_maps.py with the same dataset")
        m = read_mask(path, what="error map")
        if m.shape != tuple(shape):
            raise DatasetError(f"{path}: error map is {m.shape[::-1]}, the image "
                               f"{tuple(shape)[::-1]}")
        maps.append(m.astype(np.float32))
    return maps
