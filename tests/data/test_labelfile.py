"""Seed-style label files: round trip, estimated FOV masks, bad input, and the CLI."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from retina_tf.data.catalog import list_samples
from retina_tf.data.fov import estimate_fov
from retina_tf.data.io import DatasetError, read_mask, read_sample, write_image_atomic
from retina_tf.data.labelfile import export_label_files, read_label_file, write_label_file
from retina_tf.data.synthetic import write_synthetic_dataset
from tests import commands

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_images=4, seed=1,
                                   size=(96, 96))


def test_written_file_has_the_seed_layout_and_reads_back(synthetic_dir, tmp_path):
    samples = list_samples("synthetic", synthetic_dir, "training")
    path = write_label_file(tmp_path / "training.txt", samples)
    lines = path.read_text().splitlines()
    assert [Path(p).name for p in lines[0].split(",")] == ["images", "1st_manual", "mask"]
    assert lines[1] == f"{samples[0].image.name},{samples[0].label.name},{samples[0].fov.name}"
    back = read_label_file(path)
    assert [s.image.resolve() for s in back] == [s.image.resolve() for s in samples]
    assert [s.name for s in back] == [s.name for s in samples]
    a, b = read_sample(back[0]), read_sample(samples[0])
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.vessel, b.vessel)
    np.testing.assert_array_equal(a.fov, b.fov)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_hand_written_file_without_masks_gets_estimated_fovs(synthetic_dir, tmp_path):
    # a user's own photographs: two folders side by side, the mask column left empty
    train = synthetic_dir / "training"
    names = sorted(p.name for p in (train / "images").iterdir())[:2]
    labels = [f"{n.split('_')[0]}_manual1.gif" for n in names]
    path = tmp_path / "mine.txt"
    path.write_text(f"{train / 'images'},{train / '1st_manual'},\n"
                    + "".join(f"{n},{lab},\n" for n, lab in zip(names, labels)))
    samples = read_label_file(path)
    assert [s.fov for s in samples] == [None, None]
    data = read_sample(samples[0])
    np.testing.assert_array_equal(data.fov, estimate_fov(data.image))
    np.testing.assert_array_equal(data.vessel, read_mask(train / "1st_manual" / labels[0]))


def test_export_estimates_missing_fov_masks(shared_data, tmp_path, caplog):
    files = export_label_files("stare", shared_data / "STARE", tmp_path)
    train = read_label_file(files["training"])
    assert len(train) == 10 and len(read_label_file(files["test"])) == 10
    assert all(s.fov.parent == tmp_path / "fov" for s in train)
    fov = read_mask(train[0].fov, what="fov")
    assert fov.shape == (605, 700) and 0.5 < fov.mean() < 0.95
    # and predict --fov takes that folder (its names: <stem>_fov.png)
    from retina_tf.evaluation import find_fov_mask
    assert find_fov_mask(train[3].image, sorted((tmp_path / "fov").iterdir())) == train[3].fov
    # exported again after a photograph changed (here: its mask no longer its estimate): that
    # mask is written anew and said, the others are kept as they are
    write_image_atomic(train[0].fov, np.zeros((605, 700), np.uint8))
    kept = train[1].fov.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="retina_tf"):
        export_label_files("stare", shared_data / "STARE", tmp_path)
    np.testing.assert_array_equal(read_mask(train[0].fov, what="fov"), fov)
    assert f"{train[0].fov}: written again; it no longer matches " \
        f"{(shared_data / 'STARE/stare-images/im0001.ppm.gz')}" in caplog.text
    assert train[1].fov.stat().st_mtime_ns == kept


def test_export_writes_hrf_avs_vessel_labels_from_its_av_maps(shared_data, tmp_path):
    files = export_label_files("hrf_av", shared_data / "samples" / "HRF-AV", tmp_path,
                               splits=("training",))
    listed = read_label_file(files["training"])
    official = list_samples("hrf_av", shared_data / "samples" / "HRF-AV", "training")
    assert [s.name for s in listed] == [s.name for s in official] and listed
    for mine, theirs in zip(listed, official):
        assert mine.label == tmp_path / "vessel" / f"{mine.name}_vessel.png"
        np.testing.assert_array_equal(read_sample(mine).vessel, read_sample(theirs).vessel)


def test_bad_label_files_name_the_file_and_line(tmp_path, synthetic_dir):
    missing = tmp_path / "nothere.txt"
    with pytest.raises(DatasetError, match="nothere.txt"):
        read_label_file(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty"):
        read_label_file(empty)
    only_header = tmp_path / "header.txt"
    only_header.write_text("a,b,c\n")
    with pytest.raises(DatasetError, match="no samples"):
        read_label_file(only_header)
    train = synthetic_dir / "training"
    wrong = tmp_path / "wrong.txt"
    wrong.write_text(f"{train}/images,{train}/1st_manual,{train}/mask\nx.tif,y.gif\n")
    with pytest.raises(DatasetError, match=r"wrong.txt:2: expected 'image,label,mask'"):
        read_label_file(wrong)
    gone = tmp_path / "gone.txt"
    gone.write_text(f"{train}/images,{train}/1st_manual,{train}/mask\n"
                    "99_training.tif,99_manual1.gif,99_training_mask.gif\n")
    with pytest.raises(DatasetError, match="99_training.tif"):
        read_label_file(gone)


def test_a_byte_order_mark_is_read_past_and_a_name_listed_twice_is_refused(synthetic_dir,
                                                                           tmp_path):
    samples = list_samples("synthetic", synthetic_dir, "training")
    path = write_label_file(tmp_path / "training.txt", samples)
    text = path.read_text()
    bom = tmp_path / "bom.txt"  # Excel's "CSV UTF-8"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [s.name for s in read_label_file(bom)] == [s.name for s in samples]
    lines = text.splitlines()
    twice = tmp_path / "twice.txt"
    twice.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(DatasetError, match=rf"twice.txt:{len(lines) + 1}: .* of line 2"):
        read_label_file(twice)


def test_preprocess_cli_writes_label_files_and_previews(synthetic_dir, tmp_path):
    out = tmp_path / "prep"
    cache = tmp_path / "cache"
    # what killed earlier runs left in each folder is cleared
    left = [commands.killed_while_writing(folder / name) for folder, name in (
        (out, "training.txt"), (out / "fov", "a_fov.png"), (out / "preview", "a.png"),
        (cache, "a.npy"))]
    proc = commands.script("preprocess.py", "--dataset=synthetic", f"--data_dir={synthetic_dir}",
                           f"--out_dir={out}", f"--cache_dir={cache}", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(path.exists() for path in left)
    assert "training:" in proc.stdout and "test:" in proc.stdout
    assert len(read_label_file(out / "training.txt")) == 2
    assert len(read_label_file(out / "test.txt")) == 2
    assert (out / "preprocessor.json").is_file()
    assert len(list((out / "preview").glob("*.png"))) == 2
    assert len(list(cache.glob("*.npy"))) == 4


def test_preprocess_cli_reads_every_label_and_names_a_bad_one(synthetic_dir, tmp_path):
    data = tmp_path / "syn"
    shutil.copytree(synthetic_dir, data)
    label = next((data / "test" / "1st_manual").glob("*.gif"))
    write_image_atomic(label, np.zeros((10, 10), bool))  # of another size than its photograph
    proc = commands.script("preprocess.py", "--dataset=synthetic", f"--data_dir={data}",
                           f"--out_dir={tmp_path / 'prep'}", "--previews=0", timeout=120)
    assert proc.returncode == 1 and f"1st_manual/{label.name} is 10x10" in proc.stderr, \
        proc.stderr[-2000:]


def test_preprocess_cli_checks_your_own_label_files_and_lists_every_bad_one(synthetic_dir,
                                                                            tmp_path):
    """docs/data.md: preprocess reads a hand-written label file's every file (it asked for
    --data_dir); all bad ones listed, not the first a training meets."""
    train = synthetic_dir / "training"
    names = sorted(p.name for p in (train / "images").iterdir())
    labels = tmp_path / "labels"
    shutil.copytree(train / "1st_manual", labels)
    gifs = sorted(labels.iterdir())
    write_image_atomic(gifs[0], np.zeros((10, 10), bool))  # another size than its photograph
    write_image_atomic(gifs[1], ~read_mask(train / "1st_manual" / gifs[1].name))  # inverted
    lines = "".join(f"{n},{g.name},\n" for n, g in zip(names, gifs))
    (tmp_path / "training.txt").write_text(f"{train / 'images'},{labels},\n{lines}")
    (tmp_path / "test.txt").write_text(f"{train / 'images'},{train / '1st_manual'},\n{lines}")
    proc = commands.script("preprocess.py", f"--label_file_path={tmp_path / 'training.txt'}",
                           timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{gifs[0].name} is 10x10" in proc.stderr and f"{gifs[1].name}: marks" in proc.stderr
    assert f"2 of the {2 * len(names)} photographs have a bad image, label or mask" \
        in proc.stderr
    (tmp_path / "training.txt").write_text((tmp_path / "test.txt").read_text())
    before = sorted(tmp_path.iterdir())
    proc = commands.script("preprocess.py", f"--label_file_path={tmp_path / 'training.txt'}",
                           timeout=120)
    assert proc.returncode == 0 and "every file is readable" in proc.stdout, proc.stderr[-2000:]
    assert sorted(tmp_path.iterdir()) == before  # a check writes nothing
    # artery/vein labels cannot come in so: said here, not first by train.py (it passed)
    proc = commands.script("preprocess.py", f"--label_file_path={tmp_path / 'training.txt'}",
                           "--task=av", timeout=120)
    assert proc.returncode != 0 and "--task=av: label files carry vessel labels only" \
        in proc.stderr, proc.stderr[-2000:]
    proc = commands.script("preprocess.py", f"--label_file_path={tmp_path / 'training.txt'}",
                           f"--out_dir={tmp_path / 'out'}", "--previews=1", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == sorted([
        "preprocessor.json", "preview", f"{Path(names[0]).stem}.png"])


def test_preprocess_cli_reports_a_wrong_folder(tmp_path):
    proc = commands.script("preprocess.py", "--dataset=drive", f"--data_dir={tmp_path}",
                           f"--out_dir={tmp_path / 'out'}", timeout=120)
    assert proc.returncode != 0
    assert str(tmp_path) in proc.stderr and "training" in proc.stderr
    assert not (tmp_path / "out" / "training.txt").exists()
    (tmp_path / "afile").write_text("")  # it said "cannot write afile/training.txt: File exists"
    proc = commands.script("preprocess.py", "--dataset=drive", f"--data_dir={tmp_path}",
                           f"--out_dir={tmp_path / 'afile'}", timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().endswith(
        f"--out_dir={tmp_path / 'afile'} is a file, not a folder: give a folder"), proc.stderr


def test_an_empty_split_stops_before_any_label_file_is_written(tmp_path):
    data = write_synthetic_dataset(tmp_path / "syn", num_images=2, num_test=0, seed=2,
                                   size=(64, 64))
    with pytest.raises(DatasetError, match="test"):
        export_label_files("synthetic", data, tmp_path / "labels")
    assert not (tmp_path / "labels").exists()


def test_a_comma_in_a_folder_name_is_refused_before_a_label_file_is_written(tmp_path,
                                                                            synthetic_dir):
    """The label file was written, then read back as a wrong one ("expected
    'image_dir,label_dir,mask_dir'") and removed, naming the tool's own file."""
    data = tmp_path / "a,b"
    shutil.copytree(synthetic_dir, data)
    with pytest.raises(DatasetError, match=r"training.txt: a label file cannot name '.*a,b/"
                                           r"training/images', which has a comma in it: "
                                           "rename that file or folder"):
        export_label_files("synthetic", data, tmp_path / "labels")
    assert not (tmp_path / "labels" / "training.txt").exists()



def test_a_killed_export_never_leaves_one_datasets_test_file_beside_anothers_training_file(
        tmp_path, synthetic_dir, monkeypatch):
    """Killed between its two label files, preprocess left the new training.txt beside the
    test.txt of the dataset exported there before, and evaluate scored that one."""
    from retina_tf.data import labelfile
    other = write_synthetic_dataset(tmp_path / "other", num_images=2, num_test=1, seed=9,
                                    size=(64, 64))
    out = tmp_path / "labels"
    export_label_files("synthetic", other, out)
    write = labelfile.write_label_file

    def killed_at_test(path, *args):
        if Path(path).name == "test.txt":
            raise KeyboardInterrupt  # where a kill stopped it
        return write(path, *args)

    monkeypatch.setattr(labelfile, "write_label_file", killed_at_test)
    with pytest.raises(KeyboardInterrupt):
        export_label_files("synthetic", synthetic_dir, out)
    assert not (out / "test.txt").exists()
    listed = read_label_file(out / "training.txt")  # the new dataset's
    assert {s.image.parent.resolve() for s in listed} == {
        (synthetic_dir / "training" / "images").resolve()}
