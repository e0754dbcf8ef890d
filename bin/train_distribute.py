"""Train under MirroredStrategy (WILeroy/retina_unet's train_distribute.py), with the flags of
bin/train.py: python bin/train_distribute.py --flagfile=configs/drive_unet.cfg --batch_size=64"""

import _bootstrap  # noqa: F401  (repo root on sys.path; quiet TensorFlow start)

from retina_tf import cli

if __name__ == "__main__":
    cli.train_distribute()
