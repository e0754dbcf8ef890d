"""Segmenting images with a trained model: whole-image or sliding-window inference.

Whole-image inference pads the preprocessed image to the model's size multiple and runs one
forward pass (a DRIVE image in well under a second on a CPU), or, for a large image, one pass
per overlapping tile (``tiled_predict``: memory bounded by a tile); sliding-window inference
(``sliding_window_predict``) averages overlapping windows for models that need a fixed input
size. A photograph of another scale is first resized near the training FOV diameter
(``Segmenter.scale_plan``). All run the model inside a ``tf.function`` over batched tensors,
never ``model.predict`` on numpy (which sometimes uses one core).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import platform
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
import tensorflow as tf

from retina_tf.config import (
    CHOICES,
    InferenceConfig,
    as_kind,
    from_flag_lines,
    parse_inference_scale,
)
from retina_tf.data.fov import estimate_fov, estimate_warnings, given_fov_warning
from retina_tf.data.io import (
    atomic_write_bytes,
    channel_order_warning,
    fov_of_array,
    is_gray,
    read_fov_mask,
    read_image,
)
from retina_tf.data.patches import extract_patches, pad_to_multiple, recompose_patches
from retina_tf.data.preprocess import Preprocessor
from retina_tf.errors import ConfigError, DatasetError, ModelFileError
from retina_tf.models import blocks, load_all
from retina_tf.models.base import SegmentationModel
from retina_tf.postprocess import av_mask, vote_av_segments
from retina_tf.run_folder import (
    PRETRAINED_DIR,
    RUN_FILES,
    find_run,
    reading_run,
    save_model_file,
    shipped_models,
)

log = logging.getLogger(__name__)

# The mask threshold of a run that stores none.
DEFAULT_THRESHOLD = 0.5
# run.json's switches a run chose for itself on its held-out images (or the run it was
# fine-tuned from); Segmenter.from_run uses them unless told otherwise
RUN_CHOICES = ("tta", "tta_transpose", "av_vote")


def tta_views(transpose: bool) -> list[tuple[tuple[int, ...], bool]]:
    """Test-time augmentation's views, as (axes flipped, transposed first): the photograph and
    its horizontal, vertical and double flips, and with ``transpose`` the same of its
    transpose (the export's graph averages the same views)."""
    return [(flip, turn) for turn in ((False, True) if transpose else (False,))
            for flip in ((), (1,), (0,), (0, 1))]


# Window batches computed at once: one batch of small windows at a time keeps two cores only
# 1.3 busy (the small layers of a batch do not split well over threads); two in flight keep them
# 1.9 busy and the RIP-AV evaluation 1.1-1.3x faster (bench/av_eval_time.py --in_flight=1,2).
BATCHES_IN_FLIGHT = 2


def load_keras_model(path: str | os.PathLike) -> keras.Model:
    """Loads a ``.keras`` file for inference (no optimizer), with retina_tf's models registered.

    Keras reports any unreadable file as "File not found"; this names what is wrong instead.

    Raises:
        ModelFileError: when the file is missing, truncated, or not a Keras model file.
    """
    load_all()
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a model file" if path.is_dir() else "does not exist"
        raise ModelFileError(f"{path} {what}")
    # A .keras file is a zip archive; a truncated copy loses the archive's closing directory.
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is corrupt or not a Keras model file (not a complete "
                             ".keras archive: truncated or another format); copy or export "
                             "it again")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as err:  # Keras raises many types for damaged archives; a bug chains too
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{path} is corrupt or not a Keras model file ({first_line}); "
                             "copy or export it again") from err
    # NaN weights give NaN probabilities, which become empty masks without a word
    bad = nonfinite_weights(model)
    if bad:
        raise ModelFileError(f"{path} holds weights that are not finite (NaN or infinite: "
                             f"{len(bad)} of {len(model.weights)} variables, {bad[0]} first): "
                             "it comes from a training that diverged; train it again with a "
                             "lower --learning_rate")
    return model


def nonfinite_weights(model: keras.Model) -> list[str]:
    """The paths of ``model``'s variables holding NaN or an infinity."""
    return [w.path for w in model.weights
            if not np.isfinite(keras.ops.convert_to_numpy(w)).all()]


def read_run_json(run_dir: Path) -> dict:
    """A run folder's ``run.json``; ModelFileError where it cannot be read as an object."""
    path = run_dir / "run.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} cannot be read as the run's settings ({err}); the run "
                             "folder is damaged: export or train it again") from err
    if not isinstance(info, dict):
        raise ModelFileError(f"{path} is not a JSON object of run settings")
    return info


def _uint8_rgb(image, source: str | os.PathLike = "the image") -> np.ndarray:
    """``image`` as an array, or DatasetError naming ``source`` and how to convert it."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DatasetError(f"{source} is a {image.dtype} array of shape {image.shape}; "
                           f"segmenting takes uint8 RGB (H, W, 3), as "
                           f"retina_tf.data.io.read_image returns: {_to_uint8_rgb_hint(image)}")
    return image


def check_threshold(threshold: float) -> float:
    """Raises ConfigError unless ``0 < threshold < 1`` (0 or 1 would make every pixel, or
    none, a vessel)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):  # "abc", None: not a number at all
        value = math.nan
    if not 0.0 < value < 1.0:
        raise ConfigError(f"--threshold={threshold} must lie strictly between 0 and 1 "
                          "(e.g. 0.5)")
    return value


def _whole_number(name: str, value: Any) -> int:
    """A Segmenter keyword that counts pixels or windows, as an int read as a config reads one
    (:func:`~retina_tf.config.as_kind`); ConfigError otherwise."""
    try:
        return as_kind(name, value, int)
    except ValueError:  # ConfigError too, for text its flag would not take
        raise ConfigError(f"{name}={value!r} (--{name}): give a whole number") from None


def stored_threshold(run_info: dict, run_dir: str | Path | None = None) -> tuple[float, str]:
    """A run's own mask threshold and where it comes from: ``run.json``'s ``"threshold"``
    (chosen at the end of training by :func:`retina_tf.evaluation.choose_threshold`), else the
    ``--threshold`` line of its ``flags.txt`` (older versions wrote evaluation flags there;
    a stored threshold comes first), else :data:`DEFAULT_THRESHOLD`.

    Raises:
        ModelFileError: a stored threshold that is no number strictly between 0 and 1.
    """
    value = run_info.get("threshold")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0.0 < value < 1.0:  # NaN fails the comparison too
            where = Path(run_dir) / "run.json" if run_dir is not None else "run.json"
            raise ModelFileError(f"{where}: \"threshold\": {value!r} is no probability "
                                 "strictly between 0 and 1; fix or remove it, or give "
                                 "--threshold")
        images = (run_info.get("threshold_from") or {}).get("images") or []
        n = len(images)
        on = f"its {n} held-out training image{'' if n == 1 else 's'}" if n else \
            "its held-out training images"
        kept = value == 0.5 and "kept_0_5" in (run_info.get("threshold_from") or {})
        return float(value), (f"the run's: no threshold beat 0.5 on {on}" if kept else
                              f"the run's, chosen on {on}")
    if run_dir is not None and (Path(run_dir) / "flags.txt").is_file():
        try:
            legacy = run_inference(run_dir).threshold
        except ValueError as err:
            raise ModelFileError(f"{Path(run_dir) / 'flags.txt'}: {err}") from err
        if legacy is not None:
            try:
                return check_threshold(legacy), "the run's --threshold in its flags.txt"
            except ConfigError as err:
                raise ModelFileError(f"{Path(run_dir) / 'flags.txt'}: {err}") from err
    return DEFAULT_THRESHOLD, "the default: the run stores none"


def tta_line(seg: Segmenter, given: Any) -> str | None:
    """The line that says a run's own choice (``run.json``, :data:`RUN_CHOICES`) turned on TTA
    or the A/V vote, for the commands' reports; None when it turned on neither. ``given``: the
    command's :class:`InferenceConfig` (a flag left out is None there)."""
    chosen = [key for key in ("tta", "av_vote") if getattr(given, key) is None
              and getattr(seg, key) and seg.run_info.get(key)]
    if not chosen:
        return None
    info = seg.run_info.get("tta_from") or {}
    n = len(info.get("images") or [])
    whose = f"{info['run']}'s" if info.get("run") else "its"
    gain = ""
    if n and all(getattr(given, key) is None for key in RUN_CHOICES):  # the choice as made
        for words, plain, chose, digits in (("F1", "f1", "f1_tta", 4),
                                            ("A/V accuracy", "av_acc", "av_acc_chosen", 3)):
            if plain in info and chose in info:
                gain = (f": {words} {info[chose]:.{digits}f} against {info[plain]:.{digits}f} "
                        f"on {whose} {n} held-out training image{'' if n == 1 else 's'}")
                break
    what = [seg.tta_name] if "tta" in chosen else []
    if "av_vote" in chosen:
        what.append("one A/V decision per vessel segment")
    off = " ".join(f"--no{key}" for key in chosen)
    faster = ("is about 7x faster" if seg.tta_transpose else "is 4x faster") if "tta" in chosen \
        else "decides pixel by pixel"
    return f"{' and '.join(what)} (the run's choice{gain}); {off} {faster}"


def resolve_threshold(seg: Segmenter, given: float | None, label: str = ""
                      ) -> tuple[float, str]:
    """The threshold a command uses and where it comes from: ``given`` (``--threshold``) when
    not None, else the run's (:attr:`Segmenter.threshold`); logs both (after ``label``: which
    run, where a command segments with several).

    Raises:
        ConfigError: a given threshold outside (0, 1).
    """
    if given is not None:
        value, source = check_threshold(given), "--threshold"
    else:
        value, source = seg.threshold, seg.threshold_source
    log.info(f"{label + ': ' if label else ''}threshold {value:g} ({source})")
    return value, source


def run_inference(run_dir: str | Path) -> InferenceConfig:
    """The inference settings of a run: those its ``flags.txt`` records (``stride``,
    ``eval_scales``, a shipped model's ``inference``, ``threshold``...), the defaults for the
    rest."""
    path = Path(run_dir) / "flags.txt"
    if not path.is_file():
        return InferenceConfig()
    return from_flag_lines(InferenceConfig, path.read_text(), ignore_unknown=True)


def _fov_of(fov: np.ndarray, image: np.ndarray, source: str | os.PathLike,
            mask_file: str | os.PathLike | None = None) -> np.ndarray:
    """A FOV mask as given (bool, 0/1, 0/255; one channel or three) as bool (H, W), read as
    its file would be (:func:`retina_tf.data.io.fov_of_array`); a warning of it names its file
    (``mask_file``), else the image.

    A 0/255 mask used as it is would scale the probabilities by 255 in silence.
    """
    fov = np.asarray(fov)
    if fov.shape[:2] != image.shape[:2]:
        size = " x ".join(str(n) for n in fov.shape[1::-1]) or "a scalar"
        raise DatasetError(f"the FOV mask given for {source} is {size} pixels, the image "
                           f"{image.shape[1]} x {image.shape[0]}: give this photograph's "
                           "mask, or none to estimate it")
    fov = fov_of_array(fov, source)
    warning = given_fov_warning(np.asarray(image), fov, str(mask_file or source))
    if warning:
        log.warning(warning)
    return fov


def _switch(name: str, value: Any) -> bool:
    """A True / False argument as such: ``bool("False")`` would switch it on."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name}={value!r}: give True or False")
    return bool(value)


def _to_uint8_rgb_hint(image: np.ndarray) -> str:
    """How to turn an array of another kind into the uint8 RGB a Segmenter takes."""
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
        return "repeat a gray image over three channels (np.dstack([g, g, g]))"
    if image.ndim == 3 and image.shape[-1] == 4:
        return "drop the alpha channel (image[..., :3])"
    if image.ndim == 4 and image.shape[0] == 1:
        return "give one image, not a batch of one (image[0])"
    if image.ndim == 4:
        return f"segment the {image.shape[0]} images one at a time (for one in images: ...)"
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] > 4:
        return "move the channels last (np.moveaxis(image, 0, -1))"
    if np.issubdtype(image.dtype, np.floating):
        return ("scale floats to 0-255 first (np.clip(image * 255, 0, 255).round()"
                ".astype(np.uint8) for values in [0, 1])")
    if image.dtype == np.uint16:
        return ("scale 16-bit values by their bit depth, as read_image does (12-bit data in "
                "16-bit words: np.rint(image * 255 / 4095).astype(np.uint8); "
                "retina_tf.data.io.bit_depth(image.max()) gives the bits)")
    return "read the photograph with retina_tf.data.io.read_image"


def logits_to_probability(logits: tf.Tensor) -> tf.Tensor:
    return tf.sigmoid(tf.cast(logits, tf.float32))


PRECISIONS = CHOICES["precision"]
# /proc/cpuinfo flags of the CPUs whose oneDNN kernels compute bfloat16 natively; "auto" uses
# bfloat16 only there, where U-Nets measured 1.6-2x faster at the same DRIVE F1
# (docs/results/speed.md#bfloat16).
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo(field: str) -> str | None:
    """The first CPU's ``field`` in /proc/cpuinfo ("flags", "model name"); None where there is
    none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def environment() -> dict[str, Any]:
    """What a result depends on besides its settings and data: the versions of retina_tf,
    Python, TensorFlow, Keras, NumPy and OpenCV, the CPU (its model, and whether it computes
    bfloat16 natively) and the GPUs TensorFlow sees. Training stores it in ``run.json`` and
    evaluation in its ``metrics.json``, so that a figure can be traced to what made it."""
    cpu = _cpuinfo("model name") or platform.processor() or platform.machine()
    gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            for gpu in tf.config.list_physical_devices("GPU")]
    # the package, set up before any of its modules, has its version from its first lines
    return {"retina_tf": sys.modules["retina_tf"].__version__,
            "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
            "opencv": cv2.__version__, "cpu": cpu, "native_bfloat16": native_bfloat16(),
            "gpus": gpus}


def native_bfloat16(cpu: set[str] | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AMX or AVX512-BF16; elsewhere TensorFlow
    emulates it, slower than float32). ``cpu``: the CPU flags (default: :func:`cpu_flags`)."""
    return bool((cpu_flags() if cpu is None else cpu) & set(BFLOAT16_CPU_FLAGS))


def resolve_precision(precision: str, model: keras.Model | None = None,
                      cpu: set[str] | None = None) -> str:
    """"float32" or "bfloat16": ``precision`` itself, or for "auto" bfloat16 on a CPU with AMX or
    AVX512-BF16 (where oneDNN's bfloat16 convolutions are 1.6-2x faster) for a model whose class
    measured it faster (``bfloat16_pays``: the U-Net; RIP-AV's ConvNeXt was not), and float32
    elsewhere, GPUs included. ``cpu``: the CPU flags (default: this machine's,
    :func:`cpu_flags`)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision={precision}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if model is not None and not getattr(model, "bfloat16_pays", False):
        return "float32"
    gpu = bool(tf.config.list_logical_devices("GPU"))
    return "bfloat16" if native_bfloat16(cpu) and not gpu else "float32"


def computing_in(model: keras.Model, precision: str) -> keras.Model:
    """``model`` itself for "float32"; for "bfloat16" a copy of it that computes in bfloat16
    with its float32 weights (Keras's ``mixed_bfloat16`` policy: each layer casts its inputs and
    weights; batch normalization and the probabilities stay float32). The copy keeps the model's
    class (its ``size_multiple``, context and scales), and ``model`` is left as it was.

    On CPUs with AVX512-BF16 (or AMX) oneDNN runs bfloat16 convolutions natively; elsewhere
    TensorFlow emulates them, slower than float32.
    """
    precision = resolve_precision(precision, model)
    if precision == "float32":
        return model
    _say_if_emulated()
    return _bfloat16_copy(model)


def _say_if_emulated() -> None:
    """Once for each choice of bfloat16, however many copies it makes."""
    if not native_bfloat16() and not tf.config.list_logical_devices("GPU"):
        log.info("bfloat16: this CPU has no AVX512-BF16 or AMX, so TensorFlow emulates it: "
                 "expect it slower than --precision=float32")


def _bfloat16_copy(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with its weights, computing in bfloat16."""
    if isinstance(model, SegmentationModel):  # clone_model would lose a functional subclass
        copy = type(model).from_config(model.get_config())
    else:
        copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return _in_bfloat16(copy)


def _in_bfloat16(copy: keras.Model) -> keras.Model:
    """``copy`` (a model of its own) set to compute in bfloat16 (``mixed_bfloat16``)."""
    # Keras 3 has no public walk over nested layers; _flatten_layers is what Model.layers uses.
    for layer in copy._flatten_layers(include_self=True, recursive=True):
        layer.dtype_policy = "mixed_bfloat16"
    return copy


class _Folded(keras.layers.Layer):
    """Stands where a batch normalization was folded into the convolution before it."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def _foldable_batch_norms(model: keras.Model) -> dict[str, keras.layers.BatchNormalization]:
    """Conv2D name -> the batch normalization that alone reads its output, for the pairs of a
    functional ``model`` that fold exactly: a linear, channels-last Conv2D called once, whose
    output only that BatchNormalization (channels last, called once) reads."""
    pairs = {}
    for bn in model.layers:
        if type(bn) not in (keras.layers.BatchNormalization, blocks.BatchNormalization) \
                or len(bn._inbound_nodes) != 1 or bn.axis % 4 != 3:
            continue
        node = bn._inbound_nodes[0]
        if len(node.input_tensors) != 1:
            continue
        conv = node.input_tensors[0]._keras_history.operation
        if (type(conv) is keras.layers.Conv2D and len(conv._inbound_nodes) == 1
                and len(conv._outbound_nodes) == 1 and conv.data_format == "channels_last"
                and conv.activation is keras.activations.linear):
            pairs[conv.name] = bn
    return pairs


def fold_batch_norms(model: keras.Model) -> keras.Model:
    """An inference copy of a functional ``model`` with each batch normalization that follows a
    convolution folded into that convolution's kernel and bias: ``gamma (x - mean) / sqrt(var +
    eps) + beta`` is affine per channel at inference (Ioffe & Szegedy 2015, "Batch
    Normalization", sec. 3.1), so it becomes the convolution's (Jacob et al. 2018, "Quantization
    and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", sec. 3.2).

    The same function in float32 up to rounding; in bfloat16 it also spares each layer's
    casts to float32 and back for the normalization, and oneDNN fuses convolution, bias and
    ReLU: ``unet_drive`` segments a DRIVE image 2-2.5x faster on a CPU with AMX
    (docs/results/speed.md). The copy is a plain functional model with the same layer names and
    dtype policies; ``model`` itself is returned when it is not functional or has no such pair.
    """
    if not (isinstance(model, keras.Model) and hasattr(model, "_run_through_graph")):
        return model
    pairs = _foldable_batch_norms(model)
    if not pairs:
        return model
    folded_bns = {id(bn) for bn in pairs.values()}

    def clone(layer):
        if id(layer) in folded_bns:
            return _Folded(name=layer.name, dtype=layer.dtype_policy)
        config = layer.get_config()
        if layer.name in pairs:
            config["use_bias"] = True
        return type(layer).from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if id(layer) in folded_bns or not layer.weights:  # an unnamed input is renamed
            continue
        target = copy.get_layer(layer.name)
        if layer.name in pairs:
            bn = pairs[layer.name]
            var = keras.ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
            mean = keras.ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
            scale = 1.0 / np.sqrt(var + bn.epsilon)
            if bn.scale:
                scale = scale * keras.ops.convert_to_numpy(bn.gamma)
            shift = keras.ops.convert_to_numpy(bn.beta) if bn.center else 0.0
            kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
            bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else 0.0
            target.set_weights([(kernel * scale).astype(np.float32),
                                ((bias - mean) * scale + shift).astype(np.float32)])
        else:
            target.set_weights(layer.get_weights())
    return copy


def model_logits(outputs) -> tf.Tensor:
    """The segmentation logits of a model output (a tensor or a dict with ``"logits"``)."""
    return outputs["logits"] if isinstance(outputs, dict) else outputs


# --- the inference scale of a photograph -------------------------------------------------------

# A FOV within this share of the diameter aimed at is segmented as it is.
SCALE_TOLERANCE = 0.2
# --inference_scale=auto shrinks a photograph by at most this much (run.json "auto_min_scale"
# overrides it for a model measured otherwise). unet_drive on HRF: F1 0.696 with the FOV matched
# (x0.17), 0.743 at x0.33: further down thin vessels fall under a pixel and the probabilities,
# enlarged 6x back, widen every vessel (docs/models.md).
AUTO_MIN_SCALE = 1 / 3
# ... and enlarges it by at most this much: a FOV estimated on something that is no fundus
# photograph (a label map, a bright spot) would otherwise be blown up tens of times, for minutes.
AUTO_MAX_SCALE = 3.0


def inference_factor(setting: str | float, diameter: float, trained: float | None,
                     auto_min_scale: float = AUTO_MIN_SCALE) -> float:
    """The resize factor of a photograph whose FOV is ``diameter`` px wide, for a model trained
    on FOVs ``trained`` px wide; 1.0: segmented as it is.

    ``training`` aims at the training diameter, a number ``f`` at ``f`` times it, ``auto`` at
    the training diameter shrinking by at most ``auto_min_scale`` and enlarging by at most
    :data:`AUTO_MAX_SCALE`; ``native`` never resizes,
    and neither does any setting when the FOV lies within :data:`SCALE_TOLERANCE` of its aim
    (or is unknown).
    """
    setting = parse_inference_scale(setting)
    if setting == "native" or not (trained and diameter):
        return 1.0
    target = float(trained) * (setting if isinstance(setting, float) else 1.0)
    if abs(diameter / target - 1.0) <= SCALE_TOLERANCE:
        return 1.0
    factor = target / diameter
    return min(max(factor, auto_min_scale), AUTO_MAX_SCALE) if setting == "auto" else factor


@dataclasses.dataclass(frozen=True)
class ScalePlan:
    """How :meth:`Segmenter.probability_at_inference_scale` segments one photograph.

    Attributes:
        width, height: the photograph's size.
        fov_diameter: its FOV's diameter in pixels (:func:`fov_diameter`; 0: unknown).
        training_fov_diameter: the training images' (run.json ``fov_diameter``; None unknown).
        factor: the resize factor (1.0: segmented as it is).
        size: (width, height) segmented at.
        wanted: the factor that would bring the FOV to its aim, where ``auto`` capped it.
        box: (top, bottom, left, right) of the part resized and segmented where that is the
            FOV's box (:func:`fov_box`), else None: the whole photograph.
    """

    width: int
    height: int
    fov_diameter: float
    training_fov_diameter: float | None
    factor: float
    size: tuple[int, int]
    wanted: float | None = None
    box: tuple[int, int, int, int] | None = None

    @property
    def rescaled(self) -> bool:
        return self.size != (self.width, self.height) or self.box is not None

    @property
    def segmented_at(self) -> str:
        """E.g. "segmented at 1168x779 (x0.33)", "... (x2.81, the FOV box)", "segmented as it
        is"."""
        if not self.rescaled:
            return "segmented as it is"
        box = ", the FOV box" if self.box else ""
        return f"segmented at {self.size[0]}x{self.size[1]} (x{self.factor:.2f}{box})"

    def describe(self) -> str:
        """E.g. "3504x2336, FOV 3261 px -> segmented at 1168x779 (x0.33), the training FOV is
        540 px"."""
        text = f"{self.width}x{self.height}, FOV {self.fov_diameter:.0f} px -> {self.segmented_at}"
        if self.training_fov_diameter:
            text += f", the training FOV is {self.training_fov_diameter:.0f} px"
        return text

    def resized(self, array: np.ndarray) -> np.ndarray:
        """The part of ``array`` (the photograph, or a map of its size) that is segmented: the
        FOV's box or all of it, resized to :attr:`size` (OpenCV area)."""
        top, bottom, left, right = self.box or (0, self.height, 0, self.width)
        return cv2.resize(array[top:bottom, left:right], self.size, interpolation=cv2.INTER_AREA)

    def warning(self, source) -> str | None:
        """A one-line warning when ``auto`` enlarged the photograph less than its FOV needs
        (:data:`AUTO_MAX_SCALE`), else None: its thin vessels are narrower than any the model
        learned."""
        if not self.wanted or self.wanted <= self.factor:
            return None
        return (f"warning: {source}: its FOV is {self.fov_diameter:.0f} px wide, enlarged "
                f"x{self.factor:.2f} at most to {self.fov_diameter * self.factor:.0f} px; the "
                f"model learned on FOVs {self.training_fov_diameter:.0f} px wide, so thin "
                "vessels may be missed: a photograph of higher resolution segments better")


# --- a vessel map far from any the model learned ----------------------------------------------

# Segmenter.segment warns when a photograph's vessel mask covers under VESSEL_SHARE_LOW times the
# smallest share of a training image's FOV its labels mark as vessel (run.json "vessel_share"),
# or over VESSEL_SHARE_HIGH times the largest. ripav_rite (RITE labels: 7-17 %) found 2-4 % on
# CHASE_DB1 photographs and 0.2-3 % on some STARE ones, whose labels mark 6-14 %: most vessels
# missed, in silence. The shipped vessel models stay inside these bounds on every labelled set
# at hand (4-15 %; bench/vessel_share.py, docs/training.md).
VESSEL_SHARE_LOW = 0.5
VESSEL_SHARE_HIGH = 2.0


def vessel_share(mask: np.ndarray, fov: np.ndarray) -> float:
    """The share of ``fov`` that ``mask`` marks as vessel: its last channel (H, W[, K]) above
    0.5, a label or a model's decision alike; 0.0 for an empty FOV."""
    fov = np.asarray(fov) > 0
    vessel = np.asarray(mask)
    vessel = vessel[..., -1] if vessel.ndim == 3 else vessel
    return float(np.mean(vessel[fov] > 0.5)) if fov.any() else 0.0


def label_vessel_share(targets: Sequence[np.ndarray], fovs: Sequence[np.ndarray]
                       ) -> dict[str, float | int] | None:
    """The least and the largest :func:`vessel_share` of a training image's label (the last
    channel of a training target), over the training images; run.json ``vessel_share``. None
    without a labelled FOV pixel."""
    return _least_and_largest([vessel_share(t, f) for t, f in zip(targets, fovs)
                               if np.any(np.asarray(f) > 0)])


def _least_and_largest(shares: list[float | None]) -> dict[str, float | int] | None:
    """run.json's record of a measure of the training images or their labels: ``{"min",
    "max", "images"}`` over those known (not None); None without any."""
    shares = [x for x in shares if x is not None]
    if not shares:
        return None
    return {"min": min(shares), "max": max(shares), "images": len(shares)}


def vessel_share_bounds(known: dict | None) -> tuple[float, float] | None:
    """The shares of the FOV outside which :func:`vessel_share_warning` warns, from run.json
    ``vessel_share`` (``known``); None for a run without the record (trained before it) or a
    hand-edited one without both bounds."""
    try:
        return VESSEL_SHARE_LOW * float(known["min"]), VESSEL_SHARE_HIGH * float(known["max"])
    except (KeyError, TypeError, ValueError):
        return None


def vessel_share_warning(mask: np.ndarray, fov: np.ndarray, known: dict | None,
                         source: str | os.PathLike = "the image") -> str | None:
    """A one-line warning when the vessel ``mask`` (H, W[, K]: the last channel is the vessel
    map) covers a share of ``fov`` far outside ``known`` (run.json ``vessel_share``; see
    :data:`VESSEL_SHARE_LOW`), else None."""
    bounds = vessel_share_bounds(known)
    if bounds is None or not np.any(np.asarray(fov) > 0):
        return None
    share = vessel_share(mask, fov)
    if bounds[0] <= share <= bounds[1]:
        return None
    what = ("most vessels are probably missed" if share < bounds[0] else
            "much of what it marks is probably not vessel")
    return (f"warning: {source}: {share:.1%} of its FOV segmented as vessel, against "
            f"{float(known['min']):.1%}-{float(known['max']):.1%} in the labels of the model's "
            f"training images: {what}. The "
            "photograph may be unlike any the model learned (another camera, a wrong FOV): "
            "look at the result over it (predict --visualize)")


# --- a gray photograph whose vessels are bright (an angiogram) -------------------------------

# Segmenter.segment warns when a gray photograph's thin structures are mostly brighter than
# their surround (bright_line_ratio over BRIGHT_LINE_RATIO) and those of the model's training
# images were not (run.json "bright_line_ratio"): fluorescein and ICG angiograms are gray and
# show the vessels bright, where every shipped model learned colour photographs, whose vessels
# are dark. vessel_general marks the dark gaps between bright vessels instead: on 28 of
# the gray negatives of the 40 DRIVE photographs inside the vessel share warning's bounds
# (bench/bright_lines.py, docs/training.md).
BRIGHT_LINE_RATIO = 1.15
# bright_line_ratio measures at this FOV diameter, with a top-hat this wide: vessels up to about
# 10 px wide there.
LINE_CHECK_FOV = 560
LINE_CHECK_KERNEL = 15


def bright_line_ratio(image: np.ndarray, fov: np.ndarray) -> float | None:
    """How much the thin structures of ``image`` ((H, W), (H, W, 1) or RGB (H, W, 3); uint8, or
    a preprocessed float image) stand out bright rather than dark inside ``fov``: the mean of
    the largest 5 % of the white top-hat of its luminance over that of the black top-hat (an
    ellipse of :data:`LINE_CHECK_KERNEL` px, the photograph resized so that its FOV is
    :data:`LINE_CHECK_FOV` px across, the FOV's rim left out). Under 1 where the vessels are
    dark, as in colour and red-free photographs, before the fundus preprocessing and after it;
    None for a FOV too small to measure."""
    image, fov = np.asarray(image), np.asarray(fov) > 0
    if image.ndim == 3 and image.shape[-1] == 3:  # in its own type: a photograph's uint8
        image = cv2.cvtColor(image if image.dtype == np.uint8 else image.astype(np.float32),
                             cv2.COLOR_RGB2GRAY)
    lum = (image[..., 0] if image.ndim == 3 else image).astype(np.float32)
    factor = LINE_CHECK_FOV / (fov_diameter(fov) or max(fov.shape))
    size = (max(int(round(fov.shape[1] * factor)), 1), max(int(round(fov.shape[0] * factor)), 1))
    lum = cv2.resize(lum, size, interpolation=cv2.INTER_AREA)
    fov = cv2.resize(fov.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (LINE_CHECK_KERNEL,) * 2)
    inside = cv2.erode(fov, kernel) > 0  # the black frame is no dark line
    count = np.count_nonzero(inside) // 20
    if count < 100:
        return None
    dark, bright = (np.partition(cv2.morphologyEx(lum, op, kernel)[inside], -count)[-count:]
                    for op in (cv2.MORPH_BLACKHAT, cv2.MORPH_TOPHAT))
    return float(bright.mean() / max(dark.mean(), 1e-6))


def training_bright_lines(images: Sequence[np.ndarray], fovs: Sequence[np.ndarray]
                          ) -> dict[str, float | int] | None:
    """The least and the largest :func:`bright_line_ratio` of the (preprocessed) training
    images; run.json ``bright_line_ratio``. None where no FOV is large enough to measure."""
    return _least_and_largest([bright_line_ratio(i, f) for i, f in zip(images, fovs)])


def bright_vessels_warning(image: np.ndarray, fov: np.ndarray, known: dict | None,
                           source: str | os.PathLike = "the image") -> str | None:
    """A one-line warning for a gray photograph whose thin structures are mostly bright
    (:func:`bright_line_ratio` over :data:`BRIGHT_LINE_RATIO`: an angiogram?) given to a model
    whose training images' were not (``known``: run.json ``bright_line_ratio``), else None.
    Colour photographs are not measured (angiograms are gray), nor for a run without the record
    (trained before it) or one trained on bright vessels (a model of angiograms)."""
    try:
        dark_trained = float(known["max"]) <= BRIGHT_LINE_RATIO
    except (KeyError, TypeError, ValueError):
        return None
    if not dark_trained or not is_gray(np.asarray(image)):
        return None
    ratio = bright_line_ratio(image, fov)
    if ratio is None or ratio <= BRIGHT_LINE_RATIO:
        return None
    return (f"warning: {source} is gray with bright thin structures (a fluorescein or ICG "
            "angiogram?): the model learned photographs whose vessels are dark, so this map "
            "is probably wrong; angiograms need a model trained on labelled ones "
            "(docs/data.md)")


# --- an artery/vein decision far from any the model learned ----------------------------------

# Segmenter.segment warns when an A/V model's ratio of artery to vein pixels is under
# ARTERY_RATIO_LOW times the least ratio of a training image's labels (run.json "artery_share")
# or over ARTERY_RATIO_HIGH times the largest. Labels give arteries 34-56 % of the A/V pixels
# (RITE, LES-AV, HRF-AV: arteries are the thinner); ripav_rite and ripav_general called 65-79 %
# of a CHASE_DB1 photograph's vessels arteries, the wide veins leaving the disc included, and
# 0-98 % of a STARE one's, in silence (bench/vessel_share.py, docs/training.md).
ARTERY_RATIO_LOW = 2 / 3
ARTERY_RATIO_HIGH = 1.5


def artery_share(av: np.ndarray, fov: np.ndarray) -> float | None:
    """The share of the pixels inside ``fov`` that ``av`` (H, W, 3: artery, vein, vessel; a
    label or :func:`retina_tf.postprocess.av_mask`'s decision) calls artery, of those it calls
    artery or vein but not both (a label's crossings); None where there are none."""
    inside = np.asarray(fov) > 0
    artery, vein = np.asarray(av)[..., 0] > 0.5, np.asarray(av)[..., 1] > 0.5
    arteries = np.count_nonzero(artery & ~vein & inside)
    counted = arteries + np.count_nonzero(vein & ~artery & inside)
    return float(arteries / counted) if counted else None


def label_artery_share(targets: Sequence[np.ndarray], fovs: Sequence[np.ndarray]
                       ) -> dict[str, float | int] | None:
    """The least and the largest :func:`artery_share` of a training image's A/V label, over
    the training images; run.json ``artery_share``. None for vessel targets (one channel) or
    labels without an artery or vein pixel."""
    return _least_and_largest([artery_share(t, f) for t, f in zip(targets, fovs)
                               if np.shape(t)[-1] == 3])


def _odds(share: float) -> float:
    return share / (1.0 - share) if share < 1.0 else float("inf")


def artery_share_bounds(known: dict | None) -> tuple[float, float] | None:
    """The artery shares outside which :func:`artery_share_warning` warns, from run.json
    ``artery_share`` (``known``): the ratios of artery to vein pixels :data:`ARTERY_RATIO_LOW`
    times the least and :data:`ARTERY_RATIO_HIGH` times the largest, as shares. None without
    both bounds."""
    try:
        low, high = (ARTERY_RATIO_LOW * _odds(float(known["min"])),
                     ARTERY_RATIO_HIGH * _odds(float(known["max"])))
    except (KeyError, TypeError, ValueError):
        return None
    return low / (1.0 + low), (high / (1.0 + high) if high != float("inf") else 1.0)


def artery_share_warning(mask: np.ndarray, fov: np.ndarray, known: dict | None,
                         source: str | os.PathLike = "the image") -> str | None:
    """A one-line warning when an A/V ``mask`` (H, W, 3) calls a share of its vessel pixels
    artery far outside ``known`` (run.json ``artery_share``; see :data:`ARTERY_RATIO_LOW`),
    else None."""
    bounds = artery_share_bounds(known)
    share = artery_share(mask, fov) if np.shape(mask)[-1:] == (3,) else None
    if bounds is None or share is None or bounds[0] <= share <= bounds[1]:
        return None
    return (f"warning: {source}: {share:.0%} of its vessel pixels called artery, against "
            f"{float(known['min']):.0%}-{float(known['max']):.0%} in the labels of the model's "
            "training images: many are probably called wrong. The photograph may be unlike any "
            "the model learned (another camera): look at the result over it (predict "
            "--visualize)")


# Whole-image passes over more pixels than this run in tiles: memory stays that of one tile
# (unet_drive's one pass adds about 0.9 GB per Mpixel; tiles are 1.5x slower, their overlap).
TILE_ABOVE_PIXELS = 2_000_000
# The fastest side on a 2-core CPU (384 to 1024 px measured); batching tiles was no faster.
TILE_SIZE = 768
# Context kept around each tile's centre: unet_drive's receptive field is within it (its tiled
# probabilities equal the whole-image ones, tests/test_highres.py).
TILE_MARGIN = 64


class Segmenter:
    """Runs a model on uint8 RGB fundus photographs, preprocessing included.

    Args:
        model: a Keras model returning logits (or a dict holding ``"logits"``).
        preprocessor: the fitted :class:`Preprocessor` the model was trained with.
        size_multiple: whole-image inputs are zero-padded to a multiple of this.
        inference: "whole", "sliding", or "auto" (whole when the model is fully convolutional).
        window, stride: sliding-window size and stride.
        batch_size: windows per forward pass. 8: on a 2-core CPU 1.3-1.7x faster than 64
            with identical probabilities (``bench/av_eval_time.py``), the activations of a small
            batch staying in cache; :attr:`batches_in_flight` batches are computed at once.
        scales: inference scales for multi-scale models (those with ``with_scales``, e.g.
            HMSA); None keeps the training scales.
        tta: test-time augmentation: average the predictions of the image and its horizontal,
            vertical and double flips (flips undone before averaging); about 4x the time.
        tta_transpose: with ``tta``, also average the four flips of the transposed image (all
            eight symmetries of the square; about 8x the time). Only for models trained with
            90-degree rotations (``--rot90``): a transposed fundus is otherwise unseen.
        av_vote: A/V models: one artery/vein decision per vessel segment between junctions
            (:func:`retina_tf.postprocess.vote_av_segments`), after TTA.
        av_link: with ``av_vote``, the strength of the links between segments across
            junctions (0: every segment decides alone).
        inference_scale: the size :meth:`segment` and :meth:`probability_at_inference_scale`
            segment a photograph at: "auto", "training", "native" or a factor of the training
            FOV diameter (:func:`inference_factor`).
        tile_size: whole-image inference runs in overlapping tiles of this side
            (:func:`tiled_predict`); 0: tiles of :data:`TILE_SIZE` above
            :data:`TILE_ABOVE_PIXELS` pixels, the whole image at once below.
        precision: "float32", "bfloat16" to compute in bfloat16 with the float32 weights
            (:func:`computing_in`, the batch norms folded into the convolutions:
            :func:`fold_batch_norms`; ``model`` itself is not changed), or "auto"
            (:func:`resolve_precision`: bfloat16 on CPUs with AVX512-BF16 or AMX for models
            measured faster so). :attr:`precision` is the one chosen, :attr:`network` the
            network the forward pass runs.
        threshold: the mask threshold :meth:`segment` uses (:attr:`threshold`); None: the
            run's stored one.

    One Segmenter may serve several threads: a call only reads the weights, and TensorFlow's
    traced functions take concurrent calls (results as one call after another). On a CPU it
    gains little, TensorFlow already using every core for one image.

    Example:
        >>> from retina_tf.data.synthetic import generate_fundus
        >>> image = generate_fundus(0, size=(128, 128)).image      # any uint8 RGB photograph
        >>> seg = Segmenter.from_run("unet_drive")
        >>> prob = seg.probability(image)       # (H, W, K) float32 in [0, 1]
        >>> prob.shape, prob.dtype
        ((128, 128, 1), dtype('float32'))
    """

    def __init__(self, model: keras.Model, preprocessor: Preprocessor, size_multiple: int = 16,
                 inference: str = "auto", window: int = 48, stride: int = 16,
                 batch_size: int = 8, fully_convolutional: bool = True,
                 run_info: dict | None = None, tta: bool = False,
                 scales: Sequence[float] | None = None, av_vote: bool = False,
                 av_link: float = 1.0, tta_transpose: bool = False,
                 inference_scale: str | float = "auto", tile_size: int = 0,
                 precision: str = "float32", threshold: float | None = None):
        if inference not in CHOICES["inference"]:
            raise ConfigError(f"inference={inference!r}: give auto, whole or sliding")
        if inference == "auto":
            inference = "whole" if fully_convolutional else "sliding"
        contract = isinstance(model, SegmentationModel)  # a plain Keras model gets the defaults
        if scales:
            if not contract:
                raise ConfigError(f"{type(model).__name__} has no inference scales: drop "
                                  "scales (--eval_scales)")
            model = model.with_scales([float(s) for s in scales])
        self.precision = resolve_precision(precision, model)
        self._source, self._model = model, None
        # what the forward pass runs: in bfloat16 the batch normalizations folded into the
        # convolutions (fold_batch_norms; 2.5x faster for unet_drive on a CPU with AMX), a
        # copy of its own, so the bfloat16 copy of the whole model is made only if asked for
        folded = model
        if self.precision == "bfloat16":
            _say_if_emulated()
            folded = fold_batch_norms(model)
        self.network = _in_bfloat16(folded) if folded is not model else self.model
        self.preprocessor = preprocessor
        # the model knows its own constraint best (it changes with the inference scales)
        self.size_multiple = int(model.size_multiple if contract else size_multiple)
        self.inference = inference
        self.window = _whole_number("window", window)
        if inference == "sliding" and self.window % self.size_multiple:
            fit = max(self.size_multiple, self.window // self.size_multiple * self.size_multiple)
            raise ConfigError(f"--window={self.window}: {type(model).__name__} takes windows of "
                              f"a multiple of {self.size_multiple} px; give e.g. --window={fit}")
        self.stride = _whole_number("stride", stride)
        self.batch_size = _whole_number("batch_size", batch_size)
        if self.stride < 1 or self.batch_size < 1 or self.window < 1:
            raise ConfigError(f"stride={stride}, batch_size={batch_size}, window={window}: each "
                              "must be at least 1")
        if inference == "sliding" and self.stride > self.window:
            raise ConfigError(f"--stride={self.stride} is over --window={self.window}: the "
                              "windows would leave pixels between them; give a stride up to "
                              "the window (the default 16 overlaps them)")
        self.batches_in_flight = BATCHES_IN_FLIGHT
        self.run_info = run_info or {}
        self.tta = _switch("tta", tta)
        self.tta_transpose = _switch("tta_transpose", tta_transpose)
        self.av_vote = _switch("av_vote", av_vote)
        classes = self.run_info.get("num_classes") or getattr(model, "num_classes", None)
        if self.av_vote and classes not in (None, 3):
            raise ConfigError(f"--av_vote is for artery/vein models; this one segments "
                              f"{classes} class(es): leave --av_vote out")
        if isinstance(av_link, bool) or not isinstance(av_link, (int, float, np.number)) \
                or not 0 <= av_link < math.inf:
            raise ConfigError(f"av_link={av_link!r}: give a number >= 0 (0: segments decided "
                              "alone)")
        self.av_link = float(av_link)
        if self.tta_transpose and not self.tta:  # a warning: the API logs no info by default
            log.warning("warning: tta_transpose (--tta_transpose) adds views to tta's: without "
                        "tta it does nothing")
        if self.av_link != 1.0 and not self.av_vote:
            log.warning("warning: av_link (--av_link) links av_vote's segments: without av_vote "
                        "it does nothing")
        self._threshold = None if threshold is None else check_threshold(threshold)
        self.inference_scale = parse_inference_scale(inference_scale)
        tile_size = _whole_number("tile_size", tile_size)
        if tile_size < 0 or 0 < tile_size <= 2 * TILE_MARGIN:
            raise ConfigError(f"--tile_size={tile_size}: give 0 (automatic) or a side over "
                              f"{2 * TILE_MARGIN} px (two margins of context)")
        self.tile_size = tile_size
        self._forward = _traced(
            lambda x: logits_to_probability(model_logits(self.network(x, training=False))))
        self._context_features = _traced(
            lambda x: self.model.context_features(self.model.context_of(x), training=False))

    @property
    def model(self) -> keras.Model:
        """The model computing in :attr:`precision` (:func:`computing_in`: in bfloat16 a copy,
        made on first use)."""
        if self._model is None:
            with tf.init_scope():  # eagerly, also when first asked for inside a traced function
                self._model = (self._source if self.precision == "float32"
                               else _bfloat16_copy(self._source))  # emulation said in __init__
        return self._model

    @classmethod
    def from_run(cls, model: str | os.PathLike, logdir: str | None = None,
                 run_name: str | None = None, **overrides) -> Segmenter:
        """Loads ``model.keras``, ``preprocessor.json`` and ``run.json`` from a run folder.
        ``overrides`` are :class:`Segmenter`'s keywords; ``tta``, ``tta_transpose`` and
        ``av_vote`` default to the run's own choice (``run.json``, :data:`RUN_CHOICES`; flips:
        :func:`retina_tf.evaluation.choose_tta`; the shipped A/V models: all three), else off.
        Without TTA the run's ``tta_transpose`` is dropped with it.

        Raises:
            ModelFileError: when the run folder is not found, lacks one of those files, one
                of them is corrupt (the message names it), or it is a pre-training run.
            RunBusyError: a training writes the run.
        """
        run_dir = find_run(model, logdir, run_name)
        with reading_run(run_dir):  # not while a training writes it
            missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
            if missing:
                raise ModelFileError(f"the run folder {run_dir} lacks {', '.join(missing)}; it is "
                                     "incomplete: export or train it again")
            info = read_run_json(run_dir)
            if info.get("task") == "pretrain":  # an encoder's training, not a segmentation model
                raise ModelFileError(f"{run_dir} is a pre-training run ({info.get('model')}): it "
                                     "does not segment; fine-tune it first with bin/train.py "
                                     f"--pretrained={run_dir}")
            net = load_keras_model(run_dir / "model.keras")
            try:
                pre = Preprocessor.load(run_dir / "preprocessor.json")
            except (ValueError, TypeError) as err:
                text = str(err) if "preprocessor.json" in str(err) else \
                    f"{run_dir / 'preprocessor.json'}: {err}"
                raise ModelFileError(f"{text}; the run folder is damaged: export or train it "
                                     "again") from err
        kwargs = dict(size_multiple=info.get("size_multiple", 16),
                      window=info.get("patch_size", 48),
                      fully_convolutional=info.get("fully_convolutional", True), run_info=info)
        for key in RUN_CHOICES:  # its held-out images' choice
            kwargs[key] = info.get(key, False)
            if not isinstance(kwargs[key], bool):
                raise ModelFileError(f"{run_dir / 'run.json'}: \"{key}\": {kwargs[key]!r} is "
                                     "neither true nor false; fix or remove it")
        # None keeps the run's value (or the default); anything else, 0 and False included, is
        # set, but a window of 0 means the training patch size (as --window=0)
        kwargs.update({k: v for k, v in overrides.items()
                       if v is not None and not (k == "window" and v == 0)})
        if not kwargs["tta"] and overrides.get("tta_transpose") is None:
            kwargs["tta_transpose"] = False  # the run's transposes go with its TTA
        seg = cls(net, pre, **kwargs)
        seg.run_dir = run_dir
        # set away from the defaults and from the run's own flags.txt (which compare and the
        # run's flagfile pass on) for a model that never slides a window: said, not ignored
        own = run_inference(run_dir)
        unused = [f"{k}={v}" for k, v, default in (("window", overrides.get("window"), 0),
                                                   ("stride", overrides.get("stride"), 16))
                  if v is not None and v != default and v != getattr(own, k)]
        if seg.inference == "whole" and unused:  # from_run sets the window: said only here
            log.warning(f"warning: {', '.join(unused)} (--window, --stride) set the sliding "
                        f"windows; {run_dir.name} segments whole images, so they are unused "
                        "(inference='sliding', --inference=sliding, uses them)")
        return seg

    @classmethod
    def from_pretrained(cls, name: str, **overrides) -> Segmenter:
        """A model shipped with the package (:func:`shipped_models`, e.g. ``"unet_drive"``);
        ``overrides`` as in :meth:`from_run`.

        Raises:
            ModelFileError: when no shipped model has that name.
        """
        if name not in shipped_models():
            raise ModelFileError(f"no shipped model named {name!r}; shipped: "
                                 f"{', '.join(shipped_models()) or 'none'}")
        return cls.from_run(PRETRAINED_DIR / name, **overrides)

    @property
    def threshold(self) -> float:
        """The mask threshold: the one given to the constructor, else the run's
        (:func:`stored_threshold`: ``run.json``, else 0.5); :meth:`segment` uses it unless
        given another."""
        return self._threshold_and_source()[0]

    @property
    def threshold_source(self) -> str:
        """Where :attr:`threshold` comes from, in words (for the commands' reports)."""
        return self._threshold_and_source()[1]

    def _threshold_and_source(self) -> tuple[float, str]:
        if self._threshold is not None:
            return self._threshold, "given: threshold="
        return stored_threshold(self.run_info, getattr(self, "run_dir", None))

    @property
    def task(self) -> str:
        return self.run_info.get("task", "vessel")

    @property
    def tta_name(self) -> str:
        """What TTA averages over, for reports ("" without TTA)."""
        if not self.tta:
            return ""
        return "flip and transpose TTA" if self.tta_transpose else "flip TTA"

    def probability_preprocessed(self, x: np.ndarray, threshold: float | None = None
                                 ) -> np.ndarray:
        """(H, W, C) preprocessed float image -> (H, W, K) probabilities; ``threshold``: the
        vessel map :func:`vote_av_segments` cuts into segments (None: :attr:`threshold`)."""
        if not self.tta:
            prob = self._probability(x)
        else:
            prob = np.mean([self._view_probability(x, f, t)
                            for f, t in tta_views(self.tta_transpose)], axis=0)
        if self.av_vote:
            if prob.shape[-1] != 3:
                raise ValueError(f"av_vote needs an artery/vein/vessel model, this one gives "
                                 f"{prob.shape[-1]} channel(s)")
            prob = vote_av_segments(prob, link=self.av_link,
                                    threshold=self.threshold if threshold is None else threshold)
        return prob

    def _view_probability(self, x: np.ndarray, flip: tuple, transpose: bool) -> np.ndarray:
        """Probabilities of a flipped (and transposed) view, mapped back to ``x``'s frame."""
        if transpose:
            x = x.transpose(1, 0, 2)
        prob = np.flip(self._probability(np.flip(x, flip)), flip)
        return prob.transpose(1, 0, 2) if transpose else prob

    def _probability(self, x: np.ndarray) -> np.ndarray:
        h, w = x.shape[:2]
        forward, features = self._forward, None
        if isinstance(self._source, SegmentationModel) and self._source.context_fusion:
            # RIP-AV: every window (or the padded image) sees the whole image as its context,
            # encoded once here rather than once per window
            features = self._context_features(tf.constant(x[None]))

            def forward(batch):
                return self._forward_in_context(batch, features)
        if self.inference == "whole":
            tile = self.tile_size or (TILE_SIZE if h * w > TILE_ABOVE_PIXELS else 0)
            if tile:
                return tiled_predict(forward, x, self.size_multiple, tile, TILE_MARGIN)
            padded = pad_to_multiple(x, self.size_multiple)
            return forward(tf.constant(padded[None]))[0, :h, :w].numpy()
        if features is not None:  # one graph for every image: the features are an argument
            return sliding_window_predict(self._forward_in_context, x, self.window, self.stride,
                                          self.batch_size, features, self.batches_in_flight)
        return sliding_window_predict(forward, x, self.window, self.stride, self.batch_size,
                                      in_flight=self.batches_in_flight)

    def _forward_in_context(self, batch, features):
        """The forward pass of a batch whose windows share one encoded context (1, h, w, C)."""
        return self._forward({"image": batch, "context_features": features})

    def probability(self, image: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> (H, W, K) float32 probabilities (``threshold``: the A/V
        vote's, see :meth:`probability_preprocessed`).

        Raises:
            DatasetError: for an image that is not uint8 RGB (the message says how to convert
                it).
        """
        return self.probability_preprocessed(self.preprocessor(_uint8_rgb(image)), threshold)

    @property
    def min_image_size(self) -> int:
        """The shortest image side this model can meaningfully segment, in pixels.

        One training patch (run.json ``patch_size``), and at least one size multiple: the model
        never learned from less context than a patch. A whole fundus photograph that small is
        also beyond rescuing by the FOV rescale in :meth:`segment`: DRIVE's 540 px FOV in 96 px
        is a 5.6x enlargement that leaves the thin vessels under a pixel wide in the source.
        """
        return max(int(self.run_info.get("patch_size") or 0), self.size_multiple, 1)

    def check_image_size(self, image: np.ndarray, source: str | os.PathLike = "the image",
                         warn: bool = True) -> None:
        """Raises DatasetError naming ``source`` when ``image`` is not a uint8 RGB (H, W, 3)
        array (the message says how to convert it), is below :attr:`min_image_size` (a 32x32
        image would otherwise come back as 0 % vessel, in silence) or is one flat colour; with
        ``warn``, warns of
        channels in BGR order (:func:`~retina_tf.data.io.channel_order_warning`) and when an
        A/V model is given a gray photograph (off where :meth:`segment` follows)."""
        image = _uint8_rgb(image, source)
        h, w = image.shape[:2]
        if min(h, w) < self.min_image_size:
            raise DatasetError(f"{source} is {w}x{h} pixels, too small to segment: this model "
                               f"needs at least {self.min_image_size}x{self.min_image_size} "
                               "(its training patch size)")
        low, high = image.min(axis=(0, 1)), image.max(axis=(0, 1))
        if (high.astype(int) - low <= 2).all():  # would come back as about 76 % vessel
            raise DatasetError(f"{source} is one flat colour (RGB {', '.join(map(str, high))}): "
                               "there is nothing to segment; check the file (a failed capture "
                               "or export?)")
        if not warn:
            return
        swapped = channel_order_warning(image, source)
        if swapped:
            log.warning(swapped)
        if self.task == "av" and is_gray(image):
            log.warning(f"warning: {source} is a gray photograph: telling arteries from veins "
                        "needs colour, so its artery/vein maps are unreliable (its vessel map is "
                        "not)")

    def segment(self, image: np.ndarray | str | os.PathLike,
                fov: np.ndarray | str | os.PathLike | None = None,
                threshold: float | None = None,
                match_scale: bool = True, source: str | os.PathLike = "the image",
                plan: ScalePlan | None = None, fov_file: str | os.PathLike | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Probability (H, W, K) and binary mask (H, W, K), zeroed outside the FOV. An A/V
        model's mask is its decision (:func:`retina_tf.postprocess.av_mask`): vessel at the
        threshold, each vessel pixel artery or vein, as ``_av.png`` draws it. A mask far from
        the vessel share of the training labels is warned of (:func:`vessel_share_warning`),
        and so is an A/V mask far from their share of arteries (:func:`artery_share_warning`)
        and a gray photograph with bright vessels (:func:`bright_vessels_warning`); so are an
        estimated FOV that looks wrong (:func:`~retina_tf.data.fov.estimate_warnings`) and a
        photograph enlarged less than its FOV needs (:meth:`ScalePlan.warning`), as ``predict``
        warns of them, unless the caller gives ``fov`` or ``plan``.

        With ``match_scale``, the photograph is segmented at its inference scale
        (:meth:`probability_at_inference_scale`), else as it is.

        Args:
            image: uint8 RGB (H, W, 3) (a PIL image or a tensor too), or an image file, read
                as ``predict`` reads it (:func:`~retina_tf.data.io.read_image`; one frame of a
                file of several: ``read_image(path, picture)``).
            fov: the FOV mask (bool, 0/1 or 0/255), or its file; None: estimated.
            threshold: the mask's probability threshold; None: the run's (:attr:`threshold`).
            source: where the image came from (a file name), for messages; an image file
                names itself.
            plan: :meth:`scale_plan` of ``image`` and ``fov``, where the caller has it already.
            fov_file: the file a ``fov`` array was read from, for messages (a ``fov`` given
                as a file names itself).

        Raises:
            ConfigError: for a threshold outside (0, 1).
            DatasetError: for an image that is not uint8 RGB or is smaller than
                :attr:`min_image_size`, or a ``fov`` of another height and width.
        """
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        if isinstance(image, (str, os.PathLike)):
            source = image if source == "the image" else source
            image = read_image(image)
        mask_file = fov if isinstance(fov, (str, os.PathLike)) else fov_file
        if isinstance(fov, (str, os.PathLike)):
            fov = read_fov_mask(fov)
        image = np.asarray(image)  # a PIL image or a tensor as an array
        self.check_image_size(image, source)
        # what predict warns of, warned of here where segment computes it: the FOV's estimate
        # and the resize (a caller's fov and plan were warned of by the caller)
        warnings = []
        if fov is None:
            fov = estimate_fov(image)
            warnings += estimate_warnings(image, fov, str(source))
        else:
            fov = _fov_of(fov, image, source, mask_file)
        if match_scale and plan is None:
            plan = self.scale_plan(image, fov)
            warnings.append(plan.warning(source))
        prob = self.probability_at_inference_scale(image, fov, plan, threshold, source) \
            if match_scale else self.probability(image, threshold)
        prob = prob * fov[..., None]
        mask = av_mask(prob, threshold) if prob.shape[-1] == 3 else prob >= threshold
        for warning in (*warnings,
                        bright_vessels_warning(image, fov, self.run_info.get("bright_line_ratio"),
                                               source),
                        vessel_share_warning(mask, fov, self.run_info.get("vessel_share"),
                                             source),
                        artery_share_warning(mask, fov, self.run_info.get("artery_share"),
                                             source)):
            if warning:
                log.warning(warning)
        return prob, mask

    @property
    def auto_min_scale(self) -> float:
        """The most ``--inference_scale=auto`` shrinks a photograph (run.json
        ``auto_min_scale``, else :data:`AUTO_MIN_SCALE`)."""
        return float(self.run_info.get("auto_min_scale") or AUTO_MIN_SCALE)

    def describe_inference(self) -> str:
        """How each photograph is run through the model, in words: whole or sliding windows
        (their size and stride), test-time augmentation, inference scales."""
        words = f"{self.inference} inference"
        if self.inference == "sliding":
            words += f" ({self.window} px windows, stride {self.stride})"
        if self.tta:
            words += f" with {self.tta_name}"
        scales = getattr(self._source, "scales", None)
        if scales and list(scales) != [1.0]:
            words += f" at scales {', '.join(f'{s:g}' for s in scales)}"
        return words

    def inference_record(self) -> dict[str, Any]:
        """What :meth:`describe_inference` says, for a report's JSON: ``window`` and
        ``stride`` of sliding-window inference, the multi-scale model's ``scales`` (None where
        they do not apply)."""
        sliding = self.inference == "sliding"
        scales = getattr(self._source, "scales", None)
        return {"window": self.window if sliding else None,
                "stride": self.stride if sliding else None,
                "scales": [float(s) for s in scales] if scales else None}

    @property
    def _inference_scale_name(self) -> str:
        """E.g. "inference scale auto", "inference scale 0.05"."""
        setting = self.inference_scale
        return f"inference scale {setting:g}" if isinstance(setting, float) else \
            f"inference scale {setting}"

    def describe_inference_scale(self) -> str:
        """The rule of :attr:`inference_scale` in words, for reports."""
        trained = self.run_info.get("fov_diameter")
        setting = self.inference_scale
        name = self._inference_scale_name
        if setting == "native" or not trained:
            why = "" if setting == "native" else " (the run records no training FOV diameter)"
            return f"{name}: every photograph is segmented as it is{why}"
        trained = float(trained)
        if isinstance(setting, float):
            aim, whose = trained * setting, f"{setting:g} x the training FOV of {trained:.0f} px"
        else:
            aim, whose = trained, "the training FOV"
        floor = (f", shrinking by x{self.auto_min_scale:.2f} and enlarging by "
                 f"x{AUTO_MAX_SCALE:g} at most" if setting == "auto" else "")
        return (f"{name}: a photograph is resized to bring its FOV to {aim:.0f} px wide "
                f"({whose}){floor}; one within {SCALE_TOLERANCE:.0%} of that is segmented "
                "as it is")

    def scale_plan(self, image: np.ndarray, fov: np.ndarray) -> ScalePlan:
        """The size ``image`` (whose FOV mask is ``fov``) is segmented at."""
        h, w = image.shape[:2]
        trained = self.run_info.get("fov_diameter")
        diameter = fov_diameter(fov)
        factor = inference_factor(self.inference_scale, diameter, trained, self.auto_min_scale)
        box = fov_box(fov, diameter) if factor > 1.0 else None
        top, bottom, left, right = box or (0, h, 0, w)
        size = (w, h) if factor == 1.0 else (max(int(round((right - left) * factor)), 1),
                                             max(int(round((bottom - top) * factor)), 1))
        wanted = (inference_factor("training", diameter, trained)
                  if self.inference_scale == "auto" else None)
        return ScalePlan(w, h, diameter, float(trained) if trained else None, factor, size,
                         wanted if wanted and wanted > factor else None, box)

    def probability_at_inference_scale(self, image: np.ndarray, fov: np.ndarray,
                                       plan: ScalePlan | None = None,
                                       threshold: float | None = None,
                                       source: str | os.PathLike = "the image") -> np.ndarray:
        """:meth:`probability` at the size of :meth:`scale_plan` (``plan`` when given): the
        photograph resized there (OpenCV area), segmented, and the probabilities resized back
        (bilinear). Vessel widths in pixels are what a model learned, so a photograph of
        another scale is brought near the training FOV diameter; ``predict``, ``evaluate`` and
        ``compare`` all segment this way (``threshold``: the A/V vote's).

        Raises:
            DatasetError: naming ``source``, where the photograph would be shrunk below
                :attr:`min_image_size` (a small fixed ``inference_scale``).
        """
        plan = plan or self.scale_plan(image, fov)
        if not plan.rescaled:
            return self.probability(image, threshold)
        if min(plan.size) < self.min_image_size:  # 29x19 px came back as 28 % vessel
            raise DatasetError(f"{source} would be segmented at {plan.size[0]}x{plan.size[1]} "
                               f"pixels ({self._inference_scale_name}), under "
                               f"the {self.min_image_size} px this model needs: give a larger "
                               "--inference_scale")
        h, w = image.shape[:2]
        top, bottom, left, right = plan.box or (0, h, 0, w)
        prob = cv2.resize(self.probability(plan.resized(image), threshold),
                          (right - left, bottom - top),
                          interpolation=cv2.INTER_LINEAR).reshape(bottom - top, right - left, -1)
        if plan.box is None:
            return prob
        whole = np.zeros((h, w, prob.shape[-1]), prob.dtype)
        whole[top:bottom, left:right] = prob
        return whole


# A photograph enlarged to its aim is cut to its FOV's box first where that box is at most this
# share of it (a phone adapter's small disc in a large frame: a 210 px disc in a 1000 px frame
# took 60 s whole, 1 s cut) ...
BOX_AT_MOST = 0.5
# ... keeping this share of the FOV diameter (at least BOX_MARGIN_PIXELS) of frame around it:
# the preprocessing's contrast stretch takes its minimum from the dark frame, as in training.
BOX_MARGIN = 0.05
BOX_MARGIN_PIXELS = 8


def fov_box(fov: np.ndarray, diameter: float) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the FOV's bounding box with a margin of frame
    (:data:`BOX_MARGIN` of ``diameter``), where it covers at most :data:`BOX_AT_MOST` of the
    image, else None. ``retina_tf.export`` computes the same in TensorFlow."""
    fov = np.asarray(fov, bool)
    rows, cols = np.flatnonzero(fov.any(axis=1)), np.flatnonzero(fov.any(axis=0))
    if not rows.size:
        return None
    h, w = fov.shape
    margin = max(int(round(BOX_MARGIN * diameter)), BOX_MARGIN_PIXELS)
    top, bottom = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, h)
    left, right = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, w)
    if (bottom - top) * (right - left) > BOX_AT_MOST * h * w:
        return None
    return top, bottom, left, right


def fov_diameter(fov: np.ndarray) -> float:
    """The diameter of the FOV disc in pixels: its horizontal extent (cameras cut the disc at
    top and bottom), or its vertical extent where the disc is cut at its left or right (a
    photograph turned on its side). A disc cut both ways (off centre, also cut at a side) gets
    the diameter of the circle through the edge it shows (:func:`arc_diameter`); 0, unknown,
    where too little of its edge shows (a crop inside the FOV: the photograph is segmented as
    it is) or the mask is empty. A disc touches its leftmost and rightmost columns over a few
    pixels (at most a fifth of its height in every dataset here), a cut over more than half."""
    fov = np.asarray(fov, bool)
    for mask in (fov, fov.T):
        cols = np.flatnonzero(mask.any(axis=0))
        if not cols.size:
            return 0.0
        rows = np.flatnonzero(mask.any(axis=1))
        if max(mask[:, cols[0]].sum(), mask[:, cols[-1]].sum()) <= (rows[-1] - rows[0] + 1) / 2:
            return float(cols[-1] - cols[0] + 1)
    return arc_diameter(fov)


# A circle through a FOV's edge is taken when its points lie within this share of the radius
# of it (RMS, plus ARC_FIT_PIXELS for the pixel steps; HRF's cut discs: 0.5 %) ...
ARC_FIT_TOLERANCE = 0.02
ARC_FIT_PIXELS = 2.0
# ... and span at least this share of its diameter (a straight cut fits a huge circle).
ARC_MIN_SPAN = 1 / 3
# Fewer edge points than this measure nothing ...
ARC_MIN_POINTS = 16
# ... and points whose spread has a determinant below this share of its squared trace lie on a
# line (no circle: the normal equations are singular).
ARC_LINE_TOLERANCE = 1e-9


def _row_ends(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of each row's first and last FOV pixel, leaving out those on the disc's leftmost
    or rightmost column: the image's border or a straight cut, not the circle."""
    rows = np.flatnonzero(mask.any(axis=1))
    sub = mask[rows]
    first = sub.argmax(axis=1)
    last = mask.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)
    keep_first, keep_last = first > first.min(), last < last.max()
    return (np.concatenate([first[keep_first], last[keep_last]]),
            np.concatenate([rows[keep_first], rows[keep_last]]))


def arc_diameter(fov: np.ndarray) -> float:
    """The diameter of the circle through the edge of the FOV that lies inside the image
    (each row's and column's ends), fitted by least squares (I. Kasa, "A circle fitting
    procedure and its error analysis", IEEE Trans. Instrum. Meas. 1976); 0 where fewer than
    :data:`ARC_MIN_POINTS` edge points show, they do not lie on a circle, or they span too
    little of it. ``retina_tf.export`` computes the same in TensorFlow."""
    fov = np.asarray(fov, bool)
    if not fov.any():
        return 0.0
    x1, y1 = _row_ends(fov)
    y2, x2 = _row_ends(fov.T)
    x = np.concatenate([x1, x2]).astype(np.float64)
    y = np.concatenate([y1, y2]).astype(np.float64)
    if x.size < ARC_MIN_POINTS:
        return 0.0
    u, v = x - x.mean(), y - y.mean()  # centred: the normal equations stay well conditioned
    a = np.stack([u, v, np.ones_like(u)], axis=1)
    m = a.T @ a
    if m[0, 0] * m[1, 1] - m[0, 1] ** 2 <= ARC_LINE_TOLERANCE * (m[0, 0] + m[1, 1]) ** 2:
        return 0.0  # the points lie on a line
    d, e, f = np.linalg.solve(m, a.T @ -(u * u + v * v))
    r2 = (d * d + e * e) / 4 - f
    if r2 <= 0:
        return 0.0
    r = np.sqrt(r2)
    rms = np.sqrt(np.mean((np.hypot(u + d / 2, v + e / 2) - r) ** 2))
    span = max(np.ptp(x), np.ptp(y))
    if rms > ARC_FIT_TOLERANCE * r + ARC_FIT_PIXELS or span < ARC_MIN_SPAN * 2 * r:
        return 0.0
    return float(2 * r + 1)  # as the extent counts pixels: a disc of radius r is 2r + 1 wide


def sliding_window_predict(forward, x: np.ndarray, window: int, stride: int,
                           batch_size: int = 8, shared: tf.Tensor | None = None,
                           in_flight: int | None = None) -> np.ndarray:
    """Averages ``forward`` over overlapping ``window`` x ``window`` crops of ``x`` (H, W, C).

    ``forward`` (a function of a batch of windows, traceable in a ``tf.function``) sees batches
    of exactly ``batch_size`` windows, all of them in one graph (:func:`over_batches`); with
    ``shared``, a tensor every window shares (RIP-AV's encoded context),
    ``forward(batch, shared)``; ``in_flight`` batches at once (default
    :data:`BATCHES_IN_FLIGHT`)."""
    patches, positions = extract_patches(x, window, stride)
    count = len(patches)
    spare = -count % batch_size  # the last batch is filled up with blank windows
    if spare:
        patches = np.concatenate([patches, np.zeros((spare,) + patches.shape[1:], patches.dtype)])
    batches = patches.reshape((-1, batch_size) + patches.shape[1:])
    extra = () if shared is None else (shared,)
    outs = over_batches(forward, in_flight)(tf.constant(batches), *extra).numpy()
    return recompose_patches(outs.reshape((-1,) + outs.shape[2:])[:count], positions,
                             x.shape[:2])


def over_batches(forward, in_flight: int | None = None
                 ) -> tf.types.experimental.GenericFunction:
    """A ``tf.function`` of a stack of batches ``(N, B, ...)`` (and any further arguments of
    ``forward``, the same for every batch) mapping ``forward`` over the batches,
    ``in_flight`` of them (default :data:`BATCHES_IN_FLIGHT`) computed at once. Made once per
    ``forward`` (a function, a ``tf.function`` or a bound method), so that it is traced once."""
    in_flight = int(in_flight or BATCHES_IN_FLIGHT)
    owner = getattr(forward, "__self__", forward)
    key = (getattr(forward, "__name__", ""), in_flight)
    cache = owner.__dict__.setdefault("_over_batches", {})
    if key not in cache:
        cache[key] = _traced(lambda batches, *extra: tf.map_fn(
            lambda batch: forward(batch, *extra), batches, parallel_iterations=in_flight,
            fn_output_signature=tf.float32))
    return cache[key]


def _traced(function) -> tf.types.experimental.GenericFunction:
    """``tf.function(function, reduce_retracing=True)``, counted as its own function.
    TensorFlow counts traces per Python code: the same lambda made for every Segmenter made
    the sixth Segmenter of a process warn of "excessive retracing" in a loop, though each traced
    once; a partial is its own key."""
    return tf.function(functools.partial(function), reduce_retracing=True)


def tile_spans(length: int, tile: int, margin: int, multiple: int = 1
               ) -> list[tuple[int, int, int]]:
    """``(start, keep_from, keep_to)`` of the tiles covering ``[0, length)`` along one axis.

    Tiles are ``tile`` long (the whole axis when shorter) and start on multiples of
    ``multiple`` (the pooling grid of the whole image), the last one flush with the end. Each
    keeps its pixels up to the middle of its overlap with a neighbour: at least ``margin`` from
    any tile edge inside the image, so a tile sees the context the whole image would give.
    """
    if length <= tile:
        return [(0, 0, length)]
    step = (tile - 2 * margin) // multiple * multiple
    if step < multiple:
        raise ValueError(f"a tile of {tile} px leaves nothing inside two margins of {margin} px")
    starts = list(range(0, length - tile, step)) + [length - tile]
    bounds = [0] + [(a + tile + b) // 2 for a, b in zip(starts, starts[1:])] + [length]
    return [(s, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def tiled_predict(forward, x: np.ndarray, multiple: int, tile: int, margin: int,
                  batch_size: int = 1) -> np.ndarray:
    """Whole-image inference of a fully convolutional ``forward`` in overlapping tiles.

    ``x`` (H, W, C) is zero-padded to ``multiple`` as for one whole-image pass; tiles of
    ``tile`` px (rounded up to ``multiple``) start on that pooling grid and each keeps its
    centre (:func:`tile_spans`). Memory is bounded by ``batch_size`` tiles; the result equals
    the whole-image pass where one tile covers the image, and differs by what lies beyond
    ``margin`` px of context elsewhere (the overlap-tile strategy of Ronneberger et al. 2015,
    "U-Net", sec. 2).
    """
    h, w = x.shape[:2]
    tile = -(-int(tile) // multiple) * multiple
    padded = pad_to_multiple(x, multiple)
    rows = tile_spans(padded.shape[0], tile, margin, multiple)
    cols = tile_spans(padded.shape[1], tile, margin, multiple)
    th, tw = min(tile, padded.shape[0]), min(tile, padded.shape[1])
    jobs = [(r, c) for r in rows for c in cols]
    out = None
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        batch = np.stack([padded[r:r + th, c:c + tw] for (r, _, _), (c, _, _) in chunk])
        probs = forward(tf.constant(batch)).numpy()
        if out is None:
            out = np.empty((padded.shape[0], padded.shape[1], probs.shape[-1]), np.float32)
        for ((r, r0, r1), (c, c0, c1)), prob in zip(chunk, probs):
            out[r0:r1, c0:c1] = prob[r0 - r:r1 - r, c0 - c:c1 - c]
    return out[:h, :w]


def atomic_save_model(model: keras.Model, path: Path) -> None:
    """``model.save`` written durably: staged in memory, then temporary name, fsync, rename."""
    save_model_file(model, Path(path))


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
               model: keras.Model | None = None) -> Path:
    """Copies what inference needs from a run folder, without optimizer state (3x smaller):
    ``model.keras``, ``preprocessor.json``, ``run.json``, ``flags.txt``, ``metrics.json``.
    ``model``: the run's network when already loaded (else ``model.keras`` is read)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if model is None:
        model = load_keras_model(run_dir / "model.keras")
    bare = model.__class__.from_config(model.get_config())
    bare.set_weights(model.get_weights())
    atomic_save_model(bare, out_dir / "model.keras")
    for name in ("preprocessor.json", "run.json", "flags.txt", "metrics.json"):
        if (run_dir / name).is_file():
            atomic_write_bytes(out_dir / name, (run_dir / name).read_bytes())
    return out_dir
