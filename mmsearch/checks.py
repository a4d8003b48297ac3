"""Range checks of library arguments: one typed error (ArgumentError) that names the argument.

The CLI refuses the same values at its edge (click ranges in mmsearch.cli.options); these keep a
Python caller from reaching a busy loop or a traceback with `batch_size=-1` or `alpha=nan`.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional

from mmsearch.errors import ArgumentError

# the bounds the CLI's options and the library share
MAX_SEED = 2 ** 32 - 1  # what numpy's generators take; Python's and torch's take more
MAX_BATCH = 4096  # images per encoder batch
MAX_WORKERS = 256  # decode threads or processes
MAX_K = 10_000  # hits per search (the server's cap per page is lower)
MAX_RERANK_K = 1000  # candidates the re-ranker re-scores


def count(name: str, value, minimum: int = 1, maximum: Optional[int] = None, optional: bool = True):
    """`value` as an int in [minimum, maximum]; None passes when `optional` (the caller's default)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        span = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise ArgumentError(f"{name} must be {span}, got {value}")
    return value


def counts(name: str, values: Iterable, minimum: int = 1, maximum: Optional[int] = None) -> list[int]:
    return [count(name, v, minimum, maximum, optional=False) for v in values]


def number(name: str, value, low: Optional[float] = None, high: Optional[float] = None, optional: bool = True,
           low_open: bool = False):
    """`value` as a finite float in [low, high] (or (low, high] with `low_open`); None passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name} must be a number, got {value!r}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        span = " and ".join(s for s in (lo, hi) if s)
        raise ArgumentError(f"{name} must be a finite number{' ' + span if span else ''}, got {value}")
    return value
