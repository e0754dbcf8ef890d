"""Is the model, not tf.data, the bottleneck? Patches/s of the input pipeline alone versus the
training step of a U-Net, and training throughput in pixels/s.

    .venv/bin/python bench/pipeline_throughput.py --data_dir=data/DRIVE
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("data_dir", None, "DRIVE folder (default: a synthetic DRIVE-sized set).")
flags.DEFINE_integer("patch_size", 48, "Patch size.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("base_filters", 16, "U-Net width (16: 0.45 M parameters).")
flags.DEFINE_integer("batches", 40, "Batches to time.")
FLAGS = flags.FLAGS


def main(_):
    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.data.pipeline import Augment, build_set, patch_dataset
    from retina_tf.data.preprocess import Preprocessor
    from retina_tf.data.synthetic import write_synthetic_dataset
    from retina_tf.losses import SegmentationLoss
    from retina_tf.models import build_model

    if FLAGS.data_dir:
        dataset, data_dir = "drive", FLAGS.data_dir
    else:
        dataset, data_dir = "synthetic", write_synthetic_dataset(tempfile.mkdtemp(), 20, seed=0)
    datas = [read_sample(s) for s in list_samples(dataset, data_dir, "training")]
    pre = Preprocessor().fit(d.image for d in datas)
    seg = build_set(datas, pre)
    aug = Augment(rotate_degrees=15, brightness=0.1, contrast=0.1, gamma=0.1)
    ds = patch_dataset(seg, FLAGS.patch_size, FLAGS.batch_size, 0.5, aug, seed=0)

    it = iter(ds)
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(it)
    pipe = FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)

    model = build_model("unet", base_filters=FLAGS.base_filters)
    model.compile(optimizer="adam", loss=SegmentationLoss("bce_dice"))
    model.fit(ds, steps_per_epoch=5, epochs=1, verbose=0, shuffle=False)  # trace, warm up
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=FLAGS.batches, epochs=1, verbose=0, shuffle=False)
    train = FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)

    px = FLAGS.patch_size ** 2
    print(f"data: {dataset} ({len(seg)} images), patches {FLAGS.patch_size}x{FLAGS.patch_size}, "
          f"batch {FLAGS.batch_size}, augmentation on, {os.cpu_count()} CPU cores")
    print(f"pipeline alone      : {pipe:8.0f} patches/s ({pipe * px / 1e6:.2f} Mpixel/s)")
    print(f"U-Net training step : {train:8.0f} patches/s ({train * px / 1e6:.2f} Mpixel/s), "
          f"{model.count_params() / 1e6:.2f} M parameters")
    print(f"pipeline headroom   : {pipe / train:.1f}x faster than training consumes")


if __name__ == "__main__":
    app.run(main)
