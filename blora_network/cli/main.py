"""``blora-network``: the command line for B-LoRA files (also ``python -m blora_network``).

Argument parsing and printing only; the work is in the library. Every subcommand is one
:class:`~blora_network.cli.subcommand.Subcommand`, defined beside its handler in :mod:`.files` (the file
tools) or :mod:`.training` (the run around training). A handler returns ``(data, lines)``: the JSON
document for ``--json``, and the lines to print otherwise. :func:`main` owns the rest, once for all:

- every problem the user can fix ends as one line on stderr and exit status 1 (2 for a wrong
  command line, with that subcommand's usage and the closest option), never a traceback;
- with ``--json``, stdout holds exactly one JSON document: anything else written while the
  work runs (a library's log lines) goes to stderr;
- a closed pipe (``| head``) ends the command quietly;
- Ctrl-C and SIGTERM end with one line that says what became of each file the command was
  writing (replaced, untouched, not written), from the library's record of its writes, and exit
  status 128 + the signal's number;
- no option may be given twice (:func:`.args.refuse_repeats`).

Nothing here imports torch, so ``--help`` and usage errors are instant.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import signal
import sys
import threading
from dataclasses import asdict, is_dataclass
from typing import Any, Iterator, Optional, Sequence

from blora_network import __version__
from blora_network.errors import BLoraError, Terminated
from blora_network.files import writes

from .args import refuse_repeats
from .files import FILE_COMMANDS
from .subcommand import Subcommand, printable
from .training import TRAINING_COMMANDS

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

PROG = "blora-network"
_ORDER = ("presets", "plan", "inspect", "analyze", "split", "combine", "scale", "extract", "convert", "demo",
          "recipe", "check")
_BY_NAME = {c.name: c for c in FILE_COMMANDS + TRAINING_COMMANDS}
SUBCOMMANDS: tuple[Subcommand, ...] = tuple(_BY_NAME[name] for name in _ORDER)
"""Every subcommand, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="B-LoRA tools for kohya-format SDXL LoRA files: see what a file holds and where its change "
                    "is, split it into content/style/layout, combine the content of one with the style of "
                    "another, scale blocks, extract B-LoRA blocks from a whole-UNet LoRA, convert diffusers names.",
        epilog="examples:\n"
               "  blora-network inspect me.safetensors\n"
               "  blora-network analyze whole_unet.safetensors --plot whole_unet.png\n"
               "  blora-network combine --content dog.safetensors --style ink.safetensors --style-weight 0.8 -o dog_ink.safetensors\n"
               "run 'blora-network COMMAND --help' for each command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description,
                           epilog="example:\n" + command.example, formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(p)
        if command.json:
            p.add_argument("--json", action="store_true", help="print one JSON document for scripts (logs go to stderr)")
        p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
        p.set_defaults(_command=command, _parser=p)
        refuse_repeats(p)
    return parser


def _closest_options(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """``; did you mean --style?`` for an option that is not the subcommand's."""
    options = [s for action in parser._actions for s in action.option_strings if action.help != argparse.SUPPRESS]
    hints = []
    for word in unknown:
        if not word.startswith("-"):
            continue
        flag = word.split("=", 1)[0]
        close = difflib.get_close_matches(flag.replace("_", "-"), options, n=1, cutoff=0.6)
        if close and close[0] not in hints:
            hints.append(close[0])
    return f"; did you mean {' or '.join(hints)}?" if hints else ""


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While the work runs, fd 1 is fd 2: a library printing or logging to stdout (LyCORIS logs
    there, in colour) cannot get in front of the JSON document."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _to_json(data: Any) -> str:
    return json.dumps(asdict(data) if is_dataclass(data) else data, indent=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 a problem with the input, 2 a wrong command line)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command: Optional[Subcommand] = getattr(args, "_command", None)
    if command is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 2
    if unknown:
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}{_closest_options(args._parser, unknown)}")
    prefix = f"{PROG} {command.name}: error:"
    as_json = bool(getattr(args, "json", False))
    fates: list = []
    data: Any = None
    try:
        try:
            with _stdout_to_stderr() if as_json else contextlib.nullcontext(), _sigterm_interrupts(), \
                    writes.journal() as fates:
                data, lines = command.run(args)
        except (BLoraError, OSError) as e:  # OSError: disk full, permission denied, a name too long...
            print(f"{prefix} {_one_line(e)}", file=sys.stderr)
            return 1
        except MemoryError:
            print(f"{prefix} out of memory; close other programs or use a machine with more memory", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            print(f"{PROG} {command.name}: {_interrupted(e, fates)}", file=sys.stderr)
            return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)
        except Exception as e:  # a bug of ours: still one line, and an exit status of its own
            print(f"{prefix} unexpected {type(e).__name__}: {_one_line(e)} (this is a bug in blora-network "
                  f"{__version__}; please report it with the command line)", file=sys.stderr)
            return 3
        print(_to_json(data) if as_json else "\n".join(lines))
        sys.stdout.flush()
        return int(getattr(data, "exit_status", 0))  # check: 1 when the run it read would fail
    except BrokenPipeError:  # `blora-network ... | head`: the reader has all it wanted; the verdict stands
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return int(getattr(data, "exit_status", 0))


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a job scheduler) ends the command as Ctrl-C does: cleanups run."""
    def _raise(signum, frame):
        raise Terminated(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(e: KeyboardInterrupt, fates: Sequence[writes.FileFate]) -> str:
    """``terminated (SIGTERM); out.safetensors is untouched (...)``: the truth about each file."""
    what = f"terminated ({signal.Signals(e.signum).name})" if isinstance(e, Terminated) else "interrupted"
    if not fates:
        return f"{what} before any file was written"
    return f"{what}; " + "; ".join(f.describe() for f in fates)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, BLoraError) and e.errno and e.filename:
        e = writes.describe_os_error(e.filename, e.errno, "cannot use this path")  # not a bare "[Errno 36]"
    return printable(" ".join(str(e).split()))
