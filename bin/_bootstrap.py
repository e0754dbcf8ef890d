"""Lets `python bin/<script>.py` run from a clone without installing the package, and keeps
TensorFlow's start-up chatter off the terminal."""

import os
import re
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow 2.21 logs its start-up (oneDNN, CUDA drivers, CPU features) through absl before
# absl logging is initialized, which ignores TF_CPP_MIN_LOG_LEVEL: seven lines on every run,
# above the one-line error a user should see. They are held back while TensorFlow starts; any
# other line written then is passed on. --verbose shows everything.
_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} "
                    r"[\d:. ]+\d+ (port|cudart_stub|cuda_platform|cpu_feature_guard|cuda_dnn|"
                    r"cuda_fft|cuda_blas|cuda_executor)\.cc:\d+\]|To enable the following "
                    r"instructions|.*rebuild TensorFlow with the appropriate compiler flags)")


def _start_tensorflow_quietly() -> None:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()  # the CUDA probe logs here
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
    kept = [line for line in text.splitlines() if line.strip() and not _NOISE.match(line)]
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")


if "--verbose" not in sys.argv:
    _start_tensorflow_quietly()
