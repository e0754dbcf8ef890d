"""Copy a trained run into a small inference-only folder (no optimizer state):
python bin/export_model.py --run_dir=logs/unet_drive --out_dir=retina_tf/pretrained/unet_drive"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.export_model()
