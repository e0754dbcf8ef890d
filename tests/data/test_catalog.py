"""Tests for retina_tf.data.catalog: official layouts, splits, and every format read end to end."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from retina_tf.data.av import encode_av_rgb
from retina_tf.data.catalog import DATASETS, STARE_TRAINING, Sample, list_samples
from retina_tf.data.io import DatasetError, read_sample, write_image_atomic

# dataset, folder under ../shared/data, image size (HxW), has A/V, has official FOV mask
REAL = [
    ("drive", "DRIVE", (584, 565), False, True),
    ("rite", "RITE", (584, 565), True, True),
    ("stare", "STARE", (605, 700), False, False),
    ("chase_db1", "samples/CHASE_DB1", (960, 999), False, False),
    ("hrf", "samples/HRF", (2336, 3504), False, True),
    ("les_av", "samples/LES-AV", (1444, 1620), True, True),
    ("hrf_av", "samples/HRF-AV", (2336, 3504), True, True),
]


def test_dataset_names():
    assert DATASETS == ("drive", "chase_db1", "stare", "hrf", "rite", "les_av", "hrf_av",
                        "synthetic")


@pytest.mark.parametrize("dataset,folder", [("drive", "DRIVE"), ("rite", "RITE"),
                                            ("stare", "STARE")])
def test_full_split_sizes(shared_data: Path, dataset: str, folder: str):
    training = list_samples(dataset, shared_data / folder, "training")
    test = list_samples(dataset, shared_data / folder, "test")
    every = list_samples(dataset, shared_data / folder, "all")
    expected = (10, 10, 20) if dataset == "stare" else (20, 20, 40)
    assert (len(training), len(test), len(every)) == expected
    names = [s.name for s in training]
    assert names == sorted(names)
    assert not {s.name for s in training} & {s.name for s in test}
    assert sorted(s.name for s in training + test) == [s.name for s in every]
    assert all(isinstance(s, Sample) and s.dataset == dataset for s in every)


def test_drive_names_and_paths(shared_data: Path):
    training = list_samples("drive", shared_data / "DRIVE")
    first = training[0]
    assert first.name == "21_training"
    assert first.label.name == "21_manual1.gif" and first.fov.name == "21_training_mask.gif"
    assert first.av is None and first.av_format is None
    assert list_samples("DRIVE", shared_data / "DRIVE", "test")[0].name == "01_test"


def test_stare_split_is_the_fixed_list(shared_data: Path):
    training = list_samples("stare", shared_data / "STARE", "training")
    assert tuple(s.name for s in training) == STARE_TRAINING
    assert all(s.fov is None and s.label.name == f"{s.name}.ah.ppm.gz" for s in training)


def test_partial_sample_folders(shared_data: Path):
    samples = shared_data / "samples"
    chase = list_samples("chase_db1", samples / "CHASE_DB1", "training")
    assert [s.name for s in chase] == ["Image_01L", "Image_01R"]
    assert chase[0].label.name == "Image_01L_1stHO.png" and chase[0].fov is None
    with pytest.raises(DatasetError, match="'test' split of CHASE_DB1 in .*CHASE_DB1 is empty"):
        list_samples("chase_db1", samples / "CHASE_DB1", "test")

    hrf = list_samples("hrf", samples / "HRF", "training")
    assert [s.name for s in hrf] == ["01_dr", "01_g", "01_h"]
    assert hrf[0].image.name == "01_dr.JPG" and hrf[0].fov.name == "01_dr_mask.tif"
    with pytest.raises(DatasetError, match="'test' split of HRF in .*HRF/images is empty"):
        list_samples("hrf", samples / "HRF", "test")

    # LES-AV names sort numerically: 12 before 111; the halves of two names are one each.
    les = list_samples("LES-AV", samples / "LES-AV", "all")
    assert [s.name for s in les] == ["12", "111"]
    assert [s.name for s in list_samples("les_av", samples / "LES-AV", "training")] == ["12"]
    assert [s.name for s in list_samples("les_av", samples / "LES-AV", "test")] == ["111"]
    assert les[0].av.parent.name == "arteries-and-veins" and les[0].av_format == "rgb"

    hrf_av = list_samples("hrf_av", samples / "HRF-AV", "all")
    assert [s.name for s in hrf_av] == ["01_h"]
    assert hrf_av[0].label is None and hrf_av[0].av_format == "index"
    with pytest.raises(DatasetError, match=r"HRF-AV/test/images is not a folder.*official HRF-AV"):
        list_samples("hrf_av", samples / "HRF-AV", "test")


@pytest.mark.parametrize("dataset,folder,size,has_av,has_fov", REAL)
def test_read_every_format(shared_data: Path, dataset: str, folder: str, size: tuple,
                           has_av: bool, has_fov: bool):
    samples = list_samples(dataset, shared_data / folder, "all")
    for sample in samples:
        data = read_sample(sample)
        assert data.name == sample.name
        assert data.image.dtype == np.uint8 and data.image.shape == size + (3,)
        assert data.vessel.dtype == bool and data.vessel.shape == size
        assert data.fov.dtype == bool and data.fov.shape == size
        assert data.fov_estimated == (not has_fov)
        vessel_fraction = data.vessel.mean()
        assert 0.03 < vessel_fraction < 0.2, (sample.name, vessel_fraction)
        assert 0.5 < data.fov.mean() < 0.95
        inside = (data.vessel & data.fov).sum() / data.vessel.sum()
        assert inside > 0.98, (sample.name, inside)
        if has_av:
            av = data.av
            assert av.dtype == bool and av.shape == size + (3,)
            artery, vein, vessel = av[..., 0], av[..., 1], av[..., 2]
            assert artery.sum() > 0.2 * vessel.sum() and vein.sum() > 0.2 * vessel.sum()
            assert not (artery & ~vessel).any() and not (vein & ~vessel).any()
            # The A/V vessel channel agrees with the vessel label.
            assert (vessel != data.vessel).sum() <= 0.001 * vessel.sum() + 10, sample.name
        else:
            assert data.av is None


def test_unknown_dataset_and_split(shared_data: Path):
    with pytest.raises(DatasetError, match="unknown dataset 'drvie'.*drive, chase_db1, stare"):
        list_samples("drvie", shared_data / "DRIVE")
    with pytest.raises(DatasetError, match="unknown split 'train'.*training, test, all"):
        list_samples("drive", shared_data / "DRIVE", "train")


def test_missing_folders(shared_data: Path, tmp_path: Path):
    with pytest.raises(DatasetError, match=r"nowhere does not exist.*DRIVE"):
        list_samples("drive", tmp_path / "nowhere")
    # The folder above the dataset: the message points at the dataset folder.
    with pytest.raises(DatasetError, match=r"training/images is not a folder.*did you mean "
                                           r"data_dir=.*DRIVE"):
        list_samples("drive", shared_data)
    with pytest.raises(DatasetError, match=r"stare-images is not a folder.*official STARE layout"):
        list_samples("stare", tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"vessel-segmentations is not a folder.*LES-AV"):
        list_samples("les_av", tmp_path)


def _write_drive_like(root: Path, with_av: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Writes a two-image DRIVE-layout dataset (one training, one test) and returns its arrays."""
    rng = np.random.default_rng(3)
    written = {}
    for split, number in (("test", "01"), ("training", "02")):
        stem = f"{number}_{split}"
        image = rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)
        fov = np.zeros((30, 26), bool)
        fov[3:27, 3:23] = True
        artery = np.zeros((30, 26), bool)
        artery[10, 4:22] = True
        vein = np.zeros((30, 26), bool)
        vein[5:25, 12] = True
        vessel = artery | vein
        folder = root / split
        write_image_atomic(folder / "images" / f"{stem}.tif", image)
        write_image_atomic(folder / "1st_manual" / f"{number}_manual1.gif", vessel)
        write_image_atomic(folder / "mask" / f"{stem}_mask.gif", fov)
        if with_av:
            write_image_atomic(folder / "av" / f"{stem}.png", encode_av_rgb(artery, vein))
        written[stem] = dict(image=image, vessel=vessel, fov=fov, artery=artery, vein=vein)
    return written


def test_synthetic_layout(tmp_path: Path):
    written = _write_drive_like(tmp_path)
    samples = list_samples("synthetic", tmp_path, "all")
    assert [s.name for s in samples] == ["01_test", "02_training"]
    assert [s.name for s in list_samples("synthetic", tmp_path, "test")] == ["01_test"]
    for sample in samples:
        assert sample.av_format == "rgb" and sample.av.name == f"{sample.name}.png"
        data = read_sample(sample)
        expected = written[sample.name]
        np.testing.assert_array_equal(data.image, expected["image"])
        np.testing.assert_array_equal(data.vessel, expected["vessel"])
        np.testing.assert_array_equal(data.fov, expected["fov"])
        np.testing.assert_array_equal(data.av[..., 0], expected["artery"])
        np.testing.assert_array_equal(data.av[..., 1], expected["vein"])
        np.testing.assert_array_equal(data.av[..., 2], expected["vessel"])
        assert data.av[10, 12, 0] and data.av[10, 12, 1]  # the crossing is both
    # The same files without av/ are a valid DRIVE copy but not a synthetic set.
    shutil.rmtree(tmp_path / "training" / "av")
    assert len(list_samples("drive", tmp_path, "training")) == 1
    with pytest.raises(DatasetError, match=r"training/av is not a folder"):
        list_samples("synthetic", tmp_path, "training")


def test_image_without_label_or_mask(tmp_path: Path):
    _write_drive_like(tmp_path, with_av=False)
    (tmp_path / "training" / "1st_manual" / "02_manual1.gif").unlink()
    with pytest.raises(DatasetError, match=r"02_training\.tif has no vessel label: expected "
                                           r".*1st_manual/02_manual1"):
        list_samples("drive", tmp_path, "training")
    (tmp_path / "test" / "mask" / "01_test_mask.gif").unlink()
    with pytest.raises(DatasetError, match=r"01_test\.tif has no FOV mask"):
        list_samples("drive", tmp_path, "test")


def test_empty_split_folder(tmp_path: Path):
    for sub in ("images", "1st_manual", "mask"):
        (tmp_path / "test" / sub).mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"'test' split of DRIVE in .*/test is empty"):
        list_samples("drive", tmp_path, "test")


def test_bad_files_in_a_layout(tmp_path: Path):
    _write_drive_like(tmp_path, with_av=False)
    label = tmp_path / "training" / "1st_manual" / "02_manual1.gif"
    write_image_atomic(label, np.zeros((31, 26), bool))
    sample = list_samples("drive", tmp_path, "training")[0]
    with pytest.raises(DatasetError, match=r"02_manual1\.gif is 26x31 .*02_training\.tif is 26x30"):
        read_sample(sample)
    write_image_atomic(label, np.tile(np.arange(0, 240, 8, dtype=np.uint8)[:, None], (1, 26)))
    with pytest.raises(DatasetError, match=r"02_manual1\.gif: vessel label is not binary: "
                                           r"found 30"):
        read_sample(sample)
    image = tmp_path / "training" / "images" / "02_training.tif"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"02_training\.tif"):
        read_sample(sample)


def test_two_files_of_one_name_are_refused_and_hidden_files_skipped(tmp_path: Path):
    _write_drive_like(tmp_path, with_av=False)
    images = tmp_path / "test" / "images"
    (images / "._01_test.tif").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata, not a TIFF
    assert [s.image.name for s in list_samples("drive", tmp_path, "test")] == ["01_test.tif"]
    shutil.copy(images / "01_test.tif", images / "01_test.png")  # a converted copy beside it
    with pytest.raises(DatasetError, match=r"images/01_test\.png and 01_test\.tif are both "
                                           r"01_test: keep one"):
        list_samples("drive", tmp_path, "test")


def test_two_photographs_keyed_to_one_label_are_refused(tmp_path: Path):
    """DRIVE pairs by the number before the first '_': 01_left.tif would take 01's label."""
    _write_drive_like(tmp_path, with_av=False)
    test = tmp_path / "test"
    shutil.copy(test / "images" / "01_test.tif", test / "images" / "01_left.tif")
    shutil.copy(test / "mask" / "01_test_mask.gif", test / "mask" / "01_left_mask.gif")
    with pytest.raises(DatasetError, match=r"1st_manual/01_manual1\.gif would label both "
                                           r".*01_left\.tif and .*01_test\.tif: .* move the "
                                           r"photograph that is not NN_test out of"):
        list_samples("drive", tmp_path, "test")


def test_chase_db1_names_in_any_case_and_one_folder_deeper(shared_data: Path, tmp_path: Path):
    source = shared_data / "samples" / "CHASE_DB1"
    lower = tmp_path / "lower"
    lower.mkdir()
    for path in source.iterdir():
        (lower / path.name.lower()).symlink_to(path)
    expected = [s.name.lower() for s in list_samples("chase_db1", source, "all")]
    assert [s.name for s in list_samples("chase_db1", lower, "all")] == expected
    nested = tmp_path / "nested"
    (nested / "CHASE_DB1").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"is empty; did you mean "
                                           r"data_dir=.*nested/CHASE_DB1\?"):
        list_samples("chase_db1", nested, "all")


def test_stare_copies_in_capitals_with_a_label_missing_or_misplaced(shared_data: Path,
                                                                   tmp_path: Path, caplog):
    """IM0001.PPM put every labelled image in the test split; a missing training label left
    nine without a word; a .vk label in labels-ah/ was 'a label with no image'."""
    import gzip
    stare = shared_data / "STARE"
    for sub in ("stare-images", "labels-ah"):
        (tmp_path / sub).mkdir()
    for name in (*STARE_TRAINING, "im0162", "im0163"):
        for sub, suffix in (("stare-images", ".ppm.gz"), ("labels-ah", ".ah.ppm.gz")):
            if sub == "labels-ah" and name == "im0002":
                continue
            data = gzip.decompress((stare / sub / f"{name}{suffix}").read_bytes())
            (tmp_path / sub / f"{name.upper()}{suffix[:-3].upper()}").write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        training = list_samples("stare", tmp_path, "training")
    assert [s.name for s in training] == [n.upper() for n in STARE_TRAINING if n != "im0002"]
    assert [s.name for s in list_samples("stare", tmp_path, "test")] == ["IM0162", "IM0163"]
    assert f"warning: {tmp_path / 'labels-ah'} has no label of im0002, of STARE's training " \
        "split (9 of its 10 images)" in caplog.text
    np.testing.assert_array_equal(read_sample(training[0]).image,
                                  read_sample(list_samples("stare", stare, "training")[0]).image)
    shutil.copy(stare / "labels-vk" / "im0001.vk.ppm.gz", tmp_path / "labels-ah")
    with pytest.raises(DatasetError, match=r"im0001.vk.ppm.gz is the second observer's label "
                                           r"\(.vk\): it belongs in .*labels-vk, not in "
                                           r"labels-ah/"):
        list_samples("stare", tmp_path, "training")


def test_photographs_of_every_readable_format_are_listed(tmp_path: Path):
    """A .jfif or .webp photograph was left out of its split without a word."""
    _write_drive_like(tmp_path, with_av=False)
    photo = tmp_path / "training" / "images" / "02_training.tif"
    image = read_sample(list_samples("drive", tmp_path, "training")[0]).image
    write_image_atomic(tmp_path / "x.jpg", image)
    (tmp_path / "x.jpg").rename(photo.with_suffix(".jfif"))  # a JPEG by its other name
    photo.unlink()
    assert [s.image.name for s in list_samples("drive", tmp_path, "training")] == [
        "02_training.jfif"]
