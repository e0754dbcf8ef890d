"""Artery/vein post-processing along the predicted vessel tree.

A vessel keeps its class between two branch or crossing points, but a pixel-wise A/V network
decides every pixel on its own, so long vessels come out striped: a few pixels of "vein" inside
an artery. :func:`vote_av_segments` lets every vessel segment (the piece of the predicted
skeleton between two junctions) decide once, from the mean evidence of all its pixels. Cutting at
junctions keeps an artery and the vein it crosses in separate segments. Graph-based A/V
labelling on the vessel skeleton goes back to Dashtbozorg et al., "An automatic graph-based
approach for artery/vein classification in retinal images", IEEE TIP 2014; this is its simplest
form (no cross-junction propagation).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

# Logit differences are clipped before averaging so that a few saturated pixels cannot outvote
# the rest of a segment.
_CLIP = 8.0
_EIGHT = np.ones((3, 3), np.uint8)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def skeleton_segments(vessel: np.ndarray, junction_radius: int = 2) -> np.ndarray:
    """Labels (int32, 0 = none) of the skeleton of ``vessel`` cut at its junctions.

    A skeleton pixel with three or more skeleton neighbours is a junction (a branching or a
    crossing); the skeleton within ``junction_radius`` px of one is removed, and what remains is
    labelled by 8-connected component.
    """
    skel = skeletonize(np.asarray(vessel, bool))
    neighbours = ndimage.convolve(skel.astype(np.uint8), _EIGHT, mode="constant") - skel
    junctions = skel & (neighbours >= 3)
    if junctions.any() and junction_radius > 0:
        near = ndimage.distance_transform_edt(~junctions) <= junction_radius
        skel = skel & ~near
    labels, _ = ndimage.label(skel, structure=_EIGHT)
    return labels.astype(np.int32)


def vote_av_segments(prob: np.ndarray, threshold: float = 0.5, reach: float = 3.0,
                     junction_radius: int = 2) -> np.ndarray:
    """Sets the artery/vein decision of every vessel segment to its mean over the segment.

    Args:
        prob: (H, W, 3) probabilities (artery, vein, vessel).
        threshold: the vessel map whose skeleton is cut into segments is ``prob[..., 2] >=
            threshold``.
        reach: pixels up to this far outside the vessel map also take the decision of the nearest
            segment (a thin vessel the vessel map half misses); farther pixels keep their own.
        junction_radius: see :func:`skeleton_segments`.

    Returns (H, W, 3) probabilities: the vessel channel unchanged; for every pixel assigned to a
    segment, artery and vein logits moved symmetrically so that their difference is the
    segment's mean clipped logit difference (their mean, the vessel evidence, is kept). So
    ``p_artery >= p_vein`` is the same all along a segment.
    """
    prob = np.asarray(prob, np.float32)
    if prob.ndim != 3 or prob.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) artery/vein/vessel probabilities, got {prob.shape}")
    vessel = prob[..., 2] >= threshold
    segments = skeleton_segments(vessel, junction_radius)
    out = prob.copy()
    if not segments.any():
        return out
    la, lv = _logit(prob[..., 0]), _logit(prob[..., 1])
    diff = np.clip(la - lv, -_CLIP, _CLIP)
    # every pixel's nearest segment pixel (there is one: segments is not empty)
    rows, cols = ndimage.distance_transform_edt(segments == 0, return_distances=False,
                                                return_indices=True)
    owner = segments[rows, cols]
    # a segment's evidence: its vessel pixels (those nearer to it than to any other segment)
    n = segments.max() + 1
    total = np.bincount(owner[vessel], weights=diff[vessel], minlength=n)
    count = np.bincount(owner[vessel], minlength=n)
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    outside = ndimage.distance_transform_edt(~vessel)
    assigned = (count[owner] > 0) & (outside <= reach)
    centre = 0.5 * (la + lv)
    d = mean[owner]
    out[..., 0] = np.where(assigned, 1 / (1 + np.exp(-(centre + d / 2))), prob[..., 0])
    out[..., 1] = np.where(assigned, 1 / (1 + np.exp(-(centre - d / 2))), prob[..., 1])
    return out
