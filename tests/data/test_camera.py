"""Camera changes, vessel-scale augmentation, balanced sources and training on several sets."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from scipy import ndimage

from retina_tf.data.camera import CameraChange, apply_camera_change, camera_variants
from retina_tf.data.pipeline import Augment, SegmentationSet, patch_dataset
from retina_tf.data.synthetic import generate_fundus, write_synthetic_dataset
from retina_tf.errors import ConfigError
from retina_tf.training import parse_extra_data


def _bars(shape=(200, 200), width=10):
    """Vertical bars ``width`` px wide every 40 px; the image equals the label."""
    label = np.zeros(shape, np.float32)
    for x in range(20, shape[1] - 20, 40):
        label[:, x:x + width] = 1.0
    fov = np.zeros(shape, bool)
    fov[60:-60, 60:-60] = True
    return SegmentationSet(["bars"], [label[..., None]], [label[..., None]], [fov])


def test_camera_changes_keep_geometry_and_are_reproducible():
    photo = generate_fundus(1, size=(160, 160)).image
    a = camera_variants(photo, 4, seed=7)
    b = camera_variants(photo, 4, seed=7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
        assert x.shape == photo.shape and x.dtype == np.uint8
    assert all(np.abs(x.astype(int) - photo).mean() > 1 for x in a)  # each one changed
    # no shift: a bright square stays where it was, only its colour and edges change
    square = np.zeros((120, 120, 3), np.uint8)
    square[40:70, 50:90] = (200, 120, 60)
    rng = np.random.default_rng(0)
    for _ in range(10):
        out = apply_camera_change(square, rng).astype(np.float32).sum(-1)
        bright = out > out.max() / 2
        ys, xs = np.nonzero(bright)
        assert abs(ys.mean() - 54.5) < 1 and abs(xs.mean() - 69.5) < 1


def test_each_camera_change_can_be_switched_off():
    photo = generate_fundus(2, size=(96, 96)).image
    off = CameraChange(white_balance=0, saturation=0, contrast=0, gamma=0, blur=0, noise=0,
                       jpeg_quality=95, illumination=0)
    out = apply_camera_change(photo, np.random.default_rng(0), off)
    assert np.abs(out.astype(int) - photo).max() <= 1  # rounding only


def test_channel_gamma_without_camera_copies_is_refused():
    from retina_tf.config import TrainConfig
    with pytest.raises(ConfigError, match="--camera_channel_gamma=0.9: .* give "
                                          "--camera_variants=N too"):
        TrainConfig(camera_channel_gamma=0.9)
    assert TrainConfig(camera_channel_gamma=0.9, camera_variants=1).camera_channel_gamma == 0.9


def test_channel_gamma_bends_each_colour_channel_on_its_own():
    photo = np.empty((8, 8, 3), np.uint8)
    photo[:] = (64, 128, 192)
    only = CameraChange(white_balance=0, saturation=0, contrast=0, gamma=0, blur=0, noise=0,
                        jpeg_quality=95, illumination=0, channel_gamma=0.9)
    rng = np.random.default_rng(3)
    outs = [apply_camera_change(photo, rng, only)[0, 0].astype(float) for _ in range(40)]
    bent = [o for o in outs if np.abs(o - photo[0, 0]).max() > 1]
    assert 10 <= len(bent) <= 30  # on about half the copies
    for o in bent:  # each channel v -> 255 (v / 255)^e, e within exp(-0.9)..exp(0.9)
        e = np.log((o + 0.5) / 255) / np.log(photo[0, 0] / 255)
        assert np.all((e > np.exp(-0.9) - 0.02) & (e < np.exp(0.9) + 0.05)), (o, e)
        assert np.ptp(e) > 0.05  # a curve per channel, not one for all


@pytest.mark.parametrize("aug", [Augment.none(), Augment(rotate_degrees=15)])
def test_scale_range_moves_image_and_label_together_and_scales_widths(aug):
    seg = _bars()
    x, y, w = (t.numpy() for t in next(iter(patch_dataset(
        seg, 32, 128, 0.0, aug, seed=4, scale_range=(0.6, 1.6)))))
    assert x.shape == (128, 32, 32, 1)
    # the known shape: the image's bars are the label's bars in every patch; they may differ
    # only next to the bars' edges (the image's edges soften with each interpolation, the
    # label is thresholded back to binary), never 3 px or more away from one (checked inside
    # the patch, where an edge just outside the patch cannot be seen)
    label = y[..., 0] > 0.5
    edge = ndimage.binary_dilation(label, np.ones((1, 3, 3), bool)) & ~ndimage.binary_erosion(
        label, np.ones((1, 3, 3), bool), border_value=1)
    near_edge = ndimage.binary_dilation(edge, np.ones((1, 3, 3), bool))
    mismatch = (x[..., 0] > 0.5) != label
    assert not (mismatch & ~near_edge)[:, 2:-2, 2:-2].any()
    assert mismatch.mean() < 0.02 and label.mean() > 0.1
    assert set(np.unique(y)) <= {0.0, 1.0}
    if aug.rotate_degrees:
        return
    # bar widths in the patches: 10 px x s, s in [0.6, 1.6]
    runs = []
    for row in y[:, 16, :, 0] > 0.5:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        runs += [b - a for a, b in zip(edges[::2], edges[1::2]) if a > 0 and b < 32]
    assert min(runs) >= 5 and max(runs) <= 17
    assert min(runs) <= 8 and max(runs) >= 14  # both ends of the range drawn


def test_groups_balance_the_sources():
    small, large = np.full((40, 40, 1), 0.2, np.float32), np.full((160, 160, 1), 0.8, np.float32)
    seg = SegmentationSet(
        ["small", "large"], [small, large],
        [np.zeros((40, 40, 1), np.float32), np.zeros((160, 160, 1), np.float32)],
        [np.ones((40, 40), bool), np.ones((160, 160), bool)], groups=[0, 1])

    def share_small(groups, weights=()):
        x = next(iter(patch_dataset(seg, 8, 512, 0.0, Augment.none(), seed=1, groups=groups,
                                    group_weights=weights)))[0].numpy()
        return float((np.abs(x[:, 4, 4, 0] - 0.2) < 1e-3).mean())

    assert abs(share_small(None) - 1 / 17) < 0.04    # by FOV pixels: 1600 of 27200
    assert abs(share_small([0, 1]) - 0.5) < 0.08     # each source half the patches
    assert abs(share_small([0, 1], (3, 1)) - 0.75) < 0.08  # --dataset_weights=3,1
    assert abs(share_small([0, 1], (1, 4)) - 0.2) < 0.08
    with pytest.raises(ValueError, match="3 group weights for 2 groups"):
        share_small([0, 1], (1, 1, 1))


@pytest.mark.parametrize("context_factor", [0, 2])
def test_context_fusion_patches_keep_the_sets_shares(context_factor):
    # RIP-AV's patches with their context (the whole image, or a wider crop) are drawn from
    # the sets in the shares --dataset_weights gives, as plain patches are
    from retina_tf.config import TrainConfig
    from retina_tf.models.rip_av import RIPAV
    from retina_tf.training import training_dataset
    seg = SegmentationSet(
        ["a", "b"], [np.full((64, 64, 1), v, np.float32) for v in (0.2, 0.8)],
        [np.zeros((64, 64, 1), np.float32)] * 2, [np.ones((64, 64), bool)] * 2, groups=[0, 1])
    model = RIPAV(widths=(8, 8, 16, 16, 16), depths=(1, 1, 1, 1), context_size=32,
                  context_factor=context_factor)
    cfg = TrainConfig(dataset="drive", extra_data=("stare:data/STARE:all",),
                      dataset_weights=(3.0, 1.0), patch_size=16, batch_size=512,
                      vessel_probability=0.0)
    x = next(iter(training_dataset(cfg, model, seg, Augment.none(), steps=1)))[0]
    first = float((np.abs(x["image"].numpy()[:, 8, 8, 0] - 0.2) < 1e-3).mean())
    assert abs(first - 0.75) < 0.08


@pytest.mark.parametrize("balance, weights, share", [
    (False, (), 0.2), (True, (), 0.5), (True, (3.0, 1.0), 0.75)])
def test_whole_images_keep_the_sets_shares(balance, weights, share):
    # --mode=whole draws the sets' images in the shares patches get: one image of the first
    # set against four of the second
    from retina_tf.config import TrainConfig
    from retina_tf.models.unet import UNet
    from retina_tf.training import training_dataset
    seg = SegmentationSet(
        list("abcde"), [np.full((8, 8, 1), v, np.float32) for v in (0.2, 0.8, 0.8, 0.8, 0.8)],
        [np.zeros((8, 8, 1), np.float32)] * 5, [np.ones((8, 8), bool)] * 5,
        groups=[0, 1, 1, 1, 1])
    cfg = TrainConfig(dataset="drive", extra_data=("stare:data/STARE:all",), mode="whole",
                      balance_datasets=balance, dataset_weights=weights, batch_size=500)
    model = UNet(depth=2, base_filters=4)
    first, second = (x.numpy() for x, *_ in
                     training_dataset(cfg, model, seg, Augment.none(), steps=1).take(2))
    assert abs(float((np.abs(first[:, 4, 4, 0] - 0.2) < 1e-3).mean()) - share) < 0.06
    # a resumed run (one epoch of one batch drawn) continues the same stream
    later = training_dataset(cfg, model, seg, Augment.none(), steps=1, start_epoch=1)
    assert np.array_equal(next(iter(later))[0].numpy(), second)


def test_extra_data_entries_parse_and_bad_ones_say_how():
    assert parse_extra_data("stare:data/STARE:all") == ("stare", "data/STARE", "all")
    assert parse_extra_data("STARE:data/STARE") == ("stare", "data/STARE", "training")
    with pytest.raises(ConfigError, match="DATASET:FOLDER"):
        parse_extra_data("data/STARE")
    with pytest.raises(ConfigError, match="'tset' is not a split; give one of training, test"):
        parse_extra_data("stare:data/STARE:tset")  # it was read as part of the folder
    assert parse_extra_data("drive:C:/data/DRIVE") == ("drive", "C:/data/DRIVE", "training")


@pytest.mark.slow
def test_training_on_two_sets_with_camera_copies(tiny_synthetic, tmp_path, caplog):
    from retina_tf.flags import parse_config
    from retina_tf.training import load_training_sets, train
    from tests.conftest import tiny_train_args
    other = write_synthetic_dataset(tmp_path / "other", num_images=5, num_test=1, seed=9,
                                    size=(128, 112))
    args = tiny_train_args(tiny_synthetic, tmp_path / "logs", f"--extra_data=synthetic:{other}",
                           "--camera_variants=2", "--camera_channel_gamma=0.9",
                           "--scale_range=0.7,1.4", "--dataset_weights=2,1", "--epochs=2")
    cfg = dataclasses.replace(parse_config("train", args), task="vessel")
    train_set, val_set, _ = load_training_sets(cfg)
    # 3 + 3 originals (one of each set held out), each with 2 camera copies
    assert len(train_set) == 18 and len(val_set) == 2
    assert train_set.groups == [0, 0, 0, 1, 1, 1] + [0] * 6 + [1] * 6
    # both sets name their images 0N_training: tell them apart by source
    originals = {(n, g): t for n, g, t in zip(train_set.names[:6], train_set.groups,
                                               train_set.targets[:6])}
    for name, group, target in zip(train_set.names[6:], train_set.groups[6:],
                                   train_set.targets[6:]):
        np.testing.assert_array_equal(target, originals[name.split("@")[0], group])
    # the per-channel tone curves reach the copies (and only them)
    plain, _, _ = load_training_sets(dataclasses.replace(cfg, camera_channel_gamma=0.0))
    same = [np.array_equal(a, b) for a, b in zip(plain.images, train_set.images)]
    assert all(same[:6]) and not all(same[6:])
    run = train(cfg)
    assert ("6 training images and 12 camera copies of them (67% / 33% of the patches from "
            "each set), 2 held out") in caplog.text
    data = json.loads((run / "run.json").read_text())["data"]
    assert data["camera_variants"] == 2 and len(data["training_images"]) == 6
    assert data["camera_channel_gamma"] == 0.9
    assert data["extra_data"] == [f"synthetic:{other}"]
    assert data["dataset_weights"] == [2.0, 1.0]


def test_a_set_given_twice_is_refused_naming_the_image(tiny_synthetic, tmp_path):
    from retina_tf.config import TrainConfig
    from retina_tf.training import training_sources
    alias = tmp_path / "alias"
    alias.symlink_to(tiny_synthetic)  # the same images under another name
    base = dict(dataset="synthetic", data_dir=str(tiny_synthetic))
    other = tmp_path / "other"
    write_synthetic_dataset(other, num_images=2, num_test=1, seed=9, size=(64, 64))
    assert len(training_sources(TrainConfig(**base, extra_data=(f"synthetic:{other}",)))) == 2
    # trained on twice, and one copy's held-out images trained on in the other
    with pytest.raises(ConfigError, match=rf"--extra_data=synthetic:{alias}: .*_training\.tif is "
                       rf"also in --data_dir={tiny_synthetic}; give each set once"):
        training_sources(TrainConfig(**base, extra_data=(f"synthetic:{alias}",)))
    with pytest.raises(ConfigError, match=rf"is also in --extra_data=synthetic:{other}"):
        training_sources(TrainConfig(extra_data=(f"synthetic:{other}", f"synthetic:{other}:all")))


def test_a_photograph_given_twice_under_two_names_is_refused(tiny_synthetic, tmp_path):
    """A copy of a training photograph in a second set passed the path check: trained on
    twice, or held out in one set and trained on in the other."""
    from retina_tf.config import TrainConfig
    from retina_tf.training import load_training_sets
    copy = shutil.copytree(tiny_synthetic, tmp_path / "copy")
    first = sorted((copy / "training" / "images").glob("*.tif"))[0]
    for folder in ("images", "1st_manual", "mask", "av"):  # one photograph of the copy left
        for path in (copy / "training" / folder).iterdir():
            if not path.name.startswith(first.name.split("_")[0]):
                path.unlink()
    cfg = TrainConfig(dataset="synthetic", data_dir=str(tiny_synthetic),
                      extra_data=(f"synthetic:{copy}",))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(first))} has the pixels of "
                                          rf"{re.escape(str(tiny_synthetic))}/training/images/"
                                          rf"{first.name}: that photograph would be trained on "
                                          "twice, or held out and trained on; list it once$"):
        load_training_sets(cfg)
