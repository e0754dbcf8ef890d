"""retina_tf.optimizers: Keras's Adam, AdamW and SGD with each variable's update in one fused
kernel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_tf import optimizers


def _steps(optimizer, steps: int = 5, dtype: str = "float32") -> np.ndarray:
    """The variables after ``steps`` updates of the same start by the same gradients."""
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.standard_normal(shape).astype(dtype), dtype=dtype)
                 for shape in ((3, 3, 2, 4), (4,))]
    optimizer.build(variables)
    for _ in range(steps):
        grads = [tf.constant(rng.standard_normal(v.shape).astype(dtype)) for v in variables]
        optimizer.apply(grads, variables)
    return np.concatenate([v.numpy().ravel() for v in variables])


def _in_float32(kwargs: dict) -> dict:
    """Adam's betas rounded to float32, as the fused kernel takes them (with 1 - beta)."""
    betas = {k: float(np.float32(kwargs.get(k, default)))
             for k, default in (("beta_1", 0.9), ("beta_2", 0.999))}
    return {**kwargs, **betas}


@pytest.mark.parametrize("name,kwargs", [
    ("Adam", {}),
    ("Adam", {"beta_1": 0.5, "epsilon": 1e-3}),
    ("Adam", {"use_ema": True, "ema_momentum": 0.9, "clipnorm": 0.5}),
    ("Adam", {"amsgrad": True}),  # Keras's own step
    ("AdamW", {"weight_decay": 0.1}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("SGD", {"momentum": 0.5}),
    ("SGD", {}),  # no momentum: Keras's own step
])
def test_the_fused_step_updates_as_keras_does(name, kwargs):
    ours = _steps(getattr(optimizers, name)(0.05, **kwargs), steps=30)
    theirs = _steps(getattr(keras.optimizers, name)(0.05, **kwargs), steps=30)
    start = _steps(keras.optimizers.SGD(0.0))
    assert np.abs(theirs - start).max() > 0.1  # the variables moved
    # Keras's arithmetic exactly, given Adam's betas as the kernel takes them (float32) ...
    if name.startswith("Adam") and not kwargs.get("amsgrad"):
        exact = _steps(getattr(keras.optimizers, name)(0.05, **_in_float32(kwargs)), steps=30)
        np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-6)
    # ... and within 1e-4 of Keras's own after thirty steps
    np.testing.assert_allclose(ours, theirs, rtol=0,
                               atol=1e-4 if name.startswith("Adam") else 1e-6)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_variables_that_are_not_float32_take_keras_step(dtype):
    """The kernel would take 1 - beta in the variable's precision: 2 % off in float16, and in
    bfloat16 0.999 rounds to 1."""
    for name, kwargs in (("Adam", {}), ("SGD", {"momentum": 0.9})):
        ours = _steps(getattr(optimizers, name)(0.01, **kwargs), dtype=dtype)
        theirs = _steps(getattr(keras.optimizers, name)(0.01, **kwargs), dtype=dtype)
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("optimizer,kernel", [
    (optimizers.Adam(0.03), "ResourceApplyAdam"),
    (optimizers.SGD(0.01, momentum=0.9, nesterov=True), "ResourceApplyKerasMomentum"),
])
def test_a_training_step_runs_the_fused_kernel_and_lowers_the_loss(optimizer, kernel):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(1).standard_normal((64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    history = model.fit(x, y, epochs=10, batch_size=16, verbose=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    # the update traced as fit traces it: one fused kernel per variable, none of Keras's steps
    variables = model.trainable_variables
    grads = [tf.ones_like(v) for v in variables]
    graph = tf.function(lambda: optimizer.apply(grads, variables)).get_concrete_function().graph
    definition = graph.as_graph_def()
    op_types = [n.op for n in definition.node] + [
        n.op for f in definition.library.function for n in f.node_def]
    assert op_types.count(kernel) == len(variables) == 4
    assert "Sqrt" not in op_types and "Mul" not in op_types
    if kernel == "ResourceApplyAdam":  # beta_1^t and beta_2^t once per step, for every variable
        assert op_types.count("Pow") == 2


def test_saved_state_moves_between_keras_and_fused_adam(tmp_path):
    """A run saved with Keras's Adam resumes with the fused one: the same variables."""
    def model(optimizer):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        m.compile(optimizer=optimizer, loss="mse")
        m.optimizer.build(m.trainable_variables)
        return m

    x = np.ones((8, 3), "float32")
    saved = model(keras.optimizers.Adam(0.1))
    saved.fit(x, x[:, :2], epochs=2, verbose=0)
    saved.save_weights(tmp_path / "run.weights.h5")
    loaded = model(optimizers.Adam(0.1))
    loaded.load_weights(tmp_path / "run.weights.h5")
    for a, b in zip(saved.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    config = keras.optimizers.serialize(loaded.optimizer)
    assert type(keras.optimizers.deserialize(config)) is optimizers.Adam
