"""Argument types the command line shares (cli.py and demo.py): each turns a bad value into
argparse's one-line usage error, before any work starts."""

from __future__ import annotations

import argparse
import math

from blora_network.sdxl.blocks import parse_roles

__all__ = ["roles", "weight", "positive_int"]


def roles(value: str) -> list[str]:
    """``content,style`` (or LBW names such as ``OUT0,OUT1``) -> ``["content", "style"]``."""
    try:
        return parse_roles(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def weight(value: str) -> float:
    """A finite number (negative allowed)."""
    try:
        w = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not math.isfinite(w):
        raise argparse.ArgumentTypeError(f"a weight must be a finite number, not {value!r}")
    return w


def positive_int(value: str) -> int:
    """A whole number of at least 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n
