"""Segment your own fundus photographs:
python bin/predict.py --model=unet_drive --input=photos/ --output_dir=out/
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
    from retina_tf.evaluation import predict
    predict(FLAGS)


if __name__ == "__main__":
    app.run(main)
