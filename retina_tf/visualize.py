"""Pictures of results: probability maps, masks, the lineage's overlay, A/V maps, ROC / PR curves.

Pure functions return uint8 arrays; ``save_*`` functions write PNGs atomically.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from retina_tf.data.io import atomic_write_bytes, write_image_atomic

TP_COLOUR = (0, 255, 0)    # green: vessel found
FP_COLOUR = (255, 0, 0)    # red: false alarm
FN_COLOUR = (0, 0, 255)    # blue: vessel missed


def probability_image(prob: np.ndarray) -> np.ndarray:
    """float probabilities in [0, 1] -> uint8 0..255 (same shape)."""
    return (np.clip(prob, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def mask_image(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 255, 0).astype(np.uint8)


def overlay(pred: np.ndarray, label: np.ndarray, fov: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 comparison: true positives green, false positives red, false negatives blue.

    True negatives are black inside the FOV and dark gray outside it, so the FOV is visible.
    """
    pred, label = pred.astype(bool), label.astype(bool)
    out = np.zeros(pred.shape + (3,), np.uint8)
    if fov is not None:
        out[~fov.astype(bool)] = (40, 40, 40)
    out[pred & label] = TP_COLOUR
    out[pred & ~label] = FP_COLOUR
    out[~pred & label] = FN_COLOUR
    return out


def av_image(av: np.ndarray, vessel_threshold: float = 0.5) -> np.ndarray:
    """A/V probabilities or labels (H, W, 3: artery, vein, vessel) -> red artery, blue vein."""
    av = np.asarray(av, np.float32)
    vessel = av[..., 2] >= vessel_threshold
    artery = vessel & (av[..., 0] >= av[..., 1])
    out = np.zeros(av.shape[:2] + (3,), np.uint8)
    out[artery] = (255, 0, 0)
    out[vessel & ~artery] = (0, 0, 255)
    return out


def av_error_image(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Predicted A/V colours on ground-truth vessel pixels, green where the class is wrong.

    Crossing and uncertain pixels (artery == vein in the target) are shown white.
    """
    target = target.astype(bool)
    out = av_image(np.concatenate([pred[..., :2], target[..., 2:3].astype(np.float32)], -1))
    ambiguous = target[..., 2] & (target[..., 0] == target[..., 1])
    wrong = target[..., 2] & ~ambiguous & ((pred[..., 0] >= pred[..., 1]) != target[..., 0])
    out[ambiguous] = (255, 255, 255)
    out[wrong] = (0, 255, 0)
    return out


def curves(scores: np.ndarray, labels: np.ndarray, points: int = 1024
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ROC (fpr, tpr) and PR (recall, precision) at ``points`` thresholds, for plotting only.

    The AUC figures printed beside them come from the exact computation in ``metrics``.
    """
    labels = labels.astype(bool)
    bins = np.clip((scores * (points - 1)).astype(np.int64), 0, points - 1)
    pos = np.bincount(bins[labels], minlength=points)[::-1].cumsum()
    neg = np.bincount(bins[~labels], minlength=points)[::-1].cumsum()
    # Thresholds above every score select nothing: no curve point (precision is undefined).
    keep = pos + neg > 0
    pos, neg = pos[keep], neg[keep]
    tpr = np.concatenate([[0.0], pos / max(pos[-1], 1)])
    fpr = np.concatenate([[0.0], neg / max(neg[-1], 1)])
    precision = np.concatenate([[1.0], pos / (pos + neg)])
    return fpr, tpr, tpr, precision


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Writes ``image`` as a PNG atomically (the folder is created with it); returns the path.

    Raises:
        OutputError: when the file cannot be written (it names the path).
    """
    path = Path(path)
    write_image_atomic(path, image)
    return path


def save_curves(scores: np.ndarray, labels: np.ndarray, out_dir: str | os.PathLike,
                auc_roc: float, auc_pr: float, title: str = "") -> tuple[Path, Path]:
    """Writes ``roc_curve.png`` and ``pr_curve.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)  # created by the first atomic write, not before the plots exist
    fpr, tpr, recall, precision = curves(scores, labels)
    written = []
    for name, x, y, xl, yl, label in (
            ("roc_curve.png", fpr, tpr, "false positive rate (1 - Sp)", "true positive rate (Se)",
             f"AUC-ROC = {auc_roc:.4f}"),
            ("pr_curve.png", recall, precision, "recall (Se)", "precision",
             f"AUC-PR = {auc_pr:.4f}")):
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        ax.plot(x, y, lw=2, label=label)
        if name == "roc_curve.png":
            ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=1)
        ax.set(xlabel=xl, ylabel=yl, xlim=(0, 1), ylim=(0, 1.01), title=title or name[:-4])
        ax.legend(loc="lower right" if name == "roc_curve.png" else "lower left")
        ax.grid(alpha=0.3)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out_dir / name, buffer.getvalue())
        written.append(out_dir / name)
    return written[0], written[1]
