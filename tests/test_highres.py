"""Photographs of other sizes: tiled whole-image inference, the inference scale
(``--inference_scale``) and what evaluate and predict report about it."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_tf.config import EvalConfig, ExportConfig, PredictConfig
from retina_tf.data.fov import estimate_fov
from retina_tf.data.preprocess import Preprocessor
from retina_tf.data.synthetic import generate_fundus, write_synthetic_dataset
from retina_tf.errors import ConfigError, DatasetError
from retina_tf.evaluation import evaluate, predict
from retina_tf.export import export_model
from retina_tf.flags import parse_config
from retina_tf.inference import (
    AUTO_MAX_SCALE,
    AUTO_MIN_SCALE,
    TILE_MARGIN,
    Segmenter,
    fov_diameter,
    inference_factor,
    parse_inference_scale,
    tile_spans,
    tiled_predict,
)
from retina_tf.models import build_model


@pytest.fixture(scope="module")
def unet_drive() -> Segmenter:
    return Segmenter.from_pretrained("unet_drive")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """An untrained two-level U-Net written as a run folder "trained" on 96 x 96 photographs
    (its scale decisions do not depend on its weights)."""
    keras.utils.set_random_seed(0)
    model = build_model("unet", depth=2, base_filters=4)
    folder = tmp_path_factory.mktemp("runs") / "tiny"
    folder.mkdir()
    images = [generate_fundus(i, size=(96, 96)).image for i in range(3)]
    Preprocessor.from_steps("grayscale,standardize,clahe").fit(images).save(
        folder / "preprocessor.json")
    model.save(folder / "model.keras")
    diameter = float(np.median([fov_diameter(estimate_fov(im)) for im in images]))
    (folder / "run.json").write_text(json.dumps({
        "model": "unet", "task": "vessel", "dataset": "synthetic", "num_classes": 1,
        "size_multiple": model.size_multiple, "patch_size": 32, "fully_convolutional": True,
        "fov_diameter": diameter}))
    return folder


# --- tiles ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,tile,margin,multiple", [
    (584, 256, 64, 8), (2336, 512, 64, 8), (3504, 512, 64, 16), (300, 512, 64, 8),
    (520, 512, 64, 8), (1000, 200, 40, 4)])
def test_tiles_cover_the_axis_once_and_keep_their_centres(length, tile, margin, multiple):
    spans = tile_spans(length, tile, margin, multiple)
    kept = [(a, b) for _, a, b in spans]
    assert kept[0][0] == 0 and kept[-1][1] == length
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(kept, kept[1:]))  # no gap, no overlap
    for i, (start, a, b) in enumerate(spans):
        assert start % multiple == 0 and start + min(tile, length) <= length
        assert start <= a < b <= start + tile
        if i > 0:  # an inner edge has at least `margin` of context before the kept pixels
            assert a - start >= margin
        if i < len(spans) - 1:
            assert start + tile - b >= margin


def test_tiles_too_small_for_their_margins_are_refused():
    with pytest.raises(ValueError, match="margins"):
        tile_spans(1000, 128, 64, 8)
    with pytest.raises(ConfigError, match="--tile_size=100"):
        Segmenter(None, None, tile_size=100)


def test_tiled_inference_of_an_identity_model_returns_the_image():
    x = np.random.default_rng(0).random((203, 317, 2)).astype(np.float32)
    out = tiled_predict(tf.function(lambda t: t), x, multiple=8, tile=96, margin=16,
                        batch_size=3)
    np.testing.assert_array_equal(out, x)


def test_tiled_equals_whole_image_inference(unet_drive):
    """unet_drive on a 400 x 390 photograph: one tile covering the image is the whole-image
    pass itself; 3 x 3 tiles of 256 px with 64 px margins give the same probabilities to
    float rounding (measured max |diff| 0.0: the U-Net's receptive field fits in the margin)."""
    def with_tiles(side):  # the same loaded network
        return Segmenter(unet_drive.model, unet_drive.preprocessor, run_info=unet_drive.run_info,
                         tile_size=side)

    image = generate_fundus(0, size=(400, 390)).image
    whole = unet_drive.probability(image)
    np.testing.assert_array_equal(with_tiles(512).probability(image), whole)
    assert len(tile_spans(400, 256, TILE_MARGIN, 8)) * len(tile_spans(392, 256, TILE_MARGIN, 8)) \
        == 9
    probs = with_tiles(256).probability(image)
    assert probs.shape == whole.shape
    assert np.abs(probs - whole).max() < 1e-5
    np.testing.assert_array_equal(probs >= 0.5, whole >= 0.5)


# --- the inference scale -------------------------------------------------------------------------

def test_inference_factor_known_answers():
    hrf, chase, stare, small = 3261.0, 913.0, 643.0, 300.0  # FOV diameters in px
    assert inference_factor("training", hrf, 540) == pytest.approx(540 / hrf)
    assert inference_factor("auto", hrf, 540) == pytest.approx(AUTO_MIN_SCALE)
    assert inference_factor("native", hrf, 540) == 1.0
    assert inference_factor(2.0, hrf, 540) == pytest.approx(1080 / hrf)
    assert inference_factor("2", hrf, 540) == pytest.approx(1080 / hrf)
    # CHASE_DB1 is shrunk to the training FOV as before; STARE is within 20 %: as it is
    assert inference_factor("auto", chase, 540) == pytest.approx(540 / chase)
    assert inference_factor("auto", stare, 540) == 1.0
    assert inference_factor("auto", small, 540) == pytest.approx(1.8)  # enlarged, as before
    assert inference_factor("auto", hrf, 540, auto_min_scale=0.5) == 0.5
    assert inference_factor("auto", hrf, None) == inference_factor("auto", 0.0, 540) == 1.0


@pytest.mark.parametrize("bad", ["big", "0", "-2", "nan", "inf", ""])
def test_a_bad_inference_scale_is_refused_naming_the_flag(bad):
    with pytest.raises(ConfigError, match="--inference_scale="):
        parse_inference_scale(bad)
    with pytest.raises(Exception, match="inference_scale"):
        parse_config("evaluate", ["--model=unet_drive", f"--inference_scale={bad}"])


def test_the_flags_reach_the_config():
    cfg = parse_config("predict", ["--inference_scale=native", "--tile_size=768"])
    assert (cfg.inference_scale, cfg.tile_size) == ("native", 768)
    assert parse_config("evaluate", []).inference_scale == "auto"


def test_a_large_photograph_is_shrunk_by_a_third_at_most(tiny_run):
    seg = Segmenter.from_run(tiny_run)
    trained = seg.run_info["fov_diameter"]
    sample = generate_fundus(1, size=(400, 400))
    plan = seg.scale_plan(sample.image, sample.fov)
    assert plan.fov_diameter / trained > 3.6
    assert plan.factor == pytest.approx(1 / 3) and plan.size == (133, 133)
    assert plan.describe() == (f"400x400, FOV {plan.fov_diameter:.0f} px -> segmented at "
                               f"133x133 (x0.33), the training FOV is {trained:.0f} px")
    training = Segmenter.from_run(tiny_run, inference_scale="training")
    assert training.scale_plan(sample.image, sample.fov).factor == pytest.approx(
        trained / plan.fov_diameter)
    prob = seg.probability_at_inference_scale(sample.image, sample.fov)
    assert prob.shape == (400, 400, 1)
    assert not np.allclose(prob, training.probability_at_inference_scale(sample.image,
                                                                          sample.fov))


def test_evaluate_reports_and_records_the_scale_of_each_image(tiny_run, tmp_path, capsys):
    data = write_synthetic_dataset(tmp_path / "big", num_images=2, num_test=2, seed=1,
                                   size=(192, 192))
    report = evaluate(EvalConfig(model=str(tiny_run), dataset="synthetic", data_dir=str(data),
                                 eval_split="test", output_dir=str(tmp_path / "eval")))
    out = capsys.readouterr().out
    trained = Segmenter.from_run(tiny_run).run_info["fov_diameter"]
    assert out.count("inference scale auto: a photograph is resized to bring its FOV to "
                     f"{trained:.0f} px wide") == 1
    lines = [line for line in out.splitlines() if "-> segmented at" in line]
    pattern = (r"synthetic (0[12]_test): 192x192, FOV (\d+) px -> segmented at (\d+)x\3 "
               rf"\(x(0\.\d\d)\), the training FOV is {trained:.0f} px")
    found = [re.fullmatch(pattern, line) for line in lines]
    assert all(found) and [m[1] for m in found] == ["01_test", "02_test"], lines
    scales = [row["scale"] for row in report["per_image"]]
    for m, scale in zip(found, scales):
        assert scale == pytest.approx(trained / int(m[2]), abs=0.01)
        assert float(m[4]) == pytest.approx(scale, abs=0.005)
        assert int(m[3]) == round(192 * scale)
    assert report["inference_scale"] == "auto" and report["training_fov_diameter"] == trained
    assert "scale" not in report["per_image_mean"]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [row["scale"] for row in written["per_image"]] == scales
    with open(tmp_path / "eval" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["scale"]) for row in rows] == pytest.approx(scales, abs=1e-6)

    # --inference_scale=native: no image is resized, and none is reported
    report = evaluate(EvalConfig(model=str(tiny_run), dataset="synthetic", data_dir=str(data),
                                 eval_split="test", output_dir=str(tmp_path / "native"),
                                 inference_scale="native"))
    out = capsys.readouterr().out
    assert "every photograph is segmented as it is" in out and "-> segmented at" not in out
    assert [row["scale"] for row in report["per_image"]] == [1.0, 1.0]


def test_predict_names_the_size_it_segmented_at(tiny_run, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    keras.utils.save_img(folder / "big.png", generate_fundus(2, size=(192, 192)).image)
    keras.utils.save_img(folder / "same.png", generate_fundus(3, size=(96, 96)).image)
    predict(PredictConfig(model=str(tiny_run), input=str(folder),
                          output_dir=str(tmp_path / "out")))
    out = capsys.readouterr().out
    big = next(line for line in out.splitlines() if "big.png ->" in line)
    same = next(line for line in out.splitlines() if "same.png ->" in line)
    assert "(192x192, FOV 173 px, segmented at 94x94 (x0.49), " in big, big
    assert "(96x96, FOV 82 px, " in same and "segmented at" not in same


@pytest.mark.slow
def test_the_saved_model_shrinks_a_large_photograph_as_retina_tf_does(tiny_run, tmp_path):
    out = tmp_path / "sm"
    export_model(ExportConfig(run=str(tiny_run), format="saved_model", out=str(out)))
    description = json.loads((out / "export.json").read_text())
    assert description["preprocessing"]["inference_scale"] == "auto"
    assert "max(" in description["preprocessing"]["recipe"][1]  # [0]: the field of view
    loaded = tf.saved_model.load(str(out))
    seg = Segmenter.from_run(tiny_run)
    big = generate_fundus(1, size=(400, 400)).image
    assert seg.scale_plan(big, estimate_fov(big)).factor == pytest.approx(1 / 3)
    served = loaded.signatures["serving_default"](image=tf.constant(big))["probability"].numpy()
    prob, _ = seg.segment(big, threshold=0.5)
    # TensorFlow's area resize differs from OpenCV's by a grey level at a few pixels
    diff = np.abs(served - prob[..., 0])
    assert diff.mean() < 5e-3, diff.mean()
    training, _ = Segmenter.from_run(tiny_run, inference_scale="training").segment(big)
    assert np.abs(served - training[..., 0]).mean() > 10 * diff.mean()
    # a small disc in a large frame: enlarged, its box only, there too
    framed = _in_a_frame(generate_fundus(5, size=(36, 36)).image, 200)
    assert seg.scale_plan(framed, estimate_fov(framed)).box is not None
    served = loaded.signatures["serving_default"](image=tf.constant(framed))["probability"]
    prob, _ = seg.segment(framed, threshold=0.5)
    diff = np.abs(served.numpy() - prob[..., 0])
    assert diff.mean() < 5e-3 and diff.max() < 0.2, (diff.mean(), diff.max())


def test_a_scale_that_shrinks_below_the_models_minimum_is_refused_naming_the_file(tiny_run):
    seg = Segmenter.from_run(tiny_run, inference_scale=0.05)
    big = generate_fundus(1, size=(400, 400)).image
    plan = seg.scale_plan(big, estimate_fov(big))
    assert min(plan.size) < seg.min_image_size <= 400
    with pytest.raises(DatasetError, match=rf"big.png would be segmented at {plan.size[0]}x"
                                           rf"{plan.size[1]} pixels \(inference scale 0.05\), "
                                           rf"under the {seg.min_image_size} px"):
        seg.segment(big, source="big.png")


def _in_a_frame(image: np.ndarray, side: int, top: int = 40, left: int = 120) -> np.ndarray:
    framed = np.zeros((side, side, 3), np.uint8)
    framed[top:top + image.shape[0], left:left + image.shape[1]] = image
    return framed


def test_a_small_disc_in_a_large_frame_is_enlarged_alone(tiny_run):
    # a phone adapter's photograph: the frame is not enlarged with the disc (time for nothing),
    # and the disc gets what it gets cut out with a margin of frame
    seg = Segmenter.from_run(tiny_run)
    disc = generate_fundus(5, size=(36, 36)).image
    framed = _in_a_frame(disc, 200)
    plan = seg.scale_plan(framed, estimate_fov(framed))
    top, bottom, left, right = plan.box
    assert plan.factor > 2 and plan.size == (round((right - left) * plan.factor),
                                             round((bottom - top) * plan.factor))
    assert f"(x{plan.factor:.2f}, the FOV box)" in plan.describe()
    prob = seg.probability_at_inference_scale(framed, estimate_fov(framed), plan)
    cut = framed[top:bottom, left:right]
    alone = seg.probability_at_inference_scale(cut, estimate_fov(cut))
    np.testing.assert_allclose(prob[top:bottom, left:right], alone, atol=1e-6)
    assert not prob[:top].any() and not prob[bottom:].any()
    # a disc that fills its frame is enlarged whole, as before
    assert seg.scale_plan(disc, estimate_fov(disc)).box is None


def test_the_fov_diameter_of_a_disc_cut_either_way_and_of_a_crop():
    from retina_tf.export import _fov_diameter
    yy, xx = np.mgrid[:300, :400]
    disc = (yy - 150) ** 2 + (xx - 200) ** 2 <= 180 ** 2  # 361 px wide, cut at top and bottom
    cases = {"cut at top and bottom": (disc, 361.0),
             "turned on its side": (disc.T.copy(), 361.0),
             "whole disc": ((yy - 150) ** 2 + (xx - 200) ** 2 <= 140 ** 2, 281.0),
             "a crop inside the FOV": (np.ones((300, 400), bool), 0.0),
             "empty": (np.zeros((300, 400), bool), 0.0)}
    for name, (mask, expected) in cases.items():
        assert fov_diameter(mask) == expected, name
        assert float(_fov_diameter(tf.constant(mask))) == expected, name  # the SavedModel's
    # off centre, also cut at one side: the circle through the edge the image shows
    for cut in (disc[:, :330], disc[:, 60:], disc.T[:330]):
        assert fov_diameter(cut) == pytest.approx(361, abs=1)
        assert float(_fov_diameter(tf.constant(cut))) == pytest.approx(fov_diameter(cut),
                                                                       rel=1e-9)
    # no circle in a straight edge: unknown
    line = np.tri(300, 400, 100, bool)
    assert fov_diameter(line) == 0.0 == float(_fov_diameter(tf.constant(line)))


def test_a_photograph_enlarged_less_than_its_fov_needs_is_warned_of(tiny_run):
    seg = Segmenter.from_run(tiny_run)
    trained = seg.run_info["fov_diameter"]
    drawn = generate_fundus(4, size=(96, 96))  # shrunk to a phone-sized disc of 24 px
    small_image = cv2.resize(drawn.image, (24, 24), interpolation=cv2.INTER_AREA)
    small_fov = cv2.resize(drawn.fov.astype(np.uint8), (24, 24),
                           interpolation=cv2.INTER_NEAREST).astype(bool)
    plan = seg.scale_plan(small_image, small_fov)
    assert plan.factor == AUTO_MAX_SCALE and plan.wanted == pytest.approx(
        trained / plan.fov_diameter) and plan.wanted > 3.2, plan
    assert f"small.png: its FOV is {plan.fov_diameter:.0f} px wide, enlarged x3.00 at most" \
        in plan.warning("small.png")
    same = generate_fundus(3, size=(96, 96))
    assert seg.scale_plan(same.image, same.fov).warning("same.png") is None
    big = generate_fundus(2, size=(400, 400))  # shrunk by a third at most, as measured best
    assert seg.scale_plan(big.image, big.fov).warning("big.png") is None


def test_auto_enlarges_by_three_at_most():
    # a FOV "estimated" on a label map or a bright spot is no reason to blow the image up 11x
    assert inference_factor("auto", 50, 540) == pytest.approx(AUTO_MAX_SCALE) == 3.0
    assert inference_factor("training", 50, 540) == pytest.approx(540 / 50)
