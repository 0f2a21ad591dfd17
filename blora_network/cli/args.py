"""Argument types and actions the subcommands share: each turns a bad value into argparse's one-line
usage error, before any work starts."""

from __future__ import annotations

import argparse
import math

from blora_network.sdxl.blocks import parse_roles

__all__ = ["roles", "weight", "positive_int", "Once", "add_output_args"]


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


class Once(argparse.Action):
    """An option that may be given once: ``combine --content A --content B`` is a mistake to name,
    not a choice to make silently (argparse keeps the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        if before is not None and before != self.default:
            raise argparse.ArgumentError(self, f"given twice ({before} and {values}); give it once")
        setattr(namespace, self.dest, values)


def add_output_args(p: argparse.ArgumentParser) -> None:
    """``-o OUT`` and ``--force``, as every writer takes them."""
    p.add_argument("-o", "--output", required=True, metavar="OUT", action=Once, help="file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never an input file)")
