"""retina_tf: retinal fundus vessel and artery/vein segmentation with Keras 3.

Importing the package registers every retina_tf model, layer, loss, metric and learning-rate
schedule with Keras, so ``keras.saving.load_model("<run>/model.keras")`` works with nothing else
imported.

Example:
    >>> import retina_tf
    >>> "unet" in retina_tf.model_names() and "unet_drive" in retina_tf.shipped_models()
    True
"""

__version__ = "0.1.0"

from retina_tf import _startup

_startup.quiet_start_for_commands()  # before anything imports TensorFlow

# the loss and metrics register themselves; retina_tf.compare.compare runs bin/compare.py
from retina_tf import compare, losses, metrics  # noqa: F401
from retina_tf.config import (
    CompareConfig,
    DataConfig,
    ErrorMapConfig,
    EvalConfig,
    ExportConfig,
    InferenceConfig,
    MAEConfig,
    PredictConfig,
    RipPatchConfig,
    RipPretrainConfig,
    TrainConfig,
)
from retina_tf.errors import (
    ConfigError,
    DatasetError,
    ModelFileError,
    OutputError,
    RetinaTFError,
    TrainingDiverged,
)
from retina_tf.evaluation import evaluate, predict, write_error_maps
from retina_tf.export import export_model
from retina_tf.inference import Segmenter, load_keras_model, shipped_models
from retina_tf.models import build_model, load_all, model_names
from retina_tf.pretraining import pretrain_mae, pretrain_rip
from retina_tf.training import WarmupDecay, train

load_all()
_startup.loaded()

__all__ = ["CompareConfig", "ConfigError", "DataConfig", "DatasetError", "ErrorMapConfig",
           "EvalConfig", "ExportConfig", "InferenceConfig", "MAEConfig", "ModelFileError",
           "OutputError", "PredictConfig", "RetinaTFError", "RipPatchConfig", "RipPretrainConfig",
           "Segmenter", "TrainConfig", "TrainingDiverged", "WarmupDecay", "build_model",
           "evaluate", "export_model", "load_keras_model", "model_names", "predict",
           "pretrain_mae", "pretrain_rip", "shipped_models", "train", "write_error_maps"]
