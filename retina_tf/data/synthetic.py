"""Synthetic fundus photographs with exact vessel and artery/vein labels.

The generator draws a DRIVE-like colour fundus image (Staal et al., "Ridge-based vessel
segmentation in color images of the retina", IEEE TMI 2004): a circular field of view on black,
vignetting, an orange-red background with choroidal texture, a bright optic disc off-centre, a
darker fovea about 2.5 disc diameters temporal to the disc, and two vessel trees (arteries and
veins) that leave the disc as superior and inferior arcades curving around the macula, plus
nasal and papillomacular branches. Vessels branch recursively with Murray's law
(w^3 = w1^3 + w2^3) and taper from about 8 px (main veins at DRIVE's 565 px width) down to 1 px
twigs. As in real photographs veins are darker and wider than arteries and the green channel
carries most of the vessel contrast.

Every random choice comes from ``np.random.default_rng(seed)``, so an image and its labels are
fully determined by the seed and the size. The labels are exactly the drawn vessel pixels, which
makes the data useful for tests, demos and smoke trainings without downloading a dataset.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from retina_tf.data.av import encode_av_rgb
from retina_tf.data.io import atomic_folder, write_image_atomic
from retina_tf.errors import ConfigError
from retina_tf.progress import progress

__all__ = ["SYNTHETIC_MARKER", "SyntheticFundus", "generate_fundus", "write_synthetic_dataset"]

SYNTHETIC_MARKER = "synthetic.json"  # a folder write_synthetic_dataset may replace
# Below 32 px a side, vessels at least a pixel wide fill over half the FOV (a label the readers
# refuse as inverted); above 4096 x 4096 the 4x supersampled drawing takes over 3 GB.
MIN_SIDE = 32
MAX_AREA = 4096 * 4096
MAX_IMAGES = 100_000  # a synthetic.json counting more is damaged

# Every length below is given in DRIVE pixels (FOV radius about 267 px in a 565x584 image) and
# multiplied by scale = fov_radius / 267, so any image size gets the same anatomy.
_DRIVE_FOV_RADIUS = 267.0
# Vessels are drawn at this multiple of the output resolution and area-averaged down: that gives
# anti-aliasing and sub-pixel widths for free (cv2 thick lines only take integer widths).
_SUPERSAMPLE = 4
# A pixel belongs to the label when the drawn vessel covers at least this fraction of it.
_LABEL_COVERAGE = 0.5

_ARTERY, _VEIN = 0, 1

# Fraction of light removed per channel (R, G, B) at the centre of a thick vessel. Blood absorbs
# green most, so the green channel has the highest contrast; venous blood (less oxygen) is darker
# in every channel, arterial blood stays almost as red as the background.
# Calibrated on DRIVE/RITE: the centre of a wide vein keeps ~0.87 R, 0.76 G, 0.88 B of the
# local background, a wide artery ~0.96 R, 0.86 G, 0.92 B.
_ABSORPTION = {
    _ARTERY: np.array([0.05, 0.24, 0.12], np.float32),
    _VEIN: np.array([0.17, 0.34, 0.17], np.float32),
}


@dataclass
class SyntheticFundus:
    """One synthetic fundus photograph and its labels.

    Attributes:
        image: uint8 RGB, HxWx3.
        vessel: bool HxW, vessel pixels inside the FOV (= artery | vein).
        fov: bool HxW, the circular field of view.
        artery: bool HxW, artery pixels inside the FOV.
        vein: bool HxW, vein pixels inside the FOV (artery and vein overlap at crossings).
        optic_disc: (x, y, radius) of the optic disc in pixels (ground truth for tests and
            for disc/fovea localisation experiments).
        fovea: (x, y) of the fovea centre in pixels.
    """

    image: np.ndarray
    vessel: np.ndarray
    fov: np.ndarray
    artery: np.ndarray
    vein: np.ndarray
    optic_disc: tuple[float, float, float] | None = None
    fovea: tuple[float, float] | None = None


@dataclass
class _Geometry:
    height: int
    width: int
    cx: float
    cy: float
    radius: float  # FOV radius
    scale: float  # radius / DRIVE radius: multiplies every length
    width_scale: float  # multiplies vessel widths; floored so small images keep visible vessels
    disc_x: float
    disc_y: float
    disc_radius: float
    fovea_x: float
    fovea_y: float
    tx: float  # unit vector from the disc towards the fovea (temporal direction)
    ty: float
    sx: float  # unit vector perpendicular to it, pointing up in the image (superior)
    sy: float
    faz_radius: float  # foveal avascular zone: no vessel enters it


@dataclass
class _Sprout:
    """A vessel waiting to grow: start point, heading, width, artery/vein, parent."""

    x: float
    y: float
    angle: float
    width: float
    kind: int
    parent: int
    guide: np.ndarray | None = None  # trunks follow a precomputed arcade curve
    branch_ratio: tuple[float, float] = (0.45, 0.8)
    attract: tuple[float, float] | None = None  # point a macular branch heads for


@dataclass
class _Vessel:
    xs: list[float]
    ys: list[float]
    widths: list[float]
    kind: int


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _make_geometry(rng: np.random.Generator, height: int, width: int) -> _Geometry:
    """Places the FOV, optic disc and fovea like in a 45-degree macula-centred DRIVE image."""
    radius = 0.5 * min(height, width) * _uniform(rng, 0.92, 0.96)
    scale = radius / _DRIVE_FOV_RADIUS
    # Small decentring of the FOV, never pushing the circle out of the frame.
    cx = width / 2 + _uniform(rng, -1, 1) * max(0.0, width / 2 - radius) * 0.8
    cy = height / 2 + _uniform(rng, -1, 1) * max(0.0, height / 2 - radius) * 0.8
    side = 1.0 if rng.random() < 0.5 else -1.0  # +1: disc on the left, fovea to its right
    disc_radius = radius * _uniform(rng, 0.13, 0.155)
    disc_x = cx - side * radius * _uniform(rng, 0.64, 0.74)
    disc_y = cy + radius * _uniform(rng, -0.08, 0.06)
    # The fovea lies ~2.5 disc diameters temporal to the disc and slightly below it.
    tilt = math.radians(_uniform(rng, -2.0, 9.0))
    tx, ty = side * math.cos(tilt), math.sin(tilt)
    distance = 2.0 * disc_radius * _uniform(rng, 2.35, 2.65)
    fovea_x, fovea_y = disc_x + tx * distance, disc_y + ty * distance
    sx, sy = (ty, -tx) if tx > 0 else (-ty, tx)  # the perpendicular with negative y (up)
    # Below ~0.4 x DRIVE size the main vessels would shrink to 1 px and the trees would vanish;
    # keep them a few pixels wide instead (like a model input that was downsampled with care).
    width_scale = max(scale, 0.4)
    return _Geometry(height, width, cx, cy, radius, scale, width_scale, disc_x, disc_y,
                     disc_radius, fovea_x, fovea_y, tx, ty, sx, sy,
                     faz_radius=disc_radius * _uniform(rng, 0.45, 0.6))


def _arcade_guide(rng: np.random.Generator, geo: _Geometry, superior: bool,
                  reach: float, height: float, spacing: float) -> np.ndarray:
    """Points (N, 2), `spacing` apart, of a temporal arcade around the macula.

    In disc-centred coordinates (u towards the fovea, v up or down) the arcade leaves the disc
    vertically along a quarter ellipse (u = reach (1 - cos t), v = height sin t), then runs on
    towards the temporal edge with a small random slope, as the arcades of DRIVE images do.
    """
    r = geo.radius
    t = np.linspace(0.0, np.pi / 2, 200)
    u1, v1 = reach * (1 - np.cos(t)), height * np.sin(t)
    run = np.linspace(0.0, 2.0 * r, 200)[1:]
    slope = _uniform(rng, -0.12, 0.3)
    bow = _uniform(rng, -0.1, 0.15)
    u2 = reach + run
    v2 = height + slope * run + bow * run ** 2 / r
    u = np.concatenate([u1, u2])
    v = np.concatenate([v1, v2])
    sign = 1.0 if superior else -1.0
    x = geo.disc_x + u * geo.tx + v * sign * geo.sx
    y = geo.disc_y + u * geo.ty + v * sign * geo.sy
    xy = np.stack([x, y], axis=1)
    # Resample by arc length, then add a slow wiggle along the normal so arcades are never
    # perfect geometric curves.
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(xy, axis=0).T))])
    along = np.arange(0.0, arc[-1], spacing)
    xy = np.stack([np.interp(along, arc, xy[:, 0]), np.interp(along, arc, xy[:, 1])], axis=1)
    tangent = np.gradient(xy, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-9
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    wiggle = np.zeros(len(along))
    for _ in range(3):
        wiggle += _uniform(rng, -0.025, 0.025) * r * np.sin(
            2 * np.pi * along / (r * _uniform(rng, 0.4, 1.2)) + _uniform(rng, 0, 2 * np.pi))
    wiggle *= np.clip(along / (0.3 * r), 0, 1)  # keep the start on the disc
    return xy + wiggle[:, None] * normal


def _initial_sprouts(rng: np.random.Generator, geo: _Geometry) -> list[_Sprout]:
    """Main trunks leaving the disc: four temporal arcades, nasal vessels, macular twigs."""
    s = geo.scale
    ws = geo.width_scale
    sprouts: list[_Sprout] = []
    vein_width = _uniform(rng, 7.2, 8.4) * ws
    artery_width = vein_width * _uniform(rng, 0.72, 0.84)
    spacing = max(1.0, 2.5 * s)
    for superior in (True, False):
        sign = 1.0 if superior else -1.0
        reach = geo.radius * _uniform(rng, 0.75, 1.0)
        height = geo.radius * _uniform(rng, 0.5, 0.68)
        order = _ARTERY if rng.random() < 0.5 else _VEIN
        spread = _uniform(rng, 0.06, 0.16) * (1 if rng.random() < 0.5 else -1)
        for kind, width in ((_ARTERY, artery_width), (_VEIN, vein_width)):
            # Artery and vein of one arcade run near each other on different curves, so they
            # cross now and then as in real retinas, but never on top of each other.
            spread = -spread
            guide = _arcade_guide(rng, geo, superior, reach * _uniform(rng, 0.85, 1.15),
                                  height * (1.0 + spread), spacing)
            # Artery and vein leave the disc side by side, not on top of each other.
            offset = (1 if kind == order else -1) * geo.disc_radius * _uniform(rng, 0.12, 0.35)
            guide[:, 0] += offset * geo.tx
            guide[:, 1] += offset * geo.ty
            angle = math.atan2(sign * geo.sy, sign * geo.sx)
            sprouts.append(_Sprout(float(guide[0, 0]), float(guide[0, 1]), angle,
                                   width * _uniform(rng, 0.93, 1.07), kind, -1,
                                   guide=guide, branch_ratio=(0.35, 0.72)))
    # Nasal vessels: thinner, radiating away from the fovea up and down; the artery and vein
    # of a pair leave at different angles from different points of the disc.
    nasal = math.atan2(-geo.ty, -geo.tx)
    for superior in (True, False):
        sign = 1.0 if superior else -1.0
        up = math.atan2(sign * geo.sy, sign * geo.sx)
        mix = _uniform(rng, 0.35, 0.7)
        base = math.atan2(mix * math.sin(up) + (1 - mix) * math.sin(nasal),
                          mix * math.cos(up) + (1 - mix) * math.cos(nasal))
        apart = math.radians(_uniform(rng, 10, 22)) * (1 if rng.random() < 0.5 else -1)
        for kind, width in ((_ARTERY, artery_width), (_VEIN, vein_width)):
            apart = -apart
            angle = base + apart
            start = 0.35 * geo.disc_radius
            sprouts.append(_Sprout(geo.disc_x + start * math.cos(angle),
                                   geo.disc_y + start * math.sin(angle), angle,
                                   width * _uniform(rng, 0.5, 0.7), kind, -1))
    # Papillomacular branches: thin vessels from the disc straight towards the macula, fanned
    # out so that no two run side by side.
    count = int(rng.integers(2, 5))
    for fan in np.linspace(-28.0, 28.0, count):
        angle = math.atan2(geo.ty, geo.tx) + math.radians(fan + _uniform(rng, -5, 5))
        kind = _ARTERY if rng.random() < 0.5 else _VEIN
        start = geo.disc_radius * _uniform(rng, 0.2, 0.4)
        sprouts.append(_Sprout(geo.disc_x + start * math.cos(angle),
                               geo.disc_y + start * math.sin(angle), angle,
                               _uniform(rng, 1.8, 2.8) * ws, kind, -1,
                               branch_ratio=(0.55, 0.85)))
    return sprouts


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _preferred_angle(geo: _Geometry, x: float, y: float,
                     attract: tuple[float, float] | None) -> float:
    """Direction a free branch drifts to.

    Retinal vessels radiate from the disc and, on the temporal side, sweep around the macula
    towards the horizontal raphe; branches on the macular side of an arcade head for the fovea
    (or for the raphe beyond it), which `attract` encodes.
    """
    rx, ry = x - geo.disc_x, y - geo.disc_y
    d = math.hypot(rx, ry) + 1e-6
    px, py = rx / d, ry / d
    u = rx * geo.tx + ry * geo.ty
    if u > 0:
        bend = min(1.0, u / (0.6 * geo.radius))
        px += bend * geo.tx
        py += bend * geo.ty
    if attract is not None:
        ax, ay = attract[0] - x, attract[1] - y
        da = math.hypot(ax, ay) + 1e-6
        px = 0.3 * px + 1.2 * ax / da
        py = 0.3 * py + 1.2 * ay / da
    return math.atan2(py, px)


def _macular_target(geo: _Geometry, x: float, y: float) -> tuple[float, float]:
    """Where a macular-side branch at (x, y) heads: the fovea, or the raphe temporal to it."""
    u = (x - geo.fovea_x) * geo.tx + (y - geo.fovea_y) * geo.ty
    ahead = max(0.0, u) * 1.3
    return geo.fovea_x + ahead * geo.tx, geo.fovea_y + ahead * geo.ty


def _grow_vessels(rng: np.random.Generator, geo: _Geometry) -> list[_Vessel]:
    """Grows both trees breadth first, so big vessels claim space before their branches.

    A branch stops when it becomes thinner than ~1 px, leaves the FOV, reaches the foveal
    avascular zone, runs back into the disc, or meets another vessel of its own kind (arteries
    do not cross arteries, nor veins veins; artery-vein crossings are allowed).
    """
    s = geo.scale
    step = max(1.0, 2.5 * s)
    ws = geo.width_scale
    min_width = max(1.0, 1.0 * ws)
    cell = max(2.0, 3.0 * s)
    grid_h, grid_w = int(geo.height / cell) + 2, int(geo.width / cell) + 2
    occupied = np.full((2, grid_h, grid_w), -1, np.int32)
    vessels: list[_Vessel] = []
    queue = deque(_initial_sprouts(rng, geo))
    limit = (geo.radius * 1.01) ** 2
    max_vessels = 4000

    while queue and len(vessels) < max_vessels:
        sprout = queue.popleft()
        vid = len(vessels)
        x, y, angle, width, kind = sprout.x, sprout.y, sprout.angle, sprout.width, sprout.kind
        vessel = _Vessel([x], [y], [width], kind)
        vessels.append(vessel)
        guide = sprout.guide
        guide_index = 0
        # Arteries are ~0.75 as wide as veins of the same order: grow them as if they were
        # veins so both trees branch equally deep.
        order_width = width / ws / (0.78 if kind == _ARTERY else 1.0)
        # Thin vessels wiggle more (tortuosity), thick trunks are smooth.
        wiggle = (0.006 + 0.016 / max(order_width, 1.0)) * math.sqrt(step)
        gain = 0.35 if guide is not None else 0.025 * step / (1.0 + 0.1 * order_width)
        # Tapering between bifurcations; most of the thinning comes from Murray splits.
        taper = s * _uniform(rng, 150, 250) * max(order_width, 1.0) ** 0.8
        curvature = 0.0
        length = 0.0
        next_branch = _branch_spacing(rng, order_width, s, guide is not None)
        if guide is not None:
            # Arcade trunks do not branch before they leave the disc.
            next_branch += geo.disc_radius
        side = 1.0 if rng.random() < 0.5 else -1.0
        own = {vid, sprout.parent}
        attract = sprout.attract
        # Side of the horizontal raphe (the disc-fovea line) this vessel starts on: temporal
        # to the fovea, superior and inferior vessels never cross it.
        raphe_side = (x - geo.disc_x) * geo.sx + (y - geo.disc_y) * geo.sy
        while True:
            if guide is not None:
                lo, hi = guide_index, min(guide_index + 30, len(guide))
                d2 = (guide[lo:hi, 0] - x) ** 2 + (guide[lo:hi, 1] - y) ** 2
                guide_index = lo + int(np.argmin(d2))
                target = guide[min(guide_index + 6, len(guide) - 1)]
                preferred = math.atan2(target[1] - y, target[0] - x)
            else:
                preferred = _preferred_angle(geo, x, y, attract)
                if attract is not None and math.hypot(attract[0] - x, attract[1] - y) < (
                        1.2 * geo.disc_radius):
                    attract = None  # close enough: stop homing, or it would circle the target
            curvature = 0.9 * curvature + wiggle * float(rng.standard_normal())
            turn = _wrap(preferred - angle)
            if guide is None and abs(turn) > 1.75:
                turn = 0.0  # a field pointing backwards would make the vessel U-turn: ignore it
            angle = _wrap(angle + gain * turn + curvature)
            x += step * math.cos(angle)
            y += step * math.sin(angle)
            length += step
            # Vessels thin out quickly inside the macula, reaching capillary size at the
            # foveal avascular zone instead of ending bluntly.
            to_fovea = math.hypot(x - geo.fovea_x, y - geo.fovea_y)
            near = min(1.0, max(0.1, (to_fovea - geo.faz_radius) / (3 * geo.disc_radius)))
            width *= math.exp(-step / (taper * near))
            if (x - geo.cx) ** 2 + (y - geo.cy) ** 2 > limit or width < min_width:
                break
            if to_fovea < geo.faz_radius:
                break
            if (guide is None
                    and (x - geo.fovea_x) * geo.tx + (y - geo.fovea_y) * geo.ty > 0
                    and ((x - geo.disc_x) * geo.sx + (y - geo.disc_y) * geo.sy) * raphe_side < 0):
                break
            if (guide is None and length > geo.disc_radius
                    and math.hypot(x - geo.disc_x, y - geo.disc_y) < geo.disc_radius):
                break
            gy, gx = int(y / cell), int(x / cell)
            if 0 <= gy < grid_h and 0 <= gx < grid_w:
                owner = int(occupied[kind, gy, gx])
                if owner >= 0 and owner not in own and length > 2 * cell:
                    # Join the vessel we ran into: end exactly on it, then stop.
                    vessel.xs.append(x)
                    vessel.ys.append(y)
                    vessel.widths.append(width)
                    break
                # Mark the vessel's footprint (wider vessels block a wider band).
                reach = int(width / (2 * cell))
                patch = occupied[kind, max(gy - reach, 0):gy + reach + 1,
                                 max(gx - reach, 0):gx + reach + 1]
                patch[patch < 0] = vid
            vessel.xs.append(x)
            vessel.ys.append(y)
            vessel.widths.append(width)
            if length >= next_branch and width > 1.6 * min_width:
                # Murray's law splits the flow: the side branch takes w_c, the parent keeps
                # (w^3 - w_c^3)^(1/3).
                child = width * _uniform(rng, *sprout.branch_ratio)
                child = max(child, min_width * 1.05)
                width = max((width ** 3 - child ** 3) ** (1.0 / 3.0), min_width * 1.05)
                side = -side if rng.random() < 0.7 else side
                ratio = child / (width + child)
                child_angle = angle + side * math.radians(_uniform(rng, 40, 80))
                # The parent swerves a little away from a big branch (flow balance).
                angle -= side * math.radians(25) * ratio ** 2
                child_attract = attract if rng.random() < 0.8 else None
                if guide is not None or sprout.parent < 0:
                    # Branches of the main vessels on the macular side head for the macula.
                    fx, fy = geo.fovea_x - x, geo.fovea_y - y
                    toward = fx * math.cos(child_angle) + fy * math.sin(child_angle)
                    child_attract = _macular_target(geo, x, y) if toward > 0 else None
                queue.append(_Sprout(x, y, child_angle, child, kind, vid,
                                     branch_ratio=(0.5, 0.85), attract=child_attract))
                order_width = width / ws / (0.78 if kind == _ARTERY else 1.0)
                next_branch = length + _branch_spacing(rng, order_width, s, guide is not None)
            if length > 3 * geo.radius:
                break
    return vessels


def _branch_spacing(rng: np.random.Generator, order_width: float, scale: float,
                    trunk: bool) -> float:
    """Distance to the next bifurcation: long between big branches, short near the twigs."""
    base = 34.0 if trunk else 20.0 + 6.0 * order_width
    return scale * base * _uniform(rng, 0.6, 1.6)


def _rasterize(vessels: list[_Vessel], geo: _Geometry) -> dict[str, np.ndarray]:
    """Draws all vessel segments supersampled, thinnest first, and area-averages them down.

    Returns per kind the label coverage (fraction of each pixel inside a vessel), the optical
    density (width-dependent contrast) and the central light reflex of wide arteries.
    """
    ss = _SUPERSAMPLE
    shape = (geo.height * ss, geo.width * ss)
    density = [np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)]
    reflex = np.zeros(shape, np.uint8)
    ws = geo.width_scale
    shift = 2  # sub-pixel precision of cv2 drawing on the supersampled canvas
    rows = []
    for vessel in vessels:
        if len(vessel.xs) < 2:
            continue
        xy = np.stack([vessel.xs, vessel.ys], axis=1)
        w = np.asarray(vessel.widths)
        seg_w = 0.5 * (w[:-1] + w[1:])
        rows.append(np.column_stack([seg_w, np.full_like(seg_w, vessel.kind), xy[:-1], xy[1:]]))
    if not rows:
        rows.append(np.zeros((0, 6)))
    seg = np.concatenate(rows)
    # Thin first: a wide vessel drawn later keeps its own contrast where a branch joins it.
    seg = seg[np.argsort(seg[:, 0], kind="stable")]
    width = seg[:, 0]
    kinds = seg[:, 1].astype(int).tolist()
    points = np.round(seg[:, 2:] * (ss << shift)).astype(np.int64).tolist()
    # Absorption grows with the path length through blood: thin vessels are faint.
    values = np.maximum(np.round(255 * (1.0 - np.exp(-width / ws / 2.0))), 1).astype(int).tolist()
    thickness = np.maximum(np.round(width * ss), 1).astype(int).tolist()
    reflex_thickness = np.maximum(np.round(width * ss * 0.22), 1).astype(int).tolist()
    has_reflex = (width / ws > 3.8).tolist()
    for i, (x0, y0, x1, y1) in enumerate(points):
        kind = kinds[i]
        cv2.line(density[kind], (x0, y0), (x1, y1), values[i], thickness[i], cv2.LINE_8, shift)
        if kind == _ARTERY and has_reflex[i]:
            cv2.line(reflex, (x0, y0), (x1, y1), 255, reflex_thickness[i], cv2.LINE_8, shift)
    out: dict[str, np.ndarray] = {}
    size = (geo.width, geo.height)
    for kind, name in ((_ARTERY, "artery"), (_VEIN, "vein")):
        drawn = (density[kind] > 0).view(np.uint8) * np.uint8(255)
        out[name + "_coverage"] = cv2.resize(drawn, size, interpolation=cv2.INTER_AREA)
        out[name + "_density"] = cv2.resize(density[kind], size, interpolation=cv2.INTER_AREA)
    out["reflex"] = cv2.resize(reflex, size, interpolation=cv2.INTER_AREA)
    return out


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth noise with about `cells` blobs across the shorter side."""
    h, w = shape
    small = rng.standard_normal((max(2, cells * h // min(h, w)), max(2, cells * w // min(h, w))))
    field = cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    field -= field.mean()
    return field / (field.std() + 1e-6)


def _background(rng: np.random.Generator, geo: _Geometry) -> np.ndarray:
    """Fundus background (float32 RGB 0..255): colour, texture, illumination, disc, fovea."""
    h, w = geo.height, geo.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Colour of the fundus centre in DRIVE: R 160-230, G/R ~0.55, B/R ~0.3.
    base = np.array([_uniform(rng, 165, 230), 0.0, 0.0], np.float32)
    base[1] = base[0] * _uniform(rng, 0.5, 0.6)
    base[2] = base[0] * _uniform(rng, 0.27, 0.36)
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)

    # Choroidal texture: coarse blotches plus finer grain, mostly in brightness.
    texture = (0.015 * _smooth_noise(rng, (h, w), 10) + 0.012 * _smooth_noise(rng, (h, w), 40)
               + 0.008 * _smooth_noise(rng, (h, w), 120))
    img *= (1.0 + texture)[..., None]
    # Broad patches of slightly different hue (pigmentation, choroidal blood) as in DRIVE.
    img[..., 0] *= 1.0 + 0.03 * _smooth_noise(rng, (h, w), 3)
    img[..., 1] *= 1.0 + 0.03 * _smooth_noise(rng, (h, w), 3)
    # Uneven illumination: a random linear gradient and a broad bright/dark blob.
    phi = _uniform(rng, 0, 2 * np.pi)
    gradient = ((xx - geo.cx) * math.cos(phi) + (yy - geo.cy) * math.sin(phi)) / geo.radius
    bx = geo.cx + geo.radius * _uniform(rng, -0.6, 0.6)
    by = geo.cy + geo.radius * _uniform(rng, -0.6, 0.6)
    blob = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * (0.45 * geo.radius) ** 2))
    img *= (1.0 + _uniform(rng, 0.03, 0.1) * gradient + _uniform(rng, -0.08, 0.1) * blob)[..., None]
    r = np.sqrt((xx - geo.cx) ** 2 + (yy - geo.cy) ** 2) / geo.radius
    # Vignetting: the periphery of a 45-degree fundus image is darker, red falls off most.
    falloff = np.clip(r, 0, 1.2) ** _uniform(rng, 2.0, 3.5)
    strength = _uniform(rng, 0.2, 0.45)
    for c, k in enumerate((1.0, 0.7, 0.6)):
        img[..., c] *= 1.0 - k * strength * falloff

    # Macula and fovea: xanthophyll pigment darkens green and blue more than red.
    d2f = (xx - geo.fovea_x) ** 2 + (yy - geo.fovea_y) ** 2
    dd = 2 * geo.disc_radius
    macula = np.exp(-d2f / (2 * (1.1 * dd) ** 2))
    fovea = np.exp(-d2f / (2 * (_uniform(rng, 0.38, 0.55) * dd) ** 2))
    depth = _uniform(rng, 0.15, 0.28)
    for c, k in enumerate((0.5, 1.0, 1.0)):
        img[..., c] *= 1.0 - k * (0.08 * macula + depth * fovea)

    # Optic disc: yellow, slightly taller than wide, brighter on its temporal side where the
    # neuroretinal rim is thin, with a near-white cup inside it.
    dx, dy = xx - geo.disc_x, yy - geo.disc_y
    stretch = _uniform(rng, 1.0, 1.12)
    rd = np.sqrt(dx ** 2 + (dy / stretch) ** 2) / geo.disc_radius
    edge = np.clip((1.12 - rd) / 0.3, 0, 1)
    edge = edge * edge * (3 - 2 * edge)  # smoothstep
    temporal = np.clip((dx * geo.tx + dy * geo.ty) / geo.disc_radius, -1, 1)
    disc_colour = np.array([255, _uniform(rng, 215, 240), _uniform(rng, 95, 140)], np.float32)
    alpha = edge * np.clip(_uniform(rng, 0.55, 0.7) + 0.25 * temporal
                           + 0.2 * np.exp(-rd ** 2 / 0.5), 0, 1)
    alpha *= 1.0 + 0.04 * _smooth_noise(rng, (h, w), 60)
    img = img * (1 - alpha[..., None]) + disc_colour * alpha[..., None]
    cup_r = geo.disc_radius * _uniform(rng, 0.3, 0.5)
    cup_off = _uniform(rng, 0.1, 0.3) * geo.disc_radius
    cup_d2 = ((xx - geo.disc_x - cup_off * geo.tx) ** 2
              + (yy - geo.disc_y - cup_off * geo.ty) ** 2) / cup_r ** 2
    cup = np.exp(-cup_d2 ** 1.5) * _uniform(rng, 0.5, 0.8)
    cup_colour = np.array([255, 250, _uniform(rng, 170, 215)], np.float32)
    img = img * (1 - cup[..., None]) + cup_colour * cup[..., None]
    # A faint pale halo around the disc (peripapillary atrophy / nerve fibre sheen).
    halo = np.exp(-np.maximum(rd - 1.0, 0) ** 2 / (2 * 0.4 ** 2)) * (1 - edge)
    img *= (1.0 + _uniform(rng, 0.03, 0.1) * halo)[..., None]
    return img


def generate_fundus(seed: int, size: tuple[int, int] = (584, 565)) -> SyntheticFundus:
    """Generates one synthetic fundus image with vessel, FOV and artery/vein labels.

    Args:
        seed: integer seed; the same seed and size always give identical arrays.
        size: (height, width) in pixels; anatomy scales with the FOV diameter.

    Returns:
        A SyntheticFundus with a uint8 RGB image and bool HxW masks.

    Example:
        >>> sample = generate_fundus(0, size=(128, 128))
        >>> sample.image.shape, sample.vessel.dtype
        ((128, 128, 3), dtype('bool'))
    """
    height, width = (int(v) for v in size)
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ValueError(f"size must be at least {MIN_SIDE}x{MIN_SIDE} (height, width), got "
                         f"{size!r}")
    if height * width > MAX_AREA:
        raise ValueError(f"size {height}x{width} is over {MAX_AREA / 1e6:.1f} million pixels "
                         "(the vessels are drawn at 4x resolution: a gigabyte per 5 million); "
                         "give a smaller size")
    rng = np.random.default_rng(seed)
    geo = _make_geometry(rng, height, width)
    vessels = _grow_vessels(rng, geo)
    drawn = _rasterize(vessels, geo)
    img = _background(rng, geo)

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radial = np.sqrt((xx - geo.cx) ** 2 + (yy - geo.cy) ** 2)
    fov = radial <= geo.radius

    # Vessels: optical density slightly blurred (the eye's optics), then Beer-Lambert-like
    # multiplicative darkening per channel; crossings multiply both.
    blur = 0.35 + 0.35 * geo.scale
    contrast = _uniform(rng, 0.8, 1.15)
    for kind, name in ((_ARTERY, "artery"), (_VEIN, "vein")):
        density = cv2.GaussianBlur(drawn[name + "_density"].astype(np.float32) / 255.0,
                                   (0, 0), blur)
        img *= 1.0 - contrast * density[..., None] * _ABSORPTION[kind]
    if rng.random() < 0.7:
        # Central light reflex: a thin bright stripe on wide arteries (young eyes).
        reflex = cv2.GaussianBlur(drawn["reflex"].astype(np.float32) / 255.0, (0, 0), blur)
        img *= 1.0 + _uniform(rng, 0.03, 0.08) * reflex[..., None]

    # Camera optics and sensor: slight blur, then Gaussian noise.
    img = cv2.GaussianBlur(img, (0, 0), 0.3 + 0.3 * geo.scale)
    img += rng.normal(0.0, _uniform(rng, 1.2, 3.0), img.shape).astype(np.float32)
    # Anti-aliased FOV edge; outside it the camera's near-black level (DRIVE: ~0-12) with the
    # same sensor noise, so the FOV must be found by thresholding, not by testing for zero.
    edge = np.clip(geo.radius - radial, 0, 1)[..., None]
    black = _uniform(rng, 0.0, 8.0) + rng.normal(0.0, 1.5, img.shape).astype(np.float32)
    img = img * edge + black * (1 - edge)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    artery = (drawn["artery_coverage"] >= int(255 * _LABEL_COVERAGE)) & fov
    vein = (drawn["vein_coverage"] >= int(255 * _LABEL_COVERAGE)) & fov
    return SyntheticFundus(image=image, vessel=artery | vein, fov=fov, artery=artery, vein=vein,
                           optic_disc=(geo.disc_x, geo.disc_y, geo.disc_radius),
                           fovea=(geo.fovea_x, geo.fovea_y))


# ---------------------------------------------------------------------------------------------
# Writing a DRIVE-layout dataset


def _image_seed(seed: int, index: int) -> int:
    """Independent, reproducible per-image seed derived from (seed, index)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_synthetic_dataset(out_dir: str | os.PathLike, num_images: int = 20, seed: int = 0,
                            size: tuple[int, int] = (584, 565),
                            num_test: int | None = None) -> Path:
    """Writes synthetic images in the DRIVE folder layout plus RITE-style A/V labels.

    Test images are numbered 01..num_test, training images continue after them (like DRIVE's
    01-20 test, 21-40 training)::

        out_dir/test/images/01_test.tif        out_dir/training/images/NN_training.tif
        out_dir/test/1st_manual/01_manual1.gif out_dir/training/1st_manual/NN_manual1.gif
        out_dir/test/mask/01_test_mask.gif     out_dir/training/mask/NN_training_mask.gif
        out_dir/test/av/01_test.png            out_dir/training/av/NN_training.png

    Image i (0-based over the whole set) uses a seed derived from (seed, i). The set is written
    into a temporary folder beside ``out_dir`` and then renamed, with ``synthetic.json`` (its
    settings) marking it as retina_tf's: a run again replaces it whole, never mixing old and
    new images.

    Args:
        out_dir: dataset root; created, or replaced when it holds a synthetic set written
            before. Any other folder that is not empty is refused (ConfigError).
        num_images: total number of images (test + training), >= 1.
        seed: base seed.
        size: (height, width) of every image.
        num_test: number of test images; defaults to num_images // 2.

    Returns:
        The dataset root as a Path.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if num_images > MAX_IMAGES:
        raise ValueError(f"num_images must be at most {MAX_IMAGES:,}, got {num_images}")
    if num_test is None:
        num_test = num_images // 2
    if not 0 <= num_test <= num_images:
        raise ValueError(f"num_test must be in [0, num_images={num_images}], got {num_test}")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is a file: give a new or empty folder")
    if root.exists() and not (root / SYNTHETIC_MARKER).is_file() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty and holds no synthetic set written before: "
                          "give a new or empty folder")
    others = _not_written_by_us(root)
    if others:  # replacing the set would delete them with it
        raise ConfigError(f"{root} holds files the synthetic set did not write "
                          f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): "
                          "move them out, or give a new folder")
    with atomic_folder(root) as building:
        _write_samples(building, num_images, num_test, seed, size)
        settings = {"num_images": num_images, "num_test": num_test, "seed": seed,
                    "size": list(size)}
        (building / SYNTHETIC_MARKER).write_text(json.dumps(settings, indent=2) + "\n")
    return root


def _sample_files(num_images: int, num_test: int) -> list[dict[str, str]]:
    """Per image, the files of its image, vessel label, FOV mask and A/V label, relative to the
    set's root: test images numbered first, DRIVE's names."""
    digits = max(2, len(str(num_images)))
    files = []
    for index in range(num_images):
        split = "test" if index < num_test else "training"
        number = f"{index + 1:0{digits}d}"
        files.append({"image": f"{split}/images/{number}_{split}.tif",
                      "vessel": f"{split}/1st_manual/{number}_manual1.gif",
                      "fov": f"{split}/mask/{number}_{split}_mask.gif",
                      "av": f"{split}/av/{number}_{split}.png"})
    return files


def _written_files(num_images: int, num_test: int) -> set[str]:
    """The files :func:`write_synthetic_dataset` writes, relative to its root."""
    return {SYNTHETIC_MARKER} | {f for sample in _sample_files(num_images, num_test)
                                 for f in sample.values()}


def _not_written_by_us(root: Path) -> list[str]:
    """The files and folders in a synthetic set's folder that its run did not write (by its
    synthetic.json: a user's notes, the label files bin/preprocess.py writes there by default,
    DRIVE's own 21_training.tif put beside the set), relative to ``root``."""
    marker = root / SYNTHETIC_MARKER
    if not marker.is_file():
        return []
    try:
        settings = json.loads(marker.read_text())
        num_images, num_test = settings["num_images"], settings["num_test"]
        if not (type(num_images) is int and type(num_test) is int
                and 0 <= num_test <= num_images <= MAX_IMAGES):
            raise ValueError(f"num_images {num_images!r}, num_test {num_test!r}")
        written = _written_files(num_images, num_test)
    except (OSError, ValueError, KeyError, TypeError) as err:
        # what the set holds is unknown: nothing is replaced
        raise ConfigError(f"{marker} is damaged ({type(err).__name__}): the set it marks is "
                          "unknown, so nothing is replaced; give a new folder, or delete this "
                          "one yourself") from err
    folders = {str(Path(f).parent) for f in written} | {"training", "test"}
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
            if str(p.relative_to(root)) not in (folders if p.is_dir() else written)]


def _write_samples(root: Path, num_images: int, num_test: int, seed: int,
                   size: tuple[int, int]) -> None:
    files = _sample_files(num_images, num_test)
    names = [Path(f["image"]).stem for f in files]
    for index in progress(range(num_images), "make_synthetic", names=names):
        sample = generate_fundus(_image_seed(seed, index), size)
        # TIFF and PNG are lossless; the GIF masks hold exactly 0 and 255 like DRIVE's.
        write_image_atomic(root / files[index]["image"], sample.image)
        write_image_atomic(root / files[index]["vessel"], sample.vessel)
        write_image_atomic(root / files[index]["fov"], sample.fov)
        write_image_atomic(root / files[index]["av"], encode_av_rgb(sample.artery, sample.vein))
