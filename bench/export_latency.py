"""Latency of each export format on one photograph, on this machine's CPU: the median of
``--repeats`` runs after ``--warmup`` runs; and how long writing each export and loading it took.

* retina_tf: ``Segmenter.segment`` (FOV estimate, preprocessing, network, threshold), the
  reference;
* SavedModel: its ``serving_default`` signature, end to end (the same steps in the graph);
* ONNX (onnxruntime) and TFLite (built-in operators): the network alone on the preprocessed,
  padded image.

    .venv/bin/python bench/export_latency.py --model=unet_drive --data_dir=data/DRIVE

The exports are written to a temporary folder first (a minute or two). Without ``--data_dir``
the photograph is a synthetic DRIVE-sized one.
"""

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_string("model", "unet_drive", "Run folder or shipped model name.")
flags.DEFINE_string("data_dir", None, "DRIVE folder: times its first test photograph "
                    "(default: a synthetic DRIVE-sized photograph).")
flags.DEFINE_integer("repeats", 10, "Timed runs per format (the median is printed).")
flags.DEFINE_integer("warmup", 2, "Untimed runs first (tracing, allocation).")
TIMED = ("retina_tf", "saved_model", "onnx", "tflite")  # what runner() below can time
flags.DEFINE_list("formats", list(TIMED),
                  "Which to time.")
FLAGS = flags.FLAGS


def _median_seconds(run, repeats: int, warmup: int) -> float:
    import numpy as np

    for _ in range(warmup):
        run()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _tflite_interpreter(path):
    """LiteRT's interpreter where installed, else TensorFlow's."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter  # noqa: N806
    return Interpreter(model_path=str(path))


def main(_):
    from pathlib import Path

    import tensorflow as tf

    from retina_tf.config import ExportConfig
    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_image
    from retina_tf.data.patches import pad_to_multiple
    from retina_tf.data.synthetic import generate_fundus
    from retina_tf.export import export_model
    from retina_tf.inference import Segmenter

    unknown = [f for f in FLAGS.formats if f not in TIMED]
    if unknown:
        raise app.UsageError(f"--formats: unknown format(s) {unknown}")
    if FLAGS.data_dir:
        image = read_image(list_samples("drive", FLAGS.data_dir, "test")[0].image)
    else:
        image = generate_fundus(0).image
    seg = Segmenter.from_run(FLAGS.model, tta=False, av_vote=False)  # one view, as exported
    x = seg.preprocessor(image)
    padded = pad_to_multiple(x, seg.size_multiple)[None]
    h, w = padded.shape[1:3]
    tmp = Path(tempfile.mkdtemp(prefix="export_latency."))

    setup = {}  # format -> seconds to export and load

    def export(fmt, **extra):
        out = tmp / fmt
        export_model(ExportConfig(run=FLAGS.model, format=fmt, out=str(out), **extra))
        return out

    def timed(fmt, make):
        start = time.perf_counter()
        result = make()
        setup[fmt] = time.perf_counter() - start
        return result

    def runner(fmt):
        """(what to time, what it is) for one format."""
        if fmt == "retina_tf":
            return (lambda: seg.segment(image)), "Segmenter.segment, end to end"
        if fmt == "saved_model":
            serve = timed(fmt, lambda: tf.saved_model.load(str(export(fmt, tta=False)))
                          ).signatures["serving_default"]
            tensor = tf.constant(image)
            return (lambda: serve(image=tensor)), "serving_default, end to end"
        if fmt == "onnx":
            import onnxruntime as ort

            session = timed(fmt, lambda: ort.InferenceSession(
                str(export(fmt) / "model.onnx"), providers=["CPUExecutionProvider"]))
            return (lambda: session.run(["probability"], {"image": padded})), "network"
        if fmt == "tflite":
            signature = timed(fmt, lambda: _tflite_interpreter(
                export(fmt, input_size=f"{h}x{w}") / "model.tflite").get_signature_runner())
            return (lambda: signature(image=padded)), "network"
        raise AssertionError(fmt)  # refused above

    rows = []
    try:
        for fmt in FLAGS.formats:
            run, what = runner(fmt)
            seconds = _median_seconds(run, FLAGS.repeats, FLAGS.warmup)
            rows.append((fmt, what, seconds))
            print(f"{fmt}: {seconds * 1000:.0f} ms ({what})"
                  + (f", exported and loaded in {setup[fmt]:.1f} s" if fmt in setup else ""),
                  flush=True)
    finally:  # the exports, also when one fails
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{FLAGS.model}, one {image.shape[1]}x{image.shape[0]} photograph (network input "
          f"{w}x{h}), median of {FLAGS.repeats} after {FLAGS.warmup} warm-up, "
          f"{os.cpu_count()} CPU cores:\n")
    print("| format | what is timed | median latency | export + load |\n|---|---|---|---|")
    for fmt, what, seconds in rows:
        made = f"{setup[fmt]:.1f} s" if fmt in setup else ""
        print(f"| {fmt} | {what} | {seconds * 1000:.0f} ms | {made} |")


if __name__ == "__main__":
    run_reported(main)
