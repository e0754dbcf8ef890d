"""Typed configurations of training, evaluation and prediction.

The library takes these frozen dataclasses and never changes them; the command-line scripts
build them from their flags (:mod:`retina_tf.flags`), and a Python user builds them directly.
Field names are the flag names, so a flagfile, a run folder's ``flags.txt`` and a config
describe one run alike (:func:`to_flag_lines` / :func:`from_flag_lines`; a flagfile of
``configs/`` as a command reads it: :func:`from_flagfile`).

Example:
    >>> from retina_tf.config import TrainConfig, to_flag_lines, from_flag_lines
    >>> cfg = TrainConfig(dataset="drive", data_dir="data/DRIVE", epochs=3,
    ...                   model_config={"base_filters": 16})
    >>> text = to_flag_lines(cfg)
    >>> "--epochs=3" in text and '--model_config={"base_filters": 16}' in text
    True
    >>> from_flag_lines(TrainConfig, text) == cfg
    True
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from retina_tf.data.preprocess import STEPS
from retina_tf.errors import ConfigError

__all__ = ["DataConfig", "RunRef", "InferenceConfig", "TrainConfig", "MAEConfig",
           "RipPatchConfig", "RipPretrainConfig", "EvalConfig", "PredictConfig",
           "ErrorMapConfig", "ExportConfig", "CompareConfig", "to_flag_lines",
           "from_flag_lines", "from_flagfile", "convert_value", "from_run",
           "field_names",
           "read_model_config"]

_FROZEN = dict(frozen=True, kw_only=True)


class _Checked:
    """Checks a config's fields when it is made: each value as its flag would be read (a number
    of the field's type, a string converted as on the command line, a list for a tuple) and by
    its flag's rule (:data:`RULES`, :data:`CHOICES`), so that the Python API refuses what
    the commands refuse, in one line naming the field (:func:`checked_value`)."""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            checked = checked_value(f.name, value, hints[f.name], type(self).__name__)
            if checked is not value:
                object.__setattr__(self, f.name, checked)  # frozen: set once, here
        _check_sources(self)
        _check_combinations(self)
        _check_folders(self)


@dataclasses.dataclass(**_FROZEN)
class DataConfig(_Checked):
    """Which images, and how they are preprocessed.

    Attributes:
        dataset: a dataset name of :mod:`retina_tf.data.catalog` (official layout), or None.
        data_dir: the dataset's folder.
        label_file_path: a seed-style label file of the training split instead of a dataset.
        test_label_file_path: the test split's label file (default: ``test.txt`` beside
            ``label_file_path``).
        task: "vessel" or "av"; None takes the model's own task (rip_av: av), else vessel.
        preprocess: preprocessing steps in order (:data:`retina_tf.data.preprocess.STEPS`),
            or ``("none",)``; as a flag also True / False (all four steps or none).
        channel: grayscale conversion, "luminance" or "green".
        cache_dir: cache of preprocessed images.
        seed: seed of sampling, augmentation and initialization.
    """

    dataset: str | None = None
    data_dir: str | None = None
    label_file_path: str | None = None
    test_label_file_path: str | None = None
    task: str | None = None
    preprocess: tuple[str, ...] = STEPS
    channel: str = "luminance"
    cache_dir: str | None = None
    seed: int = 0

    @property
    def names_data(self) -> bool:
        """Whether ``dataset``, ``data_dir`` or ``label_file_path`` says which images to use."""
        return bool(self.dataset or self.data_dir or self.label_file_path)


@dataclasses.dataclass(**_FROZEN)
class RunRef(_Checked):
    """Which run folder: ``model`` is a path, a shipped model name (``unet_drive``) or an
    architecture name meaning ``<logdir>/<run_name or model_dataset>``."""

    model: str = "unet"
    logdir: str = "logs"
    run_name: str | None = None


@dataclasses.dataclass(**_FROZEN)
class InferenceConfig(_Checked):
    """How a trained model segments a photograph (:class:`retina_tf.inference.Segmenter`).

    Attributes:
        inference: "auto", "whole" (fully convolutional) or "sliding" windows.
        stride: sliding-window stride in pixels.
        window: sliding-window size (0: the training patch size).
        eval_scales: inference scales of multi-scale models (None: the training scales).
        tta, tta_transpose: test-time augmentation over flips (and transposes); None: the
            run's choice (``run.json``, made on its held-out images), else off.
        av_vote, av_link: A/V models: one decision per vessel segment, linked at junctions;
            av_vote None: the run's choice, else off.
        threshold: probability threshold of the binary mask; None: the run's stored threshold
            (``run.json``, chosen F1-optimal on its held-out training images), else 0.5.
        inference_scale: the size a photograph is segmented at: "auto" (the training FOV
            diameter, shrinking by at most 3x), "training", "native" or a factor of the
            training FOV diameter (:func:`retina_tf.inference.inference_factor`).
        tile_size: whole-image inference in overlapping tiles of this side (0: automatic, for
            images over 2 Mpixel).
        precision: "float32", "bfloat16" (compute in bfloat16 with the float32 weights;
            :func:`retina_tf.inference.computing_in`) or "auto" (bfloat16 for U-Nets on CPUs
            with AVX512-BF16 or AMX; :func:`retina_tf.inference.resolve_precision`).
    """

    inference: str = "auto"
    stride: int = 16
    window: int = 0
    eval_scales: tuple[float, ...] | None = None
    tta: bool | None = None
    tta_transpose: bool | None = None
    av_vote: bool | None = None
    av_link: float = 1.0
    threshold: float | None = None
    inference_scale: str | float = "auto"
    tile_size: int = 0
    precision: str = "auto"


@dataclasses.dataclass(**_FROZEN)
class _Optimization(_Checked):
    """The optimization settings every training (segmentation, MAE, RIP) shares.

    ``max_iters`` (0: off) is the total number of training steps, and replaces ``epochs``:
    :func:`retina_tf.training.epoch_steps` shapes the epochs around it."""

    batch_size: int = 32
    epochs: int = 10
    max_iters: int = 0
    steps_per_epoch: int = 0
    patches_per_epoch: int = 20000
    time_budget_minutes: float = 0.0
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    ema_momentum: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    strategy: str = "auto"
    logical_cpus: int = 0
    jit_compile: bool = False
    mixed_precision: bool = False
    resume: bool = True
    overwrite: bool = False
    model_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(**_FROZEN)
class _Augmentation(_Checked):
    flip: bool = True
    rot90: bool = True
    rotate_degrees: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma_jitter: float = 0.0


@dataclasses.dataclass(**_FROZEN)
class TrainConfig(DataConfig, RunRef, _Optimization, _Augmentation):
    """Training of a segmentation model (``bin/train.py``; :func:`retina_tf.train`).

    ``model`` is the architecture (:func:`retina_tf.model_names`) and ``model_config`` its
    constructor arguments (e.g. ``{"depth": 4, "base_filters": 16}`` for the U-Net); the other
    fields are the flags of ``bin/train.py --help`` of the same names. ``stride`` and
    ``eval_scales`` are the whole-image validation's.
    """

    mode: str = "patch"
    patch_size: int = 48
    mixed_patch_sizes: tuple[int, ...] = ()
    scale_range: tuple[float, ...] = ()
    extra_data: tuple[str, ...] = ()
    balance_datasets: bool = True
    dataset_weights: tuple[float, ...] = ()
    camera_variants: int = 0
    camera_channel_gamma: float = 0.0
    vessel_probability: float = 0.5
    val_images: int = 2
    loss: str = "bce_dice"
    pos_weight: float = 1.0
    validate_every: int = 1
    image_summary_every: int = 1
    pretrained: str | None = None
    freeze_encoder_epochs: int = 0
    error_maps: str | None = None
    stride: int = 16
    eval_scales: tuple[float, ...] | None = None
    choose_tta: bool = False


@dataclasses.dataclass(**_FROZEN)
class MAEConfig(DataConfig, RunRef, _Optimization, _Augmentation):
    """Masked-autoencoder pre-training (``bin/pretrain_mae.py``): ``pretrain_dirs`` are folders
    of unlabelled photographs; the test images of ``dataset`` / ``data_dir`` are refused."""

    model: str = "mae"
    pretrain_dirs: tuple[str, ...] = ()
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    image_summary_every: int = 1


@dataclasses.dataclass(**_FROZEN)
class RipPatchConfig(DataConfig):
    """RIP-AV's representative-instance patches (``bin/generate_rip_patches.py``)."""

    rip_patches: str | None = None
    rip_sizes: tuple[int, ...] = (48, 96, 144)
    rip_out_size: int = 96
    rip_per_class: int = 400
    rip_min_fraction: float = 0.02
    rip_absent_fraction: float | None = 0.0


@dataclasses.dataclass(**_FROZEN)
class RipPretrainConfig(DataConfig, RunRef, _Optimization):
    """RIP pre-training on the patches of :class:`RipPatchConfig` (``bin/pretrain_rip.py``);
    the training images are read as for training (same ``val_images`` held out)."""

    model: str = "rip_classifier"
    rip_patches: str | None = None
    val_images: int = 2


@dataclasses.dataclass(**_FROZEN)
class EvalConfig(DataConfig, RunRef, InferenceConfig):
    """Evaluation of a run on a split with labels (``bin/evaluate.py``)."""

    eval_split: str = "test"
    visualize: bool = False
    whole_image_metrics: bool = False
    output_dir: str | None = None
    overwrite: bool = False


@dataclasses.dataclass(**_FROZEN)
class PredictConfig(RunRef, InferenceConfig):
    """Segmentation of photographs without labels (``bin/predict.py``); without ``model``, the
    shipped general vessel model."""

    model: str = "vessel_general"
    input: str | None = None
    recursive: bool = False
    fov: str | None = None
    output_dir: str | None = None
    overwrite: bool = False
    save_probabilities: bool = False
    visualize: bool = False


@dataclasses.dataclass(**_FROZEN)
class ErrorMapConfig(DataConfig, RunRef, InferenceConfig):
    """Stage-1 error maps of the training split for EAR-Net (``bin/make_error_maps.py``)."""

    output_dir: str | None = None
    overwrite: bool = False


@dataclasses.dataclass(**_FROZEN)
class CompareConfig(_Checked):
    """Several runs side by side on one labelled split (``bin/compare.py``;
    :func:`retina_tf.compare.compare`). Each run segments with the inference settings its
    ``flags.txt`` records (window stride, scales, TTA), where ``evaluate`` takes its own flags'
    (a sliding-window run's stride may differ); ``compare.md`` gives each run's settings and
    threshold.

    Attributes:
        runs: run folders, shipped model names or run names under ``logdir``; each segments
            with its own inference settings (its ``flags.txt``).
        dataset, data_dir, label_file_path, test_label_file_path, eval_split: the split, as
            for :class:`EvalConfig`.
        image: the picture's image: a name of the split (``01_test``) or its 0-based index
            (None: the first).
        output_dir: where ``compare.png`` and ``compare.md`` go.
        precision: what every run computes in, as for :class:`InferenceConfig` ("auto": each
            run as ``evaluate`` would compute it here).
    """

    runs: tuple[str, ...] = ()
    logdir: str = "logs"
    dataset: str | None = None
    data_dir: str | None = None
    label_file_path: str | None = None
    test_label_file_path: str | None = None
    eval_split: str = "test"
    image: str | None = None
    output_dir: str | None = None
    overwrite: bool = False
    precision: str = "auto"


@dataclasses.dataclass(**_FROZEN)
class ExportConfig(_Checked):
    """Export of a trained run for serving outside retina_tf (``bin/export_model.py``;
    :func:`retina_tf.export.export_model`).

    Attributes:
        run: a run folder or a shipped model name (``unet_drive``).
        format: "keras" (an inference-only copy of the run folder), "saved_model" (raw
            photograph in, probability and mask out, preprocessing inside), "onnx" or "tflite"
            (the network: preprocessed image in, probability out).
        out: the folder to write.
        input_size: TFLite's fixed input "HxW" (None: the training images' padded size).
        threshold: the mask's probability threshold (None: the run's stored threshold, else
            0.5).
        overwrite: replace an existing ``out`` folder (saved_model, onnx, tflite).
        precision: "float32" (or "auto": the deployer's hardware is not known), or "bfloat16"
            for a saved_model that computes in bfloat16 (the weights stay float32).
        tta, tta_transpose: the saved_model's test-time augmentation, averaged in its graph
            as ``predict`` averages it; None: the run's own choice (as ``predict``).
    """

    run: str | None = None
    format: str = "keras"
    out: str | None = None
    input_size: str | None = None
    threshold: float | None = None
    overwrite: bool = False
    precision: str = "auto"
    tta: bool | None = None
    tta_transpose: bool | None = None


# --- what a field may hold ------------------------------------------------------------------

INFERENCE_SCALES = ("auto", "training", "native")
# The largest --inference_scale factor: the FOV at 10x the training FOV diameter (5400 px for
# the DRIVE models) is past any camera's; 100 (a typo for 1.0) ran for many minutes.
MAX_INFERENCE_FACTOR = 10.0


def parse_inference_scale(value: str | float) -> str | float:
    """``--inference_scale`` checked: "auto", "training", "native" or a positive factor up to
    :data:`MAX_INFERENCE_FACTOR`.

    Raises:
        ConfigError: for anything else.
    """
    text = str(value).strip().lower()
    if text in INFERENCE_SCALES:
        return text
    try:
        factor = float(text)
    except ValueError:
        factor = float("nan")
    if not 0.0 < factor <= MAX_INFERENCE_FACTOR:
        raise ConfigError(f"--inference_scale={value}: give auto, training, native or a "
                          f"positive factor up to {MAX_INFERENCE_FACTOR:g} (2: the FOV segmented "
                          "at twice the training FOV diameter)")
    return factor


def _is_inference_scale(value: str) -> bool:
    try:
        parse_inference_scale(value)
    except ConfigError:
        return False
    return True


_Rule = tuple[Callable[[Any], bool], str]


def _at_least(low: int, note: str = "") -> _Rule:
    return (lambda v: v >= low, f"must be >= {low}" + (f" ({note})" if note else ""))


# A field's rule, (ok, what it must be); checked when a config is made and registered as the
# validator of the flag of the same name (:mod:`retina_tf.flags`), on the converted value.
RULES: dict[str, _Rule] = {
    "preprocess": (lambda v: all(s in STEPS + ("none",) for s in v),
                   f"steps must be among {', '.join(STEPS)}, or 'none', or True / False "
                   "(all or none)"),
    "seed": _at_least(0),
    "batch_size": _at_least(1),
    # "." or ".." put a run's files among the other runs of --logdir, or above it
    "run_name": (lambda v: v is None or not {".", ".."} & set(v.replace("\\", "/").split("/")),
                 "must name a folder inside --logdir (no . or .. in it)"),
    "epochs": _at_least(1, "0 would save an untrained model"),
    "max_iters": _at_least(0, "0 = train --epochs epochs"),
    "steps_per_epoch": _at_least(0, "0 = from --patches_per_epoch"),
    "patches_per_epoch": _at_least(1),
    "time_budget_minutes": _at_least(0, "0 = no limit"),
    "learning_rate": (lambda v: 0.0 < v < math.inf, "must be > 0"),
    "weight_decay": _at_least(0),
    "ema_momentum": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1) (0 = off)"),
    "warmup_steps": _at_least(0),
    "logical_cpus": _at_least(0, "0 = leave as is"),
    "rotate_degrees": (lambda v: 0.0 <= v <= 180.0, "must be in [0, 180] degrees"),
    "brightness": (lambda v: 0.0 <= v < math.inf, "must be >= 0 and finite"),
    "contrast": (lambda v: 0.0 <= v <= 1.0,
                 "must be in [0, 1]: the factor is drawn from [1 - c, 1 + c], and below 0 it "
                 "would invert the image"),
    "gamma_jitter": (lambda v: 0.0 <= v < math.inf, "must be >= 0 and finite"),
    "patch_size": _at_least(1, "pixels"),
    "mixed_patch_sizes": (lambda v: all(x > 0 for x in v), "must be positive integers"),
    "scale_range": (lambda v: not v or (len(v) == 2 and 0 < v[0] <= v[1] < math.inf),
                    "must be two positive factors LO,HI with LO <= HI (e.g. 0.6,1.6)"),
    "dataset_weights": (lambda v: all(0.0 < x < math.inf for x in v),
                        "must be positive numbers, one per set (--dataset, then each "
                        "--extra_data)"),
    "camera_variants": _at_least(0, "0 = off"),
    "camera_channel_gamma": (lambda v: 0.0 <= v <= 3.0, "must be in [0, 3]: a channel's "
                             "exponent is drawn from [exp(-g), exp(g)]"),
    "vessel_probability": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "val_images": _at_least(0, "0 = no validation images"),
    "pos_weight": (lambda v: 0.0 < v < math.inf, "must be > 0"),
    "validate_every": _at_least(1, "epochs"),
    "image_summary_every": _at_least(0, "0 = never"),
    "freeze_encoder_epochs": _at_least(0),
    "mask_ratio": (lambda v: 0.0 < v < 1.0, "must be between 0 and 1, both excluded"),
    "stride": _at_least(1, "pixels"),
    "window": _at_least(0, "0 = the training patch size"),
    "av_link": (lambda v: 0.0 <= v < math.inf, "must be >= 0"),
    "threshold": (lambda v: 0.0 < v < 1.0,
                  "must be between 0 and 1, both excluded (a probability threshold)"),
    "inference_scale": (_is_inference_scale,
                        "must be auto, training, native or a positive factor up to "
                        f"{MAX_INFERENCE_FACTOR:g}"),
    "tile_size": (lambda v: v == 0 or v > 128,
                  "must be 0 (automatic) or over 128 (pixels: two margins of 64 px of context)"),
    "eval_scales": (lambda v: all(0.0 < x < math.inf for x in v), "must be positive factors"),
    "input_size": (lambda v: len(v.lower().split("x")) == 2
                   and all(p.strip().isdigit() and int(p) > 0 for p in v.lower().split("x")),
                   "must be HEIGHTxWIDTH in pixels, e.g. 592x576"),
    "rip_sizes": (lambda v: len(v) > 0 and all(x > 0 for x in v), "must be positive integers"),
    "rip_out_size": _at_least(1, "pixels"),
    "rip_per_class": _at_least(1),
    "rip_min_fraction": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "rip_absent_fraction": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
}
# Fields that take one of a few words (the flags' enums).
CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("vessel", "av"),
    "channel": ("luminance", "green"),
    "strategy": ("auto", "default", "mirrored", "one_device", "multi_worker"),
    "mode": ("patch", "whole"),
    "optimizer": ("adam", "adamw", "sgd"),
    "lr_schedule": ("constant", "cosine", "poly", "linear"),
    "eval_split": ("training", "test", "all"),
    "inference": ("auto", "whole", "sliding"),
    "precision": ("auto", "float32", "bfloat16"),
    "format": ("keras", "saved_model", "onnx", "tflite"),
}
# A label file and a dataset both say which images to use; with both, one would silently win.
SOURCES = (("label_file_path", "dataset"), ("label_file_path", "data_dir"),
            ("test_label_file_path", "dataset"), ("test_label_file_path", "data_dir"))


# Fields that name a folder: a file there failed later as "File exists" or "no such folder".
FOLDER_FIELDS = ("data_dir", "logdir", "cache_dir", "output_dir")


def _check_folders(cfg: Any) -> None:
    for name in FOLDER_FIELDS:
        check_folder_flag(name, getattr(cfg, name, None))


def check_folder_flag(name: str, value: str | None) -> None:
    """Raises ConfigError when the folder flag ``--name`` names a file."""
    if value and os.path.isfile(os.path.expanduser(str(value))):
        raise ConfigError(f"--{name}={value} is a file, not a folder: give a folder")


def _check_sources(cfg: Any) -> None:
    for label, source in SOURCES:
        if getattr(cfg, label, None) and getattr(cfg, source, None):
            raise ConfigError(f"{type(cfg).__name__}: {label} and {source} both say which "
                              "images to use; keep one")


# --- loss specs (retina_tf.losses.SegmentationLoss) -------------------------------------------

LOSS_TERM_NAMES = ("bce", "dice", "tversky", "focal", "thin_bce")  # retina_tf.losses.LOSS_TERMS

# The ViT-MAE seed's mix uses Tversky 0.2/0.8 and thin factor 4 below 3 px: the defaults of
# SegmentationLoss, so a mix is only the term weights.
LOSS_MIXES: dict[str, dict[str, float]] = {
    "bce": {"bce": 1.0},
    "bce_dice": {"bce": 1.0, "dice": 1.0},
    "seed_vit": {"bce": 0.5, "dice": 1.0, "tversky": 2.5, "thin_bce": 2.5, "focal": 1.0},
}


def _check_terms(terms: Mapping[str, Any], spec: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in terms.items():
        if name not in LOSS_TERM_NAMES:
            raise ValueError(f"unknown loss term '{name}' in loss spec {spec!r}; known terms: "
                             f"{', '.join(LOSS_TERM_NAMES)}; named mixes: {', '.join(LOSS_MIXES)}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"weight {value!r} of loss term '{name}' in loss spec {spec!r} "
                             "is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight {value!r} of loss term '{name}' in loss spec {spec!r} "
                             "must be finite and >= 0")
        out[name] = value
    if not out:
        raise ValueError(f"loss spec {spec!r} names no term")
    if not any(out.values()):
        raise ValueError(f"loss spec {spec!r} weighs every term 0: nothing to train on")
    return out


def parse_loss_spec(spec: str | Mapping[str, float]) -> dict[str, float]:
    """Term weights from a mix name (``"seed_vit"``), ``"bce:1,dice:0.5"`` or a dict.

    A term without ``:weight`` gets weight 1 (``"bce,dice"``). Unknown terms, repeated terms and
    weights that are not non-negative numbers raise ``ValueError`` quoting them.
    """
    if isinstance(spec, Mapping):
        return _check_terms(spec, dict(spec))
    if not isinstance(spec, str):
        raise ValueError(f"loss spec must be a string or a dict, got {spec!r}")
    text = spec.strip()
    if text in LOSS_MIXES:
        return dict(LOSS_MIXES[text])
    terms: dict[str, str] = {}
    for item in text.split(","):
        name, sep, value = item.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"empty loss term in loss spec {spec!r}")
        if name in terms:
            raise ValueError(f"loss term '{name}' appears twice in loss spec {spec!r}")
        terms[name] = value.strip() if sep else "1"
    return _check_terms(terms, spec)


PATCH_SCALE_CONFLICT = ("--mixed_patch_sizes and --scale_range both change the patch scale; "
                        "give one")


def _check_combinations(cfg: Any) -> None:
    """Settings of which one would be ignored, or fail later in training, with the other."""
    crops, scales = getattr(cfg, "mixed_patch_sizes", ()), getattr(cfg, "scale_range", ())
    if crops and scales:
        raise ConfigError(PATCH_SCALE_CONFLICT)
    if isinstance(getattr(cfg, "loss", None), str):  # named terms, weights not all 0
        try:
            parse_loss_spec(cfg.loss)
        except ValueError as err:
            raise ConfigError(f"--loss={cfg.loss}: {err}") from None
    weights, extra = getattr(cfg, "dataset_weights", ()), getattr(cfg, "extra_data", ())
    if weights:
        sets = len(extra) + cfg.names_data
        flag = f"--dataset_weights={','.join(f'{w:g}' for w in weights)}"
        if len(weights) != sets:
            raise ConfigError(f"{flag}: {len(weights)} weight(s) for {sets} set(s); give one per "
                              "set, --dataset first, then each --extra_data in order")
        if not getattr(cfg, "balance_datasets", True):
            raise ConfigError(f"{flag}: weights the sets' shares, which --nobalance_datasets "
                              "turns off: leave one of them out")
    if getattr(cfg, "choose_tta", False) and not getattr(cfg, "val_images", 2):
        raise ConfigError("--choose_tta: chooses on the held-out training images, and "
                          "--val_images=0 holds none out: give --val_images=2 or more")
    if getattr(cfg, "camera_channel_gamma", 0.0) and not getattr(cfg, "camera_variants", 0):
        raise ConfigError(f"--camera_channel_gamma={cfg.camera_channel_gamma}: it changes the "
                          "camera copies, and --camera_variants is 0 (none made): give "
                          "--camera_variants=N too")
    if getattr(cfg, "mode", "patch") == "whole" and (crops or scales):
        flag = "--mixed_patch_sizes" if crops else "--scale_range"
        raise ConfigError(f"{flag}: resizes patches; --mode=whole trains on whole images at "
                          f"their own size: leave {flag} out or train on patches")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kind_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def as_kind(name: str, value: Any, kind: Any) -> Any:
    """``value`` as the field type ``kind`` (``ValueError`` when it is not one), converting
    what is unambiguous: a string as its flag would be read, a list to a tuple, a path to a
    string, a NumPy number to a Python one."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None, X | Y
        # an empty text or tuple is None (as the flag "--dataset=" reads): one value each
        empty = value is None or (isinstance(value, (str, tuple)) and not value)
        if empty and type(None) in args:
            return None
        kinds = _words_last([a for a in args if a is not type(None)])
        if len(kinds) > 1:  # X | Y: the first that takes the value, a number before a word
            for one in kinds:
                try:
                    return as_kind(name, value, one)
                except ValueError:
                    pass
            raise ValueError(f"must be {' or '.join(map(_kind_name, kinds))}, not "
                             f"{type(value).__name__}")
        kind = kinds[0]
    if isinstance(value, str) and kind is not str:
        return convert_value(name, value, kind)
    origin = typing.get_origin(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value if type(value) is int else int(value)
    elif kind is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return value if type(value) is float else float(value)
    elif kind is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    elif origin is tuple:
        if hasattr(value, "tolist"):  # a NumPy array
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            item = typing.get_args(kind)[0]
            items = tuple(as_kind(name, v, item) for v in value)
            return value if items == tuple(value) and type(value) is tuple else items
    elif kind in (Mapping, dict) or origin in (Mapping, dict):
        if isinstance(value, Mapping):  # a copy: the caller's dict, changed later, is not it
            return copy.deepcopy(dict(value))
    raise ValueError(f"must be {_kind_name(kind)}, not {type(value).__name__}")


def _words_last(kinds: list) -> list:
    """A union's types with ``str`` last: ``"0.5"`` for ``str | float`` is the number."""
    return sorted(kinds, key=lambda kind: kind is str)


def checked_value(name: str, value: Any, kind: Any, owner: str = "") -> Any:
    """``value`` of field ``name`` as its type ``kind`` (see :func:`as_kind`) once it passes
    the field's rule.

    Raises:
        ConfigError: ``<owner>: <name>=<value>: <what it must be>``.
    """
    where = f"{owner}: " if owner else ""
    try:
        value = as_kind(name, value, kind)
    except ConfigError as err:  # a string its flag would not take
        raise ConfigError(f"{where}{err}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}{name}={value!r}: {err}") from None
    if value is None:
        return value
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{where}{name}={value!r}: must be one of {', '.join(CHOICES[name])}")
    if name in RULES and not RULES[name][0](value):
        raise ConfigError(f"{where}{name}={value!r}: {RULES[name][1]}")
    return value


def takes(cls: type) -> Callable:
    """Decorates a command's library function: a config of another kind is refused in one line
    (``train(EvalConfig(...))`` or ``train({...})`` failed on a missing attribute)."""
    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def checked(cfg, *args, **kwargs):
            if not isinstance(cfg, cls):
                how = (f": retina_tf.{cls.__name__}(**settings) makes one"
                       if isinstance(cfg, Mapping) else "")
                raise ConfigError(f"{function.__name__}() expects a config of type "
                                  f"{cls.__name__}, got {type(cfg).__name__}{how}")
            return function(cfg, *args, **kwargs)
        return checked
    return decorate


# --- flag lines ------------------------------------------------------------------------------

# WILeroy/retina_unet's boolean --preprocess: all four steps or none.
PREPROCESS_ALIASES = {"true": STEPS, "1": STEPS, "false": ("none",), "0": ("none",)}


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _flag_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return json.dumps(dict(value), sort_keys=True)
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def to_flag_lines(cfg: Any) -> str:
    """The config as flagfile lines (``--name=value``, ``--name`` / ``--noname`` for booleans,
    None where it is the default and an empty ``model_config`` left out, ``--name=`` for a
    None that is not the default), sorted by name."""
    lines = []
    for f in sorted(dataclasses.fields(cfg), key=lambda f: f.name):
        value = getattr(cfg, f.name)
        if value is None and f.default is not None and f.default is not dataclasses.MISSING:
            lines.append(f"--{f.name}=")  # e.g. rip_absent_fraction: None is a setting
            continue
        if value is None or (isinstance(value, Mapping) and not value):
            continue
        if isinstance(value, bool):
            lines.append(f"--{f.name}" if value else f"--no{f.name}")
        else:
            lines.append(f"--{f.name}={_flag_value(value)}")
    return "\n".join(lines) + "\n"


def convert_value(name: str, text: str, kind: Any) -> Any:
    """``text`` (a flag's value) as the field type ``kind``."""
    if name == "preprocess" and text.strip().lower() in PREPROCESS_ALIASES:
        return PREPROCESS_ALIASES[text.strip().lower()]
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None, X | Y
        if text == "" and type(None) in args:
            return None
        kinds = _words_last([a for a in args if a is not type(None)])
        for one in kinds[:-1]:  # X | Y: the first that reads it
            try:
                return convert_value(name, text, one)
            except ConfigError:
                pass
        kind = kinds[-1]
        args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if text.lower() in ("true", "t", "1", "yes", "y", ""):
                return True
            if text.lower() in ("false", "f", "0", "no", "n"):
                return False
            raise ValueError("not a boolean")
        if kind in (int, float, str):
            return kind(text)
        if origin is tuple:
            return tuple(args[0](v.strip()) for v in text.split(",") if v.strip())
        if origin in (Mapping, dict) or kind in (Mapping, dict):
            return read_model_config(text, flag=f"--{name}")
    except ValueError as err:
        raise ConfigError(f"--{name}={text}: {err}") from err
    raise TypeError(f"no conversion of --{name} to {kind}")


def from_flag_lines(cls: type, text: str, ignore_unknown: bool = False) -> Any:
    """A config of type ``cls`` from flagfile lines (the inverse of :func:`to_flag_lines`);
    comments and blank lines are skipped, later lines win.

    Raises:
        ConfigError: a line naming no field of ``cls`` (unless ``ignore_unknown``) or a value
            of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("--"):
            continue
        name, eq, value = line[2:].partition("=")
        if not eq and name not in hints and name.startswith("no") and name[2:] in hints:
            name, value = name[2:], "false"
        if name not in hints:
            if ignore_unknown:
                continue
            raise ConfigError(f"--{name}: not a setting of {cls.__name__} (it has "
                              f"{', '.join(sorted(hints))})")
        values[name] = convert_value(name, value, hints[name])
    return cls(**values)


# The U-Net's arguments that are also flags of bin/train.py (kept for the seed's command lines
# and flagfiles), with the flags' defaults: they go into model_config for a model that takes
# them (its class lists them in ``flag_arguments``: MODEL_FLAG_MODELS).
MODEL_FLAGS: dict[str, Any] = {"depth": 4, "base_filters": 32, "transpose_conv": False,
                               "batch_norm": True, "dropout": 0.0}
MODEL_FLAG_MODELS = ("unet",)
# Other spellings of a flag, accepted wherever the flag is (WILeroy/retina_unet's --visulize).
FLAG_ALIASES = {"visulize": "visualize"}


def _config_classes() -> list[type]:
    return [TrainConfig, MAEConfig, RipPatchConfig, RipPretrainConfig, EvalConfig,
            PredictConfig, ErrorMapConfig, ExportConfig, CompareConfig]


def from_flagfile(cls: type, path: str | os.PathLike) -> Any:
    """A config of type ``cls`` from a flagfile (``configs/*.cfg``, a run's ``flags.txt``), read
    as the command of ``cls`` reads it, without absl: the flags of the other commands that
    share the file are passed over, an unknown flag is refused naming the file, the U-Net flags
    (``--depth``, ...) go into ``model_config``, ``--flagfile=`` lines are read in place.

    Example: ``retina_tf.train(from_flagfile(TrainConfig, "configs/drive_unet.cfg"))``.

    Raises:
        ConfigError: an unknown flag, a value of the wrong type, or a U-Net flag that disagrees
            with ``--model_config``.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for c in _config_classes() for f in dataclasses.fields(c)}
    known |= set(MODEL_FLAGS) | set(FLAG_ALIASES)
    lines, model_flags = [], {}
    for line, where in flagfile_lines(Path(path)):
        if not line.startswith("-"):
            continue
        name, eq, value = line.lstrip("-").partition("=")
        name = FLAG_ALIASES.get(name, name)
        if not eq:  # --name, --noname
            if name.startswith("no") and name not in known and name[2:] in known:
                name, value = name[2:], "false"
            else:
                value = "true"
        if name not in known:
            raise unknown_flag(str(where), name, sorted(known))
        if name in MODEL_FLAGS and "model_config" in hints:
            model_flags[name] = convert_value(name, value, type(MODEL_FLAGS[name]))
        elif name in hints:
            lines.append(f"--{name}={value}")
    cfg = from_flag_lines(cls, "\n".join(lines))
    if "model_config" not in hints:
        return cfg
    takes = MODEL_FLAGS if cfg.model in MODEL_FLAG_MODELS else ()
    return dataclasses.replace(cfg, model_config=fold_model_flags(
        cfg.model, cfg.model_config, model_flags, takes, where=f"{path}: "))


def fold_model_flags(model: str, config: Mapping[str, Any], given: Mapping[str, Any],
                     takes: Collection[str], where: str = "") -> dict:
    """``config`` (``--model_config``) with the U-Net flags folded in for a model that takes
    them (``takes``: its ``flag_arguments``): those set (``given``), the flags' defaults for
    the rest; a U-Net flag set away from its default for another model is an error. As
    bin/train.py reads its flags and :func:`from_flagfile` a flagfile."""
    config = dict(config)
    for name, default in MODEL_FLAGS.items():
        value = given.get(name, default)
        if name in takes:
            if name in given and config.get(name, value) != value:
                raise ConfigError(f"{where}--{name}={value} and --model_config's "
                                  f"{name}={config[name]!r} disagree; give it once")
            config.setdefault(name, value)
        elif value != default:
            raise ConfigError(f"{where}--{name}={value}: --model={model} does not take it (a "
                              "U-Net flag); give its arguments in --model_config")
    return config


def unknown_flag(where: str, name: str, *choices: Iterable[str]) -> ConfigError:
    """``<where>: unknown flag --<name> (did you mean --<x>?)``, ``x`` the nearest name of the
    first of ``choices`` that has one near."""
    near = next((match for names in choices
                 for match in difflib.get_close_matches(name, list(names), n=1)), None)
    return ConfigError(f"{where}: unknown flag --{name}"
                       + (f" (did you mean --{near}?)" if near else ""))


def nested_flagfile(value: str, including: Path) -> Path:
    """Where a ``--flagfile=`` line of the flagfile ``including`` points: the path from the
    current folder (absl's rule), else from the nearest folder holding ``including`` that has
    it (``configs/*.cfg`` name each other from the clone's folder, which need not be the current
    one).

    Raises:
        ConfigError: found neither way.
    """
    path = Path(os.path.expanduser(value))
    if path.is_absolute() or path.exists():
        return path
    for folder in Path(including).resolve().parents:
        if (folder / path).is_file():
            return folder / path
    raise ConfigError(f"{including}: its --flagfile={value} is neither in the current folder "
                      f"({Path.cwd()}) nor in a folder holding {including}")


def flagfile_lines(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[str, Path]]:
    """Each flag line of a flagfile, stripped, with the file it is in, by absl's rules (blank
    lines and ``#`` or ``//`` comments skipped, nested ``--flagfile=`` lines read in place, a
    file already being read skipped), a nested one found by :func:`nested_flagfile`. The one
    reader of the command line (:mod:`retina_tf.flags`) and of :func:`from_flagfile`."""
    if path.resolve() in stack:
        return []
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"--flagfile={path}: {err.strerror or err}") from None
    lines = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", "//")):
            continue
        if line.startswith(("--flagfile=", "-flagfile=")):
            nested = nested_flagfile(line.partition("=")[2].strip(), path)
            lines += flagfile_lines(nested, (*stack, path.resolve()))
        else:
            lines.append((line.strip(), path))
    return lines


def from_run(run_dir: str | Path, cls: type | None = None) -> Any:
    """The configuration a run folder was trained with, from its ``flags.txt``: training it
    again (``retina_tf.train(from_run(run, ...))`` into another run folder) re-creates it."""
    path = Path(run_dir) / "flags.txt"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: {run_dir} is not a run folder")
    text = path.read_text()
    if cls is None:
        model = dict(line[2:].partition("=")[::2] for line in text.splitlines()
                     if line.startswith("--model=")).get("model", "unet")
        cls = {"mae": MAEConfig, "rip_classifier": RipPretrainConfig}.get(model, TrainConfig)
    return from_flag_lines(cls, text, ignore_unknown=True)


def read_model_config(value: str | Mapping | None, flag: str = "--model_config") -> dict:
    """Model constructor arguments from JSON text, a ``.json`` file or a ``.yaml`` / ``.yml``
    file (with PyYAML installed); a mapping is taken as it is.

    Raises:
        ConfigError: unreadable text or file, or something other than a mapping.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    text, source = value, "JSON text"
    path = Path(value)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{flag}={value}: no such file")
        text, source = path.read_text(), str(path)
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml  # optional: only YAML model configs need it
            except ImportError as err:
                raise ConfigError(f"{flag}={value}: reading YAML needs PyYAML (pip install "
                                  "pyyaml), or give the arguments as JSON") from err
            parsed = yaml.safe_load(text)
        else:
            parsed = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{flag}: {source} is not valid: {err}") from err
    if not isinstance(parsed, Mapping):
        raise ConfigError(f"{flag}: {source} must be a mapping of constructor arguments, e.g. "
                          '{"base_filters": 16}')
    return dict(parsed)
