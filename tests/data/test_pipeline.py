import dataclasses

import numpy as np
import pytest

from retina_tf.data.pipeline import Augment, SegmentationSet, patch_dataset, whole_image_dataset


def _set(n=3, shape=(60, 50), channels=1, seed=0):
    """Images whose pixel values equal the label, so geometry errors show up as mismatches."""
    rng = np.random.default_rng(seed)
    images, targets, fovs = [], [], []
    for _ in range(n):
        label = rng.random(shape) < 0.2
        fov = np.zeros(shape, bool)
        fov[5:-5, 5:-5] = True
        label &= fov
        images.append(np.repeat(label[..., None], channels, -1).astype(np.float32))
        targets.append(label[..., None].astype(np.float32))
        fovs.append(fov)
    return SegmentationSet([f"im{i}" for i in range(n)], images, targets, fovs)


def _first(ds, n=1):
    return [tuple(t.numpy() for t in b) for b in ds.take(n)]


def test_patch_batches_have_the_promised_shapes_and_ranges():
    (x, y, w), = _first(patch_dataset(_set(channels=3), patch_size=16, batch_size=8))
    assert x.shape == (8, 16, 16, 3) and y.shape == (8, 16, 16, 1) and w.shape == (8, 16, 16, 1)
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(y)) <= {0.0, 1.0} and set(np.unique(w)) <= {0.0, 1.0}


@pytest.mark.parametrize("aug", [Augment.none(), Augment(),
                                 Augment(rotate_degrees=20)])
def test_geometric_augmentation_moves_image_label_and_fov_together(aug):
    seg = _set()
    (x, y, w), = _first(patch_dataset(seg, patch_size=16, batch_size=32, augment=aug, seed=3))
    np.testing.assert_array_equal(x > 0.5, y > 0.5)
    assert np.all(y <= w)  # labels never leave the FOV


@pytest.mark.parametrize("degrees", [30, 60, 90, 180])
def test_rotated_patches_have_no_corners_filled(degrees):
    # a white image whose FOV keeps every crop off its border: a black pixel in a patch is fill
    # where the crop cut before rotating was too small for the angle
    seg = _set(n=2, shape=(200, 200))
    seg.images = [np.ones_like(im) for im in seg.images]
    seg.fovs = [np.zeros((200, 200), bool) for _ in seg.fovs]
    for fov in seg.fovs:
        fov[60:140, 60:140] = True
    aug = dataclasses.replace(Augment.none(), rotate_degrees=degrees)
    (x, y, w), = _first(patch_dataset(seg, patch_size=24, batch_size=64, seed=4, augment=aug))
    assert x.min() > 0.5, (x < 0.5).mean()


def test_centres_lie_on_vessels_when_asked():
    (x, y, w), = _first(patch_dataset(_set(), patch_size=15, batch_size=64,
                                      vessel_probability=1.0, augment=Augment.none()))
    assert y[:, 7, 7, 0].min() == 1.0
    (x, y, w), = _first(patch_dataset(_set(), patch_size=15, batch_size=64,
                                      vessel_probability=0.0, augment=Augment.none()))
    assert w[:, 7, 7, 0].min() == 1.0  # centres inside the FOV
    assert 0.0 < y[:, 7, 7, 0].mean() < 0.6


def test_a_set_without_vessels_leaves_the_others_centred_on_vessels():
    seg = _set()
    seg.targets[2] = np.zeros_like(seg.targets[2])  # a set of one image with an empty label
    seg.images[2] = np.zeros_like(seg.images[2])
    (x, y, w), = _first(patch_dataset(seg, patch_size=15, batch_size=64, groups=[0, 0, 1],
                                      vessel_probability=1.0, augment=Augment.none()))
    from_the_first = y.reshape(64, -1).max(axis=1) > 0
    assert 10 < from_the_first.sum() < 54  # both sets drawn from
    assert y[from_the_first, 7, 7, 0].min() == 1.0


def test_same_seed_same_batches_other_seed_other_batches():
    seg = _set()
    aug = Augment(rotate_degrees=10, brightness=0.1, contrast=0.1, gamma=0.1)
    a = _first(patch_dataset(seg, 16, 8, augment=aug, seed=5), 3)
    b = _first(patch_dataset(seg, 16, 8, augment=aug, seed=5), 3)
    c = _first(patch_dataset(seg, 16, 8, augment=aug, seed=6), 3)
    for (xa, ya, _), (xb, yb, _) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], c[0][0])


def test_intensity_jitter_changes_the_image_only():
    seg = _set()
    seg.images = [np.full_like(im, 0.5) for im in seg.images]
    aug = Augment(flip=False, rot90=False, brightness=0.2, contrast=0.2, gamma=0.3)
    (x, y, w), = _first(patch_dataset(seg, 16, 16, augment=aug))
    assert x.std() > 0.01  # each patch gets its own jitter
    (x0, y0, _), = _first(patch_dataset(seg, 16, 16, augment=Augment.none()))
    np.testing.assert_array_equal(y, y0)


def test_whole_images_are_padded_to_the_multiple_with_zero_weight():
    seg = _set(n=2, shape=(60, 50))
    ds = whole_image_dataset(seg, batch_size=2, multiple=16, augment=Augment.none(),
                             shuffle=False, repeat=False)
    (x, y, w), = _first(ds)
    assert x.shape == (2, 64, 64, 1)
    assert w[:, 60:].max() == 0 and w[:, :, 50:].max() == 0
    np.testing.assert_array_equal(x[0, :60, :50], seg.images[0])
    # square padding lets rot90 keep the shape
    (x, y, w), = _first(whole_image_dataset(seg, batch_size=2, multiple=16, seed=1))
    assert x.shape == (2, 64, 64, 1)
    np.testing.assert_array_equal(x > 0.5, y > 0.5)


def test_patch_dataset_pairs_each_patch_with_its_whole_image_as_context():
    # two flat images: every patch and its context must come from the same one
    values = (0.2, 0.8)
    images = [np.full((40, 48, 1), v, np.float32) for v in values]
    targets = [np.zeros((40, 48, 1), np.float32) for _ in values]
    fovs = [np.ones((40, 48), bool) for _ in values]
    seg = SegmentationSet(["a", "b"], images, targets, fovs)
    x, y, w = next(iter(patch_dataset(seg, 16, 8, 0.0, Augment.none(), seed=1,
                                      context_size=32)))
    assert x["image"].shape == (8, 16, 16, 1) and x["context"].shape == (8, 32, 32, 1)
    patch_value = x["image"].numpy()[:, 8, 8, 0]
    context = x["context"].numpy()
    np.testing.assert_allclose(context, patch_value[:, None, None, None] * np.ones_like(context),
                               atol=1e-6)
    assert {round(float(v), 3) for v in patch_value} == set(values)  # both images drawn


def test_mixed_patch_sizes_resize_crops_of_each_side_to_the_patch_size():
    # a horizontal ramp: a crop of side s resized to 16 px spans about s / 255 of the range
    ramp = np.tile(np.linspace(0.0, 1.0, 256, dtype=np.float32), (200, 1))[..., None]
    target = np.zeros((200, 256, 1), np.float32)
    target[:, ::2] = 1.0  # a fine label pattern: must stay binary after the resize
    fov = np.zeros((200, 256), bool)
    fov[40:160, 40:216] = True  # centres where even a 64 px crop stays inside the image
    seg = SegmentationSet(["r"], [ramp], [target], [fov])
    x, y, w = next(iter(patch_dataset(seg, 16, 64, 0.0, Augment.none(), seed=2,
                                      crop_sizes=(16, 64))))
    assert x.shape == (64, 16, 16, 1) and y.shape == (64, 16, 16, 1)
    spans = np.round((x.numpy()[:, 8, -1, 0] - x.numpy()[:, 8, 0, 0]) * 255)
    small, large = spans[spans < 30], spans[spans >= 30]
    assert len(small) and len(large)  # both sides were drawn
    assert np.all(np.abs(small - 15) <= 1) and np.all((large > 50) & (large < 64))
    assert set(np.unique(y.numpy())) <= {0.0, 1.0} and set(np.unique(w.numpy())) <= {0.0, 1.0}
    # without crop_sizes the stream is what it was
    plain = next(iter(patch_dataset(seg, 16, 8, 0.0, Augment.none(), seed=2)))[0].numpy()
    again = next(iter(patch_dataset(seg, 16, 8, 0.0, Augment.none(), seed=2)))[0].numpy()
    np.testing.assert_array_equal(plain, again)


def test_training_streams_run_without_tf_data_autotuning():
    # Autotuning made dropping an iterator wait for its sleeping tuner thread (seconds at the end
    # of a fit); the streams must keep it off and still deliver their batches.
    seg = _set(n=2)
    for ds in (patch_dataset(seg, patch_size=16, batch_size=4),
               whole_image_dataset(seg, batch_size=1, multiple=16, repeat=False)):
        assert ds.options().autotune.enabled is False
        assert len(_first(ds, 2)) == 2


def test_the_preprocessing_cache_reads_a_replaced_image_afresh(tmp_path):
    from retina_tf.data.catalog import Sample
    from retina_tf.data.io import read_image, write_image_atomic
    from retina_tf.data.pipeline import preprocess_cached
    from retina_tf.data.preprocess import Preprocessor
    from retina_tf.data.synthetic import generate_fundus
    path = tmp_path / "21_training.png"
    write_image_atomic(path, generate_fundus(1, (64, 64)).image)
    sample = Sample(dataset="drive", name="21_training", image=str(path))
    pre = Preprocessor(standardize=False)
    first = preprocess_cached(sample, read_image(path), pre, tmp_path / "cache")
    np.testing.assert_array_equal(preprocess_cached(sample, read_image(path), pre,
                                                    tmp_path / "cache"), first)
    write_image_atomic(path, generate_fundus(2, (64, 64)).image)  # corrected, same name
    again = preprocess_cached(sample, read_image(path), pre, tmp_path / "cache")
    np.testing.assert_array_equal(again, pre(read_image(path)))
    assert not np.array_equal(again, first)
