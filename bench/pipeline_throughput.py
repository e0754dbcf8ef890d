"""Is the model, not tf.data, the bottleneck? Patches/s of the input pipeline alone versus the
training step of a U-Net, the training's GFLOP/s against the machine's matmul peak, over several
runs (each a fresh process, as a user's training is).

    .venv/bin/python bench/pipeline_throughput.py --data_dir=data/DRIVE --runs=5
    .venv/bin/python bench/pipeline_throughput.py --data_dir=data/DRIVE --runs=5 \
        --base_filters=32 --patch_size=96 --batch_size=8        # the DRIVE recipe's shape
    .venv/bin/python bench/pipeline_throughput.py --data_dir=data/DRIVE --runs=5 --keras_batch_norm
    .venv/bin/python bench/pipeline_throughput.py --data_dir=data/DRIVE --runs=5 --keras_adam

Each run measures the TensorFlow matmul peak (bench/matmul_peak.py; in bfloat16 with
--mixed_precision, float32 otherwise) in its own process just before it trains, so a slow run
on a slow machine shows as the same share of a lower peak.
Training FLOPs are 3x the forward pass's (backward: gradients of inputs and of weights).
"first fit" is the warm-up `fit` of 5 steps (the training step traced and optimized, then
run); "cores busy" is the process's CPU time over the wall time while it trains; "steps" the
time of the timed steps after the first; "end wait" the time from the last step's end to
`fit`'s return.
retina_tf's datasets run without tf.data's autotuning; `--tf_data_autotune` turns it back on to
show the wait it caused at the end of `fit` (docs/results/speed.md, "two speeds"), and
`--keras_batch_norm` times Keras's own batch normalization step in place of the fused kernel
(retina_tf.models.blocks.BatchNormalization), and `--keras_adam` Keras's Adam in place of
retina_tf.optimizers.Adam (one fused kernel per variable).
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_string("data_dir", None, "DRIVE folder (default: a synthetic DRIVE-sized set).")
flags.DEFINE_integer("patch_size", 48, "Patch size.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("base_filters", 16, "U-Net width (16: 0.45 M parameters).")
flags.DEFINE_integer("batches", 40, "Batches to time.")
flags.DEFINE_integer("runs", 5, "Runs, each in a fresh process; median and spread are printed.")
flags.DEFINE_boolean("tf_data_autotune", False,
                     "Turn tf.data's autotuning back on (tf.data's default; off in retina_tf).")
flags.DEFINE_boolean("mixed_precision", False,
                     "Train as train.py --mixed_precision does (bfloat16 compute on a CPU).")
flags.DEFINE_boolean("keras_batch_norm", False,
                     "Train with Keras's own batch normalization step instead of TensorFlow's "
                     "fused kernel (retina_tf before 2026-12-05).")
flags.DEFINE_boolean("keras_adam", False,
                     "Keras's Adam in place of retina_tf.optimizers.Adam (its fused kernel).")
flags.DEFINE_boolean("one_run", False, "Internal: one run, printed as a JSON line.")
FLAGS = flags.FLAGS


def one_run() -> dict:
    import keras
    import tensorflow as tf

    from bench.matmul_peak import forward_flops, matmul_gflops
    from retina_tf import optimizers
    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.data.pipeline import Augment, build_set, patch_dataset
    from retina_tf.data.preprocess import Preprocessor
    from retina_tf.data.synthetic import write_synthetic_dataset
    from retina_tf.losses import SegmentationLoss
    from retina_tf.models import build_model
    from retina_tf.training import compute_precision

    peak = matmul_gflops(dtype="bfloat16" if FLAGS.mixed_precision else "float32")
    if FLAGS.data_dir:
        dataset, data_dir = "drive", FLAGS.data_dir
    else:
        dataset, data_dir = "synthetic", write_synthetic_dataset(tempfile.mkdtemp(), 20, seed=0)
    datas = [read_sample(s) for s in list_samples(dataset, data_dir, "training")]
    pre = Preprocessor().fit(d.image for d in datas)
    seg = build_set(datas, pre)
    aug = Augment(rotate_degrees=15, brightness=0.1, contrast=0.1, gamma=0.1)
    ds = patch_dataset(seg, FLAGS.patch_size, FLAGS.batch_size, 0.5, aug, seed=0)
    if FLAGS.tf_data_autotune:
        options = tf.data.Options()
        options.autotune.enabled = True
        ds = ds.with_options(options)

    it = iter(ds)
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(it)
    pipe = FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)

    if FLAGS.keras_batch_norm:
        from retina_tf.models import blocks
        blocks.BatchNormalization.call = keras.layers.BatchNormalization.call
    with compute_precision(FLAGS.mixed_precision):
        model = build_model("unet", base_filters=FLAGS.base_filters)
    model.compile(optimizer=keras.optimizers.Adam() if FLAGS.keras_adam else optimizers.Adam(),
                  loss=SegmentationLoss("bce_dice"))
    first = time.perf_counter()
    model.fit(ds, steps_per_epoch=5, epochs=1, verbose=0, shuffle=False)  # trace, warm up
    first = time.perf_counter() - first
    ends = []
    timer = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    cpu, start = _cpu_seconds(), time.perf_counter()
    model.fit(ds, steps_per_epoch=FLAGS.batches, epochs=1, verbose=0, shuffle=False,
              callbacks=[timer])
    end = time.perf_counter()
    wall = end - start
    train, cores_busy = FLAGS.batches * FLAGS.batch_size / wall, (_cpu_seconds() - cpu) / wall
    gflops = train * 3 * forward_flops(model, FLAGS.patch_size) / 1e9
    return {"dataset": f"{dataset} ({len(seg)} images)", "pipeline": pipe, "train": train,
            "gflops": gflops, "peak": peak, "params": model.count_params(),
            "cores_busy": cores_busy, "first_fit": first, "steps": ends[-1] - ends[0],
            "end_wait": end - ends[-1]}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(_):
    if FLAGS.one_run:
        print(json.dumps(one_run()))
        return
    from bench.matmul_peak import over_peak_note, vector_extensions

    args = [sys.executable, os.path.abspath(__file__), "--one_run"] + [
        f"--{name}={getattr(FLAGS, name)}" for name in
        ("patch_size", "batch_size", "base_filters", "batches", "tf_data_autotune",
         "mixed_precision", "keras_batch_norm", "keras_adam")] + (
        [f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else [])
    print(f"U-Net base {FLAGS.base_filters}, patches {FLAGS.patch_size}x{FLAGS.patch_size}, "
          f"batch {FLAGS.batch_size}, augmentation on; {os.cpu_count()} CPU cores, "
          f"{vector_extensions()}")
    print("run  pipeline patches/s  training patches/s  training GFLOP/s  matmul peak  share"
          "  first fit (s)  cores busy  steps (s)  end wait (s)")
    runs = []
    for i in range(FLAGS.runs):
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode:  # the run's own message (a missing folder, a bad flag)
            raise SystemExit(f"run {i + 1} failed:\n{proc.stderr.strip()[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(r)
        print(f"{i + 1:3d}  {r['pipeline']:18.0f}  {r['train']:18.0f}  {r['gflops']:16.0f}  "
              f"{r['peak']:11.0f}  {r['gflops'] / r['peak']:5.0%}  {r['first_fit']:13.2f}  "
              f"{r['cores_busy']:10.2f}  "
              f"{r['steps']:9.2f}  {r['end_wait']:12.2f}", flush=True)
    train = [r["train"] for r in runs]
    share = [r["gflops"] / r["peak"] for r in runs]
    print(f"data {runs[0]['dataset']}, {runs[0]['params'] / 1e6:.2f} M parameters")
    print(f"training patches/s: median {statistics.median(train):.0f}, "
          f"min {min(train):.0f}, max {max(train):.0f}; share of the matmul peak: median "
          f"{statistics.median(share):.0%}, min {min(share):.0%}, max {max(share):.0%}")
    if note := over_peak_note(share):
        print(note)
    headroom = statistics.median(r["pipeline"] for r in runs) / statistics.median(train)
    print(f"pipeline headroom: {headroom:.1f}x faster than training consumes")


if __name__ == "__main__":
    run_reported(main)
