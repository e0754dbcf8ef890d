import numpy as np
import pytest

from retina_tf.data.io import read_image, write_image_atomic
from retina_tf.visualize import (
    ALPHA_FLOOR,
    ARTERY_COLOUR,
    BAND_COLOUR,
    BAND_HEIGHT,
    FN_COLOUR,
    FP_COLOUR,
    GAP,
    TP_COLOUR,
    UNCERTAIN_COLOUR,
    VEIN_COLOUR,
    VESSEL_COLOUR,
    av_error_image,
    av_image,
    av_label_image,
    contact_sheet,
    curves,
    muted_photo,
    overlay,
    text_band,
    titled_panels,
    vessel_overlay,
)


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


def test_the_overlay_colours_only_the_scored_fov_pixels():
    pred = np.array([[1, 1, 0, 0, 0]], bool)
    label = np.array([[1, 0, 1, 0, 1]], bool)
    fov = np.array([[1, 1, 1, 1, 0]], bool)   # the last label pixel is not scored
    for photo in (None, np.zeros((1, 5, 3), np.uint8)):
        out = overlay(pred, label, fov, photo=photo)
        assert out[0, :3].tolist() == [[0, 255, 0], [255, 0, 0], [0, 0, 255]]
        assert out[0, 4].tolist() != list(FN_COLOUR)


def test_an_av_label_draws_crossings_and_uncertain_pixels_white_not_red():
    artery, vein = [[1, 0, 1, 0, 0]], [[0, 1, 1, 0, 0]]   # artery, vein, crossing, uncertain
    vessel = [[1, 1, 1, 1, 0]]
    target = np.stack([np.array(c, bool) for c in (artery, vein, vessel)], -1)
    out = av_label_image(target)
    assert out[0].tolist() == [list(ARTERY_COLOUR), list(VEIN_COLOUR), list(UNCERTAIN_COLOUR),
                               list(UNCERTAIN_COLOUR), [0, 0, 0]]
    # the error picture calls them the same
    assert (av_error_image(target.astype(np.float32), target)[0, 2:4] == UNCERTAIN_COLOUR).all()


def _photo(h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_vessel_overlay_keeps_the_photographs_pixels_where_there_is_no_vessel():
    photo = _photo()
    prob = np.zeros(photo.shape[:2], np.float32)
    prob[10:20, 5:45] = 0.9              # a vessel
    prob[30:35, :] = ALPHA_FLOOR / 2     # background noise under the floor
    out = vessel_overlay(photo, prob)
    assert out.shape == photo.shape and out.dtype == np.uint8
    quiet = prob < ALPHA_FLOOR
    np.testing.assert_array_equal(out[quiet], photo[quiet])
    expected = 0.1 * photo[10:20, 5:45].astype(np.float32) + 0.9 * np.float32(VESSEL_COLOUR)
    np.testing.assert_allclose(out[10:20, 5:45], expected, atol=0.51)


def test_error_and_av_overlays_show_the_muted_photograph_between_the_vessels():
    photo = _photo(seed=1)
    label = np.zeros(photo.shape[:2], bool)
    label[5:10] = True
    pred = np.zeros_like(label)
    pred[8:14] = True
    out = overlay(pred, label, photo=photo)
    background = muted_photo(photo)
    assert background.shape == photo.shape and np.all(background[..., 0] == background[..., 2])
    assert background.max() <= 0.75 * 255 + 0.5   # dimmed: class colours stay the brightest
    np.testing.assert_array_equal(out[20:], background[20:])
    assert out[6, 0].tolist() == list(FN_COLOUR)
    assert out[9, 0].tolist() == list(TP_COLOUR)
    assert out[12, 0].tolist() == list(FP_COLOUR)
    av = np.zeros(photo.shape[:2] + (3,), np.float32)
    av[5:10, :, 0] = av[5:10, :, 2] = 1.0          # an artery
    av[30:33, :, 1] = av[30:33, :, 2] = 1.0        # a vein
    out = av_image(av, photo=photo)
    assert out[7, 3].tolist() == list(ARTERY_COLOUR) and out[31, 3].tolist() == list(VEIN_COLOUR)
    np.testing.assert_array_equal(out[15:25], background[15:25])
    # the error image keeps its colours on the photograph too: class wrong -> green
    wrong = av_error_image(av[..., [1, 0, 2]], av > 0.5, photo=photo)
    assert wrong[7, 3].tolist() == [0, 255, 0]
    np.testing.assert_array_equal(wrong[15:25], background[15:25])


def test_contact_sheet_has_one_row_per_image_under_its_title():
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    rows = [(f"image {i}  F1 0.{i}", [np.full((60, 80, 3), c, np.uint8), np.zeros((60, 80),
                                                                                 np.uint8)])
            for i, c in enumerate(colours)]
    sheet = contact_sheet(rows, ["photograph", "mask"], height=30)
    row_height = GAP + BAND_HEIGHT + 30
    assert sheet.shape == (BAND_HEIGHT + 3 * row_height, 40 + GAP + 40, 3)
    for i, colour in enumerate(colours):
        top = BAND_HEIGHT + i * row_height + GAP
        title = sheet[top:top + BAND_HEIGHT, :40]
        assert (title != BAND_COLOUR).any(axis=-1).sum() > 20       # the row's title is there
        picture = sheet[top + BAND_HEIGHT:top + BAND_HEIGHT + 30, :40]
        assert np.all(picture == colour), i                         # then its own picture
        assert np.all(sheet[top + BAND_HEIGHT:top + BAND_HEIGHT + 30, 40 + GAP:] == 0)


def test_each_column_title_heads_its_column_when_the_rows_differ_in_width():
    """Photographs of two shapes in one sheet: the titles were laid out by the first row."""
    rows = [("wide", [np.full((30, 60, 3), 200, np.uint8), np.full((30, 60, 3), 100, np.uint8)]),
            ("narrow", [np.full((30, 20, 3), 200, np.uint8), np.full((30, 20, 3), 100, np.uint8)])]
    for order in (rows, rows[::-1]):
        sheet = contact_sheet(order, ["photograph", "mask"], height=30)
        assert sheet.shape[1] == 60 + GAP + 60
        for i in range(2):   # every row's second picture starts where the second title does
            top = BAND_HEIGHT + i * (GAP + BAND_HEIGHT + 30) + GAP + BAND_HEIGHT
            assert (sheet[top:top + 30, 60 + GAP] == 100).all()
        header = sheet[:BAND_HEIGHT]
        assert (header[:, 60 + GAP:] != BAND_COLOUR).any(axis=-1).sum() > 20  # "mask" there


def test_a_title_too_long_for_its_strip_is_shrunk_and_cut_inside_it():
    band = text_band("a very long run name that never fits in sixty pixels", 60)
    assert band.shape == (BAND_HEIGHT, 60, 3)
    written = (band != BAND_COLOUR).any(axis=-1)
    assert written.sum() > 20 and not written[:, -3:].any()
    wide = titled_panels([("x", np.zeros((50, 50, 3), np.uint8))] * 2, height=100)
    assert wide.shape[0] > 100 and wide.shape[1] == 2 * 100 + GAP


def test_predict_visualize_writes_overlays_over_the_photograph(tmp_path):
    from retina_tf.config import PredictConfig
    from retina_tf.data.synthetic import generate_fundus
    from retina_tf.errors import ConfigError
    from retina_tf.evaluation import predict

    photo = generate_fundus(4, (128, 128)).image
    write_image_atomic(tmp_path / "in" / "p.png", photo)
    out = tmp_path / "out"
    written = predict(PredictConfig(model="unet_drive", input=str(tmp_path / "in" / "p.png"),
                                    output_dir=str(out), visualize=True))
    assert sorted(p.name for p in written) == ["p_mask.png", "p_overlay.png", "p_prob.png",
                                               "predictions.csv"]
    picture = read_image(out / "p_overlay.png")
    prob = read_image(out / "p_prob.png").astype(np.float32) / 255
    quiet = prob < ALPHA_FLOOR - 0.01   # (8-bit probabilities)
    assert quiet.mean() > 0.5 and np.array_equal(picture[quiet], photo[quiet])
    assert (picture[prob > 0.9] != photo[prob > 0.9]).any()
    # the overlay is one of predict's outputs: a user's file of that name is not replaced
    write_image_atomic(tmp_path / "mine" / "p_overlay.png", photo)
    with pytest.raises(ConfigError, match="p_overlay.png already exists"):
        predict(PredictConfig(model="unet_drive", input=str(tmp_path / "in" / "p.png"),
                              output_dir=str(tmp_path / "mine"), visualize=True))
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["p_overlay.png"]
