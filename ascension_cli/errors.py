"""Every error a user can cause, as a typed exception.

``cli.py`` turns these into a one-line message and a non-zero exit code; library users can catch
``AscensionError`` to handle them all.
"""

import errno


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line of text (or its type's name), cut to ``limit`` characters:
    library errors often span many lines, and ours must stay one line."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


# A write the machine refused is its limits, not a bug: no room or read-only storage (the
# service answers 507), or also a forbidden folder (the CLI exits 5 on any of them).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
WRITE_REFUSED_ERRNOS = STORAGE_ERRNOS | {errno.EACCES, errno.EPERM}


class AscensionError(Exception):
    """Base class: a problem with the user's input, not a bug in Ascension."""

    exit_code = 2


class ConfigError(AscensionError):
    """An option or config file value is invalid."""


class DataError(AscensionError):
    """The dataset folder cannot be used as given."""


class WeightsError(AscensionError):
    """Pretrained weights cannot be found or loaded."""


class CheckpointError(AscensionError):
    """A checkpoint is missing, corrupt or belongs to another model."""


class TrainingError(AscensionError):
    """Training cannot go on (for example, the loss keeps diverging)."""

    exit_code = 3


class VectorsError(AscensionError):
    """A vectors file or index is unreadable, empty, or does not fit its counterpart."""


class Interrupted(AscensionError):
    """SIGINT/SIGTERM stopped training after a resumable checkpoint was written."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number
