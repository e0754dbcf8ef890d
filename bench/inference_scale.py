"""F1 and time of each inference scale (``--inference_scale``) of one model on several labelled
datasets: the measurement behind the ``auto`` setting (docs/results/speed.md).

    .venv/bin/python bench/inference_scale.py --model=unet_drive \
        --datasets=hrf:data/HRF,chase_db1:data/CHASE_DB1,stare:data/STARE \
        --settings=training,auto,1.5,2,2.5,3,4,native --fusions=mean:1.5+2.5,max:2+3

F1 is pooled over each dataset's images (``--split``), inside the FOV, at threshold 0.5. A
fusion ``mean:a+b`` (or ``max:``) averages (or takes the larger of) the probabilities of
settings ``a`` and ``b``; its time is the sum of theirs. ``--near_px=N`` also reports where the
false positives are: the share of them within N px of a labelled vessel (widened vessels rather
than vessels or texture found where there is none).

    .venv/bin/python bench/inference_scale.py --model=vessel_general --settings=auto \
        --datasets=hrf:data/HRF,chase_db1:data/CHASE_DB1 --near_px=3

``--segmented_size`` asks whether enlarging the probabilities back loses anything: it also
scores each setting's mask at the size it was segmented at, against the labels and FOV shrunk
there (OpenCV area; a pixel is vessel where the label covers at least half of it), and reports
the share of the FOV that the labels and the masks mark as vessel.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_string("model", "unet_drive", "Run folder or shipped model name.")
flags.DEFINE_list("datasets", None, "name:folder pairs of catalog datasets (hrf:data/HRF).")
flags.mark_flag_as_required("datasets")
flags.DEFINE_string("split", "all", "Split of every dataset.")
flags.DEFINE_list("settings", ["training", "auto", "native"], "--inference_scale settings.")
flags.DEFINE_list("fusions", [], "Fusions of two settings: mean:a+b or max:a+b.")
flags.DEFINE_float("threshold", 0.5, "Probability threshold of the masks.")
flags.DEFINE_integer("near_px", 0, "Report the share of false positives within this many px of "
                     "a labelled vessel (0: not reported).")
flags.DEFINE_boolean("segmented_size", False, "Also score each setting's mask at the size it "
                     "was segmented at, and report the FOV share marked as vessel.")
FLAGS = flags.FLAGS


def _segmented_size_counts(seg, image, fov, truth, threshold):
    """TP, FP, FN of ``seg``'s mask at the size it segments ``image`` at, against ``truth``
    and ``fov`` shrunk there (area; at least half of a pixel)."""
    import numpy as np

    plan = seg.scale_plan(image, fov)  # as probability_at_inference_scale shrinks it
    pred = seg.probability(plan.resized(image))[..., -1] >= threshold
    small_fov = plan.resized(fov.astype(np.float32)) >= 0.5
    small_truth = plan.resized(truth.astype(np.float32)) >= 0.5
    pred &= small_fov
    return [(pred & small_truth).sum(), (pred & ~small_truth).sum(),
            (~pred & small_truth & small_fov).sum()]


def main(_):
    import numpy as np
    from scipy import ndimage

    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.data.pipeline import target_of
    from retina_tf.inference import Segmenter

    fusions = []
    for text in FLAGS.fusions:
        how, _, pair = text.partition(":")
        a, _, b = pair.partition("+")
        if how not in ("mean", "max") or not a or not b:
            raise SystemExit(f"--fusions={text}: give mean:a+b or max:a+b")
        fusions.append((text, how, a, b))
    settings = list(dict.fromkeys(FLAGS.settings + [s for _, _, a, b in fusions for s in (a, b)]))
    segs = {s: Segmenter.from_run(FLAGS.model, inference_scale=s, tta=False) for s in settings}
    names = FLAGS.settings + [f[0] for f in fusions]
    table, shares = {}, {}
    for spec in FLAGS.datasets:
        dataset, _, folder = spec.partition(":")
        if not folder:
            raise SystemExit(f"--datasets={spec}: give name:folder pairs (hrf:data/HRF)")
        counts = {n: np.zeros(4, np.int64) for n in names}  # TP, FP, FN, FP near a vessel
        small = {s: np.zeros(3, np.int64) for s in settings}  # TP, FP, FN where segmented
        fov_px = label_px = 0
        seconds = {n: 0.0 for n in names}
        factors = {s: [] for s in settings}
        samples = list_samples(dataset, folder, FLAGS.split)
        for sample in samples:
            data = read_sample(sample)
            fov = data.fov.astype(bool)
            truth = target_of(data, "vessel")[..., -1] > 0.5
            near = (ndimage.binary_dilation(truth, iterations=FLAGS.near_px) if FLAGS.near_px
                    else truth)
            probs, took = {}, {}
            for s, seg in segs.items():
                start = time.perf_counter()
                probs[s] = seg.probability_at_inference_scale(data.image, data.fov)[..., -1]
                took[s] = time.perf_counter() - start
                factors[s].append(seg.scale_plan(data.image, data.fov).factor)
            for text, how, a, b in fusions:
                probs[text] = (probs[a] + probs[b]) / 2 if how == "mean" else \
                    np.maximum(probs[a], probs[b])
                took[text] = took[a] + took[b]
            for n in names:
                pred = (probs[n] >= FLAGS.threshold) & fov
                counts[n] += [(pred & truth).sum(), (pred & ~truth).sum(),
                              (~pred & truth & fov).sum(), (pred & ~truth & near).sum()]
                seconds[n] += took[n]
            if FLAGS.segmented_size:
                fov_px += fov.sum()
                label_px += (truth & fov).sum()
                for s, seg in segs.items():
                    small[s] += _segmented_size_counts(seg, data.image, data.fov, truth,
                                                       FLAGS.threshold)
            line = ", ".join(f"{s} {took[s]:.1f} s" for s in settings)
            if FLAGS.segmented_size:  # this photograph's shares of its FOV marked as vessel
                line += f"; vessel: labels {truth[fov].mean():.1%}, " + ", ".join(
                    f"{s} {(probs[s][fov] >= FLAGS.threshold).mean():.1%}" for s in settings)
            print(f"{dataset} {data.name}: {line}", flush=True)
        for n in names:
            tp, fp, fn, fp_near = counts[n].tolist()
            factor = np.mean(factors[n]) if n in factors else float("nan")
            at_size = float("nan")
            if n in small and FLAGS.segmented_size:
                s_tp, s_fp, s_fn = small[n].tolist()
                at_size = 2 * s_tp / max(2 * s_tp + s_fp + s_fn, 1)
            table.setdefault(n, {})[dataset] = (2 * tp / max(2 * tp + fp + fn, 1),
                                                seconds[n] / len(samples), factor,
                                                fp_near / max(fp, 1), at_size,
                                                (tp + fp) / max(fov_px, 1))
        if FLAGS.segmented_size:
            shares[dataset] = label_px / max(fov_px, 1)
    datasets = [d.partition(":")[0] for d in FLAGS.datasets]
    near = (f" / share of the false positives within {FLAGS.near_px} px of a labelled vessel"
            if FLAGS.near_px else "")
    at_size = (" / F1 at the size segmented at / share of the FOV the mask marks as vessel"
               if FLAGS.segmented_size else "")
    print(f"\n{FLAGS.model}: F1 pooled inside the FOV at {FLAGS.threshold:g} / seconds per "
          f"image (resize factor, mean over the images){near}{at_size}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
    print("| setting | " + " | ".join(datasets) + " |")
    print("|---|" + "---|" * len(datasets))
    for n in names:
        cells = []
        for d in datasets:
            f1, sec, factor, share, f1_at_size, vessel = table[n][d]
            scale = f" (x{factor:.2f})" if factor == factor else ""
            cells.append(f"{f1:.4f} / {sec:.1f} s{scale}" +
                         (f" / {share:.2f}" if FLAGS.near_px else "") +
                         (f" / {f1_at_size:.4f} / {vessel:.1%}"
                          if FLAGS.segmented_size and f1_at_size == f1_at_size else ""))
        print(f"| {n} | " + " | ".join(cells) + " |")
    if FLAGS.segmented_size:
        print("| (labels: share of the FOV marked as vessel) | " +
              " | ".join(f"{shares[d]:.1%}" for d in datasets) + " |")


if __name__ == "__main__":
    run_reported(main)
