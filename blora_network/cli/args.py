"""Argument types and actions the subcommands share: each turns a bad value into argparse's one-line
usage error, before any work starts."""

from __future__ import annotations

import argparse
import math

from blora_network.sdxl.blocks import SDXL_BLOCKS, lookup_sdxl_block, parse_roles

__all__ = ["roles", "block_names", "block_weight", "block_file", "weight", "positive_int", "Once", "add_output_args"]


def roles(value: str) -> list[str]:
    """``content,style`` (or LBW names such as ``OUT0,OUT1``) -> ``["content", "style"]``."""
    try:
        return parse_roles(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def block_names(value: str) -> list[str]:
    """``IN08,OUT00,OUT03`` (any SDXL block by any name: roles, LBW, LDM, diffusers) -> the names, each known."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no block named; use names such as content,style or "
                                         f"{','.join(b.name for b in SDXL_BLOCKS[-3:])}")
    for name in names:
        try:
            lookup_sdxl_block(name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def _pair(value: str, what: str) -> tuple[str, str]:
    name, eq, rest = value.partition("=")
    if not eq or not name.strip() or not rest.strip():
        raise argparse.ArgumentTypeError(f"{value!r}: write NAME={what}, e.g. OUT01={'0.5' if what == 'W' else 'style.safetensors'}")
    try:
        lookup_sdxl_block(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name.strip(), rest.strip()


def block_weight(value: str) -> tuple[str, float]:
    """``OUT01=0.5`` -> ``("OUT01", 0.5)``: a known block and a finite number."""
    name, w = _pair(value, "W")
    return name, weight(w)


def block_file(value: str) -> tuple[str, str]:
    """``OUT03=other.safetensors`` -> ``("OUT03", "other.safetensors")``."""
    return _pair(value, "FILE")


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
