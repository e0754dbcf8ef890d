"""Whole-image inference time for DRIVE test images, preprocessing included, against
sliding-window inference of the same model.

    .venv/bin/python bench/inference_time.py --model=unet_drive --data_dir=data/DRIVE
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("model", "unet_drive", "Run folder or shipped model name.")
flags.DEFINE_string("data_dir", None, "DRIVE folder (default: synthetic DRIVE-sized images).")
flags.DEFINE_integer("images", 5, "Images to time.")
flags.DEFINE_integer("stride", 0, "Also time sliding-window inference with this stride (0 = no).")
FLAGS = flags.FLAGS


def main(_):
    import numpy as np

    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_image
    from retina_tf.data.synthetic import write_synthetic_dataset
    from retina_tf.inference import Segmenter

    if FLAGS.data_dir:
        files = [s.image for s in list_samples("drive", FLAGS.data_dir, "test")]
    else:
        root = write_synthetic_dataset(tempfile.mkdtemp(), FLAGS.images, seed=0,
                                       num_test=FLAGS.images)
        files = [s.image for s in list_samples("synthetic", root, "test")]
    images = [read_image(f) for f in files[:FLAGS.images]]
    modes = [("whole", {})]
    if FLAGS.stride:
        modes.append(("sliding", {"stride": FLAGS.stride}))
    for mode, extra in modes:
        seg = Segmenter.from_run(FLAGS.model, inference=mode, **extra)
        seg.probability(images[0])  # trace once
        times = []
        for image in images:
            start = time.perf_counter()
            seg.probability(image)
            times.append(time.perf_counter() - start)
        params = seg.model.count_params()
        print(f"{FLAGS.model} ({params / 1e6:.2f} M parameters), {mode}"
              f"{' stride ' + str(FLAGS.stride) if mode == 'sliding' else ''}: "
              f"{np.mean(times):.3f} s per {images[0].shape[1]}x{images[0].shape[0]} image "
              f"(min {np.min(times):.3f}, preprocessing included, {os.cpu_count()} cores)")


if __name__ == "__main__":
    app.run(main)
