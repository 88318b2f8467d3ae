"""argparse ``type=`` functions that check numeric options when they are parsed (issue #26): a NaN, an infinity or
an out-of-range value stops the command before any work, with argparse's one line naming the flag
(``argument --lr: must be a finite number > 0; got 'nan'``) and exit code 2.

A leaf (standard library only), shared by every command's parser. Each factory returns a function whose
``__name__`` argparse uses in its messages; ranges are stated once, here at the flag's definition."""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


def _range_text(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def number(
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], float]:
    """A finite float in [low, high] (``low_open`` / ``high_open``: excluding that end); None: unbounded."""
    bounds = _range_text(low, high, low_open, high_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        bad = not math.isfinite(value)
        bad = bad or (low is not None and (value <= low if low_open else value < low))
        bad = bad or (high is not None and (value >= high if high_open else value > high))
        if bad:
            raise argparse.ArgumentTypeError(
                f"must be a finite number{' ' + bounds if bounds else ''}; got {text!r}"
            )
        return value

    parse.__name__ = "number"
    return parse


def integer(low: Optional[int] = None, high: Optional[int] = None, hint: str = "") -> Callable[[str], int]:
    """An integer in [low, high] (None: unbounded); ``hint`` is added to the error (e.g. " (0: all)")."""
    bounds = _range_text(low, high, False, False)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}{hint}; got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse
