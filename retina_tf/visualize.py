"""Pictures of results: probability maps, masks, overlays on the photograph, A/V maps, contact
sheets, ROC / PR curves.

Pure functions return uint8 arrays; ``save_*`` functions write PNGs atomically.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import cv2
import numpy as np

from retina_tf.data.io import atomic_write_bytes, write_image_atomic

TP_COLOUR = (0, 255, 0)    # green: vessel found
FP_COLOUR = (255, 0, 0)    # red: false alarm
FN_COLOUR = (0, 0, 255)    # blue: vessel missed
ARTERY_COLOUR = (255, 0, 0)
VEIN_COLOUR = (0, 0, 255)
UNCERTAIN_COLOUR = (255, 255, 255)  # white: a label's crossing or uncertain vessel pixel
# Cyan: the complement of a fundus photograph's red-orange, so the tint stands out everywhere.
VESSEL_COLOUR = (0, 255, 255)
# Probabilities below this leave the photograph untouched: the network's faint background
# noise would otherwise tint the whole FOV.
ALPHA_FLOOR = 0.1


def probability_image(prob: np.ndarray) -> np.ndarray:
    """float probabilities in [0, 1] -> uint8 0..255 (same shape)."""
    return (np.clip(prob, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def mask_image(mask: np.ndarray) -> np.ndarray:
    """A bool mask as a 0/255 uint8 picture (in uint8 throughout: np.where would make an int64
    array eight times the picture's size first)."""
    return np.asarray(mask, bool).view(np.uint8) * np.uint8(255)


def muted_photo(photo: np.ndarray, brightness: float = 0.75) -> np.ndarray:
    """The photograph in gray, dimmed: the background of class colours (TP/FP/FN, artery/vein),
    which a red-orange fundus would drown (a red false positive on a red retina)."""
    photo = np.asarray(photo, np.uint8)
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY) if photo.ndim == 3 else photo
    gray = (gray.astype(np.float32) * brightness).round().astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def vessel_overlay(photo: np.ndarray, prob: np.ndarray, colour=VESSEL_COLOUR,
                   floor: float = ALPHA_FLOOR) -> np.ndarray:
    """The vessel map drawn over the photograph: each pixel tinted towards ``colour`` by its
    vessel probability (the alpha), so uncertain vessels show faint. Pixels under ``floor``
    keep the photograph's exact values.

    Example:
        >>> import numpy as np
        >>> photo = np.full((1, 3, 3), 100, np.uint8)
        >>> vessel_overlay(photo, np.array([[0.0, 0.5, 1.0]]))[0].tolist()
        [[100, 100, 100], [50, 178, 178], [0, 255, 255]]
    """
    photo = np.asarray(photo, np.uint8)
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=-1)
    alpha = np.clip(np.asarray(prob, np.float32), 0.0, 1.0)
    alpha = np.where(alpha >= floor, alpha, 0.0)[..., None]
    out = photo.astype(np.float32) * (1.0 - alpha) + np.float32(colour) * alpha
    return np.where(alpha > 0, out.round(), photo).astype(np.uint8)


def overlay(pred: np.ndarray, label: np.ndarray, fov: np.ndarray | None = None,
            photo: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 comparison: true positives green, false positives red, false negatives blue.

    Without ``photo``, true negatives are black inside the FOV and dark gray outside it, so the
    FOV is visible; with it, they show the photograph (:func:`muted_photo`). Given ``fov``,
    only its pixels are coloured, as only they are scored.
    """
    pred, label = pred.astype(bool), label.astype(bool)
    if fov is not None:
        pred, label = pred & fov.astype(bool), label & fov.astype(bool)
    if photo is not None:
        out = muted_photo(photo)
    else:
        out = np.zeros(pred.shape + (3,), np.uint8)
        if fov is not None:
            out[~fov.astype(bool)] = (40, 40, 40)
    out[pred & label] = TP_COLOUR
    out[pred & ~label] = FP_COLOUR
    out[~pred & label] = FN_COLOUR
    return out


def av_image(av: np.ndarray, vessel_threshold: float = 0.5,
             photo: np.ndarray | None = None) -> np.ndarray:
    """A/V probabilities or labels (H, W, 3: artery, vein, vessel) -> red artery, blue vein, on
    black or, given ``photo``, over the photograph (:func:`muted_photo`)."""
    av = np.asarray(av, np.float32)
    vessel = av[..., 2] >= vessel_threshold
    artery = vessel & (av[..., 0] >= av[..., 1])
    out = muted_photo(photo) if photo is not None else np.zeros(av.shape[:2] + (3,), np.uint8)
    out[artery] = ARTERY_COLOUR
    out[vessel & ~artery] = VEIN_COLOUR
    return out


def av_label_image(target: np.ndarray, photo: np.ndarray | None = None) -> np.ndarray:
    """An A/V label (H, W, 3 bool: artery, vein, vessel) as :func:`av_image` draws predictions:
    red artery, blue vein, and white where the label says crossing or uncertain (artery ==
    vein on a vessel pixel; :func:`av_image` would call those arteries)."""
    target = np.asarray(target).astype(bool)
    artery, vein, vessel = target[..., 0], target[..., 1], target[..., 2]
    out = muted_photo(photo) if photo is not None else np.zeros(target.shape[:2] + (3,), np.uint8)
    out[vessel & artery & ~vein] = ARTERY_COLOUR
    out[vessel & vein & ~artery] = VEIN_COLOUR
    out[vessel & (artery == vein)] = UNCERTAIN_COLOUR
    return out


def av_error_image(pred: np.ndarray, target: np.ndarray,
                   photo: np.ndarray | None = None) -> np.ndarray:
    """Predicted A/V colours on ground-truth vessel pixels, green where the class is wrong, on
    black or, given ``photo``, over the photograph.

    Crossing and uncertain pixels (artery == vein in the target) are shown white.
    """
    target = target.astype(bool)
    out = av_image(np.concatenate([pred[..., :2], target[..., 2:3].astype(np.float32)], -1),
                   photo=photo)
    ambiguous = target[..., 2] & (target[..., 0] == target[..., 1])
    wrong = target[..., 2] & ~ambiguous & ((pred[..., 0] >= pred[..., 1]) != target[..., 0])
    out[ambiguous] = UNCERTAIN_COLOUR
    out[wrong] = (0, 255, 0)
    return out


# --- sheets of pictures ------------------------------------------------------------------------

BAND_HEIGHT = 28               # px of the dark strip that carries a title
BAND_COLOUR = (32, 32, 32)
TEXT_COLOUR = (255, 255, 255)
GAP = 4                        # px between pictures
_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Class colours as text on the dark band (pure blue on near-black is hard to read).
LEGEND_COLOURS = {TP_COLOUR: (60, 230, 60), FP_COLOUR: (255, 70, 70), FN_COLOUR: (110, 150, 255)}

# A title: plain text, or (text, RGB colour) pieces written one after the other.
Title = str | list[tuple[str, tuple[int, int, int]]]


def legend(*pieces: tuple[str, tuple[int, int, int]], prefix: str = "") -> Title:
    """A title naming colours in their colour, e.g. ``legend(("TP", TP_COLOUR), ...)``."""
    title = [(prefix, TEXT_COLOUR)] if prefix else []
    return title + [(f"{text} ", LEGEND_COLOURS.get(tuple(c), tuple(c))) for text, c in pieces]


def _pieces(title: Title) -> list[tuple[str, tuple[int, int, int]]]:
    return [(title, TEXT_COLOUR)] if isinstance(title, str) else list(title)


def _text_width(pieces, scale: float) -> int:
    return sum(cv2.getTextSize(t, _FONT, scale, 1)[0][0] for t, _ in pieces)


def text_band(title: Title, width: int, height: int = BAND_HEIGHT, scale: float = 0.55
              ) -> np.ndarray:
    """A dark strip ``width`` px wide with ``title`` written on it (cv2.putText), shrunk down to
    0.35 of the font to fit, and cut short with '..' when even that is too wide."""
    band = np.empty((height, max(width, 1), 3), np.uint8)
    band[:] = BAND_COLOUR
    pieces = [(t, c) for t, c in _pieces(title) if t]
    room = width - 10
    while scale > 0.35 and _text_width(pieces, scale) > room:
        scale = round(scale - 0.05, 2)
    while pieces and _text_width(pieces, scale) > room:
        text, colour = pieces[-1]
        text = text.rstrip(".")[:-1]
        pieces[-1] = (text + "..", colour) if text else pieces[-1]
        if not text:
            pieces.pop()
    (_, text_height), _ = cv2.getTextSize("Ag", _FONT, scale, 1)
    x, y = 5, (height + text_height) // 2
    for text, colour in pieces:
        cv2.putText(band, text, (x, y), _FONT, scale, tuple(int(v) for v in colour), 1,
                    cv2.LINE_AA)
        x += cv2.getTextSize(text, _FONT, scale, 1)[0][0]
    return band


def to_height(image: np.ndarray, height: int) -> np.ndarray:
    """``image`` (gray or RGB uint8) as RGB, resized to ``height`` px with its aspect ratio;
    area averaging when shrinking, so thin vessels fade rather than vanish."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    h, w = image.shape[:2]
    if h == height:
        return image
    width = max(int(round(w * height / h)), 1)
    interpolation = cv2.INTER_AREA if height < h else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def _hstack(parts: list[np.ndarray], gap: int = GAP) -> np.ndarray:
    height = max(p.shape[0] for p in parts)
    spacer = np.zeros((height, gap, 3), np.uint8)
    spacer[:] = BAND_COLOUR
    out = []
    for i, part in enumerate(parts):
        if i:
            out.append(spacer)
        out.append(_pad_to(part, height, part.shape[1]))
    return np.concatenate(out, axis=1)


def _pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` in the top-left corner of a ``height`` x ``width`` dark canvas."""
    if image.shape[:2] == (height, width):
        return image
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = BAND_COLOUR
    canvas[:image.shape[0], :image.shape[1]] = image
    return canvas


def _vstack(parts: list[np.ndarray]) -> np.ndarray:
    width = max(p.shape[1] for p in parts)
    return np.concatenate([_pad_to(p, p.shape[0], width) for p in parts], axis=0)


def _font_for(height: int) -> tuple[int, float]:
    """(strip height, font scale) for pictures ``height`` px high: the text grows with large
    pictures, which are usually looked at scaled down."""
    scale = max(0.55, round(height / 700, 2))
    return int(round(BAND_HEIGHT * scale / 0.55)), scale


def titled_panels(panels: list[tuple[Title, np.ndarray]], height: int) -> np.ndarray:
    """Pictures side by side, each resized to ``height`` px with its title above it."""
    band, scale = _font_for(height)
    return _hstack([_vstack([text_band(title, image.shape[1], band, scale), image])
                    for title, image in ((t, to_height(i, height)) for t, i in panels)])


def with_caption(image: np.ndarray, title: Title, height: int = 256) -> np.ndarray:
    """``image`` with ``title`` on a strip above it, as wide as the image; the font as for
    pictures ``height`` px high."""
    band, scale = _font_for(height)
    return _vstack([text_band(title, image.shape[1], band, scale), image])


def contact_sheet(rows: list[tuple[Title, list[np.ndarray]]], column_titles: list[Title],
                  height: int = 256) -> np.ndarray:
    """One RGB picture with one row per image: the row's title (e.g. the image name and its F1)
    on a strip above its pictures, which are resized to ``height`` px; ``column_titles`` head
    the columns once, at the top."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    resized = [(title, [to_height(p, height) for p in pictures]) for title, pictures in rows]
    # each column as wide as its widest picture, so that its title heads it in every row
    widths = [max(pictures[i].shape[1] for _, pictures in resized if i < len(pictures))
              for i in range(max(len(pictures) for _, pictures in resized))]
    header = _hstack([text_band(t, w) for t, w in zip(column_titles, widths)])
    parts = [header]
    for title, pictures in resized:
        row = _hstack([np.pad(p, ((0, 0), (0, w - p.shape[1]), (0, 0)))
                       for p, w in zip(pictures, widths)])
        spacer = np.zeros((GAP, row.shape[1], 3), np.uint8)
        parts += [spacer, text_band(title, row.shape[1], scale=0.6), row]
    return _vstack(parts)


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
        with warnings.catch_warnings():  # a title in a script the font lacks (a run's name)
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out_dir / name, buffer.getvalue())
        written.append(out_dir / name)
    return written[0], written[1]
