"""Masked-autoencoder pre-training of a ViT encoder on unlabelled fundus images:
python bin/pretrain_mae.py --flagfile=configs/drive_mae_pretrain.cfg
then fine-tune: python bin/train.py --flagfile=configs/drive_vit_seg.cfg"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.pretrain_mae()
