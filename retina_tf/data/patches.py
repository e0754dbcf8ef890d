"""Sliding-window patch extraction and recomposition with overlap averaging.

Windows start every ``stride`` pixels and one extra window is placed flush with the far border
whenever the stride does not land there, so every pixel is covered and recomposing the extracted
patches of an image returns the image exactly, for any patch size and stride. Images smaller than
the patch are zero-padded at the bottom/right and cropped back on recomposition.
"""

from __future__ import annotations

import numpy as np


def window_starts(length: int, patch: int, stride: int) -> np.ndarray:
    """Start offsets of windows of size ``patch`` covering ``[0, max(length, patch))``."""
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be >= 1, got patch={patch}, stride={stride}")
    if stride > patch:
        raise ValueError(f"stride {stride} > patch {patch} would leave pixels uncovered")
    last = max(length, patch) - patch
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return np.asarray(starts, dtype=np.int64)


def pad_to_at_least(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Zero-pads (bottom/right) an HxW[xC] array to at least ``height`` x ``width``."""
    ph, pw = max(height - image.shape[0], 0), max(width - image.shape[1], 0)
    if ph == 0 and pw == 0:
        return image
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad)


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pads (bottom/right) so height and width are multiples of ``multiple``."""
    h, w = image.shape[:2]
    return pad_to_at_least(image, -(-h // multiple) * multiple, -(-w // multiple) * multiple)


def extract_patches(image: np.ndarray, patch_size: int | tuple[int, int],
                    stride: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Cuts an (H, W[, C]) image into overlapping windows.

    Returns:
        patches: (N, ph, pw[, C]) array, same dtype as ``image``.
        positions: (N, 2) int array of (row, col) window starts.
    """
    ph, pw = (patch_size, patch_size) if np.isscalar(patch_size) else patch_size
    sh, sw = (stride, stride) if np.isscalar(stride) else stride
    padded = pad_to_at_least(image, ph, pw)
    rows = window_starts(image.shape[0], ph, sh)
    cols = window_starts(image.shape[1], pw, sw)
    positions = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    patches = np.stack([padded[r:r + ph, c:c + pw] for r, c in positions])
    return patches, positions


def recompose_patches(patches: np.ndarray, positions: np.ndarray, image_shape: tuple[int, int]
                      ) -> np.ndarray:
    """Averages overlapping windows back into an image of ``image_shape`` = (H, W).

    The inverse of :func:`extract_patches`: ``recompose_patches(*extract_patches(x, p, s),
    x.shape[:2])`` equals ``x`` (as float32).
    """
    patches = np.asarray(patches, dtype=np.float32)
    ph, pw = patches.shape[1:3]
    h, w = image_shape[:2]
    out_shape = (max(h, ph), max(w, pw)) + patches.shape[3:]
    total = np.zeros(out_shape, np.float64)  # float64 sums: k overlaps average back exactly
    count = np.zeros(out_shape[:2], np.float32)
    for patch, (r, c) in zip(patches, positions):
        total[r:r + ph, c:c + pw] += patch
        count[r:r + ph, c:c + pw] += 1
    if count[:h, :w].min() == 0:
        raise ValueError("the patch positions do not cover the whole image")
    count = count.reshape(count.shape + (1,) * (total.ndim - 2))
    return (total / count)[:h, :w].astype(np.float32)
