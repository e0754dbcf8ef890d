"""The share of each photograph's FOV that models segment as vessel, beside its label's, per
labelled dataset: the measurement behind predict's warning of a vessel map far from the training
labels' (retina_tf.inference.vessel_share_warning, docs/training.md).

    .venv/bin/python bench/vessel_share.py --models=unet_drive,vessel_general,ripav_rite \\
        --datasets=drive:data/DRIVE:test,stare:data/STARE:all,chase_db1:data/CHASE_DB1:all

Per dataset and model: the least and largest vessel share of the masks (at the run's
threshold, at its inference scale, inside the FOV) and how many photographs would be warned of.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_list("models", ["unet_drive", "vessel_general", "ripav_rite"],
                  "Run folders or shipped model names.")
flags.DEFINE_list("datasets", None, "name:folder:split of catalog datasets "
                  "(stare:data/STARE:all).")
flags.mark_flag_as_required("datasets")
FLAGS = flags.FLAGS


def main(_):
    import logging

    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.data.pipeline import target_of
    from retina_tf.inference import Segmenter, vessel_share, vessel_share_warning

    logging.getLogger("retina_tf").setLevel(logging.ERROR)  # the warnings are counted here
    segs = {m: Segmenter.from_run(m) for m in FLAGS.models}
    print("| dataset | labels | " + " | ".join(segs) + " |")
    print("|---|---|" + "---|" * len(segs))
    for spec in FLAGS.datasets:
        parts = spec.split(":")
        if len(parts) != 3:
            raise SystemExit(f"--datasets={spec}: give name:folder:split")
        dataset, folder, split = parts
        labels, shares, warned = [], {m: [] for m in segs}, {m: 0 for m in segs}
        for sample in list_samples(dataset, folder, split):
            data = read_sample(sample)
            labels.append(vessel_share(target_of(data, "vessel"), data.fov))
            for name, seg in segs.items():
                _, mask = seg.segment(data.image, data.fov, source=sample.image)
                shares[name].append(vessel_share(mask, data.fov))
                known = seg.run_info.get("vessel_share")
                warned[name] += vessel_share_warning(mask, data.fov, known) is not None
        cells = [f"{min(v):.1%}-{max(v):.1%}, {warned[n]} warned" for n, v in shares.items()]
        print(f"| {dataset} {split} ({len(labels)}) | {min(labels):.1%}-{max(labels):.1%} | "
              + " | ".join(cells) + " |", flush=True)
    print("\nbounds (run.json vessel_share: half the least, twice the largest training label): "
          + ", ".join(f"{n} {_bounds(s.run_info.get('vessel_share'))}" for n, s in segs.items()))


def _bounds(known):
    from retina_tf.inference import vessel_share_bounds
    bounds = vessel_share_bounds(known)
    return f"{bounds[0]:.1%}-{bounds[1]:.1%}" if bounds else "none recorded"


if __name__ == "__main__":
    run_reported(main)
