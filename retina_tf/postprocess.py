"""Artery/vein post-processing along the predicted vessel tree.

A vessel keeps its class between two branch or crossing points, but a pixel-wise A/V network
decides every pixel on its own, so long vessels come out striped: a few pixels of "vein" inside
an artery. :func:`vote_av_segments` lets every vessel segment (the piece of the predicted
skeleton between two junctions) decide once, from the evidence of all its pixels. It also links
segments across junctions: the branches of a bifurcation share a class, and at a crossing each
vessel keeps its class through it (arms paired by direction) while the two vessels stay free of
each other. The classes then come from one minimum cut over the segment graph, so a weak thin
branch follows the vessel it leaves unless its own evidence is strong. Graph-based A/V
labelling on the vessel skeleton goes back to Dashtbozorg et al., "An automatic graph-based
approach for artery/vein classification in retinal images", IEEE TIP 2014; the minimum cut is
the standard exact solver for such two-label problems (Boykov and Kolmogorov, IEEE TPAMI 2004).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components, maximum_flow
from skimage.morphology import skeletonize

# Logit differences are clipped before averaging so that a few saturated pixels cannot outvote
# the rest of a segment.
_CLIP = 8.0
# A mean clipped logit difference of this size (odds e^4) counts as certain evidence.
_SURE = 4.0
_EIGHT = np.ones((3, 3), np.uint8)
_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
# Two arms at a crossing continue one vessel when their directions are at least this opposite
# (cosine; -0.5 is 120 degrees or more apart).
_STRAIGHT = -0.5


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _skeleton_parts(vessel: np.ndarray, junction_radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(segments, nodes): labels of the skeleton of ``vessel`` away from junctions, and of the
    skeleton near them (one node per group of touching junction neighbourhoods)."""
    skel = skeletonize(np.asarray(vessel, bool))
    neighbours = ndimage.convolve(skel.astype(np.uint8), _EIGHT, mode="constant") - skel
    junctions = skel & (neighbours >= 3)
    near = np.zeros_like(skel)
    if junctions.any() and junction_radius > 0:
        near = skel & (ndimage.distance_transform_edt(~junctions) <= junction_radius)
    segments, _ = ndimage.label(skel & ~near, structure=_EIGHT)
    nodes, _ = ndimage.label(near, structure=_EIGHT)
    return segments.astype(np.int32), nodes.astype(np.int32)


def skeleton_segments(vessel: np.ndarray, junction_radius: int = 2) -> np.ndarray:
    """Labels (int32, 0 = none) of the skeleton of ``vessel`` cut at its junctions.

    A skeleton pixel with three or more skeleton neighbours is a junction (a branching or a
    crossing); the skeleton within ``junction_radius`` px of one is removed, and what remains is
    labelled by 8-connected component.
    """
    return _skeleton_parts(vessel, junction_radius)[0]


def _shifted(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[y, x] = a[y + dy, x + dx]``, zero where that falls outside ``a``."""
    out = np.zeros_like(a)
    h, w = a.shape
    out[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = \
        a[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
    return out


def segment_links(vessel: np.ndarray, junction_radius: int = 2, bridge: int = 6,
                  arm: float = 8.0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Pairs of skeleton segments that meet at a junction and should share a class.

    Junction nodes joined by a segment of at most ``bridge`` px are merged first (an artery
    crossing a vein often skeletonizes into two branch points a few px apart, joined by such a
    bridge, which is then linked to nothing). Then, by the number of arms at a node:
    two: linked (the third arm was too short to survive the cut). Three, a branching: arms at
    least 90 degrees apart are linked (the parent with each child; two children leaving side by
    side are not, they are the likelier pair to belong to a vessel merely touching). Four, a
    crossing: arms are paired, most opposite directions first, while at least 120 degrees apart;
    each pair continues one vessel and the two vessels are not linked. Five or more: not linked
    (on the RITE training labels, 43 % of such pairings joined an artery to a vein). An arm's
    direction points from the node centre to the mean of the segment's pixels within ``arm`` px.

    Returns ``(segments, links)``: the labels of :func:`skeleton_segments` and the linked pairs
    of labels.
    """
    segments, nodes = _skeleton_parts(vessel, junction_radius)
    contacts = set()
    for dy, dx in _OFFSETS:
        beside = _shifted(nodes, dy, dx)
        hit = (segments > 0) & (beside > 0)
        contacts.update(zip(segments[hit].tolist(), beside[hit].tolist()))
    if not contacts:
        return segments, []
    sizes = np.bincount(segments.ravel())
    ends: dict[int, set[int]] = {}
    for seg, node in contacts:
        ends.setdefault(seg, set()).add(node)
    bridges = {seg for seg, at in ends.items() if len(at) == 2 and sizes[seg] <= bridge}
    # nodes joined by a bridge are one node: `root` maps every node to its merged node
    n_nodes = nodes.max() + 1
    pairs = np.array([sorted(ends[seg]) for seg in bridges], np.int64).reshape(-1, 2)
    joined = csr_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                        shape=(n_nodes, n_nodes))
    root = connected_components(joined, directed=False)[1]
    ys, xs = np.nonzero(nodes)
    merged = root[nodes[ys, xs]]
    count = np.maximum(np.bincount(merged, minlength=len(root)), 1)
    centre_y = np.bincount(merged, ys, minlength=len(root)) / count
    centre_x = np.bincount(merged, xs, minlength=len(root)) / count
    # every segment's pixel coordinates, grouped by label
    sy, sx = np.nonzero(segments)
    order = np.argsort(segments[sy, sx], kind="stable")
    sy, sx = sy[order], sx[order]
    first = np.concatenate([[0], np.cumsum(sizes[1:])])
    arms: dict[int, dict[int, np.ndarray]] = {}
    for seg, node in sorted(contacts):
        at = int(root[node])
        if seg in bridges or seg in arms.get(at, {}):  # a loop back to its own node counts once
            continue
        py = sy[first[seg - 1]:first[seg - 1] + sizes[seg]]
        px = sx[first[seg - 1]:first[seg - 1] + sizes[seg]]
        dist = np.hypot(py - centre_y[at], px - centre_x[at])
        close = dist <= max(arm, dist.min() + 1.0)
        direction = np.array([py[close].mean() - centre_y[at], px[close].mean() - centre_x[at]])
        arms.setdefault(at, {})[seg] = direction / max(np.linalg.norm(direction), 1e-9)
    links = []
    for meeting in arms.values():
        segs = list(meeting)
        if len(segs) > 4:
            continue
        cosines = sorted((float(meeting[a] @ meeting[b]), a, b)
                         for i, a in enumerate(segs) for b in segs[i + 1:])
        if len(segs) == 2:
            links += [(a, b) for _, a, b in cosines]
        elif len(segs) == 3:
            links += [(a, b) for cosine, a, b in cosines if cosine <= 0.0]
        else:
            paired: set[int] = set()
            for cosine, a, b in cosines:
                if cosine > _STRAIGHT:
                    break
                if a not in paired and b not in paired:
                    paired |= {a, b}
                    links.append((a, b))
    return segments, links


def _min_cut(unary: np.ndarray, links: list[tuple[int, int]], weights: np.ndarray) -> np.ndarray:
    """Two-label minimum of sum(cost of going against ``unary``) + sum(weights of links whose
    ends differ), by maximum flow: exact to the 1/100 px the capacities are rounded to.
    ``unary[s] > 0`` favours artery; returns artery (bool) per segment."""
    n = len(unary)
    source, sink = n, n + 1
    favours = np.flatnonzero(unary > 0)
    against = np.flatnonzero(unary < 0)
    a = np.array([link[0] for link in links], np.int64)
    b = np.array([link[1] for link in links], np.int64)
    rows = np.concatenate([np.full(len(favours), source), against, a, b])
    cols = np.concatenate([favours, np.full(len(against), sink), b, a])
    caps = np.concatenate([unary[favours], -unary[against], weights, weights])
    # maximum_flow wants int32 capacities: 1/100 px resolution, each edge (repeated links
    # summed) at most all the evidence + 1: a heavier link is never cut (cutting every
    # evidence edge costs less), so the cut stays exact while a link of 1e6 px no longer wraps
    # round int32 (which gave the unlinked answer); the residual graph adds an edge's two
    # directions, so two such edges must fit, scaled down where even they would not
    # csr_matrix, not csr_array: maximum_flow of older SciPy accepts only the former
    evidence = float(np.abs(unary).sum()) + 1.0
    graph = csr_matrix((np.round(np.minimum(caps, evidence) * 100).astype(np.int64),
                        (rows, cols)), shape=(n + 2, n + 2))
    graph.sum_duplicates()
    limit = round(evidence * 100)
    graph.data = np.minimum(graph.data, limit)
    room = (np.iinfo(np.int32).max - 1) // 2
    if limit > room:  # over ten million vessel pixels of evidence
        graph.data = np.round(graph.data * (room / limit))
    graph.data = graph.data.astype(np.int32)
    residual = (graph - maximum_flow(graph, source, sink).flow).tocsr()
    residual.data = (residual.data > 0).astype(np.int8)
    residual.eliminate_zeros()
    artery = np.zeros(n + 2, bool)
    artery[breadth_first_order(residual, source, directed=True, return_predecessors=False)] = True
    return artery[:n]


def av_mask(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """A/V probabilities (H, W, 3: artery, vein, vessel) -> the bool (H, W, 3) decision: vessel
    where its probability reaches ``threshold``, and each vessel pixel artery or vein by the
    larger probability (artery on a tie), as the pictures draw it and the A/V metrics decide
    each true vessel pixel (two channels cut at the threshold alone would overlap and leave
    vessel pixels neither)."""
    vessel = prob[..., 2] >= threshold
    artery = vessel & (prob[..., 0] >= prob[..., 1])
    return np.stack([artery, vessel & ~artery, vessel], axis=-1)


def vote_av_segments(prob: np.ndarray, threshold: float = 0.5, reach: float = 3.0,
                     junction_radius: int = 2, link: float = 1.0, link_cap: float = 20.0,
                     bridge: int = 6) -> np.ndarray:
    """Gives every vessel segment one artery/vein decision, linked across junctions.

    Args:
        prob: (H, W, 3) probabilities (artery, vein, vessel).
        threshold: the vessel map whose skeleton is cut into segments is ``prob[..., 2] >=
            threshold``.
        reach: pixels up to this far outside the vessel map also take the decision of the nearest
            segment (a thin vessel the vessel map half misses); farther pixels keep their own.
        junction_radius: see :func:`skeleton_segments`.
        link: strength of the links of :func:`segment_links`, in pixels of evidence per pixel of
            the smaller segment (counted up to ``link_cap`` pixels). A segment's evidence is its
            pixel count times its mean clipped logit difference over 4 (clipped to +-1); the
            classes minimize the evidence overruled plus the links broken. 0: every segment
            decides alone from its mean.
        bridge: see :func:`segment_links`.

    Returns (H, W, 3) probabilities: the vessel channel unchanged; for every pixel assigned to a
    segment, artery and vein logits moved symmetrically so that their difference is the
    segment's mean clipped logit difference, its sign set by the decision (their mean, the
    vessel evidence, is kept). So ``p_artery >= p_vein`` is the same all along a segment.
    """
    prob = np.asarray(prob, np.float32)
    if prob.ndim != 3 or prob.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) artery/vein/vessel probabilities, got {prob.shape}")
    if not np.isfinite(prob).all():
        raise ValueError(f"{np.count_nonzero(~np.isfinite(prob))} of the artery/vein/vessel "
                         "probabilities are NaN or infinite: the model's output is broken")
    vessel = prob[..., 2] >= threshold
    if link > 0:
        segments, links = segment_links(vessel, junction_radius, bridge)
    else:
        segments, links = skeleton_segments(vessel, junction_radius), []
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
    if links:
        unary = count * np.clip(mean / _SURE, -1.0, 1.0)
        weights = np.array([link * min(count[a], count[b], link_cap) for a, b in links])
        artery = _min_cut(unary, links, weights)
        # a segment without evidence of its own needs a side to take
        size = np.maximum(np.abs(mean), 0.05)
        mean = np.where(artery, size, -size)
    outside = ndimage.distance_transform_edt(~vessel)
    assigned = (count[owner] > 0) & (outside <= reach)
    centre = 0.5 * (la + lv)
    d = mean[owner]
    out[..., 0] = np.where(assigned, 1 / (1 + np.exp(-(centre + d / 2))), prob[..., 0])
    out[..., 1] = np.where(assigned, 1 / (1 + np.exp(-(centre - d / 2))), prob[..., 1])
    return out
