"""EAR-Net's stage-1 error maps: where a trained model's binary prediction disagrees with the
ground truth on the training images (Wang et al., DICTA 2021, https://arxiv.org/abs/2107.01351).

:func:`retina_tf.evaluation.write_error_maps` (``bin/make_error_maps.py``) writes them with
:func:`error_map`; ``bin/train.py`` reads them back with :func:`read_error_maps` for ``ear_net``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retina_tf.data.io import STAGING_PREFIX, DatasetError, read_mask

ERROR_MAPS_DIR = "error_maps"
ERROR_MAPS_JSON = "error_maps.json"  # the run, threshold and data the maps were made from


def error_map(probability: np.ndarray, target: np.ndarray, fov: np.ndarray,
              threshold: float = 0.5) -> np.ndarray:
    """Bool (H, W): inside the FOV, pixels whose thresholded prediction differs from the
    target (false positives and false negatives alike)."""
    return ((probability >= threshold) != (target > 0.5)) & fov.astype(bool)


def model_fingerprint(run_dir: str | os.PathLike) -> str | None:
    """The sha256 of a run's ``model.keras`` (None: none there): which model error maps
    were made by, recorded in ``error_maps.json`` as ``model_sha256``."""
    digest = hashlib.sha256()
    try:
        with open(Path(run_dir) / "model.keras", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def read_error_maps(folder: str | os.PathLike, names: Sequence[str],
                    shapes: Sequence[tuple[int, int]],
                    data: dict[str, str | None] | None = None,
                    stage1: str | os.PathLike | None = None) -> list[np.ndarray]:
    """The float32 (H, W) error maps ``<folder>/<name>.png`` of the named training images;
    ``data`` (:func:`retina_tf.data.pipeline.data_key`): the data they must have been made
    from, and ``stage1``: the run whose model must have made them (stage 2 learns where that
    model errs), when their ``error_maps.json`` says."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no error-map folder; run bin/make_error_maps.py on the "
                           "stage-1 run first")
    if any(folder.glob(f"{STAGING_PREFIX}*")):  # killed while it moved its maps in
        raise DatasetError(f"{folder}: an interrupted bin/make_error_maps.py left these maps "
                           "part old, part new; run it again")
    record = _record(folder / ERROR_MAPS_JSON)
    if stage1 is not None and _made_by_another_model(record, Path(stage1)):
        raise DatasetError(f"{folder}: error maps of {record.get('run')}'s model, not of the "
                           f"stage-1 run {stage1} as it is now; run bin/make_error_maps.py "
                           f"--model={stage1}")
    made_from = record.get("data")
    if data is not None and made_from is not None and made_from != data:
        def show(d):
            return d["label_file_path"] or f"{d['dataset']} in {d['data_dir']}"
        raise DatasetError(f"{folder}: error maps of {show(made_from)}, but this run trains on "
                           f"{show(data)}; run bin/make_error_maps.py with this run's data")
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


def _record(path: Path) -> dict:
    """An ``error_maps.json`` ({}: none, or maps made elsewhere)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _made_by_another_model(record: dict, stage1: Path) -> bool:
    """Whether the maps ``record`` describes were made by another model than ``stage1``'s
    ``model.keras`` (by its fingerprint; by the run's folder for maps that record none)."""
    if record.get("model_sha256"):
        return record["model_sha256"] != model_fingerprint(stage1)
    return bool(record.get("run")) and Path(record["run"]).resolve() != stage1.resolve()
