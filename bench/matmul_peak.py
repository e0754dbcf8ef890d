"""The machine's float32 matmul peak: the ceiling every speed figure in bench/ is set against.

    .venv/bin/python bench/matmul_peak.py

Prints the CPU's vector extensions and the GFLOP/s of a 4096 x 4096 float32 matmul in NumPy and
in TensorFlow (median of several). The same CPU model name can come
with or without AVX-512 (a virtual machine is given the host's extensions): without it the
peak, and every training and inference speed with it, is about half.
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


def matmul_gflops(n: int = 4096, repeats: int = 5, library: str = "tensorflow") -> float:
    """Median GFLOP/s of an ``n`` x ``n`` float32 matmul (``2 n^3`` operations)."""
    import numpy as np

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    if library == "tensorflow":
        import tensorflow as tf

        a = tf.constant(a)
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


def main() -> None:
    print(f"CPU: {os.cpu_count()} cores; vector extensions: {vector_extensions()}")
    print(f"NumPy      4096^2 float32 matmul: {matmul_gflops(library='numpy'):6.0f} GFLOP/s")
    print(f"TensorFlow 4096^2 float32 matmul: {matmul_gflops():6.0f} GFLOP/s")


if __name__ == "__main__":
    main()
