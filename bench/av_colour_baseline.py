"""How much of artery/vein classification does pixel colour alone give? A linear discriminant
on each ground-truth artery or vein pixel's colour (crossings excluded, inside the FOV), fitted on
the training images of an A/V dataset and scored on its test images: the floor a network has to
beat with context.

    .venv/bin/python bench/av_colour_baseline.py --data_dir=data/RITE
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_string("dataset", "rite", "A/V dataset with training and test splits.")
flags.DEFINE_string("data_dir", "data/RITE", "Its folder.")
flags.DEFINE_string("preprocess", "standardize,clahe,gamma",
                    "Steps for the 'preprocessed' row (as --preprocess of bin/train.py).")
flags.DEFINE_integer("samples", 50000, "Training pixels drawn for the fit.", lower_bound=1)
FLAGS = flags.FLAGS


def lda(x, y):
    """Fisher's linear discriminant with equal priors: weights and bias, artery positive."""
    import numpy as np
    m1, m0 = x[y].mean(0), x[~y].mean(0)
    cov = np.cov(np.concatenate([x[y] - m1, x[~y] - m0]).T) + 1e-6 * np.eye(x.shape[1])
    w = np.linalg.solve(cov, m1 - m0)
    return w, -w @ (m1 + m0) / 2


def main(_):
    import cv2
    import numpy as np

    from retina_tf.data.catalog import list_samples
    from retina_tf.data.io import read_sample
    from retina_tf.data.pipeline import target_of
    from retina_tf.data.preprocess import Preprocessor
    from retina_tf.metrics import counted_av_pixels

    train = [read_sample(s) for s in list_samples(FLAGS.dataset, FLAGS.data_dir, "training")]
    test = [read_sample(s) for s in list_samples(FLAGS.dataset, FLAGS.data_dir, "test")]
    pre = Preprocessor.from_steps(FLAGS.preprocess).fit(d.image for d in train)

    def features(datas, mode):
        xs, ys = [], []
        for d in datas:
            t = target_of(d, "av") > 0.5
            fov = d.fov.astype(bool)
            counted = counted_av_pixels(t, fov)
            if mode == "preprocessed":
                im = pre(d.image)
            else:  # RGB divided by the image's mean colour in the FOV (illumination varies)
                im = d.image.astype(np.float32)
                im = im / (im[fov].mean(0) + 1e-6)
                if mode == "RGB + 15 px surround":
                    im = np.concatenate([im, cv2.GaussianBlur(im, (0, 0), 15)], -1)
            xs.append(im[counted])
            ys.append(t[..., 0][counted])
        return np.concatenate(xs), np.concatenate(ys)

    print(f"{FLAGS.dataset}: {len(train)} training, {len(test)} test images")
    print(f"{'features':28s} {'A/V acc':>8s} {'arteries right':>15s} {'veins right':>12s}")
    for mode in ("RGB", "RGB + 15 px surround", "preprocessed"):
        x, y = features(train, mode)
        pick = np.random.default_rng(0).choice(len(x), min(FLAGS.samples, len(x)), replace=False)
        w, b = lda(x[pick], y[pick])
        xt, yt = features(test, mode)
        called = xt @ w + b > 0
        print(f"{mode:28s} {np.mean(called == yt):8.3f} {np.mean(called[yt]):15.3f} "
              f"{np.mean(~called[~yt]):12.3f}")


if __name__ == "__main__":
    run_reported(main)
