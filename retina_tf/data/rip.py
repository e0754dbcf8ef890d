"""RIP-AV's data: normalized distance maps and representative-instance patches.

RIP-AV (Dai et al., "RIP-AV: Joint Representative Instance Pre-training with Context Aware
Network for Retinal Artery/Vein Segmentation", MICCAI 2024,
https://papers.miccai.org/miccai-2024/paper/1711_paper.pdf; code github.com/weidai00/RIP-AV)
needs two things from the A/V labels besides the labels themselves:

* :func:`distance_targets`: per-class distance-transform maps, normalized so that every vessel
  centreline is 1 whatever the vessel's width, regressed by the Distance Aware head;
* :func:`select_rip_patches` and :func:`cut_patches`: for RIP pre-training, patches of several
  sizes centred on vessel skeleton points and labelled by the classes they hold (artery only,
  vein only, both), resized to one size for a multi-label classifier (:func:`rip_labels`).

Where the selection differs from RIP-AV's code (``generate_patch_selection_for_RIP.py``): that
code puts a patch at a random offset within one patch side of a class skeleton point, asks for
at least 50 pixels of a present class and none of an absent one, and uses 64/96 px patches for
single-class and 96/128/256 px for two-class instances. Here patches are centred on vessel
skeleton points and presence is a share of the patch (``min_fraction``; ``absent_fraction=0``
gives the code's strict absence), so one rule serves every size.

``write_rip_patches(cfg)`` is what ``bin/generate_rip_patches.py`` runs: it reads the training
split only, selects and cuts the patches and writes ``patches.csv``, ``patches.npz`` and
``preview.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from retina_tf import visualize
from retina_tf.config import RipPatchConfig, takes
from retina_tf.data.av import encode_av_rgb
from retina_tf.data.catalog import list_samples, normalize_dataset_name
from retina_tf.data.io import DatasetError, atomic_write_bytes, clear_killed_writes, read_sample
from retina_tf.errors import ConfigError
from retina_tf.progress import progress

log = logging.getLogger(__name__)

RIP_LABELS = ("artery", "vein", "both")
DEFAULT_SIZES = (48, 96, 144)
# Datasets of retina_tf.data.catalog whose samples carry A/V labels.
AV_DATASETS = ("rite", "les_av", "hrf_av", "synthetic")
CSV_COLUMNS = ("image", "row", "col", "size", "artery_fraction", "vein_fraction", "label")

PATCHES_CSV, PATCHES_NPZ, PREVIEW_PNG = "patches.csv", "patches.npz", "preview.png"


# --- Distance Aware targets ------------------------------------------------------------------

def normalized_distance(mask: np.ndarray) -> np.ndarray:
    """The normalized distance map of one binary mask (see :func:`distance_targets`).

    Args:
        mask: ``HxW`` mask (bool, or numbers where > 0.5 is foreground).

    Returns:
        ``HxW`` float32: 0 off the mask; on it the distance to the nearest background pixel over
        that distance at the nearest skeleton pixel, clipped to at most 1.
    """
    mask = np.asarray(mask)
    mask = mask if mask.dtype == bool else mask > 0.5
    if mask.ndim != 2:
        raise ValueError(f"a mask must be HxW, got shape {mask.shape}")
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    # A background frame makes the image border a vessel edge for the distance, as it already is
    # for skeletonize (and the EDT needs some background pixel).
    padded = np.pad(mask, 1)
    # OpenCV's exact (Felzenszwalb) Euclidean transform equals scipy's distance_transform_edt to
    # float32 precision and is about ten times faster on a 3504x2336 HRF map.
    to_edge = cv2.distanceTransform(padded.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    skeleton = skeletonize(padded)
    if not skeleton.any():  # cannot happen for a non-empty mask; guards the EDT below
        skeleton.flat[np.argmax(to_edge)] = True
    # For every pixel, the coordinates of the nearest centreline pixel: the nearest zero of ~skel.
    nearest = ndimage.distance_transform_edt(~skeleton, return_distances=False,
                                             return_indices=True)
    inside = np.nonzero(padded)
    radius = to_edge[nearest[0][inside], nearest[1][inside]]  # >= 1: skeleton lies in the mask
    out = np.zeros(padded.shape, np.float32)
    # Pixels nearer a thinner vessel's centreline than their own (at branchings) exceed 1.
    out[inside] = np.minimum(to_edge[inside] / radius, 1.0)
    return out[1:-1, 1:-1]


def distance_targets(av: np.ndarray) -> np.ndarray:
    """Per-class normalized distance maps, the targets of RIP-AV's Distance Aware head.

    RIP-AV (Dai et al., MICCAI 2024, https://papers.miccai.org/miccai-2024/paper/1711_paper.pdf)
    regresses, for artery, vein and vessel, a distance-transform map normalized per vessel.
    Here, for each channel on its own: 0 off the class mask; inside it, the Euclidean distance
    ``d(p)`` to the nearest background pixel divided by ``d(s)`` at the nearest centreline pixel
    ``s`` (``skimage`` skeleton of that channel), clipped to [0, 1]. So the map is exactly 1 on
    every centreline, thick or thin, and falls towards ``1 / d(s)`` at the vessel edge (a
    5-pixel-wide bar: 1/3, 2/3, 1, 2/3, 1/3). Pixels outside the image count as background.

    Args:
        av: ``HxWx3`` A/V target, channels (artery, vein, vessel); bool, or numbers where > 0.5
            is foreground.

    Returns:
        ``HxWx3`` float32 in [0, 1], 0 exactly off each class mask, in (0, 1] on it.

    Raises:
        ValueError: when ``av`` is not ``HxWx3``.

    Example:
        >>> import numpy as np
        >>> bar = np.zeros((9, 20, 3), bool)
        >>> bar[2:7, :, :] = True
        >>> distance_targets(bar)[2:7, 10, 0].astype(float).round(3).tolist()
        [0.333, 0.667, 1.0, 0.667, 0.333]
    """
    av = np.asarray(av)
    if av.ndim != 3 or av.shape[-1] != 3:
        raise ValueError(f"an A/V target must be HxWx3 (artery, vein, vessel), got shape "
                         f"{av.shape}")
    return np.stack([normalized_distance(av[..., c]) for c in range(3)], axis=-1)


def seed_distance_targets(av: np.ndarray) -> np.ndarray:
    """The Distance Aware targets in RIP-AV's own form (its ``generate_cmap_base_label.py``):
    per class, the Euclidean distance transform of the class mask divided by its largest value
    in the image (min-max normalized; the minimum is the background's 0). Unlike
    :func:`distance_targets`, a thin vessel's centreline gets a small value, not 1.

    Example:
        >>> import numpy as np
        >>> av = np.zeros((12, 20, 3), bool)
        >>> av[1:8, :, :] = True; av[10, :, :] = True   # a 7-px and a 1-px vessel
        >>> seed_distance_targets(av)[:, 10, 0].round(2).tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.25, 0.0]
    """
    av = np.asarray(av)
    if av.ndim != 3 or av.shape[-1] != 3:
        raise ValueError(f"an A/V target must be HxWx3 (artery, vein, vessel), got shape "
                         f"{av.shape}")
    out = np.zeros(av.shape, np.float32)
    for c in range(3):
        edt = ndimage.distance_transform_edt(av[..., c] > 0.5)
        if edt.max() > 0:
            out[..., c] = edt / edt.max()
    return out


# --- representative-instance patches ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RipPatch:
    """One representative-instance patch: a ``size`` square centred on a vessel skeleton point.

    The patch covers rows ``top .. top + size - 1`` with ``top = row - size // 2`` (columns
    likewise), so for an even size the centre pixel sits just below and right of the middle.
    Parts outside the image count as background and are cut as zeros.

    Attributes:
        image_index: index of the image in the sequences given to :func:`select_rip_patches`.
        name: the image's sample name.
        row, col: the centre, a skeleton pixel of the vessel channel inside the FOV.
        size: side in pixels before resizing.
        artery_fraction, vein_fraction: share of the ``size**2`` pixels that are artery / vein
            (crossings count for both).
        label: ``"artery"``, ``"vein"`` or ``"both"`` (the classes present).
    """

    image_index: int
    name: str
    row: int
    col: int
    size: int
    artery_fraction: float
    vein_fraction: float
    label: str

    @property
    def top(self) -> int:
        return self.row - self.size // 2

    @property
    def left(self) -> int:
        return self.col - self.size // 2


@dataclasses.dataclass
class _Candidates:
    """Skeleton centres of one image and their class fractions, one row per patch size."""

    rows: np.ndarray      # (K,) int
    cols: np.ndarray      # (K,) int
    artery: np.ndarray    # (S, K) float64
    vein: np.ndarray      # (S, K) float64


def _integral(mask: np.ndarray) -> np.ndarray:
    """``(H+1, W+1)`` summed-area table: ``table[i, j] = mask[:i, :j].sum()``."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])
    return table


def _window_fractions(table: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                      size: int) -> np.ndarray:
    """Foreground share of the ``size`` squares centred at ``(rows, cols)``, outside = 0.

    Clipping each window to the image before the four look-ups gives exactly the sum over the
    zero-padded window, so no padded copy of the label is needed.
    """
    height, width = table.shape[0] - 1, table.shape[1] - 1
    top = np.clip(rows - size // 2, 0, height)
    bottom = np.clip(rows - size // 2 + size, 0, height)
    left = np.clip(cols - size // 2, 0, width)
    right = np.clip(cols - size // 2 + size, 0, width)
    sums = table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]
    return sums / float(size * size)


def _check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise ValueError(f"patch sizes must be distinct positive integers, got {list(sizes)}")
    return sizes


def _candidates(av: np.ndarray, fov: np.ndarray, sizes: Sequence[int]) -> _Candidates:
    """Every skeleton pixel of the vessel channel inside the FOV, with the artery and vein
    fractions of the patch of each size centred there (summed-area tables, no per-patch loop)."""
    av = np.asarray(av, bool)
    fov = np.asarray(fov, bool)
    if av.ndim != 3 or av.shape[-1] != 3:
        raise ValueError(f"an A/V target must be HxWx3 (artery, vein, vessel), got {av.shape}")
    if fov.shape != av.shape[:2]:
        raise ValueError(f"FOV mask is {fov.shape} but the A/V target {av.shape[:2]}")
    rows, cols = np.nonzero(skeletonize(av[..., 2]) & fov)
    artery, vein = _integral(av[..., 0]), _integral(av[..., 1])
    return _Candidates(rows, cols,
                       np.stack([_window_fractions(artery, rows, cols, s) for s in sizes]),
                       np.stack([_window_fractions(vein, rows, cols, s) for s in sizes]))


def _label_codes(artery: np.ndarray, vein: np.ndarray, min_fraction: float,
                 absent_fraction: float | None = None) -> np.ndarray:
    """Index into :data:`RIP_LABELS` (artery only, vein only, both), -1 for none of them."""
    has_a, has_v = artery >= min_fraction, vein >= min_fraction
    if absent_fraction is None:
        no_a, no_v = ~has_a, ~has_v
    else:
        no_a, no_v = artery <= absent_fraction, vein <= absent_fraction
    return np.select([has_a & has_v, has_a & no_v, has_v & no_a], [2, 0, 1], default=-1)


def _draw(candidates: Sequence[_Candidates], names: Sequence[str], sizes: tuple[int, ...],
          per_class: int, min_fraction: float, absent_fraction: float | None, seed: int
          ) -> tuple[list[RipPatch], dict[tuple[str, int], int]]:
    """Samples up to ``per_class`` candidates per (label, size); also returns how many each
    (label, size) had to choose from."""
    image_index = np.concatenate([np.full(len(c.rows), i) for i, c in enumerate(candidates)])
    rows = np.concatenate([c.rows for c in candidates])
    cols = np.concatenate([c.cols for c in candidates])
    artery = np.concatenate([c.artery for c in candidates], axis=1)
    vein = np.concatenate([c.vein for c in candidates], axis=1)
    codes = _label_codes(artery, vein, min_fraction, absent_fraction)  # (S, K)
    rng = np.random.default_rng(seed)
    records, available = [], {}
    for code, label in enumerate(RIP_LABELS):
        for j, size in enumerate(sizes):
            pool = np.flatnonzero(codes[j] == code)
            available[label, size] = len(pool)
            # Sorted so records read image by image; which ones are taken is the random part.
            picked = np.sort(rng.choice(pool, min(per_class, len(pool)), replace=False))
            records += [RipPatch(int(image_index[k]), str(names[image_index[k]]), int(rows[k]),
                                 int(cols[k]), size, float(artery[j, k]), float(vein[j, k]),
                                 label) for k in picked]
    return records, available


def select_rip_patches(targets: Sequence[np.ndarray], fovs: Sequence[np.ndarray],
                       names: Sequence[str], sizes: Sequence[int] = DEFAULT_SIZES,
                       per_class: int = 400, min_fraction: float = 0.02,
                       seed: int = 0, absent_fraction: float | None = None
                       ) -> list[RipPatch]:
    """Selects RIP-AV's representative-instance patches from A/V labelled images.

    RIP pre-training (Dai et al., MICCAI 2024,
    https://papers.miccai.org/miccai-2024/paper/1711_paper.pdf) teaches an encoder whether a
    patch holds arteries, veins or both, from patches of mixed sizes centred on vessel skeleton
    points. Candidate centres are the skeleton pixels of the vessel channel inside the
    FOV; for a patch of side ``size`` there, the artery fraction ``a`` and vein fraction ``v``
    are shares of the ``size**2`` pixels (parts over the image border count as background). A
    class is present when its fraction is ``>= min_fraction``; the label is ``"artery"`` (artery
    present, vein not), ``"vein"`` (the reverse) or ``"both"``; patches with neither are dropped.
    By default a class is absent whenever it is not present, so an ``"artery"`` patch may hold
    a little vein (under ``min_fraction``); ``absent_fraction`` makes absence stricter (RIP-AV's
    own code uses 0: not one pixel of the other class) and drops the patches in between.
    Up to ``per_class`` patches per (label, size) are drawn uniformly without replacement over
    all images' candidates with ``numpy.random.default_rng(seed)``.

    Args:
        targets: ``HxWx3`` bool A/V targets (artery, vein, vessel), one per image.
        fovs: ``HxW`` bool FOV masks of the same images.
        names: the images' names, copied into the records.
        sizes: patch sides in pixels (distinct, positive), default (48, 96, 144).
        per_class: the most patches per (label, size), >= 1.
        min_fraction: share of the patch a class needs to count as present, in (0, 1].
        seed: seed of the draw; the same seed gives the same patches.
        absent_fraction: a class is absent only when its fraction is ``<= absent_fraction``,
            in [0, min_fraction); None (default) means absent = not present.

    Returns:
        :class:`RipPatch` records ordered by label (:data:`RIP_LABELS`), then size (as given),
        then image and position. Fewer than ``per_class`` where a (label, size) has fewer
        candidates; an empty list when no image has a candidate.

    Raises:
        ValueError: for mismatched lengths or shapes, or a bad size, count or fraction.

    Example:
        >>> import numpy as np
        >>> from retina_tf.data.synthetic import generate_fundus
        >>> f = generate_fundus(0, (128, 128))
        >>> av = np.stack([f.artery, f.vein, f.artery | f.vein], -1)
        >>> patches = select_rip_patches([av], [f.fov], ["s0"], sizes=(32,), per_class=5)
        >>> sorted({p.label for p in patches}) <= ["artery", "both", "vein"]
        True
    """
    if not len(targets) == len(fovs) == len(names):
        raise ValueError(f"got {len(targets)} targets, {len(fovs)} FOV masks and {len(names)} "
                         "names; give one of each per image")
    sizes = _check_sizes(sizes)
    if int(per_class) < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if not 0.0 < float(min_fraction) <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    _check_absent(absent_fraction, min_fraction)
    candidates = [_candidates(t, f, sizes) for t, f in zip(targets, fovs)]
    if not candidates:
        return []
    records, _ = _draw(candidates, names, sizes, int(per_class), float(min_fraction),
                       absent_fraction, seed)
    return records


def _check_absent(absent_fraction: float | None, min_fraction: float) -> None:
    if absent_fraction is not None and not 0.0 <= absent_fraction < min_fraction:
        raise ValueError(f"absent_fraction must be in [0, min_fraction={min_fraction}), got "
                         f"{absent_fraction}")


def rip_labels(records: Sequence[RipPatch]) -> np.ndarray:
    """``(N, 2)`` float32 multi-label targets of RIP pre-training: (artery present, vein
    present); ``"both"`` is (1, 1)."""
    return np.array([[r.label in ("artery", "both"), r.label in ("vein", "both")]
                     for r in records], np.float32).reshape(-1, 2)


def cut_patches(images: Sequence[np.ndarray] | Mapping[int, np.ndarray],
                records: Sequence[RipPatch], out_size: int,
                interpolation: int | None = None) -> np.ndarray:
    """Cuts the records' patches out of their images and resizes them all to one size.

    Args:
        images: the images the records index (``images[record.image_index]``): a sequence, or a
            mapping holding only the indices needed. ``HxW`` or ``HxWxC``; uint8 stays uint8,
            anything else (bool included) is cut as float32.
        records: from :func:`select_rip_patches`.
        out_size: side of every output patch.
        interpolation: an OpenCV flag; default ``INTER_AREA`` when shrinking (no aliasing of
            thin vessels) and ``INTER_LINEAR`` when enlarging. Pass ``cv2.INTER_NEAREST`` for
            label maps.

    Returns:
        ``(N, out_size, out_size, C)`` array (C = 1 for ``HxW`` images); parts of a patch
        outside its image are zeros.

    Raises:
        ValueError: for a bad ``out_size`` or images whose channel counts differ.
    """
    if int(out_size) < 1:
        raise ValueError(f"out_size must be >= 1, got {out_size}")
    out_size = int(out_size)
    needed = sorted({r.image_index for r in records})
    arrays = {}
    for i in needed:
        array = np.asarray(images[i])
        array = array[..., None] if array.ndim == 2 else array
        arrays[i] = array if array.dtype == np.uint8 else array.astype(np.float32)
    kinds = {(a.shape[-1], a.dtype) for a in arrays.values()}
    if len(kinds) > 1:
        raise ValueError(f"images differ in channels or dtype: {sorted(map(str, kinds))}")
    channels, dtype = kinds.pop() if kinds else (3, np.dtype(np.uint8))
    out = np.zeros((len(records), out_size, out_size, channels), dtype)
    for n, record in enumerate(records):
        image = arrays[record.image_index]
        size, top, left = record.size, record.top, record.left
        patch = np.zeros((size, size, channels), dtype)
        r0, r1 = max(top, 0), min(top + size, image.shape[0])
        c0, c1 = max(left, 0), min(left + size, image.shape[1])
        if r0 < r1 and c0 < c1:
            patch[r0 - top:r1 - top, c0 - left:c1 - left] = image[r0:r1, c0:c1]
        if size != out_size:
            flag = interpolation if interpolation is not None else (
                cv2.INTER_AREA if size > out_size else cv2.INTER_LINEAR)
            patch = cv2.resize(patch, (out_size, out_size), interpolation=flag)
        out[n] = patch.reshape(out_size, out_size, channels)
    return out


# --- preview ---------------------------------------------------------------------------------

def preview_indices(records: Sequence[RipPatch], per_label: int = 8) -> list[int]:
    """Indices of up to ``per_label`` records of each label, spread evenly over its records
    (so over its sizes too, records being ordered by size within a label)."""
    picked = []
    for label in RIP_LABELS:
        of_label = [n for n, r in enumerate(records) if r.label == label]
        if of_label:
            spots = np.linspace(0, len(of_label) - 1, min(per_label, len(of_label)))
            picked += [of_label[int(round(s))] for s in spots]
    return picked


def preview_grid(image_patches: np.ndarray, av_patches: np.ndarray,
                 records: Sequence[RipPatch]) -> np.ndarray:
    """One row per label: each patch beside its A/V ground truth (red artery, blue vein, green
    crossing, white uncertain) with a yellow cross on the centre pixel and its size beneath.

    Args:
        image_patches: ``(N, P, P, 3)`` uint8 RGB patches.
        av_patches: ``(N, P, P, 3)`` uint8 RGB A/V maps of the same patches.
        records: the N records (for labels and sizes).

    Returns:
        ``HxWx3`` uint8 RGB picture.
    """
    n, side = len(records), image_patches.shape[1]
    gap, caption, margin = 4, 14, 64
    per_row = max([sum(r.label == label for r in records) for label in RIP_LABELS] + [1])
    cell_w, cell_h = 2 * side + gap, side + caption
    labels = [label for label in RIP_LABELS if any(r.label == label for r in records)]
    height = gap + max(len(labels), 1) * (cell_h + gap)
    width = margin + per_row * (cell_w + 3 * gap)
    grid = np.full((height, width, 3), 40, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for row, label in enumerate(labels):
        y = gap + row * (cell_h + gap)
        cv2.putText(grid, label, (4, y + side // 2 + 4), font, 0.45, (230, 230, 230), 1,
                    cv2.LINE_AA)
        members = [k for k in range(n) if records[k].label == label]
        for col, k in enumerate(members):
            x = margin + col * (cell_w + 3 * gap)
            grid[y:y + side, x:x + side] = image_patches[k]
            av = av_patches[k].copy()
            c = side // 2
            av[c, max(c - 3, 0):c + 4] = (255, 255, 0)
            av[max(c - 3, 0):c + 4, c] = (255, 255, 0)
            grid[y:y + side, x + side + gap:x + 2 * side + gap] = av
            cv2.putText(grid, f"{records[k].size}px", (x, y + side + caption - 3), font, 0.35,
                        (200, 200, 200), 1, cv2.LINE_AA)
    return grid


# --- bin/generate_rip_patches.py ---------------------------------------------------------

def _sizes_flag(values: Sequence[str]) -> tuple[int, ...]:
    try:
        return _check_sizes([int(str(v).strip()) for v in values])
    except ValueError as err:
        raise ConfigError(f"--rip_sizes={','.join(map(str, values))}: {err}") from err


def _csv_text(records: Sequence[RipPatch]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        writer.writerow([r.name, r.row, r.col, r.size, f"{r.artery_fraction:.6f}",
                         f"{r.vein_fraction:.6f}", r.label])
    return buffer.getvalue()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


@takes(RipPatchConfig)
def write_rip_patches(cfg: RipPatchConfig) -> Path:
    """Selects and cuts RIP-AV pre-training patches from the training split of an A/V dataset.

    Reads ``--dataset``/``--data_dir`` (rite, les_av, hrf_av or synthetic), **training split
    only**: the patches pre-train the encoder that is then fine-tuned and evaluated on the same
    dataset, so its test images must stay unseen. Writes to ``--rip_patches``, each file atomically:

    * ``patches.csv``: one row per patch: image, row, col, size, artery_fraction,
      vein_fraction, label;
    * ``patches.npz``: ``images`` (N, P, P, 3) uint8 RGB resized to ``--rip_out_size``,
      ``labels`` (N, 2) float32 (artery, vein present), and ``names``, ``rows``, ``cols``,
      ``sizes``, ``artery_fraction``, ``vein_fraction``, ``label`` per patch, plus ``config``
      (JSON of the settings);
    * ``preview.png``: a few patches per label beside their A/V ground truth.

    Images are read twice (once to find centres, once to cut) so that only one full-size image
    is held at a time (HRF-AV's are 3504x2336).

    Returns:
        The output folder.

    Raises:
        ConfigError: for a label file instead of a dataset, no dataset, bad ``--rip_*`` values
            or a missing ``--rip_patches``.
        DatasetError: for a dataset without A/V labels, a missing folder, or no patch passing
            ``--rip_min_fraction``.
    """

    started = time.time()
    if cfg.label_file_path:
        raise ConfigError(f"--label_file_path={cfg.label_file_path}: label files carry no "
                          "artery/vein labels; give --dataset and --data_dir of an A/V dataset "
                          f"({', '.join(AV_DATASETS)})")
    if not cfg.dataset or not cfg.data_dir:
        raise ConfigError("give --dataset and --data_dir of an A/V dataset "
                          f"({', '.join(AV_DATASETS)})")
    if not cfg.rip_patches:
        raise ConfigError("--rip_patches is required: the folder for patches.csv, patches.npz and "
                          "preview.png")
    sizes = _sizes_flag(cfg.rip_sizes)
    if cfg.rip_out_size < 1 or cfg.rip_per_class < 1:
        raise ConfigError(f"--rip_out_size={cfg.rip_out_size} and --rip_per_class="
                          f"{cfg.rip_per_class} must be >= 1")
    if not 0.0 < cfg.rip_min_fraction <= 1.0:
        raise ConfigError(f"--rip_min_fraction={cfg.rip_min_fraction} must be in (0, 1]")
    absent = cfg.rip_absent_fraction
    try:
        _check_absent(absent, cfg.rip_min_fraction)
    except ValueError as err:
        raise ConfigError(f"--rip_absent_fraction={absent}: {err}") from err
    dataset = normalize_dataset_name(cfg.dataset)
    # Never the test split: see the docstring.
    samples = list_samples(dataset, cfg.data_dir, "training")
    without_av = [s for s in samples if s.av is None]
    if without_av:
        raise DatasetError(f"--dataset={cfg.dataset}: the training images in {cfg.data_dir} "
                           f"have no artery/vein labels (e.g. {without_av[0].image}); RIP "
                           f"patches need an A/V dataset: {', '.join(AV_DATASETS)}")

    # Pass 1: candidate centres and their class fractions, one image at a time.
    candidates = []
    for sample in progress(samples, "rip patches: candidates", name=lambda s: s.name):
        data = read_sample(sample)
        candidates.append(_candidates(data.av, data.fov, sizes))
    names = [s.name for s in samples]
    records, available = _draw(candidates, names, sizes, cfg.rip_per_class,
                               cfg.rip_min_fraction, absent, cfg.seed)
    if not records:
        raise DatasetError(f"no patch of the {len(samples)} training images in {cfg.data_dir} "
                           f"holds artery or vein >= --rip_min_fraction={cfg.rip_min_fraction} "
                           f"of its area (--rip_sizes={','.join(map(str, sizes))}); lower "
                           "--rip_min_fraction or use smaller sizes")

    # Pass 2: cut the patches (and the A/V maps of the preview's) image by image.
    out_size = cfg.rip_out_size
    patches = np.zeros((len(records), out_size, out_size, 3), np.uint8)
    shown = preview_indices(records)
    shown_set = set(shown)
    av_shown = {}
    for i, sample in enumerate(progress(samples, "rip patches: cutting", name=lambda s: s.name)):
        mine = [n for n, r in enumerate(records) if r.image_index == i]
        if not mine:
            continue
        data = read_sample(sample)
        patches[mine] = cut_patches({i: data.image}, [records[n] for n in mine], out_size)
        preview = [n for n in mine if n in shown_set]
        if preview:
            av_rgb = encode_av_rgb(data.av[..., 0], data.av[..., 1], data.av[..., 2])
            cut = cut_patches({i: av_rgb}, [records[n] for n in preview], out_size,
                              interpolation=cv2.INTER_NEAREST)
            av_shown.update(zip(preview, cut))

    out_dir = Path(cfg.rip_patches)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_killed_writes(out_dir)
    config = {"dataset": dataset, "data_dir": str(cfg.data_dir), "split": "training",
              "sizes": list(sizes), "out_size": out_size, "per_class": cfg.rip_per_class,
              "min_fraction": cfg.rip_min_fraction, "absent_fraction": absent,
              "seed": cfg.seed}
    # everything made before anything is written: a kill while the slow parts run (the npz's
    # compression, the preview) leaves the old set whole, not a new csv beside an old npz
    npz = _npz_bytes(
        images=patches, labels=rip_labels(records),
        names=np.array([r.name for r in records]),
        rows=np.array([r.row for r in records], np.int32),
        cols=np.array([r.col for r in records], np.int32),
        sizes=np.array([r.size for r in records], np.int32),
        artery_fraction=np.array([r.artery_fraction for r in records], np.float32),
        vein_fraction=np.array([r.vein_fraction for r in records], np.float32),
        label=np.array([r.label for r in records]),
        config=np.array(json.dumps(config)))
    preview = preview_grid(patches[shown], np.stack([av_shown[n] for n in shown]),
                           [records[n] for n in shown])
    atomic_write_bytes(out_dir / PATCHES_NPZ, npz)
    atomic_write_bytes(out_dir / PATCHES_CSV, _csv_text(records).encode())
    visualize.save_png(out_dir / PREVIEW_PNG, preview)

    log.info(f"RIP patches from {len(samples)} training images of {dataset} ({cfg.data_dir}), "
             f"resized to {out_size}x{out_size}: taken / candidates")
    log.info("  label   " + "".join(f"{s:>16}" for s in sizes) + f"{'total':>8}")
    for label in RIP_LABELS:
        taken = [sum(r.label == label and r.size == s for r in records) for s in sizes]
        cells = "".join(f"{t:>7} / {available[label, s]:<6}" for t, s in zip(taken, sizes))
        log.info(f"  {label:<8}{cells}{sum(taken):>8}")
    log.info(f"{len(records)} patches; wrote {out_dir / PATCHES_CSV}, {PATCHES_NPZ} and "
             f"{PREVIEW_PNG} in {time.time() - started:.1f} s")
    return out_dir
