"""Runs retina_tf's scripts as a user does, each in a process of its own, without paying
TensorFlow's import (4-5 s on 2 cores) for every one of the tests' commands.

``run`` forks the command from a server process that has imported TensorFlow, Keras and
retina_tf but not started TensorFlow's runtime (multiprocessing's ``forkserver`` with those
modules preloaded), then runs the script as ``__main__`` with the given argv, working folder and
environment, stdout and stderr going to files. Exit status, output and written files are the
command's own. What this does not exercise, TensorFlow's start-up output and settings read while
TensorFlow is imported, is tested on fresh interpreters (test_progress.py, test_imports.py,
test_cli.py's console scripts).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRELOAD = "tests._preload"

_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([PRELOAD])
    return _context


def _child(argv: list[str], cwd: str | None, env: dict, out: str, err: str) -> None:
    import runpy
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # TMPDIR as this command's environment says
    if env.get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(line_buffering=True)
    if cwd is not None:
        os.chdir(cwd)
    from retina_tf import _startup
    _startup.start_command(argv)  # what importing retina_tf does in a fresh command
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(argv[0])
            sys.argv = [script, *argv[1:]]
            sys.path.insert(0, os.path.dirname(script))
            runpy.run_path(script, run_name="__main__")
    finally:
        import atexit
        atexit._run_exitfuncs()  # as the interpreter does on exit; multiprocessing skips them


class Command:
    """A started command: ``pid``, ``wait()``, ``kill()``, and its output so far."""

    def __init__(self, args: list, cwd=None, env=None, merge_stderr: bool = False,
                 log: Path | None = None):
        """``log``: the file that stdout and stderr both go to (kept by ``close``); otherwise
        they go to temporary files, one for both with ``merge_stderr``."""
        self.args = [str(a) for a in args]
        argv = self._script_argv()  # checked before any file is made
        env = dict(os.environ if env is None else env)  # the environment at the start, as Popen
        self._folder = None if log else Path(tempfile.mkdtemp(prefix="retina_tf-command-"))
        self._out = Path(log) if log else self._folder / "stdout"
        self._err = self._out if log or merge_stderr else self._folder / "stderr"
        for path in (self._out, self._err):
            path.write_bytes(b"")
        self._process = _forkserver().Process(
            target=_child, args=(argv, None if cwd is None else str(cwd), env, str(self._out),
                                 str(self._err)), daemon=True)
        self._process.start()
        self.pid = self._process.pid

    def _script_argv(self) -> list[str]:
        args = self.args
        if args and args[0] == sys.executable:
            args = args[1:]
        if not args or args[0].startswith("-") and args[0] != "-m":
            raise ValueError(f"not a script or -m command: {self.args}")
        return args

    def stdout(self) -> str:
        return self._out.read_text(errors="replace")

    def stderr(self) -> str:
        return self._err.read_text(errors="replace")

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self.kill()
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def kill(self) -> None:
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join(30)

    def close(self) -> None:
        """Kills the command if it still runs and removes its output files."""
        self.kill()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def lines(self, poll_s: float = 0.05):
        """Yields stdout's lines as they are written, until the command ends."""
        done = 0
        while True:
            ended = self.poll() is not None
            text = self.stdout()
            while (end := text.find("\n", done)) >= 0:
                yield text[done:end + 1]
                done = end + 1
            if ended:
                if done < len(text):
                    yield text[done:]
                return
            time.sleep(poll_s)


def run(args: list, cwd=None, env=None, timeout: float = 300,
        merge_stderr: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, ...)`` for ``[sys.executable,
    <script> | -m <module>, *flags]``, forked as the module docstring says."""
    command = Command(args, cwd=cwd, env=env, merge_stderr=merge_stderr)
    try:
        code = command.wait(timeout)
        return subprocess.CompletedProcess(command.args, code, command.stdout(),
                                           "" if merge_stderr else command.stderr())
    finally:
        command.close()


def script(name: str, *flags, **kwargs) -> subprocess.CompletedProcess:
    """``python bin/<name> <flags>`` (see ``run``)."""
    return run([sys.executable, REPO / "bin" / name, *flags], **kwargs)


def killed_while_writing(path: Path) -> Path:
    """What a process SIGKILLed in the middle of ``atomic_write_bytes(path, ...)`` left (no
    cleanup runs): its temporary file, flushed and not yet renamed; returned."""
    before = set(path.parent.glob(".*")) if path.parent.is_dir() else set()
    with tempfile.TemporaryDirectory() as folder:
        killer = Path(folder) / "killed.py"
        killer.write_text(
            "import os, signal, sys\nfrom retina_tf.data.io import atomic_write_bytes\n"
            "os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)\n"
            "atomic_write_bytes(sys.argv[1], b'half')\n")
        killed = run([sys.executable, killer, path])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (left,) = set(path.parent.glob(".*")) - before
    return left
