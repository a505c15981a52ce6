"""Exceptions raised for bad input.

Every error a user can cause derives from :class:`Matryoshka2dError` (itself a ``ValueError``), so
callers can catch one type, and the CLI turns any of them into one line on stderr and exit code 2.
"""

from __future__ import annotations


class Matryoshka2dError(ValueError):
    """Base class of every user-facing error in matryoshka2d."""


class InvalidLayersError(Matryoshka2dError):
    """A layer count outside ``1..num_layers``."""


class InvalidDimError(Matryoshka2dError):
    """An embedding size outside ``1..model.dim``."""


class InvalidInputError(Matryoshka2dError):
    """Texts or arrays passed to a function are empty, of the wrong type or the wrong shape."""


class ModelLoadError(Matryoshka2dError):
    """A model folder or hub id that cannot be read as an embedding model."""


class DataFileError(Matryoshka2dError):
    """A data file that is missing, empty, lacks a column or holds an unusable value."""


class OutputPathError(Matryoshka2dError):
    """An output path that may not be written: it holds something that is not a previous output of the
    same kind, a previous output without ``overwrite``, an input of the command, or the current folder."""


def first_line(error: BaseException) -> str:
    """The first non-blank line of ``error``'s message, or its type's name when it has none: what a one-line
    error of ours quotes from a library's (often multi-line) exception."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
