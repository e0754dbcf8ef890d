import numpy as np

from retina_tf.visualize import curves, overlay


def test_curves_have_no_points_for_thresholds_above_every_score():
    # all scores below 0.5: thresholds above them select no pixel and must not plot (0, 0)
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    labels = np.array([False, True, False, True])
    fpr, tpr, recall, precision = curves(scores, labels, points=16)
    assert precision[0] == 1.0 and recall[0] == 0.0
    # first real point: threshold at 0.4 selects one vessel pixel -> recall 0.5, precision 1
    assert (recall[1], precision[1]) == (0.5, 1.0)
    assert np.all(precision[1:] > 0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0) and precision[-1] == 0.5


def test_overlay_colours():
    pred = np.array([[1, 1, 0, 0]], bool)
    label = np.array([[1, 0, 1, 0]], bool)
    out = overlay(pred, label)
    assert out[0].tolist() == [[0, 255, 0], [255, 0, 0], [0, 0, 255], [0, 0, 0]]
