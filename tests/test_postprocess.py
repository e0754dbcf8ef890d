"""A/V post-processing: skeleton segments cut at junctions, one decision per segment, links
across junctions."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from retina_tf.data.preprocess import Preprocessor
from retina_tf.errors import ConfigError
from retina_tf.inference import Segmenter
from retina_tf.metrics import AVMetrics
from retina_tf.postprocess import av_mask, segment_links, skeleton_segments, vote_av_segments


def _crossing(size=64, half_width=2):
    """An artery (horizontal bar) crossing a vein (vertical bar): (artery, vein, vessel)."""
    artery = np.zeros((size, size), bool)
    vein = np.zeros((size, size), bool)
    mid = size // 2
    artery[mid - half_width:mid + half_width + 1, 4:-4] = True
    vein[4:-4, mid - half_width:mid + half_width + 1] = True
    return np.stack([artery, vein, artery | vein], -1)


def _branching(size=64):
    """A horizontal trunk (5 px wide) and a 3 px branch leaving its middle at 45 degrees
    downwards to the right: (trunk, branch) bool masks."""
    trunk = np.zeros((size, size), bool)
    trunk[30:35, 4:-4] = True
    branch = np.zeros((size, size), bool)
    for i in range(2, 26):
        branch[32 + i - 1:32 + i + 2, 32 + i - 1:32 + i + 2] = True
    return trunk, branch & ~trunk


def _evidence(parts, size=64):
    """Probabilities (artery, vein, vessel) from (mask, p_artery, p_vein) parts."""
    prob = np.zeros((size, size, 3), np.float32)
    prob[..., :2] = 0.01
    for mask, pa, pv in parts:
        prob[mask] = (pa, pv, 0.99)
    return prob


def _noisy(target, flip_share, seed):
    """Probabilities that are right (0.7 / 0.3) except on ``flip_share`` of the pixels."""
    flip = np.random.default_rng(seed).random(target.shape[:2]) < flip_share
    pa = np.where(target[..., 0] ^ flip, 0.7, 0.3)
    pv = np.where(target[..., 1] ^ flip, 0.7, 0.3)
    return np.stack([pa, pv, target[..., 2].astype(float)], -1).astype(np.float32)


def _acc(prob, target, fov=None):
    m = AVMetrics()
    m.update(prob, target, fov)
    return m.result()["acc"]


def test_a_crossing_is_cut_into_four_segments():
    target = _crossing()
    labels = skeleton_segments(target[..., 2])
    assert labels.max() == 4
    mid = target.shape[0] // 2
    # nothing of the skeleton is left within the junction radius of the crossing
    assert not labels[mid - 2:mid + 3, mid - 2:mid + 3].any()
    # without a junction there is one segment
    assert skeleton_segments(target[..., 0]).max() == 1
    assert skeleton_segments(np.zeros((8, 8), bool)).max() == 0


def test_voting_makes_every_segment_one_class_and_keeps_the_vessel_channel():
    target = _crossing()
    prob = _noisy(target, 0.3, seed=0)
    out = vote_av_segments(prob)
    np.testing.assert_array_equal(out[..., 2], prob[..., 2])
    assert _acc(prob, target) < 0.8
    assert _acc(out, target) == 1.0
    # the artery/vein logit mean (the vessel evidence) is kept where the decision moved
    def logit(p):
        return np.log(p) - np.log1p(-p)

    np.testing.assert_allclose(logit(out[..., 0]) + logit(out[..., 1]),
                               logit(prob[..., 0]) + logit(prob[..., 1]), atol=1e-3)
    # far from every vessel nothing changes
    np.testing.assert_array_equal(out[:3, :3], prob[:3, :3])


def test_pixels_just_outside_the_vessel_map_follow_their_segment():
    target = _crossing()
    prob = _noisy(target, 0.3, seed=1)
    # a pixel 2 px above the artery bar, called vein on its own
    row, col = target.shape[0] // 2 - 4, 12
    prob[row, col] = (0.2, 0.4, 0.1)
    out = vote_av_segments(prob, reach=3)
    assert out[row, col, 0] > out[row, col, 1]
    assert out[row, col, 2] == pytest.approx(0.1)
    np.testing.assert_allclose(vote_av_segments(prob, reach=1)[row, col], (0.2, 0.4, 0.1))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        vote_av_segments(np.zeros((8, 8, 1), np.float32))


def test_voting_on_a_real_rite_label_fixes_scattered_errors(shared_data):
    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.data.pipeline import target_of

    data = read_sample(list_samples("rite", shared_data / "RITE", "test")[0])
    target = target_of(data, "av") > 0.5
    prob = _noisy(target, 0.3, seed=2)
    before, after = _acc(prob, target, data.fov), _acc(vote_av_segments(prob), target, data.fov)
    assert before < 0.75 and after > 0.95, (before, after)


def test_segmenter_applies_the_vote_after_its_forward_pass():
    identity = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Identity()])
    prob = _noisy(_crossing(), 0.3, seed=3)
    seg = Segmenter(identity, Preprocessor(), size_multiple=8, inference="whole", av_vote=True)
    seg._forward = tf.function(lambda t: t)  # probabilities = the input itself
    np.testing.assert_allclose(seg.probability_preprocessed(prob), vote_av_segments(prob),
                               rtol=1e-6)
    seg.tta = True
    np.testing.assert_allclose(seg.probability_preprocessed(prob), vote_av_segments(prob),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="artery/vein/vessel"):
        seg.probability_preprocessed(prob[..., :1])
    seg.av_link = 0.0  # segments decide alone
    np.testing.assert_allclose(seg.probability_preprocessed(prob), vote_av_segments(prob, link=0),
                               rtol=1e-6)
    for bad in (-1.0, float("inf"), float("nan"), "2"):
        with pytest.raises(ConfigError, match="av_link"):
            Segmenter(identity, Preprocessor(), av_vote=True, av_link=bad)
    with pytest.raises(ConfigError, match="inference='tiles': give auto, whole or sliding"):
        Segmenter(identity, Preprocessor(), inference="tiles")


def test_the_vote_cuts_the_vessel_map_at_the_threshold_segment_is_given():
    identity = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Identity()])
    seg = Segmenter(identity, Preprocessor.from_steps("none"), size_multiple=8,
                    inference="whole", av_vote=True)
    seg._forward = tf.function(lambda t: t)
    prob = _noisy(_crossing(), 0.3, seed=4)
    wide = ndimage.binary_dilation(prob[..., 2] > 0, iterations=3)
    prob[..., 2] = np.where(prob[..., 2] > 0, 0.6, np.where(wide, 0.4, 0.0))  # 0.3 widens it
    image = (prob * 255).round().astype(np.uint8)
    x = seg.preprocessor(image)
    fov = np.ones(image.shape[:2], bool)
    for t in (0.3, 0.7):
        voted = vote_av_segments(x, threshold=t, link=seg.av_link)
        assert not np.allclose(voted, vote_av_segments(x, threshold=seg.threshold))
        prob, mask = seg.segment(image, fov, threshold=t)
        np.testing.assert_allclose(prob, voted, rtol=1e-6)
        # the mask is the decision the metrics count: every vessel pixel artery or vein, once
        np.testing.assert_array_equal(mask, av_mask(voted, t))
        np.testing.assert_array_equal(mask[..., 2], voted[..., 2] >= t)
        assert not (mask[..., 0] & mask[..., 1]).any()
        np.testing.assert_array_equal(mask[..., 0] | mask[..., 1], mask[..., 2])


def test_links_join_a_branch_to_its_parent_and_pair_the_arms_of_a_crossing():
    trunk, branch = _branching()
    segments, links = segment_links(trunk | branch)
    assert segments.max() == 3
    left, right, down = (segments[32, 10], segments[32, 55], segments[50, 50])
    linked = {frozenset(pair) for pair in links}
    # the parent (left) with both children; not the two children that leave side by side
    assert linked == {frozenset((left, right)), frozenset((left, down))}
    target = _crossing()
    segments, links = segment_links(target[..., 2])
    mid = target.shape[0] // 2
    west, east = segments[mid, 8], segments[mid, -9]
    north, south = segments[8, mid], segments[-9, mid]
    assert {frozenset(pair) for pair in links} == {frozenset((west, east)),
                                                   frozenset((north, south))}


def test_a_weak_branch_follows_its_parent_and_a_strong_one_keeps_its_class():
    trunk, branch = _branching()
    weak = _evidence([(trunk, 0.95, 0.05), (branch, 0.45, 0.55)])
    # (a few pixels right at the fork are nearer the other vessel's skeleton: left out)
    away = np.hypot(*np.mgrid[:64, :64] - 32.0) > 8
    alone = vote_av_segments(weak, link=0)
    assert (alone[branch & away, 0] < alone[branch & away, 1]).all()  # alone it says vein
    linked = vote_av_segments(weak)
    assert (linked[branch | trunk, 0] > linked[branch | trunk, 1]).all()
    # stronger links settle there (1e7 px wrapped round int32: the unlinked vote; a common
    # scale-down then rounded the evidence away: all vein from 1e12)
    for link in (1e7, 1e12, 1e300):
        np.testing.assert_array_equal(vote_av_segments(weak, link=link), linked)
    strong = vote_av_segments(_evidence([(trunk, 0.95, 0.05), (branch, 0.05, 0.95)]))
    assert (strong[branch & away, 0] < strong[branch & away, 1]).all()
    assert (strong[trunk & away, 0] > strong[trunk & away, 1]).all()


def test_a_crossing_keeps_each_vessel_continuous_and_the_two_apart():
    target = _crossing()
    artery, vein = target[..., 0] & ~target[..., 1], target[..., 1] & ~target[..., 0]
    mid = target.shape[0] // 2
    south = vein & (np.arange(target.shape[0])[:, None] > mid + 4)
    # the artery and the north vein arm are sure; the south vein arm leans the wrong way
    prob = _evidence([(artery, 0.95, 0.05), (vein & ~south, 0.05, 0.95), (south, 0.55, 0.45)])
    # scored away from the crossing's own few pixels (short bridge segments, linked to nothing)
    away = np.hypot(*np.mgrid[:64, :64] - float(mid)) > 6
    assert _acc(vote_av_segments(prob, link=0), target, away) < 0.8
    assert _acc(vote_av_segments(prob), target, away) == 1.0


def test_the_minimum_cut_is_exact_for_unbreakable_links_and_huge_evidence():
    """Links of 1e12 px over evidence of 20 million px: a capacity and its reverse flow no
    longer overflow int32 (a link was cut at 1e12 instead of the 8.8e6 px of evidence)."""
    from retina_tf.postprocess import _min_cut
    chain = [(0, 1), (1, 2), (2, 3)]
    for unary in ([1.18e6, -8.83e6, 7.79e6, 2.67e6],   # 20.5 M px
                  [188.0, 9.9e6, 1.23e7, -1011.0]):     # 22.2 M px: the scaled-down branch
        assert _min_cut(np.array(unary), chain, np.full(3, 1e12)).all()
    assert _min_cut(np.array([5.0, -1.0]), [(0, 1)], np.array([0.5])).tolist() == [True, False]
    broken = _crossing().astype(np.float32)
    broken[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 of the artery/vein/vessel probabilities are NaN"):
        vote_av_segments(broken)
