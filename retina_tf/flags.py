"""absl flags shared by every script in bin/, defined once here.

Scripts call the ``define_*`` groups they need; a flagfile written for ``bin/train.py`` also works
for ``bin/evaluate.py`` (flags a script does not define would be an error, so every script that
reads run settings defines the same groups). Bad values and conflicting data sources are
rejected at parse time by validators on the FlagValues, so :func:`parse_flags` rejects them too.

:func:`run_script` / :func:`run_app` run a bin/ script under :func:`report_errors`: a user's
error is one or two lines on stderr and exit status 2 (usage) or 1, the traceback only with
``--verbose``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback

from absl import flags

from retina_tf.data.catalog import DATASETS
from retina_tf.data.preprocess import STEPS
from retina_tf.errors import RetinaTFError

FLAGS = flags.FLAGS
# The first flag of each group: a group is defined once per FlagValues (tested by its presence,
# since ids of discarded FlagValues objects can be reused).
_GROUP_SENTINEL = {"data": "dataset", "model": "model", "run": "logdir", "train": "mode",
                   "eval": "eval_split", "predict": "input"}
OWN_FLAGS: set[str] = set()  # names of retina_tf's flags (written to flags.txt)


def _once(group: str, fv: flags.FlagValues) -> bool:
    return _GROUP_SENTINEL[group] not in fv


class _Definer:
    """``flags.DEFINE_*`` bound to one FlagValues (the global FLAGS, or a fresh one in tests)."""

    def __init__(self, fv: flags.FlagValues):
        self._fv = fv

    def __getattr__(self, name: str):
        define = getattr(flags, name)

        def defined(flag_name, *args, **kwargs):
            OWN_FLAGS.add(flag_name)
            return define(flag_name, *args, flag_values=self._fv, **kwargs)
        return defined


class _EmptyIsNoneEnumParser(flags.EnumParser):
    """An enum parser for which an empty value means "not set" (None)."""

    def parse(self, argument):
        if argument is None or argument == "":
            return None
        return super().parse(argument)


def _check(fv: flags.FlagValues, name: str, ok, rule: str) -> None:
    """Rejects a bad value of --name at parse time (also from :func:`parse_flags`): absl's
    message reads ``flag --name=value: <rule>``."""
    flags.register_validator(name, lambda value: value is None or ok(value), rule,
                             flag_values=fv)


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """Parses ``argv`` (flags only, ``--flagfile`` allowed) into a fresh FlagValues with every
    flag defined; for tests and notebooks that call the library without absl.app."""
    fv = flags.FlagValues()
    define_train_flags(fv)
    define_predict_flags(fv)
    define_rip_flags(fv)
    fv(["retina_tf"] + list(argv))
    return fv


def define_data_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Where the images come from and how they are preprocessed."""
    if not _once("data", fv):
        return
    d = _Definer(fv)
    # An enum that also takes an empty value (--dataset=, as None) to drop a flagfile's dataset.
    dataset = flags.EnumFlag("dataset", None, "Dataset name (official layout); empty: none.",
                             list(DATASETS))
    dataset.parser = _EmptyIsNoneEnumParser(list(DATASETS))
    OWN_FLAGS.add("dataset")
    flags.DEFINE_flag(dataset, fv)
    d.DEFINE_string("data_dir", None, "Folder of the dataset in its official layout; empty: "
                    "none.")
    d.DEFINE_string("label_file_path", None,
                        "Seed-style label file of the training split (bin/preprocess.py writes "
                        "training.txt / test.txt), instead of --dataset/--data_dir (giving "
                        "both is an error; an empty --label_file_path= drops a flagfile's).")
    d.DEFINE_string("test_label_file_path", None,
                        "Label file of the test split for evaluation (default: test.txt beside "
                        "--label_file_path).")
    d.DEFINE_enum("task", "vessel", ["vessel", "av"], "Vessel or artery/vein segmentation.")
    d.DEFINE_list("preprocess", list(STEPS),
                      f"Preprocessing steps in order, any of {list(STEPS)}, or 'none'.")
    d.DEFINE_enum("channel", "luminance", ["luminance", "green"],
                      "Grayscale conversion: luminance (0.299R+0.587G+0.114B) or green channel.")
    _check(fv, "preprocess", lambda steps: all(s.strip() in STEPS + ("none", "") for s in steps),
           f"steps must be among {', '.join(STEPS)}, or 'none'")
    d.DEFINE_string("cache_dir", None, "Cache of preprocessed images (bin/preprocess.py).")
    d.DEFINE_integer("seed", 0, "Seed for data sampling, augmentation and initialization.")
    # A label file and a dataset both choose the images: with a flagfile naming one and the
    # command line the other, one would silently win, so both together are a usage error.
    for label, source in (("label_file_path", "dataset"), ("label_file_path", "data_dir"),
                          ("test_label_file_path", "dataset"),
                          ("test_label_file_path", "data_dir")):
        flags.register_multi_flags_validator(
            [label, source], lambda v, label=label, source=source: not (v[label] and v[source]),
            f"--{label} and --{source} both say which images to use; keep one: pass an "
            f"empty --{label}= to drop the label file (e.g. a flagfile's), or an empty "
            "--dataset= --data_dir= to drop the dataset", flag_values=fv)


def define_model_flags(fv: flags.FlagValues = FLAGS) -> None:
    if not _once("model", fv):
        return
    d = _Definer(fv)
    d.DEFINE_string("model", "unet",
                        "train: architecture name. evaluate/predict: a run folder, a shipped "
                        "model name (e.g. unet_drive), or an architecture name meaning the run "
                        "folder --logdir/--run_name.")
    d.DEFINE_integer("depth", 4, "U-Net: number of resolution levels.")
    d.DEFINE_integer("base_filters", 32, "U-Net: filters of the first level.")
    d.DEFINE_boolean("transpose_conv", False,
                         "U-Net: transposed-conv upsampling instead of nearest + 1x1 conv.")
    d.DEFINE_boolean("batch_norm", True, "Use batch normalization.")
    d.DEFINE_float("dropout", 0.0, "Spatial dropout rate.")
    d.DEFINE_string("model_config", None,
                        "JSON dict of extra constructor arguments for the model.")


def define_run_flags(fv: flags.FlagValues = FLAGS) -> None:
    if not _once("run", fv):
        return
    d = _Definer(fv)
    d.DEFINE_string("logdir", "logs", "Parent folder of run folders.")
    d.DEFINE_string("run_name", None, "Run folder name (default: <model>_<dataset>).")
    d.DEFINE_enum("strategy", "auto", ["auto", "default", "mirrored", "one_device",
                                           "multi_worker"],
                      "tf.distribute strategy: auto = mirrored when several GPUs are visible.")
    d.DEFINE_integer("logical_cpus", 0,
                         "Split the CPU into this many logical devices (to try mirrored "
                         "training without GPUs); 0 = leave as is.")
    d.DEFINE_boolean("jit_compile", False, "XLA-compile the train step.")
    d.DEFINE_boolean("overwrite", False,
                     "train: start a finished (or interrupted) run folder again from scratch; "
                     "evaluate/predict: replace existing files in --output_dir.")
    d.DEFINE_boolean("verbose", False, "On an error, print the full Python traceback.")


def define_train_flags(fv: flags.FlagValues = FLAGS) -> None:
    define_data_flags(fv)
    define_model_flags(fv)
    define_run_flags(fv)
    define_eval_flags(fv)
    if not _once("train", fv):
        return
    d = _Definer(fv)
    d.DEFINE_enum("mode", "patch", ["patch", "whole"], "Random patches or whole images.")
    d.DEFINE_integer("patch_size", 48, "Training patch size.")
    d.DEFINE_integer("patches_per_epoch", 20000, "Patches per epoch (patch mode).")
    d.DEFINE_float("vessel_probability", 0.5,
                       "Probability that a patch is centred on a vessel pixel (else anywhere "
                       "in the FOV).")
    d.DEFINE_integer("val_images", 2,
                         "Training images held out (the last ones) for model selection on "
                         "whole images; 0 = none.")
    d.DEFINE_boolean("flip", True, "Augment: random flips.")
    d.DEFINE_boolean("rot90", True, "Augment: random 90-degree rotations.")
    d.DEFINE_float("rotate_degrees", 0.0, "Augment: free rotation range in degrees.")
    d.DEFINE_float("brightness", 0.0, "Augment: brightness jitter.")
    d.DEFINE_float("contrast", 0.0, "Augment: contrast jitter.")
    d.DEFINE_float("gamma_jitter", 0.0, "Augment: gamma jitter (log-exponent range).")
    d.DEFINE_integer("batch_size", 32, "Global batch size.")
    d.DEFINE_integer("epochs", 10, "Epochs.")
    d.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch (0 = from patches_per_epoch, or "
                         "one pass over the images in whole mode).")
    d.DEFINE_float("time_budget_minutes", 0.0,
                       "Stop training after this many minutes of wall time (0 = no limit).")
    d.DEFINE_enum("optimizer", "adam", ["adam", "adamw", "sgd"], "Optimizer.")
    d.DEFINE_float("learning_rate", 1e-3, "Initial learning rate.")
    d.DEFINE_float("weight_decay", 1e-4, "Weight decay (adamw).")
    d.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine", "poly", "linear"],
                      "Learning-rate schedule over all training steps.")
    d.DEFINE_integer("warmup_steps", 0, "Linear warm-up steps.")
    d.DEFINE_string("loss", "bce_dice",
                        "Loss: a named mix (bce, bce_dice, seed_vit) or 'term:weight,...' with "
                        "terms bce, dice, tversky, focal, thin_bce.")
    d.DEFINE_float("pos_weight", 1.0, "BCE weight of vessel pixels (class weighting).")
    d.DEFINE_integer("validate_every", 1, "Whole-image validation every N epochs.")
    d.DEFINE_integer("image_summary_every", 1,
                         "TensorBoard image summaries every N epochs (0 = never).")
    d.DEFINE_boolean("resume", True, "Resume an interrupted run (BackupAndRestore).")
    d.DEFINE_string("pretrained", None,
                    "Start from the weights of this run folder (a path, or a run name under "
                    "--logdir): e.g. ear_net from its stage-1 hmsa run.")
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
    _check(fv, "patch_size", lambda v: v >= 1, "must be >= 1 (pixels)")
    _check(fv, "patches_per_epoch", lambda v: v >= 1, "must be >= 1")
    _check(fv, "vessel_probability", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
    _check(fv, "val_images", lambda v: v >= 0, "must be >= 0 (0 = no validation images)")
    _check(fv, "batch_size", lambda v: v >= 1, "must be >= 1")
    _check(fv, "epochs", lambda v: v >= 1, "must be >= 1 (0 would save an untrained model)")
    _check(fv, "steps_per_epoch", lambda v: v >= 0,
           "must be >= 0 (0 = from --patches_per_epoch)")
    _check(fv, "learning_rate", lambda v: v > 0.0, "must be > 0")
    _check(fv, "validate_every", lambda v: v >= 1, "must be >= 1 (epochs)")


def define_rip_flags(fv: flags.FlagValues = FLAGS) -> None:
    """RIP-AV's representative-instance patches (bin/generate_rip_patches.py), with the data
    flags they read (--dataset, --data_dir, --seed)."""
    define_data_flags(fv)
    if "rip_sizes" in fv:  # defined once per FlagValues, like the groups above
        return
    d = _Definer(fv)
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


def define_eval_flags(fv: flags.FlagValues = FLAGS) -> None:
    if not _once("eval", fv):
        return
    d = _Definer(fv)
    d.DEFINE_enum("eval_split", "test", ["training", "test", "all"], "Split to evaluate.")
    d.DEFINE_boolean("visualize", False,
                         "Write probability maps, masks, overlays and ROC / PR curves.")
    d.DEFINE_boolean("whole_image_metrics", False,
                         "Count every pixel instead of the FOV only (inflates Acc and Sp).")
    d.DEFINE_enum("inference", "auto", ["auto", "whole", "sliding"],
                      "Whole image (fully convolutional models) or sliding window.")
    d.DEFINE_integer("stride", 16, "Sliding-window stride.")
    d.DEFINE_list("eval_scales", None, "Multi-scale models (hmsa): inference scales, e.g. "
                  "0.5,1.0,2.0 (default: the training scales).")
    d.DEFINE_boolean("tta", False, "Test-time augmentation: average over flips (about 4x slower).")
    d.DEFINE_boolean("tta_transpose", False, "With --tta, also average over the flips of the "
                     "transposed image (8 views, about 8x slower); for models trained with "
                     "--rot90.")
    d.DEFINE_boolean("av_vote", False, "A/V models: one artery/vein decision per vessel segment "
                     "between junctions of the predicted vessel map (retina_tf.postprocess).")
    d.DEFINE_float("av_link", 1.0, "With --av_vote: strength of the links that make vessel "
                   "segments share a class across branchings and, pairwise, through crossings "
                   "(0: every segment decides alone).", lower_bound=0.0)
    d.DEFINE_integer("window", 0, "Sliding-window size (0 = the training patch size).")
    d.DEFINE_float("threshold", 0.5, "Probability threshold of the binary mask.")
    d.DEFINE_string("output_dir", None, "Where evaluate/predict write their files.")
    _check(fv, "stride", lambda v: v >= 1, "must be >= 1 (pixels)")
    _check(fv, "window", lambda v: v >= 0, "must be >= 0 (0 = the training patch size)")
    _check(fv, "threshold", lambda v: 0.0 < v < 1.0,
           "must be between 0 and 1, both excluded (a probability threshold)")


def define_predict_flags(fv: flags.FlagValues = FLAGS) -> None:
    if not _once("predict", fv):
        return
    d = _Definer(fv)
    d.DEFINE_string("input", None, "predict: an image file or a folder of images.")
    d.DEFINE_string("fov", None, "predict: FOV mask file or folder (<stem>*.png/gif/tif); "
                    "estimated when absent.")


# --- command-line errors ---------------------------------------------------------------------

USAGE_EXIT = 2  # bad or conflicting flags
INTERRUPT_EXIT = 130  # Ctrl-C, as a shell reports SIGINT

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
    verbose = False
    for arg in sys.argv[1:]:
        if arg == "--":
            break
        name, _, value = arg.lstrip("-").partition("=")
        if name == "verbose":
            verbose = value.lower() not in ("false", "f", "0", "no", "n") if value else True
        elif name == "noverbose":
            verbose = False
    return verbose


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


@contextlib.contextmanager
def report_errors(fv: flags.FlagValues = FLAGS):
    """Turns a user's error into one or two lines on stderr and an exit status.

    Usage errors (absl flag errors, ``app.UsageError``, :class:`~retina_tf.errors.ConfigError`)
    exit 2; other :class:`~retina_tf.errors.RetinaTFError` and OSError (a missing input, an
    unwritable or full output folder: the message names the file) exit 1; a remaining
    ValueError exits 1 with a hint; Ctrl-C exits 130. ``--verbose`` adds the traceback. Any
    other exception is a bug in retina_tf and goes through with its traceback.
    """
    from absl import app


    try:
        yield
    except KeyboardInterrupt:
        sys.stderr.write(f"{_prog()}: interrupted\n")
        raise SystemExit(INTERRUPT_EXIT) from None
    except Exception as err:  # noqa: BLE001  (sorted below; bugs are re-raised)
        if isinstance(err, (flags.Error, app.UsageError)):
            lines, status = [_one_line(err), "--helpfull lists every flag"], USAGE_EXIT
        elif isinstance(err, RetinaTFError):
            lines, status = [_one_line(err)], err.exit_code
            if isinstance(err, OSError) and err.errno in _OS_HINTS:  # OutputError
                lines.append(_OS_HINTS[err.errno])
        elif isinstance(err, OSError):
            lines, status = list(_os_error_message(err)), 1
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


def run_app(main, fv: flags.FlagValues = FLAGS) -> None:
    """``absl.app.run(main)`` with :func:`report_errors` around both the flag parsing and
    ``main``; defines ``--verbose`` when the script has not."""
    from absl import app

    if "verbose" not in fv:
        flags.DEFINE_boolean("verbose", False, "On an error, print the full Python traceback.",
                             flag_values=fv)

    def parse(argv):
        with report_errors(fv):
            return fv(argv)

    def guarded_main(argv):
        with report_errors(fv):
            if len(argv) > 1:
                raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags take "
                                     "the form --name=value)")
            return main(argv)

    app.run(guarded_main, flags_parser=parse)


def run_script(entry: str) -> None:
    """Runs a bin/ script: defines every retina_tf flag (so one flagfile serves train, evaluate
    and predict), parses argv with absl, then calls ``entry`` ("module:function") with FLAGS;
    user errors are reported by :func:`report_errors`."""
    import importlib

    define_train_flags()
    define_predict_flags()
    define_rip_flags()

    def main(argv):
        module, function = entry.split(":")
        getattr(importlib.import_module(module), function)(FLAGS)

    run_app(main)
