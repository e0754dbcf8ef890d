"""Vessel and artery/vein segmentation metrics: streaming numpy for evaluation, Keras for training.

Evaluation (numpy): one confusion matrix accumulated over all test
pixels **inside the FOV** (``whole_image=True`` counts every pixel, as several peers do, which
inflates Acc and Sp), and AUC-ROC / AUC-PR from the probabilities of all those pixels, not from
thresholded masks. A/V metrics are counted on ground-truth vessel pixels labelled artery or vein
(crossings and uncertain pixels excluded).

Training (Keras) metrics take logits ``(B, H, W, C)`` and the FOV map as ``sample_weight``
``(B, H, W, 1)`` or ``(B, H, W)``. Keras hands ``sample_weight`` only to ``weighted_metrics``, so
compile them as ``model.compile(..., weighted_metrics=[SegmentationF1(), vessel_auc()])``; under
``metrics=`` they would count every pixel of the image.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops
from scipy import ndimage
from skimage import measure

# ----------------------------------------------------------------------------------------------
# Numpy evaluation metrics


def _ratio(num: float, den: float) -> float:
    """``num / den`` as a float, NaN when ``den`` is 0 (e.g. Se of an image without vessels)."""
    return float(num) / float(den) if den else float("nan")


def _validate(prob: np.ndarray, label: np.ndarray,
              fov: np.ndarray | None) -> tuple[np.ndarray, ...]:
    prob = np.asarray(prob)
    label = np.asarray(label)
    if prob.ndim != 2 or prob.shape != label.shape:
        raise ValueError(f"expected a HxW probability map and a label of the same shape, got "
                         f"prob {prob.shape} and label {label.shape}")
    if fov is not None:
        fov = np.asarray(fov)
        if fov.shape != prob.shape:
            raise ValueError(f"FOV mask shape {fov.shape} differs from probability map shape "
                             f"{prob.shape}")
        fov = fov.astype(bool)
    prob = prob.astype(np.float32, copy=False)
    if not np.all((prob >= 0.0) & (prob <= 1.0)):  # NaN too; told apart only when it fails
        if np.isnan(prob).any():
            raise ValueError("the probability map holds NaN: the model that made it has "
                             "weights that are not finite (a diverged training) or was given "
                             "an input that is not")
        raise ValueError("probabilities must lie in [0, 1], found values in "
                         f"[{prob.min()}, {prob.max()}]; apply a sigmoid to logits first")
    return prob, label.astype(bool), fov


def counts_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """Acc, Se, Sp, precision, F1 (= Dice), vessel IoU and mIoU from confusion counts.

    mIoU is the mean of the vessel IoU ``TP / (TP + FP + FN)`` and the background IoU
    ``TN / (TN + FN + FP)``, as the lineage (WILeroy/retina_unet) printed it. Undefined ratios
    are NaN.
    """
    n = tp + fp + tn + fn
    iou = _ratio(tp, tp + fp + fn)
    iou_background = _ratio(tn, tn + fp + fn)
    return {
        "acc": _ratio(tp + tn, n),
        "se": _ratio(tp, tp + fn),
        "sp": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": iou,
        "miou": (iou + iou_background) / 2.0,
    }


def roc_pr_auc(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Exact AUC-ROC and AUC-PR of ``scores`` against binary ``labels``.

    All scores are sorted; tied scores form one threshold (one ROC point), so AUC-ROC is the
    trapezoidal area, equal to the Mann-Whitney ``P(s+ > s-) + P(s+ = s-) / 2``. AUC-PR is the
    average precision ``sum_k (R_k - R_{k-1}) P_k`` over the same thresholds (step-wise, no
    interpolation; scikit-learn's ``average_precision_score``). NaN when a class is absent.
    """
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if scores.size != labels.size:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if scores.size == 0:
        return float("nan"), float("nan")
    order = np.argsort(scores)[::-1]  # descending; order within ties does not matter
    sorted_scores = scores[order]
    tp_cum = np.cumsum(labels[order], dtype=np.int64)
    del order
    # Last index of each run of equal scores: the counts when thresholding at that score.
    last = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    last = np.append(last, sorted_scores.size - 1)
    tps = tp_cum[last].astype(np.float64)
    fps = (last + 1).astype(np.float64) - tps
    positives, negatives = tps[-1], fps[-1]
    if positives == 0:
        return float("nan"), float("nan")
    tpr = np.concatenate([[0.0], tps / positives])
    auc_roc = float("nan")
    if negatives > 0:
        fpr = np.concatenate([[0.0], fps / negatives])
        auc_roc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    precision = tps / (tps + fps)
    auc_pr = float(np.sum(np.diff(tpr) * precision))
    return auc_roc, auc_pr


class ConfusionMatrix:
    """Streaming vessel confusion matrix over many images (counts only, no AUC).

    A pixel is predicted vessel when ``prob >= threshold``. Only pixels inside the FOV are
    counted unless ``whole_image`` is set (in the constructor or per ``update``) or no FOV is
    given.

    Example:
        >>> import numpy as np
        >>> cm = ConfusionMatrix()
        >>> cm.update(np.array([[0.9, 0.6], [0.2, 0.1]]), np.array([[1, 0], [1, 0]], bool))
        >>> cm.tp, cm.fp, cm.fn, cm.tn
        (1, 1, 1, 1)
    """

    def __init__(self, threshold: float = 0.5, whole_image: bool = False) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.whole_image = bool(whole_image)
        self.reset()

    def reset(self) -> None:
        self.tp = self.fp = self.tn = self.fn = 0

    def _select(self, prob: np.ndarray, label: np.ndarray, fov: np.ndarray | None,
                whole_image: bool | None) -> tuple[np.ndarray, np.ndarray]:
        prob, label, fov = _validate(prob, label, fov)
        whole = self.whole_image if whole_image is None else whole_image
        if fov is None or whole:
            return prob.ravel(), label.ravel()
        return prob[fov], label[fov]

    def _count(self, prob: np.ndarray, label: np.ndarray) -> None:
        pred = prob >= self.threshold
        tp = int(np.count_nonzero(pred & label))
        fp = int(np.count_nonzero(pred)) - tp
        fn = int(np.count_nonzero(label)) - tp
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.tn += int(label.size) - tp - fp - fn

    def update(self, prob: np.ndarray, label: np.ndarray, fov: np.ndarray | None = None,
               whole_image: bool | None = None) -> None:
        """Adds one image: ``prob`` float HxW in [0, 1], ``label`` and ``fov`` bool HxW.

        ``whole_image=None`` uses the constructor's setting.
        """
        self._count(*self._select(prob, label, fov, whole_image))

    def confusion_matrix(self) -> np.ndarray:
        """``[[TN, FP], [FN, TP]]`` (rows: truth background/vessel, columns: prediction)."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=np.int64)

    def result(self) -> dict[str, float | int]:
        """Acc, se, sp, precision, f1, iou, miou and the counts tp, fp, tn, fn, n_pixels."""
        out: dict[str, float | int] = counts_metrics(self.tp, self.fp, self.tn, self.fn)
        out.update(tp=self.tp, fp=self.fp, tn=self.tn, fn=self.fn,
                   n_pixels=self.tp + self.fp + self.tn + self.fn)
        return out


class VesselMetrics(ConfusionMatrix):
    """:class:`ConfusionMatrix` plus exact AUC-ROC and AUC-PR over all accumulated pixels.

    The counted pixels' probabilities are kept as float32 per image (plus the bool labels) and
    concatenated by ``result()``: 5 bytes per pixel, ~33 MB for the DRIVE test set
    (20 x ~330k FOV pixels). AUCs are from :func:`roc_pr_auc` (trapezoidal ROC with tied scores
    grouped; AUC-PR = average precision, step-wise).
    """

    def reset(self) -> None:
        super().reset()
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, prob: np.ndarray, label: np.ndarray, fov: np.ndarray | None = None,
               whole_image: bool | None = None) -> None:
        prob, label = self._select(prob, label, fov, whole_image)
        self._count(prob, label)
        self._scores.append(np.array(prob, dtype=np.float32))
        self._labels.append(np.array(label, dtype=bool))

    def scores_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """All counted probabilities (float32) and labels (bool), concatenated in update order."""
        if not self._scores:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        return np.concatenate(self._scores), np.concatenate(self._labels)

    def result(self) -> dict[str, float | int]:
        out = super().result()
        if self._scores:
            auc_roc, auc_pr = roc_pr_auc(*self.scores_and_labels())
        else:
            auc_roc = auc_pr = float("nan")
        out["auc_roc"] = auc_roc
        out["auc_pr"] = auc_pr
        return out


def counted_av_pixels(target_av: np.ndarray, fov: np.ndarray | None = None) -> np.ndarray:
    """The pixels A/V metrics count: ground-truth vessel pixels that are artery XOR vein (no
    crossings, no uncertain ones), inside the FOV when one is given. ``target_av`` HxWx3 bool."""
    artery, vein, vessel = target_av[..., 0], target_av[..., 1], target_av[..., 2]
    counted = (artery ^ vein) & vessel
    if fov is not None:
        fov = np.asarray(fov).astype(bool)
        if fov.shape != counted.shape:
            raise ValueError(f"FOV mask shape {fov.shape} differs from A/V map size "
                             f"{counted.shape}")
        counted &= fov
    return counted


class AVMetrics:
    """Streaming artery/vein classification metrics on ground-truth vessel pixels.

    Counted pixels: ground-truth vessel pixels that are artery XOR vein, inside the FOV when one
    is given; crossings (artery and vein) and uncertain pixels (vessel only) are excluded. A pixel
    is predicted artery when ``p_artery >= p_vein``, whatever the predicted vessel probability.
    Artery is the positive class: TP = artery called artery, FN = artery called vein,
    TN = vein called vein, FP = vein called artery. So Se = arteries right, Sp = veins right.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tp = self.fp = self.tn = self.fn = 0

    def update(self, pred_av: np.ndarray, target_av: np.ndarray,
               fov: np.ndarray | None = None) -> None:
        """``pred_av`` HxWx3 probabilities (artery, vein, vessel), ``target_av`` HxWx3 bool."""
        pred_av = np.asarray(pred_av)
        target_av = np.asarray(target_av).astype(bool)
        if pred_av.ndim != 3 or pred_av.shape[-1] < 2 or target_av.ndim != 3 \
                or target_av.shape[-1] < 3 or pred_av.shape[:2] != target_av.shape[:2]:
            raise ValueError("expected HxWx3 predictions and HxWx3 (artery, vein, vessel) targets "
                             f"of the same size, got {pred_av.shape} and {target_av.shape}")
        counted = counted_av_pixels(target_av, fov)
        called_artery = pred_av[..., 0] >= pred_av[..., 1]
        is_artery = target_av[..., 0][counted]
        called = called_artery[counted]
        tp = int(np.count_nonzero(is_artery & called))
        fn = int(np.count_nonzero(is_artery)) - tp
        fp = int(np.count_nonzero(called)) - tp
        self.tp += tp
        self.fn += fn
        self.fp += fp
        self.tn += int(is_artery.size) - tp - fn - fp

    def confusion_matrix(self) -> np.ndarray:
        """``[[TN, FP], [FN, TP]]`` with vein as row/column 0 and artery as 1."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=np.int64)

    def result(self) -> dict[str, float | int]:
        """acc, se (arteries right), sp (veins right), precision and f1 for artery, and counts."""
        tp, fp, tn, fn = self.tp, self.fp, self.tn, self.fn
        return {
            "acc": _ratio(tp + tn, tp + fp + tn + fn),
            "se": _ratio(tp, tp + fn),
            "sp": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "n_artery": tp + fn, "n_vein": tn + fp, "n_pixels": tp + fp + tn + fn,
        }


def ripav_cleanup(mask: np.ndarray, remove_area: int = 100, fill_area: int = 20) -> np.ndarray:
    """RIP-AV's clean-up of a binary mask (``binaryPostProcessing3`` in its code): connected
    components (8-connected) under ``remove_area`` pixels removed, a 3x3 closing, then holes
    under ``fill_area`` pixels filled.

    Example:
        >>> import numpy as np
        >>> m = np.zeros((30, 30), bool); m[5:25, 5:25] = True; m[10, 10] = False  # 1-px hole
        >>> m[0, 28] = True                                                       # a speck
        >>> out = ripav_cleanup(m)
        >>> bool(out[10, 10]), bool(out[0, 28]), int(out.sum())
        (True, False, 400)
    """
    mask = np.asarray(mask).astype(bool)
    labels = measure.label(mask, connectivity=2)
    kept = np.bincount(labels.ravel()) >= remove_area
    kept[0] = False
    square = np.ones((3, 3), bool)  # closing; outside the image counts as set for the erosion
    out = ndimage.binary_erosion(ndimage.binary_dilation(kept[labels], square), square,
                                 border_value=1)
    holes = ndimage.binary_fill_holes(out) & ~out
    hole_labels = measure.label(holes, connectivity=2)
    small = np.bincount(hole_labels.ravel()) < fill_area
    small[0] = False
    return out | small[hole_labels]


class RipavAVMetrics:
    """Artery/vein metrics by RIP-AV's evaluation protocol (Dai et al., "RIP-AV: Joint
    Representative Instance Pre-training with Context Aware Network for Retinal Artery/Vein
    Segmentation", MICCAI 2024; its code's ``AVclassifiationMetrics_skeletonPixles`` with
    ``strict_mode=True`` and ``Evalution_AV_skeletonPixles``), reported as ``av_acc_ripav`` beside
    retina_tf's own all-pixel :class:`AVMetrics`.

    Per image, only ground-truth vessel pixels are looked at (uncertain ones included). Predicted
    artery = artery probability > 0.5, predicted vein = vein probability >= 0.5, each mask
    cleaned by :func:`ripav_cleanup`. TP = predicted artery on artery, TN = predicted vein on
    vein, FP = predicted artery on vein, FN = predicted vein on artery, crossings (artery and
    vein at once) left out of FP and FN; a pixel predicted as neither class is not counted, and
    one predicted as both counts twice. Accuracy, Se (arteries right) and Sp (veins right) per
    image, then their means over the images. The artery and vein AUCs are pooled over the FOV
    pixels labelled artery or vein (crossings in both).

    Labels: retina_tf's ``(artery, vein, vessel)`` targets are the protocol's (RITE colours read
    with channel >= 128: artery = red or green, vein = green or blue, white in neither).
    """

    def __init__(self) -> None:
        self.acc: list[float] = []
        self.se: list[float] = []
        self.sp: list[float] = []
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, pred_av: np.ndarray, target_av: np.ndarray,
               fov: np.ndarray | None = None) -> None:
        """``pred_av`` HxWx3 probabilities (artery, vein, vessel), ``target_av`` HxWx3 bool,
        ``fov`` HxW (for the AUCs; None: the whole image)."""
        pred_av = np.asarray(pred_av, np.float32)
        target_av = np.asarray(target_av).astype(bool)
        artery, vein, vessel = (target_av[..., i] for i in range(3))
        artery, vein = artery & vessel, vein & vessel
        both = artery & vein
        called_artery = ripav_cleanup(vessel & (pred_av[..., 0] > 0.5))
        called_vein = ripav_cleanup(vessel & (pred_av[..., 1] >= 0.5))
        tp = np.count_nonzero(called_artery & artery)
        tn = np.count_nonzero(called_vein & vein)
        fp = np.count_nonzero(called_artery & vein & ~both)
        fn = np.count_nonzero(called_vein & artery & ~both)
        self.acc.append(_ratio(tp + tn, tp + tn + fp + fn))
        self.se.append(_ratio(tp, tp + fn))
        self.sp.append(_ratio(tn, tn + fp))
        counted = artery | vein
        if fov is not None:
            counted &= np.asarray(fov).astype(bool)
        self._scores.append(pred_av[..., :2][counted])
        self._labels.append(np.stack([artery[counted], vein[counted]], -1))

    def result(self) -> dict[str, float | int]:
        """acc, se, sp (means over images; NaN-free images only), auc_artery, auc_vein, images."""
        def mean(values: list[float]) -> float:
            finite = [v for v in values if np.isfinite(v)]
            return float(np.mean(finite)) if finite else float("nan")

        out: dict[str, float | int] = {"acc": mean(self.acc), "se": mean(self.se),
                                       "sp": mean(self.sp), "images": len(self.acc)}
        scores = np.concatenate(self._scores) if self._scores else np.zeros((0, 2))
        labels = np.concatenate(self._labels) if self._labels else np.zeros((0, 2), bool)
        for i, name in enumerate(("artery", "vein")):
            both_classes = labels[:, i].any() and not labels[:, i].all()
            out[f"auc_{name}"] = (roc_pr_auc(scores[:, i], labels[:, i])[0] if both_classes
                                  else float("nan"))
        return out


_METRIC_NAMES = {
    "acc": "Accuracy", "se": "Sensitivity (Se)", "sp": "Specificity (Sp)", "precision": "Precision",
    "f1": "F1 (Dice)", "iou": "IoU", "miou": "mIoU", "auc_roc": "AUC-ROC", "auc_pr": "AUC-PR",
}


def format_table(result: dict[str, Any],
                 class_names: tuple[str, str] = ("background", "vessel")) -> str:
    """The confusion matrix and the metric table as text, as the lineage printed after evaluation.

    Works for :class:`ConfusionMatrix`, :class:`VesselMetrics` and :class:`AVMetrics` results
    (pass ``class_names=("vein", "artery")`` for the latter).
    """
    neg, pos = class_names
    lines = []
    if all(k in result for k in ("tp", "fp", "tn", "fn")):
        width = max(len(str(result[k])) for k in ("tp", "fp", "tn", "fn"))
        width = max(width, len(neg) + 5, len(pos) + 5)
        label_width = max(len(neg), len(pos)) + 5
        lines.append("Confusion matrix (rows: ground truth, columns: prediction)")
        lines.append(" " * label_width + f"  {'pred ' + neg:>{width}}  {'pred ' + pos:>{width}}")
        lines.append(f"{'true ' + neg:<{label_width}}  "
                     f"{result['tn']:>{width}}  {result['fp']:>{width}}")
        lines.append(f"{'true ' + pos:<{label_width}}  "
                     f"{result['fn']:>{width}}  {result['tp']:>{width}}")
        lines.append("")
    lines.append(f"{'Metric':<18}  Value")
    for key, title in _METRIC_NAMES.items():
        if key in result:
            lines.append(f"{title:<18}  {float(result[key]):.4f}")
    if "n_pixels" in result:
        lines.append(f"{'Pixels counted':<18}  {result['n_pixels']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Keras training metrics


def _weight_like(sample_weight: Any, y_pred: Any) -> Any:
    """FOV map ``(B, H, W)``, ``(B, H, W, 1)`` or ``(B,)`` broadcast to ``y_pred``'s shape."""
    rank = len(y_pred.shape)
    weight = ops.cast(sample_weight, "float32")
    w_rank = len(weight.shape)
    if w_rank == rank - 1:
        weight = ops.expand_dims(weight, -1)
    elif w_rank == 1 and rank > 1:
        weight = ops.reshape(weight, (-1,) + (1,) * (rank - 1))
    return ops.broadcast_to(weight, ops.shape(y_pred))


@keras.saving.register_keras_serializable(package="retina_tf")
class SegmentationF1(keras.metrics.Metric):
    """Streaming F1 (= Dice) of thresholded sigmoid outputs, FOV map as ``sample_weight``.

    Accumulates weighted TP, FP and FN over all pixels (and channels, or one ``channel``) of
    ``(B, H, W, C)`` batches; ``keras.metrics.F1Score`` wants 2-D inputs, hence this class.
    Counts are float64 so they stay exact over an epoch of patches.

    Args:
        threshold: a pixel is vessel when its probability is ``>= threshold``.
        from_logits: apply a sigmoid to ``y_pred`` first (models return logits).
        channel: count only this output channel (e.g. 0 = artery); ``None`` pools all channels.

    Example:
        >>> import numpy as np
        >>> f1 = SegmentationF1(from_logits=False)
        >>> f1.update_state(np.array([[1.0, 0.0, 1.0]]), np.array([[0.9, 0.8, 0.1]]))
        >>> round(float(f1.result()), 3)  # TP 1, FP 1, FN 1
        0.5
    """

    def __init__(self, threshold: float = 0.5, from_logits: bool = True, channel: int | None = None,
                 name: str = "f1", dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.threshold = float(threshold)
        self.from_logits = bool(from_logits)
        self.channel = None if channel is None else int(channel)
        self.true_positives = self.add_variable((), initializer="zeros", dtype="float64", name="tp")
        self.false_positives = self.add_variable((), initializer="zeros", dtype="float64",
                                                 name="fp")
        self.false_negatives = self.add_variable((), initializer="zeros", dtype="float64",
                                                 name="fn")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "float32")
        if self.channel is not None:
            y_pred = y_pred[..., self.channel:self.channel + 1]
            y_true = y_true[..., self.channel:self.channel + 1]
            if sample_weight is not None and len(sample_weight.shape) == len(y_pred.shape) \
                    and sample_weight.shape[-1] not in (1, None):
                sample_weight = sample_weight[..., self.channel:self.channel + 1]
        prob = ops.sigmoid(y_pred) if self.from_logits else y_pred
        pred = ops.cast(prob >= self.threshold, "float32")
        truth = ops.cast(y_true > 0.5, "float32")
        weight = ops.ones_like(pred) if sample_weight is None else _weight_like(sample_weight, pred)
        tp = ops.sum(weight * pred * truth)
        fp = ops.sum(weight * pred * (1.0 - truth))
        fn = ops.sum(weight * (1.0 - pred) * truth)
        self.true_positives.assign_add(ops.cast(tp, "float64"))
        self.false_positives.assign_add(ops.cast(fp, "float64"))
        self.false_negatives.assign_add(ops.cast(fn, "float64"))

    def result(self) -> Any:
        tp = self.true_positives
        denominator = 2.0 * tp + self.false_positives + self.false_negatives
        return ops.cast(ops.divide_no_nan(2.0 * tp, denominator), "float32")

    def reset_state(self) -> None:
        for variable in (self.true_positives, self.false_positives, self.false_negatives):
            variable.assign(ops.zeros((), "float64"))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(threshold=self.threshold, from_logits=self.from_logits, channel=self.channel)
        return config


@keras.saving.register_keras_serializable(package="retina_tf")
class SegmentationAUC(keras.metrics.AUC):
    """``keras.metrics.AUC`` that also takes a ``(B, H, W)`` FOV map for ``(B, H, W, C)`` outputs.

    Keras' AUC broadcasts ``sample_weight`` against ``y_pred``, which works for ``(B, H, W, 1)``
    but not for ``(B, H, W)``; this adds the channel axis. Approximate (``num_thresholds``
    buckets); the exact AUC for reporting comes from :class:`VesselMetrics`.
    """

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        if sample_weight is not None:
            sample_weight = _weight_like(sample_weight, y_pred)
        super().update_state(y_true, y_pred, sample_weight=sample_weight)


def vessel_auc(curve: str = "ROC", num_thresholds: int = 200, from_logits: bool = True,
               name: str | None = None) -> keras.metrics.AUC:
    """A Keras AUC for training on logits ``(B, H, W, C)`` with the FOV as ``sample_weight``.

    ``curve`` is ``"ROC"`` or ``"PR"``; the name defaults to ``auc`` / ``auc_pr``.
    """
    curve = curve.upper()
    if curve not in ("ROC", "PR"):
        raise ValueError(f"curve must be 'ROC' or 'PR', got {curve!r}")
    if name is None:
        name = "auc" if curve == "ROC" else "auc_pr"
    return SegmentationAUC(num_thresholds=num_thresholds, curve=curve, from_logits=from_logits,
                           name=name)
