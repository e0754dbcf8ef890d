"""The share of each photograph's FOV that models segment as vessel, beside its label's, per
labelled dataset: the measurement behind predict's warning of a vessel map far from the training
labels' (retina_tf.inference.vessel_share_warning, docs/training.md). For artery/vein models
also the share of the vessel pixels called artery, behind the warning of an A/V decision far
from the labels' (retina_tf.inference.artery_share_warning).

    .venv/bin/python bench/vessel_share.py --models=unet_drive,vessel_general,ripav_rite \\
        --datasets=drive:data/DRIVE:test,stare:data/STARE:all,chase_db1:data/CHASE_DB1:all

Per dataset and model: the least and largest vessel share of the masks (at the run's
threshold, at its inference scale, inside the FOV) and how many photographs would be warned of;
then the same of the artery shares of the A/V models (``--av_tta``: segmenting as the README's
A/V quick start, with ``--tta --tta_transpose --av_vote``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from bench.datasets_flag import dataset_specs, define_datasets_flag  # noqa: E402
from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_list("models", ["unet_drive", "vessel_general", "ripav_rite"],
                  "Run folders or shipped model names.")
define_datasets_flag()
flags.DEFINE_boolean("av_tta", False, "A/V models segment with --tta --tta_transpose --av_vote.")
FLAGS = flags.FLAGS


def main(_):
    import logging

    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.data.pipeline import target_of
    from retina_tf.inference import (
        Segmenter,
        artery_share,
        artery_share_warning,
        vessel_share,
        vessel_share_warning,
    )

    logging.getLogger("retina_tf").setLevel(logging.ERROR)  # the warnings are counted here
    segs = {m: Segmenter.from_run(m, tta=False, av_vote=False) for m in FLAGS.models}
    av = [m for m, s in segs.items() if s.run_info.get("artery_share")]
    if FLAGS.av_tta:
        segs.update({m: Segmenter.from_run(m, tta=True, tta_transpose=True, av_vote=True)
                     for m in av})
    vessel_rows, artery_rows = [], []
    for dataset, folder, split in dataset_specs():
        labels, label_arteries = [], []
        shares, warned = {m: [] for m in segs}, {m: 0 for m in segs}
        arteries, warned_av = {m: [] for m in av}, {m: 0 for m in av}
        for sample in list_samples(dataset, folder, split):
            data = read_sample(sample)
            labels.append(vessel_share(target_of(data, "vessel"), data.fov))
            if data.av is not None:
                label_arteries.append(artery_share(data.av, data.fov))
            for name, seg in segs.items():
                _, mask = seg.segment(data.image, data.fov, source=sample.image)
                shares[name].append(vessel_share(mask, data.fov))
                known = seg.run_info.get("vessel_share")
                warned[name] += vessel_share_warning(mask, data.fov, known) is not None
                if name in av:
                    arteries[name].append(artery_share(mask, data.fov))
                    known = seg.run_info.get("artery_share")
                    warned_av[name] += artery_share_warning(mask, data.fov, known) is not None
        title = f"| {dataset} {split} ({len(labels)}) | "
        vessel_rows.append(title + _span(labels) + " | " + " | ".join(
            f"{_span(v)}, {warned[n]} warned" for n, v in shares.items()) + " |")
        artery_rows.append(title + (_span(label_arteries) if label_arteries else "none") + " | "
                           + " | ".join(f"{_span(v)}, {warned_av[n]} warned"
                                        for n, v in arteries.items()) + " |")
        print(vessel_rows[-1], flush=True)
    _table("vessel share of the FOV", list(segs), vessel_rows)
    print("\nbounds (run.json vessel_share: half the least, twice the largest training label): "
          + ", ".join(f"{n} {_bounds(s.run_info.get('vessel_share'), 'vessel')}"
                      for n, s in segs.items()))
    if av:
        _table("share of the vessel pixels called artery" + (" (--tta --tta_transpose "
               "--av_vote)" if FLAGS.av_tta else ""), av, artery_rows)
        print("\nbounds (run.json artery_share: artery-to-vein ratios 2/3 of the least, 1.5x the "
              "largest training label's): " + ", ".join(
                  f"{n} {_bounds(segs[n].run_info.get('artery_share'), 'artery')}" for n in av))


def _span(values) -> str:
    values = [v for v in values if v is not None]
    return f"{min(values):.1%}-{max(values):.1%}" if values else "none"


def _table(what: str, models, rows) -> None:
    print(f"\n{what}\n\n| dataset | labels | " + " | ".join(models) + " |")
    print("|---|---|" + "---|" * len(models))
    print("\n".join(rows))


def _bounds(known, kind: str) -> str:
    from retina_tf.inference import artery_share_bounds, vessel_share_bounds
    bounds = (vessel_share_bounds if kind == "vessel" else artery_share_bounds)(known)
    return f"{bounds[0]:.1%}-{bounds[1]:.1%}" if bounds else "none recorded"


if __name__ == "__main__":
    run_reported(main)
