"""Artery/vein (A/V) label maps: decoding the datasets' file formats into three boolean channels.

Every A/V target in retina_tf is an ``HxWx3`` bool array with channels ``(artery, vein, vessel)``.
Crossing pixels count as both artery and vein; uncertain pixels are vessel only; ``vessel`` is the
union of everything the annotator drew.

Formats met in the public datasets (checked on the files, see ``tests/data/test_av.py``):

* RITE / AV-DRIVE (Hu et al., MICCAI 2013) and LES-AV (Orlando et al., MICCAI 2018) ship RGB
  maps: red artery, blue vein, green crossing, white uncertain, black background. RITE has a few
  stray colours where red and blue strokes meet (magenta ``(255, 0, 255)``, cyan ``(0, 255, 255)``)
  and a handful of anti-aliased reds and blues such as ``(221, 0, 34)``; :func:`decode_av_rgb`
  maps every colour to its nearest class colour and, on a tie, to the union of the tied classes
  (magenta is equidistant from red, blue and white, so it becomes artery and vein).
* HRF-AV (Hemelings et al., 2019) ships an 8-bit index map: 0 background, 1 artery, 2 vein,
  3 crossing *or* uncertain (the file does not tell them apart), see :func:`decode_av_index`.
"""

from __future__ import annotations

import numpy as np

# Class colours of the RITE convention, in the order used by `_PALETTE` below.
BACKGROUND_RGB = (0, 0, 0)
ARTERY_RGB = (255, 0, 0)
VEIN_RGB = (0, 0, 255)
CROSSING_RGB = (0, 255, 0)
UNCERTAIN_RGB = (255, 255, 255)

_PALETTE = np.array([ARTERY_RGB, VEIN_RGB, CROSSING_RGB, UNCERTAIN_RGB, BACKGROUND_RGB], np.int32)
# Membership of each palette colour in (artery, vein); every non-background colour is vessel.
_ARTERY_OF = np.array([True, False, True, False, False])
_VEIN_OF = np.array([False, True, True, False, False])

HRF_AV_BACKGROUND, HRF_AV_ARTERY, HRF_AV_VEIN, HRF_AV_CROSSING_OR_UNCERTAIN = 0, 1, 2, 3


def decode_av_rgb(rgb: np.ndarray) -> np.ndarray:
    """Decodes a RITE-style RGB A/V map into ``(artery, vein, vessel)`` booleans.

    Args:
        rgb: ``HxWx3`` integer array in RGB order (red artery, blue vein, green crossing,
            white uncertain, black background).

    Returns:
        ``HxWx3`` bool array: artery, vein, vessel. Crossings set artery and vein; uncertain
        pixels set vessel only. Off-palette colours go to the nearest class colour (Euclidean in
        RGB); ties go to the union of the tied classes.

    Raises:
        ValueError: when ``rgb`` is not ``HxWx3``.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"an RGB A/V map must be HxWx3, got shape {rgb.shape}")
    out = np.zeros(rgb.shape, bool)
    # Nearly all pixels are exact black; only decode the rest (a few percent) colour by colour.
    drawn = rgb.any(axis=-1)
    colours = rgb[drawn].astype(np.int32)
    if colours.size:
        dist = ((colours[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(axis=-1)
        nearest = dist == dist.min(axis=1, keepdims=True)
        artery = (nearest & _ARTERY_OF).any(axis=1)
        vein = (nearest & _VEIN_OF).any(axis=1)
        # Black cannot tie with any class colour for integer inputs, so "not nearest to black"
        # is the vessel channel.
        vessel = ~nearest[:, -1]
        out[drawn] = np.stack([artery, vein, vessel], axis=-1)
    return out


def decode_av_index(idx: np.ndarray) -> np.ndarray:
    """Decodes an HRF-AV index map into ``(artery, vein, vessel)`` booleans.

    HRF-AV (Hemelings et al., "Artery-vein segmentation in fundus images using a fully
    convolutional network", CMIG 2019) stores 0 background, 1 artery, 2 vein and 3 for pixels
    that are a crossing or uncertain. Label 3 mixes both kinds (in ``01_h`` 5 of its 13 blobs
    touch an artery and a vein, 6 touch neither), so it is decoded as vessel only: it cannot be
    counted as both classes without inventing crossings, and A/V metrics skip crossings anyway.

    Args:
        idx: ``HxW`` integer array with values in ``{0, 1, 2, 3}``.

    Returns:
        ``HxWx3`` bool array: artery, vein, vessel.

    Raises:
        ValueError: when ``idx`` is not 2-D or holds values other than 0..3.
    """
    idx = np.asarray(idx)
    if idx.ndim != 2:
        raise ValueError(f"an A/V index map must be HxW, got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"an A/V index map must hold integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() > HRF_AV_CROSSING_OR_UNCERTAIN):
        found = np.unique(idx)
        raise ValueError(f"an A/V index map holds values 0..3, found {found[:10].tolist()}")
    return np.stack([idx == HRF_AV_ARTERY, idx == HRF_AV_VEIN, idx != HRF_AV_BACKGROUND], axis=-1)


def encode_av_rgb(artery: np.ndarray, vein: np.ndarray,
                  vessel: np.ndarray | None = None) -> np.ndarray:
    """Encodes artery/vein masks as a RITE-style RGB map (the inverse of :func:`decode_av_rgb`).

    Args:
        artery: ``HxW`` bool artery mask.
        vein: ``HxW`` bool vein mask; pixels in both masks become green crossings.
        vessel: optional ``HxW`` bool vessel mask; its pixels outside artery and vein are
            written white (uncertain).

    Returns:
        ``HxWx3`` uint8 RGB: red artery, blue vein, green crossing, white uncertain, black
        elsewhere.

    Raises:
        ValueError: when the masks differ in shape or are not 2-D.
    """
    artery = np.asarray(artery, bool)
    vein = np.asarray(vein, bool)
    shapes = {artery.shape, vein.shape} | ({np.shape(vessel)} if vessel is not None else set())
    if len(shapes) != 1 or artery.ndim != 2:
        raise ValueError(f"artery, vein (and vessel) must be HxW masks of one shape, got {shapes}")
    rgb = np.zeros(artery.shape + (3,), np.uint8)
    if vessel is not None:
        rgb[np.asarray(vessel, bool)] = UNCERTAIN_RGB
    rgb[artery & ~vein] = ARTERY_RGB
    rgb[vein & ~artery] = VEIN_RGB
    rgb[artery & vein] = CROSSING_RGB
    return rgb
