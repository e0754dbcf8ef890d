"""Blue against red in colour fundus photographs and in their copies with the two swapped (BGR,
as an OpenCV array or a file written from one holds them): the measurement behind the warning
of channels in BGR order (retina_tf.data.io.channel_order_warning, docs/training.md).

    .venv/bin/python bench/channel_order.py \\
        --datasets=drive:data/DRIVE:all,stare:data/STARE:all,chase_db1:data/CHASE_DB1:all,hrf:data/HRF:all

Per dataset: the least and largest ``blue_over_red`` of the photographs and of their BGR copies
with how many would be warned of, and how many BGR copies get an estimated FOV over 95 % of the
frame (the FOV is estimated from the red channel, which then holds the blue). With ``--model``,
each photograph and its copy are also segmented as predict does (FOV estimated, the run's
threshold) and scored inside the dataset's FOV: vessel F1, and A/V accuracy for an A/V model.

    .venv/bin/python bench/channel_order.py --model=ripav_general \
        --datasets=rite:data/RITE:test,les_av:data/LES-AV:all
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from bench.datasets_flag import dataset_specs, define_datasets_flag  # noqa: E402
from retina_tf.flags import run_reported  # noqa: E402

define_datasets_flag()
flags.DEFINE_string("model", None, "Also segment and score each photograph and its BGR copy "
                    "with this run or shipped model.")
FLAGS = flags.FLAGS


def main(_):
    import logging

    import numpy as np

    from retina_tf.data.catalog import list_samples
    from retina_tf.data.fov import FOV_COVERAGE_RANGE, estimate_fov
    from retina_tf.data.io import BLUE_OVER_RED, blue_over_red, read_sample
    from retina_tf.data.pipeline import target_of
    from retina_tf.evaluation import SetScores
    from retina_tf.inference import Segmenter

    logging.getLogger("retina_tf").setLevel(logging.ERROR)  # the table, not each warning
    seg = (Segmenter.from_run(FLAGS.model, precision="auto", tta=False, av_vote=False)
           if FLAGS.model else None)
    scored = []
    if seg:
        scored = ["vessel F1 RGB / BGR"] + (["A/V accuracy RGB / BGR"] if seg.task == "av" else [])
    print(f"blue_over_red (warned of above {BLUE_OVER_RED:g}): least-largest, warned\n")
    print("| dataset | photographs | as RGB | as BGR | BGR: estimated FOV over "
          f"{FOV_COVERAGE_RANGE[1]:.0%} of the frame |" + "".join(f" {c} |" for c in scored))
    print("|---|---|---|---|---|" + "---|" * len(scored))
    for parts in dataset_specs():
        ratios, whole = [], 0
        scores = [SetScores(seg.task, seg.threshold) for _ in range(2)] if seg else []
        for sample in list_samples(*parts):
            data = read_sample(sample)
            bgr = np.ascontiguousarray(data.image[..., ::-1])
            ratios.append([blue_over_red(data.image), blue_over_red(bgr)])
            whole += float(np.mean(estimate_fov(bgr))) > FOV_COVERAGE_RANGE[1]
            for image, score in zip((data.image, bgr), scores):
                score.update(seg.segment(image)[0], target_of(data, seg.task), data.fov)
        cells = [f"{c.min():.2f}-{c.max():.2f}, {int(np.sum(c > BLUE_OVER_RED))}"
                 for c in np.array(ratios, np.float64).T] + [str(whole)]
        results = [s.result() for s in scores]
        for key in ("f1", "av_acc")[:len(scored)]:
            cells.append(" / ".join(f"{r[key]:.4f}" for r in results))
        print(f"| {parts[0]} | {len(ratios)} | {' | '.join(cells)} |")

if __name__ == "__main__":
    run_reported(main)
