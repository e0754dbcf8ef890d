"""End-to-end time and peak memory of segmenting one high-resolution photograph (HRF's
3504 x 2336), for each ``--inference_scale`` setting.

    .venv/bin/python bench/highres_time.py --model=unet_drive --data_dir=data/HRF \
        --settings=auto,training,native

Each setting runs in a fresh process (peak memory is the process's ``ru_maxrss``): the
photograph is read, its FOV estimated and ``Segmenter.segment`` run, the median of ``--runs``
after one warm-up. Without ``--data_dir`` a synthetic 3504 x 2336 photograph is used.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_string("model", "unet_drive", "Run folder or shipped model name.")
flags.DEFINE_string("data_dir", None, "HRF folder (images/, manual1/, mask/); default: a "
                    "synthetic 3504 x 2336 photograph.")
flags.DEFINE_string("image", "01_dr", "The HRF image to time (its name).")
flags.DEFINE_list("settings", ["auto"], "--inference_scale settings to time.")
flags.DEFINE_integer("tile_size", 0, "--tile_size (0: automatic).")
flags.DEFINE_enum("precision", "float32", ["auto", "float32", "bfloat16"],
                  "--precision (predict's default is auto).")
flags.DEFINE_boolean("tta", False, "Segment with flip TTA and the run's own transposes and "
                     "A/V vote (predict's default for vessel_general and the A/V models); off: "
                     "the network once.")
flags.DEFINE_integer("runs", 5, "Timed runs per setting (after one warm-up).",
                     lower_bound=1)
flags.DEFINE_string("child", None, "Internal: time this one setting and print JSON.")
flags.DEFINE_string("photograph", None, "Internal: the photograph's path, for --child.")
FLAGS = flags.FLAGS


def _photograph() -> str:
    from retina_tf.data.catalog import list_samples
    from retina_tf.data.synthetic import generate_fundus
    from retina_tf.visualize import save_png

    if FLAGS.data_dir:
        samples = [s for s in list_samples("hrf", FLAGS.data_dir, "all") if s.name == FLAGS.image]
        if not samples:
            raise SystemExit(f"--image={FLAGS.image}: not in {FLAGS.data_dir}")
        return str(samples[0].image)
    path = os.path.join(tempfile.mkdtemp(), "synthetic_3504x2336.png")
    save_png(path, generate_fundus(0, size=(2336, 3504)).image)
    return path


def _time_one(setting: str, path: str) -> dict:
    """Runs in the child: read + FOV estimate + segment, ``--runs`` times after a warm-up."""
    import resource

    import numpy as np

    from retina_tf.data.fov import estimate_fov
    from retina_tf.data.io import read_image
    from retina_tf.inference import Segmenter

    seg = Segmenter.from_run(FLAGS.model, inference_scale=setting, tile_size=FLAGS.tile_size,
                             precision=FLAGS.precision, tta=FLAGS.tta,
                             av_vote=None if FLAGS.tta else False)

    def once():
        image = read_image(path)
        fov = estimate_fov(image)
        seg.segment(image, fov)
        return image, fov

    image, fov = once()  # warm-up: traces the network for this size
    times = []
    for _ in range(FLAGS.runs):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    plan = seg.scale_plan(image, fov)
    return {"setting": setting, "median_s": float(np.median(times)), "min_s": min(times),
            "max_s": max(times), "size": f"{image.shape[1]}x{image.shape[0]}",
            "segmented_at": f"{plan.size[0]}x{plan.size[1]}", "factor": plan.factor,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(_):
    if FLAGS.child:
        print("RESULT " + json.dumps(_time_one(FLAGS.child, FLAGS.photograph)))
        return
    path = _photograph()
    rows = []
    for setting in FLAGS.settings:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f"--child={setting}",
             f"--model={FLAGS.model}", f"--tile_size={FLAGS.tile_size}",
             f"--runs={FLAGS.runs}", f"--photograph={path}", f"--precision={FLAGS.precision}",
             f"--tta={FLAGS.tta}"],
            capture_output=True, text=True)
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not result:
            raise SystemExit(f"{setting}: failed\n{proc.stderr[-2000:]}")
        rows.append(json.loads(result[0][len("RESULT "):]))
        print(f"{setting}: {rows[-1]}", flush=True)
    print(f"\n{FLAGS.model} on {os.path.basename(path)} ({rows[0]['size']}), {FLAGS.precision}, "
          f"read + FOV estimate + segment, median of {FLAGS.runs} runs, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| --inference_scale | segmented at | median s | min s | peak memory |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['segmented_at']} (x{r['factor']:.2f}) | "
              f"{r['median_s']:.2f} | {r['min_s']:.2f} | {r['peak_rss_gb']:.2f} GB |")


if __name__ == "__main__":
    run_reported(main)
