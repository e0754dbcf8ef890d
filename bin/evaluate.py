"""Evaluate a trained model on a test split:
python bin/evaluate.py --flagfile=configs/drive_unet.cfg --visualize
python bin/evaluate.py --model=unet_drive --dataset=drive --data_dir=data/DRIVE --visualize
"""

import _bootstrap  # noqa: F401  (repo root on sys.path)

from retina_tf.flags import run_script

if __name__ == "__main__":
    run_script("retina_tf.evaluation:evaluate")
