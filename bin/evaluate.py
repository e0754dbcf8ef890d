"""Evaluate a trained model on a test split:
python bin/evaluate.py --flagfile=configs/drive_unet.cfg --visualize
python bin/evaluate.py --model=unet_drive --dataset=drive --data_dir=data/DRIVE --visualize
"""

import _bootstrap  # noqa: F401
from absl import app

from retina_tf import flags as rflags

rflags.define_train_flags()
rflags.define_predict_flags()
FLAGS = rflags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from retina_tf.evaluation import evaluate
    evaluate(FLAGS)


if __name__ == "__main__":
    app.run(main)
