"""Where the time of a sliding-window A/V evaluation goes: RITE test images through evaluate's
steps with the settings configs/rite_ripav.cfg had until 2026-12-03 (96 px windows every 48 px,
TTA over the eight flips and transposes, the linked segment vote; it now segments whole images),
each step timed.

    .venv/bin/python bench/av_eval_time.py --data_dir=data/RITE --images=2 --runs=3
    .venv/bin/python bench/av_eval_time.py --data_dir=data/RITE --batch_size=64,8   # alternated
    .venv/bin/python bench/av_eval_time.py --data_dir=data/RITE --in_flight=1,2     # alternated

Steps per image: reading the photograph and its labels, preprocessing, the network (all windows of
all views, overlaps averaged, views averaged), the vote (``vote_av_segments``) and the metrics
(evaluate's ``SetScores``). Each run times all ``--images``; the figures are medians over
``--runs`` runs, the settings (each ``--batch_size``, windows per forward pass, with each
``--in_flight``, batches computed at once) taking turns within a run so that they share the
machine's load. The first pass of each setting (the tf.function
trace) is not counted. The images must be segmented at the size they have (RITE's are).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_string("model", "ripav_rite", "A/V run folder or shipped model name.")
flags.DEFINE_string("dataset", "rite", "A/V dataset.")
flags.DEFINE_string("data_dir", "data/RITE", "Its folder.")
flags.DEFINE_integer("images", 2, "Test images timed (the first N).", lower_bound=1)
flags.DEFINE_integer("runs", 3, "Runs; the medians are reported.", lower_bound=1)
flags.DEFINE_integer("stride", 48, "Sliding-window stride.")
flags.DEFINE_list("batch_size", ["8"], "Windows per forward pass; several are alternated.")
flags.DEFINE_list("in_flight", ["2"], "Window batches computed at once; several are alternated.")
flags.DEFINE_float("av_link", 1.0, "Link strength of the segment vote.")
FLAGS = flags.FLAGS

STEPS = ("read", "preprocess", "network", "vote", "metrics")


def main(_):
    import numpy as np

    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.data.pipeline import target_of
    from retina_tf.errors import ConfigError
    from retina_tf.evaluation import SetScores
    from retina_tf.inference import Segmenter
    from retina_tf.postprocess import vote_av_segments

    try:
        settings = [(int(b), int(f)) for b in FLAGS.batch_size for f in FLAGS.in_flight]
    except ValueError as err:
        raise ConfigError(f"--batch_size / --in_flight take whole numbers ({err})") from err
    # the vote is timed as a step of its own, so the segmenters stop before it
    segs = {}
    for b, f in settings:
        segs[b, f] = Segmenter.from_run(FLAGS.model, inference="sliding", stride=FLAGS.stride,
                                        tta=True, tta_transpose=True, av_vote=False,
                                        batch_size=b)
        segs[b, f].batches_in_flight = f
    seg = segs[settings[0]]
    if seg.task != "av":
        raise SystemExit(f"{FLAGS.model} is not an artery/vein model")
    samples = list_samples(FLAGS.dataset, FLAGS.data_dir, "test")[:FLAGS.images]
    first = read_sample(samples[0])
    if seg.scale_plan(first.image, first.fov).rescaled:
        raise SystemExit(f"{FLAGS.dataset} photographs are resized before segmentation; this "
                         "bench times images segmented as they are")

    def one_image(seg, sample, scores, times):
        start = time.perf_counter()
        data = read_sample(sample)
        target = target_of(data, "av") > 0.5
        mark = time.perf_counter()
        times["read"] += mark - start
        x = seg.preprocessor(data.image)
        times["preprocess"] += time.perf_counter() - mark
        mark = time.perf_counter()
        prob = seg.probability_preprocessed(x)
        times["network"] += time.perf_counter() - mark
        mark = time.perf_counter()
        prob = vote_av_segments(prob, link=FLAGS.av_link)
        times["vote"] += time.perf_counter() - mark
        mark = time.perf_counter()
        scores.update(prob * data.fov[..., None], target, data.fov, name=data.name)
        times["metrics"] += time.perf_counter() - mark
        return prob

    first_pass = {}
    for key, s in segs.items():  # trace once per setting, outside the timing
        start = time.perf_counter()
        s.probability_preprocessed(s.preprocessor(first.image))
        first_pass[key] = time.perf_counter() - start
    runs = {key: [] for key in settings}
    last = {}
    for _ in range(FLAGS.runs):
        for key in settings:
            times = dict.fromkeys(STEPS, 0.0)
            scores = SetScores("av", seg.threshold, av_by_width=True, per_image_auc=True)
            last[key] = [one_image(segs[key], sample, scores, times) for sample in samples]
            runs[key].append(times)
    print(f"{FLAGS.model} on {len(samples)} {FLAGS.dataset} test image(s): sliding windows of "
          f"{seg.window} px every {FLAGS.stride} px, {seg.tta_name}, linked vote; "
          f"{os.cpu_count()} cores, medians of {FLAGS.runs} runs (seconds per image)")
    print("| batch | in flight | " + " | ".join(STEPS) + " | total | 20 images | first pass |")
    print("|---" * (len(STEPS) + 5) + "|")
    for batch, in_flight in settings:
        key = batch, in_flight
        median = {step: float(np.median([t[step] for t in runs[key]])) / len(samples)
                  for step in STEPS}
        total = float(np.median([sum(t.values()) for t in runs[key]])) / len(samples)
        print(f"| {batch} | {in_flight} | " +
              " | ".join(f"{median[step]:.2f}" for step in STEPS) +
              f" | {total:.2f} | {20 * total / 60:.1f} min | {first_pass[key]:.1f} |")
    (batch0, flight0), *others = settings
    for batch, in_flight in others:
        diff = max(float(np.abs(p - q).max())
                   for p, q in zip(last[batch, in_flight], last[batch0, flight0]))
        print(f"batch {batch}, {in_flight} in flight, against batch {batch0}, {flight0} in "
              f"flight: probabilities differ by at most {diff:.1e}")


if __name__ == "__main__":
    run_reported(main)
