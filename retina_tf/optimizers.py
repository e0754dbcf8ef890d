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

import keras
import tensorflow as tf

__all__ = ["Adam", "AdamW", "SGD"]


def _handle(variable):
    """The resource handle of a Keras or TensorFlow variable (a replica's own variable inside
    a distribution strategy's update)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


class _FusedAdamStep:
    """``update_step`` of Keras's Adam as one ``ResourceApplyAdam``, Keras's formula:
    m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2),
    w -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)."""

    def update_step(self, gradient, variable, learning_rate):
        # no fused kernel for these; below float32 the kernel's 1 - b2 is far off (bfloat16:
        # 0.999 rounds to 1)
        if (self.amsgrad or tf.as_dtype(variable.dtype) != tf.float32
                or isinstance(gradient, tf.IndexedSlices)):
            return super().update_step(gradient, variable, learning_rate)
        i = self._get_variable_index(variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[i]),
            v=_handle(self._velocities[i]), beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype), beta1=beta_1,
            beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype))


# Keras's class names, as BatchNormalization in models/blocks.py keeps its own.
@keras.saving.register_keras_serializable(package="retina_tf")
class Adam(_FusedAdamStep, keras.optimizers.Adam):
    """Keras's ``Adam``, each variable updated by TensorFlow's fused Adam kernel."""


@keras.saving.register_keras_serializable(package="retina_tf")
class AdamW(_FusedAdamStep, keras.optimizers.AdamW):
    """Keras's ``AdamW``, each variable updated by TensorFlow's fused Adam kernel (the decoupled
    weight decay is applied first, by Keras, as before)."""


@keras.saving.register_keras_serializable(package="retina_tf")
class SGD(keras.optimizers.SGD):
    """Keras's ``SGD``; with momentum (Polyak 1964; Nesterov's with ``nesterov=True``, Sutskever
    et al. 2013) each variable's update is TensorFlow's fused ``ResourceApplyKerasMomentum``,
    Keras's formula: m = momentum m - lr g; w += m, or w += momentum m - lr g (Nesterov)."""

    def update_step(self, gradient, variable, learning_rate):
        if (self.momentum == 0 or tf.as_dtype(variable.dtype) != tf.float32
                or isinstance(gradient, tf.IndexedSlices)):
            return super().update_step(gradient, variable, learning_rate)
        dtype, i = variable.dtype, self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(self.momentums[i]),
            lr=tf.cast(learning_rate, dtype), grad=tf.cast(gradient, dtype),
            momentum=tf.cast(self.momentum, dtype), use_nesterov=self.nesterov)
