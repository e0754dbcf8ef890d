"""Known-answer tests of the vessel and A/V metrics (numpy) and the Keras training metrics."""

import math

import keras
import numpy as np
import pytest

from retina_tf.metrics import (
    AVMetrics,
    ConfusionMatrix,
    RipavAVMetrics,
    SegmentationAUC,
    SegmentationF1,
    VesselMetrics,
    format_table,
    ripav_cleanup,
    roc_pr_auc,
    vessel_auc,
)

# A 3x3 hand case. Predicted vessel (prob >= 0.5):   truth:      FOV:
#   1 0 1                                             1 0 0       1 0 1
#   0 1 0                                             1 1 0       1 1 1
#   1 0 1                                             0 0 1       0 1 1
PROB = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1], [0.5, 0.3, 0.8]], np.float32)
LABEL = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], bool)
FOV = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 1]], bool)


def test_confusion_counts_inside_the_fov_by_hand() -> None:
    metrics = VesselMetrics()
    metrics.update(PROB, LABEL, FOV)
    r = metrics.result()
    # Inside the FOV: TP (0,0) (1,1) (2,2); FP (0,2); FN (1,0); TN (1,2) (2,1).
    # Outside: (0,1) a TN and (2,0) an FP (0.5 counts as vessel) are not counted.
    assert (r["tp"], r["fp"], r["tn"], r["fn"], r["n_pixels"]) == (3, 1, 2, 1, 7)
    assert r["acc"] == pytest.approx(5 / 7)
    assert r["se"] == pytest.approx(3 / 4)
    assert r["sp"] == pytest.approx(2 / 3)
    assert r["precision"] == pytest.approx(3 / 4)
    assert r["f1"] == pytest.approx(6 / 8)
    assert r["iou"] == pytest.approx(3 / 5)
    assert r["miou"] == pytest.approx((3 / 5 + 2 / 4) / 2)
    np.testing.assert_array_equal(metrics.confusion_matrix(), [[2, 1], [1, 3]])
    # FOV vessels score 0.9 0.4 0.7 0.8, background 0.6 0.1 0.3: only 0.4 < 0.6 is out of order.
    assert r["auc_roc"] == pytest.approx(11 / 12)


def test_whole_image_counts_outside_pixels() -> None:
    for metrics in (ConfusionMatrix(whole_image=True), ConfusionMatrix()):
        if metrics.whole_image:
            metrics.update(PROB, LABEL, FOV)
        else:
            metrics.update(PROB, LABEL, FOV, whole_image=True)
        r = metrics.result()
        assert (r["tp"], r["fp"], r["tn"], r["fn"], r["n_pixels"]) == (3, 2, 3, 1, 9)
        assert r["acc"] == pytest.approx(6 / 9)
        assert r["sp"] == pytest.approx(3 / 5)
        assert r["f1"] == pytest.approx(6 / 9)
        assert r["iou"] == pytest.approx(3 / 6)
        assert r["miou"] == pytest.approx(0.5)
    no_fov = ConfusionMatrix()
    no_fov.update(PROB, LABEL)
    assert no_fov.result()["n_pixels"] == 9


def test_threshold_is_configurable() -> None:
    metrics = ConfusionMatrix(threshold=0.65)
    metrics.update(PROB, LABEL)
    # Vessel now: 0.9, 0.7, 0.8 -> all true vessels; 0.4 missed.
    assert (metrics.result()["tp"] == 3 and metrics.result()["fp"] == 0
            and metrics.result()["fn"] == 1)


def test_pixels_outside_the_fov_do_not_matter() -> None:
    rng = np.random.default_rng(0)
    prob = rng.random((20, 24)).astype(np.float32)
    label = rng.random((20, 24)) > 0.7
    fov = np.zeros((20, 24), bool)
    fov[3:17, 4:20] = True
    a, b = VesselMetrics(), VesselMetrics()
    a.update(prob, label, fov)
    prob2, label2 = prob.copy(), label.copy()
    prob2[~fov] = rng.random(np.count_nonzero(~fov))
    label2[~fov] = ~label2[~fov]
    b.update(prob2, label2, fov)
    assert a.result() == b.result()
    assert a.result()["n_pixels"] == 14 * 16


def test_auc_hand_cases() -> None:
    auc_roc, auc_pr = roc_pr_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert auc_roc == pytest.approx(0.75)
    # Descending: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): AP = 0.5 * 1/1 + 0.5 * 2/3.
    assert auc_pr == pytest.approx(0.5 + 0.5 * 2 / 3)
    # A tie between a vessel and a background score counts one half.
    auc_roc, auc_pr = roc_pr_auc(np.array([0.5, 0.5, 0.2, 0.8]), np.array([1, 0, 0, 1]))
    assert auc_roc == pytest.approx(3.5 / 4)
    assert auc_pr == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # the tied pair enters as one threshold
    assert math.isnan(roc_pr_auc(np.array([0.2, 0.3]), np.array([0, 0]))[0])
    assert math.isnan(roc_pr_auc(np.array([0.2, 0.3]), np.array([1, 1]))[0])


def _mann_whitney_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def _average_precision_by_thresholds(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP = sum over distinct thresholds t (descending) of (R(t) - R(previous t)) P(t)."""
    ap, previous_recall = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        predicted = scores >= t
        tp = np.count_nonzero(predicted & labels)
        recall = tp / np.count_nonzero(labels)
        ap += (recall - previous_recall) * tp / np.count_nonzero(predicted)
        previous_recall = recall
    return ap


def test_auc_agrees_with_references_on_tied_random_data() -> None:
    rng = np.random.default_rng(42)
    labels = rng.random(1500) > 0.8
    # rounded to two decimals: ties
    scores = np.round(np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1), 2).astype(np.float32)
    auc_roc, auc_pr = roc_pr_auc(scores, labels)
    assert auc_roc == pytest.approx(_mann_whitney_auc(scores, labels), abs=1e-12)
    assert auc_pr == pytest.approx(_average_precision_by_thresholds(scores, labels), abs=1e-12)


def test_streaming_over_images_equals_one_big_image() -> None:
    rng = np.random.default_rng(5)
    probs = [np.round(rng.random((16, 12)), 2).astype(np.float32) for _ in range(4)]
    labels = [rng.random((16, 12)) > 0.75 for _ in range(4)]
    fovs = [rng.random((16, 12)) > 0.2 for _ in range(4)]
    streamed = VesselMetrics()
    for p, label, f in zip(probs, labels, fovs):
        streamed.update(p, label, f)
    big = VesselMetrics()
    big.update(np.concatenate(probs), np.concatenate(labels), np.concatenate(fovs))
    a, b = streamed.result(), big.result()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key
    assert set(a) >= {"acc", "se", "sp", "precision", "f1", "iou", "miou", "auc_roc", "auc_pr",
                      "tp", "fp", "tn", "fn", "n_pixels"}
    scores, kept = streamed.scores_and_labels()
    assert scores.dtype == np.float32 and scores.size == a["n_pixels"] == kept.size
    assert np.array_equal(scores, np.concatenate([p[f] for p, f in zip(probs, fovs)]))
    assert np.array_equal(kept, np.concatenate([label[f] for label, f in zip(labels, fovs)]))
    streamed.reset()
    assert streamed.scores_and_labels()[0].size == 0
    assert streamed.result()["n_pixels"] == 0 and math.isnan(streamed.result()["auc_roc"])


def test_invalid_inputs_are_rejected() -> None:
    metrics = VesselMetrics()
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(PROB, LABEL[:2])
    with pytest.raises(ValueError, match="FOV"):
        metrics.update(PROB, LABEL, FOV[:, :2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.update(PROB * 3, LABEL)
    with pytest.raises(ValueError, match=r"holds NaN: the model that made it has weights that "
                       r"are not finite \(a diverged training\)"):
        metrics.update(np.full((3, 3), np.nan, np.float32), LABEL)


def test_format_table_shows_matrix_and_metrics() -> None:
    metrics = VesselMetrics()
    metrics.update(PROB, LABEL, FOV)
    text = format_table(metrics.result())
    assert "Confusion matrix" in text and "true vessel" in text and "pred background" in text
    assert "F1 (Dice)           0.7500" in text
    assert "mIoU                0.5500" in text
    assert "AUC-ROC" in text and "AUC-PR" in text


def test_av_metrics_hand_case_excludes_crossings_and_uncertain() -> None:
    # Pixels: 0 artery, 1 artery, 2 vein, 3 vein, 4 crossing, 5 uncertain, 6 background, 7 artery
    artery = np.array([1, 1, 0, 0, 1, 0, 0, 1], bool)
    vein = np.array([0, 0, 1, 1, 1, 0, 0, 0], bool)
    vessel = np.array([1, 1, 1, 1, 1, 1, 0, 1], bool)
    target = np.stack([artery, vein, vessel], -1).reshape(1, 8, 3)
    p_artery = np.array([0.9, 0.3, 0.2, 0.6, 0.9, 0.9, 0.9, 0.5])
    p_vein = np.array([0.1, 0.6, 0.7, 0.4, 0.1, 0.1, 0.1, 0.5])  # pixel 7: tie -> artery
    pred = np.stack([p_artery, p_vein, np.ones(8)], -1).reshape(1, 8, 3)
    fov = np.ones((1, 8), bool)
    metrics = AVMetrics()
    metrics.update(pred, target, fov)
    r = metrics.result()
    # Arteries 0, 1, 7 -> right, wrong, right; veins 2, 3 -> right, wrong.
    assert (r["tp"], r["fn"], r["tn"], r["fp"], r["n_pixels"]) == (2, 1, 1, 1, 5)
    assert r["se"] == pytest.approx(2 / 3)
    assert r["sp"] == pytest.approx(1 / 2)
    assert r["acc"] == pytest.approx(3 / 5)
    assert r["f1"] == pytest.approx(4 / 6)
    np.testing.assert_array_equal(metrics.confusion_matrix(), [[1, 1], [1, 2]])
    # Excluding pixel 0 with the FOV removes one right artery.
    fov[0, 0] = False
    metrics.reset()
    metrics.update(pred, target, fov)
    assert metrics.result()["tp"] == 1 and metrics.result()["n_pixels"] == 4
    assert "pred artery" in format_table(metrics.result(), class_names=("vein", "artery"))


# --------------------------------------------------------------------------- Keras metrics


@pytest.fixture()
def logit_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    y = (rng.random((3, 10, 12, 1)) > 0.7).astype(np.float32)
    logits = (rng.normal(size=y.shape) + 1.5 * (2 * y - 1)).astype(np.float32)
    w = (rng.random((3, 10, 12, 1)) > 0.25).astype(np.float32)
    return y, logits, w


def _numpy_metrics(y: np.ndarray, logits: np.ndarray, w: np.ndarray) -> dict:
    metrics = VesselMetrics()
    for b in range(y.shape[0]):
        metrics.update(1 / (1 + np.exp(-logits[b, ..., 0])), y[b, ..., 0] > 0, w[b, ..., 0] > 0)
    return metrics.result()


def test_keras_f1_equals_numpy_f1(logit_batch) -> None:
    y, logits, w = logit_batch
    expected = _numpy_metrics(y, logits, w)["f1"]
    f1 = SegmentationF1()
    f1.update_state(y[:2], logits[:2], sample_weight=w[:2])  # streaming over two batches
    f1.update_state(y[2:], logits[2:], sample_weight=w[2:])
    assert float(f1.result()) == pytest.approx(expected, rel=1e-6)
    f1.reset_state()
    f1.update_state(y, logits, sample_weight=w[..., 0])  # (B, H, W) FOV map
    assert float(f1.result()) == pytest.approx(expected, rel=1e-6)
    probs = SegmentationF1(from_logits=False)
    probs.update_state(y, 1 / (1 + np.exp(-logits)))
    assert float(probs.result()) == pytest.approx(float(SegmentationF1()(y, logits)), rel=1e-6)
    config = SegmentationF1(threshold=0.4, channel=1, name="f1_vein").get_config()
    again = SegmentationF1.from_config(config)
    assert again.get_config() == config and again.channel == 1 and again.threshold == 0.4


def test_keras_f1_channel_selects_one_output() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random((2, 6, 6, 3)) > 0.5).astype(np.float32)
    logits = rng.normal(size=y.shape).astype(np.float32)
    w = np.ones((2, 6, 6, 1), np.float32)
    pred = logits[..., 1] >= 0
    truth = y[..., 1] > 0
    tp = np.count_nonzero(pred & truth)
    expected = 2 * tp / (np.count_nonzero(pred) + np.count_nonzero(truth))
    metric = SegmentationF1(channel=1)
    metric.update_state(y, logits, sample_weight=w)
    assert float(metric.result()) == pytest.approx(expected, rel=1e-6)


def test_keras_auc_takes_image_batches_and_fov_maps(logit_batch) -> None:
    y, logits, w = logit_batch
    exact = _numpy_metrics(y, logits, w)["auc_roc"]
    for weight in (w, w[..., 0]):
        auc = vessel_auc()
        assert isinstance(auc, keras.metrics.AUC) and auc.name == "auc"
        auc.update_state(y, logits, sample_weight=weight)
        assert float(auc.result()) == pytest.approx(exact, abs=0.01)
    pr = vessel_auc("PR")
    pr.update_state(y, logits, sample_weight=w)
    assert pr.name == "auc_pr" and 0.0 < float(pr.result()) <= 1.0
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(pr))
    assert isinstance(restored, SegmentationAUC) and restored.get_config() == pr.get_config()
    with pytest.raises(ValueError, match="'XY'"):
        vessel_auc("XY")


def test_metrics_work_in_compile_and_evaluate(logit_batch) -> None:
    y, logits, w = logit_batch
    # An identity model returns the stored logits, so its metrics must equal the numpy ones.
    # Keras hands sample_weight only to `weighted_metrics`; `metrics` see every pixel.
    model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Identity()])
    model.compile(loss="mse", weighted_metrics=[SegmentationF1(), vessel_auc()],
                  metrics=[SegmentationF1(name="f1_whole_image")], jit_compile=False)
    result = model.evaluate(logits, y, sample_weight=w, batch_size=2, verbose=0, return_dict=True)
    expected = _numpy_metrics(y, logits, w)
    assert result["f1"] == pytest.approx(expected["f1"], rel=1e-6)
    assert result["auc"] == pytest.approx(expected["auc_roc"], abs=0.01)
    assert result["f1_whole_image"] == pytest.approx(
        _numpy_metrics(y, logits, np.ones_like(w))["f1"], rel=1e-6)


# --- RIP-AV's A/V protocol -------------------------------------------------------------------

def _av_scene():
    """40 x 40: an artery bar (rows 4-13), a vein bar (rows 20-29), a 2 x 2 crossing inside the
    artery bar and an uncertain (vessel-only) bar (rows 33-37, 150 px)."""
    target = np.zeros((40, 40, 3), bool)
    target[4:14, 5:35, 0] = True
    target[20:30, 5:35, 1] = True
    target[8:10, 20:22, 1] = True  # crossing: artery and vein
    target[33:38, 5:35, 2] = True  # uncertain
    target[..., 2] |= target[..., 0] | target[..., 1]
    perfect = np.zeros((40, 40, 3), np.float32)
    perfect[..., 0] = target[..., 0]
    perfect[..., 1] = target[..., 1]
    perfect[..., 2] = target[..., 2]
    return target, perfect


def test_ripav_protocol_known_answers():
    target, perfect = _av_scene()
    m = RipavAVMetrics()
    m.update(perfect, target)
    r = m.result()
    assert (r["acc"], r["se"], r["sp"], r["auc_artery"], r["auc_vein"]) == (1, 1, 1, 1, 1)
    # the vein bar called artery everywhere: 300 vein px are FP; arteries stay right
    wrong = perfect.copy()
    wrong[20:30, 5:35, 0], wrong[20:30, 5:35, 1] = 1.0, 0.0
    m = RipavAVMetrics()
    m.update(wrong, target)
    r = m.result()
    # TP 300 (crossing included), FP 300, FN 0, TN 0: the crossing's 4 px still called vein
    # are a speck the clean-up removes
    assert r["se"] == 1.0 and r["sp"] == 0.0 and r["acc"] == 0.5
    # the uncertain bar called artery, and pixels called neither, change nothing
    extra = perfect.copy()
    extra[33:38, 5:35, 0] = 0.9
    extra[20:30, 5:15, 1] = 0.2  # 100 vein px called neither: not counted
    m = RipavAVMetrics()
    m.update(extra, target)
    assert m.result()["acc"] == 1.0 and m.result()["sp"] == 1.0
    # a pixel called both counts for both: the artery bar also called vein -> FN on arteries
    both = perfect.copy()
    both[4:14, 5:35, 1] = 0.8
    m = RipavAVMetrics()
    m.update(both, target)
    r = m.result()
    # TP 300, TN 300 + 4, FN 300 - 4 (crossings left out of FN), FP 0
    assert r["se"] == pytest.approx(300 / 596) and r["sp"] == 1.0
    # the threshold is > 0.5 for arteries and >= 0.5 for veins, as in the seed's code
    half = perfect * 0.5
    m = RipavAVMetrics()
    m.update(half, target)
    r = m.result()
    assert r["sp"] == 1.0 and np.isnan(r["se"])  # no artery called, no vein called on arteries
    assert r["acc"] == 1.0  # TN only


def test_ripav_protocol_means_over_images():
    target, perfect = _av_scene()
    wrong = perfect.copy()
    wrong[20:30, 5:35, 0], wrong[20:30, 5:35, 1] = 1.0, 0.0
    m = RipavAVMetrics()
    m.update(perfect, target)
    m.update(wrong, target)
    assert m.result()["acc"] == pytest.approx((1.0 + 0.5) / 2)
    assert m.result()["images"] == 2


def test_scattered_pixel_flips_cost_the_all_pixel_figure_not_the_seeds():
    target, perfect = _av_scene()
    rng = np.random.default_rng(0)
    flipped = perfect.copy()
    grid = np.zeros((40, 40), bool)
    grid[::4, ::4] = True  # isolated pixels, about 6 % of the image
    flip = grid & (rng.random((40, 40)) < 0.9)
    flipped[flip, 0], flipped[flip, 1] = perfect[flip, 1], perfect[flip, 0]
    ours, seeds = AVMetrics(), RipavAVMetrics()
    ours.update(flipped, target)
    seeds.update(flipped, target)
    assert seeds.result()["acc"] == 1.0  # specks removed, one-pixel holes closed
    assert ours.result()["acc"] < 0.95


def test_ripav_cleanup_removes_specks_and_fills_small_holes():
    mask = np.zeros((40, 40), bool)
    mask[5:20, 5:20] = True  # 225 px
    mask[10:12, 10:12] = False  # a 4-px hole: filled
    mask[30, 30] = True  # a speck: removed
    ring = np.zeros((40, 40), bool)
    ring[22:38, 22:38] = True
    ring[25:35, 25:35] = False  # a 100-px hole: kept
    out = ripav_cleanup(mask | ring)
    assert out[10:12, 10:12].all() and not out[30, 30] and not out[27:33, 27:33].any()


def test_second_observer_benchmark_scores_a_copy_of_the_first_as_perfect(shared_data, tmp_path):
    # bench/second_observer.py: an observer who drew what the first drew agrees fully; a
    # missing second observer's file is named.
    import shutil
    import sys

    from tests import commands

    chase = tmp_path / "CHASE_DB1"
    shutil.copytree(shared_data / "samples" / "CHASE_DB1", chase)
    for first in chase.glob("*_1stHO.png"):
        shutil.copy(first, str(first).replace("_1stHO", "_2ndHO"))
    script = commands.REPO / "bench" / "second_observer.py"
    proc = commands.run([sys.executable, script, f"--datasets=chase_db1:{chase}:all"])
    assert proc.returncode == 0, proc.stderr
    assert "chase_db1 (all) | 2 | 1.000 / 1.000 ± 0.000 | 1.000 | 1.000" in proc.stdout
    (chase / "Image_01R_2ndHO.png").unlink()
    proc = commands.run([sys.executable, script, f"--datasets=chase_db1:{chase}:all"])
    assert proc.returncode == 1 and "Image_01R_2ndHO.png: missing" in proc.stderr
