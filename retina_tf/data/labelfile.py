"""Seed-style label files (WILeroy/retina_unet): one line of folders, then one line per sample.

    images,1st_manual,mask
    21_training.tif,21_manual1.gif,21_training_mask.gif
    ...

The first line names the image, label and FOV-mask folders, absolute or relative to the label
file's own folder; every following line names the three files inside them.
"""

from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retina_tf.data.catalog import Sample, list_samples
from retina_tf.data.fov import estimate_fov
from retina_tf.data.io import (
    DatasetError,
    atomic_write_bytes,
    file_stem,
    read_av,
    read_image,
    read_mask,
    write_image_atomic,
)

log = logging.getLogger(__name__)


def read_label_file(path: str | os.PathLike) -> list[Sample]:
    """Reads a label file into :class:`Sample` records; every named file must exist."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: label file not found")
    lines = [ln.strip() for ln in _label_text(path).splitlines() if ln.strip()]
    if not lines:
        raise DatasetError(f"{path}: label file is empty")
    folders = [f.strip() for f in lines[0].split(",")]
    if len(folders) != 3:
        raise DatasetError(f"{path}:1: expected 'image_dir,label_dir,mask_dir', got {lines[0]!r}")
    dirs = [Path(f) if os.path.isabs(f) else path.parent / f for f in folders]
    samples, seen = [], {}
    for lineno, line in enumerate(lines[1:], start=2):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            raise DatasetError(f"{path}:{lineno}: expected 'image,label,mask', got {line!r}")
        files = [d / p if p else None for d, p in zip(dirs, parts)]
        if files[0] is None:
            raise DatasetError(f"{path}:{lineno}: the image name is empty")
        if files[1] is None:  # found here, not after every image is read
            raise DatasetError(f"{path}:{lineno}: the label name is empty (every photograph "
                               "needs its vessel label; only the mask may be left empty)")
        for f in files:
            if f is not None and not f.is_file():
                raise DatasetError(f"{path}:{lineno}: file not found: {f}")
        name = file_stem(parts[0])
        if name in seen:  # scored twice, and its pictures and outputs would overwrite each other
            raise DatasetError(f"{path}:{lineno}: {parts[0]} has the name {name!r} of line "
                               f"{seen[name]}; list each photograph once, under its own name")
        seen[name] = lineno
        samples.append(Sample(dataset="labelfile", name=name, image=files[0],
                              label=files[1], fov=files[2]))
    if not samples:
        raise DatasetError(f"{path}: label file lists no samples (empty split)")
    return samples


def _label_text(path: Path) -> str:
    """The label file's text: UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8",
    which would otherwise be part of the first folder), or UTF-16 with one (Excel's "Unicode
    Text"); other encodings are refused, not guessed."""
    data = path.read_bytes()
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text (byte {err.start} is not); save it as "
                           "UTF-8 (Excel: \"CSV UTF-8\")") from None


def write_label_file(path: str | os.PathLike, samples: Sequence[Sample],
                     fov_files: Sequence[Path] | None = None,
                     label_files: Sequence[Path] | None = None) -> Path:
    """Writes ``samples`` as a label file; ``fov_files`` and ``label_files`` replace their FOV
    masks and vessel labels.

    Each of the three columns must come from a single folder (true of every official layout);
    the file is written under a temporary name and renamed.
    """
    path = Path(path)
    if not samples:
        raise DatasetError(f"{path}: refusing to write a label file with no samples")
    fovs = list(fov_files) if fov_files is not None else [s.fov for s in samples]
    labels = list(label_files) if label_files is not None else [s.label for s in samples]
    columns = [[s.image for s in samples], labels, fovs]
    folders = []
    for title, col in zip(("image", "label", "mask"), columns):
        if any(f is None for f in col):
            raise DatasetError(f"{path}: some samples have no {title} file")
        parents = {Path(f).resolve().parent for f in col}
        if len(parents) != 1:
            raise DatasetError(f"{path}: {title} files come from several folders: "
                               f"{sorted(parents)}")
        folders.append(parents.pop())
    rel = [os.path.relpath(d, path.parent.resolve()) for d in folders]
    names = [[Path(f).name for f in row] for row in zip(*columns)]
    for field in [*rel, *(name for row in names for name in row)]:
        if "," in field:  # its fields are separated by commas, unquoted
            raise DatasetError(f"{path}: a label file cannot name {field!r}, which has a comma "
                               "in it: rename that file or folder")
    lines = [",".join(rel)] + [",".join(row) for row in names]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def export_label_files(dataset: str, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       splits: Sequence[str] = ("training", "test")) -> dict[str, Path]:
    """Writes ``<out_dir>/<split>.txt`` for each split of an official dataset folder.

    Datasets shipped without FOV masks (CHASE_DB1, STARE) get estimated masks written to
    ``<out_dir>/fov/<name>_fov.png``, and HRF-AV, whose vessel label is its A/V map, the
    vessels of that map to ``<out_dir>/vessel/<name>_vessel.png``, so that every line names
    three files.
    """

    out_dir = Path(out_dir)
    # every split listed first: an empty or broken one stops before anything is written
    listed = {split: list_samples(dataset, data_dir, split) for split in splits}
    # an earlier export's files go first: a kill between two splits' files left a new
    # training.txt beside the old test.txt of another dataset, which evaluate scored
    for split in {"training", "test", *listed}:  # (a partial copy writes training.txt alone)
        (out_dir / f"{split}.txt").unlink(missing_ok=True)
    written = {}
    for split, samples in listed.items():
        fov_files, label_files = [], []
        for s in samples:
            if s.fov is not None:
                fov_files.append(Path(s.fov))
            else:
                fov_files.append(out_dir / "fov" / f"{s.name}_fov.png")
                _write_mask(fov_files[-1], estimate_fov(read_image(s.image)), s.image)
            if s.label is not None:
                label_files.append(Path(s.label))
            else:
                label_files.append(out_dir / "vessel" / f"{s.name}_vessel.png")
                _write_mask(label_files[-1], read_av(s.av, s.av_format)[..., 2], s.av)
        written[split] = write_label_file(out_dir / f"{split}.txt", samples, fov_files,
                                          label_files)
    return written


def _write_mask(path: Path, mask, source) -> None:
    """Writes a mask derived from ``source`` unless ``path`` (an earlier export's) holds it
    already: one derived from a photograph or A/V map changed since is written anew, and said."""
    if path.is_file():
        try:
            if np.array_equal(read_mask(path), mask):
                return
        except DatasetError:  # unreadable (a killed write): written again
            pass
        log.info(f"{path}: written again; it no longer matches {source}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image_atomic(path, mask.astype("uint8") * 255)
