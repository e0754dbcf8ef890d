"""Segment your own fundus photographs:
python bin/predict.py --model=unet_drive --input=photos/ --output_dir=out/
"""

import _bootstrap  # noqa: F401  (repo root on sys.path)

from retina_tf.flags import run_script

if __name__ == "__main__":
    run_script("retina_tf.evaluation:predict")
