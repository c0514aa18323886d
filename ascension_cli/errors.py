"""Every error a user can cause, as a typed exception deriving from ``AscensionError``.

The command line (``cli/guard.py``) turns these into a one-line message and a non-zero exit
code; library users can catch ``AscensionError`` to handle them all.

An error about options names them by field (``{target_batch}`` in its message, the field in
``options``): ``str(error)`` spells them as fields (``target_batch``), the Python API's words,
and the command line spells them as flags (``--target-batch``) with ``error.render``. Library
layers never write a flag.
"""

import errno
from collections.abc import Callable


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line of text (or its type's name), cut to ``limit`` characters:
    library errors often span many lines, and ours must stay one line."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


# A write the machine refused is its limits, not a bug: no room or read-only storage (the
# service answers 507), or also a forbidden folder (the CLI exits 5 on any of them).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
WRITE_REFUSED_ERRNOS = STORAGE_ERRNOS | {errno.EACCES, errno.EPERM}


def spell_options(template: str, options: tuple[str, ...], spell: Callable[[str], str]) -> str:
    """``template`` with each ``{field}`` of ``options`` spelled by ``spell``."""
    for field in options:
        template = template.replace("{" + field + "}", spell(field))
    return template


def as_field(field: str) -> str:
    """The library's spelling of an option: its field name."""
    return field


class Wording(str):
    """A message (a progress note) that names options: as a ``str`` it spells them as fields,
    ``render(spell)`` spells them the reader's way (the command line's: as flags)."""

    template: str
    options: tuple[str, ...]

    def __new__(cls, template: str, options: tuple[str, ...] = ()):
        text = super().__new__(cls, spell_options(template, tuple(options), as_field))
        text.template, text.options = template, tuple(options)
        return text

    def render(self, spell: Callable[[str], str]) -> str:
        return spell_options(self.template, self.options, spell)


def template_of(text: str) -> tuple[str, tuple[str, ...]]:
    """The template and options of a ``Wording``; a plain string is its own template."""
    return (text.template, text.options) if isinstance(text, Wording) else (text, ())


class AscensionError(Exception):
    """Base class: a problem with the user's input, not a bug in Ascension."""

    exit_code = 2

    def __init__(self, message: str = "", *, options: tuple[str, ...] = ()):
        super().__init__(message)
        self.message, self.options = message, tuple(options)

    def render(self, spell: Callable[[str], str]) -> str:
        """The message with each option field in ``options`` spelled by ``spell``."""
        return spell_options(self.message, self.options, spell)

    def __str__(self) -> str:
        return self.render(as_field)


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


class ImageDecodeError(AscensionError):
    """An image file cannot be decoded (damaged, an unknown format, or too many pixels)."""


class CatalogError(AscensionError):
    """A catalogue folder is damaged, incomplete, or of a version this Ascension cannot read."""

    status = 503  # what the service answers: the catalogue cannot be read now


class ItemClash(CatalogError):
    """A change would file one item id under two classes (the service answers 409)."""

    status = 409


class NotInCatalog(CatalogError):
    """A change names a photo or item the catalogue does not hold (the service answers 404)."""

    status = 404


class Refused(CatalogError):
    """A change the catalogue cannot take as asked: a file name several photos have, every
    photo removed (the service answers 409)."""

    status = 409


class Interrupted(AscensionError):
    """SIGINT/SIGTERM stopped training after a resumable checkpoint was written."""

    def __init__(self, message: str, signal_number: int, options: tuple[str, ...] = ()):
        super().__init__(message, options=options)
        self.exit_code = 128 + signal_number
