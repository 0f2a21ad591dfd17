"""What became of each file a command set out to write, and SIGTERM during a write.

Why this exists: the last line a user reads after Ctrl-C or ``kill`` must be true. A write
goes through three states (temporary file being filled, renamed over the target, or
abandoned and its temporary file removed), and only the writer knows which one it reached.
Each write records its fate here; the CLI opens a :func:`journal` around a command and reads
it back to say "replaced", "untouched" or "not written" per file.

SIGTERM (``timeout``, ``kill``, a job scheduler) kills a Python process without running its
``finally`` blocks, which would leave a temporary file as large as the output. While a
temporary file exists, :func:`sigterm_raises` turns SIGTERM into :class:`Terminated` (a
``KeyboardInterrupt``, so every cleanup that runs on Ctrl-C runs on it too); when nobody had
a SIGTERM handler before, the signal is delivered again once the file is cleaned up, so the
process still ends as killed by SIGTERM.

Torch-free: the CLI imports it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from blora_network.errors import Terminated

__all__ = ["FileFate", "journal", "record", "sigterm_raises", "describe_os_error"]

WRITING, WRITTEN, ABANDONED = "writing", "written", "abandoned"


@dataclass
class FileFate:
    """One write: its target, whether a file was there before, and how far the write got."""

    path: Path
    existed: bool
    state: str = WRITING
    """``writing`` (temporary file open), ``written`` (renamed over the target) or ``abandoned``."""
    leftover: Optional[str] = None
    """A temporary file that could not be removed, if any."""

    def describe(self) -> str:
        """``out.safetensors was replaced``, ``... is untouched``, ``... was not written``."""
        if self.state == WRITTEN and not self.existed and not os.path.lexists(self.path):
            text = f"{self.path} was written, then removed again (the command did not finish)"
        elif self.state == WRITTEN:
            text = f"{self.path} was {'replaced' if self.existed else 'written'} (complete)"
        elif self.existed:
            text = f"{self.path} is untouched (the write was stopped before replacing it)"
        else:
            text = f"{self.path} was not written"
        if self.leftover:
            text += f"; delete its temporary file {self.leftover}"
        return text


@dataclass
class _Journal:
    fates: list[FileFate] = field(default_factory=list)


_open: list[_Journal] = []


@contextlib.contextmanager
def journal() -> Iterator[list[FileFate]]:
    """The fates of the writes made inside the block, in order (the CLI opens one per command)."""
    j = _Journal()
    _open.append(j)
    try:
        yield j.fates
    finally:
        _open.remove(j)


def record(path: Path) -> FileFate:
    """A new write to ``path``, in every open journal."""
    fate = FileFate(Path(path), existed=os.path.lexists(path))
    for j in _open:
        j.fates.append(fate)
    return fate


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block, unless someone handles it already.

    Only the main thread can set handlers; a handler set by the program (the CLI's, an
    accelerate or job-runner handler) or SIG_IGN is left alone, as the owner's choice.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # end as SIGTERM would have, now that the file is cleaned up
        raise  # pragma: no cover - only when the signal is blocked
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


_FIXES = {
    errno.ENOSPC: "free space on that disk or write elsewhere",
    errno.EDQUOT: "free space within your disk quota or write elsewhere",
    errno.EFBIG: "the file system or the process's file size limit (ulimit -f) is too small for it; write to "
                 "another disk or raise the limit",
    errno.EACCES: "write to a folder you may write to, or change its permissions",
    errno.EPERM: "write to a folder you may write to, or change its permissions",
    errno.EROFS: "that file system is read-only; write elsewhere",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.EIO: "the disk or network share failed; check it and write elsewhere",
    errno.ENOENT: "a folder on the way is missing or was removed; create it or write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder; fix the path",
    errno.EXDEV: "write within one file system",
}


def describe_os_error(path, code: int, what: str = "cannot write") -> str:
    """``PATH: cannot write: No space left on device (ENOSPC); free space ...``: an OS error the user can
    act on, as one line naming the path, the error's meaning and its name, and a fix."""
    name = errno.errorcode.get(code, f"errno {code}")
    return f"{path}: {what}: {os.strerror(code)} ({name}); {_FIXES.get(code, 'use another path')}"
