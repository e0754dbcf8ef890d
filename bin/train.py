"""Train a segmentation model: python bin/train.py --flagfile=configs/drive_unet.cfg"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.train()
