"""The contract between retina_tf's models and the code that trains and runs them.

Training (:mod:`retina_tf.training`) and inference (:mod:`retina_tf.inference`) read a model only
through the attributes and methods declared here, never by probing for others; a new
architecture subclasses :class:`SegmentationModel` and overrides what differs from the defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from retina_tf.errors import ConfigError


class SegmentationModel:
    """Base class of every registered model, listed before ``keras.Model``:
    ``class UNet(SegmentationModel, keras.Model)``.

    A mixin rather than a ``keras.Model`` subclass: Keras turns a functional-style subclass into
    a ``Functional`` one by rewriting the ``__bases__`` of every class between it and
    ``keras.Model``, which would turn the subclassed models (RIP-AV) functional too.

    Class attributes (override in the subclass):
        task: ``"av"`` when the model only makes sense for artery/vein labels (``--task`` is then
            inferred); None: the data decide.
        pretraining_script: for pre-training models, the script that trains them (``bin/train``
            refuses them).
        needs_error_maps: stage-2 models trained on stage-1 error maps (EAR-Net).
        context_fusion: the model takes ``{"image", "context"}`` inputs (RIP-AV's PCF) and
            provides ``context_of``, ``context_size`` and ``context_factor``.
        flag_arguments: constructor arguments that also exist as command-line flags
            (``--depth``, ...); other models never receive those flags.
        fully_convolutional: any input size that is a multiple of ``size_multiple`` works
            (whole-image inference); False: fixed-size windows of ``size_multiple`` px.
        uses_compiled_loss: False when ``compute_loss`` is the method's own (RIP-AV), so the
            loss flags cannot apply.
        argument_sources: classes whose constructor arguments this model also takes, for a
            part it builds from them (EAR-Net: its HMSA stage 1).
        bfloat16_pays: inference in bfloat16 was measured faster at the same scores on CPUs
            with AMX, so ``--precision=auto`` takes it (docs/results/speed.md#bfloat16).
    """

    task: str | None = None
    pretraining_script: str | None = None
    needs_error_maps: bool = False
    context_fusion: bool = False
    flag_arguments: tuple[str, ...] = ()
    fully_convolutional: bool = True
    # False: compute_loss is the method's own and ignores the compiled loss (--loss, --pos_weight)
    uses_compiled_loss: bool = True
    argument_sources: tuple[type, ...] = ()
    bfloat16_pays: bool = False

    @classmethod
    def constructor_arguments(cls) -> list[str]:
        """Every argument the constructor takes (``--model_config`` keys), those of
        ``argument_sources`` included."""
        params = inspect.signature(cls.__init__).parameters
        names = {n for n, p in params.items() if n != "self" and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        for source in cls.argument_sources:
            names |= set(source.constructor_arguments())
        return sorted(names)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 16

    def __call__(self, inputs, *args, **kwargs):
        # an input off the size multiple fails deep inside (a concatenation of skips one pixel
        # apart): said here, with the way out, for segmentation inputs of known size
        image = inputs.get("image") if isinstance(inputs, dict) else inputs
        shape = tuple(getattr(image, "shape", ()))
        if (self.pretraining_script is None and len(shape) == 4
                and all(isinstance(n, int) for n in shape[1:3])):
            m = self.size_multiple
            if shape[1] % m or shape[2] % m:
                raise ValueError(
                    f"{type(self).__name__}: an input of {shape[1]}x{shape[2]} px "
                    f"(height x width); both must be multiples of its size_multiple, {m}: pad "
                    "it (retina_tf.data.patches.pad_to_multiple) or segment with "
                    "retina_tf.inference.Segmenter, which pads")
        return super().__call__(inputs, *args, **kwargs)

    def with_scales(self, scales: Sequence[float]) -> SegmentationModel:
        """This model inferring at ``scales`` (multi-scale models, e.g. HMSA)."""
        raise ConfigError(f"{type(self).__name__} has no inference scales: drop scales "
                          f"{list(scales)} (--eval_scales)")

    def training_extras(self, targets: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """Per-pixel targets the model derives from the labels (RIP-AV's distance maps),
        appended to ``y``; None when there are none."""
        return None

    def freezable_encoder(self) -> keras.layers.Layer | None:
        """The pre-trained part ``--freeze_encoder_epochs`` keeps frozen; None: none."""
        return getattr(self, "encoder", None)

    def load_pretrained(self, source: keras.Model) -> None:
        """Initializes this model from a trained one (``--pretrained``): by default all weights,
        when ``source`` has the same class and weight shapes. Two-stage and pre-trained models
        override it (EAR-Net from HMSA, ViT-Seg from MAE, RIP-AV from the RIP classifier)."""
        mine, theirs = self.get_weights(), source.get_weights()
        if type(source) is not type(self) or [w.shape for w in mine] != [
                w.shape for w in theirs]:
            raise ConfigError(f"--pretrained: its {type(source).__name__} does not match this "
                              f"{type(self).__name__} ({_differences(source, self)})")
        self.set_weights(theirs)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SegmentationModel:
        return cls(**config)


def channels_hint(theirs: int, mine: int) -> str:
    """The words for a pre-training run whose encoder took ``theirs`` input channels where this
    model takes ``mine``: they come from ``--preprocess``, not ``--model_config``."""
    if theirs == mine:
        return ""
    return (f", and --preprocess giving its {theirs} input channel(s) (this one has {mine}: "
            "grayscale gives 1, colour 3, e.g. --preprocess=standardize,clahe,gamma)")


def _differences(source: keras.Model, model: keras.Model) -> str:
    """What a --pretrained model has that ``model`` has not, in words: the constructor
    arguments that differ (input_channels from --preprocess, num_classes from --task, the rest
    from --model_config), else "architecture or size differs"."""
    if type(source) is not type(model):
        return "another architecture: give --model as the run's"
    theirs, mine = source.get_config(), model.get_config()
    names = {"input_channels": "input channels (--preprocess)",
             "num_classes": "classes (--task)"}
    differ = [f"{names.get(k, k)} {theirs[k]!r}, not {mine.get(k)!r}" for k in sorted(theirs)
              if k not in ("name", "trainable", "dtype") and theirs[k] != mine.get(k)]
    return "its " + "; ".join(differ) if differ else "architecture or size differs"
