"""The run's preprocessing and field-of-view estimate written with TensorFlow ops.

A SavedModel whose serving signature takes a raw uint8 photograph of any size needs the whole
preprocessing inside the graph. These functions redo, with TensorFlow ops only, what
:class:`retina_tf.data.preprocess.Preprocessor` and :func:`retina_tf.data.fov.estimate_fov` do
with NumPy and OpenCV; each traces inside ``tf.function`` with dynamic height and width.
Python runs only while tracing (constants such as the gamma table and structuring elements);
nothing loops over pixels or tiles when the graph runs.

CLAHE (Zuiderveld, "Contrast Limited Adaptive Histogram Equalization", Graphics Gems IV, 1994)
has no TensorFlow op; :func:`clahe` follows OpenCV's implementation
(``modules/imgproc/src/clahe.cpp``, ``cv::createCLAHE``) step by step, in the same integer and
float32 arithmetic, so that it gives OpenCV's grey levels.
"""

from __future__ import annotations

import cv2
import numpy as np
import tensorflow as tf

from retina_tf.data.fov import EDGE_FRACTION, MAX_FRAME_RATIO, MIN_CONTRAST
from retina_tf.data.preprocess import Preprocessor

_BINS = 256
_FLT_EPSILON = float(np.finfo(np.float32).eps)


def _check_uint8(image: tf.Tensor, rank: int, name: str) -> tf.Tensor:
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"{name} needs a uint8 image, got {image.dtype.name}")
    if image.shape.rank is not None and image.shape.rank != rank:
        raise ValueError(f"{name} needs a rank-{rank} image, got shape {image.shape}")
    return image


def _divide(x: tf.Tensor, denominator: float) -> tf.Tensor:
    """``x / denominator`` rounded as NumPy rounds it. Inside ``tf.function`` Grappler's
    constant folding turns a division by a constant into a multiplication by its reciprocal,
    one unit in the last place off for about half of the values (enough to move a grey level
    after standardization); it leaves DivNoNan, exact for a non-zero denominator, alone."""
    return tf.math.divide_no_nan(x, tf.constant(denominator, tf.float32))


def _reflect_101(index: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """OpenCV's ``borderInterpolate(index, size, BORDER_REFLECT_101)`` for ``index >= 0``
    (``abcd|cba``; periodic, so a border wider than the image folds back again)."""
    period = tf.maximum(2 * (size - 1), 1)
    folded = index % period
    return tf.where(folded < size, folded, period - folded)


def _tile_coordinates(length: tf.Tensor, tile: tf.Tensor, tiles: int):
    """Per row (or column): the two neighbouring tiles and the weight of the second, with
    OpenCV's convention ``t = x * (1 / tile) - 0.5`` in float32."""
    inverse = tf.constant(1.0, tf.float32) / tf.cast(tile, tf.float32)
    position = tf.cast(tf.range(length), tf.float32) * inverse - 0.5
    first = tf.floor(position)
    weight = position - first
    first = tf.cast(first, tf.int32)
    return tf.maximum(first, 0), tf.minimum(first + 1, tiles - 1), weight


def clahe(gray: tf.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> tf.Tensor:
    """Contrast limited adaptive histogram equalization, as ``cv2.createCLAHE(clip_limit,
    (tiles, tiles)).apply(gray)``.

    Zuiderveld, "Contrast Limited Adaptive Histogram Equalization", Graphics Gems IV, 1994, in
    OpenCV's form (``modules/imgproc/src/clahe.cpp``): an image whose size is not a multiple of
    the tile grid is extended at the bottom and right by reflect-101 (both sides by a further
    ``tiles - size % tiles``) for the tile histograms only; each tile's 256-bin histogram is
    clipped at ``max(1, int(clip_limit * tile_area / 256))``, the clipped count is spread evenly
    over all bins and its remainder one by one with a stride of ``256 // remainder``; the
    cumulative histogram times ``255 / tile_area`` (float32, rounded half to even) is the tile's
    mapping; each pixel blends the mappings of its four nearest tile centres bilinearly.
    The histograms are one ``bincount`` over (tile, grey level) and the mapping one ``gather``.

    Args:
        gray: ``(H, W)`` uint8 image.
        clip_limit: OpenCV's clip limit (multiples of the mean bin count); <= 0 turns clipping
            off (plain adaptive histogram equalization).
        tiles: tiles per side of the grid.

    Returns:
        ``(H, W)`` uint8.
    """
    gray = _check_uint8(gray, 2, "clahe")
    tiles = int(tiles)
    if tiles < 1:
        raise ValueError(f"clahe needs tiles >= 1, got {tiles}")
    height, width = tf.shape(gray)[0], tf.shape(gray)[1]
    divisible = tf.logical_and(height % tiles == 0, width % tiles == 0)
    ext_height = tf.where(divisible, height, height + tiles - height % tiles)
    ext_width = tf.where(divisible, width, width + tiles - width % tiles)
    tile_height, tile_width = ext_height // tiles, ext_width // tiles
    area = tile_height * tile_width

    # Histogram of every tile: one bincount over the index (tile, grey level).
    values = tf.cast(gray, tf.int32)
    rows, cols = tf.range(ext_height), tf.range(ext_width)
    extended = tf.gather(tf.gather(values, _reflect_101(rows, height), axis=0),
                         _reflect_101(cols, width), axis=1)
    tile_index = (rows // tile_height)[:, None] * tiles + (cols // tile_width)[None, :]
    hist = tf.math.bincount(tf.reshape(tile_index * _BINS + extended, [-1]),
                            minlength=tiles * tiles * _BINS, maxlength=tiles * tiles * _BINS,
                            dtype=tf.int32)
    hist = tf.reshape(hist, [tiles * tiles, _BINS])

    if clip_limit > 0:
        # int(clip_limit * area / 256) in double precision, as OpenCV computes it.
        limit = tf.maximum(tf.cast(tf.constant(float(clip_limit), tf.float64)
                                   * tf.cast(area, tf.float64) / _BINS, tf.int32), 1)
        excess = tf.reduce_sum(tf.maximum(hist - limit, 0), axis=1, keepdims=True)
        batch = excess // _BINS
        residual = excess - batch * _BINS
        step = tf.maximum(_BINS // tf.maximum(residual, 1), 1)
        bins = tf.range(_BINS)[None, :]
        # Bins 0, step, 2 step, ... get one each until the remainder is used up.
        extra = tf.logical_and(bins % step == 0, bins // step < residual)
        hist = tf.minimum(hist, limit) + batch + tf.cast(extra, tf.int32)

    scale = tf.constant(_BINS - 1, tf.float32) / tf.cast(area, tf.float32)
    lut = tf.round(tf.cast(tf.cumsum(hist, axis=1), tf.float32) * scale)  # half to even: cvRound
    lut = tf.reshape(tf.clip_by_value(lut, 0.0, 255.0), [-1])

    # Bilinear blend of the four neighbouring tiles' mappings (on the original image).
    top, bottom, ya = _tile_coordinates(height, tile_height, tiles)
    left, right, xa = _tile_coordinates(width, tile_width, tiles)
    top, bottom, ya = top[:, None] * tiles, bottom[:, None] * tiles, ya[:, None]
    left, right, xa = left[None, :], right[None, :], xa[None, :]

    def mapped(tile_row, tile_col):
        return tf.gather(lut, (tile_row + tile_col) * _BINS + values)

    xa1, ya1 = 1.0 - xa, 1.0 - ya
    # The same float32 expression, in the same order, as OpenCV's interpolation loop.
    res = ((mapped(top, left) * xa1 + mapped(top, right) * xa) * ya1
           + (mapped(bottom, left) * xa1 + mapped(bottom, right) * xa) * ya)
    return tf.cast(tf.clip_by_value(tf.round(res), 0.0, 255.0), tf.uint8)


def preprocess(image: tf.Tensor, preprocessor: Preprocessor) -> tf.Tensor:
    """``preprocessor(image)`` with TensorFlow ops (see
    :class:`retina_tf.data.preprocess.Preprocessor`): grayscale (luminance or green channel),
    standardization with the fitted mean and std then per-image min-max to 0..255, CLAHE
    (:func:`clahe`), gamma lookup table; each step as switched in ``preprocessor``, whose
    constants become graph constants.

    The float32 arithmetic follows the NumPy code operation by operation, so the 8-bit
    intermediate agrees with it; :func:`clahe` is OpenCV's CLAHE to the grey level.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        preprocessor: a fitted :class:`~retina_tf.data.preprocess.Preprocessor` (the mean and
            std are needed when ``standardize`` is on).

    Returns:
        ``(H, W, C)`` float32 in [0, 1], ``C = preprocessor.channels``.

    Raises:
        ValueError: for an image that is not uint8 ``(H, W, 3)``, or standardization without
            fitted statistics.
    """
    image = _check_uint8(image, 3, "preprocess")
    if image.shape[-1] is not None and image.shape[-1] != 3:
        raise ValueError(f"preprocess needs an RGB image (H, W, 3), got shape {image.shape}")
    p = preprocessor
    rgb = tf.cast(image, tf.float32)
    if not p.grayscale:
        x = rgb
    elif p.channel == "green":
        x = rgb[..., 1:2]
    else:
        x = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])[..., None]
    if p.standardize:
        if p.mean is None or p.std is None:
            raise ValueError("Preprocessor.standardize is on but the statistics are not "
                             "fitted: call fit(training_images) or load preprocessor.json")
        x = _divide(x - tf.constant(p.mean, tf.float32), p.std)
        lo = tf.reduce_min(x, axis=(0, 1), keepdims=True)
        hi = tf.reduce_max(x, axis=(0, 1), keepdims=True)
        x = (x - lo) / tf.maximum(hi - lo, 1e-6) * 255.0
    x = tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)  # truncates, as astype(uint8)
    if p.clahe:
        x = tf.stack([clahe(x[..., c], p.clahe_clip, p.clahe_tiles)
                      for c in range(p.channels)], axis=-1)
    if p.gamma:
        table = (np.power(np.arange(256) / 255.0, 1.0 / p.gamma_value) * 255.0).astype(np.uint8)
        x = tf.gather(tf.constant(table), tf.cast(x, tf.int32))
    return _divide(tf.cast(x, tf.float32), 255.0)


# --- field of view -------------------------------------------------------------------------

def _disc(radius: int) -> tf.Tensor:
    """OpenCV's elliptic structuring element as a conv2d filter (built while tracing)."""
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return tf.constant(disc.astype(np.float32)[:, :, None, None])


def _count(mask: tf.Tensor, disc: tf.Tensor) -> tf.Tensor:
    """Pixels of ``mask`` under the disc around each pixel (zero outside the image)."""
    return tf.nn.conv2d(tf.cast(mask, tf.float32)[None, :, :, None], disc, 1, "SAME")[0, :, :, 0]


def _erode(mask: tf.Tensor, disc: tf.Tensor) -> tf.Tensor:
    # Outside the image counts as inside the mask: OpenCV's default border for erosion.
    return _count(tf.logical_not(mask), disc) == 0


def _dilate(mask: tf.Tensor, disc: tf.Tensor) -> tf.Tensor:
    return _count(mask, disc) > 0


def _median_5x5(values: tf.Tensor) -> tf.Tensor:
    """``cv2.medianBlur(values, 5)`` (replicated border) for uint8 values: the 13th smallest
    of the 25, found bit by bit as the largest v with at most 12 window values below v (25
    shifted views; faster than sorting the windows)."""
    height, width = tf.shape(values)[0], tf.shape(values)[1]
    rows = tf.clip_by_value(tf.range(-2, height + 2), 0, height - 1)
    cols = tf.clip_by_value(tf.range(-2, width + 2), 0, width - 1)
    padded = tf.gather(tf.gather(values, rows, axis=0), cols, axis=1)
    windows = [padded[dy:dy + height, dx:dx + width] for dy in range(5) for dx in range(5)]
    median = tf.zeros_like(padded[2:-2, 2:-2])
    for bit in (128, 64, 32, 16, 8, 4, 2, 1):
        candidate = median + bit
        below = tf.add_n([tf.cast(window < candidate, tf.uint8) for window in windows])
        median = tf.where(below <= 12, candidate, median)
    return median


def _run_max(labels: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Every horizontal run of True pixels takes its largest label (one segment max)."""
    width = tf.shape(mask)[1]
    flat = tf.reshape(mask, [-1])
    starts = tf.concat([[True], tf.not_equal(flat[1:], flat[:-1])], axis=0)
    starts = tf.logical_or(starts, tf.equal(tf.range(tf.size(flat)) % width, 0))
    runs = tf.cumsum(tf.cast(starts, tf.int32)) - 1
    run_max = tf.math.segment_max(tf.reshape(labels, [-1]), runs)
    return tf.reshape(tf.gather(run_max, runs), tf.shape(labels))


def _label(mask: tf.Tensor, eight: bool) -> tf.Tensor:
    """Connected components: every True pixel gets the largest flat index in its component,
    False pixels -1. Each round takes the neighbours' maximum, then the maximum along each
    horizontal and vertical run, then jumps to the label's own label (pointer jumping): a few
    rounds where neighbour steps alone would take as many as the component is long."""
    height, width = tf.shape(mask)[0], tf.shape(mask)[1]
    index = tf.reshape(tf.range(height * width), [height, width])
    offsets = ([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx] if eight
               else [(-1, 0), (1, 0), (0, -1), (0, 1)])
    mask_t = tf.transpose(mask)

    def step(labels, _):
        padded = tf.pad(labels, [[1, 1], [1, 1]], constant_values=-1)
        new = labels
        for dy, dx in offsets:
            new = tf.maximum(new, padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width])
        new = tf.where(mask, new, -1)
        new = _run_max(new, mask)
        new = tf.transpose(_run_max(tf.transpose(new), mask_t))
        # A label is a pixel of the same component whose own label is at least as large.
        new = tf.where(mask, tf.gather(tf.reshape(new, [-1]), tf.maximum(new, 0)), -1)
        return new, tf.reduce_any(new != labels)

    labels, _ = tf.while_loop(lambda labels, changed: changed, step,
                              (tf.where(mask, index, -1), tf.constant(True)))
    return labels


def _largest_component_filled(mask: tf.Tensor) -> tf.Tensor:
    """The largest 8-connected component of ``mask`` with its holes (background not 4-connected
    to the image border) filled."""
    labels = _label(mask, eight=True)
    sizes = tf.math.bincount(tf.boolean_mask(labels, mask), minlength=tf.size(labels),
                             maxlength=tf.size(labels), dtype=tf.int32)
    component = tf.equal(labels, tf.cast(tf.argmax(sizes), tf.int32))
    # A frame of background around the image joins every background region that reaches the
    # border into one; it holds the last flat index, so that region's label is that index.
    outside = tf.pad(tf.logical_not(component), [[1, 1], [1, 1]], constant_values=True)
    outside_labels = _label(outside, eight=False)
    outside = tf.equal(outside_labels, tf.size(outside_labels) - 1)
    return tf.logical_not(outside[1:-1, 1:-1])


def _otsu(hist: tf.Tensor) -> tf.Tensor:
    """Otsu's threshold of a 256-bin histogram as OpenCV's ``getThreshVal_Otsu_8u`` picks it:
    the first grey level of largest between-class variance, in double precision."""
    counts = tf.cast(hist, tf.float64)
    scale = 1.0 / tf.reduce_sum(counts)
    levels = tf.range(_BINS, dtype=tf.float64)
    p = counts * scale
    mu = tf.reduce_sum(levels * counts) * scale
    q1 = tf.cumsum(p)
    q2 = 1.0 - q1
    valid = tf.logical_and(tf.minimum(q1, q2) >= _FLT_EPSILON,
                           tf.maximum(q1, q2) <= 1.0 - _FLT_EPSILON)
    safe_q1 = tf.where(valid, q1, 1.0)
    safe_q2 = tf.where(valid, q2, 1.0)
    mu1 = tf.cumsum(levels * p) / safe_q1
    mu2 = (mu - q1 * mu1) / safe_q2
    sigma = tf.where(valid, q1 * q2 * tf.square(mu1 - mu2), 0.0)
    # OpenCV sums sequentially, so its sigma may differ in the last bits; the only near ties
    # are runs of empty bins, which all split the histogram at the same count.
    return tf.cast(tf.argmax(sigma), tf.int32)


def estimate_fov(image: tf.Tensor, erode: int = 3) -> tf.Tensor:
    """:func:`retina_tf.data.fov.estimate_fov` with TensorFlow ops: the circular field of view
    of a fundus photograph.

    Steps as there: 5x5 median of the red channel (replicated border, as ``cv2.medianBlur``);
    Otsu's split (OpenCV's choice of level) and the median red level of each side; threshold at
    10 % of the way from frame to retina; opening with a 5x5 disc; the largest component with
    its holes filled; erosion by an ``erode``-pixel disc. Morphology on a binary mask is a
    convolution with the disc, counting (OpenCV's default border: no erosion from outside).

    TensorFlow has no contour finding or connected components. The NumPy version fills the
    largest outer contour (``cv2.findContours``, largest ``cv2.contourArea``); here the
    components are labelled by iterated maxima (neighbours, then whole horizontal and vertical
    runs, then pointer jumping; 8-connected foreground, like the contours), the largest is the
    one with the most pixels, and its holes are the background regions not 4-connected to the
    image border. The filled region is the same; only the choice between two components of
    nearly equal size could differ (contour area counts the holes and only half the rim).
    On the DRIVE, STARE, CHASE_DB1, HRF and LES-AV photographs the masks are identical to the
    NumPy version's, pixel for pixel.

    Args:
        image: ``(H, W, 3)`` uint8 RGB (or ``(H, W)`` uint8 red channel).
        erode: radius in pixels of the final erosion; 0 keeps the thresholded edge.

    Returns:
        ``(H, W)`` bool, True inside the field of view.
    """
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8 or image.shape.rank not in (2, 3):
        raise ValueError(f"estimate_fov needs an (H, W, 3) or (H, W) uint8 image, got "
                         f"{image.dtype.name} {image.shape}")
    if erode < 0:
        raise ValueError(f"erode must be >= 0, got {erode}")
    red = tf.cast(_median_5x5(image[..., 0] if image.shape.rank == 3 else image), tf.int32)

    hist = tf.math.bincount(tf.reshape(red, [-1]), minlength=_BINS, maxlength=_BINS,
                            dtype=tf.int32)
    cumulative = tf.cast(tf.cumsum(hist), tf.float64)
    below, total = cumulative[_otsu(hist)], cumulative[-1]
    frame_level = tf.searchsorted(cumulative, tf.reshape(below / 2, [1]), side="left")[0]
    retina_level = tf.searchsorted(cumulative, tf.reshape(below + (total - below) / 2, [1]),
                                   side="left")[0]
    threshold = (tf.cast(frame_level, tf.float64)
                 + EDGE_FRACTION * tf.cast(retina_level - frame_level, tf.float64))
    mask = tf.cast(red, tf.float64) > threshold
    mask = _dilate(_erode(mask, _disc(2)), _disc(2))

    no_frame = tf.reduce_any(tf.stack([
        below == 0, below == total, retina_level - frame_level < MIN_CONTRAST,
        tf.cast(frame_level, tf.float64) > MAX_FRAME_RATIO * tf.cast(retina_level, tf.float64)]))
    everything = tf.ones_like(red, tf.bool)

    def found():
        fov = _largest_component_filled(mask)
        return _erode(fov, _disc(erode)) if erode else fov

    return tf.cond(tf.logical_or(no_frame, tf.logical_not(tf.reduce_any(mask))),
                   lambda: everything, found)
