"""Compare runs on one labelled split (a metric table and one image side by side):
python bin/compare.py --runs=unet_drive,logs/unet_drive --dataset=drive --data_dir=data/DRIVE \
    --output_dir=compare_drive
python bin/compare.py --runs=a,b --dataset=drive --data_dir=data/DRIVE --image=03_test \
    --output_dir=out"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.compare()
