"""How far a second human observer agrees with the first: the labels every vessel model is
scored against (docs/results/cross_dataset.md), scored as a model's mask would be, inside the
FOV. DRIVE's test set has a second observer (``2nd_manual/NN_manual2.gif``), STARE a second
labeller for all 20 images (``labels-vk/``, Hoover et al. 2000), CHASE_DB1 a second observer
(``Image_NN{L,R}_2ndHO.png``, Fraz et al. 2012); HRF has one.

    .venv/bin/python bench/second_observer.py \\
        --datasets=drive:data/DRIVE:test,stare:data/STARE:all,chase_db1:data/CHASE_DB1:all

Per dataset: F1 pooled over the pixels / mean and standard deviation of the per-image F1,
sensitivity and precision of the second observer against the first.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from bench.datasets_flag import dataset_specs, define_datasets_flag  # noqa: E402
from retina_tf.flags import run_reported  # noqa: E402

define_datasets_flag("drive, stare or chase_db1")
FLAGS = flags.FLAGS

# The first observer's file name -> the second's, per dataset's official layout.
SECOND = {
    "drive": lambda p: p.parent.parent / "2nd_manual" / p.name.replace("manual1", "manual2"),
    "stare": lambda p: p.parent.parent / "labels-vk" / p.name.replace(".ah.", ".vk."),
    "chase_db1": lambda p: p.with_name(p.name.replace("_1stHO", "_2ndHO")),
}


def main(_):
    import numpy as np

    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import DatasetError, read_mask, read_sample
    from retina_tf.metrics import counts_metrics

    sets = dataset_specs()
    for (dataset, _, _), spec in zip(sets, FLAGS.datasets):
        if dataset not in SECOND:
            raise DatasetError(f"--datasets={spec}: no second observer in {dataset}; give one of "
                               f"{', '.join(SECOND)}")
    print("dataset | images | F1 pooled / mean ± sd | Se | precision")
    for dataset, folder, split in sets:
        total, f1s = np.zeros(4, np.int64), []
        for sample in list_samples(dataset, folder, split):
            data = read_sample(sample)
            second_path = SECOND[dataset](sample.label)
            if not second_path.is_file():  # DRIVE's training set has no second observer
                raise DatasetError(f"{second_path}: missing; the second observer of "
                                   f"{sample.name} (DRIVE has one for the test set only)")
            first, second = data.vessel[data.fov], read_mask(second_path)[data.fov]
            counts = np.array([np.sum(second & first), np.sum(second & ~first),
                               np.sum(~second & ~first), np.sum(~second & first)])
            total += counts
            f1s.append(counts_metrics(*counts)["f1"])
        pooled = counts_metrics(*total)
        print(f"{dataset} ({split}) | {len(f1s)} | {pooled['f1']:.3f} / {np.mean(f1s):.3f} ± "
              f"{np.std(f1s):.3f} | {pooled['se']:.3f} | {pooled['precision']:.3f}")


if __name__ == "__main__":
    run_reported(main)
