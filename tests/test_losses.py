"""Known-answer tests of the FOV-weighted loss terms, the loss mixer and training with them."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_tf import losses
from retina_tf.losses import (
    LOSS_MIXES,
    SegmentationLoss,
    bce_loss,
    dice_loss,
    focal_loss,
    parse_loss_spec,
    thin_bce_loss,
    thin_vessel_weight_map,
    tversky_loss,
    vessel_width_map,
)
from retina_tf.optimizers import Adam

LOG2 = math.log(2.0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _bce(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    p = _sigmoid(z.astype(np.float64))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


@pytest.fixture()
def batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two 3x3 images with two channels and a FOV that excludes a few pixels."""
    rng = np.random.default_rng(7)
    y = (rng.random((2, 3, 3, 2)) > 0.6).astype(np.float32)
    z = rng.normal(scale=2.0, size=(2, 3, 3, 2)).astype(np.float32)
    w = np.ones((2, 3, 3, 1), np.float32)
    w[0, 0, :, 0] = 0.0
    w[1, :, 2, 0] = 0.0
    return y, z, w


# ---------------------------------------------------------------------------------- terms


def test_terms_at_zero_logits_match_hand_values() -> None:
    # One 2x2 image, one vessel pixel, logits 0 -> every probability is 0.5.
    y = np.array([1, 0, 0, 0], np.float32).reshape(1, 2, 2, 1)
    z = np.zeros_like(y)
    assert float(bce_loss(y, z)) == pytest.approx(LOG2, rel=1e-6)
    # pos_weight 3: (3 log2 + 3 log2) / 4
    assert float(bce_loss(y, z, pos_weight=3.0)) == pytest.approx(1.5 * LOG2, rel=1e-6)
    # soft TP 0.5, FP 1.5, FN 0.5: Dice (1 + 1) / (1 + 1.5 + 0.5 + 1) = 0.5
    assert float(dice_loss(y, z)) == pytest.approx(0.5, rel=1e-6)
    # Tversky (0.5 + 1) / (0.5 + 0.2 * 1.5 + 0.8 * 0.5 + 1) = 1.5 / 2.2
    assert float(tversky_loss(y, z, alpha=0.2, beta=0.8)) == pytest.approx(1 - 1.5 / 2.2, rel=1e-6)
    # focal: (1 - 0.5)^2 log 2 everywhere; alpha 0.25 -> (0.25 + 3 * 0.75) / 4 of that
    assert float(focal_loss(y, z, gamma=2.0)) == pytest.approx(0.25 * LOG2, rel=1e-6)
    assert float(focal_loss(y, z, gamma=2.0, alpha=0.25)) == pytest.approx(
        0.25 * LOG2 * (0.25 + 3 * 0.75) / 4, rel=1e-6)


def test_bce_is_fov_weighted_mean_with_pos_weight(batch) -> None:
    y, z, w = batch
    pos_weight = 2.5
    per_pixel = _bce(y, z) * np.where(y == 1, pos_weight, 1.0)
    expected = (per_pixel * w).sum() / (w.sum() * y.shape[-1])
    assert float(bce_loss(y, z, w, pos_weight=pos_weight)) == pytest.approx(expected, rel=1e-5)
    # A (B, H, W) FOV map means the same as (B, H, W, 1); None means all ones.
    assert float(bce_loss(y, z, w[..., 0], pos_weight=pos_weight)) == pytest.approx(
        expected, rel=1e-5)
    assert float(bce_loss(y, z)) == pytest.approx(_bce(y, z).mean(), rel=1e-5)
    # One factor per channel.
    per_channel = _bce(y, z) * np.where(y == 1, np.array([2.0, 5.0]), 1.0)
    expected = (per_channel * w).sum() / (w.sum() * 2)
    assert float(bce_loss(y, z, w, pos_weight=[2.0, 5.0])) == pytest.approx(expected, rel=1e-5)


def test_dice_and_tversky_pool_the_batch_per_channel(batch) -> None:
    y, z, w = batch
    p = _sigmoid(z.astype(np.float64))
    tp = (w * p * y).sum(axis=(0, 1, 2))
    fp = (w * p * (1 - y)).sum(axis=(0, 1, 2))
    fn = (w * (1 - p) * y).sum(axis=(0, 1, 2))
    dice = (2 * tp + 1) / (2 * tp + fp + fn + 1)
    assert float(dice_loss(y, z, w)) == pytest.approx(1 - dice.mean(), rel=1e-5)
    tversky = (tp + 1) / (tp + 0.3 * fp + 0.7 * fn + 1)
    assert float(tversky_loss(y, z, w, alpha=0.3, beta=0.7)) == pytest.approx(
        1 - tversky.mean(), rel=1e-5)
    # alpha = beta = 0.5 is Dice (with half the smoothing constant: numerator and denominator
    # halve).
    assert float(tversky_loss(y, z, w, alpha=0.5, beta=0.5, smooth=0.5)) == pytest.approx(
        float(dice_loss(y, z, w, smooth=1.0)), rel=1e-5)


def test_focal_matches_formula_and_keras_focal(batch) -> None:
    y, z, w = batch
    p = _sigmoid(z.astype(np.float64))
    p_t = y * p + (1 - y) * (1 - p)
    a_t = y * 0.25 + (1 - y) * 0.75
    per_pixel = a_t * (1 - p_t) ** 2 * _bce(y, z)
    expected = (per_pixel * w).sum() / (w.sum() * 2)
    assert float(focal_loss(y, z, w, gamma=2.0, alpha=0.25)) == pytest.approx(expected, rel=1e-5)
    # Without a FOV it is the plain mean of Keras' own focal BCE.
    reference = keras.losses.binary_focal_crossentropy(y, z, gamma=2.0, from_logits=True)
    assert float(focal_loss(y, z, gamma=2.0)) == pytest.approx(float(np.mean(reference)), rel=1e-4)


# -------------------------------------------------------------------------- thin vessels


def _lines_label() -> np.ndarray:
    """A 1-px line, a 2-px line and a 9-px bar crossing a 40x30 image from side to side."""
    label = np.zeros((40, 30), bool)
    label[5, :] = True
    label[10:12, :] = True
    label[20:29, :] = True
    return label


def test_vessel_width_is_twice_the_centre_line_distance() -> None:
    width = vessel_width_map(_lines_label())
    assert width.dtype == np.float32 and width.shape == (40, 30)
    assert np.all(width[5] == 2.0)          # EDT 1 on the 1-px centre line
    assert np.all(width[10:12] == 2.0)      # the skeleton of a 2-px line lies on one of its rows
    assert np.all(width[20:29] == 10.0)     # EDT 5 at the centre of the 9-px bar
    assert np.all(width[[0, 6, 15, 35]] == 0.0)
    assert np.all(vessel_width_map(np.zeros((8, 8), bool)) == 0.0)
    diagonal = vessel_width_map(np.eye(12, dtype=bool))
    assert np.all(diagonal[np.eye(12, dtype=bool)] == 2.0)


def test_thin_weight_marks_one_and_two_px_lines_but_not_a_wide_bar() -> None:
    weight = thin_vessel_weight_map(_lines_label(), thin_factor=4.0, thin_width=3.0)
    assert np.all(weight[5] == 4.0)
    assert np.all(weight[10:12] == 4.0)
    assert np.all(weight[20:29] == 1.0)
    assert np.all(weight[[0, 6, 15, 35]] == 1.0)  # background keeps weight 1


def test_thin_bce_hand_value() -> None:
    label = _lines_label()
    y = label[None, ..., None].astype(np.float32)
    z = np.zeros_like(y)
    n_thin = 30 * 3  # the 1-px and 2-px lines
    expected = LOG2 * (4.0 * n_thin + (label.size - n_thin)) / label.size
    assert float(thin_bce_loss(y, z, thin_factor=4.0, thin_width=3.0)) == pytest.approx(
        expected, rel=1e-5)
    # Inside tf.function with an unknown batch size (as in model.fit).
    fn = tf.function(lambda a, b: thin_bce_loss(a, b),
                     input_signature=[tf.TensorSpec((None, 40, 30, 1))] * 2)
    assert float(fn(y, z)) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------ masking


@pytest.mark.parametrize("name", sorted(losses.LOSS_TERMS))
def test_pixels_outside_the_fov_do_not_count(name: str) -> None:
    rng = np.random.default_rng(3)
    y = (rng.random((2, 12, 16, 1)) > 0.7).astype(np.float32)
    z = rng.normal(size=y.shape).astype(np.float32)
    w = np.zeros((2, 12, 16, 1), np.float32)
    w[:, :, 8:] = 1.0
    z2 = z.copy()
    z2[:, :, :8] = rng.normal(scale=5.0, size=(2, 12, 8, 1))
    y2 = y.copy()
    if name != "thin_bce":
        # Vessel widths depend on whole vessels, so for thin_bce only far-away labels may change.
        y2[:, :, :8] = 1.0 - y2[:, :, :8]
    else:
        y[:, :, 3:8] = y2[:, :, 3:8] = 0.0
        y2[:, :, :3] = 1.0 - y2[:, :, :3]
    term = losses.LOSS_TERMS[name]
    value = float(term(y, z, w))
    assert float(term(y2, z2, w)) == pytest.approx(value, rel=1e-6, abs=1e-7)
    # ... and the weighted value equals the value on the FOV part alone (not for thin_bce: widths
    # of vessels cut by the crop change).
    if name != "thin_bce":
        assert value == pytest.approx(float(term(y[:, :, 8:], z[:, :, 8:])), rel=1e-5)


# ------------------------------------------------------------------------------ mixtures


def test_segmentation_loss_is_the_weighted_sum_of_its_terms(batch) -> None:
    y, z, w = batch
    loss = SegmentationLoss("seed_vit", tversky_alpha=0.2, tversky_beta=0.8, thin_factor=4.0,
                            thin_width=3.0)
    expected = (0.5 * float(bce_loss(y, z, w)) + float(dice_loss(y, z, w))
                + 2.5 * float(tversky_loss(y, z, w, alpha=0.2, beta=0.8))
                + 2.5 * float(thin_bce_loss(y, z, w, thin_factor=4.0, thin_width=3.0))
                + float(focal_loss(y, z, w, gamma=2.0)))
    assert float(loss(y, z, sample_weight=w)) == pytest.approx(expected, rel=1e-5)
    assert set(loss.compute_terms(y, z, w)) == set(LOSS_MIXES["seed_vit"])
    pw = SegmentationLoss("bce:2,dice:0.5", pos_weight=3.0)
    expected = 2 * float(bce_loss(y, z, w, pos_weight=3.0)) + 0.5 * float(dice_loss(y, z, w))
    assert float(pw(y, z, w)) == pytest.approx(expected, rel=1e-5)
    assert float(SegmentationLoss("bce")(y, z)) == pytest.approx(float(bce_loss(y, z)), rel=1e-6)


def test_the_configs_loss_terms_are_the_losses_terms() -> None:
    from retina_tf.config import LOSS_TERM_NAMES  # what a config checks --loss against
    assert tuple(losses.LOSS_TERMS) == LOSS_TERM_NAMES


def test_parse_loss_spec() -> None:
    assert parse_loss_spec("seed_vit") == {"bce": 0.5, "dice": 1.0, "tversky": 2.5, "thin_bce": 2.5,
                                           "focal": 1.0}
    assert parse_loss_spec("bce_dice") == {"bce": 1.0, "dice": 1.0}
    assert parse_loss_spec(" bce:1, dice:0.5 ") == {"bce": 1.0, "dice": 0.5}
    assert parse_loss_spec("bce,tversky") == {"bce": 1.0, "tversky": 1.0}
    assert parse_loss_spec({"focal": 2}) == {"focal": 2.0}
    with pytest.raises(ValueError, match="'lovasz'"):
        parse_loss_spec("bce:1,lovasz:1")
    with pytest.raises(ValueError, match="'dice'"):
        parse_loss_spec("dice:x")
    with pytest.raises(ValueError, match="twice"):
        parse_loss_spec("bce:1,bce:2")
    with pytest.raises(ValueError, match=">= 0"):
        parse_loss_spec("bce:-1")
    with pytest.raises(ValueError, match="'nope'"):
        SegmentationLoss({"nope": 1.0})


def test_config_round_trip() -> None:
    loss = SegmentationLoss("bce:1,tversky:2", pos_weight=[1.0, 2.0], tversky_alpha=0.3,
                            tversky_beta=0.7, focal_alpha=0.25, thin_width=4.0, name="my_loss")
    config = loss.get_config()
    again = SegmentationLoss.from_config(config)
    assert again.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, SegmentationLoss)
    assert restored.get_config() == config
    assert loss.supports_jit and not SegmentationLoss("seed_vit").supports_jit


# ------------------------------------------------------------------------------ training


def _toy_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images whose first channel is the vessel map plus noise; FOV = right 10 of 16 columns."""
    rng = np.random.default_rng(seed)
    y = (rng.random((16, 16, 16, 1)) > 0.75).astype(np.float32)
    y[:, :, 3:6] = 0.0  # a label-free gap between the FOV and the far outside
    x = np.concatenate([y + 0.3 * rng.normal(size=y.shape), rng.normal(size=(16, 16, 16, 2))], -1)
    w = np.zeros((16, 16, 16, 1), np.float32)
    w[:, :, 6:] = 1.0
    return x.astype(np.float32), y, w


def _tiny_model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((None, None, 3)),
                             keras.layers.Conv2D(1, 3, padding="same")])


def test_fit_with_fov_weights_lowers_the_loss() -> None:
    x, y, w = _toy_data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4).repeat()
    model = _tiny_model()
    loss = SegmentationLoss("bce_dice")
    model.compile(optimizer=Adam(0.05), loss=loss, jit_compile=loss.supports_jit)
    before = model.evaluate(x, y, sample_weight=w, batch_size=16, verbose=0)
    model.fit(dataset, steps_per_epoch=30, epochs=1, shuffle=False, verbose=0)
    after = model.evaluate(x, y, sample_weight=w, batch_size=16, verbose=0)
    assert after < 0.8 * before

    # Outside the FOV (columns 0-2, behind a label-free gap) images and labels do not matter,
    # for every term of the seed mix; the 3x3 conv cannot carry column 2 into the FOV.
    model.compile(optimizer="adam", loss=SegmentationLoss("seed_vit"), jit_compile=False)
    x2, y2 = x.copy(), y.copy()
    x2[:, :, :3] = 7.0
    y2[:, :, :3] = 1.0 - y2[:, :, :3]
    ref = model.evaluate(x, y, sample_weight=w, batch_size=16, verbose=0)
    assert model.evaluate(x2, y2, sample_weight=w, batch_size=16, verbose=0) == pytest.approx(
        ref, rel=1e-6)
    # With all-ones weights the outside does count.
    ones = np.ones_like(w)
    assert model.evaluate(x2, y2, sample_weight=ones, batch_size=16, verbose=0) != pytest.approx(
        model.evaluate(x, y, sample_weight=ones, batch_size=16, verbose=0), rel=1e-3)


def test_seed_mix_trains_under_a_distribution_strategy() -> None:
    x, y, w = _toy_data(1)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w[..., 0])).batch(8).repeat()  # (B,H,W) FOV
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = _tiny_model()
        loss = SegmentationLoss("seed_vit")
        model.compile(optimizer=Adam(0.05), loss=loss,
                      jit_compile=loss.supports_jit)
    history = model.fit(dataset, steps_per_epoch=10, epochs=2, shuffle=False,
                        verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]
