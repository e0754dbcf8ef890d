"""Masked-autoencoder pre-training on unlabelled fundus images (``bin/pretrain_mae.py``).

``pretrain_mae(cfg)`` reads every image in ``--pretrain_dirs`` (labels ignored, FOV estimated),
refuses the test images of the dataset named by ``--dataset`` / ``--data_dir`` (the one the
encoder will be evaluated on), fits the preprocessor on them, and trains :class:`MAE` on random
``image_size`` crops. The run folder has the same layout as a training run, plus
``reconstruction.png``; ``bin/train.py --model=vit_seg --pretrained=<run>`` fine-tunes from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from retina_tf.data.catalog import Sample, list_samples
from retina_tf.data.fov import estimate_fov
from retina_tf.data.io import DatasetError, file_stem, read_image
from retina_tf.data.pipeline import Augment, SegmentationSet, patch_dataset
from retina_tf.data.preprocess import Preprocessor
from retina_tf.inference import atomic_save_model
from retina_tf.models.vit_mae import MAE, apply_preset
from retina_tf.training import (atomic_write_text, fit_run, flags_text, make_optimizer,
                                make_strategy, run_dir_of, update_metrics_json, WarmupDecay)

# Label files that official layouts keep beside the photographs (CHASE_DB1's flat folder);
# _list_inputs already skips "_mask" files.
_LABEL_STEMS = ("_1stHO", "_2ndHO", "_manual", "_AVmanual")


def _image_files(folder: Path) -> list[Path]:
    from retina_tf.evaluation import _list_inputs
    return [f for f in _list_inputs(folder) if not file_stem(f).endswith(_LABEL_STEMS)]


def held_out_names(dataset: str | None, data_dir: str | None) -> set[str]:
    """File stems of the test images of the evaluation dataset. Stems, not paths: RITE's test
    photographs are DRIVE's under the same names, so either copy is caught."""
    if not dataset or not data_dir:
        return set()
    try:
        samples: list[Sample] = list_samples(dataset, data_dir, "test")
    except DatasetError:
        return set()
    return {s.name for s in samples}


def pretraining_images(dirs: list[str], exclude: set[str]) -> tuple[list[Path], list[np.ndarray]]:
    """The image files of ``dirs`` and their RGB arrays; an excluded (test) image is an error."""
    if not dirs:
        raise ValueError("--pretrain_dirs names no folder of images to pre-train on")
    files: list[Path] = []
    for d in dirs:
        found = _image_files(Path(d))
        leaked = [f for f in found if file_stem(f) in exclude]
        if leaked:
            raise DatasetError(f"{leaked[0]}: a test image of the evaluation dataset is in "
                               f"--pretrain_dirs ({len(leaked)} such files in {d}); pre-train on "
                               "training images and other datasets only")
        files += found
    return files, [read_image(f) for f in files]


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


def pretrain_mae(cfg) -> Path:
    """Pre-trains an MAE as the flags say and returns the run folder."""
    from retina_tf import visualize
    keras.utils.set_random_seed(cfg.seed)
    strategy = make_strategy(cfg.strategy)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)

    exclude = held_out_names(cfg.dataset, cfg.data_dir)
    files, images = pretraining_images(cfg.pretrain_dirs, exclude)
    pre = Preprocessor.from_steps(cfg.preprocess, channel=cfg.channel)
    if pre.standardize:
        pre.fit(images)
    seg = SegmentationSet(names=[file_stem(f) for f in files], images=[pre(im) for im in images],
                          targets=[np.zeros(im.shape[:2] + (1,), np.float32) for im in images],
                          fovs=[estimate_fov(im) for im in images])
    print(f"pre-training on {len(files)} unlabelled images from {len(cfg.pretrain_dirs)} "
          f"folder(s) ({len(exclude)} test images of {cfg.dataset} kept out); run folder "
          f"{run_dir}", flush=True)

    config = json.loads(cfg.model_config) if cfg.model_config else {}
    config.update(input_channels=pre.channels, mask_ratio=cfg.mask_ratio,
                  norm_pix_loss=cfg.norm_pix_loss, seed=cfg.seed)
    with strategy.scope():
        model = MAE(**apply_preset(config))
    size = model.encoder.image_size
    augment = Augment(flip=cfg.flip, rot90=cfg.rot90, rotate_degrees=cfg.rotate_degrees,
                      brightness=cfg.brightness, contrast=cfg.contrast, gamma=cfg.gamma_jitter)
    dataset = patch_dataset(seg, size, cfg.batch_size, 0.0, augment, cfg.seed).map(
        lambda x, y, w: x)
    steps = cfg.steps_per_epoch or max(cfg.patches_per_epoch // cfg.batch_size, 1)

    with strategy.scope():
        schedule = WarmupDecay(cfg.learning_rate, cfg.epochs * steps, cfg.lr_schedule,
                               cfg.warmup_steps)
        model.compile(optimizer=make_optimizer(cfg.optimizer, schedule, cfg.weight_decay),
                      jit_compile=bool(cfg.jit_compile))
        model.optimizer.build(model.trainable_variables)

    # A fixed batch with fixed masking shows the reconstructions improve epoch after epoch.
    crops = next(iter(patch_dataset(seg, size, 6, 0.0, Augment.none(), cfg.seed + 1)))[0].numpy()
    noise = np.random.default_rng(cfg.seed).random((len(crops), model.encoder.num_patches))
    run_info: dict[str, Any] = {
        "model": "mae", "model_config": model.get_config(), "task": "pretrain",
        "input_channels": pre.channels, "parameters": int(model.count_params()),
        "encoder_parameters": int(model.encoder.count_params()), "images": len(files),
        "pretrain_dirs": list(cfg.pretrain_dirs)}
    atomic_write_text(run_dir / "run.json", json.dumps(run_info, indent=2))
    atomic_write_text(run_dir / "flags.txt", flags_text(cfg))
    pre.save(run_dir / "preprocessor.json")

    callbacks = []
    if cfg.image_summary_every:
        callbacks.append(ReconstructionImages(crops, noise, run_dir / "images",
                                              cfg.image_summary_every))
    history, minutes, best_path = fit_run(model, dataset, steps, cfg.batch_size * size * size,
                                          cfg, run_dir, extra_callbacks=callbacks)
    if best_path.is_file():
        model.load_weights(best_path)
    atomic_save_model(model, run_dir / "model.keras")
    visualize.save_png(run_dir / "reconstruction.png", reconstruction_grid(model, crops, noise))
    losses = history.history.get("loss", [])
    update_metrics_json(run_dir, {"training_minutes": round(minutes, 2),
                                  "epochs_run": len(losses), "loss_history": losses})
    print(f"saved {run_dir / 'model.keras'} after {minutes:.1f} min; reconstruction loss "
          f"{losses[0]:.4f} -> {losses[-1]:.4f}; pictures in {run_dir / 'reconstruction.png'}",
          flush=True)
    return run_dir
