"""Export a trained run for serving: an inference-only Keras copy of the run folder (the
default; how the shipped models are made), a TensorFlow SavedModel that takes a raw photograph,
or the network alone as ONNX or TFLite (docs/deploy.md):
python bin/export_model.py --run=logs/unet_drive --out=retina_tf/pretrained/unet_drive
python bin/export_model.py --run=unet_drive --format=saved_model --out=exports/unet_drive/1"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.export_model()
