"""An A/V run scored by both protocols, for each way of evaluating it: retina_tf's all-pixel A/V
accuracy (every ground-truth artery-or-vein pixel inside the FOV, crossings excluded, pooled)
and RIP-AV's protocol (per image on ground-truth vessel pixels, cleaned masks, pixels called
neither not counted; ``retina_tf.metrics.RipavAVMetrics``), beside vessel F1 and AUC.

Choose the evaluation on the validation images (``--split=training --held_out=2``: the two
images ``bin/train.py --val_images=2`` held out), then report it on the test split:

    .venv/bin/python bench/av_protocols.py --model=logs/ripav_rite --data_dir=data/RITE \\
        --split=training --held_out=2
    .venv/bin/python bench/av_protocols.py --model=logs/ripav_rite --data_dir=data/RITE
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_string("model", None, "A/V run folder or shipped model name.")
flags.DEFINE_string("dataset", "rite", "A/V dataset.")
flags.DEFINE_string("data_dir", "data/RITE", "Its folder.")
flags.DEFINE_string("split", "test", "Split to score.")
flags.DEFINE_integer("held_out", 0, "Score only the last N images of the split (with "
                     "--split=training: the validation images of --val_images=N).")
flags.DEFINE_integer("stride", 48, "Sliding-window stride.")
flags.DEFINE_float("av_link", 1.0, "Link strength of the segment vote.")
flags.mark_flag_as_required("model")
FLAGS = flags.FLAGS


def main(_):
    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.data.pipeline import target_of
    from retina_tf.evaluation import SetScores
    from retina_tf.inference import Segmenter
    from retina_tf.postprocess import vote_av_segments

    def segmenter(**options):  # the network alone unless options say otherwise
        return Segmenter.from_run(FLAGS.model, **{"tta": False, "tta_transpose": False,
                                                  "av_vote": False, **options})

    passes = {"whole image": segmenter(inference="whole"),
              "whole, flip TTA": segmenter(inference="whole", tta=True),
              "whole, 8-view TTA": segmenter(inference="whole", tta=True, tta_transpose=True),
              "sliding windows": segmenter(inference="sliding", stride=FLAGS.stride),
              "sliding, flip TTA": segmenter(inference="sliding", stride=FLAGS.stride, tta=True),
              "sliding, 8-view TTA": segmenter(inference="sliding", stride=FLAGS.stride,
                                               tta=True, tta_transpose=True)}
    if passes["whole image"].task != "av":
        raise SystemExit(f"{FLAGS.model} is not an artery/vein model")
    rows = [(name, name, False) for name in passes]
    rows += [(f"{name} + linked vote", name, True) for name in passes if "TTA" in name]
    scores = {row: SetScores("av") for row, _, _ in rows}
    samples = list_samples(FLAGS.dataset, FLAGS.data_dir, FLAGS.split)
    samples = samples[-FLAGS.held_out:] if FLAGS.held_out else samples
    for sample in samples:
        data = read_sample(sample)
        truth = target_of(data, "av") > 0.5
        probs = {name: seg.probability_at_inference_scale(data.image, data.fov)
                 for name, seg in passes.items()}
        for row, name, vote in rows:
            prob = vote_av_segments(probs[name], link=FLAGS.av_link) if vote else probs[name]
            scores[row].update(prob * data.fov[..., None], truth, data.fov)
        print(f"scored {data.name}", flush=True)
    print(f"\n{FLAGS.model} on {len(samples)} {FLAGS.dataset} {FLAGS.split} images"
          + (f" (the last {FLAGS.held_out})" if FLAGS.held_out else ""))
    print("| evaluation | vessel F1 | AUC-ROC | A/V acc, all pixels | A/V acc, RIP-AV protocol "
          "| Se / Sp (RIP-AV) | AUC artery / vein |")
    print("|---|---|---|---|---|---|---|")
    for row, _, _ in rows:
        r = scores[row].result()
        print(f"| {row} | {r['f1']:.4f} | {r['auc_roc']:.4f} | {r['av_acc']:.3f} | "
              f"{r['av_acc_ripav']:.3f} | {r['av_se_ripav']:.3f} / {r['av_sp_ripav']:.3f} | "
              f"{r['av_auc_artery']:.3f} / {r['av_auc_vein']:.3f} |")


if __name__ == "__main__":
    run_reported(main)
