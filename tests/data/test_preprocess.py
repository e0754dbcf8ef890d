import json

import cv2
import numpy as np
import pytest

from retina_tf.data.preprocess import Preprocessor


def _images(seed=0, n=3, shape=(40, 50)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape + (3,), dtype=np.uint8) for _ in range(n)]


def test_fit_statistics_are_those_of_all_training_pixels():
    a = np.full((4, 4, 3), 10, np.uint8)
    b = np.full((4, 4, 3), 30, np.uint8)
    pre = Preprocessor().fit([a, b])
    # luminance of a gray pixel v is 0.299v + 0.587v + 0.114v = v
    assert pre.mean == pytest.approx(20.0)
    assert pre.std == pytest.approx(10.0)


def test_green_channel_option_uses_green_only():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 1] = 100
    img[..., 0] = 250
    pre = Preprocessor(channel="green").fit([img])
    assert pre.mean == pytest.approx(100.0)


def test_output_shape_dtype_and_range():
    imgs = _images()
    pre = Preprocessor().fit(imgs)
    out = pre(imgs[0])
    assert out.shape == (40, 50, 1) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    rgb = Preprocessor(grayscale=False).fit(imgs)(imgs[0])
    assert rgb.shape == (40, 50, 3)


def test_all_steps_off_is_plain_luminance():
    img = _images(n=1)[0]
    out = Preprocessor.from_steps("grayscale")(img)
    gray = 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]
    np.testing.assert_allclose(out[..., 0], gray / 255.0, atol=1 / 255 + 1e-6)


def test_each_step_matches_its_reference_operation():
    img = _images(n=1)[0]
    pre = Preprocessor.from_steps("grayscale,clahe")
    gray = (0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]).astype(np.uint8)
    ref = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
    np.testing.assert_array_equal((pre(img)[..., 0] * 255).round().astype(np.uint8), ref)
    # gamma 1.2 by lookup table: 128 -> 255 * (128/255) ** (1/1.2)
    flat = np.full((8, 8, 3), 128, np.uint8)
    out = Preprocessor.from_steps("grayscale,gamma")(flat)
    assert out[0, 0, 0] * 255 == pytest.approx(int(255 * (128 / 255) ** (1 / 1.2)), abs=0.01)


def test_standardize_uses_fitted_training_statistics_not_the_image():
    train = _images(seed=1)
    pre = Preprocessor.from_steps("grayscale,standardize").fit(train)
    # a dark and a bright version of one image map to different outputs only through min/max;
    # the fitted mean/std stay those of the training set.
    mean_before = pre.mean
    pre(np.zeros((8, 8, 3), np.uint8) + 5)
    assert pre.mean == mean_before


def test_unfitted_standardize_is_a_clear_error():
    with pytest.raises(ValueError, match="not fitted"):
        Preprocessor()(_images(n=1)[0])


def test_unknown_step_is_rejected():
    with pytest.raises(ValueError, match="sharpen"):
        Preprocessor.from_steps("grayscale,sharpen")


def test_json_round_trip_gives_identical_output(tmp_path):
    imgs = _images()
    pre = Preprocessor(clahe_clip=3.0).fit(imgs)
    path = tmp_path / "preprocessor.json"
    pre.save(path)
    assert json.loads(path.read_text())["mean"] == pre.mean
    again = Preprocessor.load(path)
    np.testing.assert_array_equal(again(imgs[2]), pre(imgs[2]))
    assert [p.name for p in tmp_path.iterdir()] == ["preprocessor.json"]  # no temp file left


def test_load_rejects_unknown_keys(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"grayscale": True, "sharpen": 1}))
    with pytest.raises(ValueError, match="p.json"):
        Preprocessor.load(path)


@pytest.mark.parametrize("key, value", [("std", 0.0), ("std", float("nan")), ("std", -58.0),
                                        ("mean", float("inf")), ("gamma_value", float("nan")),
                                        ("clahe_clip", float("nan"))])
def test_load_rejects_statistics_that_would_flatten_or_invert_every_photograph(tmp_path, key,
                                                                              value):
    path = tmp_path / "preprocessor.json"
    Preprocessor().fit(_images()).save(path)
    config = json.loads(path.read_text())
    path.write_text(json.dumps(dict(config, **{key: value})))  # NaN and inf as json.dumps writes
    with pytest.raises(ValueError, match=rf"{key} must be positive|{key} must be finite"):
        Preprocessor.load(path)
