"""Tests for the synthetic fundus generator and its DRIVE-layout writer."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage.morphology import skeletonize

from retina_tf.data import synthetic
from retina_tf.data.io import MAX_VESSEL_SHARE
from retina_tf.data.synthetic import SyntheticFundus, generate_fundus, write_synthetic_dataset
from retina_tf.errors import ConfigError
from tests import commands

REPO_ROOT = Path(__file__).resolve().parents[2]
DRIVE_SIZE = (584, 565)
SMALL = (128, 128)


@pytest.fixture(scope="module")
def drive_sized() -> list[SyntheticFundus]:
    """Three full-size samples, generated once for the statistics tests."""
    return [generate_fundus(seed, DRIVE_SIZE) for seed in (0, 1, 2)]


def _mean_width(mask: np.ndarray) -> float:
    """Mean vessel width: 2 x distance transform sampled along the skeleton."""
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    return float(2.0 * distance[skeletonize(mask)].mean())


def _assert_same(a: SyntheticFundus, b: SyntheticFundus) -> None:
    for field in ("image", "vessel", "fov", "artery", "vein"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_same_seed_gives_identical_arrays():
    _assert_same(generate_fundus(7, SMALL), generate_fundus(7, SMALL))


def test_different_seeds_give_different_images():
    a, b = generate_fundus(7, SMALL), generate_fundus(8, SMALL)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.vessel, b.vessel)


@pytest.mark.parametrize("size", [SMALL, (96, 96), (100, 140), (150, 110), DRIVE_SIZE])
def test_shapes_dtypes_and_label_consistency(size):
    sample = generate_fundus(3, size)
    assert sample.image.shape == size + (3,) and sample.image.dtype == np.uint8
    for mask in (sample.vessel, sample.fov, sample.artery, sample.vein):
        assert mask.shape == size and mask.dtype == bool
    # Labels live inside the FOV, both trees are present, and vessel = artery | vein.
    assert not (sample.vessel & ~sample.fov).any()
    assert sample.artery.sum() > 50 and sample.vein.sum() > 50
    np.testing.assert_array_equal(sample.artery | sample.vein, sample.vessel)
    # Near-black outside the field of view, like DRIVE (black level plus sensor noise).
    outside = sample.image[~sample.fov]
    assert outside.max() < 30 and outside.mean() < 12
    assert sample.image[sample.fov].mean() > 3 * outside.mean() + 40


def test_default_size_is_drive():
    assert generate_fundus(0).image.shape == (584, 565, 3)


def test_too_small_or_too_large_sizes_are_rejected():
    with pytest.raises(ValueError, match="at least 32x32"):
        generate_fundus(0, (24, 24))
    with pytest.raises(ValueError, match="over 16.8 million pixels"):
        generate_fundus(0, (60000, 60000))  # before drawing: 54 GB at 4x


def test_the_smallest_size_gives_labels_the_readers_accept():
    for seed in range(8):  # vessels at least a pixel wide: under half the FOV at 32 px
        sample = generate_fundus(seed, (32, 32))
        assert sample.vessel[sample.fov].mean() < MAX_VESSEL_SHARE


def test_fov_is_a_disc_nearly_filling_the_frame(drive_sized):
    for sample in drive_sized:
        fov = sample.fov
        ys, xs = np.nonzero(fov)
        cy, cx = ys.mean(), xs.mean()
        radius = np.sqrt(fov.sum() / np.pi)
        yy, xx = np.mgrid[: fov.shape[0], : fov.shape[1]]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        iou = (disc & fov).sum() / (disc | fov).sum()
        assert iou > 0.99
        # DRIVE: FOV diameter ~535 px in a 565 px wide image.
        assert 0.88 < 2 * radius / min(fov.shape) < 0.98
        assert not fov[0].any() and not fov[:, 0].any()


def test_vessel_fraction_is_drive_like(drive_sized):
    # DRIVE's manual labels cover ~12-13 % of the FOV.
    fractions = [s.vessel.sum() / s.fov.sum() for s in drive_sized]
    assert all(0.06 < f < 0.20 for f in fractions), fractions
    assert 0.09 < np.mean(fractions) < 0.16, fractions


def test_veins_are_wider_than_arteries(drive_sized):
    for sample in drive_sized:
        assert _mean_width(sample.vein) > _mean_width(sample.artery)
        # Main veins at DRIVE resolution are about 7-8 px wide, twigs 1-2 px.
        distance = cv2.distanceTransform(sample.vein.astype(np.uint8), cv2.DIST_L2, 5)
        widths = 2 * distance[skeletonize(sample.vein)]
        assert 6.0 < np.percentile(widths, 99) < 10.0
        assert np.percentile(widths, 5) <= 2.0


def test_arteries_are_lighter_and_green_has_the_most_contrast(drive_sized):
    for sample in drive_sized:
        rgb = sample.image.astype(np.float64)
        artery_only = sample.artery & ~sample.vein
        vein_only = sample.vein & ~sample.artery
        assert rgb[artery_only, 1].mean() > rgb[vein_only, 1].mean() + 2
        # Relative vessel contrast per channel against the background around the vessels.
        near = cv2.dilate(sample.vessel.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        background = near & ~sample.vessel & sample.fov
        contrast = 1 - rgb[sample.vessel].mean(0) / rgb[background].mean(0)
        assert contrast[1] > contrast[0] and contrast[1] > contrast[2], contrast
        assert contrast[1] > 0.05


def test_optic_disc_is_brightest_and_fovea_dark(drive_sized):
    for sample in drive_sized:
        disc_x, disc_y, disc_r = sample.optic_disc
        fovea_x, fovea_y = sample.fovea
        gray = cv2.cvtColor(sample.image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        smooth = cv2.GaussianBlur(gray, (0, 0), disc_r / 2)
        smooth[~sample.fov] = 0
        y, x = np.unravel_index(np.argmax(smooth), smooth.shape)
        assert np.hypot(x - disc_x, y - disc_y) < disc_r
        # Fovea: ~2.5 disc diameters from the disc, darker than the ring 1-1.5 DD around it.
        distance = np.hypot(fovea_x - disc_x, fovea_y - disc_y) / (2 * disc_r)
        assert 2.2 < distance < 2.8
        yy, xx = np.mgrid[: gray.shape[0], : gray.shape[1]]
        to_fovea = np.hypot(xx - fovea_x, yy - fovea_y) / (2 * disc_r)
        green = sample.image[..., 1].astype(np.float64)
        centre = (to_fovea < 0.2) & ~sample.vessel
        ring = (to_fovea > 1.0) & (to_fovea < 1.5) & ~sample.vessel & sample.fov
        assert green[centre].mean() < green[ring].mean() - 5
        # The disc sits off-centre, to the left or right of the FOV centre.
        assert abs(disc_x - sample.image.shape[1] / 2) > 0.25 * sample.image.shape[1]


def _expected_files(num_images: int, num_test: int) -> set[str]:
    files = set()
    for index in range(1, num_images + 1):
        split = "test" if index <= num_test else "training"
        files |= {f"{split}/images/{index:02d}_{split}.tif",
                  f"{split}/1st_manual/{index:02d}_manual1.gif",
                  f"{split}/mask/{index:02d}_{split}_mask.gif",
                  f"{split}/av/{index:02d}_{split}.png"}
    return files | {synthetic.SYNTHETIC_MARKER}


def _files_under(root: Path) -> set[str]:
    # rglob lists hidden files too, so leftover temporary files would show up here.
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_write_dataset_layout_and_round_trip(tmp_path):
    size = (96, 96)
    root = write_synthetic_dataset(tmp_path / "syn", num_images=3, seed=5, size=size)
    assert root == tmp_path / "syn"
    # num_test defaults to half: test 01, training 02-03 (DRIVE numbering style).
    assert _files_under(root) == _expected_files(3, 1)
    for index, (split, number) in enumerate([("test", "01"), ("training", "02"),
                                             ("training", "03")]):
        expected = generate_fundus(synthetic._image_seed(5, index), size)
        image = cv2.imread(str(root / split / "images" / f"{number}_{split}.tif"))[..., ::-1]
        np.testing.assert_array_equal(image, expected.image)
        with Image.open(root / split / "1st_manual" / f"{number}_manual1.gif") as gif:
            label = np.asarray(gif.convert("L"))
        assert set(np.unique(label)) <= {0, 255}
        np.testing.assert_array_equal(label > 127, expected.vessel)
        with Image.open(root / split / "mask" / f"{number}_{split}_mask.gif") as gif:
            np.testing.assert_array_equal(np.asarray(gif.convert("L")) > 127, expected.fov)
        av = np.asarray(Image.open(root / split / "av" / f"{number}_{split}.png").convert("RGB"))
        red, green, blue = (av[..., c] == 255 for c in range(3))
        np.testing.assert_array_equal(red | green, expected.artery)  # green = crossing
        np.testing.assert_array_equal(blue | green, expected.vein)
        assert not (red & blue).any()
        # Only the four RITE colours occur.
        colours = {tuple(c) for c in np.unique(av.reshape(-1, 3), axis=0)}
        assert colours <= {(0, 0, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0)}


def test_write_dataset_is_reproducible_and_num_test_is_honoured(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", num_images=4, seed=1, size=(64, 64), num_test=3)
    b = write_synthetic_dataset(tmp_path / "b", num_images=4, seed=1, size=(64, 64), num_test=3)
    assert _files_under(a) == _files_under(b) == _expected_files(4, 3)
    for name in _files_under(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # Images within one set differ from each other.
    first = (a / "test/images/01_test.tif").read_bytes()
    assert first != (a / "test/images/02_test.tif").read_bytes()


def test_a_second_set_replaces_the_first_whole_and_other_folders_are_refused(tmp_path):
    root = write_synthetic_dataset(tmp_path / "syn", num_images=3, num_test=1, size=(48, 48))
    write_synthetic_dataset(root, num_images=2, num_test=1, size=(48, 48))
    assert _files_under(root) == _expected_files(2, 1)  # no image of the first set left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no temporary folder
    drive = tmp_path / "DRIVE"  # a real dataset, say: not written over
    (drive / "test" / "images").mkdir(parents=True)
    (drive / "test" / "images" / "01_test.tif").write_bytes(b"photograph")
    with pytest.raises(ConfigError, match="DRIVE is not empty and holds no synthetic set"):
        write_synthetic_dataset(drive, num_images=2, size=(48, 48))
    assert _files_under(drive) == {"test/images/01_test.tif"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _files_under(write_synthetic_dataset(empty, 1, size=(48, 48))) == _expected_files(1, 0)
    # A user's notes beside the set (or bin/preprocess.py's label files, written there by
    # default) would go with it: refused, and nothing removed.
    (root / "NOTES.txt").write_text("mine")
    (root / "test" / "fixed_labels").mkdir()
    (root / "training" / "images" / "21_training.tif").write_bytes(b"DRIVE's, named alike")
    with pytest.raises(ConfigError, match=r"did not write \(NOTES.txt, test/fixed_labels, "
                                          r"training/images/21_training.tif\)"):
        write_synthetic_dataset(root, num_images=2, num_test=1, size=(48, 48), seed=5)
    assert _files_under(root) == _expected_files(2, 1) | {"NOTES.txt",
                                                          "training/images/21_training.tif"}
    with pytest.raises(ConfigError, match="NOTES.txt is a file"):
        write_synthetic_dataset(root / "NOTES.txt", num_images=1, size=(48, 48))
    (root / "NOTES.txt").unlink()
    (root / "test" / "fixed_labels").rmdir()
    (root / "training" / "images" / "21_training.tif").unlink()
    marker = (root / "synthetic.json").read_text()
    for damaged in ('{"num_images": 1e400, "num_test": 1}', '{"num_images": 100000000000, '
                    '"num_test": 1}', '{"num_images": 2, "num_test": 5}', '{"num_images": 2'):
        (root / "synthetic.json").write_text(damaged)  # no hang on a count of 1e11
        with pytest.raises(ConfigError, match=r"synthetic.json is damaged .* nothing is "
                                              "replaced"):
            write_synthetic_dataset(root, num_images=2, num_test=1, size=(48, 48))
        assert _files_under(root) == _expected_files(2, 1)
    (root / "synthetic.json").write_text(marker)
    write_synthetic_dataset(root, num_images=3, num_test=1, size=(48, 48))
    assert _files_under(root) == _expected_files(3, 1)


@pytest.mark.parametrize("num_images, num_test", [(0, None), (2, 3), (2, -1)])
def test_write_dataset_rejects_bad_counts(tmp_path, num_images, num_test):
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path, num_images=num_images, num_test=num_test)


def test_cli_writes_a_tiny_dataset(tmp_path):
    out = tmp_path / "cli"
    result = commands.script("make_synthetic.py", f"--out_dir={out}", "--num_images=2",
                             "--height=96", "--width=96", "--seed=3", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _files_under(out) == _expected_files(2, 1)
    assert str(out) in result.stdout
    image = cv2.imread(str(out / "training" / "images" / "02_training.tif"))
    assert image.shape == (96, 96, 3)
