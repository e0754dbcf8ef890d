"""Train a segmentation model: python bin/train.py --flagfile=configs/drive_unet.cfg"""

import _bootstrap  # noqa: F401  (repo root on sys.path)

from retina_tf.flags import run_script

if __name__ == "__main__":
    run_script("retina_tf.training:train")
