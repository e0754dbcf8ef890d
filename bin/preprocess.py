"""Write seed-style label files (and optionally a preprocessed-image cache) for a dataset:
python bin/preprocess.py --dataset=drive --data_dir=data/DRIVE --out_dir=data/drive_prep"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.preprocess()
