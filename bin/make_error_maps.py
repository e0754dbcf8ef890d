"""EAR-Net stage 1 -> stage 2: write the error maps of a trained hmsa run on its training images.

python bin/make_error_maps.py --flagfile=configs/drive_hmsa.cfg
    (writes logs/hmsa_drive/error_maps/<image>.png; then
     python bin/train.py --flagfile=configs/drive_earnet.cfg)"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.make_error_maps()
