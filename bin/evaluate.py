"""Evaluate a trained model on a test split:
python bin/evaluate.py --flagfile=configs/drive_unet.cfg --visualize
python bin/evaluate.py --model=unet_drive --dataset=drive --data_dir=data/DRIVE --visualize"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.evaluate()
