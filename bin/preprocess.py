"""Write seed-style label files (training.txt, test.txt) for a dataset, and optionally a
preprocessed-image cache: python bin/preprocess.py --data_dir=data/DRIVE (DRIVE and CHASE_DB1
are told by their layout; --dataset for the others, --out_dir for another folder)"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.preprocess()
