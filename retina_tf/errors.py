"""Errors a user can act on.

Every problem with the user's input, flags, files or disk surfaces as a :class:`RetinaTFError`
whose message names the flag or file and says what to do; the command-line scripts print that
message in one or two lines and exit with ``exit_code`` (2 for usage errors, 1 otherwise), with
the traceback only under ``--verbose``. Any other exception is a bug in retina_tf.
"""

from __future__ import annotations


class RetinaTFError(Exception):
    """Base class: a problem the user can fix; the message says which flag or file and how."""

    exit_code = 1


class ConfigError(RetinaTFError, ValueError):
    """A bad flag or config value, or settings that contradict each other (exit status 2)."""

    exit_code = 2


class DatasetError(RetinaTFError, ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent; the message says which."""


class ModelFileError(RetinaTFError, ValueError):
    """A model file or run folder is missing, corrupt or not a retina_tf run."""


class TrainingDiverged(RetinaTFError):
    """The training loss or the weights became NaN or infinite; the message names where, what
    the run folder keeps, and what to change."""


class OutputError(RetinaTFError, OSError):
    """An output cannot be written (disk full, no permission): ``filename`` names it."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"
