"""Where does an A/V model's error come from: the network's artery/vein evidence, the predicted
vessel map, or the segment vote? Scores one trained A/V run on a test split four ways:

- the network alone (sliding windows, with or without flip TTA);
- plus the segment vote (``--av_vote``, linked with ``--av_link``): the flagfile's evaluation;
- the same vote on the ground-truth vessel map instead of the predicted one (what a perfect vessel
  map would add);
- the true A/V classes as evidence, voted on the predicted vessel map's segments, unlinked (the
  most the vote can reach with the predicted map: a perfect A/V network's ceiling).

A/V accuracy is counted as ``bin/evaluate.py`` counts it (ground-truth artery or vein pixels
inside the FOV, crossings excluded), and by RIP-AV's protocol (``retina_tf.metrics.RipavAVMetrics``)
in the last column. Several runs (``--model=a,b``) are scored as an ensemble: the
mean of their probabilities takes the network's place, to see whether more trained networks (more
training time, spent in parallel) would close the gap.

    .venv/bin/python bench/av_error_sources.py --model=logs/ripav_rite
        --data_dir=data/RITE
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_list("model", None, "A/V run folder (bin/train.py with --task=av), or several, "
                  "comma-separated: their mean probabilities are scored.")
flags.DEFINE_string("dataset", "rite", "A/V dataset.")
flags.DEFINE_string("data_dir", "data/RITE", "Its folder.")
flags.DEFINE_string("split", "test", "Split to score.")
flags.DEFINE_integer("stride", 48, "Sliding-window stride.")
flags.DEFINE_boolean("tta", True, "Flip test-time augmentation.")
flags.DEFINE_boolean("tta_transpose", False, "With --tta, also the transposed image's flips.")
flags.DEFINE_float("av_link", 1.0, "Link strength of the vote (bin/evaluate.py --av_link).")
flags.DEFINE_integer("limit", 0, "Score only the first N images (0: all).")
flags.DEFINE_integer("held_out", 0, "Score only the last N images: with --split=training, the "
                     "validation images bin/train.py --val_images=N held out (0: all).")
flags.mark_flag_as_required("model")
FLAGS = flags.FLAGS


def main(_):
    import numpy as np

    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.data.pipeline import target_of
    from retina_tf.inference import Segmenter
    from retina_tf.metrics import AVMetrics, RipavAVMetrics
    from retina_tf.postprocess import vote_av_segments

    segs = [Segmenter.from_run(run, inference="sliding", stride=FLAGS.stride, tta=FLAGS.tta,
                               tta_transpose=FLAGS.tta_transpose, av_vote=False)
            for run in FLAGS.model]
    for run, seg in zip(FLAGS.model, segs):
        if seg.task != "av":
            raise SystemExit(f"{run} is a {seg.task} model; give an artery/vein run")
    seg = segs[0]
    samples = list_samples(FLAGS.dataset, FLAGS.data_dir, FLAGS.split)
    samples = samples[-FLAGS.held_out:] if FLAGS.held_out else samples
    samples = samples[:FLAGS.limit] if FLAGS.limit else samples

    def vote(p):
        return vote_av_segments(p, link=FLAGS.av_link)

    def on_true_vessels(p, truth):
        p = p.copy()
        p[..., 2] = truth[..., 2]
        return vote(p)

    def true_evidence(p, truth):
        # certain evidence on ground-truth artery or vein pixels, none elsewhere
        p = p.copy()
        only_a, only_v = truth[..., 0] & ~truth[..., 1], truth[..., 1] & ~truth[..., 0]
        p[..., 0] = np.where(only_a, 0.99, np.where(only_v, 0.01, 0.5))
        p[..., 1] = np.where(only_v, 0.99, np.where(only_a, 0.01, 0.5))
        return vote_av_segments(p, link=0.0)

    rows = {"network alone" + (f" ({seg.tta_name})" if seg.tta else ""): lambda p, t: p,
            f"+ segment vote (av_link {FLAGS.av_link:g})": lambda p, t: vote(p),
            "the vote on the ground-truth vessel map": on_true_vessels,
            "true A/V evidence on the predicted segments": true_evidence}
    scores = {name: AVMetrics() for name in rows}
    seeds = {name: RipavAVMetrics() for name in rows}
    for sample in samples:
        data = read_sample(sample)
        truth = target_of(data, "av") > 0.5
        # as bin/evaluate.py: vote on the whole image, then mask by the FOV
        prob = np.mean([s.probability(data.image) for s in segs], axis=0)
        for name, fn in rows.items():
            voted = fn(prob, truth) * data.fov[..., None]
            scores[name].update(voted, truth, data.fov)
            seeds[name].update(voted, truth, data.fov)
        print(f"scored {data.name}", flush=True)
    models = FLAGS.model[0] if len(segs) == 1 else \
        f"the mean of {len(segs)} runs ({', '.join(FLAGS.model)})"
    print(f"\n{models} on {len(samples)} {FLAGS.dataset} {FLAGS.split} images")
    print(f"{'':46s} {'A/V acc':>8s} {'arteries right':>15s} {'veins right':>12s} "
          f"{'RIP-AV protocol':>16s}")
    for name, m in scores.items():
        r = m.result()
        print(f"{name:46s} {r['acc']:8.3f} {r['se']:15.3f} {r['sp']:12.3f} "
              f"{seeds[name].result()['acc']:16.3f}")


if __name__ == "__main__":
    run_reported(main)
