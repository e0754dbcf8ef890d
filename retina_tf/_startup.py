"""Keeps TensorFlow's start-up chatter off a retina_tf command's terminal.

TensorFlow 2.21 logs its start-up (oneDNN, CUDA drivers, CPU features) through absl before absl
logging is initialized, which ignores TF_CPP_MIN_LOG_LEVEL: seven lines on every run, above the
one-line error a user should see. When retina_tf runs as a command (``bin/<script>.py``,
``retina-<command>``, ``python -m retina_tf``) they are held back while TensorFlow starts; any
other line written then is passed on, and ``--verbose`` shows everything. Imported as a library,
retina_tf leaves TensorFlow's output alone.
"""

import os
import re
import sys
import tempfile

_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} "
                    r"[\d:. ]+\d+ (port|cudart_stub|cuda_platform|cpu_feature_guard|cuda_dnn|"
                    r"cuda_fft|cuda_blas|cuda_executor)\.cc:\d+\]|To enable the following "
                    r"instructions|.*rebuild TensorFlow with the appropriate compiler flags)")


def _is_command() -> bool:
    prog = sys.argv[0] if sys.argv else ""
    return (prog == "-m"  # python -m retina_tf, while the package is located
            or os.path.basename(prog).startswith("retina-")  # console scripts
            or "_bootstrap" in sys.modules)  # bin/<script>.py


def start_tensorflow_quietly() -> None:
    """Imports TensorFlow with its start-up lines held back (see the module docstring)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow as tf  # here, under the filter
            tf.config.list_physical_devices()  # the CUDA probe logs here
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
    kept = [line for line in text.splitlines() if line.strip() and not _NOISE.match(line)]
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")


def quiet_start_for_commands() -> None:
    if _is_command() and "tensorflow" not in sys.modules and "--verbose" not in sys.argv:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        start_tensorflow_quietly()
