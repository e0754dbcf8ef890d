"""Write seed-style label files (and optionally a preprocessed-image cache) for a dataset:
python bin/preprocess.py --dataset=drive --data_dir=data/DRIVE --out_dir=data/drive_prep
"""

import _bootstrap  # noqa: F401
from absl import flags

from retina_tf import flags as rflags
from retina_tf.errors import ConfigError

rflags.define_train_flags()
rflags.define_predict_flags()
flags.DEFINE_string("out_dir", None, "Where training.txt, test.txt, fov/ and previews go.")
flags.DEFINE_integer("previews", 2, "Preprocessed training images to save as PNG previews.")
FLAGS = rflags.FLAGS


def main(argv):
    missing = [f"--{name}" for name in ("dataset", "data_dir", "out_dir") if not FLAGS[name].value]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          "required: bin/preprocess.py writes the label files of a dataset in "
                          "its official layout (e.g. --dataset=drive --data_dir=data/DRIVE "
                          "--out_dir=data/drive_labels)")
    from pathlib import Path

    import numpy as np

    from retina_tf.data.io import read_image
    from retina_tf.data.labelfile import export_label_files, read_label_file
    from retina_tf.data.pipeline import preprocess_cached
    from retina_tf.data.preprocess import Preprocessor
    from retina_tf.visualize import save_png

    out = Path(FLAGS.out_dir)
    files = export_label_files(FLAGS.dataset, FLAGS.data_dir, out)
    for split, path in files.items():
        print(f"{split}: {path} ({len(read_label_file(path))} samples)")
    train = read_label_file(files["training"])
    pre = Preprocessor.from_steps(FLAGS.preprocess, channel=FLAGS.channel)
    images = [read_image(s.image) for s in train]
    if pre.standardize:
        pre.fit(images)
    pre.save(out / "preprocessor.json")
    print(f"preprocessing {pre.steps} fitted on {len(train)} training images: "
          f"mean {pre.mean}, std {pre.std} -> {out / 'preprocessor.json'}")
    for sample, image in list(zip(train, images))[:FLAGS.previews]:
        x = pre(image)
        x = x[..., 0] if x.shape[-1] == 1 else x
        save_png(out / "preview" / f"{sample.name}.png", (x * 255).round().astype(np.uint8))
    if FLAGS.cache_dir:
        for path in files.values():
            for sample in read_label_file(path):
                preprocess_cached(sample, read_image(sample.image), pre, FLAGS.cache_dir)
        print(f"cached preprocessed images in {FLAGS.cache_dir}")


if __name__ == "__main__":
    rflags.run_app(main)
