"""Pre-training: masked autoencoders on unlabelled fundus images (``bin/pretrain_mae.py``) and
RIP-AV's representative-instance pre-training (``bin/pretrain_rip.py``).

``pretrain_mae(cfg)`` (a :class:`retina_tf.config.MAEConfig`) reads every image in
``pretrain_dirs`` (labels ignored, FOV estimated), refuses the test images of the dataset named
by ``--dataset`` / ``--data_dir`` (the one the encoder will be evaluated on), fits the
preprocessor on them, and trains :class:`MAE` on random ``image_size`` crops. The run folder
has the same layout as a training run, plus ``reconstruction.png``; ``bin/train.py
--model=vit_seg --pretrained=<run>`` fine-tunes from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from retina_tf import visualize
from retina_tf.config import MAEConfig, RipPretrainConfig, read_model_config, takes
from retina_tf.data.catalog import Sample, list_samples
from retina_tf.data.fov import estimate_fov
from retina_tf.data.io import DatasetError, file_stem, pixel_digest, read_image
from retina_tf.data.pipeline import (
    Augment,
    SegmentationSet,
    data_key,
    patch_dataset,
    without_autotune,
)
from retina_tf.data.preprocess import Preprocessor
from retina_tf.data.rip import PATCHES_NPZ, RipPatch, cut_patches, rip_labels
from retina_tf.errors import ConfigError
from retina_tf.evaluation import list_inputs, photographs
from retina_tf.models import check_arguments, model_arguments
from retina_tf.models.rip_av import RIPClassifier
from retina_tf.models.vit_mae import MAE, apply_preset
from retina_tf.progress import progress
from retina_tf.run_folder import run_dir_of
from retina_tf.training import (
    TrainingJob,
    augmentation,
    epoch_steps,
    load_training_sets,
    run_training,
)

log = logging.getLogger(__name__)

# Label files that official layouts keep beside the photographs (CHASE_DB1's flat folder);
# _list_inputs already skips "_mask" files.
_LABEL_STEMS = ("_1stHO", "_2ndHO", "_manual", "_AVmanual")


def _image_files(folder: Path) -> list[Path]:
    return [f for f in list_inputs(folder) if not file_stem(f).endswith(_LABEL_STEMS)]


def held_out_names(dataset: str | None, data_dir: str | None) -> set[str]:
    """File stems of the test images of the evaluation dataset. Stems, not paths: RITE's test
    photographs are DRIVE's under the same names, so either copy is caught. A dataset that
    cannot be listed is an error: the guard must not switch itself off over a wrong path."""
    if not dataset or not data_dir:
        return set()
    try:
        samples: list[Sample] = list_samples(dataset, data_dir, "test")
    except DatasetError as e:
        raise DatasetError(f"cannot list the test images of --dataset={dataset} in "
                           f"--data_dir={data_dir}, which pre-training must keep out ({e}); fix "
                           "the path, or pass --dataset= to pre-train with no such guard") from e
    return {s.name for s in samples}


def held_out_digests(dataset: str | None, data_dir: str | None) -> dict[str, str]:
    """The :func:`~retina_tf.data.io.pixel_digest` of each test photograph of the evaluation
    dataset, with its name: a copy under another name or lossless format is caught too."""
    if not dataset or not data_dir:
        return {}
    return {pixel_digest(read_image(s.image)): s.name
            for s in list_samples(dataset, data_dir, "test")}


def pretraining_images(dirs: list[str], exclude: set[str],
                       exclude_pixels: dict[str, str] | None = None
                       ) -> tuple[list[str], list[np.ndarray]]:
    """The names of the photographs in ``dirs`` (file stems; ``IM0001_frame2`` for each frame
    or page of a file of several: :func:`~retina_tf.evaluation.photographs`) and their RGB
    arrays; an excluded (test) image is an error: by its name (``exclude``) or its pixels
    (``exclude_pixels``, :func:`held_out_digests`)."""
    if not dirs:
        raise ConfigError("--pretrain_dirs names no folder of images to pre-train on: give "
                          "folders of unlabelled fundus images, e.g. --pretrain_dirs=data/a,data/b")
    files: list[Path] = []
    for d in dirs:
        found = _image_files(Path(d))
        leaked = [f for f in found if file_stem(f) in exclude]
        if leaked:
            raise DatasetError(f"{leaked[0]}: a test image of the evaluation dataset is in "
                               f"--pretrain_dirs ({len(leaked)} such files in {d}); pre-train on "
                               "training images and other datasets only")
        files += found
    photos = [photo for f in files for photo in photographs(f)]
    images = [read_image(photo.path, photo.index)
              for photo in progress(photos, "pretrain_mae: reading", name=lambda p: p.name)]
    for photo, image in zip(photos, images):
        if name := (exclude_pixels or {}).get(pixel_digest(image)):
            raise DatasetError(f"{photo.label}: its pixels are those of {name}, a test image of "
                               "the evaluation dataset, in --pretrain_dirs; pre-train on "
                               "training images and other datasets only")
    return [photo.base(file_stem(photo.path)) for photo in photos], images


class ReconstructionImages(keras.callbacks.Callback):
    """Every ``every`` epochs, TensorBoard images of a fixed batch with fixed masking: the masked
    input, the reconstruction (visible patches pasted back) and the original."""

    def __init__(self, crops: np.ndarray, noise: np.ndarray, log_dir: Path, every: int = 1):
        super().__init__()
        self.crops, self.noise, self.every = crops, noise, max(int(every), 1)
        self.writer = tf.summary.create_file_writer(str(log_dir))

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        masked, recon, _ = self.model.reconstruct(self.crops, noise=self.noise)
        with self.writer.as_default():
            for tag, images in (("masked_input", masked), ("reconstruction", recon),
                                ("original", self.crops)):
                tf.summary.image(tag, np.clip(keras.ops.convert_to_numpy(images), 0, 1),
                                 step=epoch, max_outputs=len(self.crops))
        self.writer.flush()


def reconstruction_grid(model: MAE, crops: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """uint8 picture: rows masked input / reconstruction / original, one column per crop."""
    masked, recon, _ = model.reconstruct(crops, noise=noise)
    rows = [keras.ops.convert_to_numpy(a) for a in (masked, recon)] + [crops]
    pad = 2
    h, w = crops.shape[1:3]
    grid = np.ones((3 * (h + pad) + pad, len(crops) * (w + pad) + pad), np.float32)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            grid[top:top + h, left:left + w] = np.clip(image[..., 0], 0, 1)
    return (grid * 255).round().astype(np.uint8)


@takes(MAEConfig)
def pretrain_mae(cfg: MAEConfig) -> Path:
    """Pre-trains an MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR
    2022) as ``cfg`` says and returns the run folder."""
    return run_training(cfg, lambda strategy, run_dir: _mae_job(cfg, strategy, run_dir))


def _mae_fields(cfg: MAEConfig, config: dict) -> dict:
    """The MAE arguments that are also config fields (flags): ``--model_config``'s value where
    the field is left at its default, else the field's; both set and different is an error."""
    defaults = {f.name: f.default for f in dataclasses.fields(MAEConfig)}
    values = {}
    for name in ("mask_ratio", "norm_pix_loss", "seed"):
        field = getattr(cfg, name)
        if name in config and config[name] != field and field != defaults[name]:
            raise ConfigError(f"--{name}={field} and --model_config's {name}={config[name]!r} "
                              "disagree; give it once")
        values[name] = config.get(name, field)
    return values


def _mae_job(cfg: MAEConfig, strategy: tf.distribute.Strategy, run_dir: Path) -> TrainingJob:
    pre = Preprocessor.from_steps(cfg.preprocess, channel=cfg.channel)
    config = read_model_config(cfg.model_config)
    config.update(input_channels=pre.channels, **_mae_fields(cfg, config))
    check_arguments("mae", config)
    exclude = held_out_names(cfg.dataset, cfg.data_dir)
    names, images = pretraining_images(cfg.pretrain_dirs, exclude,
                                       held_out_digests(cfg.dataset, cfg.data_dir))
    if pre.standardize:
        pre.fit(images)
    prepared = [(pre(im), estimate_fov(im))
                for im in progress(images, "pretrain_mae: preprocessing", names=names)]
    seg = SegmentationSet(names=names, images=[x for x, _ in prepared],
                          targets=[np.zeros(im.shape[:2] + (1,), np.float32) for im in images],
                          fovs=[fov for _, fov in prepared])
    guard = (f"checked: none is one of the {len(exclude)} test images of {cfg.dataset}"
             if cfg.dataset else
             "no --dataset: no test images to keep out")
    log.info(f"pre-training on {len(names)} unlabelled images from {len(cfg.pretrain_dirs)} "
             f"folder(s) ({guard}); run folder {run_dir_of(cfg)}")
    with strategy.scope():
        model = MAE(**apply_preset(config))
    size = model.encoder.image_size
    augment = augmentation(cfg)
    steps = epoch_steps(cfg, max(cfg.patches_per_epoch // cfg.batch_size, 1))

    def dataset(start_epoch: int) -> tf.data.Dataset:  # a resumed run continues the stream
        return patch_dataset(seg, size, cfg.batch_size, 0.0, augment, cfg.seed,
                             start=start_epoch * steps * cfg.batch_size).map(lambda x, y, w: x)

    # A fixed batch with fixed masking shows the reconstructions improve epoch after epoch.
    crops = next(iter(patch_dataset(seg, size, 6, 0.0, Augment.none(), cfg.seed + 1)))[0].numpy()
    noise = np.random.default_rng(cfg.seed).random((len(crops), model.encoder.num_patches))
    callbacks = []
    if cfg.image_summary_every:
        callbacks.append(ReconstructionImages(crops, noise, run_dir / "images",
                                              cfg.image_summary_every))

    def finish(model: MAE) -> tuple[dict[str, Any], str]:
        visualize.save_png(run_dir / "reconstruction.png",
                           reconstruction_grid(model, crops, noise))
        return {}, f"; pictures in {run_dir / 'reconstruction.png'}"

    return TrainingJob(
        model=model, dataset=dataset, steps=steps, pixels_per_step=cfg.batch_size * size * size,
        preprocessor=pre,
        run_info={"model": "mae", "task": "pretrain", "input_channels": pre.channels,
                  "encoder_parameters": int(model.encoder.count_params()),
                  "images": len(names), "pretrain_dirs": list(cfg.pretrain_dirs)},
        callbacks=callbacks, finish=finish)


# --- RIP-AV: representative-instance pre-training -------------------------------------------

def read_rip_records(folder: str | Path) -> tuple[list, dict]:
    """The patch records of ``bin/generate_rip_patches.py``'s ``patches.npz`` and its settings."""
    path = Path(folder) / PATCHES_NPZ
    if not path.is_file():
        raise DatasetError(f"{path} does not exist: run bin/generate_rip_patches.py "
                           f"--rip_patches={folder} (same --dataset / --data_dir) first")
    with np.load(path) as z:
        names, rows, cols, sizes, labels = (z[k] for k in ("names", "rows", "cols", "sizes",
                                                          "label"))
        fa, fv = z["artery_fraction"], z["vein_fraction"]
        settings = json.loads(str(z["config"]))
    records = [RipPatch(-1, str(n), int(r), int(c), int(s), float(a), float(v), str(lab))
               for n, r, c, s, a, v, lab in zip(names, rows, cols, sizes, fa, fv, labels)]
    return records, settings


def rip_patch_set(cfg: RipPretrainConfig) -> tuple[np.ndarray, np.ndarray, Preprocessor, list[str]]:
    """Preprocessed RIP patches ``(N, S, S, C)``, their ``(N, 2)`` labels, the preprocessor and
    the image names used. The training images are read and preprocessed by bin/train.py's own
    :func:`load_training_sets` (same held-out validation images, same fitted preprocessor), then
    cut, exactly as the fine-tuning sees them; patches of the validation images are dropped."""
    records, settings = read_rip_records(cfg.rip_patches)
    train_set, val_set, pre = load_training_sets(cfg)
    known = set(train_set.names) | set(val_set.names if val_set else [])
    # RITE and DRIVE, or two synthetic sets, share image names: the folder must match too
    other_folder = data_key(settings.get("dataset"), settings.get("data_dir"), None) != data_key(
        cfg.dataset, cfg.data_dir, cfg.label_file_path)
    if other_folder or {r.name for r in records} - known:
        raise DatasetError(f"{cfg.rip_patches}: its patches come from {settings.get('dataset')} "
                           f"in {settings.get('data_dir')}, not from the training images of "
                           f"--dataset={cfg.dataset} in {cfg.data_dir}")
    index = {name: i for i, name in enumerate(train_set.names)}
    records = [dataclasses.replace(r, image_index=index[r.name]) for r in records
               if r.name in index]
    if not records:
        raise DatasetError(f"{cfg.rip_patches}: no patch left outside the "
                           f"{len(val_set) if val_set else 0} validation images")
    return (cut_patches(train_set.images, records, settings["out_size"]), rip_labels(records),
            pre, list(train_set.names))


@takes(RipPretrainConfig)
def pretrain_rip(cfg: RipPretrainConfig) -> Path:
    """RIP pre-training (Dai et al., "RIP-AV", MICCAI 2024): trains :class:`RIPClassifier`'s
    encoder to tell artery-only, vein-only and two-class patches apart (two sigmoid outputs)
    and returns the run folder; ``bin/train.py --model=rip_av --pretrained=<run>`` fine-tunes
    from it. 10 % of the patches (at random, seeded) are held out to report accuracy."""
    if not cfg.rip_patches:
        raise ConfigError("--rip_patches is required: the folder bin/generate_rip_patches.py "
                          "wrote its patches to (same --dataset / --data_dir)")
    cfg = dataclasses.replace(cfg, task=cfg.task or "av")  # the patches' images have A/V labels
    return run_training(cfg, lambda strategy, run_dir: _rip_job(cfg, strategy))


def rip_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """RIP pre-training's stream: the patches shuffled and, each, flipped and turned by a
    quarter turn drawn from ``seed`` and its place in the stream, so that a seed gives the
    same batches (the unseeded random ops gave other ones in every run)."""
    def augment(index, patch, label):
        one = tf.stack([tf.cast(seed, tf.int64), index])
        patch = tf.image.stateless_random_flip_left_right(patch, one)
        patch = tf.image.stateless_random_flip_up_down(patch, one + [0, 1 << 40])
        k = tf.random.stateless_uniform([], one + [0, 2 << 40], 0, 4, tf.int32)
        return tf.image.rot90(patch, k), label

    return without_autotune(
        tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).repeat()
        .enumerate().map(lambda i, item: augment(i, *item),
                         num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def _rip_job(cfg: RipPretrainConfig, strategy: tf.distribute.Strategy) -> TrainingJob:
    # one --model_config may serve the classifier and the rip_av run fine-tuned from it:
    # rip_av's other arguments (context, heads) are left out, anything else is an error
    config = read_model_config(cfg.model_config)
    rip_av_only = set(model_arguments("rip_av")) - set(model_arguments("rip_classifier"))
    for key in rip_av_only & set(config):
        config.pop(key)
    check_arguments("rip_classifier", config)
    x, y, pre, names = rip_patch_set(cfg)
    order = np.random.default_rng(cfg.seed).permutation(len(x))
    n_held = max(len(x) // 10, 1)
    held, train_idx = order[:n_held], order[n_held:]
    log.info(f"RIP pre-training on {len(train_idx)} patches ({int(y[train_idx, 0].sum())} with "
             f"artery, {int(y[train_idx, 1].sum())} with vein) from {len(names)} training "
             f"images, {n_held} patches held out; run folder {run_dir_of(cfg)}")
    config.update(input_channels=pre.channels)
    with strategy.scope():
        model = RIPClassifier(**config)
    steps = epoch_steps(cfg, max(cfg.patches_per_epoch // cfg.batch_size, 1))

    dataset = rip_dataset(x[train_idx], y[train_idx], cfg.batch_size, cfg.seed)

    def finish(model: RIPClassifier) -> tuple[dict[str, Any], str]:
        logits = model.predict(
            without_autotune(tf.data.Dataset.from_tensor_slices(x[held]).batch(64)), verbose=0)
        correct = (logits > 0) == (y[held] > 0.5)
        held_out = {"accuracy": float(correct.mean()),
                    "exact_match": float(correct.all(1).mean()),
                    "artery_accuracy": float(correct[:, 0].mean()),
                    "vein_accuracy": float(correct[:, 1].mean()), "patches": int(n_held)}
        return {"held_out": held_out}, (f"; held-out patches: accuracy "
                                        f"{held_out['accuracy']:.3f}, both labels right "
                                        f"{held_out['exact_match']:.3f}")

    size = x.shape[1]
    return TrainingJob(
        model=model, dataset=dataset, steps=steps, pixels_per_step=cfg.batch_size * size * size,
        preprocessor=pre,
        run_info={"model": "rip_classifier", "task": "pretrain", "input_channels": pre.channels,
                  "encoder_parameters": int(model.encoder.count_params()),
                  "patches": int(len(x)), "rip_patches": str(cfg.rip_patches), "images": names},
        compile_args={"loss": keras.losses.BinaryCrossentropy(from_logits=True),
                      "metrics": [keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")]},
        finish=finish)
