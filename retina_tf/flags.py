"""absl flags shared by every script in bin/, defined once here.

Scripts call the ``define_*`` groups they need; a flagfile written for ``bin/train.py`` also works
for ``bin/evaluate.py`` (flags a script does not define would be an error, so every script that
reads run settings defines the same groups).
"""

from __future__ import annotations

from absl import flags

from retina_tf.data.catalog import DATASETS
from retina_tf.data.preprocess import STEPS

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
    d.DEFINE_enum("dataset", None, list(DATASETS), "Dataset name (official layout).")
    d.DEFINE_string("data_dir", None, "Folder of the dataset in its official layout.")
    d.DEFINE_string("label_file_path", None,
                        "Seed-style label file of the training split (bin/preprocess.py writes "
                        "training.txt / test.txt); replaces --dataset/--data_dir.")
    d.DEFINE_string("test_label_file_path", None,
                        "Label file of the test split for evaluation (default: test.txt beside "
                        "--label_file_path).")
    d.DEFINE_enum("task", "vessel", ["vessel", "av"], "Vessel or artery/vein segmentation.")
    d.DEFINE_list("preprocess", list(STEPS),
                      f"Preprocessing steps in order, any of {list(STEPS)}, or 'none'.")
    d.DEFINE_enum("channel", "luminance", ["luminance", "green"],
                      "Grayscale conversion: luminance (0.299R+0.587G+0.114B) or green channel.")
    d.DEFINE_string("cache_dir", None, "Cache of preprocessed images (bin/preprocess.py).")
    d.DEFINE_integer("seed", 0, "Seed for data sampling, augmentation and initialization.")


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
                     "transposed image (8 views, about 8x slower); for models trained with --rot90.")
    d.DEFINE_boolean("av_vote", False, "A/V models: one artery/vein decision per vessel segment "
                     "between junctions of the predicted vessel map (retina_tf.postprocess).")
    d.DEFINE_float("av_link", 1.0, "With --av_vote: strength of the links that make vessel "
                   "segments share a class across branchings and, pairwise, through crossings "
                   "(0: every segment decides alone).", lower_bound=0.0)
    d.DEFINE_integer("window", 0, "Sliding-window size (0 = the training patch size).")
    d.DEFINE_float("threshold", 0.5, "Probability threshold of the binary mask.")
    d.DEFINE_string("output_dir", None, "Where evaluate/predict write their files.")


def define_predict_flags(fv: flags.FlagValues = FLAGS) -> None:
    if not _once("predict", fv):
        return
    d = _Definer(fv)
    d.DEFINE_string("input", None, "predict: an image file or a folder of images.")
    d.DEFINE_string("fov", None, "predict: FOV mask file or folder (<stem>*.png/gif/tif); "
                    "estimated when absent.")


def run_script(entry: str) -> None:
    """Runs a bin/ script: defines every retina_tf flag (so one flagfile serves train, evaluate
    and predict), parses argv with absl, then calls ``entry`` ("module:function") with FLAGS."""
    import importlib

    from absl import app

    define_train_flags()
    define_predict_flags()
    define_rip_flags()

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        module, function = entry.split(":")
        getattr(importlib.import_module(module), function)(FLAGS)

    app.run(main)
