"""Model registry: ``build_model(name, **config)`` and ``model_names()``.

Adding an architecture is one file in this package and one line in ``_REGISTRY``; from
outside the package, :func:`register_model` (docs/adding_a_model.md).
"""

from __future__ import annotations

import importlib
import json

import keras

from retina_tf.errors import ConfigError
from retina_tf.models.base import SegmentationModel

# name -> "module:Class" (imported lazily so that building a U-Net does not import every model),
# or the class itself for one registered from outside the package
_REGISTRY: dict[str, str | type] = {
    "unet": "retina_tf.models.unet:UNet",
    "ddrnet": "retina_tf.models.ddrnet:DDRNet",
    "hrnet_ocr": "retina_tf.models.hrnet_ocr:HRNetOCR",
    "hmsa": "retina_tf.models.hmsa:HMSA",
    "ear_net": "retina_tf.models.ear_net:EARNet",
    "mae": "retina_tf.models.vit_mae:MAE",
    "vit_seg": "retina_tf.models.vit_mae:ViTSeg",
    "rip_classifier": "retina_tf.models.rip_av:RIPClassifier",
    "rip_av": "retina_tf.models.rip_av:RIPAV",
}


def model_names() -> list[str]:
    """The registered architectures, the values of ``--model`` / ``TrainConfig.model``."""
    return sorted(_REGISTRY)


def model_class(name: str) -> type:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r} (--model): choose one of "
                          f"{', '.join(model_names())}")
    entry = _REGISTRY[name]
    if isinstance(entry, type):
        return entry
    module, cls = entry.split(":")
    return getattr(importlib.import_module(module), cls)


def register_model(name: str, cls: type) -> None:
    """Adds an architecture defined outside the package (your own module, a notebook) under
    ``name``: ``TrainConfig(model=name)``, :func:`build_model` and loading its runs then work
    in this process, as for the built-in ones. ``cls`` follows the contract of
    :class:`~retina_tf.models.base.SegmentationModel` and is registered with Keras
    (``@keras.saving.register_keras_serializable``); the commands in ``bin/`` know only the
    package's models.

    Raises:
        ConfigError: for a class that is no ``SegmentationModel`` Keras model, or a name taken
            by another model.
    """
    if not (isinstance(cls, type) and issubclass(cls, SegmentationModel)
            and issubclass(cls, keras.Model)):
        raise ConfigError(f"register_model({name!r}, {cls!r}): give a class of both "
                          "SegmentationModel and keras.Model (class MyNet(SegmentationModel, "
                          "keras.Model))")
    if name in _REGISTRY and model_class(name) is not cls:
        raise ConfigError(f"register_model: {name!r} is the name of another model "
                          f"({model_class(name).__name__}); choose another")
    _REGISTRY[name] = cls


# Keras's own constructor arguments, taken by every model besides its listed ones.
_KERAS_ARGUMENTS = {"name", "dtype", "trainable"}


def model_arguments(name: str) -> list[str]:
    """The constructor arguments of a registered model (``--model_config`` keys)."""
    return model_class(name).constructor_arguments()


def check_arguments(name: str, config) -> None:
    """Raises ConfigError for an argument model ``name`` does not take (naming it and the ones
    it does)."""
    unknown = sorted(set(config) - set(model_arguments(name)) - _KERAS_ARGUMENTS - {"preset"})
    if unknown:
        raise ConfigError(f"model {name!r} does not take {', '.join(unknown)} (--model_config); "
                          f"it takes {', '.join(model_arguments(name))}")


def build_model(name: str, **config) -> keras.Model:
    """Builds a registered model; ``config`` are its constructor arguments (ViT models also
    take ``"preset"``, e.g. ``{"preset": "cpu_small"}``).

    Raises:
        ConfigError: for an argument the model does not take (naming it and the ones it does)
            or a value it refuses (its own checks: ``depth must be >= 2``).
    """
    cls = model_class(name)
    check_arguments(name, config)
    if "preset" in config:
        if not hasattr(cls, "from_preset_config"):
            raise ConfigError(f"model {name!r} has no presets: drop \"preset\" from "
                              "--model_config")
        config = cls.from_preset_config(config)
    try:
        return cls(**config)
    except (ValueError, TypeError) as err:  # the constructor's checks of its arguments
        raise ConfigError(f"model {name!r}: {err} (--model_config "
                          f"{json.dumps(dict(config), default=str)})") from err


def load_all() -> None:
    """Imports every registered model so ``keras.saving`` can deserialize any of them."""
    for name in _REGISTRY:
        model_class(name)
