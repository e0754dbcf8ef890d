"""RIP-AV pre-training data: representative-instance patches from the training split of an A/V
dataset (rite, les_av, hrf_av, synthetic); the test split is never read.

python bin/generate_rip_patches.py --dataset=rite --data_dir=data/RITE --rip_patches=data/rip_rite
    (writes patches.csv, patches.npz and preview.png in --rip_patches; --rip_sizes=48,96,144,
     --rip_out_size=96, --rip_per_class=400, --rip_min_fraction=0.02, --rip_absent_fraction=0,
     --seed=0)"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.generate_rip_patches()
