"""Copy a trained run into a small inference-only folder (no optimizer state):
python bin/export_model.py --run_dir=logs/unet_drive --out_dir=retina_tf/pretrained/unet_drive
"""

import _bootstrap  # noqa: F401
from absl import flags

from retina_tf.flags import run_app

flags.DEFINE_string("run_dir", None, "Run folder to export.", required=True)
flags.DEFINE_string("out_dir", None, "Destination folder.", required=True)
FLAGS = flags.FLAGS


def main(argv):
    from retina_tf.inference import export_run
    out = export_run(FLAGS.run_dir, FLAGS.out_dir)
    print(f"exported {FLAGS.run_dir} -> {out}")


if __name__ == "__main__":
    run_app(main)
