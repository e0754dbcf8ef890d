"""Adam, AdamW and SGD with each variable's update in one TensorFlow kernel.

Keras 3's Adam (Kingma & Ba 2015, "Adam: A Method for Stochastic Optimization") updates each
variable in about twenty small operations; TensorFlow's ``ResourceApplyAdam`` kernel does the
same update in one, so a model's first ``fit`` (tracing and optimizing the step) takes about a
fifth less time; the steps themselves run as fast as before (docs/results/speed.md, "The test
suite"). The kernel computes 1 - beta in float32 where Keras takes it from Python's float (for
beta_2 = 0.999 it comes out 0.0013 % smaller): the same as Keras's Adam with its betas rounded
to float32. Float32 variables only: others, AMSGrad and sparse (``IndexedSlices``) gradients take
Keras's own step, as does SGD without momentum. The variables, the weight decay of AdamW
(Loshchilov & Hutter 2019), the weight average and gradient clipping are Keras's, so a run saved
with Keras's optimizer resumes with these and the other way round.
"""

import functools

import keras
import tensorflow as tf

__all__ = ["Adam", "AdamW", "SGD"]


def _handle(variable):
    """The resource handle of a Keras or TensorFlow variable (a replica's own variable inside
    a distribution strategy's update)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


class _FusedStep:
    """Runs each float32 variable's update as one fused kernel, with the step's scalars (the
    learning rate, the betas and their powers, ...) made once per step for all variables rather
    than once per variable, which would add a few operations per variable to the step Keras
    traces. ``update_step``, Keras's hook, still updates one variable alone."""

    def _fused(self, gradient, variable) -> bool:
        raise NotImplementedError

    def _scalars(self, learning_rate) -> dict:
        raise NotImplementedError

    def _apply_fused(self, gradient, variable, scalars: dict) -> None:
        raise NotImplementedError

    def update_step(self, gradient, variable, learning_rate):
        return self._update(variable, gradient, learning_rate, scalars={})

    def _update(self, variable, gradient, learning_rate, scalars: dict):
        """One variable's update; ``scalars``: the step's scalars by device, made by the first
        variable on each that needs them."""
        if not self._fused(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        if variable.device not in scalars:
            scalars[variable.device] = self._scalars(learning_rate)
        self._apply_fused(gradient, variable, scalars[variable.device])

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        # Keras's loop over the variables (keras/src/backend/tensorflow/optimizer.py), the
        # scalars shared by all (update() hands each device its own values)
        update = functools.partial(self._update, scalars={})
        for gradient, variable in grads_and_vars:
            distribution.extended.update(variable, update, args=(gradient, learning_rate),
                                         group=False)


class _FusedAdamStep(_FusedStep):
    """Keras's Adam step as one ``ResourceApplyAdam`` per variable, Keras's formula:
    m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2),
    w -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)."""

    def _fused(self, gradient, variable) -> bool:
        # no fused kernel for these; below float32 the kernel's 1 - b2 is far off (bfloat16:
        # 0.999 rounds to 1)
        return not (self.amsgrad or tf.as_dtype(variable.dtype) != tf.float32
                    or isinstance(gradient, tf.IndexedSlices))

    def _scalars(self, learning_rate) -> dict:
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1, beta_2 = tf.cast(self.beta_1, tf.float32), tf.cast(self.beta_2, tf.float32)
        return dict(beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
                    lr=tf.cast(learning_rate, tf.float32), beta1=beta_1, beta2=beta_2,
                    epsilon=tf.cast(self.epsilon, tf.float32))

    def _apply_fused(self, gradient, variable, scalars: dict) -> None:
        i = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[i]),
            v=_handle(self._velocities[i]), grad=tf.cast(gradient, tf.float32), **scalars)


# Keras's class names, as BatchNormalization in models/blocks.py keeps its own.
@keras.saving.register_keras_serializable(package="retina_tf")
class Adam(_FusedAdamStep, keras.optimizers.Adam):
    """Keras's ``Adam``, each variable updated by TensorFlow's fused Adam kernel."""


@keras.saving.register_keras_serializable(package="retina_tf")
class AdamW(_FusedAdamStep, keras.optimizers.AdamW):
    """Keras's ``AdamW``, each variable updated by TensorFlow's fused Adam kernel (the decoupled
    weight decay is applied first, by Keras, as before)."""


@keras.saving.register_keras_serializable(package="retina_tf")
class SGD(_FusedStep, keras.optimizers.SGD):
    """Keras's ``SGD``; with momentum (Polyak 1964; Nesterov's with ``nesterov=True``, Sutskever
    et al. 2013) each variable's update is TensorFlow's fused ``ResourceApplyKerasMomentum``,
    Keras's formula: m = momentum m - lr g; w += m, or w += momentum m - lr g (Nesterov)."""

    def _fused(self, gradient, variable) -> bool:
        return not (self.momentum == 0 or tf.as_dtype(variable.dtype) != tf.float32
                    or isinstance(gradient, tf.IndexedSlices))

    def _scalars(self, learning_rate) -> dict:
        return dict(lr=tf.cast(learning_rate, tf.float32),
                    momentum=tf.cast(self.momentum, tf.float32))

    def _apply_fused(self, gradient, variable, scalars: dict) -> None:
        i = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(self.momentums[i]),
            grad=tf.cast(gradient, tf.float32), use_nesterov=self.nesterov, **scalars)
