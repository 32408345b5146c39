"""Range-checked numbers for argparse options: a bad value is argparse's one-line error, exit status 2.

Every numeric option of every ``speech-kd`` verb (and of ``bench``/``bench-kd``, which have their own
parsers) takes one of these as its ``type=``, so ``-1``, ``0`` where it means nothing, ``nan`` and
``inf`` are refused before any work: ``speech-kd evaluate: error: argument --batch_seconds: '-1':
must be a finite number > 0``. Imports nothing of speech_kd.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = [
    "finite_float",
    "float_range",
    "int_range",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
]


def _number(kind: type, low: float, low_ok: bool, high: float, high_ok: bool, meaning: str) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` between ``low`` and ``high`` (each included when ``*_ok``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        too_low = value < low or (value == low and not low_ok)
        too_high = value > high or (value == high and not high_ok)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text!r}: {meaning}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def float_range(low: float, high: float, low_ok: bool = True, high_ok: bool = True) -> Callable[[str], float]:
    """A finite float from ``low`` to ``high`` (each end included when ``*_ok``).

    Examples
    --------
    >>> float_range(0, 1, low_ok=False)("0.5")
    0.5
    """
    meaning = f"must be a number {'>=' if low_ok else '>'} {low:g} and {'<=' if high_ok else '<'} {high:g}"
    return _number(float, low, low_ok, high, high_ok, meaning)


def int_range(low: int, high: int) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high``, both included.

    Examples
    --------
    >>> int_range(1, 127)("8")
    8
    """
    return _number(int, low, True, high, True, f"must be a whole number from {low} to {high}")


#: a finite float > 0 (seconds, hours, temperatures)
positive_float = _number(float, 0, False, math.inf, False, "must be a finite number > 0")
#: a finite float >= 0 (0 usually means: none, or no limit)
non_negative_float = _number(float, 0, True, math.inf, False, "must be a finite number >= 0")
#: any finite float (a penalty that may be negative)
finite_float = _number(float, -math.inf, False, math.inf, False, "must be a finite number")
#: a whole number >= 1 (counts, epochs, sizes)
positive_int = _number(int, 1, True, math.inf, False, "must be a whole number >= 1")
#: a whole number >= 0 (seeds; counts where 0 means: all, or none)
non_negative_int = _number(int, 0, True, math.inf, False, "must be a whole number >= 0")
