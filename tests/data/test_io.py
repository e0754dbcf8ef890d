"""Tests for retina_tf.data.io: every file format of the public datasets, and bad files."""

import gzip
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.uid import JPEGLSLossless

import retina_tf.data.io
from retina_tf.data.catalog import Sample
from retina_tf.data.io import (
    DatasetError,
    SampleData,
    atomic_folder,
    channel_order_warning,
    picture_count,
    read_av,
    read_image,
    read_mask,
    read_sample,
    write_image_atomic,
)
from tests import commands
from tests.data.dicom import write_dicom


def _parse_ppm(data: bytes) -> np.ndarray:
    """A plain P6 reader, independent of OpenCV, for a known answer."""
    fields, pos = [], 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos)
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    assert fields[0] == b"P6" and fields[3] == b"255"
    width, height = int(fields[1]), int(fields[2])
    return np.frombuffer(data[pos + 1:pos + 1 + width * height * 3], np.uint8).reshape(
        height, width, 3)


# ----------------------------------------------------------------------------- read_image

@pytest.mark.parametrize("relative,shape", [
    ("DRIVE/training/images/21_training.tif", (584, 565, 3)),
    ("samples/CHASE_DB1/Image_01L.jpg", (960, 999, 3)),
    ("samples/HRF/images/01_dr.JPG", (2336, 3504, 3)),
    ("samples/LES-AV/images/12.png", (1444, 1620, 3)),
    ("DRIVE/training/mask/21_training_mask.gif", (584, 565, 3)),
    ("STARE/stare-images/im0001.ppm.gz", (605, 700, 3)),
])
def test_read_image_formats(shared_data: Path, relative: str, shape: tuple):
    image = read_image(shared_data / relative)
    assert image.dtype == np.uint8 and image.shape == shape
    # Fundus images are red-dominant; the mask GIF is gray.
    if "mask" in relative:
        assert (image[..., 0] == image[..., 2]).all()
    else:
        assert image[..., 0].mean() > image[..., 2].mean()


def test_read_image_matches_independent_decoders(shared_data: Path):
    tif = shared_data / "DRIVE" / "training" / "images" / "21_training.tif"
    np.testing.assert_array_equal(read_image(tif), np.asarray(Image.open(tif).convert("RGB")))
    ppm = shared_data / "STARE" / "stare-images" / "im0001.ppm.gz"
    np.testing.assert_array_equal(read_image(ppm), _parse_ppm(gzip.decompress(ppm.read_bytes())))


def test_read_image_gray_and_16_bit(tmp_path: Path):
    gray16 = np.array([[0, 257 * 100], [65535, 257 * 7]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    image = read_image(tmp_path / "g16.png")
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    np.testing.assert_array_equal(image[..., 1], [[0, 100], [255, 7]])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_read_image_keeps_rgb_order_and_composites_alpha_onto_black(tmp_path: Path):
    """Opaque pixels keep their colour; transparent ones are black whatever colour lies under
    them (a cut-out photograph keeps white there, which the FOV estimate took for retina)."""
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        bgra = np.zeros((3, 4, 4), dtype)
        bgra[..., 2] = 200 * (top // 255)  # red in OpenCV's BGR order
        bgra[..., 3] = top
        bgra[0, :, :3], bgra[0, :, 3] = top, 0  # white under transparent pixels
        bgra[1, :2, 3] = top // 2 + 1
        cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
        image = read_image(tmp_path / "rgba.png")
        assert image.shape == (3, 4, 3) and image.dtype == np.uint8
        assert (image[0] == 0).all() and (image[..., 1:] == 0).all()
        assert (image[2, :, 0] == 200).all() and (image[1, 2:, 0] == 200).all()
        assert (image[1, :2, 0] == 100).all()


# TIFF as well as PNG: OpenCV turns a TIFF upright itself, a PNG not (nor a JPEG, below).
@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_images_and_masks_upright(tmp_path: Path, orientation: int,
                                                         suffix: str):
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (5, 8, 3), dtype=np.uint8)  # as the camera wrote it
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / f"photo{suffix}", exif=exif)
    with Image.open(tmp_path / f"photo{suffix}") as im:  # Pillow's own reading of the tag
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert upright.shape[:2] == ((8, 5) if orientation >= 5 else (5, 8))
    np.testing.assert_array_equal(read_image(tmp_path / f"photo{suffix}"), upright)
    Image.fromarray((stored[..., 0] > 127).astype(np.uint8) * 255).save(
        tmp_path / f"label{suffix}", exif=exif)
    np.testing.assert_array_equal(read_mask(tmp_path / f"label{suffix}"), upright[..., 0] > 127)


def test_a_big_endian_16_bit_tiff_is_turned_upright_once(tmp_path: Path):
    tifffile = pytest.importorskip("tifffile")  # scikit-image's dependency
    stored = np.arange(5 * 8 * 3, dtype=np.uint16).reshape(5, 8, 3) * 500
    tifffile.imwrite(tmp_path / "photo.tif", stored, byteorder=">",
                     extratags=[(0x0112, "H", 1, 3, True)])  # 3: turn 180 degrees to view
    expected = np.rint(stored[::-1, ::-1] * (255 / 65535)).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "photo.tif"), expected)


def test_a_sideways_jpeg_lines_up_with_its_upright_label(shared_data: Path, tmp_path: Path):
    image = read_image(shared_data / "DRIVE/test/images/01_test.tif")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(np.rot90(image)).save(tmp_path / "01.jpg", exif=exif, quality=95)
    label = tmp_path / "01_label.png"
    cv2.imwrite(str(label), read_mask(shared_data / "DRIVE/test/1st_manual/01_manual1.gif")
                .astype(np.uint8) * 255)
    sample = read_sample(Sample("drive", "01", tmp_path / "01.jpg", label))
    assert sample.image.shape == (584, 565, 3)
    assert np.abs(sample.image.astype(int) - image).mean() < 2  # JPEG's loss only


# ----------------------------------------------------------------------------- read_mask

@pytest.mark.parametrize("relative,count", [
    ("DRIVE/training/1st_manual/21_manual1.gif", 24658),
    ("DRIVE/training/mask/21_training_mask.gif", 225600),
    ("samples/CHASE_DB1/Image_01L_1stHO.png", 66885),      # 1-bit PNG
    ("samples/HRF/mask/01_dr_mask.tif", 6912991),          # RGB mask
    ("samples/HRF/manual1/01_dr.tif", 416282),
    ("STARE/labels-ah/im0001.ah.ppm.gz", 33799),
    ("samples/LES-AV/masks/12_mask.gif", 1637039),         # palette GIF
])
def test_read_mask_formats(shared_data: Path, relative: str, count: int):
    mask = read_mask(shared_data / relative)
    assert mask.dtype == bool and mask.ndim == 2
    assert mask.sum() == count


def test_read_mask_palette_gif_with_odd_levels(shared_data: Path):
    """DRIVE 2nd_manual GIFs use palette levels 4/252 instead of 0/255."""
    path = shared_data / "DRIVE" / "test" / "2nd_manual" / "01_manual2.gif"
    levels = np.asarray(Image.open(path).convert("RGB"))[..., 0]
    assert set(np.unique(levels).tolist()) == {4, 252}
    np.testing.assert_array_equal(read_mask(path), levels == 252)


def test_read_mask_zero_one_and_constant(tmp_path: Path):
    cv2.imwrite(str(tmp_path / "01.png"), np.array([[0, 1], [1, 0]], np.uint8))
    np.testing.assert_array_equal(read_mask(tmp_path / "01.png"), [[False, True], [True, False]])
    cv2.imwrite(str(tmp_path / "full.png"), np.full((2, 2), 255, np.uint8))
    assert read_mask(tmp_path / "full.png").all()
    cv2.imwrite(str(tmp_path / "empty.png"), np.zeros((2, 2), np.uint8))
    assert not read_mask(tmp_path / "empty.png").any()


def test_read_mask_rejects_gray_gradient(tmp_path: Path):
    gradient = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))  # 16 gray levels
    path = tmp_path / "gradient.png"
    cv2.imwrite(str(path), gradient)
    with pytest.raises(DatasetError, match=r"gradient\.png.*not binary: found 16 distinct values"):
        read_mask(path, "vessel label")
    # An FOV mask with compression noise is thresholded instead.
    np.testing.assert_array_equal(read_mask(path, "fov"), gradient > 127)


# ----------------------------------------------------------------------------- read_av

def test_read_av_formats(shared_data: Path, tmp_path: Path):
    rgb = read_av(shared_data / "RITE" / "training" / "av" / "21_training.png", "rgb")
    assert rgb.shape == (584, 565, 3) and rgb.dtype == bool
    # Counted in the file: 10041 red + 1062 green artery pixels, 12628 blue + 1062 green veins.
    assert rgb[..., 0].sum() == 10041 + 1062 and rgb[..., 1].sum() == 12628 + 1062
    index = read_av(shared_data / "samples" / "HRF-AV" / "training" / "1st_manual" /
                    "01_h_AVmanual.png", "index")
    assert index[..., 0].sum() == 398478 and index[..., 1].sum() == 415603
    cv2.imwrite(str(tmp_path / "bad_index.png"), np.array([[0, 5]], np.uint8))
    with pytest.raises(DatasetError, match="bad_index.png"):
        read_av(tmp_path / "bad_index.png", "index")
    with pytest.raises(DatasetError, match="unknown A/V format"):
        read_av(tmp_path / "bad_index.png", "palette")


def test_av_labels_that_would_decode_wrong_are_refused(shared_data: Path, tmp_path: Path):
    """A gray index map in an RGB layout decoded as no artery and no vein, and a JPEG label
    lost about a tenth of RITE's veins to background; both were scored without a word."""
    label = shared_data / "RITE" / "training" / "av" / "21_training.png"
    index = np.zeros((8, 8), np.uint8)
    index[2, :], index[5, :] = 1, 2
    for name, array in (("index.png", index), ("index3.png", np.dstack([index * 85] * 3))):
        cv2.imwrite(str(tmp_path / name), array)
        with pytest.raises(DatasetError, match=f"{name}: a gray A/V label.*HRF-AV layout"):
            read_av(tmp_path / name, "rgb")
    cv2.imwrite(str(tmp_path / "none.png"), np.zeros((8, 8, 3), np.uint8))  # nothing drawn
    assert not read_av(tmp_path / "none.png", "rgb").any()
    jpeg = tmp_path / "21_training.jpg"
    jpeg.write_bytes(cv2.imencode(".jpg", cv2.imread(str(label)), [cv2.IMWRITE_JPEG_QUALITY,
                                                                    95])[1].tobytes())
    with pytest.raises(DatasetError, match="21_training.jpg: an A/V label saved as JPEG"):
        read_av(jpeg, "rgb")


# ----------------------------------------------------------------------------- bad files

def test_missing_file(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"nothing\.tif does not exist"):
        read_image(tmp_path / "nothing.tif")
    with pytest.raises(DatasetError, match="is a folder"):
        read_mask(tmp_path)


@pytest.mark.parametrize("relative", [
    "DRIVE/training/images/21_training.tif",
    "samples/CHASE_DB1/Image_01L.jpg",
    "samples/LES-AV/images/12.png",
    "samples/CHASE_DB1/Image_01L_1stHO.png",
    "DRIVE/training/mask/21_training_mask.gif",
    "STARE/stare-images/im0001.ppm.gz",
])
def test_truncated_copies_are_rejected(shared_data: Path, tmp_path: Path, relative: str):
    source = shared_data / relative
    data = source.read_bytes()
    truncated = tmp_path / source.name
    truncated.write_bytes(data[: int(len(data) * 0.9)])
    reader = read_mask if "manual" in relative or "mask" in relative or "HO" in relative \
        else read_image
    with pytest.raises(DatasetError, match=str(truncated).replace(".", r"\.")):
        reader(truncated)


def test_not_an_image(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(DatasetError, match=r"notes\.png"):
        read_image(path)
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty\.tif is empty"):
        read_image(tmp_path / "empty.tif")


# ----------------------------------------------------------------------------- writing

@pytest.mark.parametrize("name", ["m.png", "m.tif", "m.gif", "m.ppm.gz"])
def test_write_mask_round_trip(tmp_path: Path, name: str):
    rng = np.random.default_rng(1)
    mask = rng.random((23, 31)) < 0.3
    write_image_atomic(tmp_path / "sub" / name, mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "sub" / name), mask)
    assert sorted(os.listdir(tmp_path / "sub")) == [name]  # no temporary file left


@pytest.mark.parametrize("name", ["rgb.png", "rgb.tif"])
def test_write_rgb_round_trip_and_overwrite(tmp_path: Path, name: str):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (17, 13, 3), dtype=np.uint8)
    write_image_atomic(tmp_path / name, np.zeros_like(image))
    write_image_atomic(tmp_path / name, image)
    np.testing.assert_array_equal(read_image(tmp_path / name), image)
    assert os.listdir(tmp_path) == [name]


def test_write_rejects_bad_arrays(tmp_path: Path):
    with pytest.raises(DatasetError, match="uint8"):
        write_image_atomic(tmp_path / "x.png", np.zeros((4, 4), np.float32))
    with pytest.raises(DatasetError):
        write_image_atomic(tmp_path / "x.png", np.zeros((4, 4, 2), np.uint8))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- read_sample

def _tiny_sample(tmp_path: Path, label_shape=(20, 24), fov: bool = True) -> Sample:
    image = np.zeros((20, 24, 3), np.uint8)
    cv2.circle(image, (12, 10), 8, (180, 90, 40), -1)
    label = np.zeros(label_shape, bool)
    label[10, 4:20] = True
    write_image_atomic(tmp_path / "img.tif", image)
    write_image_atomic(tmp_path / "label.gif", label)
    if fov:
        write_image_atomic(tmp_path / "fov.gif", image[..., 0] > 0)
    return Sample("drive", "img", tmp_path / "img.tif", tmp_path / "label.gif",
                  tmp_path / "fov.gif" if fov else None)


def test_read_sample_small(tmp_path: Path):
    data = read_sample(_tiny_sample(tmp_path))
    assert isinstance(data, SampleData) and data.name == "img"
    assert data.image.shape == (20, 24, 3) and data.vessel.sum() == 16
    assert data.av is None and not data.fov_estimated
    assert data.fov.sum() == (data.image[..., 0] > 0).sum()


def test_read_sample_estimates_or_overrides_fov(tmp_path: Path):
    sample = _tiny_sample(tmp_path, fov=False)
    estimated = read_sample(sample)
    assert estimated.fov_estimated and estimated.fov[10, 12] and not estimated.fov[0, 0]
    override = tmp_path / "override.png"
    write_image_atomic(override, np.ones((20, 24), bool))
    given = read_sample(sample, fov_path=override)
    assert not given.fov_estimated and given.fov.all()


def test_an_inverted_label_is_refused_naming_it(tmp_path: Path):
    sample = _tiny_sample(tmp_path)
    label = read_mask(sample.label)
    write_image_atomic(tmp_path / "label.gif", ~label)  # black vessels on white
    with pytest.raises(DatasetError, match=r"label\.gif: marks 9\d% of the field of view as "
                                           r"vessel: .* invert the label"):
        read_sample(sample)
    # one white level: inverting would leave no vessel either (it was told to)
    write_image_atomic(tmp_path / "label.gif", np.ones_like(label))
    with pytest.raises(DatasetError, match=r"label\.gif: vessel everywhere \(one level, white\): "
                                           r"a label draws vessels white on black; check"):
        read_sample(sample)


def test_read_sample_size_mismatch_names_both_files(tmp_path: Path):
    sample = _tiny_sample(tmp_path, label_shape=(20, 25))
    with pytest.raises(DatasetError, match=r"label\.gif is 25x20 .*img\.tif is 24x20 "
                                           r"\(width x height\)"):
        read_sample(sample)
    sample = _tiny_sample(tmp_path)
    write_image_atomic(tmp_path / "small_fov.png", np.ones((10, 24), bool))
    with pytest.raises(DatasetError, match=r"small_fov\.png is 24x10 .*img\.tif is 24x20"):
        read_sample(sample, fov_path=tmp_path / "small_fov.png")


def test_read_sample_vessel_from_index_av(shared_data: Path):
    """HRF-AV has no vessel file: the vessel label is everything its A/V map marks."""
    root = shared_data / "samples" / "HRF-AV" / "training"
    sample = Sample("hrf_av", "01_h", root / "images" / "01_h.jpg", None,
                    root / "mask" / "01_h_mask.tif", root / "1st_manual" / "01_h_AVmanual.png",
                    "index")
    data = read_sample(sample)
    np.testing.assert_array_equal(data.vessel, data.av[..., 2])
    assert data.vessel.sum() == 833890


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from retina_tf.data.io import atomic_write_bytes
    umask = os.umask(0)
    os.umask(umask)
    atomic_write_bytes(tmp_path / "a.txt", b"x")
    write_image_atomic(tmp_path / "b.png", np.zeros((4, 4), np.uint8))
    for name in ("a.txt", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.png"]


def test_an_interrupt_as_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    from retina_tf.data.io import atomic_write_bytes
    real_open = os.open

    def open_then_interrupted(*args, **kwargs):  # Ctrl-C landing as the file comes to exist
        os.close(real_open(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "open", open_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "a.png", b"x")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def _folder(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("moment", ["made", "block", "set aside"])
def test_a_folder_interrupted_at_any_moment_is_the_old_one_and_nothing_else(tmp_path,
                                                                             monkeypatch, moment):
    # Ctrl-C in the instant after the temporary folder is made, while it is filled, or between
    # setting the old folder aside and renaming the new one into place
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("old")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask and _folder(out) == {"a.txt": b"old"}
    step = {"made": "mkdir", "block": None, "set aside": "rename"}[moment]
    if step == "rename":  # two renames where the folders cannot be swapped in one step
        monkeypatch.setattr(retina_tf.data.io, "_exchange", lambda a, b: False)
    if step:
        original = getattr(Path, step)

        def interrupted(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if self.parent == tmp_path and (self.name.endswith(".tmp") if step == "mkdir"
                                            else self == out):
                raise KeyboardInterrupt
            return result

        monkeypatch.setattr(Path, step, interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out) as tmp:
            (tmp / "b.txt").write_text("new")
            if moment == "block":
                raise KeyboardInterrupt
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and _folder(out) == {
        "a.txt": b"old"}
    with atomic_folder(out) as tmp:  # and uninterrupted, the new one replaces it whole
        (tmp / "b.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and _folder(out) == {
        "b.txt": b"new"}


def test_a_folder_swapped_in_one_step_leaves_no_moment_without_it(tmp_path, monkeypatch):
    """Between two renames, a kill left the old folder under a hidden name and none at its
    own: a swap (renameat2) puts the new one in place in one step."""
    from retina_tf.data.io import _exchange
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("old")
    (tmp_path / "b").mkdir()
    if not _exchange(tmp_path / "b", out):
        pytest.skip("this file system cannot swap two folders in one step")
    _exchange(tmp_path / "b", out)  # back
    monkeypatch.setattr(Path, "rename", None)  # never called: one step, no rename
    with atomic_folder(out) as tmp:
        (tmp / "b.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "export"]
    assert _folder(out) == {"b.txt": b"new"}


def test_what_a_killed_folder_write_left_is_cleared_by_the_next_one(tmp_path):
    # a process killed between setting the old folder aside and renaming its new one in: the
    # next write of that folder deletes its temporary folder and puts the old one back first;
    # a live process's temporary folder is left alone, and so is every other folder's
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("old")
    killer = tmp_path / "killed.py"
    killer.write_text(
        "import os, signal\nfrom pathlib import Path\nimport retina_tf.data.io as io\n"
        "from retina_tf.data.io import atomic_folder\n"
        "io._exchange = lambda a, b: False  # two renames, as where a swap cannot be made\n"
        "def rename(self, to):  # SIGKILL right after the old folder is set aside\n"
        "    os.rename(self, to)\n"
        "    if self.name == 'export':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "Path.rename = rename\n"
        f"with atomic_folder({str(out)!r}) as tmp:\n"
        "    (tmp / 'b.txt').write_text('new')\n")
    assert commands.run([sys.executable, killer]).returncode == -signal.SIGKILL
    killer.unlink()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".old", ".tmp"]  # no export
    live = tmp_path / f".export.{os.getpid()}-ab.tmp"
    live.mkdir()
    with atomic_folder(tmp_path / "other"):
        pass
    assert len(list(tmp_path.iterdir())) == 4
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out):
            assert _folder(out) == {"a.txt": b"old"}
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "export", "other"]
    assert _folder(out) == {"a.txt": b"old"}


@pytest.mark.parametrize("name, levels", [("fov.png", 0), ("fov.jpg", 1)])
def test_an_empty_fov_mask_is_refused_naming_it(tmp_path: Path, name: str, levels: int):
    sample = _tiny_sample(tmp_path)
    mask = tmp_path / name  # all 0, or a 0/1 mask saved as JPEG (nothing above 127)
    cv2.imwrite(str(mask), read_mask(sample.fov).astype(np.uint8) * levels)
    with pytest.raises(DatasetError, match=rf"{name}: the FOV mask is empty: save it with 255"):
        read_sample(sample, fov_path=mask)


def test_a_broken_tiff_gets_one_line_and_no_decoder_errors(tmp_path: Path, capfd):
    image = np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)
    data = cv2.imencode(".tif", image)[1].tobytes()
    (tmp_path / "cut.tif").write_bytes(data[: int(len(data) * 0.6)])  # the directory lost
    with pytest.raises(DatasetError, match="cut.tif cannot be decoded .*: copy or export"):
        read_image(tmp_path / "cut.tif")
    assert "TIFF" not in capfd.readouterr().err  # OpenCV's own lines, on the process's stderr
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


def test_vessels_drawn_black_on_a_transparent_layer_read_as_drawn(tmp_path: Path):
    """A viewer shows black strokes on a transparent layer as the drawing; over black they
    would vanish, and the label read as empty."""
    sample = _tiny_sample(tmp_path)
    label = read_mask(sample.label)
    alpha = label.astype(np.uint8) * 255
    cv2.imwrite(str(tmp_path / "bgra.png"), np.dstack([np.zeros((20, 24, 3), np.uint8), alpha]))
    Image.fromarray(np.dstack([np.zeros((20, 24), np.uint8), alpha]), "LA").save(
        tmp_path / "la.png")
    white_under = np.dstack([np.full((20, 24, 3), 255, np.uint8), alpha])  # Paint.NET's way
    white_under[label, :3] = 0
    cv2.imwrite(str(tmp_path / "white_under.png"), white_under)
    white_under[~label, 3] = 1  # a layer of alpha 1/255: invisible too (it was read inverted)
    cv2.imwrite(str(tmp_path / "almost.png"), white_under)
    white_under[~label, 3], white_under[label, 3] = 60, 100  # a faint tracing layer
    cv2.imwrite(str(tmp_path / "faint.png"), white_under)
    for name in ("bgra.png", "la.png", "white_under.png", "almost.png", "faint.png"):
        np.testing.assert_array_equal(read_mask(tmp_path / name), label)
    # a photograph at half opacity is no drawing: composited as ever (it came back grey)
    photo = np.dstack([np.full((20, 24, 3), 200, np.uint8), np.full((20, 24), 127, np.uint8)])
    cv2.imwrite(str(tmp_path / "half.png"), photo)
    assert (read_image(tmp_path / "half.png") == 100).all()


def test_a_label_with_no_vessel_is_warned_of(tmp_path: Path, caplog):
    sample = _tiny_sample(tmp_path)
    read_sample(sample)
    assert not caplog.records
    write_image_atomic(tmp_path / "label.gif", np.zeros((20, 24), bool))
    assert not read_sample(sample).vessel.any()
    assert "label.gif: no vessel pixel inside the field of view" in caplog.text


def test_a_file_of_several_pictures_is_refused_not_read_in_part(tmp_path: Path):
    """A TIFF of two pages (a stereo pair) or an animation read as its first picture alone,
    in silence; a page smaller than the first (a thumbnail) is no second picture. A TIFF's
    pages are read one at a time by their number (predict segments each); an animation is
    refused even so."""
    rng = np.random.default_rng(0)
    first, second = (Image.fromarray(rng.integers(0, 255, (60, 80, 3), np.uint8))
                     for _ in range(2))
    for name in ("pair.tif", "pair.gif", "pair.png", "pair.webp"):
        first.save(tmp_path / name, save_all=True, append_images=[second])
        kind = "pages" if name.endswith(".tif") else "frames"
        with pytest.raises(DatasetError, match=rf"pair\.{name[5:]} holds 2 pictures \({kind}\) "
                           rf"in one file: (.* )?save each {kind[:-1]} as a file of its own"):
            read_image(tmp_path / name)
        assert picture_count(tmp_path / name) == ((2, "pages") if kind == "pages" else (1, ""))
    with pytest.raises(DatasetError, match="pair.gif holds 2 pictures"):
        read_image(tmp_path / "pair.gif", 0)
    # a thumbnail between the pages: no picture of its own
    first.save(tmp_path / "pair.tif", save_all=True,
               append_images=[second.resize((20, 15)), second])
    assert picture_count(tmp_path / "pair.tif") == (2, "pages")
    assert np.array_equal(read_image(tmp_path / "pair.tif", 0), np.asarray(first))
    assert np.array_equal(read_image(tmp_path / "pair.tif", 1), np.asarray(second))
    with pytest.raises(DatasetError, match=r"pair.tif holds 2 pages: there is no picture 2"):
        read_image(tmp_path / "pair.tif", 2)
    first.save(tmp_path / "thumb.tif", save_all=True, append_images=[second.resize((20, 15))])
    assert np.array_equal(read_image(tmp_path / "thumb.tif"), np.asarray(first))
    assert picture_count(tmp_path / "thumb.tif") == (1, "")
    first.save(tmp_path / "one.tif")
    assert np.array_equal(read_image(tmp_path / "one.tif"), np.asarray(first))
    assert np.array_equal(read_image(tmp_path / "one.tif", 0), np.asarray(first))
    with pytest.raises(DatasetError, match="one.tif holds one picture: there is no picture 1"):
        read_image(tmp_path / "one.tif", 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_page_of_a_tiff_is_turned_upright_as_a_tiff_of_one_page(tmp_path: Path,
                                                                      orientation: int):
    rng = np.random.default_rng(orientation)
    first, second = (Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8))
                     for _ in range(2))
    tags = Image.Exif()
    tags[0x0112] = orientation
    first.save(tmp_path / "pair.tif", save_all=True, append_images=[second], exif=tags)
    for i, page in enumerate((first, second)):
        page.save(tmp_path / f"page{i}.tif", exif=tags)
        alone = read_image(tmp_path / f"page{i}.tif")
        assert np.array_equal(read_image(tmp_path / "pair.tif", i), alone)
    assert alone.shape[:2] == ((40, 30) if orientation >= 5 else (30, 40))  # turned


def test_the_pages_of_a_16_bit_tiff_are_scaled_as_a_tiff_of_one_page(tmp_path: Path):
    rng = np.random.default_rng(3)
    pages = [rng.integers(0, 4096, (30, 40, 3)).astype(np.uint16) for _ in range(2)]  # 12-bit
    assert cv2.imwritemulti(str(tmp_path / "pair.tif"), pages)
    for i, page in enumerate(pages):
        assert cv2.imwrite(str(tmp_path / f"page{i}.tif"), page)
        alone = read_image(tmp_path / f"page{i}.tif")
        assert np.array_equal(read_image(tmp_path / "pair.tif", i), alone)
        assert alone.max() > 200  # 4095 is 255, not 16


def test_a_photograph_with_its_channels_in_bgr_order_is_warned_of(shared_data: Path):
    """OpenCV arrays and files written from them hold blue first: the FOV (estimated from the
    red channel) and an A/V map went wrong in silence (bench/channel_order.py)."""
    for path in (shared_data / "DRIVE" / "test" / "images" / "01_test.tif",
                 shared_data / "STARE" / "stare-images" / "im0319.ppm.gz"):  # bluest, least blue
        rgb = read_image(path)
        assert channel_order_warning(rgb, path) is None
        message = channel_order_warning(np.ascontiguousarray(rgb[..., ::-1]), path)
        assert f"{path}: its blue channel is brighter than its red" in message
        assert "BGR order" in message
    gray = np.repeat(read_image(path)[..., 1:2], 3, axis=-1)
    assert channel_order_warning(gray, path) is None  # an angiogram or red-free photograph


def test_a_given_fov_mask_of_the_frame_or_the_whole_image_is_warned_of(tmp_path: Path, caplog):
    sample = _tiny_sample(tmp_path)
    read_sample(sample)
    assert not caplog.records
    fov = read_mask(sample.fov)
    write_image_atomic(tmp_path / "inverted.png", ~fov)
    write_image_atomic(tmp_path / "white.png", np.ones_like(fov))
    read_sample(sample, fov_path=tmp_path / "inverted.png")
    assert "inverted.png: the FOV mask keeps the darker part of the photograph" in caplog.text
    read_sample(sample, fov_path=tmp_path / "white.png")
    assert "white.png: the FOV mask covers the whole image, but the photograph has a dark " \
           "frame" in caplog.text
    caplog.clear()  # a light surround beside the right mask is no inverted mask
    image = read_image(sample.image)
    image[~fov] = 255
    write_image_atomic(tmp_path / "img.tif", image)
    read_sample(sample)
    assert not caplog.records


def test_a_photograph_over_the_decoders_size_limit_gets_one_line(tmp_path: Path):
    """The limit is OpenCV's (lowered here through its own variable): PNG and GIF alike."""
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((50, 50), np.uint8))
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(tmp_path / "big.gif")
    code = ("from retina_tf.data.io import DatasetError, read_image\n"
            "for name in ('big.png', 'big.gif'):\n"
            "    try:\n        read_image(name)\n"
            "    except DatasetError as err:\n        print(err)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "1000"})
    assert result.stdout.splitlines() == [
        f"{name} has over 1,000 pixels, more than the image decoders read "
        "(OPENCV_IO_MAX_IMAGE_PIXELS): shrink it first (a fundus photograph needs far fewer)"
        for name in ("big.png", "big.gif")], result.stderr[-2000:]
    # the variable as OpenCV reads it: a count, or in KB or MB (of 1024)
    from retina_tf.data.io import _opencv_pixel_limit
    assert [_opencv_pixel_limit(t) for t in ("1000", "1MB", "3kb", "2Mb", "", None, "1 kB")] \
        == [1000, 1 << 20, 3 << 10, 2 << 20, 1 << 30, 1 << 30, 1 << 30]


def test_a_dicom_photograph_reads_as_the_picture_it_holds(shared_data: Path, tmp_path: Path):
    rgb = read_image(shared_data / "DRIVE" / "test" / "images" / "01_test.tif")
    assert np.array_equal(read_image(write_dicom(tmp_path / "raw.dcm", rgb, "RGB")), rgb)
    # a JPEG-compressed one (YBR colour) comes back in RGB order, not as luma and chroma
    jpeg = read_image(write_dicom(tmp_path / "jpeg.dcm", rgb, "YBR_FULL_422", jpeg=True))
    assert jpeg.shape == rgb.shape and np.abs(jpeg.astype(int) - rgb).mean() < 2
    np.testing.assert_allclose(jpeg.mean(axis=(0, 1)), rgb.mean(axis=(0, 1)), atol=1)
    j2k = write_dicom(tmp_path / "j2k.dcm", rgb, "YBR_RCT", j2k=True)
    assert np.array_equal(read_image(j2k), rgb)
    # 12-bit gray data in 16 bits: the file's BitsStored maps 4095 to 255, even where the
    # brightest pixel is darker (bit_depth would read 1000 as 10-bit)
    gray = np.array([[0, 1000], [2047, 4095]], np.uint16)
    expected = np.rint(gray * (255 / 4095)).astype(np.uint8)
    got = read_image(write_dicom(tmp_path / "gray.dcm", gray, "MONOCHROME2", bits=12))
    assert np.array_equal(got, np.repeat(expected[..., None], 3, axis=-1))
    dark = read_image(write_dicom(tmp_path / "dark.dcm", gray[:1], "MONOCHROME2", bits=12))
    assert dark[0, 1, 0] == round(1000 * 255 / 4095)
    # MONOCHROME1 stores bright as low values: read inverted, as a viewer shows it
    inverted = read_image(write_dicom(tmp_path / "m1.dcm", 4095 - gray, "MONOCHROME1", bits=12))
    assert np.array_equal(inverted, got)
    # BitsStored 16 with 12-bit data (how cameras store it): by the largest value, as a 16-bit
    # PNG is read (as 16-bit, 4095 became 16 and the photograph 15 grey levels)
    sixteen = read_image(write_dicom(tmp_path / "g16.dcm", gray, "MONOCHROME2", bits=16))
    assert np.array_equal(sixteen, got)
    assert np.array_equal(read_image(write_dicom(tmp_path / "m16.dcm", 4095 - gray,
                                                 "MONOCHROME1", bits=16)), got)
    full = np.array([[0, 1000], [30000, 65535]], np.uint16)
    assert read_image(write_dicom(tmp_path / "f16.dcm", full, "MONOCHROME2", bits=16))[1, 0, 0] \
        == round(30000 * 255 / 65535)
    # palette colour: each index looked up in the file's 16-bit colour tables
    path = write_dicom(tmp_path / "palette.dcm", np.array([[0, 1], [2, 1]], np.uint8),
                  "PALETTE COLOR")
    ds = pydicom.dcmread(path)
    table = {"Red": [65535, 0, 0], "Green": [0, 65535, 0], "Blue": [0, 0, 32896]}
    for colour, values in table.items():
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [3, 0, 16])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{colour}PaletteColorLookupTableData",
                np.array(values, np.uint16).tobytes())
    ds.save_as(path)
    assert read_image(path).tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 128], [0, 255, 0]]]
    # a DICOM file is one whatever its name, and a gzipped one too
    plain = tmp_path / "IM000001"
    plain.write_bytes((tmp_path / "raw.dcm").read_bytes())
    gz = tmp_path / "raw.dcm.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert np.array_equal(read_image(plain), rgb) and np.array_equal(read_image(gz), rgb)


def test_a_dicom_file_that_is_not_one_photograph_gets_one_line(tmp_path: Path):
    rgb = np.full((16, 16, 3), 100, np.uint8)
    path = write_dicom(tmp_path / "pair.dcm", rgb, "RGB", frames=2)
    with pytest.raises(DatasetError, match=r"pair.dcm holds 2 pictures \(frames\) in one DICOM "
                                           r"file: .* save each frame as a file"):
        read_image(path)
    with pytest.raises(DatasetError, match=r"pair.dcm holds 2 frames: there is no picture 2"):
        read_image(path, 2)
    # a compression pydicom needs a plug-in for: the plug-ins it names, on one line
    path = write_dicom(tmp_path / "jls.dcm", rgb, "RGB", transfer_syntax=JPEGLSLossless)
    with pytest.raises(DatasetError, match=r"jls.dcm: pydicom cannot decode its pixels "
                                           r"\(JPEG-LS Lossless .*\): .*pylibjpeg") as err:
        read_image(path)
    assert "\n" not in str(err.value)
    # no picture in it (a report)
    ds = pydicom.dcmread(write_dicom(tmp_path / "report.dcm", rgb, "RGB"))
    del ds.PixelData
    ds.save_as(tmp_path / "report.dcm")
    with pytest.raises(DatasetError, match="report.dcm is a DICOM file without a picture"):
        read_image(tmp_path / "report.dcm")
    # no Photometric Interpretation: named (it failed as "'FileDataset' object has no
    # attribute"), and one without its preamble and header told apart from a broken image
    ds = pydicom.dcmread(write_dicom(tmp_path / "nophoto.dcm", rgb, "RGB"))
    del ds.PhotometricInterpretation
    ds.save_as(tmp_path / "nophoto.dcm")
    with pytest.raises(DatasetError, match=r"nophoto.dcm: its DICOM header has no Photometric "
                                           r"Interpretation \(0028,0004\)"):
        read_image(tmp_path / "nophoto.dcm")
    legacy = tmp_path / "legacy.dcm"
    legacy.write_bytes(write_dicom(tmp_path / "full.dcm", rgb, "RGB").read_bytes()[132:])
    with pytest.raises(DatasetError, match=r"legacy.dcm cannot be decoded as an image .*"
                                           r"without its 128-byte preamble"):
        read_image(legacy)
    # a CT-like file of signed values is no photograph
    path = write_dicom(tmp_path / "ct.dcm", np.zeros((4, 4), np.uint16), "MONOCHROME2", bits=12)
    ds = pydicom.dcmread(path)
    ds.PixelRepresentation = 1
    ds.save_as(path)
    with pytest.raises(DatasetError, match="ct.dcm stores signed 12-bit pixels"):
        read_image(path)
    # cut short in its header, or in its pixels
    cut = tmp_path / "cut.dcm"
    cut.write_bytes((tmp_path / "pair.dcm").read_bytes()[:300])
    with pytest.raises(DatasetError, match="cut.dcm is a DICOM file without a picture .* copy "
                                           "it again"):
        read_image(cut)
    one = write_dicom(tmp_path / "one.dcm", rgb, "RGB")
    one.write_bytes(one.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="one.dcm: pydicom cannot decode its pixels"):
        read_image(one)


@pytest.mark.parametrize("compression", ["raw", "jpeg"])
def test_each_frame_of_a_dicom_file_reads_as_the_picture_it_holds(tmp_path: Path,
                                                                  compression: str):
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (24, 32, 3), np.uint8) for _ in range(3)]
    jpeg = compression == "jpeg"
    path = write_dicom(tmp_path / "series.dcm", frames[0], "YBR_FULL_422" if jpeg else "RGB",
                       jpeg=jpeg, more=tuple(frames[1:]))
    assert picture_count(path) == (3, "frames")
    for i, frame in enumerate(frames):
        alone = write_dicom(tmp_path / f"frame{i}.dcm", frame, "YBR_FULL_422" if jpeg else "RGB",
                            jpeg=jpeg)
        assert picture_count(alone) == (1, "")
        assert np.array_equal(read_image(path, i), read_image(alone))
        if not jpeg:
            assert np.array_equal(read_image(path, i), frame)


def test_dicom_files_in_a_folder_are_found_and_their_outputs_named(tmp_path: Path):
    from retina_tf.evaluation import find_fov_mask, list_inputs, output_names
    photo = np.zeros((8, 8, 3), np.uint8)
    # as cameras and CDs name them: an extension, none, or a UID; DICOMDIR is the CD's index
    for name in ("a.dcm", "b.DICOM", "IM000001", "1.2.840.1.7", "1.2.840.1.8", "DICOMDIR"):
        write_dicom(tmp_path / name, photo, "RGB")
    (tmp_path / "notes.txt").write_text("not a photograph")
    (tmp_path / "1.2.840.1.9").write_bytes(b"\0" * 200)  # neither
    inputs = list_inputs(tmp_path)
    assert [p.name for p in inputs] == ["1.2.840.1.7", "1.2.840.1.8", "IM000001", "a.dcm",
                                        "b.DICOM"]
    # outputs named by the whole name where it has no image extension, and FOV masks found so
    assert sorted(output_names(inputs).values()) == ["1.2.840.1.7", "1.2.840.1.8", "IM000001",
                                                     "a", "b"]
    masks = [tmp_path / "fov" / n for n in ("1.2.840.1_mask.png", "1.2.840.1.7_mask.png")]
    assert find_fov_mask(inputs[0], masks) == masks[1]
