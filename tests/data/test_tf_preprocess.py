"""retina_tf.data.tf_preprocess against the NumPy / OpenCV code it re-expresses in TensorFlow:
CLAHE against cv2.createCLAHE, preprocess against Preprocessor.__call__, estimate_fov against
retina_tf.data.fov.estimate_fov; each traced once with dynamic height and width."""

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from retina_tf.data import fov as np_fov
from retina_tf.data.catalog import list_samples
from retina_tf.data.io import read_image
from retina_tf.data.preprocess import Preprocessor
from retina_tf.data.tf_preprocess import clahe, estimate_fov, preprocess

GRAY = [tf.TensorSpec([None, None], tf.uint8)]
RGB = [tf.TensorSpec([None, None, 3], tf.uint8)]

# Traced once per test session, with dynamic height and width.
_clahe = tf.function(lambda gray: clahe(gray), input_signature=GRAY)
_fov = tf.function(lambda image: estimate_fov(image), input_signature=RGB)


@pytest.fixture(scope="module")
def drive_images(shared_data: Path) -> dict[str, list[np.ndarray]]:
    root = shared_data / "DRIVE"
    return {split: [read_image(s.image) for s in list_samples("drive", root, split)]
            for split in ("training", "test")}


def _agreement(ours: np.ndarray, reference: np.ndarray) -> tuple[int, int, int]:
    difference = np.abs(ours.astype(int) - reference.astype(int))
    return int((difference == 0).sum()), difference.size, int(difference.max())


def test_clahe_matches_opencv_on_all_drive_images(drive_images):
    """Zuiderveld's CLAHE as OpenCV computes it, on the 40 DRIVE images: the luminance the
    default Preprocessor hands to CLAHE (after standardization) and the raw green channel."""
    images = drive_images["training"] + drive_images["test"]
    assert len(images) == 40
    before_clahe = Preprocessor.from_steps("grayscale,standardize").fit(drive_images["training"])
    opencv = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    equal = total = worst = 0
    seconds = 0.0
    for image in images:
        luminance = np.round(before_clahe(image)[..., 0] * 255).astype(np.uint8)
        for gray in (luminance, np.ascontiguousarray(image[..., 1])):
            start = time.perf_counter()
            ours = _clahe(gray).numpy()
            seconds += time.perf_counter() - start
            same, size, largest = _agreement(ours, opencv.apply(gray))
            equal, total, worst = equal + same, total + size, max(worst, largest)
    print(f"\nCLAHE vs OpenCV on 80 DRIVE planes: {equal / total:.6f} of pixels equal, max "
          f"difference {worst} grey level(s); {seconds:.1f} s")
    assert worst <= 1
    assert equal / total >= 0.999
    assert _clahe.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("shape", [(97, 131), (64, 64), (9, 200), (5, 3), (1, 1)])
@pytest.mark.parametrize("clip,tiles", [(2.0, 8), (40.0, 8), (0.0, 8), (3.0, 3), (2.0, 1)])
def test_clahe_matches_opencv_on_odd_sizes_and_settings(shape, clip, tiles):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    # A ramp plus noise over few grey levels: tall histogram peaks, so clipping and the
    # redistribution of its remainder both happen.
    ramp = np.linspace(0, 40, shape[1])[None, :] + rng.normal(0, 3, shape)
    gray = np.clip(ramp + 60, 0, 255).astype(np.uint8)
    reference = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(gray)
    np.testing.assert_array_equal(clahe(tf.constant(gray), clip, tiles).numpy(), reference)
    noise = rng.integers(0, 256, shape, dtype=np.uint8)
    reference = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(noise)
    np.testing.assert_array_equal(clahe(tf.constant(noise), clip, tiles).numpy(), reference)


@pytest.mark.parametrize("value", [0, 77, 255])
def test_clahe_of_a_constant_image(value):
    gray = np.full((60, 70), value, np.uint8)
    reference = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
    np.testing.assert_array_equal(_clahe(gray).numpy(), reference)


@pytest.mark.parametrize("steps,channel", [
    ("grayscale,standardize,clahe,gamma", "luminance"),
    ("grayscale,standardize,clahe,gamma", "green"),
    ("standardize,clahe,gamma", "luminance"),   # grayscale off: three channels
    ("grayscale,gamma", "luminance"),
    ("none", "luminance"),
])
def test_preprocess_matches_the_numpy_preprocessor(drive_images, steps, channel):
    pre = Preprocessor.from_steps(steps, channel=channel).fit(drive_images["training"])
    graph = tf.function(lambda image: preprocess(image, pre), input_signature=RGB)
    images = drive_images["test"][:3] + [drive_images["test"][3][:97, :131]]
    worst, equal, total = 0.0, 0, 0
    for image in images:
        ours, reference = graph(image).numpy(), pre(image)
        assert ours.shape == reference.shape and ours.dtype == np.float32
        difference = np.abs(ours - reference)
        worst = max(worst, float(difference.max()))
        equal, total = equal + int((difference == 0).sum()), total + difference.size
    print(f"\n{steps} ({channel}): {equal / total:.6f} equal, max |difference| {worst:.3g}")
    # CLAHE's possible +-1 grey level, through the gamma table, is at most 2 levels.
    assert worst <= 2 / 255 + 1e-6
    assert equal / total >= 0.999
    assert graph.experimental_get_tracing_count() == 1


def test_graphs_hold_no_python_and_serve_any_size():
    pre = Preprocessor().fit([np.full((8, 8, 3), v, np.uint8) for v in (10, 200)])
    graph = tf.function(lambda image: preprocess(image, pre), input_signature=RGB)
    for concrete in (graph.get_concrete_function(), _fov.get_concrete_function()):
        ops = {op.type for op in concrete.graph.get_operations()}
        assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
        for shape in ((33, 47, 3), (20, 20, 3)):
            out = concrete(tf.zeros(shape, tf.uint8))
            assert out.shape[:2] == shape[:2]


def _disc_image(size: int = 120, radius: int = 40) -> np.ndarray:
    image = np.full((size, size, 3), 6, np.uint8)
    cv2.circle(image, (size // 2, size // 2), radius, (170, 80, 40), -1)
    cv2.circle(image, (60, 60), 8, (0, 0, 0), -1)           # dark lesion: a hole to fill
    cv2.circle(image, (6, 6), 4, (200, 200, 200), -1)       # bright speck in the frame
    cv2.circle(image, (112, 10), 6, (200, 200, 200), -1)    # a second, larger one
    return image


@pytest.mark.parametrize("erode", [0, 3])
def test_estimate_fov_on_known_discs(erode):
    image = _disc_image()
    ours = estimate_fov(tf.constant(image), erode=erode).numpy()
    assert ours.dtype == bool and ours[60, 60] and not ours[6, 6] and not ours[112, 10]
    np.testing.assert_array_equal(ours, np_fov.estimate_fov(image, erode=erode))
    np.testing.assert_array_equal(estimate_fov(tf.constant(image[..., 0]), erode).numpy(), ours)
    # Cut by the image border: the frame beyond it is outside, not a hole.
    for cut in (image[30:], image[:, :85]):
        cut = np.ascontiguousarray(cut)
        np.testing.assert_array_equal(estimate_fov(tf.constant(cut), erode).numpy(),
                                      np_fov.estimate_fov(cut, erode=erode))


def test_estimate_fov_without_frame_is_everything():
    for image in (np.full((20, 30, 3), 120, np.uint8), np.zeros((20, 30, 3), np.uint8)):
        assert _fov(image).numpy().all()


def test_estimate_fov_matches_numpy_on_real_photographs(drive_images, shared_data):
    """Same mask as the NumPy / OpenCV version on DRIVE and on STARE, whose frames hold noise
    that survives the opening (the largest-component step matters there)."""
    stare = [read_image(s.image) for s in list_samples("stare", shared_data / "STARE", "all")
             if s.name in ("im0001", "im0044", "im0081")]
    images = drive_images["training"][::4] + drive_images["test"][::4] + stare
    differing = []
    for image in images:
        ours, reference = _fov(image).numpy(), np_fov.estimate_fov(image)
        assert (ours & reference).sum() / (ours | reference).sum() >= 0.99
        differing.append(int((ours != reference).sum()))
    print(f"\nFOV: {len(images)} photographs, pixels differing per image {differing}")
    assert differing == [0] * len(images)
    # a crop inside the FOV (no frame): all of it, in both
    crop = drive_images["test"][0][142:442, 132:432]
    assert _fov(crop).numpy().all() and np_fov.estimate_fov(crop).all()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        clahe(tf.zeros((8, 8), tf.float32))
    with pytest.raises(ValueError, match="tiles"):
        clahe(tf.zeros((8, 8), tf.uint8), tiles=0)
    with pytest.raises(ValueError, match="not fitted"):
        preprocess(tf.zeros((8, 8, 3), tf.uint8), Preprocessor())
    with pytest.raises(ValueError, match="RGB"):
        preprocess(tf.zeros((8, 8, 4), tf.uint8), Preprocessor(standardize=False))
    with pytest.raises(ValueError, match="erode"):
        estimate_fov(tf.zeros((8, 8, 3), tf.uint8), erode=-1)
