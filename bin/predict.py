"""Segment your own fundus photographs:
python bin/predict.py --model=unet_drive --input=photos/ --output_dir=out/"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.predict()
