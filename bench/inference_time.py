"""Whole-image inference time for DRIVE test images, preprocessing included, against
sliding-window inference of the same model, and in bfloat16 against float32.

    .venv/bin/python bench/inference_time.py --model=unet_drive --data_dir=data/DRIVE
    .venv/bin/python bench/inference_time.py --model=unet_drive --data_dir=data/DRIVE \
        --precisions=float32,bfloat16 --rounds=5 --unfolded

The settings are timed in alternation, ``--rounds`` times over the images; the median and the
minimum over all are printed, and before them the median time of ``Segmenter.from_run`` in each
precision (three loads after a first one: the run folder read and the model built). For
whole-image inference also the network's operations per image and the speed end to end set
against this CPU's TensorFlow matmul peak in the same precision (bench/matmul_peak.py): how near
a time is to what the machine can do.
"""

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_string("model", "unet_drive", "Run folder or shipped model name.")
flags.DEFINE_string("data_dir", None, "DRIVE folder (default: synthetic DRIVE-sized images).")
flags.DEFINE_integer("images", 5, "Images to time.")
flags.DEFINE_integer("stride", 0, "Also time sliding-window inference with this stride (0 = no).")
flags.DEFINE_list("precisions", ["float32"], "Precisions to time (float32, bfloat16).")
flags.DEFINE_integer("rounds", 1, "Rounds over the images, the settings alternating.")
flags.DEFINE_boolean("unfolded", False, "Also time bfloat16 with the batch norms left as layers "
                     "(not folded into the convolutions, as before 2026-12-05).")
FLAGS = flags.FLAGS


def main(_):
    import numpy as np

    from bench.matmul_peak import forward_flops, matmul_gflops, over_peak_note
    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_image
    from retina_tf.data.patches import pad_to_multiple
    from retina_tf.data.synthetic import write_synthetic_dataset
    from retina_tf.inference import Segmenter

    if FLAGS.data_dir:
        files = [s.image for s in list_samples("drive", FLAGS.data_dir, "test")]
    else:
        root = write_synthetic_dataset(tempfile.mkdtemp(), FLAGS.images, seed=0,
                                       num_test=FLAGS.images)
        files = [s.image for s in list_samples("synthetic", root, "test")]
    images = [read_image(f) for f in files[:FLAGS.images]]
    if not FLAGS.data_dir:
        shutil.rmtree(root)  # the images are in memory now
    modes = [("whole", {})]
    if FLAGS.stride:
        modes.append(("sliding", {"stride": FLAGS.stride}))
    Segmenter.from_run(FLAGS.model)  # the first load starts TensorFlow
    for p in FLAGS.precisions:
        loads = []
        for _ in range(3):
            start = time.perf_counter()
            Segmenter.from_run(FLAGS.model, precision=p)
            loads.append(time.perf_counter() - start)
        print(f"Segmenter.from_run({FLAGS.model!r}, precision={p!r}): median "
              f"{np.median(loads):.3f} s")
    settings = {(mode, p): Segmenter.from_run(FLAGS.model, inference=mode, precision=p, tta=False,
                                                av_vote=False, **extra)
                for mode, extra in modes for p in FLAGS.precisions}
    if FLAGS.unfolded:
        for mode, extra in modes:
            seg = Segmenter.from_run(FLAGS.model, inference=mode, precision="bfloat16",
                                     tta=False, av_vote=False, **extra)
            seg.network = seg.model  # read when the forward pass is first traced
            settings[(mode, "bfloat16, batch norms unfolded")] = seg
    times = {key: [] for key in settings}
    for seg in settings.values():
        seg.probability(images[0])  # trace once
    for _ in range(FLAGS.rounds):
        for key, seg in settings.items():
            for image in images:
                start = time.perf_counter()
                seg.probability(image)
                times[key].append(time.perf_counter() - start)
    seg = next(iter(settings.values()))
    height, width = pad_to_multiple(images[0], seg.size_multiple).shape[:2]
    gflop = forward_flops(seg.model, height, width) / 1e9
    peaks = {p: matmul_gflops(dtype=p) for p in {seg.precision for seg in settings.values()}}
    for (mode, precision), seg in settings.items():
        t = times[(mode, precision)]
        print(f"{FLAGS.model} ({seg.model.count_params() / 1e6:.2f} M parameters), {mode}"
              f"{' stride ' + str(FLAGS.stride) if mode == 'sliding' else ''}, {precision}: "
              f"median {np.median(t):.3f} s per {images[0].shape[1]}x{images[0].shape[0]} image "
              f"(min {np.min(t):.3f}, preprocessing included, {os.cpu_count()} cores)")
        dtype = seg.precision
        if mode == "whole":
            rate = gflop / np.median(t)
            print(f"  {gflop:.1f} GFLOP per image ({width}x{height} padded): {rate:.0f} GFLOP/s "
                  f"end to end, {rate / peaks[dtype]:.0%} of this CPU's {dtype} matmul "
                  f"peak ({peaks[dtype]:.0f} GFLOP/s)")
            if note := over_peak_note([rate / peaks[dtype]]):
                print("  " + note)

if __name__ == "__main__":
    run_reported(main)
