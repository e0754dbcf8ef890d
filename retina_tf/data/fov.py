"""Field-of-view (FOV) estimation for fundus photographs that ship without a mask.

STARE and CHASE_DB1 come without FOV masks. The camera aperture is a bright disc on a dark
frame, so thresholding the red channel (the channel with the most contrast between retina and
frame) finds it reliably; the threshold sits just above the frame's dark level so that the dim
rim of the disc stays inside. Against the 40 official DRIVE masks the default settings reach a
Dice of at least 0.987 (mean 0.990; see ``tests/data/test_fov.py``).
"""

from __future__ import annotations

import cv2
import numpy as np

# Where the threshold sits between the frame's and the retina's typical red level. Low, because
# the disc darkens towards its rim (vignetting); the opening below removes the frame noise that
# a low threshold lets through (STARE frames reach red 30).
EDGE_FRACTION = 0.1
# Below this red-level gap between "frame" and "retina" there is no dark frame to find (e.g. a
# crop inside the FOV): the whole image is the field of view.
MIN_CONTRAST = 10
# A camera's frame is near black beside the retina: the frame's median red level is at most 0.15
# of the retina's in DRIVE, STARE, RITE and the CHASE_DB1, HRF and LES-AV samples. In a crop
# inside the FOV the split is darker against brighter retina (0.58 and more in centre crops of
# half and 0.6 of those photographs): no frame, all of it is the field of view.
MAX_FRAME_RATIO = 0.35


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def estimate_fov(image: np.ndarray, erode: int = 3) -> np.ndarray:
    """Estimates the circular field of view of a fundus image.

    Steps: median-filter the red channel; split it into frame and retina with Otsu's threshold
    and take the median red level of each; threshold at 10 % of the way from the frame level to
    the retina level; open with a 5x5 disc to drop noise; keep the largest component with its
    holes filled (dark lesions and the fovea stay inside); erode by ``erode`` pixels so that the
    dim, blurred rim is left out, as the official DRIVE masks do. An image without a dark
    frame (no contrast, or a "frame" level over a third of the retina's: a crop inside the
    FOV) is all field of view.

    Args:
        image: ``HxWx3`` uint8 RGB fundus image (or an ``HxW`` uint8 red channel).
        erode: radius in pixels of the final erosion; 0 keeps the thresholded edge.

    Returns:
        ``HxW`` bool mask, True inside the field of view.

    Raises:
        ValueError: for an image that is not ``HxW`` or ``HxWx3`` uint8, or a negative erode.

    Example:
        >>> import cv2
        >>> import numpy as np
        >>> image = np.zeros((64, 64, 3), np.uint8)
        >>> _ = cv2.circle(image, (32, 32), 25, (180, 90, 40), -1)
        >>> fov = estimate_fov(image, erode=0)
        >>> bool(fov[32, 32]), bool(fov[0, 0])
        (True, False)
    """
    if erode < 0:
        raise ValueError(f"erode must be >= 0, got {erode}")
    shape, contours = _bright_regions(image)
    if not contours:
        return np.ones(shape, bool)
    # Filling the largest outer contour keeps one component and fills its holes in one step.
    fov = np.zeros(shape, np.uint8)
    cv2.drawContours(fov, [max(contours, key=cv2.contourArea)], -1, 1, thickness=cv2.FILLED)
    if erode:
        fov = cv2.erode(fov, _disc(erode))
    return fov.astype(bool)


def _bright_regions(image: np.ndarray) -> tuple[tuple[int, int], list]:
    """The image's shape and the outer contours of its regions brighter than the frame
    (:func:`estimate_fov`'s steps up to the choice of the largest); none where there is no
    dark frame."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3
                                                                and image.shape[-1] != 3):
        raise ValueError(f"estimate_fov needs an HxWx3 (or HxW) uint8 image, got shape "
                         f"{image.shape} dtype {image.dtype}")
    red = np.ascontiguousarray(image[..., 0] if image.ndim == 3 else image)
    red = cv2.medianBlur(red, 5)

    otsu, _ = cv2.threshold(red, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    split = int(otsu)
    cumulative = np.cumsum(np.bincount(red.ravel(), minlength=256))
    below, total = cumulative[split], cumulative[-1]
    if below == 0 or below == total:
        return red.shape, []
    frame_level = int(np.searchsorted(cumulative, below / 2))
    retina_level = int(np.searchsorted(cumulative, below + (total - below) / 2))
    if retina_level - frame_level < MIN_CONTRAST or frame_level > MAX_FRAME_RATIO * retina_level:
        return red.shape, []
    threshold = frame_level + EDGE_FRACTION * (retina_level - frame_level)

    mask = (red > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disc(2))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return red.shape, list(contours)


# A bright region left out of the estimated FOV this large against the one kept is another
# retina (a stereo pair, two photographs side by side), not a reflection or a date stamp.
SECOND_REGION_RATIO = 0.25


def second_region_warning(image: np.ndarray, source: str) -> str | None:
    """A one-line warning when :func:`estimate_fov` left out a bright region at least
    :data:`SECOND_REGION_RATIO` of the one it kept (its second retina is not segmented),
    else None."""
    _, contours = _bright_regions(image)
    areas = sorted((cv2.contourArea(c) for c in contours), reverse=True)
    if len(areas) < 2 or areas[1] < SECOND_REGION_RATIO * areas[0]:
        return None
    return (f"warning: {source}: a second bright region {areas[1] / areas[0]:.0%} the size of "
            "the field of view was left out of it (two photographs side by side?): only the "
            "larger is segmented; segment each alone, or give the FOV mask with --fov")


# The estimated FOV of a real fundus photograph covers 67-84 % of the frame (all of DRIVE,
# STARE and RITE, and the CHASE_DB1, HRF and LES-AV samples; a disc inscribed in a square
# covers 79 %). Outside this range the estimate has most likely failed: above it no dark frame
# was found (a crop inside the FOV, a grey border), below it only a bright spot was kept.
FOV_COVERAGE_RANGE = (0.2, 0.95)


def fov_coverage_warning(fov: np.ndarray, source: str) -> str | None:
    """A one-line warning when an estimated FOV covers (almost) the whole frame or almost none
    of it, else None.

    Args:
        fov: the estimated ``HxW`` bool mask.
        source: the image file, named in the warning.
    """
    coverage = float(np.mean(fov)) if fov.size else 0.0
    low, high = FOV_COVERAGE_RANGE
    if low <= coverage <= high:
        return None
    if coverage > high:
        return (f"warning: {source}: the estimated field of view covers {coverage:.0%} of the "
                "image, almost the whole image (no dark frame around the retina found); if the "
                "result looks wrong, give the FOV mask with --fov")
    # a phone adapter's small disc in a large frame is right; a bright spot is not: the size says
    rows, cols = np.flatnonzero(fov.any(axis=1)), np.flatnonzero(fov.any(axis=0))
    size = f"{cols[-1] - cols[0] + 1}x{rows[-1] - rows[0] + 1} px, " if rows.size else ""
    return (f"warning: {source}: the estimated field of view is {size}{coverage:.0%} of the "
            "image; if the retina is larger than that, give the FOV mask with --fov")


def given_fov_warning(image: np.ndarray, fov: np.ndarray, source: str) -> str | None:
    """A one-line warning when a FOV mask given with ``image`` cannot be its camera's, else
    None: the mask keeps the darker part of the photograph (inverted: the frame is scored and
    the retina left out), or covers the whole image of a photograph with a dark frame (an
    all-white mask: the frame is scored as retina, and a model's few false vessels there count).

    Args:
        image: the ``HxWx3`` uint8 RGB photograph.
        fov: the given ``HxW`` bool mask.
        source: the mask file (or, for a mask given as an array, the image), named in the
            warning.
    """
    red = image[..., 0]
    if fov.all():
        coverage = float(np.mean(estimate_fov(image)))
        if coverage > FOV_COVERAGE_RANGE[1]:
            return None
        return (f"warning: {source}: the FOV mask covers the whole image, but the photograph "
                f"has a dark frame around a field of view of {coverage:.0%} of it: the frame is "
                "scored as retina; give the camera's mask, or none to estimate it")
    inside, outside = float(red[fov].mean()), float(red[~fov].mean())
    if inside >= MAX_FRAME_RATIO * outside:  # a light surround beside a right mask is not
        return None
    return (f"warning: {source}: the FOV mask keeps the darker part of the photograph (mean red "
            f"level {inside:.0f} inside, {outside:.0f} outside): is it inverted? The field of "
            "view must be the white part")


def estimate_warnings(image: np.ndarray, fov: np.ndarray, source: str) -> list[str]:
    """The warnings an estimated ``fov`` of ``image`` calls for: its coverage
    (:func:`fov_coverage_warning`) and a second retina left out (:func:`second_region_warning`).
    """
    return [w for w in (fov_coverage_warning(fov, source), second_region_warning(image, source))
            if w]
