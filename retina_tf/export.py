"""Models that leave retina_tf: a trained run exported for serving without it.

Four formats (``bin/export_model.py --format=...``):

* ``keras``: the run folder's inference files, without optimizer state
  (:func:`retina_tf.inference.export_run`; the shipped models are made this way). Needs
  retina_tf to load.
* ``saved_model``: a TensorFlow SavedModel (``tf.saved_model.save`` of a ``tf.Module``) whose
  ``serving_default`` signature takes a raw photograph, ``image: uint8 [H, W, 3]`` of any size,
  and returns ``probability`` and ``mask`` at the photograph's size. The run's whole default
  inference is in the graph, as :meth:`retina_tf.inference.Segmenter.segment` does it for
  ``predict``: FOV estimate (:func:`retina_tf.data.tf_preprocess.estimate_fov`), the rescale of
  a photograph whose FOV diameter is far from the training images' (``--inference_scale=auto``:
  to the training diameter, shrinking by at most 3x; no tiles), the
  preprocessing (:func:`retina_tf.data.tf_preprocess.preprocess`), zero padding to the model's
  size multiple (or sliding windows), the network, cropping, the resize back, zeroing outside
  the FOV and the threshold. TensorFlow alone loads it (``tf.saved_model.load``, TensorFlow
  Serving).
* ``onnx`` (tf2onnx) and ``tflite`` (built-in operators only, fixed input size): the network
  alone, preprocessed float image in, probability out; ``export.json`` holds the preprocessing
  constants a deployer reproduces.

Every export folder also holds ``export.json`` (inputs, outputs, threshold, preprocessing, what
is not in the export) and ``README.txt`` (the same in words), and is written under a temporary
name and renamed into place. What no format holds (test-time augmentation, the A/V segment
vote of :func:`retina_tf.postprocess.vote_av_segments`, other inference scales) is listed in
both and logged as a note.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import re
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from retina_tf.config import CHOICES, ExportConfig, takes
from retina_tf.data.catalog import dataset_key
from retina_tf.data.fov import EDGE_FRACTION, MAX_FRAME_RATIO, MIN_CONTRAST
from retina_tf.data.io import atomic_folder
from retina_tf.data.tf_preprocess import estimate_fov, preprocess
from retina_tf.errors import ConfigError, ModelFileError, OutputError
from retina_tf.inference import (
    ARC_FIT_PIXELS,
    ARC_FIT_TOLERANCE,
    ARC_LINE_TOLERANCE,
    ARC_MIN_POINTS,
    ARC_MIN_SPAN,
    AUTO_MAX_SCALE,
    BOX_AT_MOST,
    BOX_MARGIN,
    BOX_MARGIN_PIXELS,
    RUN_CHOICES,
    SCALE_TOLERANCE,
    Segmenter,
    export_run,
    logits_to_probability,
    model_logits,
    resolve_threshold,
    stored_threshold,
    tta_views,
)
from retina_tf.models.base import SegmentationModel
from retina_tf.run_folder import EXPORT_JSON, PRETRAINED_DIR, RUN_MARKERS, find_run

__all__ = ["FORMATS", "export_model", "export_saved_model", "export_onnx", "export_tflite",
           "deployer_notes", "run_threshold", "tflite_input_size"]

log = logging.getLogger(__name__)

FORMATS = CHOICES["format"]
README = "README.txt"
ONNX_FILE = "model.onnx"
TFLITE_FILE = "model.tflite"
# The ONNX opset (2022): onnxruntime 1.13 and later run it.
ONNX_OPSET = 17

# Native image size (height, width) of the datasets whose photographs all share one, for the
# TFLite input size when run.json does not record it.
DATASET_IMAGE_SIZES = {"drive": (584, 565), "rite": (584, 565), "stare": (605, 700),
                       "chase_db1": (960, 999), "hrf": (2336, 3504), "hrf_av": (2336, 3504)}

_AV_CHANNELS = ["artery", "vein", "vessel"]


# --- the run -------------------------------------------------------------------------------------

def _load(run: str, precision: str = "float32", **choices) -> Segmenter:
    """The run's default inference (as ``predict`` without options, ``choices``: its
    ``tta`` and ``tta_transpose`` given), loaded once."""
    return Segmenter.from_run(find_run(run, flag="--run"), precision=precision, **choices)


def run_threshold(run_dir: Path) -> float:
    """The run's mask threshold (:func:`retina_tf.inference.stored_threshold`): the one its
    ``run.json`` stores (F1-optimal on its held-out training images), else ``--threshold`` of
    its ``flags.txt``, else 0.5."""
    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} cannot be read as the run's settings ({err})") from err
    return stored_threshold(info if isinstance(info, dict) else {}, run_dir)[0]


def _num_classes(seg: Segmenter) -> int:
    k = seg.run_info.get("num_classes") or getattr(seg.model, "num_classes", None)
    if not k:
        x = np.zeros((1, seg.size_multiple, seg.size_multiple, seg.preprocessor.channels),
                     np.float32)
        k = int(_probability(seg, tf.constant(x)).shape[-1])
    return int(k)


def _context_size(seg: Segmenter) -> int | None:
    model = seg.model
    if isinstance(model, SegmentationModel) and model.context_fusion:
        return int(model.context_size)
    return None


def _network_inputs(seg: Segmenter, batch: tf.Tensor, context: tf.Tensor | None = None,
                    features: tf.Tensor | None = None):
    """What the model's call takes: the batch, or RIP-AV's ``{"image", "context"}`` (with
    ``features``, one context encoded beforehand: ``{"image", "context_features"}``)."""
    if _context_size(seg) is None:
        return batch
    if features is not None:
        return {"image": batch, "context_features": features}
    if context is None:
        context = seg.model.context_of(batch)
    return {"image": batch, "context": context}


def _probability(seg: Segmenter, batch: tf.Tensor, context: tf.Tensor | None = None,
                 features: tf.Tensor | None = None):
    """The network's probabilities (as ``Segmenter``'s forward pass)."""
    outputs = seg.network(_network_inputs(seg, batch, context, features), training=False)
    return logits_to_probability(model_logits(outputs))


def _is_multiscale(seg: Segmenter) -> bool:
    return (isinstance(seg.model, SegmentationModel)
            and type(seg.model).with_scales is not SegmentationModel.with_scales)


def _warm_up(seg: Segmenter) -> None:
    """Calls the model once: Keras refuses to export (ONNX) a freshly loaded model that has
    never been called."""
    side = seg.window if seg.inference == "sliding" else seg.size_multiple
    x = tf.zeros((1, side, side, seg.preprocessor.channels), tf.float32)
    _probability(seg, x)


# --- the SavedModel ------------------------------------------------------------------------------

def _window_starts(length: tf.Tensor, window: int, stride: int) -> tf.Tensor:
    """:func:`retina_tf.data.patches.window_starts` in TensorFlow: every ``stride`` px, and
    one window flush with the far border."""
    last = tf.maximum(length, window) - window
    return tf.unique(tf.concat([tf.range(0, last + 1, stride), [last]], axis=0))[0]


class _Serving(tf.Module):
    """The run's default inference as TensorFlow functions (traced by ``tf.saved_model.save``).

    Each step follows :class:`retina_tf.inference.Segmenter` line by line; the Python constants
    (threshold, sizes, the preprocessor's statistics) become graph constants.
    """

    def __init__(self, seg: Segmenter, threshold: float):
        super().__init__(name="retina_tf_export")
        # Only the variables are tracked, by path, to be saved with the functions: tracking the
        # Keras model makes tf.saved_model.save walk its whole object graph, several times slower.
        weights = {}
        for i, v in enumerate(seg.network.variables):
            weights[v.path if v.path not in weights else f"{v.path}#{i}"] = v.value
        self.weights = weights
        self._seg = seg
        self._threshold = float(threshold)
        self._channels = seg.preprocessor.channels
        self._classes = _num_classes(seg)
        self._trained_diameter = float(seg.run_info.get("fov_diameter") or 0.0)
        context = _context_size(seg)
        # The steps several signatures share, each traced once and called from each signature's
        # graph (inlined, the save would trace the network three times); a namespace, so that
        # they are not saved as functions of their own.
        self._steps = types.SimpleNamespace(
            preprocess=tf.function(lambda image: preprocess(image, seg.preprocessor)),
            fov=tf.function(estimate_fov),
            forward=tf.function(self._forward, reduce_retracing=True))
        # any shape, checked in the graph: a loaded signature does not hold a caller to its
        # shape, and a batch or a gray photograph failed deep inside with a misleading message
        image = tf.TensorSpec(None, tf.uint8, name="image")
        self.serving_default = tf.function(self._serve, input_signature=[image])
        self.segment_with_fov = tf.function(
            self._serve_with_fov, input_signature=[
                image, tf.TensorSpec(None, tf.uint8, name="fov")])
        self.preprocess = tf.function(self._preprocess, input_signature=[image])
        side = seg.window if seg.inference == "sliding" else None
        batch = [tf.TensorSpec([None, side, side, self._channels], tf.float32, name="image")]
        if context:
            batch.append(tf.TensorSpec([None, context, context, self._channels], tf.float32,
                                       name="context"))
        self.network_probability = tf.function(self._network, input_signature=batch)

    # signatures
    def _serve(self, image):
        image = _photograph(image)
        return self._segment(image, self._steps.fov(image))

    def _serve_with_fov(self, image, fov):
        image = _photograph(image)
        checks = [tf.debugging.assert_equal(tf.rank(fov), 2, message=(
            "fov must be one mask, uint8 [height, width] (one channel), non-zero inside"))]
        with tf.control_dependencies(checks):
            fov = tf.identity(fov)
            fov.set_shape([None, None])
        tf.debugging.assert_equal(tf.shape(fov), tf.shape(image)[:2], message=(
            "fov must have the image's height and width"))
        # as retina_tf refuses it: an empty mask would give an all-zero map without a word
        tf.debugging.assert_greater(tf.reduce_sum(tf.cast(fov > 0, tf.int32)), 0, message=(
            "the FOV mask is empty: give the mask of the photograph's field of view (non-zero "
            "inside)"))
        return self._segment(image, fov > 0)

    def _preprocess(self, image):
        image = _photograph(image)
        return {"preprocessed": self._steps.preprocess(image),
                "fov": tf.cast(self._steps.fov(image), tf.uint8)}

    def _network(self, image, context=None):
        multiple = self._seg.size_multiple
        tf.debugging.assert_equal(tf.shape(image)[1:3] % multiple, 0, message=(
            f"the network takes a batch padded to multiples of {multiple} in height and width "
            "(zero padding at the bottom and right)"))
        return {"probability": self._steps.forward(image, context)}

    # the steps
    def _forward(self, batch, context=None, features=None):
        return _probability(self._seg, batch, context, features)

    def _segment(self, image, fov):
        """:meth:`Segmenter.segment`: probability zeroed outside the FOV and its mask."""
        shape = tf.shape(image)
        tf.debugging.assert_greater_equal(
            tf.reduce_min(shape[:2]), self._seg.min_image_size, message=(
                f"the image is too small to segment: this model needs at least "
                f"{self._seg.min_image_size}x{self._seg.min_image_size} pixels"))
        prob = self._at_inference_scale(image, fov) * tf.cast(fov, tf.float32)[..., None]
        mask = tf.cast(prob[..., -1] >= self._threshold, tf.uint8)
        if self._classes == 1:
            prob = prob[..., 0]
        return {"probability": prob, "mask": mask}

    def _at_inference_scale(self, image, fov):
        """:meth:`Segmenter.probability_at_inference_scale` with the run's
        ``inference_scale`` (:func:`retina_tf.inference.inference_factor`): a photograph whose
        FOV diameter is not within 20 % of the aim is resized (area) to it, ``auto`` shrinking
        by at most ``auto_min_scale`` and enlarging by at most ``AUTO_MAX_SCALE`` (only the
        FOV's box where that is a small part of the frame), and the probabilities are resized
        back (bilinear), as OpenCV does there. The whole image goes through the network at once
        (no tiles)."""
        setting = self._seg.inference_scale
        if not self._trained_diameter or setting == "native":
            return self._probability(image)
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        diameter = _fov_diameter(fov)
        aim = tf.constant(self._trained_diameter * (setting if isinstance(setting, float)
                                                    else 1.0), tf.float64)
        rescale = tf.logical_and(diameter > 0,
                                 tf.abs(diameter / aim - 1.0) > SCALE_TOLERANCE)
        scale = aim / tf.maximum(diameter, 1.0)
        if setting == "auto":
            scale = tf.minimum(tf.maximum(scale, tf.constant(self._seg.auto_min_scale,
                                                             tf.float64)),
                               tf.constant(AUTO_MAX_SCALE, tf.float64))
        # enlarged: the FOV's box only where it is a small part of the frame (fov_box)
        top, bottom, left, right = tf.unstack(tf.cond(
            tf.logical_and(rescale, scale > 1.0), lambda: _fov_box(fov, diameter),
            lambda: tf.stack([0, height, 0, width])))
        part = image[top:bottom, left:right]

        def side(length):  # max(int(round(length * scale)), 1): round half to even, as Python
            return tf.maximum(tf.cast(tf.round(tf.cast(length, tf.float64) * scale), tf.int32),
                              1)

        def rescaled():  # OpenCV's INTER_AREA there, both ways
            resized = tf.image.resize(part, tf.stack([side(bottom - top), side(right - left)]),
                                      method="area")
            return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

        prob = self._probability(tf.cond(rescale, rescaled, lambda: image))
        return tf.cond(rescale,
                       lambda: tf.pad(tf.image.resize(prob, tf.stack([bottom - top, right - left]),
                                                      method="bilinear"),
                                      [[top, height - bottom], [left, width - right], [0, 0]]),
                       lambda: prob)

    def _probability(self, image):
        """:meth:`Segmenter.probability` (without the A/V vote): (H, W, K) probabilities,
        averaged over the flipped (and transposed) views of the preprocessed image when the
        run segments with test-time augmentation."""
        x = self._steps.preprocess(image)
        if not self._seg.tta:
            return self._preprocessed_probability(x)
        views = []
        for flip, turn in tta_views(self._seg.tta_transpose):
            view = tf.transpose(x, [1, 0, 2]) if turn else x
            prob = self._preprocessed_probability(tf.reverse(view, flip) if flip else view)
            prob = tf.reverse(prob, flip) if flip else prob
            views.append(tf.transpose(prob, [1, 0, 2]) if turn else prob)
        return tf.reduce_mean(tf.stack(views), axis=0)

    def _preprocessed_probability(self, x):
        context = (self._seg.model.context_of(x[None]) if _context_size(self._seg) else None)
        if self._seg.inference == "sliding":  # the windows share one encoded context
            return self._sliding(x, None if context is None else
                                 self._seg.model.context_features(context, training=False))
        height, width = tf.shape(x)[0], tf.shape(x)[1]
        multiple = self._seg.size_multiple
        padded = tf.pad(x[None], [[0, 0], [0, (-height) % multiple],
                                  [0, (-width) % multiple], [0, 0]])
        return self._steps.forward(padded, context)[0, :height, :width]

    def _sliding(self, x, features):
        """:func:`retina_tf.inference.sliding_window_predict`: windows of ``window`` px every
        ``stride`` px (one flush with each far border), overlaps averaged."""
        window, stride, batch = self._seg.window, self._seg.stride, self._seg.batch_size
        height, width = tf.shape(x)[0], tf.shape(x)[1]
        x = tf.pad(x, [[0, tf.maximum(window - height, 0)],
                       [0, tf.maximum(window - width, 0)], [0, 0]])
        rows = _window_starts(height, window, stride)
        cols = _window_starts(width, window, stride)
        offsets = tf.range(window)
        patches = tf.gather(tf.gather(x, rows[:, None] + offsets[None], axis=0),
                            cols[:, None] + offsets[None], axis=2)  # (r, window, c, window, C)
        patches = tf.reshape(tf.transpose(patches, [0, 2, 1, 3, 4]),
                             [-1, window, window, self._channels])
        count = tf.shape(patches)[0]
        chunks = -(-count // batch)
        patches = tf.pad(patches, [[0, chunks * batch - count], [0, 0], [0, 0], [0, 0]])
        patches = tf.reshape(patches, [chunks, batch, window, window, self._channels])
        probs = tf.map_fn(lambda b: self._forward(b, features=features), patches,
                          fn_output_signature=tf.TensorSpec([batch, window, window,
                                                             self._classes], tf.float32))
        probs = tf.reshape(probs, [-1, window, window, self._classes])[:count]
        # window n starts at (rows[n // len(cols)], cols[n % len(cols)]), as extract_patches
        shape = [count, window, window]
        pixel_rows = tf.repeat(rows, tf.size(cols))[:, None, None] + offsets[None, :, None]
        pixel_cols = tf.tile(cols, [tf.size(rows)])[:, None, None] + offsets[None, None, :]
        pixel = tf.stack([tf.broadcast_to(pixel_rows, shape),
                          tf.broadcast_to(pixel_cols, shape)], axis=-1)
        size = tf.shape(x)[:2]
        total = tf.scatter_nd(pixel, probs, tf.concat([size, [self._classes]], 0))
        covered = tf.scatter_nd(pixel, tf.ones(shape), size)
        return (total / covered[..., None])[:height, :width]


def _photograph(image: tf.Tensor) -> tf.Tensor:
    """``image`` as one uint8 [H, W, 3] RGB photograph, checked as ``predict`` checks it
    (:meth:`Segmenter.check_image_size`): a batch, a gray or RGBA image or one flat colour
    (nothing to segment) is refused with a message saying so."""
    rank = tf.rank(image)
    checks = [tf.debugging.assert_equal(rank, 3, message=(
        "image must be one photograph, uint8 [height, width, 3] RGB: not a batch (call once per "
        "photograph), a gray one as 3 equal channels"))]
    with tf.control_dependencies(checks):
        checks.append(tf.debugging.assert_equal(tf.shape(image)[-1], 3, message=(
            "image must be uint8 [height, width, 3] RGB: a gray photograph as 3 equal "
            "channels, an RGBA one without its alpha")))
    with tf.control_dependencies(checks):
        image = tf.identity(image)  # (tf.ensure_shape ran before the checks it waited for)
        image.set_shape([None, None, 3])
        spread = tf.reduce_max(image, axis=[0, 1]) - tf.reduce_min(image, axis=[0, 1])
    with tf.control_dependencies([tf.debugging.assert_greater(
            tf.reduce_max(spread), tf.constant(2, tf.uint8), message=(
                "the photograph is one flat colour: nothing to segment"))]):
        return tf.identity(image)


def export_saved_model(seg: Segmenter, folder: Path, threshold: float) -> dict:
    """Writes the SavedModel of ``seg`` into ``folder``; returns its signatures' description."""
    module = _Serving(seg, threshold)
    # The functions, not concrete functions traced here: tf.saved_model.save traces again in
    # its own context whatever was traced before.
    signatures = {"serving_default": module.serving_default,
                  "segment_with_fov": module.segment_with_fov,
                  "preprocess": module.preprocess,
                  "network": module.network_probability}
    with _quiet_loggers():
        tf.saved_model.save(module, str(folder), signatures=signatures)
    prob = "[H, W]" if module._classes == 1 else f"[H, W, {module._classes}]"
    channels = seg.preprocessor.channels
    side = f"{seg.window}, {seg.window}" if seg.inference == "sliding" else "H, W"
    padded = "" if seg.inference == "sliding" else \
        f", H and W padded to multiples of {seg.size_multiple}"
    network_inputs = {"image": f"float32 [N, {side}, {channels}], preprocessed (see "
                               f"'preprocessing'){padded}"}
    if _context_size(seg):
        cs = _context_size(seg)
        network_inputs["context"] = (f"float32 [N, {cs}, {cs}, {channels}]: the whole "
                                     f"preprocessed image area-resized to {cs} x {cs}")
    return {
        "serving_default": {
            "inputs": {"image": "uint8 [H, W, 3], an RGB photograph of any size"},
            "outputs": {"probability": f"float32 {prob}, 0 outside the field of view",
                        "mask": "uint8 [H, W], 1 where the (vessel) probability >= threshold"}},
        "segment_with_fov": {
            "inputs": {"image": "uint8 [H, W, 3]",
                       "fov": "uint8 [H, W], the field of view mask (non-zero inside)"},
            "outputs": "as serving_default"},
        "preprocess": {
            "inputs": {"image": "uint8 [H, W, 3]"},
            "outputs": {"preprocessed": f"float32 [H, W, {channels}]",
                        "fov": "uint8 [H, W], the estimated field of view (1 inside)"}},
        "network": {"inputs": network_inputs,
                    "outputs": {"probability": f"float32 [N, {side}, {module._classes}]"}},
    }


# --- the network alone: ONNX and TFLite ----------------------------------------------------------

def _network_function(seg: Segmenter, specs: list[tf.TensorSpec]):
    """The network as a ``tf.function`` of ``specs``, returning ``{"probability": ...}``."""
    if len(specs) == 2:
        def network(image, context):
            return {"probability": _probability(seg, image, context)}
    else:
        def network(image):
            return {"probability": _probability(seg, image)}
    return tf.function(network, input_signature=specs)


def _network_specs(seg: Segmenter, size: tuple[int | None, int | None],
                   batch: int | None) -> list[tf.TensorSpec]:
    channels = seg.preprocessor.channels
    specs = [tf.TensorSpec([batch, *size, channels], tf.float32, name="image")]
    cs = _context_size(seg)
    if cs:
        specs.append(tf.TensorSpec([batch, cs, cs, channels], tf.float32, name="context"))
    return specs


def export_onnx(seg: Segmenter, path: Path) -> dict:
    """Writes the network of ``seg`` as ONNX (tf2onnx) to ``path``: ``image`` float32
    [N, H, W, C] preprocessed (H, W multiples of the size multiple; fixed windows for a
    sliding-window model) -> ``probability`` float32 [N, H, W, K]."""
    try:  # optional: pip install 'retina_tf[export]'
        import onnx
        import tf2onnx
    except ImportError as err:
        raise ConfigError("--format=onnx needs tf2onnx, onnx and onnxruntime: pip install "
                          "'retina_tf[export]' (or pip install tf2onnx onnx onnxruntime)") from err
    _warm_up(seg)
    side = seg.window if seg.inference == "sliding" else None
    specs = _network_specs(seg, (side, side), None)
    function = _network_function(seg, specs)
    try:
        with _quiet_loggers():
            proto, _ = tf2onnx.convert.from_function(
                function, input_signature=specs, opset=ONNX_OPSET,
                custom_op_handlers={"Erfc": (_erfc_to_onnx, [])})
        # tf2onnx only logs an op it cannot map and leaves it in: the checker refuses it
        onnx.checker.check_model(proto)
    except Exception as err:  # tf2onnx and onnx raise many types
        raise ModelFileError(f"{seg.run_dir}: tf2onnx cannot convert this model's network "
                             f"({_first_line(err)}); use --format=saved_model") from err
    for output in proto.graph.output:  # tf2onnx names outputs after graph tensors
        if output.name != "probability":
            for node in proto.graph.node:
                node.output[:] = ["probability" if o == output.name else o for o in node.output]
            output.name = "probability"
    _squeeze_added_axis(proto)
    _check_onnx_output(proto, seg, specs)
    path.write_bytes(proto.SerializeToString())
    return {"inputs": {s.name: f"float32 {_shape_text(s.shape)}" for s in specs},
            "outputs": {"probability": f"float32 [N, {_dims(side)}, {_num_classes(seg)}]"},
            "opset": ONNX_OPSET}


def _squeeze_added_axis(proto) -> None:
    """Undoes a tf2onnx 1.17 slip, in place. A one-channel network ends in a transpose that
    tf2onnx writes as a reshape to ``[1, N, H, W, 1]`` followed by a squeeze of the first axis; in
    about a third of the processes (it varies with the hash seed) its optimizer then drops the
    squeeze, and the model answers ``(1, N, H, W, 1)``. The squeeze is put back."""
    import onnx  # optional, as in export_onnx

    (output,) = proto.graph.output
    dims = output.type.tensor_type.shape.dim
    if len(dims) != 5 or dims[0].dim_value != 1:
        return
    for node in proto.graph.node:
        node.output[:] = ["probability_with_added_axis" if o == "probability" else o
                          for o in node.output]
    proto.graph.initializer.append(onnx.numpy_helper.from_array(
        np.array([0], np.int64), "probability_added_axis"))
    proto.graph.node.append(onnx.helper.make_node(
        "Squeeze", ["probability_with_added_axis", "probability_added_axis"], ["probability"],
        name="probability_squeeze"))
    del dims[0]


def _check_onnx_output(proto, seg: Segmenter, specs: list[tf.TensorSpec]) -> None:
    """Runs the ONNX network once on blank inputs (onnxruntime): its output must have the
    Keras network's shape, or nothing is written."""
    import onnxruntime  # optional, as in export_onnx

    side = -(-seg.min_image_size // seg.size_multiple) * seg.size_multiple
    feeds = {spec.name: np.zeros([1 if i == 0 else d or side for i, d in enumerate(spec.shape)],
                                 np.float32) for spec in specs}
    image = feeds["image"]
    expected = (*image.shape[:3], _num_classes(seg))
    session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    (got,) = session.run(["probability"], feeds)
    if got.shape != expected:
        raise ModelFileError(f"{seg.run_dir}: tf2onnx made a network that answers shape "
                             f"{got.shape} for an input of {image.shape} (expected {expected}); "
                             "use --format=saved_model")


def _erfc_to_onnx(ctx, node, name, args):
    """``Erfc`` (Keras's exact GELU: ConvNeXt, ViT) for tf2onnx, which maps only ``Erf``:
    ``erfc(x) = 1 - erf(x)``."""
    from tf2onnx import utils  # optional, as in export_onnx

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    erf = ctx.make_node("Erf", [node.input[0]])
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype))
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])


def tflite_input_size(seg: Segmenter, input_size: str | None) -> tuple[int, int]:
    """TFLite's fixed (height, width): ``input_size`` ("HxW"), else the training images'
    padded size (run.json ``image_size``, or the dataset's photographs); the window for a
    sliding-window model.

    Raises:
        ConfigError: a size that is not ``HxW``, not a multiple of the model's size multiple,
            or no default known.
    """
    multiple = seg.size_multiple
    if input_size:
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", input_size)
        if not match:
            raise ConfigError(f"--input_size={input_size}: give HEIGHTxWIDTH in pixels, e.g. "
                              "592x576")
        size = (int(match[1]), int(match[2]))
        if seg.inference == "sliding" and size != (seg.window, seg.window):
            raise ConfigError(f"--input_size={input_size}: this model takes windows of exactly "
                              f"{seg.window}x{seg.window}")
        if size[0] < multiple or size[0] % multiple or size[1] % multiple or size[1] < multiple:
            raise ConfigError(f"--input_size={input_size}: height and width must be multiples "
                              f"of {multiple} (the model's size multiple), e.g. "
                              f"{_pad(size[0], multiple)}x{_pad(size[1], multiple)}")
        return size
    if seg.inference == "sliding":
        return seg.window, seg.window
    size = seg.run_info.get("image_size") or _datasets_image_size(seg.run_info)
    if not size:
        raise ConfigError(f"--input_size is needed: the training images' size of "
                          f"{seg.run_dir} is not known (dataset "
                          f"{seg.run_info.get('dataset')!r}); give the height x width of "
                          f"the photographs it will serve, each a multiple of {multiple} (e.g. "
                          "--input_size=592x576)")
    height, width = _pad(int(size[0]), multiple), _pad(int(size[1]), multiple)
    if _measured_views(seg)[2]:  # its transposed views must fit too
        height = width = max(height, width)
    return height, width


def _datasets_image_size(run_info: dict) -> tuple[int, int] | None:
    """The largest height and width of the photographs of the datasets a run trained on (one
    that records no ``image_size``), where every one has a known size."""
    extra = (run_info.get("data") or {}).get("extra_data") or []
    names = [str(run_info.get("dataset"))] + [entry.split(":", 1)[0] for entry in extra]
    sizes = [DATASET_IMAGE_SIZES.get(dataset_key(name)) for name in names]
    if not all(sizes):
        return None
    return max(h for h, _ in sizes), max(w for _, w in sizes)


def export_tflite(seg: Segmenter, path: Path, size: tuple[int, int]) -> dict:
    """Writes the network of ``seg`` as TFLite with built-in operators only, for one input of
    ``size``: ``image`` float32 [1, H, W, C] preprocessed -> ``probability`` [1, H, W, K]."""
    _warm_up(seg)
    specs = _network_specs(seg, size, 1)
    # Frozen first: left to the converter, Keras 3's variables stay resource variables that the
    # TFLite interpreter reads as NaN (TensorFlow 2.21).
    frozen = convert_variables_to_constants_v2(
        _network_function(seg, specs).get_concrete_function())
    # wrapped again, with a trackable, for the signature (image -> probability) freezing drops
    function = tf.function(lambda *inputs: {"probability": frozen(*inputs)[0]},
                           input_signature=specs).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], tf.Module())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        with _quiet_loggers():
            data = converter.convert()
    except Exception as err:  # the converter raises ConverterError and others
        raise ModelFileError(f"{seg.run_dir}: this model's network needs operators outside "
                             f"TFLite's built-in set ({_first_line(err)}); use "
                             "--format=saved_model or onnx") from err
    path.write_bytes(data)
    return {"inputs": {s.name: f"float32 {_shape_text(s.shape)}" for s in specs},
            "outputs": {"probability": f"float32 [1, {size[0]}, {size[1]}, "
                                       f"{_num_classes(seg)}]"},
            "input_size": list(size)}


# --- what the export holds, in words -------------------------------------------------------------

def deployer_notes(seg: Segmenter, fmt: str) -> list[str]:
    """What a deployer must add to the ``fmt`` export of ``seg`` to get what retina_tf gives
    for this model, one sentence each (empty: the export is the whole of it)."""
    if fmt == "keras":  # retina_tf itself runs it, with every option
        return []
    notes = []
    network_only = fmt in ("onnx", "tflite")
    if network_only:
        notes.append(f"everything around the network, as {README} lists it (constants in "
                     f"{EXPORT_JSON}): the field of view, the rescale to the inference scale, "
                     f"the preprocessing ({', '.join(seg.preprocessor.steps) or 'none'}), "
                     + ("" if seg.inference == "sliding" else
                        f"zero padding to multiples of {seg.size_multiple} and cropping back, ")
                     + "zeroing outside the field of view and the threshold")
    cs = _context_size(seg)
    if cs and network_only:
        notes.append(f"the second input 'context': the whole preprocessed image, unpadded, "
                     f"area-resized to {cs}x{cs} (tf.image.resize(x, ({cs}, {cs}), "
                     "method='area')), the same for every window of the image")
    if seg.inference == "sliding" and network_only:
        notes.append(f"sliding windows: the network takes {seg.window}x{seg.window} windows; "
                     f"cut the preprocessed image into windows every {seg.stride} px plus one "
                     "flush with the bottom and right borders, run each and average the "
                     "overlapping probabilities")
    if _is_multiscale(seg):
        scales = ", ".join(f"{s:g}" for s in seg.model.scales)
        notes.append(f"the scale fusion is exported at the training scales ({scales}) only; "
                     "other inference scales (--eval_scales) need retina_tf")
    own, tta, turned, vote = _measured_views(seg)
    steps = []
    if tta and not (fmt == "saved_model" and seg.tta):  # else the graph averages the views
        steps.append(f"average the export's probabilities over the {_views(turned)} of the "
                     "preprocessed image, before its padding (x; x flipped left-right, up-down "
                     "and both" + ("; the same of x transposed" if turned else "") + "), each "
                     + ("map flipped and transposed back" if turned else "map flipped back"))
    elif tta and turned and not seg.tta_transpose:  # a SavedModel of the 4 flips only
        steps.append("run this SavedModel (4 flips) on the transposed photograph too, transpose "
                     "its probabilities back and average the two (or export without "
                     "--notta_transpose)")
    if vote:
        steps.append("give each vessel segment one artery/vein decision with "
                     "retina_tf.postprocess.vote_av_segments, Python code on SciPy and "
                     "scikit-image that no graph format holds")
    if steps and seg.task == "av":
        how = ("retina_tf's default for this run, chosen on held-out images" if own else
               "--tta --tta_transpose --av_vote")
        notes.append(f"for the A/V results as measured ({how}): " + ", then ".join(steps))
    elif steps:
        views = "flip and transpose TTA" if turned else "flip TTA"
        notes.append(f"for the results as retina_tf gives them (the run segments with {views} "
                     "by default, chosen on its held-out images): " + ", then ".join(steps))
    return notes


def _measured_views(seg: Segmenter) -> tuple[bool, bool, bool, bool]:
    """(whether the run chose them itself, TTA, its transposes, the A/V vote): the views the
    run's results were measured with: its choice on held-out images, else (an A/V run without
    one) the evaluation RIP-AV was measured with."""
    own = any(key in seg.run_info for key in RUN_CHOICES)
    tta, turned, vote = (bool(seg.run_info.get(key)) for key in RUN_CHOICES) \
        if own or seg.task != "av" else (True,) * 3
    return own, tta, tta and turned, vote and seg.task == "av"


def _views(transpose: bool) -> str:
    """:func:`retina_tf.inference.tta_views` in words."""
    return "8 flips and transposes" if transpose else "4 flips"


def _note_paragraph(seg: Segmenter, fmt: str) -> str | None:
    notes = deployer_notes(seg, fmt)
    if not notes:
        return None
    items = "; ".join(f"({i}) {n}" for i, n in enumerate(notes, 1))
    return (f"note: this {fmt} export of {seg.run_dir.name} is not the whole of retina_tf's "
            f"inference; a deployer must add: {items}.")


def _preprocessing(seg: Segmenter, input_size: list[int] | None = None) -> dict:
    pre = seg.preprocessor
    return {
        "steps": pre.steps,
        "settings": pre.get_config(),
        "recipe": _recipe(seg, input_size),
        "size_multiple": seg.size_multiple,
        "inference": seg.inference,
        **({"window": seg.window, "stride": seg.stride} if seg.inference == "sliding" else {}),
        "training_fov_diameter": seg.run_info.get("fov_diameter"),
        "inference_scale": seg.inference_scale,
        **({"auto_min_scale": seg.auto_min_scale} if seg.inference_scale == "auto" else {}),
        "min_image_size": seg.min_image_size,
    }


# The FOV estimate (retina_tf.data.fov.estimate_fov) and diameter (retina_tf.inference.
# fov_diameter) in words, with their constants, for a deployer of the network alone.
FOV_RECIPE = (
    "field of view: the mask given (non-zero inside), else estimated: r = cv2.medianBlur(R, 5); "
    "t = Otsu's threshold of r (cv2.THRESH_OTSU); with c the cumulative 256-bin histogram of r "
    "and N its pixels, frame = the least level with c >= c[t] / 2, retina = the least with "
    f"c >= c[t] + (N - c[t]) / 2; the whole image is the FOV if c[t] is 0 or N, retina - frame "
    f"< {MIN_CONTRAST} or frame > {MAX_FRAME_RATIO:g} retina; else "
    f"m = r > frame + {EDGE_FRACTION:g} (retina - frame), opened (cv2.MORPH_OPEN) "
    "with a 5 x 5 ellipse (cv2.getStructuringElement(cv2.MORPH_ELLIPSE)), its largest outer "
    "contour (cv2.findContours RETR_EXTERNAL, CHAIN_APPROX_SIMPLE; cv2.contourArea) filled, "
    "eroded by a 7 x 7 ellipse (no contour: the whole image)")
DIAMETER_RECIPE = (
    "its horizontal extent in pixels (last column - first column + 1); the vertical one if a "
    "column at the left or right end of the disc holds more than half the disc's height of FOV "
    "pixels (a disc cut at a side); if "
    "the transposed mask is cut so too, the circle fitted by least squares (Kasa: solve "
    "[u v 1] [d e f]^T = -(u^2 + v^2) for the centred points u, v; r^2 = (d^2 + e^2) / 4 - f) "
    "through each row's first and last FOV pixel and each column's, leaving out those on the "
    "disc's extreme columns (rows); D = 2 r + 1 where there are at least "
    f"{ARC_MIN_POINTS} points, their RMS distance from the circle is at most "
    f"{ARC_FIT_TOLERANCE:g} r + {ARC_FIT_PIXELS:g} px and they span (the larger of their x "
    f"and y ranges) at least {ARC_MIN_SPAN!r} of 2 r, else 0")


def _recipe(seg: Segmenter, input_size: list[int] | None = None) -> list[str]:
    """The preprocessing as numbered steps a deployer can follow (Preprocessor.__call__);
    ``input_size``: a fixed-size (TFLite) network's."""
    pre = seg.preprocessor
    steps = []
    steps.append(FOV_RECIPE)
    d = seg.run_info.get("fov_diameter")
    setting = seg.inference_scale
    if d and setting != "native":
        aim = d * (setting if isinstance(setting, float) else 1.0)
        factor = (f"f = min(max({aim!r} / D, {seg.auto_min_scale!r}), {AUTO_MAX_SCALE!r})"
                  if setting == "auto" else f"f = {aim!r} / D")
        steps.append(f"if the FOV's diameter D ({DIAMETER_RECIPE}) differs from {aim:g} px by "
                     f"more than {SCALE_TOLERANCE:.0%} (|D / {aim:g} - 1| > {SCALE_TOLERANCE:g};"
                     f" D = 0: never), resize the photograph by {factor} (OpenCV "
                     "INTER_AREA, to max(round(W f), 1) x max(round(H f), 1), round half to "
                     "even), segment it (the steps below up to the network's probabilities), "
                     "resize the probabilities back to the photograph's size (bilinear) and go "
                     "on at the last step; when "
                     "enlarging, first cut the photograph to the FOV's bounding box plus "
                     f"max(round({BOX_MARGIN:g} D), {BOX_MARGIN_PIXELS}) px on every side "
                     f"(within the image) if that box is at most {BOX_AT_MOST:.0%} of the image's "
                     "area, "
                     "and paste the probabilities back into zeros")
    if pre.grayscale:
        steps.append("x = 0.299 R + 0.587 G + 0.114 B (float32)" if pre.channel == "luminance"
                     else "x = G (float32)")
    else:
        steps.append("x = R, G, B (float32, each channel through every step)")
    if pre.standardize:
        steps.append(f"x = (x - {pre.mean!r}) / {pre.std!r}; then per channel, min and max "
                     "over the whole image: x = (x - min) / max(max - min, 1e-6) * 255")
    steps.append("x = uint8(clip(x, 0, 255)) (truncating)")
    if pre.clahe:
        steps.append(f"CLAHE per channel: cv2.createCLAHE(clipLimit={pre.clahe_clip:g}, "
                     f"tileGridSize=({pre.clahe_tiles}, {pre.clahe_tiles}))")
    if pre.gamma:
        steps.append(f"gamma: x = LUT[x] with LUT[i] = uint8((i / 255) ** (1 / "
                     f"{pre.gamma_value:g}) * 255)")
    steps.append("x = float32(x) / 255, shape (H, W, C)")
    if input_size and seg.inference == "whole":
        steps.append(f"zero-pad at the bottom and right to the network's fixed input, "
                     f"{input_size[0]} x {input_size[1]} (a transposed view too), run it, crop "
                     "the probabilities back to (H, W); retina_tf pads to multiples of "
                     f"{seg.size_multiple} instead, which differs a little near the right and "
                     "bottom edges (export with --input_size=<that padded size> to match it "
                     "exactly, and its transpose for transposed views)")
    elif seg.inference == "whole":
        steps.append(f"zero-pad at the bottom and right to multiples of {seg.size_multiple}, run "
                     "the network, crop the probabilities back to (H, W)")
    steps.append("zero the probabilities outside the field of view, at the photograph's own "
                 "size; mask = probability of the last channel >= threshold" + (
                     "; each mask pixel is artery where the artery probability >= the vein "
                     "probability, else vein (retina_tf.postprocess.av_mask)"
                     if seg.task == "av" else ""))
    return steps


def _description(seg: Segmenter, fmt: str, threshold: float, model: dict) -> dict:
    k = _num_classes(seg)
    if fmt == "keras":
        in_the_export = ("a run folder that retina_tf loads (Segmenter.from_run, or --model of "
                         "evaluate and predict): its inference as a run's")
    elif fmt == "saved_model":
        in_the_export = "everything in 'preprocessing' and the network"
        if seg.tta:
            in_the_export += (f", its probabilities averaged over the "
                              f"{_views(seg.tta_transpose)} of the preprocessed image (test-time "
                              "augmentation, each undone)")
    else:
        in_the_export = "the network only: preprocessed image in, probability out"
    return {
        "format": fmt,
        "run": seg.run_dir.name,
        "model": seg.run_info.get("model", type(seg.model).__name__),
        "task": seg.task,
        "channels": _AV_CHANNELS if k == 3 and seg.task == "av" else ["vessel"] * k,
        "threshold": threshold,
        "precision": seg.precision,
        "retina_tf_version": _version(),
        "tensorflow_version": tf.__version__,
        **model,
        "preprocessing": _preprocessing(seg, model.get("input_size")),
        "in_the_export": in_the_export,
        **({"test_time_augmentation": _views(seg.tta_transpose) if seg.tta else None}
           if fmt == "saved_model" else {}),
        "deployer_must_add": deployer_notes(seg, fmt),
        "never_exported": [] if fmt == "keras" else [
            *(["test-time augmentation (--tta)", "predict's refusal of a photograph of one "
               "flat colour (nothing to segment: it would come back as noise)"]
              if fmt != "saved_model" else []),
            "the A/V segment vote (--av_vote)",
            "inference scales other than the training ones (--eval_scales)",
            "predict's warning of a mask far from the training labels' share of vessel (or of "
            "arteries): their shares are in 'training_labels', the rule in "
            "retina_tf.inference.vessel_share_warning (artery_share_warning)",
            "predict's warning of a gray photograph with bright vessels (an angiogram): the "
            "training images' measure is in 'training_images', the rule in "
            "retina_tf.inference.bright_vessels_warning",
            "predict's warning of a photograph whose blue channel is brighter than its red "
            "(channels in BGR order): the input must be RGB, the rule in "
            "retina_tf.data.io.channel_order_warning"],
        # the least and largest share of the FOV (and of the vessel pixels called artery) in
        # the training labels, for a service that wants predict's warnings
        "training_labels": {key: seg.run_info[key] for key in ("vessel_share", "artery_share")
                            if seg.run_info.get(key)},
        "training_images": {key: seg.run_info[key] for key in ("bright_line_ratio",)
                            if seg.run_info.get(key)},
    }


def _readme(info: dict) -> str:
    lines = [f"{info['run']} ({info['model']}, {info['task']}) exported by retina_tf "
             f"{info['retina_tf_version']} as {info['format']} (TensorFlow "
             f"{info['tensorflow_version']}).", ""]
    if info["format"] == "keras":
        lines += [f"Files: {', '.join(info['files'])}.", "",
                  "In the folder: " + info["in_the_export"] + ". What it does:"]
    elif info["format"] == "saved_model":
        lines += ["Signatures:"]
        for name, sig in info["signatures"].items():
            lines.append(f"  {name}: {json.dumps(sig['inputs'])} -> {json.dumps(sig['outputs'])}")
        lines += ["", "In the graph: " + info["in_the_export"] + "."]
    else:
        lines += [f"Inputs: {json.dumps(info['inputs'])}",
                  f"Outputs: {json.dumps(info['outputs'])}",
                  "", "In the file: " + info["in_the_export"] + ". Reproduce the "
                  "preprocessing below (its constants are in export.json):"]
    lines += [f"Mask threshold: {info['threshold']:g}. Output channels: "
              f"{', '.join(info['channels'])}." + (
                  f" Computed in {info['precision']} (float32 weights): its probabilities "
                  "differ a little from a float32 export's." if info["precision"] != "float32"
                  else ""), "", "Preprocessing and inference:"]
    lines += [f"  {i}. {step}" for i, step in enumerate(info["preprocessing"]["recipe"], 1)]
    if info["deployer_must_add"]:
        lines += ["", "A deployer must add:"]
        lines += [f"  - {note}" for note in info["deployer_must_add"]]
    if info["never_exported"]:
        lines += ["", "Never in an export: " + "; ".join(info["never_exported"]) + "."]
    return "\n".join(lines) + "\n"


# --- writing -------------------------------------------------------------------------------------

def check_out(out: Path, overwrite: bool) -> None:
    """Raises ConfigError for an ``--out`` the export must not replace: one that exists without
    ``--overwrite``; with it, anything but an earlier export (``export.json``), an empty folder
    or a shipped model's (``--overwrite`` of a folder of other files, or of a training run,
    deleted them all); and the current folder or one holding it."""
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise ConfigError(f"--out={out} is the current folder or holds it; give a new folder "
                          "for the export, e.g. --out=exports/<name>")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ConfigError(f"--out={out} already exists; pass --overwrite to replace it, or "
                          "give another folder")
    if not out.is_dir():
        raise ConfigError(f"--out={out} is a file, not an earlier export; give a folder")
    held = sorted(p.name for p in out.iterdir())
    if not held or (out / EXPORT_JSON).is_file() or out.resolve().parent == PRETRAINED_DIR:
        return  # an earlier export, or a shipped model made anew (docs/deploy.md)
    what = ("a training run" if any((out / name).exists() for name in RUN_MARKERS) else
            f"{', '.join(held[:3])}{' ...' if len(held) > 3 else ''}")
    raise ConfigError(f"--out={out} holds {what}, not an earlier export: --overwrite replaces "
                      "only an export; give a new folder")


def _write_folder(out: Path, overwrite: bool, fill: Callable[[Path], dict]) -> dict:
    """Fills a temporary folder beside ``out`` (``fill`` returns the export's description,
    written as export.json and README.txt), then renames it to ``out``: an interrupted export
    leaves no half-written ``out``."""
    check_out(out, overwrite)
    try:
        with atomic_folder(out) as tmp:
            info = fill(tmp)
            (tmp / EXPORT_JSON).write_text(json.dumps(info, indent=2) + "\n")
            (tmp / README).write_text(_readme(info))
        return info
    except OSError as err:
        if isinstance(err, OutputError):
            raise
        raise OutputError(err.errno, err.strerror, str(err.filename or out)) from err


@takes(ExportConfig)
def export_model(cfg: ExportConfig) -> Path:
    """Exports the run ``cfg.run`` in ``cfg.format`` to the folder ``cfg.out`` (see the module
    docstring); logs what was written and, for a model no format holds whole, what a deployer
    must add.

    Raises:
        ConfigError: a missing --run or --out, an option of another format, a --out that is
            the run or exists without --overwrite (a bad --format, --input_size or --threshold
            the config itself refuses).
        ModelFileError: the run cannot be loaded, or the network cannot be converted.
        OutputError: the folder cannot be written.
    """
    missing = [f"--{name}" for name in ("run", "out") if not getattr(cfg, name)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          "required: export_model writes the run --run (a run folder or a "
                          "shipped model name) to the folder --out, e.g. --run=unet_drive "
                          "--format=saved_model --out=exports/unet_drive/1")
    # "auto" (the flag's default) exports float32: the deployer's hardware is not this one
    precision = "float32" if cfg.precision == "auto" else cfg.precision
    if precision != "float32" and cfg.format != "saved_model":
        raise ConfigError(f"--precision={cfg.precision} is for --format=saved_model only "
                          f"(--format={cfg.format} keeps the float32 network)")
    if cfg.input_size and cfg.format != "tflite":
        raise ConfigError(f"--input_size is for --format=tflite only (--format={cfg.format} "
                          "takes any size)")
    given = [f"--{name}" for name in ("tta", "tta_transpose") if getattr(cfg, name) is not None]
    if given and cfg.format != "saved_model":
        raise ConfigError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                          f"--format=saved_model only (--format={cfg.format} "
                          + ("keeps the run's choice)" if cfg.format == "keras" else
                             "holds the network alone; its notes list the views to average)"))
    if cfg.threshold is not None and cfg.format == "keras":
        raise ConfigError("--threshold is for --format=saved_model, onnx or tflite (a keras "
                          "export keeps the run's threshold; evaluate and predict take "
                          "--threshold)")
    out = Path(cfg.out)
    run_dir = find_run(cfg.run, flag="--run").resolve()
    if out.resolve() == run_dir or out.resolve() in run_dir.parents:
        raise ConfigError(f"--out={out} is the run folder or holds it: the export would "
                          "replace the run; give another folder")
    check_out(out, cfg.overwrite)  # before the minutes of tracing
    seg = _load(str(run_dir), precision, tta=cfg.tta, tta_transpose=cfg.tta_transpose)
    threshold, _ = resolve_threshold(seg, cfg.threshold)
    size = tflite_input_size(seg, cfg.input_size) if cfg.format == "tflite" else None

    def fill(folder: Path) -> dict:
        if cfg.format == "keras":
            export_run(run_dir, folder, seg.model)  # float32: the loaded network
            model = {"files": sorted(p.name for p in folder.iterdir())}
        elif cfg.format == "saved_model":
            model = {"signatures": export_saved_model(seg, folder, threshold)}
        elif cfg.format == "onnx":
            model = {"file": ONNX_FILE, **export_onnx(seg, folder / ONNX_FILE)}
        else:
            model = {"file": TFLITE_FILE, **export_tflite(seg, folder / TFLITE_FILE, size)}
        return _description(seg, cfg.format, threshold, model)

    _write_folder(out, cfg.overwrite, fill)
    log.info(f"exported {seg.run_dir} -> {out} " + (
        "(keras: a run folder; load it with retina_tf.Segmenter.from_run, or --model)"
        if cfg.format == "keras" else
        f"({cfg.format}; {EXPORT_JSON} and {README} describe the inputs, outputs and "
        "preprocessing)"))
    note = _note_paragraph(seg, cfg.format)
    if note:
        log.info(note)
    return out


# --- small helpers -------------------------------------------------------------------------------

def _fov_diameter(fov: tf.Tensor) -> tf.Tensor:
    """:func:`retina_tf.inference.fov_diameter` in TensorFlow ops (float64; 0: unknown)."""
    def across(mask):  # (extent along the columns, whether the disc is cut at its sides)
        cols = tf.where(tf.reduce_any(mask, axis=0))[:, 0]
        rows = tf.where(tf.reduce_any(mask, axis=1))[:, 0]
        ends = tf.reduce_sum(tf.cast(tf.gather(mask, tf.stack([cols[0], cols[-1]]), axis=1),
                                     tf.float64), axis=0)
        cut = tf.reduce_max(ends) > tf.cast(rows[-1] - rows[0] + 1, tf.float64) / 2
        return tf.cast(cols[-1] - cols[0] + 1, tf.float64), cut

    def measured():
        width, cut_sides = across(fov)
        height, cut_ends = across(tf.transpose(fov))
        return tf.cond(tf.logical_and(cut_sides, cut_ends), lambda: _arc_diameter(fov),
                       lambda: tf.where(cut_sides, height, width))

    return tf.cond(tf.reduce_any(fov), measured, lambda: tf.constant(0.0, tf.float64))


def _fov_box(fov: tf.Tensor, diameter: tf.Tensor) -> tf.Tensor:
    """:func:`retina_tf.inference.fov_box` in TensorFlow ops: (top, bottom, left, right)
    int32, the whole image where that function gives None."""
    height, width = tf.shape(fov)[0], tf.shape(fov)[1]
    rows = tf.cast(tf.where(tf.reduce_any(fov, axis=1))[:, 0], tf.int32)
    cols = tf.cast(tf.where(tf.reduce_any(fov, axis=0))[:, 0], tf.int32)
    margin = tf.maximum(tf.cast(tf.round(BOX_MARGIN * diameter), tf.int32), BOX_MARGIN_PIXELS)
    top, bottom = tf.maximum(rows[0] - margin, 0), tf.minimum(rows[-1] + 1 + margin, height)
    left, right = tf.maximum(cols[0] - margin, 0), tf.minimum(cols[-1] + 1 + margin, width)
    small = (tf.cast((bottom - top) * (right - left), tf.float64)
             <= BOX_AT_MOST * tf.cast(height * width, tf.float64))
    return tf.where(small, tf.stack([top, bottom, left, right]),
                    tf.stack([0, height, 0, width]))


def _row_ends(mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """retina_tf.inference._row_ends in TensorFlow ops (int64 x, y)."""
    rows = tf.where(tf.reduce_any(mask, axis=1))[:, 0]
    sub = tf.cast(tf.gather(mask, rows), tf.int32)
    first = tf.argmax(sub, axis=1)
    last = tf.cast(tf.shape(mask)[1], tf.int64) - 1 - tf.argmax(sub[:, ::-1], axis=1)
    keep_first = first > tf.reduce_min(first)
    keep_last = last < tf.reduce_max(last)
    return (tf.concat([first[keep_first], last[keep_last]], 0),
            tf.concat([rows[keep_first], rows[keep_last]], 0))


def _arc_diameter(fov: tf.Tensor) -> tf.Tensor:
    """:func:`retina_tf.inference.arc_diameter` in TensorFlow ops (float64; 0: unknown)."""
    x1, y1 = _row_ends(fov)
    y2, x2 = _row_ends(tf.transpose(fov))
    x = tf.cast(tf.concat([x1, x2], 0), tf.float64)
    y = tf.cast(tf.concat([y1, y2], 0), tf.float64)
    zero = tf.constant(0.0, tf.float64)

    def fit():
        u, v = x - tf.reduce_mean(x), y - tf.reduce_mean(y)
        a = tf.stack([u, v, tf.ones_like(u)], axis=1)
        m = tf.transpose(a) @ a
        on_a_line = m[0, 0] * m[1, 1] - m[0, 1] ** 2 <= ARC_LINE_TOLERANCE * (m[0, 0]
                                                                            + m[1, 1]) ** 2
        return tf.cond(on_a_line, lambda: zero, lambda: circle(u, v, a, m))

    def circle(u, v, a, m):
        d, e, f = tf.unstack(tf.linalg.solve(m, tf.transpose(a) @ -(u * u + v * v)[:, None])
                             [:, 0])
        r = tf.sqrt(tf.maximum((d * d + e * e) / 4 - f, 0.0))
        rms = tf.sqrt(tf.reduce_mean((tf.sqrt((u + d / 2) ** 2 + (v + e / 2) ** 2) - r) ** 2))
        span = tf.maximum(tf.reduce_max(x) - tf.reduce_min(x), tf.reduce_max(y) - tf.reduce_min(y))
        good = tf.logical_and(r > 0, tf.logical_and(
            rms <= ARC_FIT_TOLERANCE * r + ARC_FIT_PIXELS, span >= ARC_MIN_SPAN * 2 * r))
        return tf.where(good, 2 * r + 1, zero)

    return tf.cond(tf.size(x) >= ARC_MIN_POINTS, fit, lambda: zero)


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


@contextlib.contextmanager
def _quiet_loggers():
    """TensorFlow's, absl's and tf2onnx's information lines (the temporary folder's name, every
    conversion step) held back; their warnings and errors pass. A level for the loggers' own
    children, and a filter too: the TFLite converter resets absl's level."""
    loggers = [logging.getLogger(name) for name in ("tensorflow", "tf2onnx", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.WARNING))
        logger.addFilter(_below_warning)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeFilter(_below_warning)
            logger.setLevel(level)


def _pad(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _dims(side: int | None) -> str:
    return f"{side}, {side}" if side else "H, W"


def _shape_text(shape: tf.TensorShape) -> str:
    names = iter("NHW")
    dims = [str(d) if d is not None else next(names) for d in shape.as_list()]
    return "[" + ", ".join(dims) + "]"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _version() -> str:
    try:
        return importlib.metadata.version("retina_tf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"

