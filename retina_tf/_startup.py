"""Keeps TensorFlow's C++ log off a retina_tf command's terminal.

TensorFlow 2.21 logs its start-up (oneDNN, CUDA drivers, CPU features, the ``cuInit`` probe)
through absl before absl logging is initialized, which ignores TF_CPP_MIN_LOG_LEVEL: seven lines
on every run, above the one-line error a user should see. When retina_tf runs as a command
(``bin/<script>.py``, ``retina-<command>``, ``python -m retina_tf``), TF_CPP_MIN_LOG_LEVEL
defaults to 3 (no C++ log line once absl is up) and the start-up lines are held back while
TensorFlow is imported and probes its devices: any other line written then is passed on.
oneDNN stays on (turning it off halves CPU inference speed). ``--verbose`` shows everything.
Imported as a library, retina_tf leaves TensorFlow's output alone.
"""

import contextlib
import os
import re
import signal
import sys
import tempfile

# absl's C++ log format (I/W/E; a fatal F line is kept), and the lines that come with it.
_NOISE = re.compile(r"^([IWE]\d{4} [\d:. ]+\d+ [\w./-]+\.(cc|h|cpp):\d+\]"
                    r"|WARNING: All log messages before absl::InitializeLog"
                    r"|To enable the following instructions"
                    r"|.*rebuild TensorFlow with the appropriate compiler flags)")


def _is_command() -> bool:
    prog = sys.argv[0] if sys.argv else ""
    return ((prog == "-m" and _module_run().partition(".")[0] == "retina_tf")  # python -m
            or os.path.basename(prog).startswith("retina-")  # console scripts
            or "_bootstrap" in sys.modules)  # bin/<script>.py


def _module_run() -> str:
    """The module ``python -m`` runs (while it is located, ``sys.argv[0]`` is only "-m"; a
    user's package that imports retina_tf is not a retina_tf command)."""
    args = list(getattr(sys, "orig_argv", []))
    return args[args.index("-m") + 1] if "-m" in args[:-1] else ""


def wants_verbose(argv: list[str]) -> bool:
    """Whether ``argv`` (program name first) sets absl's boolean ``--verbose``, read before
    absl parses it (``--verbose``, ``-verbose``, ``--verbose=true``; ``--noverbose``)."""
    verbose = False
    for arg in argv[1:]:
        if arg == "--":
            break
        name, _, value = arg.lstrip("-").partition("=")
        if name == "verbose":
            verbose = value.lower() not in ("false", "f", "0", "no", "n") if value else True
        elif name == "noverbose":
            verbose = False
    return verbose


def start_tensorflow_quietly() -> None:
    """Imports TensorFlow and lists its devices with its start-up lines held back (see the
    module docstring)."""
    global _terminal
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        _terminal = saved
        try:
            import tensorflow as tf  # here, under the filter
            tf.config.list_physical_devices()  # the CUDA probe logs here
        finally:  # also when the import fails: its own lines are passed on
            os.dup2(saved, 2)
            _terminal = 2
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            kept = [line for line in text.splitlines()
                    if line.strip() and not _NOISE.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


def start_command(argv: list[str]) -> None:
    """A command's start (``argv``: program name first): TF_CPP_MIN_LOG_LEVEL 3 unless set,
    and TensorFlow started with its start-up lines held back, unless ``--verbose``."""
    if not wants_verbose(argv):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        start_tensorflow_quietly()


def one_blas_thread() -> None:
    """OPENBLAS_NUM_THREADS=1 unless set, before NumPy loads OpenBLAS. A command computes in
    TensorFlow's own thread pools and gives NumPy's BLAS only small products (colour mixes,
    the FOV's ellipse fit); OpenBLAS's extra threads would start with it for nothing and spin
    between calls, taking CPU from TensorFlow on a small machine."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


_sigint_before = None
_terminal = 2  # stderr's descriptor, or its saved copy while TensorFlow's lines are held


def _interrupted_while_loading(signum, frame) -> None:
    prog = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-m", "-c") else "retina_tf"
    os.write(_terminal, f"{os.path.basename(prog)}: interrupted\n".encode())
    # exit 130 as retina_tf.flags.report_errors does once the command runs, but not by an
    # exception: raised inside an extension module's import it turns into an ImportError
    os._exit(130)


def quiet_start_for_commands() -> None:
    """For a command: TensorFlow started quietly, and Ctrl-C while retina_tf loads (seconds,
    most of it TensorFlow's import) exits 130 in one line instead of a traceback from the
    import, until :func:`loaded`. A SIGINT the shell ignores (a background job) stays ignored."""
    global _sigint_before
    if not _is_command():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        with contextlib.suppress(ValueError):  # not the main thread: nothing to do
            _sigint_before = signal.signal(signal.SIGINT, _interrupted_while_loading)
    one_blas_thread()
    if "tensorflow" not in sys.modules:
        start_command(sys.argv)


def loaded() -> None:
    """The end of retina_tf's import: Ctrl-C raises KeyboardInterrupt again."""
    global _sigint_before
    if _sigint_before is not None:
        signal.signal(signal.SIGINT, _sigint_before)
        _sigint_before = None
