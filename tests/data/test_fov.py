"""Tests for retina_tf.data.fov.estimate_fov: known discs, then the real DRIVE masks."""

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from retina_tf.data.catalog import list_samples
from retina_tf.data.fov import estimate_fov
from retina_tf.data.io import read_image, read_mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def _disc_image(radius: int = 40, size: int = 120) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((size, size, 3), 6, np.uint8)  # dark frame, not quite black
    disc = np.zeros((size, size), np.uint8)
    cv2.circle(disc, (size // 2, size // 2), radius, 1, -1)
    image[disc > 0] = (170, 80, 40)
    return image, disc > 0


def test_disc_is_found_and_eroded():
    image, disc = _disc_image()
    fov = estimate_fov(image, erode=0)
    assert fov.dtype == bool and fov.shape == disc.shape
    # The 5x5 opening may shave the outline by a pixel at most.
    assert _dice(fov, disc) > 0.99
    eroded = estimate_fov(image, erode=3)
    assert not (eroded & ~fov).any()
    # Eroding a radius-40 disc by 3 px leaves about (37/40)^2 of its area.
    assert eroded.sum() / disc.sum() == pytest.approx((37 / 40) ** 2, abs=0.02)


def test_holes_filled_and_one_component():
    image, disc = _disc_image()
    cv2.circle(image, (60, 60), 8, (0, 0, 0), -1)         # dark lesion inside: a hole
    cv2.circle(image, (6, 6), 4, (200, 200, 200), -1)     # bright speck in the frame
    fov = estimate_fov(image, erode=0)
    assert fov[60, 60] and not fov[6, 6]
    assert cv2.connectedComponents(fov.astype(np.uint8))[0] == 2  # background + one disc
    assert _dice(fov, disc) > 0.99


def test_image_without_frame_is_all_fov():
    assert estimate_fov(np.full((20, 30, 3), 120, np.uint8)).all()
    assert estimate_fov(np.zeros((20, 30, 3), np.uint8)).all()


def test_accepts_red_channel_alone():
    image, _ = _disc_image()
    np.testing.assert_array_equal(estimate_fov(image[..., 0]), estimate_fov(image))


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((8,), np.uint8)])
def test_rejects_bad_images(bad):
    with pytest.raises(ValueError):
        estimate_fov(bad)


def test_rejects_negative_erode():
    with pytest.raises(ValueError, match="erode"):
        estimate_fov(np.zeros((8, 8, 3), np.uint8), erode=-1)


def test_dice_against_all_drive_masks(shared_data: Path):
    """The estimate matches the 40 official DRIVE masks (Staal et al. 2004) with Dice > 0.98."""
    dices, seconds = [], []
    for sample in list_samples("drive", shared_data / "DRIVE", "all"):
        image = read_image(sample.image)
        start = time.perf_counter()
        fov = estimate_fov(image)
        seconds.append(time.perf_counter() - start)
        dices.append(_dice(fov, read_mask(sample.fov, "fov")))
    assert len(dices) == 40
    print(f"\nDRIVE FOV Dice min {min(dices):.4f} mean {np.mean(dices):.4f}; "
          f"median {1000 * np.median(seconds):.1f} ms/image")
    assert min(dices) > 0.98
    assert np.median(seconds) < 0.05


@pytest.mark.parametrize("dataset,folder,official_mask", [
    ("stare", "STARE", False),
    ("chase_db1", "samples/CHASE_DB1", False),
    ("hrf", "samples/HRF", True),
    ("les_av", "samples/LES-AV", True),
])
def test_sane_on_other_datasets(shared_data: Path, dataset: str, folder: str,
                                official_mask: bool):
    for sample in list_samples(dataset, shared_data / folder, "all"):
        image = read_image(sample.image)
        fov = estimate_fov(image)
        height, width = fov.shape
        assert 0.6 < fov.mean() < 0.9, (sample.name, fov.mean())
        assert fov[height // 2, width // 2]
        assert not fov[0, 0] and not fov[-1, -1] and not fov[0, -1] and not fov[-1, 0]
        assert cv2.connectedComponents(fov.astype(np.uint8))[0] == 2, sample.name
        # No holes: filling the outer contour adds nothing.
        contours, _ = cv2.findContours(fov.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        filled = cv2.drawContours(np.zeros(fov.shape, np.uint8), contours, -1, 1, cv2.FILLED)
        assert (filled > 0).sum() == fov.sum()
        if official_mask:
            assert _dice(fov, read_mask(sample.fov, "fov")) > 0.98, sample.name


def test_a_crop_inside_the_fov_is_all_field_of_view_and_keeps_its_scale(shared_data):
    from retina_tf.inference import fov_diameter
    image = read_image(shared_data / "DRIVE/test/images/01_test.tif")
    for crop in (image[142:442, 132:432], image[100:500, 150:400]):
        fov = estimate_fov(crop)
        assert fov.all()  # no dark frame at its corners: nothing is cut away
        assert fov_diameter(fov) == 0.0  # no edge to measure: segmented as it is
    # a crop with the frame at one corner still gets its edge
    corner = image[:300, :300]
    assert 0.5 < estimate_fov(corner).mean() < 0.99


def test_a_field_of_view_of_almost_all_or_almost_none_of_the_image_is_warned_of():
    from retina_tf.data.fov import fov_coverage_warning
    yy, xx = np.mgrid[:1000, :1000]
    phone = (yy - 500) ** 2 + (xx - 400) ** 2 <= 105 ** 2  # a small disc in a large frame
    assert fov_coverage_warning(phone, "p.png") == (
        "warning: p.png: the estimated field of view is 211x211 px, 3% of the image; if the "
        "retina is larger than that, give the FOV mask with --fov")
    assert "covers 100% of the image, almost the whole image" in fov_coverage_warning(
        np.ones((50, 60), bool), "crop.png")
    assert fov_coverage_warning((yy - 500) ** 2 + (xx - 500) ** 2 <= 450 ** 2, "d.png") is None


def test_a_second_retina_left_out_of_the_field_of_view_is_warned_of():
    from retina_tf.data.fov import second_region_warning
    from retina_tf.data.synthetic import generate_fundus
    photo = generate_fundus(1, size=(96, 96)).image
    pair = np.concatenate([photo, photo], axis=1)  # a stereo pair: only one disc is the FOV
    assert estimate_fov(pair)[:, 96:].sum() == 0 or estimate_fov(pair)[:, :96].sum() == 0
    assert "pair.png: a second bright region 100% the size of the field of view was left " \
        "out of it" in second_region_warning(pair, "pair.png")
    assert second_region_warning(photo, "one.png") is None
