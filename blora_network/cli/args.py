"""Argument types and actions the subcommands share: each turns a bad value into argparse's one-line
usage error, before any work starts."""

from __future__ import annotations

import argparse
import functools
import math

from blora_network.sdxl.blocks import SDXL_BLOCKS, lookup_sdxl_block

__all__ = ["block_names", "block_weight", "block_file", "weight", "positive_int", "positive_number",
           "output_path", "refuse_repeats", "add_output_args", "add_dtype_arg", "DTYPE_CHOICES"]


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


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None


def weight(value: str) -> float:
    """A finite number (negative allowed)."""
    w = _number(value)
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


def positive_number(value: str) -> float:
    """A finite number above 0 (a learning rate)."""
    w = _number(value)
    if not (math.isfinite(w) and w > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {value}")
    return w


def output_path(value: str) -> str:
    """A file or folder name that is not empty (``-o ''`` would mean the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty; give a path")
    return value


_GIVEN = "_options_given"
"""The namespace attribute where :class:`_OnceMixin` notes each option it has seen."""


class _OnceMixin:
    """Refuses an option seen before in this command line: ``extract --blocks style --blocks content``
    is a mistake to name, not a choice to make silently (argparse keeps the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault(_GIVEN, {})
        if self.dest in given:
            before = given[self.dest]
            raise argparse.ArgumentError(self, f"given twice ({before} and {_shown(option_string, values)}); "
                                               "give it once")
        given[self.dest] = _shown(option_string, values)
        super().__call__(parser, namespace, values, option_string)


def _shown(option: str, values) -> str:
    """The value as given (a flag's own name when it takes none)."""
    if values is None or values == []:
        return option
    return ",".join(map(str, values)) if isinstance(values, list) else str(values)


_REPEATABLE = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction, argparse._HelpAction,
               argparse._VersionAction, argparse._SubParsersAction)
"""Actions meant to repeat (``scale --block``, ``combine --block``/``--weight``) or that end parsing."""


def refuse_repeats(parser: argparse.ArgumentParser) -> None:
    """Every option of ``parser`` refuses to be given twice: one rule for every subcommand.

    Positional arguments are left alone (argparse fills each once). Each option's action gets
    :class:`_OnceMixin` in front of its own class, so its type checks and its store stay argparse's.
    """
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (_REPEATABLE, _OnceMixin)):
            continue
        action.__class__ = _once_class(type(action))


@functools.lru_cache(maxsize=None)
def _once_class(cls: type) -> type:
    return type(f"Once{cls.__name__}", (_OnceMixin, cls), {})


DTYPE_CHOICES = ("bf16", "fp16", "fp32")
"""``--dtype``: the library's ``OUTPUT_DTYPES`` (files/algos.py), named here so that --help loads no torch."""


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """``--dtype`` on the writers: e.g. a wider file than an fp8 source, where scaling would round."""
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="write the layers in this dtype (default: each keeps its "
                                                          "own; scaling an fp8 file rounds dW, and says by how much)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """``-o OUT`` and ``--force``, as every writer takes them."""
    p.add_argument("-o", "--output", required=True, metavar="OUT", type=output_path, help="file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never an input file)")
