"""Write a synthetic fundus dataset in the DRIVE layout (plus RITE-style A/V labels):
python bin/make_synthetic.py --out_dir=data/synthetic --num_images=20"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.make_synthetic()
