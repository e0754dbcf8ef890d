"""Tests for retina_tf.data.av: A/V colour and index decoding, checked on the real label files."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from retina_tf.data.av import decode_av_index, decode_av_rgb, encode_av_rgb
from retina_tf.data.io import read_image, read_mask

# Colours RITE and LES-AV use, and the stray ones found in RITE (see the module docstring).
CLASS_COLOURS = {(0, 0, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)}


def test_decode_av_rgb_known_answers():
    colours = [
        ((0, 0, 0), (0, 0, 0)),          # background
        ((255, 0, 0), (1, 0, 1)),        # artery
        ((0, 0, 255), (0, 1, 1)),        # vein
        ((0, 255, 0), (1, 1, 1)),        # crossing: both
        ((255, 255, 255), (0, 0, 1)),    # uncertain: vessel only
        ((255, 0, 255), (1, 1, 1)),      # magenta ties red/blue/white -> union
        ((0, 255, 255), (1, 1, 1)),      # cyan ties green/blue/white -> union
        ((221, 0, 34), (1, 0, 1)),       # anti-aliased red found in RITE 09_test
        ((2, 0, 253), (0, 1, 1)),        # anti-aliased blue
        ((100, 0, 0), (0, 0, 0)),        # 100 from black, 155 from red -> background
        ((200, 200, 190), (0, 0, 1)),    # near white
    ]
    rgb = np.array([[c for c, _ in colours]], np.uint8)
    expected = np.array([[e for _, e in colours]], bool)
    np.testing.assert_array_equal(decode_av_rgb(rgb), expected)


def test_decode_av_index_known_answers():
    idx = np.array([[0, 1, 2, 3]], np.uint8)
    expected = np.array([[[0, 0, 0], [1, 0, 1], [0, 1, 1], [0, 0, 1]]], bool)
    np.testing.assert_array_equal(decode_av_index(idx), expected)


@pytest.mark.parametrize("bad", [np.array([[0, 4]], np.uint8), np.array([[-1, 0]], np.int16),
                                 np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.float32)])
def test_decode_av_index_rejects_bad_maps(bad):
    with pytest.raises(ValueError):
        decode_av_index(bad)


def test_decode_av_rgb_rejects_wrong_shape():
    with pytest.raises(ValueError, match="HxWx3"):
        decode_av_rgb(np.zeros((4, 4), np.uint8))


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    artery = rng.random((32, 40)) < 0.2
    vein = rng.random((32, 40)) < 0.2
    vessel = artery | vein | (rng.random((32, 40)) < 0.1)
    rgb = encode_av_rgb(artery, vein, vessel)
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 40, 3)
    assert {tuple(c) for c in rgb.reshape(-1, 3)} <= CLASS_COLOURS
    assert (rgb[artery & vein] == [0, 255, 0]).all()
    decoded = decode_av_rgb(rgb)
    np.testing.assert_array_equal(decoded[..., 0], artery)
    np.testing.assert_array_equal(decoded[..., 1], vein)
    np.testing.assert_array_equal(decoded[..., 2], vessel)
    # Without a vessel mask nothing is white.
    np.testing.assert_array_equal(decode_av_rgb(encode_av_rgb(artery, vein))[..., 2],
                                  artery | vein)


def test_encode_av_rgb_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        encode_av_rgb(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def _lightness_ratio(image: np.ndarray, mask: np.ndarray, core: int) -> float:
    """Mean green of a vessel class's thick parts relative to the local background."""
    green = image[..., 1]
    background = cv2.medianBlur(green, 51).astype(float)
    inner = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5) >= core
    return float((green[inner] / np.maximum(background[inner], 1)).mean())


def test_rite_colours_and_vessel_files(shared_data: Path):
    """RITE: 5 class colours plus < 100 stray pixels in 40 files; decoded vessel = vessel/."""
    strays = 0
    for av_path in sorted((shared_data / "RITE").glob("*/av/*.png")):
        rgb = read_image(av_path)
        packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8)
        codes, counts = np.unique(packed | rgb[..., 2], return_counts=True)
        strays += sum(n for code, n in zip(codes.tolist(), counts)
                      if (code >> 16, (code >> 8) & 255, code & 255) not in CLASS_COLOURS)
        av = decode_av_rgb(rgb)
        assert av[..., 0].any() and av[..., 1].any()
        assert not (av[..., 0] & ~av[..., 2]).any() and not (av[..., 1] & ~av[..., 2]).any()
        vessel = read_mask(av_path.parent.parent / "vessel" / av_path.name)
        assert (av[..., 2] != vessel).sum() <= 1, av_path
    assert 0 < strays < 100


def test_les_av_rgb_equals_binary_files(shared_data: Path):
    """LES-AV: arteries-and-veins/ RGB encodes arteries/ and veins/ exactly (green = both)."""
    root = shared_data / "samples" / "LES-AV"
    for av_path in sorted((root / "arteries-and-veins").glob("*.png")):
        av = decode_av_rgb(read_image(av_path))
        arteries = read_mask(root / "arteries" / av_path.name)
        veins = read_mask(root / "veins" / av_path.name)
        vessel = read_mask(root / "vessel-segmentations" / av_path.name)
        np.testing.assert_array_equal(av[..., 0], arteries)
        np.testing.assert_array_equal(av[..., 1], veins)
        assert (arteries & veins).sum() > 1000  # crossings are in both binary files
        # White (uncertain) pixels are in the vessel segmentation but in neither binary file.
        assert (av[..., 2] & ~vessel).sum() == 0
        assert (vessel & ~av[..., 2]).sum() <= 10


def test_hrf_av_index_values_and_vessels(shared_data: Path):
    manual = shared_data / "samples" / "HRF-AV" / "training" / "1st_manual" / "01_h_AVmanual.png"
    idx = cv2.imread(str(manual), cv2.IMREAD_UNCHANGED)
    assert idx.ndim == 2 and set(np.unique(idx).tolist()) == {0, 1, 2, 3}
    av = decode_av_index(idx)
    hrf_vessel = read_mask(shared_data / "samples" / "HRF" / "manual1" / "01_h.tif")
    assert (av[..., 2] != hrf_vessel).sum() <= 2  # HRF-AV redraws HRF's own vessel label


@pytest.mark.parametrize("dataset", ["rite", "les_av", "hrf_av"])
def test_arteries_are_lighter_than_veins(shared_data: Path, dataset: str):
    """Checks each format's artery/vein convention against the image: arteries are lighter."""
    if dataset == "rite":
        image = read_image(shared_data / "RITE" / "training" / "images" / "21_training.tif")
        av, core = decode_av_rgb(read_image(shared_data / "RITE" / "training" / "av" /
                                            "21_training.png")), 2
    elif dataset == "les_av":
        root = shared_data / "samples" / "LES-AV"
        image = read_image(root / "images" / "12.png")
        av, core = decode_av_rgb(read_image(root / "arteries-and-veins" / "12.png")), 3
    else:
        root = shared_data / "samples" / "HRF-AV" / "training"
        # Half resolution keeps the median filter quick; the index map is downsampled nearest.
        image = cv2.resize(read_image(root / "images" / "01_h.jpg"), None, fx=0.5, fy=0.5,
                           interpolation=cv2.INTER_AREA)
        idx = cv2.imread(str(root / "1st_manual" / "01_h_AVmanual.png"), cv2.IMREAD_UNCHANGED)
        av, core = decode_av_index(idx[::2, ::2]), 3
    artery_only = av[..., 0] & ~av[..., 1]
    vein_only = av[..., 1] & ~av[..., 0]
    artery = _lightness_ratio(image, artery_only, core)
    vein = _lightness_ratio(image, vein_only, core)
    assert artery > vein + 0.04, (artery, vein)
