"""One place for argument checks shared by the API, the CLI and the trainer.

Every check raises a :class:`~matryoshka2d.errors.Matryoshka2dError` subclass (``InvalidInputError`` by
default) whose message names the argument and the value it got, so callers never see a traceback from
deep inside torch or numpy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Set

from matryoshka2d.errors import InvalidInputError, Matryoshka2dError


def is_int(value: object) -> bool:
    """True for Python and numpy integers, False for bools (``True`` is an int to Python, not to us)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """True for finite ints and floats (numpy too), False for bools, NaN and infinities."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int(
    value: object,
    name: str,
    minimum: int | None = 1,
    maximum: int | None = None,
    error: type[Matryoshka2dError] = InvalidInputError,
    what: str = "",
) -> int:
    """``value`` as an ``int`` if it is an integer in ``minimum..maximum`` (either bound may be None).

    Args:
        value: the value to check.
        name: the argument's name, for the message (``batch_size``, ``layers``, ...).
        minimum, maximum: inclusive bounds; the default is a positive integer.
        error: the exception type to raise.
        what: optional context appended to a range error (e.g. ``"the model has 1..6 layers"``).
    """
    if not is_int(value):
        raise error(f"{name} must be an integer, got {value!r}")
    value = int(value)  # type: ignore[arg-type]
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if what:
            raise error(f"{name}={value} is out of range: {what}")
        if maximum is None:
            raise error(f"{name} must be >= {minimum}, got {value}")
        if minimum is None:
            raise error(f"{name} must be <= {maximum}, got {value}")
        raise error(f"{name} must be in {minimum}..{maximum}, got {value}")
    return value


def check_positive_int(value: object, name: str, error: type[Matryoshka2dError] = InvalidInputError) -> int:
    """``value`` as an ``int`` if it is an integer >= 1 (not a bool)."""
    return check_int(value, name, minimum=1, error=error)


def check_real(
    value: object,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    error: type[Matryoshka2dError] = InvalidInputError,
) -> float:
    """``value`` as a ``float`` if it is a finite number in ``minimum..maximum``."""
    if not is_real(value):
        raise error(f"{name} must be a finite number, got {value!r}")
    value = float(value)  # type: ignore[arg-type]
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "-inf" if minimum is None else f"{minimum:g}"
        high = "inf" if maximum is None else f"{maximum:g}"
        raise error(f"{name} must be in [{low}, {high}], got {value:g}")
    return value


def check_ordered(value: object, name: str, error: type[Matryoshka2dError] = InvalidInputError) -> list:
    """``value`` as a list if it is an ordered collection: not a string, a set, a dict or a non-iterable.

    Row i of an output must belong to item i of the input: a set has no order and a dict would give its
    keys, so both are refused instead of being read in an arbitrary order.

    Args:
        value: the collection (texts, ids, ...).
        name: the argument's name, for the message.
        error: the exception type to raise.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise error(f"{name} must be a list, got {type(value).__name__}")
    if isinstance(value, (Set, Mapping)):
        raise error(
            f"{name} is a {type(value).__name__}, which has no row order (a dict would give its keys): pass "
            "a list, e.g. sorted(...) or list(mapping.values())"
        )
    return list(value)
