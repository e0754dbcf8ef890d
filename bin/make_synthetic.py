"""Write a synthetic fundus dataset in the DRIVE layout (plus RITE-style A/V labels):
python bin/make_synthetic.py --out_dir=data/synthetic --num_images=20
"""

import _bootstrap  # noqa: F401  (repo root on sys.path)
from absl import flags

from retina_tf.errors import ConfigError
from retina_tf.flags import run_app

flags.DEFINE_string("out_dir", None, "Dataset root to write (training/ and test/ go under it).")
flags.DEFINE_integer("num_images", 20, "Total number of images, test and training together.")
flags.DEFINE_integer("num_test", None, "Number of test images (default: half of --num_images).")
flags.DEFINE_integer("seed", 0, "Base seed; image i uses a seed derived from (seed, i).")
flags.DEFINE_integer("height", 584, "Image height in pixels (DRIVE: 584).")
flags.DEFINE_integer("width", 565, "Image width in pixels (DRIVE: 565).")
flags.mark_flag_as_required("out_dir")
FLAGS = flags.FLAGS


def main(argv):
    from retina_tf.data.synthetic import write_synthetic_dataset

    try:
        root = write_synthetic_dataset(FLAGS.out_dir, num_images=FLAGS.num_images,
                                       seed=FLAGS.seed, size=(FLAGS.height, FLAGS.width),
                                       num_test=FLAGS.num_test)
    except ValueError as err:  # bad counts or size: a usage problem, not a crash
        raise ConfigError(f"{err}: check --num_images, --num_test, --height and --width") from err
    for split in ("test", "training"):
        images = sorted((root / split / "images").glob("*.tif"))
        if images:
            names = images[0].name if len(images) == 1 else f"{images[0].name}..{images[-1].name}"
            print(f"{root / split}: {len(images)} images ({names}) with labels in "
                  "1st_manual/, FOV masks in mask/, A/V labels in av/")
    print(f"wrote a synthetic DRIVE-layout dataset of {FLAGS.num_images} "
          f"{FLAGS.height}x{FLAGS.width} images (seed {FLAGS.seed}) to {root}")


if __name__ == "__main__":
    run_app(main)
