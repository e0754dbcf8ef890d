"""tf.data pipelines: random patches or whole padded images, augmented, FOV as a loss weight.

Images are decoded and preprocessed once and held in memory as one padded tensor; patch centres,
crops and augmentations are TensorFlow ops driven by stateless seeds drawn from
``tf.data.Dataset.random(seed)``, so there is no Python in the hot loop and the same ``--seed``
gives the same batches. Every element is ``(x, y, w)``: image (H, W, C), target (H, W, K) and the
FOV weight (H, W, 1), which Keras passes to the loss as ``sample_weight`` so pixels outside the
field of view (and padding) never count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from retina_tf.config import CHOICES, PATCH_SCALE_CONFLICT
from retina_tf.data.catalog import Sample, list_samples, official_folder
from retina_tf.data.io import (
    DatasetError,
    SampleData,
    atomic_write_bytes,
    clear_killed_writes,
    pixel_digest,
)
from retina_tf.data.labelfile import read_label_file
from retina_tf.data.preprocess import Preprocessor
from retina_tf.errors import ConfigError

TASKS = CHOICES["task"]


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with tf.data's autotuning off.

    The autotuning thread sleeps in periods that double up to a minute, and destroying an
    iterator waits until it wakes: about half of all ``model.fit`` calls over an autotuned
    dataset returned seconds after their last step (a 40-step fit took 10.3 s instead of 5.6),
    and every iterator that ``predict`` or a test drops paid the same. Without it the map runs
    on as many threads as there are cores, many times faster than the training consumes
    (docs/results/speed.md).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


@dataclasses.dataclass
class SegmentationSet:
    """Preprocessed images with their targets and FOV masks, all in memory."""

    names: list[str]
    images: list[np.ndarray]   # float32 (H, W, C) in [0, 1]
    targets: list[np.ndarray]  # float32 (H, W, K) in {0, 1}
    fovs: list[np.ndarray]     # bool (H, W)
    # Extra per-pixel training targets appended after ``targets`` in ``y`` (EAR-Net's error maps,
    # RIP-AV's distance maps): float32 (H, W, E); moved with the labels by every geometric
    # augmentation but not thresholded; never used to pick patch centres.
    extras: list[np.ndarray] | None = None
    # The source (dataset) number of each image, for balanced patch sampling; None: one source.
    groups: list[int] | None = None
    # Each photograph's pixel_digest as read ("" for a generated copy), for evaluate to tell
    # images a run trained on by their pixels; None: not recorded.
    digests: list[str] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices: Sequence[int]) -> SegmentationSet:
        fields = ("names", "images", "targets", "fovs")
        picked = [[getattr(self, f)[i] for i in indices] for f in fields]
        extras, groups, digests = (None if getattr(self, f) is None
                                   else [getattr(self, f)[i] for i in indices]
                                   for f in ("extras", "groups", "digests"))
        return SegmentationSet(*picked, extras=extras, groups=groups, digests=digests)

    def __add__(self, other: SegmentationSet) -> SegmentationSet:
        """Both sets' images in one set (extras and groups only when both have them; the
        digests of either)."""
        def joined(field):
            a, b = getattr(self, field), getattr(other, field)
            return None if a is None or b is None else list(a) + list(b)

        digests = None if self.digests is None and other.digests is None else \
            (self.digests or [""] * len(self)) + (other.digests or [""] * len(other))
        return SegmentationSet(self.names + other.names, self.images + other.images,
                               self.targets + other.targets, self.fovs + other.fovs,
                               extras=joined("extras"), groups=joined("groups"),
                               digests=digests)

    def with_extras(self, extras: Sequence[np.ndarray]) -> SegmentationSet:
        """A copy whose ``y`` carries ``extras`` (one (H, W) or (H, W, E) map per image)."""
        maps = [e[..., None] if e.ndim == 2 else e for e in extras]
        if len(maps) != len(self):
            raise ValueError(f"{len(maps)} extra target maps for {len(self)} images")
        for name, image, extra in zip(self.names, self.images, maps):
            if extra.shape[:2] != image.shape[:2]:
                raise DatasetError(f"{name}: extra target map is {extra.shape[1::-1]}, the image "
                                   f"{image.shape[1::-1]}")
        return dataclasses.replace(self, extras=[m.astype(np.float32) for m in maps])


@dataclasses.dataclass
class Augment:
    """Augmentations applied identically to image, target and FOV (intensity: image only).

    Args:
        flip: random horizontal and vertical flips.
        rot90: random multiples of 90 degrees.
        rotate_degrees: uniform free rotation in [-d, d] degrees (0 = off).
        brightness: additive shift in [-b, b].
        contrast: multiplicative factor around the mean in [1 - c, 1 + c].
        gamma: exponent exp(u), u in [-g, g].
    """

    flip: bool = True
    rot90: bool = True
    rotate_degrees: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0

    @classmethod
    def none(cls) -> Augment:
        return cls(flip=False, rot90=False)


# --- loading ---------------------------------------------------------------------------------

def resolve_samples(dataset: str | None = None, data_dir: str | os.PathLike | None = None,
                    split: str = "training", label_file: str | os.PathLike | None = None
                    ) -> list[Sample]:
    """Samples from a seed-style label file, or from a dataset name and its folder."""
    if label_file:
        return read_label_file(label_file)
    if dataset and not data_dir:  # the half given named, not asked for again
        raise ConfigError(f"--dataset={dataset} needs --data_dir: the folder it is unpacked "
                          f"in (e.g. --data_dir=data/{official_folder(dataset)})")
    if data_dir and not dataset:
        raise ConfigError(f"--data_dir={data_dir} needs --dataset: which layout it holds "
                          "(drive, stare, chase_db1, hrf, rite, ...)")
    if not dataset:
        raise ConfigError("no images to use: give --label_file_path (a label file from "
                          "bin/preprocess.py), or --dataset and --data_dir")
    return list_samples(dataset, data_dir, split)


def data_key(dataset: str | None, data_dir: str | os.PathLike | None,
             label_file: str | os.PathLike | None) -> dict[str, str | None]:
    """Which images :func:`resolve_samples` reads, in a form to record beside what was made
    from them (error maps, RIP patches) and to compare: two folders with the same image names
    (RITE and DRIVE, two synthetic sets) must not pass for each other."""
    def where(path):
        return str(Path(path).resolve()) if path else None
    return {"dataset": dataset or None, "data_dir": where(data_dir),
            "label_file_path": where(label_file)}


def target_of(data: SampleData, task: str) -> np.ndarray:
    """The float32 (H, W, K) target: vessel (K=1) or artery/vein/vessel (K=3)."""
    if task == "vessel":
        if data.vessel is None:
            raise DatasetError(f"{data.name}: no vessel label")
        return data.vessel[..., None].astype(np.float32)
    if task == "av":
        if data.av is None:
            raise DatasetError(f"{data.name}: no artery/vein label: task 'av' needs an A/V "
                               "dataset in its layout (e.g. --dataset=rite; label files carry "
                               "vessel labels only)")
        return data.av.astype(np.float32)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _cache_key(sample: Sample, pre: Preprocessor) -> str:
    # the file's size and modification time too: an image replaced under the same name (a
    # corrected photograph) is preprocessed again, not read back stale
    stat = Path(sample.image).stat()
    blob = json.dumps([str(Path(sample.image).resolve()), stat.st_size, stat.st_mtime_ns,
                       pre.get_config()], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def preprocess_cached(sample: Sample, image: np.ndarray, pre: Preprocessor,
                      cache_dir: str | os.PathLike | None) -> np.ndarray:
    """Preprocesses ``image``, reading/writing ``cache_dir/<name>-<key>.npy`` when given.

    The key hashes the image path, its size and modification time and the full preprocessor
    config (fitted statistics included), so a cache made of another file or with other
    statistics is never reused.
    """
    if cache_dir is None:
        return pre(image)
    path = Path(cache_dir) / f"{sample.name}-{_cache_key(sample, pre)}.npy"
    if path.is_file():
        return np.load(path)
    out = pre(image)
    buffer = io.BytesIO()
    np.save(buffer, out)
    atomic_write_bytes(path, buffer.getvalue())
    return out


def build_set(datas: Sequence[SampleData], pre: Preprocessor, task: str = "vessel",
              samples: Sequence[Sample] | None = None,
              cache_dir: str | os.PathLike | None = None,
              digests: Sequence[str] | None = None) -> SegmentationSet:
    """Preprocesses read samples into a :class:`SegmentationSet`; ``digests``: their
    :func:`~retina_tf.data.io.pixel_digest`, where the caller has them already."""
    if not datas:
        raise DatasetError("no samples to build a dataset from (empty split)")
    if cache_dir is not None:
        clear_killed_writes(cache_dir)
    images = []
    for i, d in enumerate(datas):
        if samples is not None and cache_dir is not None:
            images.append(preprocess_cached(samples[i], d.image, pre, cache_dir))
        else:
            images.append(pre(d.image))
    return SegmentationSet(names=[d.name for d in datas], images=images,
                           targets=[target_of(d, task) for d in datas],
                           fovs=[d.fov.astype(bool) for d in datas],
                           digests=list(digests) if digests is not None else
                           [pixel_digest(d.image) for d in datas])


def _stack(seg: SegmentationSet, height: int, width: int, offset: int = 0) -> np.ndarray:
    """Stacks image | target | extras | fov channels into (N, height, width, C+K+E+1),
    zero-padded."""
    extras = seg.extras or [np.zeros(im.shape[:2] + (0,), np.float32) for im in seg.images]
    c = seg.images[0].shape[-1] + seg.targets[0].shape[-1] + extras[0].shape[-1] + 1
    out = np.zeros((len(seg), height, width, c), np.float32)
    for i, (im, t, e, f) in enumerate(zip(seg.images, seg.targets, extras, seg.fovs)):
        h, w = im.shape[:2]
        out[i, offset:offset + h, offset:offset + w] = np.concatenate(
            [im, t, e, f[..., None].astype(np.float32)], axis=-1)
    return out


# --- augmentation (stateless, graph-only) ----------------------------------------------------

def _rotation_transform(angle: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Projective transform (output -> input coordinates) rotating by ``angle`` about the centre."""
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    x_off = cx - (cos * cx - sin * cy)
    y_off = cy - (sin * cx + cos * cy)
    return tf.stack([cos, -sin, x_off, sin, cos, y_off, 0.0, 0.0])[None]


def _rotate(stack: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
    h, w = stack.shape[0], stack.shape[1]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=stack[None], transforms=_rotation_transform(angle, h, w),
        output_shape=tf.constant([h, w]), fill_value=0.0, interpolation="BILINEAR",
        fill_mode="CONSTANT")
    return out[0]


def _seeds(seed: tf.Tensor, n: int) -> list[tf.Tensor]:
    """``n`` independent stateless seed pairs from a scalar seed or a seed pair."""
    seed = tf.cast(seed, tf.int64)
    pair = seed if seed.shape.rank == 1 else tf.stack([seed, seed // 7919 + 17])
    return tf.unstack(tf.random.experimental.stateless_split(pair, n))


def augment_stack(stack: tf.Tensor, channels: int, aug: Augment, seed: tf.Tensor,
                  crop: int | None = None, extras: int = 0) -> tf.Tensor:
    """Augments a (H, W, C+K+E+1) stack; ``crop`` centre-crops after a free rotation.

    After a free rotation the K labels and the FOV are thresholded back to binary; the E
    ``extras`` channels keep their interpolated values (RIP-AV's distance maps are continuous).
    """
    s = _seeds(seed, 8)
    if aug.rotate_degrees > 0:
        angle = tf.random.stateless_uniform([], s[0], -aug.rotate_degrees, aug.rotate_degrees)
        stack = _rotate(stack, angle * math.pi / 180.0)
    if crop is not None and (stack.shape[0] != crop or stack.shape[1] != crop):
        top, left = (stack.shape[0] - crop) // 2, (stack.shape[1] - crop) // 2
        stack = stack[top:top + crop, left:left + crop]
    if aug.flip:
        stack = tf.cond(tf.random.stateless_uniform([], s[1]) < 0.5,
                        lambda: tf.reverse(stack, [1]), lambda: stack)
        stack = tf.cond(tf.random.stateless_uniform([], s[2]) < 0.5,
                        lambda: tf.reverse(stack, [0]), lambda: stack)
    if aug.rot90 and stack.shape[0] == stack.shape[1]:
        k = tf.random.stateless_uniform([], s[3], 0, 4, dtype=tf.int32)
        stack = tf.image.rot90(stack, k)
    image, rest = stack[..., :channels], stack[..., channels:]
    if aug.rotate_degrees > 0:  # labels and FOV stay binary after interpolation
        binary = tf.cast(rest > 0.5, tf.float32)
        if extras:
            k = rest.shape[-1] - 1 - extras
            binary = tf.concat([binary[..., :k], rest[..., k:k + extras], binary[..., -1:]], -1)
        rest = binary
    if aug.brightness > 0:
        image = image + tf.random.stateless_uniform([], s[4], -aug.brightness, aug.brightness)
    if aug.contrast > 0:
        mean = tf.reduce_mean(image)
        image = (image - mean) * tf.random.stateless_uniform(
            [], s[5], 1 - aug.contrast, 1 + aug.contrast) + mean
    if aug.gamma > 0:
        image = tf.clip_by_value(image, 0.0, 1.0) ** tf.exp(
            tf.random.stateless_uniform([], s[6], -aug.gamma, aug.gamma))
    image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.concat([image, rest], axis=-1)


def _resize_stack(stack: tf.Tensor, side: int, channels: int, extras: int) -> tf.Tensor:
    """A (h, w, C+K+E+1) stack resized to ``side`` (bilinear; area when shrinking), labels and
    FOV thresholded back to binary, the E extras kept continuous."""
    resized = tf.image.resize(stack, (side, side), method="bilinear", antialias=True)
    image, rest = resized[..., :channels], resized[..., channels:]
    k = rest.shape[-1] - 1 - extras
    binary = tf.cast(rest > 0.5, tf.float32)
    rest = tf.concat([binary[..., :k], rest[..., k:k + extras], binary[..., -1:]], -1)
    return tf.concat([image, rest], -1)


def _split(stack: tf.Tensor, channels: int):
    return stack[..., :channels], stack[..., channels:-1], stack[..., -1:]


# --- datasets --------------------------------------------------------------------------------

def patch_dataset(seg: SegmentationSet, patch_size: int = 48, batch_size: int = 32,
                  vessel_probability: float = 0.5, augment: Augment | None = None,
                  seed: int = 0, start: int = 0, context_size: int = 0,
                  crop_sizes: Sequence[int] = (), scale_range: Sequence[float] = (),
                  groups: Sequence[int] | None = None,
                  group_weights: Sequence[float] = ()) -> tf.data.Dataset:
    """Endless batches of random patches ``(x, y, w)``.

    Centres are drawn uniformly from FOV pixels, or with probability ``vessel_probability`` from
    vessel pixels (any target channel), so thin vessels are seen often enough; a set (group)
    whose labels hold no vessel draws those from its FOV too. ``start`` skips
    that many patches of the stream (a resumed run continues where it stopped). With
    ``context_size``, ``x`` is ``{"image": patch, "context": its whole image resized to
    context_size}`` (RIP-AV's global representation; Dai et al., MICCAI 2024). With
    ``crop_sizes``, each patch is a crop of one of these sides (chosen uniformly) resized to
    ``patch_size``, so vessels are seen at several scales (RIP-AV's mixed-size patches);
    labels and FOV are thresholded back to binary after the resize. With ``scale_range``
    ``(lo, hi)``, each patch is a crop of side ``patch_size / s`` resized to ``patch_size``, ``s``
    drawn log-uniformly in ``[lo, hi]``: vessels ``s`` times as wide, as a camera of another
    resolution shows them. With ``groups`` (one group number per image, e.g. its dataset), each
    patch first draws a group uniformly, so a larger set does not dominate, or with
    ``group_weights`` (one per group, in the order of the group numbers) in proportion to them.
    """
    if not 0.0 <= vessel_probability <= 1.0:
        raise ConfigError(f"--vessel_probability={vessel_probability}: must be in [0, 1]")
    augment = augment or Augment()
    channels = seg.images[0].shape[-1]
    n_extras = seg.extras[0].shape[-1] if seg.extras else 0
    def rotation_crop(side: int) -> int:  # larger, so the rotated corners stay inside
        if augment.rotate_degrees <= 0:
            return side
        # for any angle up to the range's end: |cos| + |sin| is largest at 45 degrees
        radians = math.radians(min(augment.rotate_degrees, 45.0))
        return int(math.ceil(side * (abs(math.cos(radians)) + abs(math.sin(radians))))) + 2

    crop = rotation_crop(patch_size)
    if crop_sizes and scale_range:
        raise ConfigError(PATCH_SCALE_CONFLICT)
    if scale_range:
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ConfigError(f"--scale_range={lo:g},{hi:g}: give two factors 0 < lo <= hi "
                              "(e.g. 0.6,1.6)")
        crop_sizes = ()
    cut_sides = tf.constant([rotation_crop(int(c)) for c in crop_sizes] or [crop], tf.int64)
    largest = int(math.ceil(crop / float(scale_range[0]))) if scale_range else \
        int(max(cut_sides.numpy()))
    margin = largest // 2 + 1
    hmax = max(im.shape[0] for im in seg.images)
    wmax = max(im.shape[1] for im in seg.images)
    stack = tf.constant(_stack(seg, hmax + 2 * margin, wmax + 2 * margin, offset=margin))

    def flat_indices(masks):
        out = [i * hmax * wmax + (np.flatnonzero(m) // m.shape[1]) * wmax
               + np.flatnonzero(m) % m.shape[1] for i, m in enumerate(masks)]
        return np.concatenate(out).astype(np.int64)

    group_of = _group_numbers(seg, groups)
    group_ids = np.unique(group_of)
    vessel_masks = [(t.max(axis=-1) > 0) & f for t, f in zip(seg.targets, seg.fovs)]
    # a set whose labels hold no vessel draws its "vessel" centres anywhere in its FOV; the
    # other sets keep theirs on vessels
    empty = [gid for gid in group_ids
             if not any(m.any() for m, g in zip(vessel_masks, group_of) if g == gid)]
    vessel_masks = [f if g in empty else m for m, f, g in zip(vessel_masks, seg.fovs, group_of)]

    def grouped_pool(masks):  # one flat pool, each group's indices contiguous
        parts = [flat_indices([m if g == gid else np.zeros_like(m)
                               for m, g in zip(masks, group_of)]) for gid in group_ids]
        sizes = np.array([p.size for p in parts], np.int64)
        return np.concatenate(parts), np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes

    fov_pool, fov_starts, fov_sizes = grouped_pool(seg.fovs)
    vessel_pool, vessel_starts, vessel_sizes = grouped_pool(vessel_masks)
    if (fov_sizes == 0).any():
        raise DatasetError("no FOV pixels to sample patches from")
    fov_pool, vessel_pool = tf.constant(fov_pool), tf.constant(vessel_pool)
    starts = tf.constant(np.stack([fov_starts, vessel_starts]))
    sizes = tf.constant(np.stack([fov_sizes, vessel_sizes]))
    n_groups = len(group_ids)
    draw_group = _group_draw(n_groups, group_weights)
    contexts = None
    if context_size:  # as the model's own context_of at inference: area resize of the image
        contexts = tf.constant(np.concatenate([
            tf.image.resize(im[None], (context_size, context_size), method="area").numpy()
            for im in seg.images]).astype(np.float32))

    def sample(seed_scalar):
        s = _seeds(seed_scalar, 3)
        on_vessel = tf.random.stateless_uniform([], s[0]) < vessel_probability
        pool = tf.cond(on_vessel, lambda: vessel_pool, lambda: fov_pool)
        kind = tf.cast(on_vessel, tf.int32)
        group = 0 if n_groups == 1 else draw_group(_seeds(seed_scalar + 104729, 1)[0])
        j = starts[kind, group] + tf.random.stateless_uniform([], s[1], 0, sizes[kind, group],
                                                              dtype=tf.int64)
        flat = pool[j]
        n = flat // (hmax * wmax)
        y = (flat // wmax) % hmax
        x = flat % wmax
        if crop_sizes:
            pick = tf.random.stateless_uniform([], _seeds(seed_scalar + 7919, 1)[0], 0,
                                               len(crop_sizes), dtype=tf.int32)
            side = tf.gather(cut_sides, pick)
        elif scale_range:
            log_s = tf.random.stateless_uniform([], _seeds(seed_scalar + 7919, 1)[0],
                                                math.log(lo), math.log(hi))
            side = tf.cast(tf.round(crop / tf.exp(log_s)), tf.int64)
        else:
            side = tf.constant(crop, tf.int64)
        begin = tf.stack([n, y + margin - side // 2, x + margin - side // 2,
                          tf.constant(0, tf.int64)])
        patch = tf.slice(stack, begin, tf.stack([1, side, side, stack.shape[-1]]))[0]
        if crop_sizes or scale_range:
            patch = _resize_stack(patch, crop, channels, n_extras)
        patch = tf.ensure_shape(patch, [crop, crop, stack.shape[-1]])
        patch = augment_stack(patch, channels, augment, s[2], crop=patch_size, extras=n_extras)
        x, y_, w = _split(patch, channels)
        if contexts is None:
            return x, y_, w
        return {"image": x, "context": tf.gather(contexts, n)}, y_, w

    ds = tf.data.Dataset.random(seed=seed).skip(start).map(
        sample, num_parallel_calls=tf.data.AUTOTUNE)
    return without_autotune(ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def _group_numbers(seg: SegmentationSet, groups: Sequence[int] | None) -> np.ndarray:
    """One group number per image of ``seg`` (all 0 without ``groups``)."""
    group_of = np.zeros(len(seg), np.int64) if groups is None else np.asarray(groups, np.int64)
    if group_of.shape != (len(seg),):
        raise ValueError(f"{len(group_of)} group numbers for {len(seg)} images")
    return group_of


def _group_draw(n_groups: int, weights: Sequence[float] = ()):
    """A function of a stateless seed that draws a group number in ``[0, n_groups)``:
    uniformly, or in proportion to ``weights`` (one per group)."""
    if weights and len(weights) != n_groups:
        raise ValueError(f"{len(weights)} group weights for {n_groups} groups")
    # where the group's share ends on [0, 1): a uniform draw falls in group k's interval
    bounds = tf.constant(np.cumsum(weights)[:-1] / np.sum(weights), tf.float32) \
        if weights else None

    def draw(seed):
        if bounds is None:
            return tf.random.stateless_uniform([], seed, 0, n_groups, dtype=tf.int32)
        return tf.reduce_sum(tf.cast(bounds <= tf.random.stateless_uniform([], seed), tf.int32))
    return draw


def padded_size(seg: SegmentationSet, multiple: int, square: bool = False) -> tuple[int, int]:
    h = max(im.shape[0] for im in seg.images)
    w = max(im.shape[1] for im in seg.images)
    if square:
        h = w = max(h, w)
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def whole_image_dataset(seg: SegmentationSet, batch_size: int = 1, multiple: int = 16,
                        augment: Augment | None = None, seed: int = 0, shuffle: bool = True,
                        repeat: bool = True, start: int = 0,
                        groups: Sequence[int] | None = None,
                        group_weights: Sequence[float] = ()) -> tf.data.Dataset:
    """Batches of whole images zero-padded (bottom/right) to a multiple of ``multiple``.

    With rot90 augmentation the padding is square so every rotation keeps the shape. Padding
    has FOV weight 0. ``start`` skips that many images of the (shuffled, repeated) stream.
    With ``groups`` of more than one group number (one per image, e.g. its dataset) and
    ``repeat``, each item first draws a group, uniformly or in proportion to
    ``group_weights``, then one of its images uniformly (as :func:`patch_dataset`).
    """
    augment = augment if augment is not None else Augment()
    channels = seg.images[0].shape[-1]
    n_extras = seg.extras[0].shape[-1] if seg.extras else 0
    h, w = padded_size(seg, multiple, square=augment.rot90)
    stack = tf.constant(_stack(seg, h, w))
    group_of = _group_numbers(seg, groups)
    if repeat and len(np.unique(group_of)) > 1:
        order = np.argsort(group_of, kind="stable")  # each group's images contiguous
        _, first, counts = np.unique(group_of[order], return_index=True, return_counts=True)
        members, firsts, counts = (tf.constant(v, tf.int64) for v in (order, first, counts))
        draw_group = _group_draw(len(counts), group_weights)

        def pick(seed_scalar):
            s = _seeds(seed_scalar + 104729, 2)
            g = draw_group(s[0])
            i = firsts[g] + tf.random.stateless_uniform([], s[1], 0, counts[g], dtype=tf.int64)
            return members[i], seed_scalar

        ds = tf.data.Dataset.random(seed=seed + 1).skip(start).map(pick)
    else:
        ds = tf.data.Dataset.from_tensor_slices(tf.range(len(seg), dtype=tf.int64))
        if shuffle:
            ds = ds.shuffle(len(seg), seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed + 1))).skip(start)

    def load(i, seed_scalar):
        item = tf.gather(stack, i)
        if augment != Augment.none():
            item = augment_stack(item, channels, augment, seed_scalar, extras=n_extras)
        return _split(item, channels)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return without_autotune(ds.batch(batch_size, drop_remainder=repeat).prefetch(
        tf.data.AUTOTUNE))


def with_context(dataset: tf.data.Dataset, patch_size: int, context_size: int) -> tf.data.Dataset:
    """Turns batches of wide crops ``(x, y, w)`` into ``({"image", "context"}, y, w)``: the
    centre ``patch_size`` crop, and the whole wide crop resized to ``context_size`` as its
    context (RIP-AV's Patch Context Fusion in training; Dai et al., MICCAI 2024)."""

    def split(x, y, w):
        offset = (tf.shape(x)[1] - patch_size) // 2

        def centre(t):
            return t[:, offset:offset + patch_size, offset:offset + patch_size]

        context = tf.image.resize(x, (context_size, context_size), method="area")
        return {"image": centre(x), "context": tf.cast(context, x.dtype)}, centre(y), centre(w)

    return dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE)
