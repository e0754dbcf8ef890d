"""retina_tf's commands: ``retina-<command>`` console scripts, ``python -m retina_tf <command>``
and ``python bin/<script>.py`` all run the functions here.

    retina-train --flagfile=configs/drive_unet.cfg
    python -m retina_tf evaluate --flagfile=configs/drive_unet.cfg --visualize
    retina-predict --input=photos/ --output_dir=out/
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import numpy as np

from retina_tf.config import DataConfig, check_folder_flag
from retina_tf.data.catalog import guess_dataset, list_samples
from retina_tf.data.io import clear_killed_writes, read_image, read_sample
from retina_tf.data.labelfile import export_label_files, read_label_file
from retina_tf.data.pipeline import preprocess_cached
from retina_tf.data.preprocess import Preprocessor
from retina_tf.data.synthetic import write_synthetic_dataset
from retina_tf.errors import ConfigError, DatasetError
from retina_tf.flags import FLAGS, define_flags, run_app, run_script, script_config
from retina_tf.progress import progress
from retina_tf.visualize import save_png

__all__ = ["COMMANDS", "main", "train", "train_distribute", "evaluate", "predict",
           "pretrain_mae", "pretrain_rip", "generate_rip_patches", "make_error_maps",
           "preprocess", "make_synthetic", "export_model", "compare"]


def train() -> None:
    """Train a segmentation model."""
    run_script("train")


def train_distribute() -> None:
    """Train under MirroredStrategy: a replica per GPU (or per --logical_cpus)."""
    run_script("train_distribute")


def evaluate() -> None:
    """Evaluate a run (or a shipped model) on a labelled split: metrics, pictures, curves."""
    run_script("evaluate")


def predict() -> None:
    """Segment photographs without labels: probability map and mask per image."""
    run_script("predict")


def compare() -> None:
    """Compare runs on one labelled split: a metric table and one image side by side."""
    run_script("compare")


def pretrain_mae() -> None:
    """Masked-autoencoder pre-training of a ViT encoder on unlabelled photographs."""
    run_script("pretrain_mae")


def pretrain_rip() -> None:
    """RIP-AV's representative-instance pre-training of the A/V encoder."""
    run_script("pretrain_rip")


def generate_rip_patches() -> None:
    """RIP-AV's representative-instance patches from an A/V dataset's training split."""
    run_script("generate_rip_patches")


def make_error_maps() -> None:
    """EAR-Net stage 1 -> 2: error maps of a trained run on its training images."""
    run_script("make_error_maps")


def preprocess() -> None:
    """Seed-style label files (and optionally a preprocessed-image cache) for a dataset."""
    define_flags("preprocess")
    run_app(lambda argv: _preprocess(script_config("preprocess")))


def _preprocess(cfg: DataConfig) -> None:
    if cfg.task == "av":  # training refused it after preprocess had passed it
        raise ConfigError("--task=av: label files carry vessel labels only (preprocess writes "
                          "and checks them); artery/vein labels go in through an A/V dataset's "
                          "layout, which train and evaluate read as it is (e.g. RITE's: "
                          "--dataset=rite --data_dir=my_av_data; docs/data.md)")
    check_folder_flag("out_dir", FLAGS.out_dir)
    if cfg.label_file_path or cfg.test_label_file_path:
        _check_label_files(cfg)
        return
    if not cfg.data_dir:
        raise ConfigError("--data_dir is required: preprocess writes the label files of a "
                          "dataset in its official layout (e.g. --data_dir=data/DRIVE), or "
                          "checks your own with --label_file_path")
    targets = _preprocess_targets(cfg)
    failed = []
    for dataset, data_dir, out in targets:
        try:
            _preprocess_one(cfg, dataset, data_dir, out)
        except DatasetError as err:  # one incomplete dataset of several: the others go on
            if len(targets) == 1:
                raise
            failed.append(f"{data_dir}: {err}")
            print(f"skipped: {failed[-1]}", file=sys.stderr)
    if failed:
        raise DatasetError(f"{len(failed)} of the {len(targets)} dataset folders failed (the "
                           "others were written): " + "; ".join(failed))


def _preprocess_targets(cfg: DataConfig) -> list[tuple[str, Path, Path]]:
    """(dataset, its folder, where its files go) for each dataset to preprocess: --data_dir
    with --dataset or the dataset its layout shows, else each dataset folder inside it (as
    WILeroy/retina_unet's --data_dir holding DRIVE/ and CHASEDB/); the files go to --out_dir
    (a subfolder per dataset folder), by default into the dataset's own folder."""
    root = Path(cfg.data_dir)
    out = Path(FLAGS.out_dir) if FLAGS.out_dir else None
    if not root.is_dir():
        raise ConfigError(f"--data_dir={root}: no such folder")
    dataset = cfg.dataset or guess_dataset(root)
    if dataset:
        if not cfg.dataset:
            print(f"{root}: {dataset} layout")
        return [(dataset, root, out or root)]
    found = [(guess_dataset(sub), sub, out / sub.name if out else sub)
             for sub in sorted(root.iterdir()) if sub.is_dir() and not sub.name.startswith(".")]
    for name, folder, _ in found:
        if not name:  # said, so that a dataset missing a folder is not passed over in silence
            print(f"{folder}: no DRIVE or CHASE_DB1 layout, left alone")
    found = [target for target in found if target[0]]
    if not found:
        raise ConfigError(f"--data_dir={root}: neither it nor a folder in it has the layout of "
                          "DRIVE (training/{images,1st_manual,mask}) or CHASE_DB1 "
                          "(Image_NN{L,R}.jpg, Image_NN{L,R}_1stHO.png); give --dataset")
    for name, folder, _ in found:
        print(f"{folder}: {name} layout")
    return found


def _preprocess_one(cfg: DataConfig, dataset: str, data_dir: Path, out: Path) -> None:
    for folder in (out, out / "fov", out / "vessel", out / "preview"):
        clear_killed_writes(folder)
    splits = ("training", "test")
    if len(list_samples(dataset, data_dir, "all")) == len(list_samples(dataset, data_dir,
                                                                       "training")):
        splits = ("training",)  # a partial copy (the repository's samples/): no test split
        print(f"{data_dir}: no test split, so training.txt alone")
    files = export_label_files(dataset, data_dir, out, splits)
    try:
        _check_and_fit(cfg, files, out)
    except DatasetError:  # no label file listing a file that training would refuse
        for path in files.values():
            path.unlink(missing_ok=True)
        raise


def _check_label_files(cfg: DataConfig) -> None:
    """Your own label files (docs/data.md): every photograph, label and mask read as training
    and evaluation read them, each bad one listed; with --out_dir, the preprocessing fitted on
    the training split and its previews written there."""
    files = {}
    if cfg.label_file_path:
        files["training"] = Path(cfg.label_file_path)
        beside = files["training"].with_name("test.txt")
        if not cfg.test_label_file_path and beside.is_file() \
                and beside.resolve() != files["training"].resolve():
            files["test"] = beside
    if cfg.test_label_file_path:
        files["test"] = Path(cfg.test_label_file_path)
    out = Path(FLAGS.out_dir) if FLAGS.out_dir else None
    if out is None and cfg.cache_dir:
        raise ConfigError("--cache_dir with --label_file_path: give --out_dir too (the "
                          "preprocessing the cache holds is fitted and saved there)")
    if out is not None and "training" not in files:
        raise ConfigError("--out_dir: the preprocessing is fitted on a training split; give "
                          "--label_file_path (or leave --out_dir out to check the files only)")
    if out is not None:
        for folder in (out, out / "preview"):
            clear_killed_writes(folder)
    _check_and_fit(cfg, files, out)
    if out is None:
        print("every file is readable and fit to train or evaluate on (--out_dir also writes "
              "the fitted preprocessing and previews)")


def _check_and_fit(cfg: DataConfig, files: dict[str, Path], out: Path | None) -> None:
    listed = {split: read_label_file(path) for split, path in files.items()}
    for split, path in files.items():
        print(f"{split}: {path} ({len(listed[split])} samples)")
    # every label and mask read now, as training will: bad files are named here, each of them,
    # not the first one a run meets
    images, bad = [], []
    for split, samples in listed.items():
        for sample in progress(samples, f"preprocess: reading {split}", name=lambda s: s.name):
            try:
                image = read_sample(sample).image
            except DatasetError as err:
                bad.append(str(err))
                print(f"bad: {err}", file=sys.stderr)
                continue
            if split == "training":
                images.append(image)
    if bad:
        total = sum(map(len, listed.values()))
        raise DatasetError(f"{len(bad)} of the {total} photographs have a bad image, label or "
                           "mask (listed above): fix or remove them and run again")
    if out is None:
        return
    train_samples = listed["training"]
    pre = Preprocessor.from_steps(cfg.preprocess, channel=cfg.channel)
    if pre.standardize:
        pre.fit(images)
    pre.save(out / "preprocessor.json")
    fitted = (f"fitted on {len(train_samples)} training images: mean {pre.mean}, std {pre.std}"
              if pre.standardize else "(no statistics to fit without standardize)")
    print(f"preprocessing {pre.steps} {fitted} -> {out / 'preprocessor.json'}")
    for sample, image in list(zip(train_samples, images))[:FLAGS.previews]:
        x = pre(image)
        x = x[..., 0] if x.shape[-1] == 1 else x
        save_png(out / "preview" / f"{sample.name}.png", (x * 255).round().astype(np.uint8))
    if cfg.cache_dir:
        samples = [sample for split in listed.values() for sample in split]
        clear_killed_writes(cfg.cache_dir)
        for sample in progress(samples, "preprocess: caching", name=lambda s: s.name):
            preprocess_cached(sample, read_image(sample.image), pre, cfg.cache_dir)
        print(f"cached preprocessed images in {cfg.cache_dir} (statistics of every training "
              "image: training reads them with --val_images=0, and caches its own there "
              "otherwise)")


def make_synthetic() -> None:
    """A synthetic fundus dataset in the DRIVE layout (plus RITE-style A/V labels)."""
    define_flags("make_synthetic")
    run_app(lambda argv: _make_synthetic())


def _make_synthetic() -> None:
    if not FLAGS.out_dir.strip():  # "" would be the current folder
        raise ConfigError("--out_dir is empty: give the folder to write the set to")
    try:
        root = write_synthetic_dataset(FLAGS.out_dir, num_images=FLAGS.num_images,
                                       seed=FLAGS.seed, size=(FLAGS.height, FLAGS.width),
                                       num_test=FLAGS.num_test)
    except ConfigError:
        raise
    except ValueError as err:  # bad counts or size: a usage problem, not a crash
        raise ConfigError(f"{err}: check --num_images, --num_test, --height and --width") from err
    for split in ("test", "training"):
        images = sorted((root / split / "images").glob("*.tif"))
        if images:
            names = images[0].name if len(images) == 1 else f"{images[0].name}..{images[-1].name}"
            print(f"{root / split}: {len(images)} image{'s' * (len(images) > 1)} ({names}) "
                  "with labels in 1st_manual/, FOV masks in mask/, A/V labels in av/")
    print(f"wrote a synthetic DRIVE-layout dataset of {FLAGS.num_images} "
          f"{FLAGS.width}x{FLAGS.height} images (seed {FLAGS.seed}) to {root}")


def export_model() -> None:
    """Export a trained run: Keras copy, SavedModel, ONNX or TFLite (``--format``)."""
    run_script("export_model")


# command name (retina-<name>, python -m retina_tf <name>) -> function
COMMANDS = {
    "train": train, "train-distribute": train_distribute, "evaluate": evaluate,
    "predict": predict, "pretrain-mae": pretrain_mae, "pretrain-rip": pretrain_rip,
    "rip-patches": generate_rip_patches,
    "error-maps": make_error_maps, "preprocess": preprocess, "synthetic": make_synthetic,
    "export": export_model, "compare": compare,
}


def main(argv: list[str] | None = None) -> None:
    """``python -m retina_tf <command> [flags]``."""
    argv = list(sys.argv if argv is None else argv)
    if argv[1:2] == ["--version"]:
        print(f"retina_tf {sys.modules['retina_tf'].__version__}")
        raise SystemExit(0)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {fn.__doc__.splitlines()[0]}"
                 for name, fn in COMMANDS.items()]
        asked = argv[1] if len(argv) > 1 and argv[1] not in ("-h", "--help") else None
        if asked:  # named first, with the nearest command (absl does so for a flag)
            near = difflib.get_close_matches(asked, COMMANDS, n=1)
            sys.stderr.write(f"unknown command {asked!r}"
                             + (f"; did you mean {near[0]!r}?" if near else "") + "\n")
        sys.stderr.write("usage: python -m retina_tf <command> [--flags] (--help per "
                         "command; --version)\n\ncommands:\n" + "\n".join(lines) + "\n")
        raise SystemExit(0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2)
    sys.argv = [f"retina_tf {argv[1]}"] + argv[2:]
    command = COMMANDS[argv[1]]
    main_module = sys.modules.get("__main__")
    if main_module is not None:  # absl's --help shows it above the flags
        main_module.__doc__ = f"python -m retina_tf {argv[1]}: {command.__doc__}"
    command()
