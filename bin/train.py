"""Train a segmentation model: python bin/train.py --flagfile=configs/drive_unet.cfg"""

import _bootstrap  # noqa: F401  (repo root on sys.path)
from absl import app

from retina_tf import flags as rflags

rflags.define_train_flags()
rflags.define_predict_flags()
FLAGS = rflags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from retina_tf.training import train
    train(FLAGS)


if __name__ == "__main__":
    app.run(main)
