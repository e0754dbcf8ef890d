import numpy as np
import pytest

from retina_tf.data.patches import (
    extract_patches,
    pad_to_multiple,
    recompose_patches,
    window_starts,
)


@pytest.mark.parametrize("shape,patch,stride", [
    ((584, 565, 1), 48, 5), ((584, 565, 3), 64, 64), ((100, 37), 48, 16), ((30, 20, 2), 48, 7),
    ((96, 96, 1), 96, 1), ((50, 61, 1), 16, 13),
])
def test_recompose_of_extracted_patches_is_the_image(shape, patch, stride):
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    patches, pos = extract_patches(image, patch, stride)
    assert patches.shape[1:3] == (patch, patch)
    # averaging k copies of a float may move it by one ulp; integer images come back exactly
    np.testing.assert_allclose(recompose_patches(patches, pos, image.shape[:2]), image, rtol=1e-6)
    ints = np.floor(image * 255)
    np.testing.assert_array_equal(recompose_patches(*extract_patches(ints, patch, stride),
                                                    ints.shape[:2]), ints)


def test_windows_reach_both_borders():
    starts = window_starts(565, 48, 5)
    assert starts[0] == 0 and starts[-1] == 565 - 48
    assert np.all(np.diff(starts) <= 5)


def test_overlap_is_averaged():
    image = np.zeros((4, 6), np.float32)
    patches, pos = extract_patches(image, (4, 4), 2)  # windows at cols 0 and 2 overlap on 2..3
    patches[0] += 1.0
    patches[1] += 3.0
    out = recompose_patches(patches, pos, (4, 6))
    np.testing.assert_array_equal(out[0], [1, 1, 2, 2, 3, 3])


def test_stride_larger_than_patch_is_rejected():
    with pytest.raises(ValueError, match="uncovered"):
        window_starts(100, 10, 11)


def test_pad_to_multiple():
    out = pad_to_multiple(np.ones((584, 565, 1)), 16)
    assert out.shape == (592, 576, 1)
    assert out[:584, :565].min() == 1 and out[584:].max() == 0
