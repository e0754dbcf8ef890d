"""Bad, odd and clashing inputs and outputs of predict / evaluate: each fails or warns clearly,
naming the file, instead of giving a silent wrong answer (reproductions of the issue's cases)."""

import csv
import io
import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from retina_tf.data.fov import estimate_fov
from retina_tf.data.io import DatasetError, bit_depth, read_image, read_mask, write_image_atomic
from retina_tf.data.synthetic import generate_fundus, write_synthetic_dataset
from retina_tf.errors import ConfigError, ModelFileError, RetinaTFError
from retina_tf.evaluation import (
    MANIFEST_NAME,
    PREDICT_JOURNAL,
    STAGING_PREFIX,
    Photograph,
    evaluate,
    find_fov_mask,
    output_names,
    predict,
    read_manifest,
)
from retina_tf.flags import parse_config
from retina_tf.inference import Segmenter, load_keras_model
from retina_tf.run_folder import PRETRAINED_DIR, RunBusyError, lock_open_file
from tests import commands
from tests.data.dicom import write_dicom

REPO = Path(__file__).resolve().parents[1]
SHIPPED = PRETRAINED_DIR / "unet_drive"


@pytest.fixture(scope="module")
def shipped() -> Segmenter:
    return Segmenter.from_run("unet_drive")


def _fundus(path: Path, seed: int, size=(128, 128)) -> Path:
    write_image_atomic(path, generate_fundus(seed, size).image)
    return path


def _predict(inputs: Path, out: Path, *extra: str):
    cfg = parse_config("predict", ["--model=unet_drive", f"--input={inputs}",
                                   f"--output_dir={out}", *extra])
    return predict(cfg)


def _corrupt_middle(data: bytes, n: int = 300, fill: bytes | None = None) -> bytes:
    """Overwrites ``n`` bytes in the middle of a JPEG's entropy-coded data; the end marker and
    every header stay intact."""
    start = data.index(b"\xff\xda")  # start of scan
    middle = (start + len(data)) // 2
    fill = bytes(n) if fill is None else fill
    return data[:middle] + fill + data[middle + n:]


# ----------------------------------------------------------------------- 1: --fov=<folder>

def test_fov_folder_takes_the_exact_stem_not_a_prefix(tmp_path: Path):
    inputs, masks = tmp_path / "in", tmp_path / "masks"
    _fundus(inputs / "1.png", 1)
    half = np.zeros((128, 128), bool)
    half[:, :64] = True
    # "10_mask.png" sorts before "1_mask.png": the old prefix rule took it for image 1.png.
    write_image_atomic(masks / "10_mask.png", np.ones((128, 128), bool))
    write_image_atomic(masks / "1_mask.png", half)
    _predict(inputs, tmp_path / "out", f"--fov={masks}")
    prob = cv2.imread(str(tmp_path / "out" / "1_prob.png"), cv2.IMREAD_UNCHANGED)
    assert prob[:, 64:].max() == 0 and prob[:, :64].max() > 0  # 1_mask.png's left half


def test_a_fov_folder_that_is_the_input_folder_takes_neither_photographs_nor_outputs(
        tmp_path: Path):
    """The photographs being segmented and retina_tf's own <stem>_mask.png (a vessel mask)
    were taken for FOV masks: x.png used x.tif, and a re-run failed, or used the vessel mask."""
    same = tmp_path / "same"
    _fundus(same / "x.png", 1)
    _fundus(same / "x.tif", 2)
    _fundus(same / "y.tif", 3)
    half = np.zeros((128, 128), bool)
    half[:, :64] = True
    write_image_atomic(same / "x_mask.png", half)
    write_image_atomic(same / "y_mask.gif", half)

    def right_half_empty(name):
        prob = cv2.imread(str(same / f"{name}_prob.png"), cv2.IMREAD_UNCHANGED)
        return prob[:, 64:].max() == 0 and prob[:, :64].max() > 0

    for _ in range(2):   # the second run finds y_mask.png, its own output, beside y_mask.gif
        _predict(same, same, f"--fov={same}")
        assert all(right_half_empty(n) for n in ("x.png", "x.tif", "y"))
    (same / "y_mask.gif").unlink()
    with pytest.raises(RetinaTFError, match="1 of 3 images failed"):
        _predict(same, same, f"--fov={same}")   # no FOV for y: said, not its vessel mask used
    assert right_half_empty("y")


def test_an_fov_mask_the_prediction_reads_is_never_replaced_by_its_vessel_mask(tmp_path):
    """predict into the photographs' folder with --fov=that folder: --overwrite (which the
    refusal suggested) replaced the user's FOV mask eye_mask.png with the vessel mask."""
    same = tmp_path / "same"
    _fundus(same / "eye.png", 1)
    half = np.zeros((128, 128), bool)
    half[:, :64] = True
    write_image_atomic(same / "eye_mask.png", half)
    before = (same / "eye_mask.png").read_bytes()
    for extra in ((), ("--overwrite",)):
        with pytest.raises(ConfigError, match=r"eye_mask.png is read by this prediction "
                                              r"\(--fov\).*give another --output_dir"):
            _predict(same, same, f"--fov={same}", *extra)
    assert (same / "eye_mask.png").read_bytes() == before
    assert sorted(p.name for p in same.iterdir()) == ["eye.png", "eye_mask.png"]


def test_predict_writes_all_of_an_images_files_or_none(tmp_path: Path):
    """A Ctrl-C (here a failing last write) left an image with its probability map and no
    mask."""
    inputs = tmp_path / "in"
    _fundus(inputs / "a.png", 2)
    out = tmp_path / "out"
    # the image's last file cannot be written where this process stages it
    (out / f"{STAGING_PREFIX}{os.getpid()}" / "a_prob.npy").mkdir(parents=True)
    with pytest.raises(RetinaTFError, match="a_prob.npy"):
        _predict(inputs / "a.png", out, "--save_probabilities")
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
    assert not list(out.glob(f"{STAGING_PREFIX}*"))
    _predict(inputs / "a.png", out, "--save_probabilities")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "a_mask.png", "a_prob.npy", "a_prob.png", "predictions.csv"]
    # in a folder, the photographs done before the failure are in predictions.csv
    (out / "predictions.csv").unlink()
    _fundus(inputs / "b.png", 3)
    (out / f"{STAGING_PREFIX}{os.getpid()}" / "b_prob.npy").mkdir(parents=True)
    with pytest.raises(RetinaTFError, match="b_prob.npy"):
        _predict(inputs, out, "--save_probabilities")
    table = (out / "predictions.csv").read_text().splitlines()
    assert len(table) == 2 and table[1].startswith(f"{inputs / 'a.png'},a,128,128,")
    assert not (out / "b_prob.png").exists()


def test_a_temporary_file_of_a_killed_write_is_cleared_by_the_next_run_there(tmp_path: Path):
    """A process killed (SIGKILL: no cleanup runs) in the middle of an atomic write into an
    output folder, here of predict's manifest, left its temporary file there for good."""
    out = tmp_path / "out"
    left = commands.killed_while_writing(out / MANIFEST_NAME)
    live = out / f".predictions.csv.{os.getpid()}-ab.tmp"  # another command writing now
    live.write_text("x")
    (out / ".notes.1-2.txt").write_text("the user's")
    _predict(_fundus(tmp_path / "a.png", 2), out)
    assert not left.exists() and live.exists() and (out / ".notes.1-2.txt").exists()
    assert {"a_mask.png", "a_prob.png"} <= read_manifest(out)


# segmented at 128 px as they are, not enlarged to the training FOV: these tests are about
# which photographs are segmented and where their files go
NATIVE = "--inference_scale=native"


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


@pytest.mark.slow
def test_predict_killed_in_a_folder_resumes_where_it_stopped(tmp_path: Path, capsys):
    """A folder run killed (SIGKILL) while writing its third photograph's mask and started
    again with the same command keeps the two photographs done, untouched, segments the rest,
    and ends with the files and table of a run never killed; it used to segment all again."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    for seed, name in enumerate("abcde"):
        _fundus(inputs / f"{name}.png", seed)
    _predict(inputs, tmp_path / "never_killed", NATIVE)
    argv = ["--model=unet_drive", f"--input={inputs}", f"--output_dir={out}", NATIVE]
    killed = commands.script("predict.py", *argv,
                             env={**os.environ, "RETINA_TF_KILL_AT": "c_mask.png"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = ["a_mask.png", "a_prob.png", "b_mask.png", "b_prob.png"]
    assert sorted(_outputs(out)) == done  # c's first file is in the (hidden) staging folder
    before = {n: (out / n).stat().st_mtime_ns for n in done}
    _predict(inputs / "a.png", out, NATIVE)  # one photograph of the folder: kept, the record too
    assert (out / PREDICT_JOURNAL).is_file()

    again = commands.script("predict.py", *argv)
    said = again.stdout + again.stderr
    assert again.returncode == 0, said[-2000:]
    assert ("2 of 5 image(s) were segmented with these settings by an unfinished run into "
            f"{out}: kept, not segmented again" in said)
    assert "a.png ->" not in said and "b.png ->" not in said and "c.png ->" in said
    assert {n: (out / n).stat().st_mtime_ns for n in done} == before  # not written again
    assert _outputs(out) == _outputs(tmp_path / "never_killed")  # predictions.csv too
    assert not (out / PREDICT_JOURNAL).exists() and not list(out.glob(f"{STAGING_PREFIX}*"))

    # a photograph changed since the stop is segmented again, the others kept
    killed = commands.script("predict.py", *argv,
                             env={**os.environ, "RETINA_TF_KILL_AT": "d_mask.png"})
    assert killed.returncode == -signal.SIGKILL
    _fundus(inputs / "a.png", 7)  # another photograph under the same name
    capsys.readouterr()
    _predict(inputs, out, NATIVE)
    said = capsys.readouterr().out
    assert "2 of 5 image(s) were segmented with these settings" in said
    assert [n for n in "abcde" if f"{n}.png ->" in said] == ["a", "d", "e"]
    assert _outputs(out)["a_prob.png"] != _outputs(tmp_path / "never_killed")["a_prob.png"]
    # other settings: all segmented again
    killed = commands.script("predict.py", *argv, "--threshold=0.3",
                             env={**os.environ, "RETINA_TF_KILL_AT": "c_mask.png"})
    assert killed.returncode == -signal.SIGKILL
    _predict(inputs, out, NATIVE)
    said = capsys.readouterr().out
    assert "an unfinished run with other settings left its record here; its photographs are " \
        "segmented again" in said
    assert all(f"{n}.png ->" in said for n in "abcde")


def test_predict_segments_each_frame_and_page_of_a_file_of_several(tmp_path: Path, capsys):
    """A stereo pair or a series in one TIFF or DICOM file (refused before): each page and
    frame segmented as the same picture in a file of its own is, named by its number, a row
    each in the table; a frame that cannot be decoded fails alone, and the same command again
    keeps the frames done (the record holds each one)."""
    inputs, alone = tmp_path / "in", tmp_path / "alone"
    pictures = [generate_fundus(seed, (128, 128)).image for seed in range(4)]
    for i, picture in enumerate(pictures):
        write_image_atomic(alone / f"{i}.png", picture)
    inputs.mkdir()
    first, second = (Image.fromarray(p) for p in pictures[:2])
    first.save(inputs / "pair.tif", save_all=True,
               append_images=[first.resize((32, 32)), second])  # a thumbnail between: no page
    write_dicom(inputs / "IM0001", pictures[2], "RGB", more=(pictures[3],))
    _predict(inputs, tmp_path / "out", NATIVE)
    said = capsys.readouterr().out
    assert "segmenting 4 image(s) in 2 file(s)" in said
    assert f"{inputs / 'pair.tif'} (page 2 of 2) -> {tmp_path / 'out' / 'pair_page2'}_" in said
    _predict(alone, tmp_path / "out_alone", NATIVE)
    got, expected = _outputs(tmp_path / "out"), _outputs(tmp_path / "out_alone")
    for base, i in (("pair_page1", 0), ("pair_page2", 1), ("IM0001_frame1", 2),
                    ("IM0001_frame2", 3)):
        for suffix in ("_prob.png", "_mask.png"):
            assert got[base + suffix] == expected[f"{i}{suffix}"], base + suffix
    assert len(got) == 9  # and predictions.csv
    table = list(csv.DictReader(io.StringIO(got["predictions.csv"].decode())))
    assert [(Path(r["input"]).name, r["frame"], r["outputs"]) for r in table] == [
        ("IM0001", "1", "IM0001_frame1"), ("IM0001", "2", "IM0001_frame2"),
        ("pair.tif", "1", "pair_page1"), ("pair.tif", "2", "pair_page2")]
    shares = [r["vessel_share"]
              for r in csv.DictReader(io.StringIO(expected["predictions.csv"].decode()))]
    assert [r["vessel_share"] for r in table] == shares[2:] + shares[:2]  # 0-3.png in order

    # the second of two JPEG frames cannot be decoded: it fails alone, the first is kept
    broken, out = tmp_path / "broken", tmp_path / "out_broken"
    broken.mkdir()
    write_dicom(broken / "series.dcm", pictures[0], "YBR_FULL_422", jpeg=True,
                more=(b"\xff\xd8\xff\xe0 not a JPEG \xff\xd9",))
    capsys.readouterr()
    with pytest.raises(RetinaTFError, match=r"1 of 2 images failed \(series\.dcm frame 2; "):
        _predict(broken, out, NATIVE)
    said = capsys.readouterr()
    assert f"{broken / 'series.dcm'} (frame 2 of 2): pydicom cannot decode its pixels" in said.err
    assert sorted(_outputs(out)) == ["predictions.csv", "series_frame1_mask.png",
                                     "series_frame1_prob.png"]
    with pytest.raises(RetinaTFError, match=r"1 of 2 images failed \(series\.dcm frame 2; "):
        _predict(broken, out, NATIVE)
    said = capsys.readouterr()
    assert "1 of 2 image(s) were segmented with these settings by an unfinished run" in said.out
    assert "(frame 1 of 2) ->" not in said.out


def test_a_fov_folder_gives_a_frame_its_own_mask_before_its_files(tmp_path: Path, capsys):
    inputs, masks = tmp_path / "in", tmp_path / "masks"
    inputs.mkdir()
    first, second = (Image.fromarray(generate_fundus(seed, (128, 128)).image) for seed in (1, 2))
    first.save(inputs / "pair.tif", save_all=True, append_images=[second])
    left, right = np.zeros((128, 128), bool), np.zeros((128, 128), bool)
    left[:, :64], right[:, 64:] = True, True
    write_image_atomic(masks / "pair_page2_mask.png", left)  # page 2's own
    write_image_atomic(masks / "pair_mask.png", right)  # the file's: page 1 takes it
    _predict(inputs, tmp_path / "out", f"--fov={masks}", NATIVE)
    for page, inside in (("page1", right), ("page2", left)):
        prob = cv2.imread(str(tmp_path / "out" / f"pair_{page}_prob.png"), cv2.IMREAD_UNCHANGED)
        assert prob[~inside].max() == 0 and prob[inside].max() > 0, page
    (masks / "pair_mask.png").unlink()
    with pytest.raises(RetinaTFError, match=r"1 of 2 images failed \(pair\.tif page 1;"):
        _predict(inputs, tmp_path / "out2", f"--fov={masks}", NATIVE)
    assert (f"pair.tif (page 1 of 2): no FOV mask for it in {masks} (looked for "
            "pair_page1.<ext> or pair.<ext>, also with _mask or _fov before the .<ext>)"
            in capsys.readouterr().err)


@pytest.mark.slow
def test_predict_recursive_segments_a_folder_tree_into_the_same_tree(tmp_path: Path, capsys):
    """Clinic archives and DICOM CDs nest photographs in folders (patient / visit); without
    --recursive only the top folder's are segmented, and the subfolders are named."""
    tree, out = tmp_path / "in", tmp_path / "out"
    _fundus(tree / "a.png", 1)
    _fundus(tree / "p1" / "v1" / "b.png", 2)
    _fundus(tree / "p2" / "b.png", 3)  # the same name in another folder: no clash
    _fundus(tree / ".hidden" / "x.png", 4)
    _predict(tree, out, NATIVE)
    assert "2 subfolder(s) not searched: p1, p2 (give each as --input, or --recursive)" in (
        capsys.readouterr().out)
    shutil.rmtree(out)

    argv = ["--model=unet_drive", f"--input={tree}", f"--output_dir={out}", "--recursive",
            NATIVE]
    killed = commands.script("predict.py", *argv,
                             env={**os.environ, "RETINA_TF_KILL_AT": "b_mask.png#2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    again = commands.script("predict.py", *argv)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 of 3 image(s) were segmented with these settings" in again.stdout + again.stderr
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert found == [MANIFEST_NAME, "a_mask.png", "a_prob.png", f"p1/v1/{MANIFEST_NAME}",
                     "p1/v1/b_mask.png", "p1/v1/b_prob.png", f"p2/{MANIFEST_NAME}",
                     "p2/b_mask.png", "p2/b_prob.png", "predictions.csv"]
    table = (out / "predictions.csv").read_text().splitlines()
    assert [row.split(",")[:2] for row in table[1:]] == [
        [str(tree / "a.png"), "a"], [str(tree / "p1" / "v1" / "b.png"), "p1/v1/b"],
        [str(tree / "p2" / "b.png"), "p2/b"]]
    b1 = cv2.imread(str(out / "p1" / "v1" / "b_prob.png"), cv2.IMREAD_UNCHANGED)
    assert not np.array_equal(b1, cv2.imread(str(out / "p2" / "b_prob.png"),
                                             cv2.IMREAD_UNCHANGED))

    # a --fov folder is read at the same place; a folder of masks missing there is named
    half = np.zeros((128, 128), bool)
    half[:, :64] = True
    for mask in ("a_mask.png", "p1/v1/b_mask.png", "p2/b_mask.png"):
        write_image_atomic(tmp_path / "fov" / mask, half)
    _predict(tree, out, "--recursive", f"--fov={tmp_path / 'fov'}", NATIVE)
    b2 = cv2.imread(str(out / "p2" / "b_prob.png"), cv2.IMREAD_UNCHANGED)
    assert b2[:, 64:].max() == 0 and b2[:, :64].max() > 0
    # (it stopped the whole run, before any photograph): that folder's photographs are skipped
    shutil.rmtree(tmp_path / "fov" / "p1")
    shutil.rmtree(out)
    with pytest.raises(RetinaTFError, match=r"1 of 3 images failed \(b\.png"):
        _predict(tree, out, "--recursive", f"--fov={tmp_path / 'fov'}", NATIVE)
    said = capsys.readouterr()
    assert f"skipped: {tree / 'p1' / 'v1' / 'b.png'}: --fov={tmp_path / 'fov' / 'p1' / 'v1'}: " \
        "no such file or folder" in said.out + said.err
    assert (out / "p2" / "b_prob.png").is_file() and not (out / "p1").exists()

    # into the tree itself, twice: outputs beside each photograph, never taken for photographs
    for _ in range(2):
        _predict(tree, tree, "--recursive", NATIVE)
        assert "3 image(s) segmented" in capsys.readouterr().out
    assert (tree / "p1" / "v1" / "b_mask.png").is_file()


def test_a_record_line_cut_short_by_a_kill_loses_that_line_only(tmp_path: Path):
    """The next line was written on after the cut one, and lost with it."""
    from retina_tf.evaluation import Photograph, _Journal
    photos = [Photograph(_fundus(tmp_path / f"{n}.png", i)) for i, n in enumerate("abc")]
    for p in photos:
        (tmp_path / f"{p.path.stem}_mask.png").write_bytes(b"x")
    names = {p: [f"{p.path.stem}_mask.png"] for p in photos}
    first = _Journal(tmp_path, {"threshold": 0.5})
    first.add(photos[0], {"input": str(photos[0].path)}, names[photos[0]])
    first.close(finished=False)
    with open(tmp_path / PREDICT_JOURNAL, "a") as f:
        f.write('{"key": "' + str(photos[1].path)[:10])  # b's line, as a kill leaves it
    second = _Journal(tmp_path, {"threshold": 0.5})
    assert list(second.done(names)) == [photos[0]]
    second.add(photos[2], {"input": str(photos[2].path)}, names[photos[2]])
    second.close(finished=False)
    assert list(_Journal(tmp_path, {"threshold": 0.5}).done(names)) == [photos[0], photos[2]]


def test_a_second_predict_into_a_folder_being_written_is_refused(tmp_path: Path):
    """Two predicts of one folder at once replaced each other's files and predictions.csv in
    silence (a.png of two input folders: the table named one, the files were the other's)."""
    _fundus(tmp_path / "in" / "a.png", 1)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / PREDICT_JOURNAL, "a+") as other:  # as the other predict holds it
        assert lock_open_file(other)
        with pytest.raises(RunBusyError, match=f"another predict is writing {out}: wait"):
            _predict(tmp_path / "in", out)
    assert [p.name for p in out.iterdir()] == [PREDICT_JOURNAL]


def test_a_resumed_predict_segments_again_a_photograph_whose_files_another_run_replaced(
        tmp_path: Path):
    """A stopped predict, then one of another folder with a photograph of the same stem into
    the same output folder: the first, resumed, kept the other's a_mask.png as its own."""
    from retina_tf.evaluation import Photograph, _Journal
    for folder, seed in (("one", 1), ("two", 2)):
        _fundus(tmp_path / folder / "a.png", seed)
    one, two = (Photograph(tmp_path / f / "a.png") for f in ("one", "two"))
    names = ["a_mask.png"]
    for photo, seed in ((one, 1), (two, 2)):  # each run writes a_mask.png, then records it
        journal = _Journal(tmp_path, {"threshold": 0.5})
        journal.hold()
        _fundus(tmp_path / "a_mask.png", seed + 10, size=(64 + seed, 64))
        journal.add(photo, {"input": str(photo.path)}, names)
        journal.close(finished=False)
    journal = _Journal(tmp_path, {"threshold": 0.5})
    assert list(journal.done({one: names, two: names})) == [two]
    journal.close(finished=False)


def test_a_predict_that_fails_before_its_first_photograph_leaves_no_folder(tmp_path: Path):
    with pytest.raises(DatasetError):
        _predict(tmp_path / "missing.png", tmp_path / "out")
    write_image_atomic(tmp_path / "flat.png", np.full((32, 32, 3), 120, np.uint8))
    with pytest.raises(DatasetError):  # its one image is refused
        _predict(tmp_path / "flat.png", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_probabilities_writes_the_float_maps_behind_the_png(tmp_path: Path):
    inputs = tmp_path / "in"
    _fundus(inputs / "a.png", 2)
    written = _predict(inputs, tmp_path / "out", "--save_probabilities")
    assert sorted(p.name for p in written) == ["a_mask.png", "a_prob.npy", "a_prob.png",
                                               "predictions.csv"]
    prob = np.load(tmp_path / "out" / "a_prob.npy")
    assert prob.dtype == np.float32 and prob.shape == (128, 128, 1)
    png = cv2.imread(str(tmp_path / "out" / "a_prob.png"), cv2.IMREAD_UNCHANGED)
    assert np.abs(png / 255.0 - prob[..., 0]).max() <= 0.5 / 255 + 1e-6


def test_fov_folder_finds_drive_masks(shared_data: Path):
    masks = sorted((shared_data / "DRIVE" / "test" / "mask").iterdir())
    image = shared_data / "DRIVE" / "test" / "images" / "01_test.tif"
    assert find_fov_mask(image, masks).name == "01_test_mask.gif"


def test_fov_folder_with_two_or_no_matching_masks_fails_naming_them(tmp_path: Path):
    image = _fundus(tmp_path / "in" / "1.png", 1)
    write_image_atomic(tmp_path / "two" / "1.gif", np.ones((128, 128), bool))
    write_image_atomic(tmp_path / "two" / "1_mask.png", np.ones((128, 128), bool))
    with pytest.raises(DatasetError, match=r"1\.gif, 1_mask\.png"):
        find_fov_mask(image, sorted((tmp_path / "two").iterdir()))
    write_image_atomic(tmp_path / "none" / "10_mask.png", np.ones((128, 128), bool))
    with pytest.raises(DatasetError,
                       match=r"no FOV mask .*looked for 1\.<ext>, also with _mask or _fov"):
        find_fov_mask(image, sorted((tmp_path / "none").iterdir()))
    # the image itself is no candidate when masks sit beside the images
    write_image_atomic(tmp_path / "in" / "1_mask.png", np.ones((128, 128), bool))
    assert find_fov_mask(image, sorted((tmp_path / "in").iterdir())).name == "1_mask.png"


# ---------------------------------------------------------------- 2: corrupt JPEG data

@pytest.mark.parametrize("fill", ["zeros", "random"])
def test_jpeg_corrupt_in_the_middle_is_rejected(shared_data: Path, tmp_path: Path, fill: str):
    data = (shared_data / "samples" / "CHASE_DB1" / "Image_01L.jpg").read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    bad = tmp_path / "Image_01L.jpg"
    bad.write_bytes(_corrupt_middle(data, fill=noise if fill == "random" else None))
    assert bad.read_bytes()[-2:] == b"\xff\xd9"  # OpenCV decodes it with a warning only
    assert cv2.imdecode(np.frombuffer(bad.read_bytes(), np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(DatasetError, match=r"Image_01L\.jpg is a corrupt JPEG"):
        read_image(bad)


def test_valid_jpegs_decode_as_before(shared_data: Path):
    for path in sorted((shared_data / "samples").rglob("*")):
        if path.suffix.lower() in (".jpg", ".jpeg"):
            expected = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            np.testing.assert_array_equal(read_image(path), expected, err_msg=str(path))


# -------------------------------------------------------------------- 3: 10-16 bit PNGs

def test_bit_depth_is_inferred_from_the_largest_value():
    assert [bit_depth(v) for v in (0, 255, 256, 1023, 1024, 4095, 4096, 16383, 16384, 65535)] \
        == [8, 8, 10, 10, 12, 12, 14, 14, 16, 16]


@pytest.mark.parametrize("bits", [12, 16])
def test_12_and_16_bit_pngs_decode_like_the_8_bit_original(shared_data: Path, tmp_path: Path,
                                                           bits: int):
    source = shared_data / "DRIVE" / "test" / "images" / "01_test.tif"
    original = read_image(source)
    assert original.max() == 255  # so the 12-bit copy reaches 4095 and reads as 12-bit
    deep = np.rint(original.astype(np.float64) * (2 ** bits - 1) / 255).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep[..., ::-1])
    decoded = read_image(tmp_path / "deep.png")
    assert np.abs(decoded.astype(int) - original).max() <= 1
    official = read_mask(shared_data / "DRIVE" / "test" / "mask" / "01_test_mask.gif", "fov")
    fov = estimate_fov(decoded)
    dice = 2 * (fov & official).sum() / (fov.sum() + official.sum())
    assert dice > 0.98 and fov.mean() < 0.8  # not the whole frame


# ------------------------------------------------------------- 4: a folder with bad files

def test_predict_folder_writes_every_good_file_then_fails_with_a_summary(
        shared_data: Path, tmp_path: Path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    _fundus(inputs / "a.png", 1)
    jpeg = (shared_data / "samples" / "CHASE_DB1" / "Image_01L.jpg").read_bytes()
    (inputs / "b_broken.jpg").write_bytes(_corrupt_middle(jpeg))
    write_image_atomic(inputs / "c_tiny.png", np.full((32, 32, 3), 120, np.uint8))
    _fundus(inputs / "d.png", 2)
    with pytest.raises(RetinaTFError, match=r"2 of 4 images failed \(b_broken\.jpg, c_tiny.* "
                       r"\(the same command again tries only the failed ones\)$"):
        _predict(inputs, out)
    err = capsys.readouterr().err
    assert "2 image(s) segmented" in err and "b_broken.jpg is a corrupt JPEG" in err
    assert "c_tiny.png is 32x32 pixels" in err
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, PREDICT_JOURNAL,
                                                     "a_mask.png", "a_prob.png",
                                                     "d_mask.png", "d_prob.png",
                                                     "predictions.csv"]
    # the same command again, one bad file mended: only the two that failed are tried
    _fundus(inputs / "c_tiny.png", 3)
    with pytest.raises(RetinaTFError, match=r"1 of 4 images failed \(b_broken\.jpg; reasons"):
        _predict(inputs, out)
    said = capsys.readouterr()
    assert "2 of 4 image(s) were segmented with these settings" in said.out
    assert "a.png ->" not in said.out and "c_tiny.png ->" in said.out and "d.png ->" not in said.out
    # a.png's and d.png's warnings (their small FOV) were logged by the first run: the table
    # has them
    assert "; 3 with a warning in predictions.csv: a.png, c_tiny.png, d.png" in said.err
    assert len((out / "predictions.csv").read_text().splitlines()) == 5  # all four, in order
    write_image_atomic(inputs / "c_tiny.png", np.full((32, 32, 3), 120, np.uint8))
    for name in ("a.png", "d.png"):
        (inputs / name).unlink()
    with pytest.raises(RetinaTFError, match=r"2 of 2 images failed .*; none was written$"):
        _predict(inputs, tmp_path / "none")


def test_a_given_fov_mask_of_the_frame_is_warned_of_in_python_as_in_files(caplog):
    """predict --fov and Segmenter.segment(fov=...) as read_sample: an inverted mask scored
    (and segmented) the frame in silence."""
    sample = generate_fundus(0, (96, 96))
    # as it is: a 96 px photograph enlarged towards DRIVE's FOV is warned of (segment, predict)
    seg = Segmenter.from_pretrained("unet_drive", inference_scale="native")
    seg.segment(sample.image, sample.fov, source="right.png")
    assert not caplog.records
    seg.segment(sample.image, ~sample.fov, source="inverted.png")
    assert "inverted.png: the FOV mask keeps the darker part of the photograph" in caplog.text


def test_predict_names_the_fov_mask_file_it_warns_of(tmp_path: Path, caplog):
    """The warning named the photograph, not the --fov mask that is wrong."""
    sample = generate_fundus(0, (96, 96))
    write_image_atomic(tmp_path / "in" / "eye.png", sample.image)
    write_image_atomic(tmp_path / "fov" / "eye_mask.png", ~sample.fov)
    with caplog.at_level(logging.WARNING, logger="retina_tf"):
        _predict(tmp_path / "in", tmp_path / "out", f"--fov={tmp_path / 'fov'}",
                 "--inference_scale=native")
    assert (f"{tmp_path / 'fov' / 'eye_mask.png'}: the FOV mask keeps the darker part"
            in caplog.text)


def test_an_opencv_array_given_to_segment_is_warned_of_once(tmp_path: Path, caplog):
    """cv2.imread gives BGR; Segmenter.segment takes RGB."""
    path = _fundus(tmp_path / "a.png", 1)
    seg = Segmenter.from_pretrained("unet_drive", inference_scale="native")  # as above
    seg.segment(read_image(path), source=path)
    assert not [r for r in caplog.records if r.name.startswith("retina_tf")]
    seg.segment(cv2.imread(str(path)), source=path)
    warned = [r.getMessage() for r in caplog.records if "BGR order" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0]


@pytest.mark.slow
def test_predict_cli_reports_the_bad_file_and_exits_non_zero(shared_data: Path, tmp_path: Path):
    inputs = tmp_path / "in"
    _fundus(inputs / "a.png", 1)
    jpeg = (shared_data / "samples" / "CHASE_DB1" / "Image_01L.jpg").read_bytes()
    (inputs / "broken.jpg").write_bytes(_corrupt_middle(jpeg))
    proc = commands.script("predict.py", "--model=unet_drive", f"--input={inputs}",
                           f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode != 0 and "broken.jpg" in proc.stdout + proc.stderr
    assert (tmp_path / "out" / "a_prob.png").is_file()


# ------------------------------------------------------------------------- 5: output names

def test_a_photographs_warnings_are_its_own_thread_s():
    """predict's table took the warnings another thread of the process logged meanwhile (a
    service segmenting beside it) into every row."""
    from retina_tf.evaluation import _collecting_warnings
    log = logging.getLogger("retina_tf.inference")
    with _collecting_warnings() as warned:
        log.warning("warning: this photograph")
        other = threading.Thread(target=log.warning, args=("warning: another request",))
        other.start()
        other.join()
    assert warned.messages == ["warning: this photograph"]


def test_stems_that_clash_keep_their_extension_in_output_names(tmp_path: Path):
    _fundus(tmp_path / "in" / "a.png", 1)
    _fundus(tmp_path / "in" / "a.jpg", 2)
    _predict(tmp_path / "in", tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [MANIFEST_NAME, "a.jpg_mask.png", "a.jpg_prob.png", "a.png_mask.png",
                     "a.png_prob.png", "predictions.csv"]
    a_png = cv2.imread(str(tmp_path / "out" / "a.png_prob.png"))
    a_jpg = cv2.imread(str(tmp_path / "out" / "a.jpg_prob.png"))
    assert not np.array_equal(a_png, a_jpg)  # two images, two results
    # a whole name that equals another stem falls back too
    clash = output_names([Path("x.png"), Path("x.jpg"), Path("x.png.jpg")])
    assert sorted(clash.values()) == ["x.jpg", "x.png", "x.png.jpg"]
    # the frames of one file keep one stem where one of them clashes (frame 1 was written as
    # scan.dcm_frame1, frame 2 as scan_frame2)
    frames = [Photograph(Path("scan.dcm"), i, 2, "frames") for i in (0, 1)]
    clash = output_names([*frames, Path("scan_frame1.png")])
    assert [clash[f] for f in frames] == ["scan.dcm_frame1", "scan.dcm_frame2"]
    assert clash[Path("scan_frame1.png")] == "scan_frame1.png"


def test_predict_into_its_input_folder_twice_skips_its_own_outputs(tmp_path: Path, capsys):
    folder = tmp_path / "photos"
    _fundus(folder / "a.png", 1)
    _predict(folder, folder)
    first = sorted(p.name for p in folder.iterdir())
    capsys.readouterr()
    _predict(folder, folder)  # no --overwrite needed to replace its own outputs
    assert sorted(p.name for p in folder.iterdir()) == first
    assert "1 image(s) segmented" in capsys.readouterr().out
    assert read_manifest(folder) == {"a_prob.png", "a_mask.png", "predictions.csv"}


def test_predict_never_replaces_a_file_it_did_not_write(tmp_path: Path):
    _fundus(tmp_path / "in" / "a.png", 1)
    _fundus(tmp_path / "in" / "b.png", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_mask.png").write_bytes(b"the user's own file")
    with pytest.raises(ConfigError, match=r"b_mask\.png .*--overwrite"):
        _predict(tmp_path / "in", out)
    assert sorted(p.name for p in out.iterdir()) == ["b_mask.png"]  # nothing written at all
    _predict(tmp_path / "in", out, "--overwrite")
    assert read_image(out / "b_mask.png").shape == (128, 128, 3)
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporary files


def test_evaluate_visualize_never_replaces_the_users_files(tmp_path: Path):
    data = write_synthetic_dataset(tmp_path / "syn", num_images=3, num_test=1, seed=3,
                                   size=(96, 96))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": true}')
    argv = ["--model=unet_drive", "--dataset=synthetic", f"--data_dir={data}", "--visualize",
            f"--output_dir={out}", f"--logdir={tmp_path / 'logs'}"]
    with pytest.raises(ConfigError, match=r"metrics\.json .*--overwrite"):
        evaluate(parse_config("evaluate", argv))
    assert json.loads((out / "metrics.json").read_text()) == {"mine": True}
    evaluate(parse_config("evaluate", argv + ["--overwrite"]))
    evaluate(parse_config("evaluate", argv))  # its own files now: a re-run needs no --overwrite
    assert "roc_curve.png" in read_manifest(out) and (out / "01_test_overlay.png").is_file()


# -------------------------------------------------------- 6: inputs without a good answer

@pytest.mark.parametrize("size", [32, 1])
def test_images_smaller_than_a_training_patch_are_rejected(shipped: Segmenter, tmp_path: Path,
                                                           size: int):
    path = tmp_path / f"tiny{size}.png"
    write_image_atomic(path, np.full((size, size, 3), 120, np.uint8))
    with pytest.raises(DatasetError, match=rf"tiny{size}\.png is {size}x{size} .* at least 96x96"):
        _predict(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # 8: an early failure leaves no folder behind
    with pytest.raises(DatasetError, match="at least 96x96"):
        shipped.segment(read_image(path))


@pytest.mark.parametrize("value", [0, 255])
def test_a_photograph_of_one_flat_colour_is_rejected(shipped: Segmenter, tmp_path: Path,
                                                     value: int):
    # a failed capture: standardized, it is all zeros, and came back as 76 % vessel
    path = tmp_path / "in" / "blank.png"
    write_image_atomic(path, np.full((200, 240, 3), value, np.uint8))
    with pytest.raises(DatasetError, match=rf"blank\.png is one flat colour \(RGB {value}, "
                                           rf"{value}, {value}\): there is nothing to segment"):
        shipped.segment(read_image(path), source=path)
    image = np.full((200, 240, 3), value, np.uint8)
    image[100, 120] = 128  # one pixel is enough to try
    assert shipped.segment(image)[1].shape[:2] == (200, 240)  # (with its 0 % warning)


def test_estimated_fov_of_a_crop_warns_but_whole_photographs_do_not(shared_data: Path,
                                                                     tmp_path: Path, capsys):
    image = read_image(shared_data / "DRIVE" / "test" / "images" / "02_test.tif")
    write_image_atomic(tmp_path / "in" / "crop.png", image[200:400, 180:380])
    write_image_atomic(tmp_path / "in" / "whole.png", image)
    _predict(tmp_path / "in", tmp_path / "out")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "crop.png" in warnings[0] and "--fov" in warnings[0]


def test_a_folder_of_masks_and_outputs_only_says_so(tmp_path: Path):
    folder = tmp_path / "in"
    write_image_atomic(folder / "01_mask.gif", np.ones((128, 128), bool))
    with pytest.raises(DatasetError, match=r"1 end in '_mask'"):
        _predict(folder, tmp_path / "out")
    _fundus(folder / "a.png", 1)
    _predict(folder, folder)
    (folder / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"2 are retina_tf outputs"):
        _predict(folder, tmp_path / "out")


def test_arrays_of_another_kind_are_refused_with_the_conversion(shipped: Segmenter):
    """The library API: a float, 16-bit, gray, RGBA, batched or channels-first array is refused,
    saying how to convert."""
    image = generate_fundus(1, (128, 128)).image
    cases = {"floats to 0-255": image / 255.0, "16-bit": image.astype(np.uint16) * 257,
             "three channels": image[..., 1], "alpha": np.dstack([image, image[..., :1]]),
             r"a batch of one \(image\[0\]\)": image[None],
             "the 2 images one at a time": np.stack([image, image]),
             r"channels last \(np.moveaxis": np.moveaxis(image, -1, 0)}
    for hint, array in cases.items():
        with pytest.raises(DatasetError, match=rf"takes uint8 RGB \(H, W, 3\).*{hint}"):
            shipped.segment(array)
    # 12-bit data: scaled by its bit depth, not shifted by 8 bits (16 grey levels left)
    with pytest.raises(DatasetError, match=r"12-bit data in 16-bit words: np\.rint\(image \* "
                                           r"255 / 4095\)"):
        shipped.segment(np.rint(image * (4095 / 255)).astype(np.uint16))


def test_a_fov_mask_array_reads_as_its_file_and_a_wrong_size_is_named(shipped: Segmenter):
    """A FOV given as an array of any of the forms a mask file has (0/255, 4/252, JPEG noise,
    maybe three channels; 0/1 floats) gives what its bool gives, probabilities within [0, 1];
    one of another size, four channels or an empty one is refused."""
    image = generate_fundus(1, (128, 128)).image
    fov = estimate_fov(image)
    prob, mask = shipped.segment(image, fov=fov)
    u8 = fov.astype(np.uint8)
    noisy = np.clip(u8 * 255 + rng_noise(fov.shape), 0, 255).astype(np.uint8)  # a JPEG's
    for given in (u8 * 255, np.dstack([u8 * 255] * 3), u8 * 248 + 4, noisy,  # 4/252: DRIVE GIFs
                  u8.astype(np.float32), u8 * 0.8 + 0.1):
        prob255, mask255 = shipped.segment(image, fov=given)
        np.testing.assert_array_equal(prob255, prob)
        np.testing.assert_array_equal(mask255, mask)
    assert prob.max() <= 1.0 and 0 < mask.mean() < 0.5
    with pytest.raises(DatasetError, match=r"is 128 x 100 pixels, the image 128 x 128"):
        shipped.segment(image, fov=fov[:100], source="a.png")
    with pytest.raises(DatasetError, match=r"mask given for a.png has four channels: give one"):
        shipped.segment(image, fov=np.dstack([u8 * 255] * 3 + [u8 * 0 + 255]), source="a.png")
    with pytest.raises(DatasetError, match=r"a.png: the FOV mask is empty"):
        shipped.segment(image, fov=u8 * 0, source="a.png")


def test_a_pil_image_a_tensor_or_a_file_segments_as_its_array(shipped: Segmenter,
                                                                tmp_path: Path, caplog):
    import tensorflow as tf
    path = _fundus(tmp_path / "a.png", 2)
    prob, _ = shipped.segment(read_image(path))
    with Image.open(path) as pil:
        np.testing.assert_array_equal(shipped.segment(pil)[0], prob)
    np.testing.assert_array_equal(shipped.segment(tf.constant(read_image(path)))[0], prob)
    for given in (path, str(path)):  # a file, read as predict reads it
        np.testing.assert_array_equal(shipped.segment(given)[0], prob)
    half = np.zeros((128, 128), bool)
    half[:, :64] = True
    write_image_atomic(tmp_path / "a_mask.png", half)
    np.testing.assert_array_equal(shipped.segment(path, fov=tmp_path / "a_mask.png")[0],
                                  shipped.segment(read_image(path), fov=half)[0])
    with pytest.raises(DatasetError, match="b.png does not exist"):
        shipped.segment(tmp_path / "b.png")
    Image.fromarray(read_image(path)).save(tmp_path / "pair.tif", save_all=True,
                                           append_images=[Image.open(path)])
    with pytest.raises(DatasetError, match=r"pair.tif holds 2 pictures .*read_image\(path, "
                                           r"picture\)"):
        shipped.segment(tmp_path / "pair.tif")
    write_image_atomic(tmp_path / "bgr.png", np.ascontiguousarray(read_image(path)[..., ::-1]))
    caplog.clear()
    shipped.segment(tmp_path / "bgr.png")  # its warnings name the file
    assert f"{tmp_path / 'bgr.png'}: its blue channel is brighter than its red" in caplog.text


def test_segmenter_options_are_checked_as_the_flags_are():
    with pytest.raises(ConfigError, match="tta='False': give True or False"):
        Segmenter.from_pretrained("unet_drive", tta="False")  # bool("False") is True
    with pytest.raises(ConfigError, match="batch_size=0.*must be at least 1"):
        Segmenter.from_pretrained("unet_drive", inference="sliding", batch_size=0)
    window = Segmenter.from_pretrained("unet_drive", inference="sliding", window=0).window
    assert window == Segmenter.from_pretrained("unet_drive").run_info["patch_size"]


def rng_noise(shape) -> np.ndarray:
    return np.random.default_rng(0).integers(-20, 21, shape)


def test_threshold_outside_zero_one_is_a_config_error(shipped: Segmenter):
    image = generate_fundus(1, (128, 128)).image
    for threshold in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="threshold"):
            shipped.segment(image, threshold=threshold)


# ------------------------------------------------------------ 7: damaged model and run folder

def test_truncated_or_foreign_model_file_is_named_corrupt(tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(SHIPPED, run)
    data = (SHIPPED / "model.keras").read_bytes()
    (run / "model.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"model\.keras is corrupt or not a Keras model"):
        Segmenter.from_run(run)
    (run / "model.keras").write_text("not a model")
    with pytest.raises(ModelFileError, match="is corrupt or not a Keras model file"):
        load_keras_model(run / "model.keras")
    # a zip archive that is not a Keras model
    shutil.make_archive(str(tmp_path / "other"), "zip", SHIPPED, "run.json")
    with pytest.raises(ModelFileError, match="is corrupt or not a Keras model file"):
        load_keras_model(tmp_path / "other.zip")


def test_run_folder_names_the_files_it_lacks(tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(SHIPPED, run)
    (run / "run.json").unlink()
    (run / "preprocessor.json").unlink()
    with pytest.raises(ModelFileError, match=r"lacks run\.json, preprocessor\.json"):
        Segmenter.from_run(run)
    (run / "model.keras").unlink()
    with pytest.raises(ModelFileError, match=r"lacks model\.keras, run\.json"):
        Segmenter.from_run(run)


def test_a_damaged_preprocessor_json_is_named(tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(SHIPPED, run)
    (run / "preprocessor.json").write_text("[1, 2]")  # JSON, but not a recipe
    with pytest.raises(ModelFileError, match=rf"^{run / 'preprocessor.json'}: .*; the run folder "
                                             "is damaged"):
        Segmenter.from_run(run)


# ------------------------------------------------------------------ 8: no empty output folder

def test_early_failures_leave_no_output_folder(tmp_path: Path):
    bad = tmp_path / "in" / "bad.png"
    bad.parent.mkdir()
    bad.write_text("not an image")
    with pytest.raises(DatasetError, match=r"bad\.png"):
        _predict(bad, tmp_path / "out")
    with pytest.raises(DatasetError):
        evaluate(parse_config("evaluate", ["--model=unet_drive", "--dataset=synthetic",
                              f"--data_dir={tmp_path / 'nowhere'}",
                              f"--output_dir={tmp_path / 'eval'}"]))
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval").exists()


def test_a_label_file_in_utf16_reads_and_other_encodings_or_empty_labels_are_named(tmp_path):
    """Excel's "Unicode Text" (UTF-16) gave a bare codec error naming no file, and a line with
    no label name passed preprocess and failed at training, after every image was read."""
    from retina_tf.data.labelfile import read_label_file
    _fundus(tmp_path / "photos" / "øje 1.png", 1)
    _fundus(tmp_path / "labels" / "øje 1.png", 2)
    text = "photos,labels,\r\nøje 1.png,øje 1.png,\r\n"
    utf16, latin1 = tmp_path / "utf16.txt", tmp_path / "latin1.txt"
    utf16.write_bytes(text.encode("utf-16"))  # with its byte-order mark
    latin1.write_bytes(text.encode("latin-1"))
    [sample] = read_label_file(utf16)
    assert sample.name == "øje 1" and sample.label == tmp_path / "labels" / "øje 1.png"
    with pytest.raises(DatasetError, match=f"{latin1}: not UTF-8 text .*save it as UTF-8"):
        read_label_file(latin1)
    empty = tmp_path / "empty.txt"
    empty.write_text("photos,labels,\nøje 1.png,,\n")
    with pytest.raises(DatasetError, match=f"{empty}:2: the label name is empty"):
        read_label_file(empty)


def test_nothing_writes_into_the_shipped_models_folder(tmp_path):
    """An explicit --output_dir or --logdir inside retina_tf/pretrained wrote predictions into
    a shipped model's folder, or replaced the shipped unet_drive with a training's run."""
    from retina_tf.config import TrainConfig
    from retina_tf.training import train
    before = sorted(p.relative_to(PRETRAINED_DIR) for p in PRETRAINED_DIR.rglob("*"))
    photo = _fundus(tmp_path / "a.png", 1)
    with pytest.raises(ConfigError, match=r"--output_dir: .*unet_drive is inside retina_tf's "
                                          r"shipped models"):
        _predict(photo, PRETRAINED_DIR / "unet_drive")
    with pytest.raises(ConfigError, match="--logdir, --run_name: .* is inside retina_tf's"):
        train(TrainConfig(logdir=str(PRETRAINED_DIR), run_name="unet_drive", overwrite=True,
                          dataset="synthetic", data_dir=str(tmp_path)))
    assert sorted(p.relative_to(PRETRAINED_DIR) for p in PRETRAINED_DIR.rglob("*")) == before


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_labels_drawn_on_a_transparent_layer_or_in_two_colours_read_as_drawn(tmp_path, fmt):
    """docs/data.md's rules held for PNG only: black strokes on a transparent GIF layer were
    refused as inverted, red ones as vessel everywhere; red and blue vessels as not binary."""
    from retina_tf.data.io import read_mask
    vessel = np.zeros((40, 50), bool)
    vessel[10:14, 5:45] = True
    vessel[20:36, 30:33] = True
    for palette in ([255, 255, 255, 0, 0, 0], [255, 255, 255, 255, 0, 0]):  # black, red
        path = tmp_path / f"layer{palette[3]}.{fmt.lower()}"
        layer = Image.fromarray(vessel.astype(np.uint8), "P")
        layer.putpalette(palette + [0] * (768 - len(palette)))
        layer.save(path, format=fmt, transparency=0)  # white, the background, transparent
        assert np.array_equal(read_mask(path), vessel), path
    colours = np.zeros((40, 50, 3), np.uint8)
    colours[10:14, 5:45] = (200, 0, 0)  # arteries and veins drawn apart: all vessel
    colours[20:36, 30:33] = (0, 0, 150)
    path = tmp_path / f"colours.{fmt.lower()}"
    Image.fromarray(colours).save(path, format=fmt)
    assert np.array_equal(read_mask(path), vessel)
    ramp = colours.copy()  # soft edges: many levels, refused as ever
    ramp[15:20, 5:45] = np.arange(1, 41, dtype=np.uint8)[None, :, None] * (5, 0, 0)
    Image.fromarray(ramp).save(path, format=fmt)
    with pytest.raises(DatasetError, match="not binary"):
        read_mask(path)


def test_a_photograph_whose_output_name_is_too_long_is_skipped_and_the_rest_written(tmp_path):
    """It stopped the folder run at that photograph, and every rerun at the same place."""
    _fundus(tmp_path / "in" / "a.png", 1)
    _, png = cv2.imencode(".png", generate_fundus(2, (128, 128)).image)
    (tmp_path / "in" / ("s" * 248 + ".png")).write_bytes(png.tobytes())  # _prob.png: 257
    with pytest.raises(RetinaTFError, match="1 of 2 images failed"):
        _predict(tmp_path / "in", tmp_path / "out")
    assert (tmp_path / "out" / "a_mask.png").is_file()
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = {Path(r["input"]).name: r for r in csv.DictReader(f)}
    assert rows["a.png"]["error"] == ""
    assert rows["s" * 248 + ".png"]["error"].endswith(
        f"its output name {'s' * 248}_prob.png is too long for the file system: give the "
        "photograph a shorter name")
