"""The machine's matmul peak: the ceiling every speed figure in bench/ is set against.

    .venv/bin/python bench/matmul_peak.py

Prints the CPU's vector extensions and the GFLOP/s of a 4096 x 4096 float32 matmul in NumPy and
in TensorFlow, and of a bfloat16 one in TensorFlow (the ceiling of ``--precision=bfloat16``;
emulated, and slow, on CPUs without AVX512-BF16 or AMX), each the median of several. The same
CPU model name can come with or without AVX-512 (a virtual machine is given the host's
extensions): without it the peak, and every training and inference speed with it, is about half.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from retina_tf.inference import cpu_flags  # noqa: E402

# The extensions that decide float32 and bfloat16 speed, as /proc/cpuinfo names them.
EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def vector_extensions() -> str:
    """The extensions of :data:`EXTENSIONS` this CPU has, e.g. ``"avx2 fma avx512f ..."``."""
    flags = cpu_flags()
    return " ".join(e for e in EXTENSIONS if e in flags) or "unknown"


def over_peak_note(shares) -> str:
    """A line for shares of the matmul peak over 100 %: the peak, measured in moments, was
    taken while other work ran (the measured figures are a busy machine's too)."""
    if max(shares, default=0.0) <= 1.0:
        return ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"note: over 100 % of the matmul peak: the peak was measured while other work ran "
            f"(load average {load:.1f} on {os.cpu_count()} cores); measure on an idle machine")


def matmul_gflops(n: int = 4096, repeats: int = 5, library: str = "tensorflow",
                  dtype: str = "float32") -> float:
    """Median GFLOP/s of an ``n`` x ``n`` matmul (``2 n^3`` operations) in ``dtype``
    (``bfloat16``: TensorFlow only)."""
    import numpy as np

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    if library == "tensorflow":
        import tensorflow as tf

        a = tf.cast(tf.constant(a), dtype)
        run = tf.function(lambda: tf.linalg.matmul(a, a))
        run().numpy()  # warm up

        def step():
            run().numpy()
    else:
        def step():
            a @ a
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def forward_flops(model, height: int, width: int | None = None) -> float:
    """Floating-point operations of one forward pass of ``model`` over one ``height`` x
    ``width`` image (square when ``width`` is not given), counted by TensorFlow's graph
    profiler."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )
    from tensorflow.python.util import deprecation

    spec = tf.TensorSpec((1, height, width or height, model.input_shape[-1]), tf.float32)
    graph = convert_variables_to_constants_v2(
        tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    with deprecation.silence():  # the v1 profiler's own notice, not the user's concern
        return float(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)


def main() -> None:
    print(f"CPU: {os.cpu_count()} cores; vector extensions: {vector_extensions()}")
    print(f"NumPy      4096^2 float32 matmul:  {matmul_gflops(library='numpy'):6.0f} GFLOP/s")
    print(f"TensorFlow 4096^2 float32 matmul:  {matmul_gflops():6.0f} GFLOP/s")
    print(f"TensorFlow 4096^2 bfloat16 matmul: {matmul_gflops(dtype='bfloat16'):6.0f} GFLOP/s")


if __name__ == "__main__":
    if sys.argv[1:]:  # no flags: a typo would otherwise run the whole measurement unnoticed
        raise SystemExit(f"usage: python {sys.argv[0]} (it takes no arguments)")
    main()
