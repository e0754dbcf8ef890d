"""The command-line layer: absl flags of the bin/ scripts, and the configs built from them.

Every retina_tf flag is declared once here; each script defines only the flags of its own
config class (:mod:`retina_tf.config`), so ``--help`` lists those. One flagfile serves several
scripts: a flag of another retina_tf script read from a flagfile is skipped (``bin/evaluate.py
--flagfile=configs/drive_unet.cfg`` ignores ``--epochs``), one given on the command line is
skipped with a notice, and an unknown flag is an error everywhere. Bad values and conflicting data
sources are rejected at parse time by validators.

The library never imports this module: :func:`script_config` turns the parsed flags into a
config, :func:`parse_config` does the same for an argument list (tests, notebooks).

:func:`run_script` / :func:`run_app` run a bin/ script under :func:`report_errors`: a user's
error is one or two lines on stderr and exit status 2 (usage) or 1, the traceback only with
``--verbose``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import importlib
import logging
import os
import re
import signal
import sys
import traceback
import typing
from pathlib import Path

import tensorflow as tf
from absl import app, flags

from retina_tf._startup import wants_verbose
from retina_tf.config import (
    CHOICES,
    FLAG_ALIASES,
    MODEL_FLAGS,
    RULES,
    SOURCES,
    CompareConfig,
    DataConfig,
    ErrorMapConfig,
    EvalConfig,
    ExportConfig,
    MAEConfig,
    PredictConfig,
    RipPatchConfig,
    RipPretrainConfig,
    TrainConfig,
    checked_value,
    convert_value,
    field_names,
    flagfile_lines,
    fold_model_flags,
    read_model_config,
    unknown_flag,
)
from retina_tf.data.catalog import DATASETS, dataset_key
from retina_tf.data.io import atomic_write_bytes
from retina_tf.data.preprocess import STEPS
from retina_tf.errors import ConfigError, RetinaTFError
from retina_tf.models import model_class

FLAGS = flags.FLAGS

# Each script: its config class and the library function it runs.
SCRIPTS: dict[str, tuple[type, str]] = {
    "train": (TrainConfig, "retina_tf.training:train"),
    "evaluate": (EvalConfig, "retina_tf.evaluation:evaluate"),
    "predict": (PredictConfig, "retina_tf.evaluation:predict"),
    "compare": (CompareConfig, "retina_tf.compare:compare"),
    "make_error_maps": (ErrorMapConfig, "retina_tf.evaluation:write_error_maps"),
    "pretrain_mae": (MAEConfig, "retina_tf.pretraining:pretrain_mae"),
    "pretrain_rip": (RipPretrainConfig, "retina_tf.pretraining:pretrain_rip"),
    "generate_rip_patches": (RipPatchConfig, "retina_tf.data.rip:write_rip_patches"),
    "preprocess": (DataConfig, ""),
    "export_model": (ExportConfig, "retina_tf.export:export_model"),
}
# MODEL_FLAGS (config): they reach a model whose class lists them in ``flag_arguments``.
# bin/<script>.py that runs another script's command with other flag defaults, and its
# paragraph in the flag reference.
VARIANTS: dict[str, tuple[str, dict[str, object], str]] = {
    "train_distribute": ("train", {"strategy": "mirrored"}, (
        "Training under `tf.distribute.MirroredStrategy`, as WILeroy/retina_unet's "
        "train_distribute.py: one replica per GPU, or without GPUs one per logical CPU "
        "(`--logical_cpus=N`, else one); `--batch_size` is the global batch, split over the "
        "replicas. It takes the flags of [`bin/train.py`](#bintrainpy), with "
        "`--strategy=mirrored` as the default.")),
}

# Every config field's type, for the flag validators (:meth:`_Definer.check_fields`).
_FIELD_TYPES: dict[str, object] = {
    name: kind for cls, _ in SCRIPTS.values() for name, kind in typing.get_type_hints(cls).items()}


class _Definer:
    """``flags.DEFINE_*`` into one FlagValues, for the names in ``only`` (None: every flag)."""

    def __init__(self, fv: flags.FlagValues, only: set[str] | None = None):
        self._fv = fv
        self._only = only

    def wanted(self, name: str) -> bool:
        return (self._only is None or name in self._only) and name not in self._fv

    def __getattr__(self, name: str):
        define = getattr(flags, name)

        def defined(flag_name, *args, **kwargs):
            if self.wanted(flag_name):
                define(flag_name, *args, flag_values=self._fv, **kwargs)
        return defined

    def add(self, flag: flags.Flag) -> None:
        if self.wanted(flag.name):
            flags.DEFINE_flag(flag, self._fv)

    def alias(self, name: str, original: str, note: str) -> None:
        """``--name`` sets ``--original`` (:data:`FLAG_ALIASES`)."""
        if self.wanted(name):
            flags.DEFINE_alias(name, original, flag_values=self._fv)
            self._fv[name].help = f"Alias for --{original} ({note})."

    def check(self, name: str, ok, rule: str) -> None:
        """Rejects a bad value of --name at parse time: absl's message reads
        ``flag --name=value: <rule>``."""
        if name in self._fv:
            flags.register_validator(name, lambda value: value is None or ok(value), rule,
                                     flag_values=self._fv)

    def check_fields(self) -> None:
        """Registers each config field's rule (:data:`retina_tf.config.RULES`) as the
        validator of its flag, on the value as the config will hold it."""
        for name, (_, rule) in RULES.items():
            if name in self._fv:
                kind = _FIELD_TYPES[name]

                def ok(value, name=name, kind=kind) -> bool:
                    if isinstance(value, list):  # a list flag: as its config field reads it
                        value = ",".join(map(str, value))
                    try:
                        checked_value(name, value, kind)
                    except ConfigError:
                        return False
                    return True
                self.check(name, ok, rule)

    def check_pair(self, a: str, b: str, ok, rule: str) -> None:
        if a in self._fv and b in self._fv:
            flags.register_multi_flags_validator([a, b], ok, rule, flag_values=self._fv)


class _DatasetParser(flags.EnumParser):
    """``--dataset``: a name of :data:`DATASETS`, also as its folder is named (CHASE_DB1,
    LES-AV); an empty value means "not set" (None)."""

    def parse(self, argument):
        if argument is None or argument == "":
            return None
        return super().parse(dataset_key(argument))


def define_all(d: _Definer) -> None:
    for group in (define_data_flags, define_model_flags, define_run_flags, define_train_flags,
                  define_rip_flags, define_eval_flags, define_predict_flags,
                  define_export_flags, define_compare_flags):
        group(d)
    d.check_fields()


def script_flag_names(script: str) -> set[str]:
    """The flags ``bin/<script>.py`` defines: its config's fields (and the U-Net flags for
    training), and those of :data:`EXTRA_FLAGS`."""
    names = set(field_names(SCRIPTS[script][0])) if script in SCRIPTS else set()
    if script in EXTRA_FLAGS:
        extra = flags.FlagValues()
        EXTRA_FLAGS[script](_Definer(extra))
        names |= set(extra)
    names |= {alias for alias, original in FLAG_ALIASES.items() if original in names}
    return names | set(MODEL_FLAGS) if script == "train" else names


def _define_script(d: _Definer, script: str) -> None:
    if script in EXTRA_FLAGS:  # first: its own --seed (make_synthetic) is not the data flag
        EXTRA_FLAGS[script](d)
    define_all(d)


def define_flags(script: str, fv: flags.FlagValues = FLAGS) -> flags.FlagValues:
    """Defines the flags of ``bin/<script>.py`` in ``fv`` and makes them the key flags that
    ``--help`` lists."""
    _define_script(_Definer(fv, script_flag_names(script)), script)
    for name in script_flag_names(script):
        fv.register_key_flag_for_module(sys.argv[0], fv[name])
    return fv


@functools.cache
def _catalog() -> dict[str, bool]:
    """Every retina_tf flag name -> whether it is boolean (takes ``--noname``)."""
    fv = flags.FlagValues()
    define_all(_Definer(fv))
    return {name: fv[name].boolean for name in fv}


def owners(name: str) -> list[str]:
    return [s for s in SCRIPTS if name in script_flag_names(s)]


def _flag_name(arg: str) -> str | None:
    """The retina_tf flag an argument sets (``--noflip`` -> flip), or None."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    name = arg.lstrip("-").partition("=")[0]
    catalog = _catalog()
    if name in catalog:
        return name
    if name.startswith("no") and catalog.get(name[2:]) and "=" not in arg:
        return name[2:]
    return None


def _is_run_flags(directive: str) -> bool:
    """Whether a ``--flagfile=PATH`` is a run folder's ``flags.txt`` (``run.json`` beside it)."""
    path = directive.partition("=")[2]
    return (os.path.basename(path) == "flags.txt"
            and os.path.isfile(os.path.join(os.path.dirname(path), "run.json")))


def keep_own_flags(argv: list[str], fv: flags.FlagValues, warn: bool = True) -> list[str]:
    """``argv`` (program name first) with flagfiles expanded and the flags of other retina_tf
    scripts dropped: silently when they come from a flagfile, with a one-line notice on stderr
    (``warn``) when given on the command line itself, where the user may expect them to act.
    Unknown flags stay, for absl to reject."""
    prog = os.path.basename(argv[0]) if argv else "retina_tf"
    out = argv[:1]
    args = list(argv[1:])
    while args:
        arg = args.pop(0)
        if arg == "--":
            out += [arg] + args
            break
        if fv._is_flag_file_directive(arg):  # noqa: SLF001  (absl's own test)
            if arg.lstrip("-") == "flagfile" and args:  # --flagfile path
                arg = f"--flagfile={args.pop(0)}"
            lines = [line for line, _ in flagfile_lines(
                Path(os.path.expanduser(arg.partition("=")[2])))]
            if _is_run_flags(arg):  # older versions wrote the default --threshold there; the
                # run's own threshold (run.json's, else that line) is what it stands for
                lines = [line for line in lines if _flag_name(line) != "threshold"]
            _refuse_unknown(lines, fv, arg.partition("=")[2])
            out += [line for line in lines if not _foreign(line, fv)]
            continue
        if not _foreign(arg, fv):
            out.append(arg)
            continue
        name = _flag_name(arg)
        if "=" not in arg and not _catalog()[name] and args and not args[0].startswith("-"):
            args.pop(0)  # --name value
        if warn:
            users = ", ".join(f"bin/{s}.py" for s in owners(name))
            sys.stderr.write(f"{prog}: note: --{name} is a flag of {users}, not of {prog}; "
                             "ignored\n")
    return out


def _refuse_unknown(lines: list[str], fv: flags.FlagValues, flagfile: str) -> None:
    """Raises ConfigError naming ``flagfile`` for a line that sets no flag at all (absl's own
    message would not say where the line came from)."""
    for line in lines:
        name = line.lstrip("-").partition("=")[0]
        if not line.startswith("-") or _flag_name(line) or name in fv \
                or (name.startswith("no") and name[2:] in fv):
            continue
        raise unknown_flag(flagfile, name, fv, _catalog())  # this command's own flags first


def _foreign(arg: str, fv: flags.FlagValues) -> bool:
    name = _flag_name(arg)
    return name is not None and name not in fv


# --- configs from flags ----------------------------------------------------------------------

def _field_value(fv: flags.FlagValues, name: str, kind) -> object:
    value = fv[name].value
    if name == "model_config":
        return read_model_config(value)
    if name == "task" and not fv[name].present:
        return None  # the model's own task (rip_av: av), else vessel
    if isinstance(value, list):  # as a flagfile line: one conversion for both
        value = [_home(v) for v in value]
        return convert_value(name, ",".join(map(str, value)), kind)
    return _home(value)


def _home(value):
    """``~/...`` as the home folder's: the shell leaves a ``~`` after ``--flag=`` as it is."""
    if isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    return value


def _model_config(fv: flags.FlagValues) -> dict:
    """``--model_config`` with the U-Net flags folded in for a model that takes them; a U-Net
    flag set away from its default for another model is an error."""
    model = fv["model"].value
    return fold_model_flags(model, read_model_config(fv["model_config"].value),
                            {name: fv[name].value for name in MODEL_FLAGS if fv[name].present},
                            model_class(model).flag_arguments)


def script_config(script: str, fv: flags.FlagValues = FLAGS):
    """The config of ``bin/<script>.py`` from its parsed flags."""
    cls = SCRIPTS[script][0]
    hints = typing.get_type_hints(cls)
    values = {f.name: _field_value(fv, f.name, hints[f.name]) for f in dataclasses.fields(cls)}
    if script == "train":
        values["model_config"] = _model_config(fv)
    if script == "predict" and not fv["model"].present:
        values["model"] = PredictConfig.model  # the shipped general vessel model
    if script == "export_model":
        for name, old in (("run", "run_dir"), ("out", "out_dir")):
            if values[name] and fv[old].value and values[name] != fv[old].value:
                raise ConfigError(f"--{name} and --{old} (its older name) differ; give one")
            values[name] = values[name] or fv[old].value
    return cls(**values)


def new_flag_values(script: str | None = None) -> flags.FlagValues:
    """A fresh FlagValues with the flags of ``bin/<script>.py`` (every retina_tf flag when
    None) and ``--verbose``, with their validators; unparsed."""
    fv = flags.FlagValues()
    if script is None:
        define_all(_Definer(fv))
    else:
        _define_script(_Definer(fv, script_flag_names(script)), script)
    flags.DEFINE_boolean("verbose", False, VERBOSE_HELP, flag_values=fv)
    return fv


def parse_config(script: str, argv: list[str]):
    """The config ``bin/<script>.py`` would build from ``argv`` (flags only, ``--flagfile``
    allowed; flags of other scripts are skipped, so one list serves train and evaluate): for
    tests and notebooks that start from command lines or flagfiles."""
    fv = new_flag_values(script)
    fv(keep_own_flags(["retina_tf"] + list(argv), fv, warn=False))
    return script_config(script, fv)


# --- flag definitions ------------------------------------------------------------------------

def define_data_flags(d: _Definer) -> None:
    """Where the images come from and how they are preprocessed."""
    # An enum that also takes an empty value (--dataset=, as None) to drop a flagfile's dataset.
    dataset = flags.EnumFlag("dataset", None, "Dataset name (official layout); empty: none.",
                             list(DATASETS))
    dataset.parser = _DatasetParser(list(DATASETS))
    d.add(dataset)
    d.DEFINE_string("data_dir", None, "Folder of the dataset in its official layout; empty: "
                    "none.")
    d.DEFINE_string("label_file_path", None,
                        "Seed-style label file of the training split (bin/preprocess.py writes "
                        "training.txt / test.txt), instead of --dataset/--data_dir (giving "
                        "both is an error; an empty --label_file_path= drops a flagfile's).")
    d.DEFINE_string("test_label_file_path", None,
                        "Label file of the test split for evaluation (default: test.txt beside "
                        "--label_file_path).")
    d.DEFINE_enum("task", "vessel", list(CHOICES["task"]), "Vessel or artery/vein segmentation; "
                  "not given: the model's own task (rip_av: av). evaluate --task=vessel scores an "
                  "A/V model's vessel map alone.")
    d.DEFINE_list("preprocess", list(STEPS),
                      f"Preprocessing steps, any of {list(STEPS)} (applied in that order "
                      "whatever the order given), or 'none'; "
                      "True / False (WILeroy/retina_unet's switch; also true, false, 1, 0): "
                      "all four steps or none.")
    d.DEFINE_enum("channel", "luminance", list(CHOICES["channel"]),
                      "Grayscale conversion: luminance (0.299R+0.587G+0.114B) or green channel.")
    d.DEFINE_string("cache_dir", None, "Cache of preprocessed images (bin/preprocess.py).")
    d.DEFINE_integer("seed", 0, "Seed for data sampling, augmentation and initialization.")
    # A label file and a dataset both choose the images: with a flagfile naming one and the
    # command line the other, one would silently win, so both together are a usage error.
    for label, source in SOURCES:
        d.check_pair(
            label, source, lambda v, label=label, source=source: not (v[label] and v[source]),
            f"--{label} and --{source} both say which images to use; keep one: pass an "
            f"empty --{label}= to drop the label file (e.g. a flagfile's), or an empty "
            "--dataset= --data_dir= to drop the dataset")


def define_model_flags(d: _Definer) -> None:
    d.DEFINE_string("model", "unet",
                        "train: architecture name. evaluate/predict: a run folder, a shipped "
                        "model name (e.g. unet_drive), or an architecture name meaning the run "
                        "folder --logdir/--run_name. predict without it: vessel_general.")
    d.DEFINE_integer("depth", MODEL_FLAGS["depth"], "U-Net: number of resolution levels.")
    d.DEFINE_integer("base_filters", MODEL_FLAGS["base_filters"],
                     "U-Net: filters of the first level.")
    d.DEFINE_boolean("transpose_conv", MODEL_FLAGS["transpose_conv"],
                         "U-Net: transposed-conv upsampling instead of nearest + 1x1 conv.")
    d.DEFINE_boolean("batch_norm", MODEL_FLAGS["batch_norm"], "Use batch normalization.")
    d.DEFINE_float("dropout", MODEL_FLAGS["dropout"], "Spatial dropout rate.")
    d.DEFINE_string("model_config", None,
                        "JSON dict of extra constructor arguments for the model.")


def define_run_flags(d: _Definer) -> None:
    d.DEFINE_string("logdir", "logs", "Parent folder of run folders.")
    d.DEFINE_string("run_name", None, "Run folder name (default: <model>_<dataset>).")
    d.DEFINE_enum("strategy", "auto", list(CHOICES["strategy"]),
                      "tf.distribute strategy: auto = mirrored when several GPUs are visible.")
    d.DEFINE_integer("logical_cpus", 0,
                         "Split the CPU into this many logical devices (to try mirrored "
                         "training without GPUs); 0 = leave as is.")
    d.DEFINE_boolean("jit_compile", False, "XLA-compile the train step.")
    d.DEFINE_boolean("mixed_precision", False,
                     "Compute in float16 on GPUs (bfloat16 on CPUs) with float32 weights; "
                     "model.keras is saved in float32. On a CPU 1.5x (AVX512-BF16) to 2.5x (AMX) "
                     "faster, slower without either.")
    d.DEFINE_boolean("overwrite", False,
                     "train: start a finished (or interrupted) run folder again from scratch; "
                     "evaluate/predict/compare/make_error_maps: replace existing files in "
                     "--output_dir; "
                     "export_model: replace an existing --out folder.")


def define_train_flags(d: _Definer) -> None:
    d.DEFINE_enum("mode", "patch", list(CHOICES["mode"]), "Random patches or whole images.")
    d.DEFINE_integer("patch_size", 48, "Training patch size.")
    d.DEFINE_list("mixed_patch_sizes", [], "Crop sides in px, one drawn per patch and resized to "
                  "--patch_size (RIP-AV's mixed-size patches, e.g. 64,128,256); empty: off.")
    d.DEFINE_list("scale_range", [], "Augment: vessel widths scaled by a factor drawn "
                  "log-uniformly in LO,HI per patch (e.g. 0.6,1.6: cameras of other "
                  "resolutions); empty: off.")
    d.DEFINE_list("extra_data", [], "More labelled sets to train on beside --dataset, each "
                  "DATASET:FOLDER[:SPLIT] (split training by default; all for every labelled "
                  "image), e.g. stare:data/STARE:all. The last --val_images of each are held "
                  "out.")
    d.DEFINE_boolean("balance_datasets", True, "With --extra_data: draw patches (whole images "
                     "with --mode=whole) from each dataset equally often, whatever its number of "
                     "images.")
    d.DEFINE_list("dataset_weights", [], "With --extra_data: each set's share of the patches "
                  "(whole images with --mode=whole), --dataset first, then each --extra_data "
                  "in order (e.g. 2,1: twice as many from --dataset as from the other set); "
                  "empty: equal shares.")
    d.DEFINE_integer("camera_variants", 0, "Augment: this many extra copies of each training "
                     "image with random camera changes (white balance, colour, contrast, gamma, "
                     "blur, noise, JPEG, uneven illumination; retina_tf.data.camera); 0: off.")
    d.DEFINE_float("camera_channel_gamma", 0.0, "With --camera_variants: half the copies get a "
                   "tone curve per colour channel, exponent exp(u) with u drawn from [-g, g] "
                   "for each channel (cameras differ in how much blue and red they record); "
                   "0: off.")
    d.DEFINE_integer("patches_per_epoch", 20000, "Patches per epoch (patch mode).")
    d.DEFINE_float("vessel_probability", 0.5,
                       "Probability that a patch is centred on a vessel pixel (else anywhere "
                       "in the FOV).")
    d.DEFINE_integer("val_images", 2,
                         "Training images held out (the last ones) for model selection on "
                         "whole images; 0 = none.")
    d.DEFINE_boolean("choose_tta", False, "At the end of training, make flip TTA the run's "
                     "default (run.json tta) when it raises the held-out images' F1 by 0.001 "
                     "or more (inference then takes 4x as long; --notta turns it off). A/V "
                     "models: of flips, the 8 flips and transposes (with --rot90) and the "
                     "segment vote, each with and without, the most accurate on A/V.")
    d.DEFINE_boolean("flip", True, "Augment: random flips.")
    d.DEFINE_boolean("rot90", True, "Augment: random 90-degree rotations.")
    d.DEFINE_float("rotate_degrees", 0.0, "Augment: free rotation by an angle drawn from "
                   "[-d, d] degrees (0 to 180).")
    d.DEFINE_float("brightness", 0.0, "Augment: brightness jitter: a shift drawn from [-b, b] "
                   "added to the preprocessed image (in [0, 1]).")
    d.DEFINE_float("contrast", 0.0, "Augment: contrast jitter: the deviation from the mean "
                   "scaled by a factor drawn from [1 - c, 1 + c] (0 to 1).")
    d.DEFINE_float("gamma_jitter", 0.0, "Augment: gamma jitter (log-exponent range).")
    d.DEFINE_integer("batch_size", 32, "Global batch size.")
    d.DEFINE_integer("epochs", 10, "Epochs.")
    d.DEFINE_integer("max_iters", 0, "Total training steps, replacing --epochs "
                     "(WILeroy/retina_unet's): E = ceil(max_iters / S) epochs of "
                     "ceil(max_iters / E) steps, S being --steps_per_epoch or --patches_per_epoch "
                     "/ --batch_size; exactly max_iters when E divides it, else at most E - 1 "
                     "more. Backups, validation and resume stay per epoch. 0 = off.")
    d.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch (0 = from patches_per_epoch, or "
                         "one pass over the images in whole mode).")
    d.DEFINE_float("time_budget_minutes", 0.0,
                       "Stop training at the end of the epoch in which this many minutes of "
                       "wall time are used up (0 = no limit). A run it stopped keeps its resume "
                       "state: the same command with a larger budget, or 0, goes on from there.")
    d.DEFINE_enum("optimizer", "adam", list(CHOICES["optimizer"]), "Optimizer.")
    d.DEFINE_float("learning_rate", 1e-3, "Initial learning rate.")
    d.DEFINE_float("weight_decay", 1e-4, "Weight decay (adamw).")
    d.DEFINE_float("ema_momentum", 0.0,
                   "Keep an exponential moving average of the weights with this momentum "
                   "(e.g. 0.998; Polyak averaging): validation, checkpoints and the saved model "
                   "use the average. 0 = off.")
    d.DEFINE_enum("lr_schedule", "constant", list(CHOICES["lr_schedule"]),
                      "Learning-rate schedule over all training steps.")
    d.DEFINE_integer("warmup_steps", 0, "Linear warm-up steps.")
    d.DEFINE_string("loss", "bce_dice",
                        "Loss: a named mix (bce, bce_dice, seed_vit) or 'term:weight,...' with "
                        "terms bce, dice, tversky, focal, thin_bce.")
    d.DEFINE_float("pos_weight", 1.0, "BCE weight of vessel pixels (class weighting).")
    d.DEFINE_integer("validate_every", 1, "Whole-image validation every N epochs, and after the "
                     "last (the time budget's last too).")
    d.DEFINE_integer("image_summary_every", 1,
                     "TensorBoard image summaries every N epochs, of those validated, and at the "
                     "last (0 = never).")
    d.DEFINE_boolean("resume", True, "Resume an interrupted run (BackupAndRestore).")
    d.DEFINE_string("pretrained", None,
                    "Start from the weights of this run folder (a path, a run name under "
                    "--logdir, else a shipped model): e.g. ear_net from its stage-1 hmsa run.")
    d.DEFINE_integer("freeze_encoder_epochs", 0,
                     "Fine-tuning (vit_seg): keep the pre-trained encoder frozen this many epochs.")
    d.DEFINE_list("pretrain_dirs", [],
                  "pretrain_mae: folders of unlabelled fundus images (labels ignored, FOV "
                  "estimated); never the test images of the dataset you evaluate on.")
    d.DEFINE_float("mask_ratio", 0.75, "pretrain_mae: share of patches masked.")
    d.DEFINE_boolean("norm_pix_loss", True,
                     "pretrain_mae: regress per-patch normalized pixels (MAE's better variant).")
    d.DEFINE_string("error_maps", None,
                    "ear_net: folder of the stage-1 error maps <image name>.png written by "
                    "bin/make_error_maps.py (default: <--pretrained run>/error_maps).")


def define_rip_flags(d: _Definer) -> None:
    """RIP-AV's representative-instance patches (bin/generate_rip_patches.py), with the data
    flags they read (--dataset, --data_dir, --seed)."""
    d.DEFINE_string("rip_patches", None,
                    "Folder of RIP patches: generate_rip_patches writes patches.csv, patches.npz "
                    "and preview.png there; pretrain_rip trains on them.")
    d.DEFINE_list("rip_sizes", ["48", "96", "144"],
                  "RIP patch sides in pixels before resizing, centred on vessel skeleton points.")
    d.DEFINE_integer("rip_out_size", 96, "RIP: side every patch is resized to.")
    d.DEFINE_integer("rip_per_class", 400,
                     "RIP: the most patches per (label, size), labels artery / vein / both.")
    d.DEFINE_float("rip_min_fraction", 0.02,
                   "RIP: share of a patch's pixels a class (artery, vein) needs to count as "
                   "present.")
    d.DEFINE_float("rip_absent_fraction", 0.0,
                   "RIP: a class counts as absent only at or below this share (0 = not one "
                   "pixel, as in RIP-AV's code), patches in between are dropped; empty: absent "
                   "whenever not present (more patches, some labels noisy).")


def define_eval_flags(d: _Definer) -> None:
    d.DEFINE_enum("eval_split", "test", list(CHOICES["eval_split"]), "Split to evaluate.")
    d.DEFINE_boolean("visualize", False,
                     "evaluate: write probability maps, masks, error overlays on the "
                     "photograph, contact_sheet.png and ROC / PR curves; predict: also write "
                     "<stem>_overlay.png (and <stem>_av_overlay.png for A/V models).")
    d.alias("visulize", "visualize", "WILeroy/retina_unet's spelling")
    d.DEFINE_boolean("whole_image_metrics", False,
                         "Count every pixel instead of the FOV only (inflates Acc and Sp).")
    d.DEFINE_enum("inference", "auto", list(CHOICES["inference"]),
                      "Whole image (fully convolutional models) or sliding window.")
    d.DEFINE_string("inference_scale", "auto",
                    "The size a photograph is segmented at, from its FOV diameter D and the "
                    "training images' T (run.json fov_diameter): auto: resized to T, shrinking "
                    "by at most 3x (HRF's 3504x2336 at 1/3: thin vessels kept) and enlarging by "
                    "at most 3x; training: "
                    "resized to T; native: as it is (large images in tiles); a factor f "
                    "(up to 10): resized to f x T. Within 20 % of the aim a photograph stays "
                    "as it is.")
    d.DEFINE_integer("tile_size", 0, "Whole-image inference in overlapping tiles of this side "
                     "in pixels (the network's memory is that of one tile); 0: tiles of 768 for "
                     "images over 2 Mpixel.")
    d.DEFINE_enum("precision", "auto", list(CHOICES["precision"]),
                  "Compute in float32 or bfloat16 (the weights stay float32); bfloat16 is "
                  "faster only on CPUs with AVX512-BF16 or AMX, and GPUs. auto: bfloat16 for "
                  "U-Nets on those CPUs (same DRIVE F1, 1.6-2x faster), else float32. "
                  "export_model: bfloat16 for saved_model only; auto exports float32.")
    d.DEFINE_integer("stride", 16, "Sliding-window stride.")
    d.DEFINE_list("eval_scales", None, "Multi-scale models (hmsa): inference scales, e.g. "
                  "0.5,1.0,2.0 (default: the training scales).")
    d.DEFINE_boolean("tta", None, "Test-time augmentation: average over flips (about 4x "
                     "slower); default: the run's choice, made on its held-out images (run.json "
                     "tta; vessel_general, ripav_rite, ripav_general: on), else off. "
                     "export_model: in the saved_model's graph.")
    d.DEFINE_boolean("tta_transpose", None, "With --tta, also average over the flips of the "
                     "transposed image (8 views, about 8x slower); for models trained with "
                     "--rot90. Default: the run's choice (ripav_rite, ripav_general: on), else "
                     "off.")
    d.DEFINE_boolean("av_vote", None, "A/V models: one artery/vein decision per vessel segment "
                     "between junctions of the predicted vessel map (retina_tf.postprocess). "
                     "Default: the run's choice (ripav_rite, ripav_general: on), else off.")
    d.DEFINE_float("av_link", 1.0, "With --av_vote: strength of the links that make vessel "
                   "segments share a class across branchings and, pairwise, through crossings "
                   "(0: every segment decides alone).")
    d.DEFINE_integer("window", 0, "Sliding-window size (0 = the training patch size).")
    d.DEFINE_float("threshold", None, "Probability threshold of the binary mask (default: the "
                   "run's stored threshold, chosen at the end of training as the F1-optimal one "
                   "on its held-out training images; 0.5 for a run without one).")
    d.DEFINE_string("output_dir", None, "Where evaluate, predict and compare write their files.")


def define_predict_flags(d: _Definer) -> None:
    d.DEFINE_string("input", None, "predict: an image file or a folder of images (DICOM too; "
                    "each frame of a multi-frame DICOM or TIFF is segmented).")
    d.DEFINE_boolean("recursive", False, "predict: also the images in the folders inside "
                     "--input, and in theirs; each one's outputs go to the same place under "
                     "--output_dir, and a --fov folder is read the same way.")
    d.DEFINE_string("fov", None, "predict: FOV mask file or folder (holding <stem>.*, "
                    "<stem>_mask.* or <stem>_fov.* for each image); estimated when absent.")
    d.DEFINE_boolean("save_probabilities", False, "predict: also write <stem>_prob.npy, the "
                     "float32 probabilities (H x W x K: vessel; or artery, vein, vessel, after the "
                     "A/V vote where --av_vote).")


def define_compare_flags(d: _Definer) -> None:
    d.DEFINE_list("runs", [], "compare: the runs, comma-separated: run folders, shipped model "
                  "names (unet_drive) or run names under --logdir.")
    d.DEFINE_string("image", None, "compare: the image of compare.png, a name of the split "
                    "(e.g. 01_test) or its 0-based index (default: the first).")


def _preprocess_flags(d: _Definer) -> None:
    """Seed-style label files (``training.txt``, ``test.txt``) of a dataset in its official
    layout, FOV masks where it ships none, previews, and optionally a cache of preprocessed
    images. Without ``--dataset``, the DRIVE (HRF-AV where its labels are ``*_AVmanual``) and
    CHASE_DB1 layouts are recognised, in ``--data_dir`` or in the folders inside it; a folder
    that fails is named and the others are written. Your own label files
    (``--label_file_path``, ``--test_label_file_path``): every photograph, label and mask is
    read as training reads it and each bad one listed; ``--out_dir`` adds the previews."""
    d.DEFINE_string("out_dir", None, "Where training.txt, test.txt, fov/ and previews go "
                    "(default: the dataset's folder; a subfolder per dataset when --data_dir "
                    "holds several); with --label_file_path, where the previews go (none "
                    "without it).")
    d.DEFINE_integer("previews", 2, "Preprocessed training images to save as PNG previews.",
                     lower_bound=0)


def _synthetic_flags(d: _Definer) -> None:
    """A synthetic fundus dataset in the DRIVE layout, with RITE-style A/V labels
    (:mod:`retina_tf.data.synthetic`)."""
    d.DEFINE_string("out_dir", None, "Dataset root to write (training/ and test/ go under it).",
                    required=True)
    d.DEFINE_integer("num_images", 20, "Total number of images, test and training together.")
    d.DEFINE_integer("num_test", None, "Number of test images (default: half of --num_images).")
    d.DEFINE_integer("seed", 0, "Base seed; image i uses a seed derived from (seed, i).")
    d.DEFINE_integer("height", 584, "Image height in pixels (DRIVE: 584).")
    d.DEFINE_integer("width", 565, "Image width in pixels (DRIVE: 565).")


def _export_flags(d: _Definer) -> None:
    """A trained run exported for serving: an inference-only Keras copy of the run folder, a
    TensorFlow SavedModel with the preprocessing inside, or the network as ONNX or TFLite
    (:mod:`retina_tf.export`)."""
    d.DEFINE_string("run_dir", None, "The older name of --run.")
    d.DEFINE_string("out_dir", None, "The older name of --out.")


# bin/<script>.py -> the definitions of its flags that are no config's fields.
EXTRA_FLAGS = {"preprocess": _preprocess_flags, "make_synthetic": _synthetic_flags,
               "export_model": _export_flags}


# --- the flag reference (docs/cli.md) --------------------------------------------------------

_REFERENCE_HEAD = """\
# Command-line flags

Generated from the flag definitions in `retina_tf/flags.py` by `make docs`
(`python -m retina_tf.flags docs/cli.md`); do not edit by hand. `tests/test_docs.py` fails
when this page is out of date.

Every `bin/<script>.py` is also an installed command (`retina-train`, `retina-evaluate`, ...;
see the [README](../README.md#commands)) and `python -m retina_tf <command>`. Each command
lists only its own flags (`--help`); it also takes `--flagfile=FILE` (one flag per line, later
flags override earlier ones) and `--helpfull`. A flag of another retina_tf command read from a
flagfile is skipped, so one flagfile serves training and evaluation. A boolean flag `--name` is
switched off with `--noname`.
"""


def _markdown_cell(text: str) -> str:
    text = " ".join(str(text).split())
    for char, escaped in (("|", "\\|"), ("<", "&lt;"), ("*", "\\*")):
        text = text.replace(char, escaped)
    return text


def _flag_help(flag: flags.Flag) -> str:
    if isinstance(flag.parser, flags.EnumParser):  # absl puts "<a|b|c>: " before an enum's help
        return flag.help.partition(">: ")[2] or flag.help
    return flag.help


def _flag_type(flag: flags.Flag) -> str:
    if isinstance(flag.parser, flags.EnumParser):
        return "one of " + ", ".join(f"`{v}`" for v in flag.parser.enum_values)
    kind = flag.flag_type()
    return {"int": "integer", "bool": "boolean"}.get(
        kind, "list" if isinstance(flag.parser, flags.ListParser) else kind)


def _flag_default(flag: flags.Flag) -> str:
    value = flag.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    if value is None or value == "":
        return "(none)"
    return f"`{_markdown_cell(value)}`"


def _summary(script: str) -> str:
    """The first paragraph of the docstring that describes ``bin/<script>.py``."""
    doc = (EXTRA_FLAGS[script] if script in EXTRA_FLAGS else SCRIPTS[script][0]).__doc__ or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return paragraph.replace(":func:", "").replace(":mod:", "").replace("``", "`")


def reference_markdown() -> str:
    """The flag reference of every ``bin/`` script (docs/cli.md): per script, each flag with its
    type, default and help, in definition order, from the definitions themselves."""
    parts = [_REFERENCE_HEAD]
    for script in [*SCRIPTS, *(s for s in EXTRA_FLAGS if s not in SCRIPTS), *VARIANTS]:
        if script in VARIANTS:
            parts.append(f"\n## `bin/{script}.py`\n\n{VARIANTS[script][2]}\n")
            continue
        fv = new_flag_values(script)
        parts.append(f"\n## `bin/{script}.py`\n\n{_summary(script)}\n\n"
                     "| flag | type | default | meaning |\n|---|---|---|---|\n")
        parts.append("".join(f"| `--{name}` | {_flag_type(fv[name])} | {_flag_default(fv[name])} "
                             f"| {_markdown_cell(_flag_help(fv[name]))} |\n" for name in fv))
    return "".join(parts)


def define_export_flags(d: _Definer) -> None:
    d.DEFINE_string("run", None, "export_model: the run folder to export, or a shipped model "
                    "name (e.g. unet_drive).")
    d.DEFINE_enum("format", "keras", list(CHOICES["format"]),
                  "export_model: keras (an inference-only copy of the run folder), saved_model "
                  "(raw uint8 photograph in, probability and mask out, preprocessing inside), "
                  "onnx or tflite (the network alone: preprocessed image in, probability out).")
    d.DEFINE_string("out", None, "export_model: the folder to write.")
    d.DEFINE_string("input_size", None, "export_model --format=tflite: the fixed input size "
                    "HxW, e.g. 592x576 (default: the training images' padded size).")


# --- command-line errors ---------------------------------------------------------------------

USAGE_EXIT = 2  # bad or conflicting flags
# retina_tf/_startup.py reads --verbose from the command line before TensorFlow starts.
VERBOSE_HELP = ("Show TensorFlow's own log lines (held back by default) and retina_tf's debug "
                "messages; on an error, print the full Python traceback.")
INTERRUPT_EXIT = 130  # Ctrl-C, as a shell reports SIGINT
TERMINATED_EXIT = 143  # SIGTERM (kill, timeout, docker stop), as a shell reports it


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a command cleans up as after Ctrl-C (its
    temporary files removed) instead of dying where it stands."""


_terminated = False  # a SIGTERM came: whatever error the unwinding meets, the command ends so


def _raise_terminated(signum, frame) -> None:
    global _terminated
    if _terminated:  # a second one: the first was caught somewhere and did not end the command
        os._exit(TERMINATED_EXIT)
    _terminated = True
    raise Terminated()

# What to do about an OSError, by errno (the message already names the file).
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write to another folder",
    errno.EDQUOT: "the disk quota is used up: free some space or write to another folder",
    errno.EROFS: "that file system is read-only: write to another folder",
    errno.EACCES: "no permission: fix the permissions or use another path",
    errno.EPERM: "no permission: fix the permissions or use another path",
    errno.ENOTDIR: "a part of that path is a file, not a folder: use another path",
    errno.ENOENT: "check the path",
    errno.EISDIR: "that is a folder: give a file",
}


def _prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "retina_tf"


def _verbose(fv: flags.FlagValues) -> bool:
    """--verbose as parsed, or, when parsing failed before it was read, as on the command line."""
    if "verbose" in fv and fv.is_parsed():
        return bool(fv["verbose"].value)
    return wants_verbose(sys.argv)


def _first_line(text: object) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()),
                "(no message)")


def _one_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines) or "(no message)"


def _os_error_message(err: OSError) -> tuple[str, str]:
    """(message naming the file, what to do) of an OSError."""
    if err.filename is None:
        return _one_line(err), _OS_HINTS.get(err.errno, "--verbose shows the traceback")
    name = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else err.filename
    return f"{name}: {err.strerror or err}", _OS_HINTS.get(
        err.errno, "check that path and the disk (--verbose shows the traceback)")


# TensorFlow's words for a tensor that did not fit: its shape, type and device
_OOM = re.compile(r"OOM when allocating tensor with shape\[([^\]]*)\] and type (\w+) on "
                  r"\S*?device:(\w+:\d+)")
# what a command can lower to need less memory, and how
_MEMORY_FLAGS = {"batch_size": "--batch_size", "patch_size": "--patch_size",
                 "tile_size": "--tile_size (say 512: whole-image inference in tiles)"}


def _out_of_memory(err: tf.errors.ResourceExhaustedError, fv: flags.FlagValues
                   ) -> list[str]:
    """TensorFlow's out-of-memory error (a GPU's mostly) as one line naming the device and the
    tensor, and one saying which of the command's flags need less."""
    found = _OOM.search(str(err))
    what = (f"out of memory on {found[3]}: a {found[2]} tensor of shape [{found[1]}] did not "
            "fit" if found else f"out of memory: {_first_line(err.message)}")
    knobs = [text for name, text in _MEMORY_FLAGS.items() if name in fv]
    less = f"a smaller {' or '.join(knobs)} needs less; " if knobs else ""
    return [what, f"{less}--verbose shows the traceback"]


@contextlib.contextmanager
def report_errors(fv: flags.FlagValues = FLAGS):
    """Turns a user's error into one or two lines on stderr and an exit status.

    Usage errors (absl flag errors, ``app.UsageError``, :class:`~retina_tf.errors.ConfigError`)
    exit 2; other :class:`~retina_tf.errors.RetinaTFError` and OSError (a missing input, an
    unwritable or full output folder: the message names the file) exit 1; TensorFlow's
    out-of-memory error exits 1 naming the device, the tensor and the flags that need less; a
    remaining ValueError exits 1 with a hint; Ctrl-C exits 130 and SIGTERM 143 (:class:`Terminated`:
    temporary files are cleaned up as after Ctrl-C). ``--verbose`` adds the traceback. Any
    other exception is a bug in retina_tf and goes through with its traceback.
    """
    try:
        yield
    except KeyboardInterrupt:
        sys.stderr.write(f"{_prog()}: interrupted\n")
        raise SystemExit(INTERRUPT_EXIT) from None
    except Terminated:
        sys.stderr.write(f"{_prog()}: terminated\n")
        raise SystemExit(TERMINATED_EXIT) from None
    except Exception as err:  # noqa: BLE001  (sorted below; bugs are re-raised)
        if _terminated:  # raised in library code mid-way, which then failed otherwise
            if _verbose(fv):
                traceback.print_exc()
            sys.stderr.write(f"{_prog()}: terminated\n")
            raise SystemExit(TERMINATED_EXIT) from None
        if isinstance(err, (flags.Error, app.UsageError)):
            lines, status = [_one_line(err), "--helpfull lists every flag"], USAGE_EXIT
        elif isinstance(err, RetinaTFError):
            lines, status = [_one_line(err)], err.exit_code
            if isinstance(err, OSError) and err.errno in _OS_HINTS:  # OutputError
                lines.append(_OS_HINTS[err.errno])
        elif isinstance(err, OSError):
            lines, status = list(_os_error_message(err)), 1
        elif isinstance(err, tf.errors.ResourceExhaustedError):
            lines, status = _out_of_memory(err, fv), 1
        elif isinstance(err, ValueError):
            lines, status = [_one_line(err), "--verbose shows the traceback"], 1
        else:
            raise
        if _verbose(fv):
            traceback.print_exc()
        sys.stderr.write(f"{_prog()}: error: {lines[0]}\n")
        for line in lines[1:]:
            sys.stderr.write(f"{_prog()}: {line}\n")
        sys.stderr.flush()
        raise SystemExit(status) from None


def run_reported(main, fv: flags.FlagValues = FLAGS) -> None:
    """``absl.app.run(main)`` with :func:`report_errors` around ``main`` only, for scripts with
    flags and output of their own (``bench/``): a mistyped model or folder in one line."""
    def guarded_main(argv):
        configure_logging()  # the library's lines plain, not with absl's prefixes
        with report_errors(fv):
            return main(argv)

    app.run(guarded_main)


def run_app(main, fv: flags.FlagValues = FLAGS) -> None:
    """``absl.app.run(main)`` with :func:`report_errors` around both the flag parsing (other
    scripts' flags from flagfiles skipped, :func:`keep_own_flags`) and ``main``; defines
    ``--verbose``, and sends the library's log (``logging.getLogger("retina_tf")``) to stdout as
    plain lines."""
    if "verbose" not in fv:
        flags.DEFINE_boolean("verbose", False, VERBOSE_HELP, flag_values=fv)
    fv.register_key_flag_for_module(sys.argv[0], fv["verbose"])  # listed by --help

    def parse(argv):
        if "--version" in argv[1:]:  # absl has no such flag; every command answers it
            print(f"retina_tf {sys.modules['retina_tf'].__version__}")
            raise SystemExit(0)
        with report_errors(fv):
            try:
                return fv(keep_own_flags(argv, fv))
            except SystemExit as done:  # absl's --help exits 1; help that was asked for is 0
                asked = {"-h", "-help", "--help", "-?", "--helpshort", "--helpfull"}
                if done.code == 1 and asked & set(argv[1:]):
                    raise SystemExit(0) from None
                raise

    def guarded_main(argv):
        configure_logging(logging.DEBUG if _verbose(fv) else logging.INFO)
        with report_errors(fv):
            signal.signal(signal.SIGTERM, _raise_terminated)
            if len(argv) > 1:
                raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags take "
                                     "the form --name=value)")
            return main(argv)

    app.run(guarded_main, flags_parser=parse)


class _Console(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` / ``sys.stderr`` is at the moment (pytest's capture,
    a notebook's redirect)."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ sets it
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """The library's messages (``logging.getLogger("retina_tf")``) as plain lines: information
    on stdout, warnings and errors on stderr (absl's handler would prefix each line with time
    and source and send all of it to stderr)."""
    log = logging.getLogger("retina_tf")
    for handler in list(log.handlers):
        if isinstance(handler, _Console):
            log.removeHandler(handler)
    out, err = _Console("stdout"), _Console("stderr")
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    # tf.distribute announces its devices and each reduction at INFO: only with --verbose
    logging.getLogger("tensorflow").setLevel(
        logging.INFO if level <= logging.DEBUG else logging.WARNING)


def run_script(script: str) -> None:
    """Runs ``bin/<script>.py``: defines its flags, parses argv, builds its config
    (:func:`script_config`) and calls the library function of :data:`SCRIPTS` with it; a
    script of :data:`VARIANTS` runs its base script's with its own flag defaults."""
    script, defaults, _ = VARIANTS.get(script, (script, {}, ""))
    define_flags(script)
    for name, value in defaults.items():
        FLAGS.set_default(name, value)
    module, function = SCRIPTS[script][1].split(":")

    def main(argv):
        getattr(importlib.import_module(module), function)(script_config(script))

    run_app(main)


if __name__ == "__main__":  # python -m retina_tf.flags [docs/cli.md]: print or write the reference
    if len(sys.argv) > 1:
        atomic_write_bytes(sys.argv[1], reference_markdown().encode())
    else:
        sys.stdout.write(reference_markdown())
