"""Imported by the server that tests/commands.py forks commands from: what every retina_tf
command imports, without starting TensorFlow's runtime (devices are configured per command)."""

import importlib
import os

_saved = os.dup(2)
_quiet = os.open(os.devnull, os.O_WRONLY)
os.dup2(_quiet, 2)  # TensorFlow's import-time log lines are the server's, not a command's
try:
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    import retina_tf  # noqa: F401
    import retina_tf.cli  # noqa: F401
    from retina_tf.flags import SCRIPTS

    for _, _target in SCRIPTS.values():  # the library modules the scripts call
        if _target:
            importlib.import_module(_target.split(":")[0])
except Exception:  # noqa: BLE001  (a broken import shows in each command, with its traceback)
    pass
finally:
    os.dup2(_saved, 2)
    os.close(_saved)
    os.close(_quiet)
