"""The unit of the command line: one :class:`Subcommand` (arguments beside handler), and what handlers share
to turn a library result into text (sizes, progress bars, text from files made safe to print)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

__all__ = ["Subcommand", "Output", "human_size", "progress_bar", "printable"]

Output = tuple[Any, list[str]]
"""What a handler returns: the ``--json`` document (a dataclass or plain data) and the text lines."""


@dataclass(frozen=True)
class Subcommand:
    """One ``blora-network NAME``: its help texts, its arguments and its handler."""

    name: str
    help: str
    description: str
    example: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Output]
    json: bool = True
    """Whether it offers ``--json``."""


def human_size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def progress_bar(args) -> Optional[object]:
    """A tqdm factory for the library's ``progress=``, or None with ``--json`` or ``--no-progress``."""
    if getattr(args, "json", False) or getattr(args, "no_progress", False):
        return None
    from tqdm import tqdm

    # bars appear only for work over a second, and only on a terminal (disable=None)
    return partial(tqdm, delay=1.0, leave=False, file=sys.stderr, dynamic_ncols=True, disable=None)


def printable(text: str) -> str:
    """Text from a file (metadata, key names) with control characters shown as escapes.

    Metadata is anybody's text: an ESC or BEL printed raw could clear the screen, retitle the
    terminal or hide lines. ``--json`` escapes them by itself.
    """
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)
