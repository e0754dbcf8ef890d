"""How bright the thin structures of gray photographs are against dark, per labelled dataset: the
measurement behind predict's warning of a gray photograph with bright vessels, an angiogram
(retina_tf.inference.bright_vessels_warning, docs/training.md).

    .venv/bin/python bench/bright_lines.py \\
        --datasets=drive:data/DRIVE:all,stare:data/STARE:all,chase_db1:data/CHASE_DB1:all,hrf:data/HRF:all

Each colour photograph is made gray two ways (its luminance, its green channel: a red-free
photograph) and its gray negative inside the FOV stands in for an angiogram (vessels bright; no
fluorescein angiogram with labels is at hand). Per dataset: the least and largest
``bright_line_ratio`` of each, and how many would be warned of. With ``--model``, each negative
is also segmented (as predict does) and the share of its FOV marked as vessel given, with how
many of them the vessel share warning alone would catch, and the two warnings together.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from bench.datasets_flag import dataset_specs, define_datasets_flag  # noqa: E402
from retina_tf.flags import run_reported  # noqa: E402

define_datasets_flag()
flags.DEFINE_string("model", None, "Also segment the negatives with this run or shipped model.")
FLAGS = flags.FLAGS


def main(_):
    import cv2
    import numpy as np

    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.inference import (
        BRIGHT_LINE_RATIO,
        Segmenter,
        bright_line_ratio,
        vessel_share,
        vessel_share_warning,
    )

    seg = (Segmenter.from_run(FLAGS.model, precision="auto", tta=False, av_vote=False)
           if FLAGS.model else None)
    kinds = ["luminance", "green (red-free)", "negative (angiogram)"]
    if seg:
        kinds.append(f"{FLAGS.model} on the negative: vessel share, share warnings, either")
    print(f"bright_line_ratio (warned of above {BRIGHT_LINE_RATIO:g}): least-largest, warned\n")
    print(f"| dataset | photographs | {' | '.join(kinds)} |")
    print("|---|---|" + "---|" * len(kinds))
    for parts in dataset_specs():
        ratios, shares, share_warned, either = [], [], 0, 0
        for sample in list_samples(*parts):
            data = read_sample(sample)
            fov = data.fov > 0
            gray = cv2.cvtColor(data.image, cv2.COLOR_RGB2GRAY)
            negative = np.where(fov, 255 - gray, 0).astype(np.uint8)
            ratios.append([bright_line_ratio(x, fov) for x in (gray, data.image[..., 1],
                                                               negative)])
            if seg:
                photo = np.repeat(negative[..., None], 3, axis=-1)
                mask = seg.probability_at_inference_scale(photo, fov)[..., -1] >= seg.threshold
                shares.append(vessel_share(mask, fov))
                by_share = vessel_share_warning(
                    mask, fov, seg.run_info.get("vessel_share")) is not None
                share_warned += by_share
                either += by_share or ratios[-1][2] > BRIGHT_LINE_RATIO
        cells = []
        for column in np.array(ratios, np.float64).T:
            warned = int(np.sum(column > BRIGHT_LINE_RATIO))
            cells.append(f"{column.min():.2f}-{column.max():.2f}, {warned}")
        if seg:
            cells.append(f"{100 * min(shares):.1f}-{100 * max(shares):.1f} %, {share_warned}, "
                         f"{either}")
        print(f"| {parts[0]} | {len(ratios)} | {' | '.join(cells)} |")


if __name__ == "__main__":
    run_reported(main)
