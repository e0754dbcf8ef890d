"""Tests for retina_tf.data.rip: RIP-AV's normalized distance targets and representative-instance
patches, on hand-made bars, small synthetic fundi, a real RITE label and the CLI."""

import csv
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from absl import flags
from scipy import ndimage
from skimage.morphology import skeletonize

from retina_tf.config import RipPatchConfig
from retina_tf.data.io import DatasetError, read_image
from retina_tf.data.rip import (
    RIP_LABELS,
    RipPatch,
    cut_patches,
    distance_targets,
    normalized_distance,
    rip_labels,
    select_rip_patches,
    write_rip_patches,
)
from retina_tf.data.synthetic import generate_fundus, write_synthetic_dataset
from retina_tf.errors import ConfigError
from retina_tf.flags import parse_config
from tests import commands

REPO = Path(__file__).resolve().parents[2]


def _av(fundus) -> np.ndarray:
    return np.stack([fundus.artery, fundus.vein, fundus.vessel], axis=-1)


@pytest.fixture(scope="module")
def fundi():
    """Two 128x128 synthetic fundi: (targets, fovs, names)."""
    made = [generate_fundus(seed, (128, 128)) for seed in (3, 4)]
    return [_av(f) for f in made], [f.fov for f in made], ["a", "b"]


# --- distance targets -----------------------------------------------------------------------

def test_bar_profiles_peak_at_one_whatever_the_width():
    mask = np.zeros((30, 40), bool)
    mask[2:7, :] = True      # 5 px wide: edge distances 1, 2, 3
    mask[10:14, :] = True    # 4 px wide: 1, 2, 2, 1
    mask[18:27, :] = True    # 9 px wide
    out = normalized_distance(mask)
    col = out[:, 20]
    np.testing.assert_allclose(col[2:7], [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(col[10:14], [0.5, 1, 1, 0.5], rtol=1e-6)
    np.testing.assert_allclose(col[18:27], np.array([1, 2, 3, 4, 5, 4, 3, 2, 1]) / 5, rtol=1e-6)
    assert col[7:10].max() == 0 and col[14:18].max() == 0


def test_distance_targets_channels_are_independent():
    av = np.zeros((20, 20, 3), bool)
    av[5:10, :, 0] = True     # artery: a 5-px horizontal bar
    av[:, 8:11, 1] = True     # vein: a 3-px vertical bar crossing it
    av[..., 2] = av[..., 0] | av[..., 1]
    out = distance_targets(av)
    assert out.shape == (20, 20, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[5:10, 2, 0], [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(out[15, 8:11, 1], [0.5, 1, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(out[..., 0], normalized_distance(av[..., 0]))
    with pytest.raises(ValueError, match="HxWx3"):
        distance_targets(av[..., :2])


def _check_distance_maps(av: np.ndarray, out: np.ndarray) -> None:
    assert out.shape == av.shape and out.dtype == np.float32
    for c in range(3):
        mask, dist = av[..., c], out[..., c]
        assert (dist[~mask] == 0).all()
        assert mask.any() and dist[mask].min() > 0 and dist[mask].max() <= 1
        assert (dist[skeletonize(mask)] == 1).all()


def test_distance_targets_on_a_synthetic_fundus(fundi):
    av = fundi[0][0]
    _check_distance_maps(av, distance_targets(av))


def test_distance_targets_on_a_real_rite_label(shared_data):
    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample

    data = read_sample(list_samples("rite", shared_data / "RITE", "training")[0])
    started = time.perf_counter()
    out = distance_targets(data.av)
    # A per-pixel Python loop would take minutes here; the vectorised maps take ~0.1 s.
    assert time.perf_counter() - started < 5.0
    _check_distance_maps(data.av, out)
    # The maps peak on centrelines: a vessel pixel's value never exceeds its nearest
    # skeleton pixel's (which is 1), and is 1 off the skeleton only on vessels a few px wide.
    vessel = out[..., 2]
    interior = ndimage.binary_erosion(data.av[..., 2], iterations=2)
    assert vessel[interior].mean() > vessel[data.av[..., 2] & ~interior].mean()


# --- patch selection --------------------------------------------------------------------------

def _fraction(mask: np.ndarray, record: RipPatch) -> float:
    """Class share of the zero-padded window, by plain slicing (independent of rip.py)."""
    pad = record.size
    padded = np.pad(mask, pad)
    top, left = record.row - record.size // 2 + pad, record.col - record.size // 2 + pad
    return padded[top:top + record.size, left:left + record.size].sum() / record.size ** 2


def test_patches_are_centred_on_skeleton_points_with_the_promised_content(fundi):
    targets, fovs, names = fundi
    sizes = (16, 48, 144)  # 144 > 128: every such patch reaches over the border
    records = select_rip_patches(targets, fovs, names, sizes=sizes, per_class=15,
                                 min_fraction=0.02, seed=0)
    assert records and {r.size for r in records} <= set(sizes)
    centres = [skeletonize(t[..., 2]) & f for t, f in zip(targets, fovs)]
    for r in records:
        assert names[r.image_index] == r.name
        assert centres[r.image_index][r.row, r.col]
        a = _fraction(targets[r.image_index][..., 0], r)
        v = _fraction(targets[r.image_index][..., 1], r)
        assert r.artery_fraction == pytest.approx(a) and r.vein_fraction == pytest.approx(v)
        assert r.label == {(True, False): "artery", (False, True): "vein",
                           (True, True): "both"}[(a >= 0.02, v >= 0.02)]
    labels = rip_labels(records)
    assert labels.shape == (len(records), 2) and labels.dtype == np.float32
    expected = {"artery": [1, 0], "vein": [0, 1], "both": [1, 1]}
    np.testing.assert_array_equal(labels, [expected[r.label] for r in records])
    assert rip_labels([]).shape == (0, 2)


def test_per_class_caps_each_label_and_size_and_draws_from_all_candidates(fundi):
    targets, fovs, names = fundi
    sizes = (24, 64)
    every = select_rip_patches(targets, fovs, names, sizes=sizes, per_class=10 ** 9)
    few = select_rip_patches(targets, fovs, names, sizes=sizes, per_class=7, seed=5)
    # per_class above the candidate count returns every candidate: one per skeleton centre
    # and size that holds some class.
    n_centres = sum((skeletonize(t[..., 2]) & f).sum() for t, f in zip(targets, fovs))
    for size in sizes:
        assert sum(r.size == size for r in every) <= n_centres
    key = lambda r: (r.image_index, r.row, r.col, r.size, r.label)  # noqa: E731
    assert {key(r) for r in few} <= {key(r) for r in every}
    for label in RIP_LABELS:
        for size in sizes:
            available = sum(r.label == label and r.size == size for r in every)
            assert sum(r.label == label and r.size == size for r in few) == min(7, available)
    assert [r.label for r in few] == sorted((r.label for r in few), key=RIP_LABELS.index)


def test_selection_is_deterministic_for_a_seed_and_changes_with_it(fundi):
    targets, fovs, names = fundi
    run = lambda seed: select_rip_patches(targets, fovs, names, sizes=(32,),  # noqa: E731
                                          per_class=5, seed=seed)
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_absent_fraction_zero_keeps_single_class_patches_pure(fundi):
    targets, fovs, names = fundi
    loose = select_rip_patches(targets, fovs, names, sizes=(48,), per_class=10 ** 9)
    strict = select_rip_patches(targets, fovs, names, sizes=(48,), per_class=10 ** 9,
                                absent_fraction=0.0)
    assert any(r.label == "artery" and r.vein_fraction > 0 for r in loose)
    for r in strict:
        if r.label == "artery":
            assert r.vein_fraction == 0 and r.artery_fraction >= 0.02
        if r.label == "vein":
            assert r.artery_fraction == 0 and r.vein_fraction >= 0.02
    assert [r for r in loose if r.label == "both"] == [r for r in strict if r.label == "both"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=()), "sizes"), (dict(sizes=(32, 32)), "sizes"), (dict(sizes=(0,)), "sizes"),
    (dict(per_class=0), "per_class"), (dict(min_fraction=0.0), "min_fraction"),
    (dict(min_fraction=0.02, absent_fraction=0.02), "absent_fraction"),
])
def test_selection_rejects_bad_arguments(fundi, kwargs, match):
    targets, fovs, names = fundi
    with pytest.raises(ValueError, match=match):
        select_rip_patches(targets, fovs, names, **kwargs)
    with pytest.raises(ValueError, match="one of each"):
        select_rip_patches(targets, fovs[:1], names)


# --- cutting ------------------------------------------------------------------------------------

def _record(image_index, row, col, size, label="artery"):
    return RipPatch(image_index, "x", row, col, size, 0.1, 0.0, label)


def test_cut_patches_shapes_ranges_and_border_padding():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (60, 70, 3), dtype=np.uint8)  # no zeros: padding shows
    gray = rng.random((60, 70)).astype(np.float32)
    records = [_record(0, 30, 35, 16), _record(0, 30, 35, 40), _record(0, 0, 0, 10),
               _record(0, 59, 69, 64)]
    out = cut_patches([image], records, 16)
    assert out.shape == (4, 16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], image[22:38, 27:43])  # same size: an exact copy
    # Enlarged 10 -> 16 with the top-left quarter outside the image: zeros there.
    assert out[2, :6, :6].max() == 0 and out[2, 10:, 10:].min() > 0
    # Shrunk 64 -> 16 around the bottom-right corner: the image is only the top-left part.
    assert out[3, 10:, 10:].max() == 0 and out[3, :6, :6].min() > 0
    floats = cut_patches({0: gray}, records, 24)
    assert floats.shape == (4, 24, 24, 1) and floats.dtype == np.float32
    assert floats.min() >= 0 and floats.max() <= 1
    assert cut_patches([image], [], 16).shape == (0, 16, 16, 3)
    with pytest.raises(ValueError, match="out_size"):
        cut_patches([image], records, 0)


def test_cut_patches_of_selected_records_show_a_vessel_at_the_centre(fundi):
    targets, fovs, names = fundi
    records = select_rip_patches(targets, fovs, names, sizes=(20, 40), per_class=5)
    vessel = [t[..., 2].astype(np.uint8) for t in targets]
    cut = cut_patches(vessel, [r for r in records if r.size == 20], 20,
                      interpolation=cv2.INTER_NEAREST)
    assert (cut[:, 10, 10, 0] == 1).all()  # centre at size // 2: a skeleton (vessel) pixel


# --- the CLI ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_av_dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", num_images=3,
                                   num_test=1, seed=7, size=(96, 96))


def test_cli_writes_consistent_csv_npz_and_preview(tiny_av_dataset, tmp_path):
    out = tmp_path / "rip"
    commands.killed_while_writing(out / "patches.npz")  # an earlier run's: cleared
    proc = commands.script(
        "generate_rip_patches.py", "--dataset=synthetic",
         f"--data_dir={tiny_av_dataset}", f"--rip_patches={out}", "--rip_sizes=24,48",
         "--rip_out_size=32", "--rip_per_class=6", "--seed=1", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["patches.csv", "patches.npz", "preview.png"]
    with open(out / "patches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    npz = np.load(out / "patches.npz")
    n = len(rows)
    assert n > 0 and npz["images"].shape == (n, 32, 32, 3) and npz["images"].dtype == np.uint8
    assert npz["labels"].shape == (n, 2) and len(npz["names"]) == n == len(npz["sizes"])
    assert {row["image"] for row in rows} <= {"02_training", "03_training"}  # never test
    assert [row["label"] for row in rows] == npz["label"].tolist()
    assert [int(row["size"]) for row in rows] == npz["sizes"].tolist()
    expected = {"artery": [1, 0], "vein": [0, 1], "both": [1, 1]}
    np.testing.assert_array_equal(npz["labels"], [expected[row["label"]] for row in rows])
    assert read_image(out / "preview.png").ndim == 3
    for label in RIP_LABELS:
        assert label in proc.stdout
    assert f"{n} patches" in proc.stdout


def _cfg(*args: str) -> RipPatchConfig:
    return parse_config("generate_rip_patches", list(args))


def test_a_regeneration_interrupted_leaves_the_old_set_whole(tiny_av_dataset, tmp_path,
                                                             monkeypatch):
    common = ["--dataset=synthetic", f"--data_dir={tiny_av_dataset}", f"--rip_patches={tmp_path}",
              "--rip_sizes=24,48", "--rip_out_size=32", "--rip_per_class=6"]
    write_rip_patches(_cfg(*common, "--seed=1"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def ctrl_c(*args, **kwargs):  # while the new set's preview is drawn
        raise KeyboardInterrupt

    monkeypatch.setattr("retina_tf.data.rip.preview_grid", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_rip_patches(_cfg(*common, "--seed=2"))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_cli_fails_clearly_without_av_labels(tiny_av_dataset, tmp_path):
    # The synthetic set is also a valid DRIVE layout, and DRIVE has no A/V labels.
    cfg = _cfg("--dataset=drive", f"--data_dir={tiny_av_dataset}", f"--rip_patches={tmp_path}")
    with pytest.raises(DatasetError, match="no artery/vein labels") as err:
        write_rip_patches(cfg)
    assert str(tiny_av_dataset) in str(err.value)
    cfg = _cfg("--label_file_path=x.txt", f"--rip_patches={tmp_path}")
    with pytest.raises(ConfigError, match="--label_file_path"):
        write_rip_patches(cfg)
    assert not list(tmp_path.iterdir())


def test_cli_fails_clearly_on_an_empty_selection_or_bad_flags(tiny_av_dataset, tmp_path):
    common = ["--dataset=synthetic", f"--data_dir={tiny_av_dataset}", f"--rip_patches={tmp_path}"]
    with pytest.raises(DatasetError, match="--rip_min_fraction"):
        write_rip_patches(_cfg(*common, "--rip_min_fraction=1.0"))
    with pytest.raises(flags.IllegalFlagValueError, match="--rip_sizes"):
        _cfg(*common, "--rip_sizes=48,x")
    with pytest.raises(flags.IllegalFlagValueError):
        _cfg("--dataset=nowhere")
    with pytest.raises(ValueError, match="--rip_patches"):
        write_rip_patches(_cfg(*common[:2]))
    assert not list(tmp_path.iterdir())
