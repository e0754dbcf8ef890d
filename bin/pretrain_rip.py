"""RIP-AV representative-instance pre-training of the A/V encoder:
python bin/generate_rip_patches.py --flagfile=configs/rite_rip_pretrain.cfg
python bin/pretrain_rip.py --flagfile=configs/rite_rip_pretrain.cfg
then fine-tune: python bin/train.py --flagfile=configs/rite_ripav.cfg"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.pretrain_rip()
