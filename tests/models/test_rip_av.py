"""RIP-AV model: encoder, Patch Context Fusion, Distance Aware head, losses, pre-training
transfer, adversarial option, save/reload."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_tf.errors import ConfigError
from retina_tf.losses import bce_loss, dice_loss
from retina_tf.models import build_model, model_class
from retina_tf.models.rip_av import (
    RIPAV,
    PatchContextFusion,
    PatchGlobalFusion,
    RIPClassifier,
    build_encoder,
    smooth_l1,
)
from retina_tf.optimizers import Adam
from tests.models.helpers import assert_reload_identical

TINY = dict(widths=(8, 8, 16, 16, 16), depths=(1, 1, 1, 1), context_size=32)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _batch(n=2, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, h, w, 3)).astype("float32")
    av = rng.random((n, h, w, 3)) > 0.7
    av[..., 2] |= av[..., 0] | av[..., 1]
    return x, av.astype("float32")


@pytest.mark.parametrize("kind", ["convnext", "conv"])
def test_encoder_features_halve_the_resolution(kind):
    enc = build_encoder(3, kind, widths=(4, 8, 12), depths=(1, 2))
    feats = enc(np.zeros((1, 32, 48, 3), "float32"))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 48, 4), (1, 16, 24, 8), (1, 8, 12, 12)]
    with pytest.raises(ValueError, match="one entry more"):
        build_encoder(3, kind, widths=(4, 8), depths=(1, 2))
    with pytest.raises(ValueError, match="encoder must be"):
        build_encoder(3, "resnet")


def test_outputs_registry_and_context_input():
    keras.utils.set_random_seed(0)
    assert model_class("rip_av") is RIPAV and RIPAV.task == "av"
    model = build_model("rip_av", **TINY)
    x, _ = _batch(h=48, w=32)
    out = model(x)
    assert set(out) == {"logits", "distance"}
    assert out["logits"].shape == out["distance"].shape == (2, 48, 32, 3)
    # no context given = the image itself resized: the same as passing that explicitly
    explicit = model({"image": x, "context": model.context_of(x)})
    np.testing.assert_allclose(_np(explicit["logits"]), _np(out["logits"]), atol=1e-5)
    # or encoded beforehand, once for a batch of windows, as sliding-window inference does
    encoded = model.context_features(model.context_of(x[:1]))
    assert encoded.shape == (1, 2, 2, 16)
    shared = model({"image": x, "context_features": tf.repeat(encoded, 2, axis=0)})
    first_context = model({"image": x, "context": tf.repeat(model.context_of(x[:1]), 2, axis=0)})
    np.testing.assert_allclose(_np(shared["logits"]), _np(first_context["logits"]), atol=1e-5)
    # the context changes the prediction, through PCF only
    other = model({"image": x, "context": np.ones((2, 32, 32, 3), "float32")})
    assert np.abs(_np(other["logits"]) - _np(out["logits"])).max() > 1e-4
    plain = RIPAV(context_fusion=False, distance_head=False, **TINY)
    assert set(plain(x)) == {"logits"}
    assert plain.count_params() < model.count_params()
    with pytest.raises(ValueError, match="multiple of 16"):
        RIPAV(**{**TINY, "context_size": 40})


def test_patch_context_fusion_keeps_shapes_and_gates_sum_to_one():
    pcf = PatchContextFusion(reduction=2)
    rng = np.random.default_rng(1)
    fp = rng.normal(size=(3, 5, 7, 16)).astype("float32")
    fc = rng.normal(size=(3, 2, 2, 16)).astype("float32")
    out = pcf([fp, fc])
    assert out.shape == fp.shape
    gates = _np(pcf.gates([fp, fc]))
    assert gates.shape == (3, 16, 2) and (gates > 0).all()
    np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-6)
    # the formula: g_p * fp + g_c * (a * fp + W c)
    c = fc.mean(axis=(1, 2))
    hidden = _np(pcf.squeeze(np.concatenate([fp.mean(axis=(1, 2)), c], -1)))
    att = _np(pcf.attention(hidden))[:, None, None]
    ctx = _np(pcf.context_proj(c))[:, None, None]
    want = (gates[:, None, None, :, 0] * fp
            + gates[:, None, None, :, 1] * (att * fp + ctx))
    np.testing.assert_allclose(_np(out), want, rtol=1e-5, atol=1e-5)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_seed_pcf_keeps_shapes_weights_sum_to_one_and_matches_its_formula():
    keras.utils.set_random_seed(2)
    pgf = PatchGlobalFusion()
    rng = np.random.default_rng(3)
    fp = rng.normal(size=(2, 3, 4, 8)).astype("float32")
    fg = rng.normal(size=(2, 3, 4, 8)).astype("float32")
    out = _np(pgf([fp, fg]))
    assert out.shape == fp.shape
    weights = _np(pgf.branch_weights([fp, fg]))
    assert weights.shape == (2, 3, 4, 8, 2) and (weights > 0).all()
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    # the seed's formula, in NumPy: channel attention (C x C) scaled by sqrt(positions)
    for layer in (pgf.patch_query, pgf.cross_query, pgf.global_key, pgf.fuse):
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))

    def conv(layer, t):
        return t @ _np(layer.kernel)[0, 0] + (_np(layer.bias) if layer.use_bias else 0.0)

    def attend(q, k, v):
        b, h, w, c = q.shape
        q, k, v = (t.reshape(b, h * w, c).transpose(0, 2, 1) for t in (q, k, v))
        sim = _softmax(q @ k.transpose(0, 2, 1) / np.sqrt(h * w))
        return (sim @ v).transpose(0, 2, 1).reshape(b, h, w, c)

    pgf.gamma_self.assign([0.7])
    pgf.gamma_global.assign([1.3])
    selfmap = 0.7 * attend(conv(pgf.patch_query, fp), conv(pgf.patch_key, fp),
                           conv(pgf.patch_value, fp))
    cross = 1.3 * attend(conv(pgf.cross_query, fp), conv(pgf.global_key, fg),
                         conv(pgf.global_value, fg))
    scores = 1 / (1 + np.exp(-conv(pgf.fuse, np.concatenate([selfmap, cross], -1))))
    w = _softmax(np.stack([scores[..., :8], scores[..., 8:]]), axis=0)[0]
    np.testing.assert_allclose(_np(pgf([fp, fg])), fp + w * selfmap + (1 - w) * cross,
                               rtol=1e-4, atol=1e-5)
    # a global map of another size is resized to the patch grid
    assert pgf([fp, rng.normal(size=(2, 6, 8, 8)).astype("float32")]).shape == fp.shape


@pytest.mark.parametrize("fusion", ["pgfusion", "gate"])
def test_only_the_seed_pcf_stops_the_gradient_of_the_context(fusion):
    keras.utils.set_random_seed(4)
    model = RIPAV(fusion=fusion, distance_head=False, **TINY)
    x, _ = _batch()
    context = tf.constant(np.resize(x, (2, 32, 32, 3)))
    with tf.GradientTape() as tape:
        tape.watch(context)
        out = model({"image": tf.constant(x), "context": context})["logits"]
        total = tf.reduce_sum(out)
    grad = tape.gradient(total, context)
    if fusion == "pgfusion":  # the seed's synchronized encoder copy: no gradient
        assert grad is None or float(tf.reduce_max(tf.abs(grad))) == 0.0
    else:
        assert float(tf.reduce_max(tf.abs(grad))) > 0.0
    # the context still changes the prediction
    other = model({"image": x, "context": np.ones((2, 32, 32, 3), "float32")})["logits"]
    assert np.abs(_np(other) - _np(out)).max() > 0.0
    with pytest.raises(ValueError, match="fusion must be one of"):
        RIPAV(fusion="attention", **TINY)


def test_losses_match_hand_computed_terms():
    keras.utils.set_random_seed(2)
    model = RIPAV(**TINY)
    x, av = _batch(seed=3)
    rng = np.random.default_rng(4)
    dist = (rng.random(av.shape) * av[..., 2:3]).astype("float32")
    logits = rng.normal(size=av.shape).astype("float32")
    dlogits = rng.normal(size=av.shape).astype("float32")
    fov = np.ones(av.shape[:3] + (1,), "float32")
    fov[:, :4] = 0
    seg = sum(w / 8.0 * (_np(bce_loss(av[..., k:k + 1], logits[..., k:k + 1], fov))
                         + _np(dice_loss(av[..., k:k + 1], logits[..., k:k + 1], fov)))
              for k, w in enumerate((3, 3, 2)))
    diff = np.abs(1 / (1 + np.exp(-dlogits)) - dist)
    huber = np.where(diff < 1, 0.5 * diff**2, diff - 0.5)
    mask = np.broadcast_to(av[..., 2:3] * fov, huber.shape)
    distance = (huber * mask).sum() / mask.sum()
    got = model.compute_loss(x, np.concatenate([av, dist], -1),
                             {"logits": logits, "distance": dlogits}, fov)
    np.testing.assert_allclose(_np(got), 5 * seg + distance, rtol=1e-5)
    # without appended distance maps only the segmentation term counts
    got = model.compute_loss(x, av, {"logits": logits, "distance": dlogits}, fov)
    np.testing.assert_allclose(_np(got), 5 * seg, rtol=1e-5)
    # the A/V decision term: BCE of sigmoid(l_a - l_v) on artery-xor-vein pixels in the FOV
    counted = (av[..., 0:1] != av[..., 1:2]) * fov
    d = logits[..., 0:1] - logits[..., 1:2]
    bce = np.maximum(d, 0) - d * av[..., 0:1] + np.log1p(np.exp(-np.abs(d)))
    decision = (bce * counted).sum() / counted.sum()
    weighted = RIPAV(av_weight=2.0, **TINY)
    got = weighted.compute_loss(x, av, {"logits": logits, "distance": dlogits}, fov)
    np.testing.assert_allclose(_np(got), 5 * seg + 2 * decision, rtol=1e-5)
    # a pixel-perfect decision (l_a - l_v = +-20 on the counted pixels) costs nothing
    sure = np.where(av[..., 0:1] > 0, 10.0, -10.0) * np.ones_like(logits)
    sure[..., 1:2] *= -1
    assert float(_np(weighted.av_decision_loss(av, sure, fov))) < 1e-6
    with pytest.raises(ValueError, match="av_weight"):
        RIPAV(av_weight=-1.0, **TINY)
    assert float(_np(smooth_l1(np.zeros((1, 2, 2, 1)), np.full((1, 2, 2, 1), 3.0),
                               np.ones((1, 2, 2, 1))))) == pytest.approx(2.5)


def _fit(model, x, y, steps=6):
    data = tf.data.Dataset.from_tensors((x, y, np.ones(y.shape[:3] + (1,), "float32"))).repeat()
    model.compile(optimizer=Adam(3e-3), jit_compile=False)
    return model.fit(data, epochs=2, steps_per_epoch=steps, shuffle=False, verbose=0).history


@pytest.mark.parametrize("fusion", ["pgfusion", "gate"])
def test_a_few_steps_lower_each_loss(fusion):
    keras.utils.set_random_seed(5)
    model = RIPAV(av_weight=1.0, fusion=fusion, **TINY)
    x, av = _batch(seed=6)
    from retina_tf.data.rip import distance_targets
    dist = np.stack([distance_targets(a > 0.5) for a in av])
    y = np.concatenate([av, dist], -1)

    def losses():
        # with the batch's own statistics, as the steps saw it: read with the moving statistics
        # of 32 steps, some losses fell by 3 % only, within the float differences of CPUs
        out = model(x, training=True)
        return np.array([float(_np(model.segmentation_loss(av, out["logits"]))),
                         float(_np(model.distance_loss(av, dist, out["distance"]))),
                         float(_np(model.av_decision_loss(av, out["logits"])))])

    before = losses()
    history = _fit(model, {"image": x, "context": model.context_of(x)}, y, steps=16)
    assert history["loss"][-1] < history["loss"][0]
    # segmentation, distance and A/V decision: each to 0.35-0.79 of before (seeds 1, 2, 5)
    np.testing.assert_array_less(losses(), 0.9 * before)


def test_adversarial_option_trains_a_discriminator():
    keras.utils.set_random_seed(7)
    model = RIPAV(adversarial_weight=0.01, distance_head=False, **TINY)  # no distance targets
    assert model.discriminator is not None
    x, av = _batch(seed=8)
    before = [w.copy() for w in model.discriminator.get_weights()]
    history = _fit(model, x, av, steps=3)
    assert "discriminator_loss" in history and np.isfinite(history["discriminator_loss"]).all()
    assert any(not np.array_equal(a, b)
               for a, b in zip(before, model.discriminator.get_weights()))
    assert RIPAV(**TINY).discriminator is None


def test_encoder_transfers_from_a_rip_classifier():
    keras.utils.set_random_seed(9)
    enc = {k: TINY[k] for k in ("widths", "depths")}
    source = RIPClassifier(**enc)
    assert source(np.zeros((4, 24, 24, 3), "float32")).shape == (4, 2)
    model = RIPAV(**TINY)
    model.load_pretrained(source)
    for a, b in zip(model.encoder.get_weights(), source.encoder.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="--pretrained: cannot start .* encoders differ"):
        model.load_pretrained(RIPClassifier(widths=(8, 8, 16, 16, 32), depths=(1, 1, 1, 1)))
    with pytest.raises(ConfigError, match="RIP pre-training run"):
        model.load_pretrained(build_model("unet", depth=2, base_filters=4))


def test_a_rip_av_run_fine_tunes_whole_and_one_with_other_heads_gives_its_encoder(caplog):
    """A shipped ripav_rite given to --pretrained kept only its encoder: F1 0.84 -> 0.27."""
    keras.utils.set_random_seed(11)
    x, _ = _batch()
    source, model = RIPAV(**TINY), RIPAV(**TINY)
    source(x), model(x)
    model.load_pretrained(source)
    for a, b in zip(model.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_np(model(x)["logits"]), _np(source(x)["logits"]))
    other = RIPAV(distance_head=False, **TINY)   # other heads: the encoder, and said
    other(x)
    with caplog.at_level(logging.WARNING):
        other.load_pretrained(source)
    for a, b in zip(other.encoder.get_weights(), source.encoder.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert "decoder and heads differ from this model's (--model_config); only its encoder" \
        in caplog.text


def test_save_and_reload_give_identical_outputs(tmp_path):
    keras.utils.set_random_seed(10)
    x, _ = _batch(n=1, seed=11)
    assert_reload_identical(RIPAV(av_weight=1.0, **TINY), x, tmp_path / "a")
    assert_reload_identical(RIPAV(encoder="conv", context_fusion=False, **{
        k: v for k, v in TINY.items() if k != "context_size"}), x, tmp_path / "b")
    assert_reload_identical(RIPClassifier(widths=(8, 8, 16), depths=(1, 1)), x, tmp_path / "c")


def test_seed_distance_form_targets_and_loss():
    from retina_tf.data.rip import seed_distance_targets

    keras.utils.set_random_seed(6)
    model = RIPAV(distance_form="seed", **TINY)
    x, av = _batch(seed=7)
    extras = model.training_extras(list(av))
    np.testing.assert_allclose(extras[0], seed_distance_targets(av[0] > 0.5))
    assert extras[0].max() == pytest.approx(1.0) and (extras[0][av[0] == 0] == 0).all()
    # RIP-AV's loss: smooth-L1 on each class's pixels, divided by the target, mean over them
    dist = np.stack(extras)
    logits = np.random.default_rng(8).normal(size=av.shape).astype("float32")
    pred = 1 / (1 + np.exp(-logits)) * av
    diff = np.abs(pred - dist)
    term = np.where(diff < 1, 0.5 * diff**2, diff - 0.5) / (dist + 1e-12) * av
    fov = np.ones(av.shape[:3] + (1,), "float32")
    got = float(_np(model.distance_loss(av, dist, logits, fov)))
    assert got == pytest.approx(term.sum() / av.sum(), rel=1e-4)
    with pytest.raises(ValueError, match="distance_form must be one of"):
        RIPAV(distance_form="other", **TINY)


def test_patch_options_a_context_model_cannot_use_are_refused():
    from retina_tf.config import TrainConfig
    from retina_tf.training import _check_patch_options
    model = RIPAV(**TINY)  # context_factor 0: the whole image as context
    _check_patch_options(TrainConfig(model="rip_av", mixed_patch_sizes=(24, 48)), model)
    with pytest.raises(ConfigError, match="--scale_range: not with a context-fusion model"):
        _check_patch_options(TrainConfig(model="rip_av", scale_range=(0.8, 1.25)), model)
    cropped = RIPAV(**{**TINY, "context_factor": 2})
    with pytest.raises(ConfigError, match="--mixed_patch_sizes: not with a context crop"):
        _check_patch_options(TrainConfig(model="rip_av", mixed_patch_sizes=(24, 48)), cropped)
    plain = RIPAV(context_fusion=False, distance_head=False, **TINY)
    _check_patch_options(TrainConfig(model="rip_av", scale_range=(0.8, 1.25)), plain)
