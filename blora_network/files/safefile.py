"""Every read and write of a weights file: clear errors on bad files, atomic writes, kohya's hashes.

Why this exists: a B-LoRA run costs hours, and the tools rewrite files users care about.
So every reading problem becomes one :class:`LoraFileError` naming the file, and every write
goes to a temporary file in the target folder that is renamed over the target only once it
is complete.

The pickle policy, in one place: the file tools read ``.safetensors`` only (they need its
header, its metadata and its lazy reads), and refuse a pickle by its suffix. Training reads
(``--network_weights``, ``--base_weights``, ``--dim_from_weights``: :func:`load_weights_file`)
also accept sd-scripts' ``.pt``/``.ckpt`` saves, through ``torch.load(weights_only=True)``,
whose unpickler builds only tensors and plain containers and runs no code from the file.
No pickle is ever given to the full unpickler.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from blora_network.errors import LoraFileError, count

from . import writes
from .algos import all_finite
from .metadata import HASH_KEYS

logger = logging.getLogger("blora_network")

__all__ = [
    "PICKLE_SUFFIXES",
    "SAFETENSORS",
    "MAX_METADATA_BYTES",
    "model_hashes",
    "open_safetensors",
    "read_metadata",
    "load_tensors",
    "load_weights_file",
    "check_output_path",
    "atomic_target",
    "write_error",
    "stale_temporaries",
    "remove_stale_temporaries",
    "make_folders",
    "remove_folders",
    "read_header_layout",
    "write_safetensors_hashed",
    "save_pickle",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
SAFETENSORS = (".safetensors",)
"""The suffix the tools write: sd-scripts, ComfyUI and A1111 list LoRA files by it."""
MAX_METADATA_BYTES = 16 * 1024 * 1024
"""A header larger than this is refused: metadata is untrusted text, not a place for data."""
_LEGACY_START, _LEGACY_END = 0x100000, 0x110000
"""sd-scripts' ``sshs_legacy_hash``: SHA-256 of this byte window of the saved file."""


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(
            f"{path}: {path.suffix} files are Python pickles; the blora-network tools read .safetensors "
            "only. Convert it once (torch.load(..., weights_only=True) then safetensors.torch.save_file) "
            "and use the .safetensors file."
        )


def _check_header(path: Path) -> tuple[dict, int, int]:
    """Read the 8-byte header length and the JSON header ourselves, for errors that teach.
    Returns the parsed header, the offset where tensor data starts, and the file size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            _header_only(f)
            head = f.read(8)
            if len(head) < 8:
                raise LoraFileError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            n = int.from_bytes(head, "little")
            pickled = _pickle_kind(head)
            if pickled and (n > MAX_METADATA_BYTES or n + 8 > size or f.read(1) != b"{"):
                raise LoraFileError(f"{path}: this is {pickled} renamed .safetensors, not a safetensors file; "
                                    "give it its real suffix (.pt/.ckpt), or convert it once (torch.load(..., "
                                    "weights_only=True) then safetensors.torch.save_file)")
            f.seek(8)
            if n > MAX_METADATA_BYTES or n + 8 > size:
                hint = "the file is truncated" if n <= MAX_METADATA_BYTES else "this is not a safetensors file"
                raise LoraFileError(
                    f"{path}: not a readable safetensors file: header says {n} bytes but the file "
                    f"has {size} ({hint}; re-download or re-save it)"
                )
            raw = f.read(n)
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except LoraFileError:
        raise
    except FileNotFoundError:
        raise LoraFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LoraFileError(f"{path}: is a folder, not a .safetensors file") from None
    except PermissionError:
        raise LoraFileError(f"{path}: permission denied") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise LoraFileError(f"{path}: not a safetensors file (its header is not valid JSON: {e})") from None
    try:
        data_end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
             and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2),
            default=0,
        )
    except (TypeError, ValueError):
        raise LoraFileError(f"{path}: not a safetensors file (its header has malformed data_offsets)") from None
    if 8 + n + data_end > size:
        raise LoraFileError(
            f"{path}: truncated safetensors file: its header describes {8 + n + data_end} bytes but "
            f"only {size} are there (the download or the save did not finish; get the file again)"
        )
    return header, 8 + n, size


def _pickle_kind(head: bytes) -> Optional[str]:
    """What the first bytes say a file is when they are a pickle's: ``torch.save``'s zip archive
    (``PK``) or a bare pickle (protocol 2-5 begins with 0x80 and the protocol number)."""
    if head[:4] == b"PK\x03\x04":
        return "a torch.save file (a zip archive holding a pickle)"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return f"a Python pickle (protocol {head[1]})"
    return None


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, *, check: bool = True) -> Iterator:
    """``safe_open`` with our errors: a lazy handle that reads only the tensors asked for.

    ``check=False`` skips our own reading of the header, for a file whose header was just
    read and checked (safetensors still validates it; its errors still become ours).

    >>> with open_safetensors("lora.safetensors") as f:   # doctest: +SKIP
    ...     up = f.get_tensor(next(iter(f.keys())))
    """
    p = Path(path)
    _refuse_pickle(p)
    if check:
        _check_header(p)
    try:
        handle = safe_open(str(p), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
        raise LoraFileError(f"{p}: corrupt safetensors file ({e})") from None
    with handle as f:
        yield f


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (empty dict when it has none)."""
    with open_safetensors(path) as f:
        return dict(f.metadata() or {})


def load_tensors(path: str | os.PathLike, keys: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Load all tensors, or only ``keys``, from a safetensors file onto the CPU."""
    p = Path(path)
    with open_safetensors(p) as f:
        wanted = list(f.keys()) if keys is None else list(keys)
        out = {}
        for k in wanted:
            try:
                out[k] = f.get_tensor(k)
            except Exception as e:
                raise LoraFileError(f"{p}: cannot read tensor {k!r} ({e})") from None
        return out


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` exactly as sd-scripts computes them.

    sd-webui-additional-networks and A1111 read these instead of hashing the file. Both are
    taken over the file as it would be saved with only the ``ss_*`` metadata: the model hash
    is the SHA-256 of the tensor data after the header, the legacy hash 8 hex digits of the
    SHA-256 of the 64 KiB at offset 1 MiB.
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = st_save(dict(tensors), ss_only)
    n = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(memoryview(blob)[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(blob)[_LEGACY_START:_LEGACY_END]).hexdigest()[:8]
    return model_hash, legacy_hash


def check_output_path(path: str | os.PathLike, *, overwrite: bool, inputs: Sequence = (), option: str = "-o",
                      suffix: str = ".safetensors", suffixes: Sequence[str] = ()) -> Path:
    """Refuse an output we must not or cannot write, before any work is done.

    An input is never overwritten, not even with ``overwrite``. ``option`` and ``suffix`` are
    how the messages name the command-line option and the file type (``--plot``, ``.png``);
    ``suffixes``, when given, are the only endings accepted (sd-scripts, ComfyUI and A1111 list
    LoRAs by their ``.safetensors`` suffix, so a file without it would silently not show up).
    """
    if not str(path).strip():
        raise LoraFileError(f"{option} {str(path)!r}: an empty file name; give a file name ending in {suffix}")
    try:
        return _check_output_path(Path(path), overwrite, inputs, option, suffix, suffixes)
    except LoraFileError:
        raise
    except OSError as e:  # a name too long, a folder we may not look into
        raise write_error(Path(path), e, "cannot use this path") from None


def _check_output_path(p: Path, overwrite: bool, inputs: Sequence, option: str, suffix: str,
                       suffixes: Sequence[str]) -> Path:
    if p.is_dir():  # before the suffix: "add .safetensors" would be the wrong fix for a folder
        raise LoraFileError(f"{p}: is a folder; give a file name ending in {suffix}, e.g. {p / ('out' + suffix)}")
    if suffixes and p.suffix.lower() not in suffixes:
        hint = p.with_name(p.name + suffixes[0]) if p.suffix.lower() not in (".pt", ".ckpt") else p.with_suffix(suffixes[0])
        raise LoraFileError(f"{p}: the output name must end in {' or '.join(suffixes)} (the UIs and sd-scripts list "
                            f"LoRA files by it); did you mean {hint}?")
    for src in inputs:
        same = False
        with contextlib.suppress(OSError):
            same = p.exists() and os.path.samefile(p, src)
        if same:
            raise LoraFileError(f"{p}: refusing to write over an input file; choose another {option} path")
    if p.exists() and not overwrite:
        raise LoraFileError(f"{p}: already exists; pass --force to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise LoraFileError(f"{p}: {parent} is a file, not a folder; give a folder for the output")
    if not parent.is_dir():
        raise LoraFileError(f"{p}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise LoraFileError(f"{p}: folder {parent} is not writable")
    return p


# -- writing: user-actionable OS errors ---------------------------------------------------------------

_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_error(path: Path, error: BaseException, what: str = "cannot write") -> Optional[LoraFileError]:
    """A failed write as one line naming the target, the errno's meaning and a fix; None when
    ``error`` is not an OS error (a bug, which must stay visible as one).

    safetensors' writer reports OS errors as text (``... (os error 28)``); that number is read back.
    """
    if isinstance(error, LoraFileError):
        return error
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
        found = _RUST_OS_ERROR.search(str(error))
        if found is None:
            return None if not isinstance(error, OSError) else LoraFileError(f"{path}: {what}: {error}")
        code = int(found.group(1))
    return LoraFileError(writes.describe_os_error(path, code, what))


# -- writing: temporary files and what is left of them -------------------------------------------------

_TMP_TAG = ".blora-tmp-"
_TMP_NAME = re.compile(r"^\..*\.blora-tmp-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{8}$")
STALE_AFTER_S = 6 * 3600
"""A temporary file untouched this long is stale whoever wrote it. A live write keeps writing its
file (a 2 GB save takes minutes, its fsync seconds), so no live write is this old; the PID test
below cannot see writers on another machine or in another PID namespace, this rule can."""


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _temp_name(p: Path) -> str:
    """A fresh name in the target's folder (same filesystem, so the final rename is atomic),
    ``.NAME.blora-tmp-HOST-PID-XXXXXXXX``, so that what a SIGKILL leaves is known as ours. Named
    before it is created, so that a signal arriving just after the creation still finds it."""
    folder = p.parent if str(p.parent) else Path(".")
    stem = p.name[:100]  # the target's name may be near NAME_MAX; the temporary one must still fit
    return str(folder / f".{stem}{_TMP_TAG}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


def _create(p: Path, tmp: str) -> None:
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as e:  # e.g. root on a read-only mount, where os.access says yes
        denied = e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        folder = Path(tmp).parent
        raise write_error(p, e, f"folder {folder} is not writable" if denied else "cannot write") from None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine; True when we cannot tell. Never on Windows, where
    ``os.kill(pid, 0)`` would terminate that process: there only the age rule removes leftovers."""
    if pid <= 0 or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def stale_temporaries(folder: Path, now: Optional[float] = None) -> list[Path]:
    """Our temporary files in ``folder`` that no live write owns: left by a SIGKILL, a power cut or
    an OOM kill. Stale when written on this machine by a process that is gone, or untouched for
    :data:`STALE_AFTER_S` (a PID on another machine means nothing here)."""
    now = time.time() if now is None else now
    host, out = _host_tag(), []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        m = _TMP_NAME.match(entry.name)
        if m is None:
            continue
        with contextlib.suppress(OSError):
            if not entry.is_file(follow_symlinks=False):
                continue
            gone = m["host"] == host and not _pid_alive(int(m["pid"]))
            if gone or now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S:
                out.append(Path(entry.path))
    return out


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove :func:`stale_temporaries`, saying so in one log line; returns what was removed."""
    removed, size = [], 0
    for path in stale_temporaries(folder):
        with contextlib.suppress(OSError):
            n = path.stat().st_size
            path.unlink()
            removed.append(path)
            size += n
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        logger.warning("%s: removed %s (%d bytes) left by a killed write: %s", folder,
                       count(len(removed), "temporary file"), size, names)
    return removed


def make_folders(folder: Path) -> list[Path]:
    """``mkdir -p``, returning the folders it made (outermost first), for :func:`remove_folders`."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise LoraFileError(f"{folder}: is a file, not a folder; give a folder for the output")
    made = []
    for f in reversed(missing):
        try:
            f.mkdir()
        except OSError as e:
            remove_folders(made)
            raise write_error(f, e, "cannot create the output folder") from None
        made.append(f)
    return made


def remove_folders(made: Sequence[Path]) -> None:
    """Undo :func:`make_folders` after a failure: each folder it made, innermost first, if empty."""
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def atomic_target(p: Path) -> Iterator[str]:
    """A temporary path beside ``p`` to write to; it becomes ``p`` only when the block ends
    without an error (renamed, with the permissions a plain ``open`` would give), and is
    removed otherwise. So ``p`` is always absent, as it was, or complete.

    SIGTERM is treated as Ctrl-C meanwhile (:mod:`.writes`); what happened to ``p`` is recorded
    in the open journals; an OS error the user can act on (full disk, permissions) becomes one
    :class:`LoraFileError` naming ``p``; stale temporary files of killed writes are removed first.
    """
    p = Path(p)
    with writes.sigterm_raises():
        fate = writes.record(p)
        tmp, renaming = None, False
        try:
            remove_stale_temporaries(p.parent if str(p.parent) else Path("."))
            tmp = _temp_name(p)
            _create(p, tmp)
            yield tmp
            os.chmod(tmp, _final_mode(p))
            renaming = True
            os.replace(tmp, p)
            fate.state = writes.WRITTEN
        except BaseException as e:
            if renaming and not os.path.lexists(tmp):  # interrupted just after the rename: p is complete
                fate.state = writes.WRITTEN
                raise
            fate.state = writes.ABANDONED
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                except OSError:
                    fate.leftover = tmp
            error = write_error(p, e) if isinstance(e, Exception) else None
            if error is not None and error is not e:
                raise error from None
            raise


def read_header_layout(path: str | os.PathLike) -> tuple[dict, int, int]:
    """The parsed JSON header (names, dtypes, shapes, offsets, ``__metadata__``), the file offset
    where tensor data starts (``data_offsets`` count from there) and the file size, from one
    read of the header and no read of tensor data."""
    p = Path(path)
    _refuse_pickle(p)
    return _check_header(p)


def _header_only(f) -> None:
    """No readahead on this handle: it reads the header, and the kernel would otherwise read
    megabytes of tensor data after it (the tools read only the tensors they keep)."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)


def _compact_json(obj) -> bytes:
    """JSON as safetensors writes its header: no spaces, UTF-8, the same escapes."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_safetensors_hashed(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Optional[Mapping[str, str]] = None,
    *,
    overwrite: bool = True,
    inputs: tuple = (),
    on_bytes=None,
    durable: bool = True,
) -> tuple[Path, str, str]:
    """Write ``tensors`` atomically with fresh ``sshs_model_hash``/``sshs_legacy_hash`` in the metadata.

    A temporary file beside the target, fsync, rename: a crash or an error at any point
    leaves the target absent or as it was before.

    The same values as :func:`model_hashes`, without a second in-memory serialization: the
    tensors are hashed in the order safetensors lays them out, in a thread, while the file
    is written and synced (hashlib and the writer release the GIL); the file is written once
    with fixed-width placeholders that are patched in place before the rename. The layout is
    checked against the written header; if it ever differs, the data section is hashed from
    the file instead. ``on_bytes(n)`` reports hashing progress.

    ``durable=False`` skips the fsync before the rename. The write stays atomic against a
    killed process or a failed write (the target is absent or as it was); only a power cut
    or kernel crash within the kernel's writeback delay (~30 s) could then leave a new
    target empty. The file tools use it for new files (their inputs are never touched, so
    nothing is lost) and keep the fsync when replacing a file.
    Returns ``(path, sshs_model_hash, sshs_legacy_hash)``.
    """
    p = check_output_path(path, overwrite=overwrite, inputs=inputs)
    meta = {str(k): str(v) for k, v in (metadata or {}).items() if k not in HASH_KEYS}
    meta["sshs_model_hash"] = "0" * 64
    meta["sshs_legacy_hash"] = "0" * 8
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    order = _data_order(contiguous)
    hasher = _HashInOrder(contiguous, order, on_bytes)
    with atomic_target(p) as tmp:
        try:
            hasher.start()  # inside the try: a signal can land while start() waits for the thread to run
            st_save_file(contiguous, tmp, metadata=meta)
            with open(tmp, "rb+") as f:
                if durable:
                    os.fsync(f.fileno())  # the data goes to disk while the hash thread finishes
                streamed = hasher.result()
                n = int.from_bytes(f.read(8), "little")
                raw = f.read(n)
                model_hash, legacy_hash = _file_hashes(f, raw, meta, order, streamed)
                if legacy_hash is None:  # a header layout we did not expect, or one over 1 MiB
                    model_hash, legacy_hash = model_hashes(contiguous, meta)
                _patch_placeholders(f, raw, meta, {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash})
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        except BaseException:
            hasher.stop()  # a failed or interrupted write: the hash is not needed
            raise
        finally:
            hasher.join()  # never leave the thread reading tensors of a failed write
    return p, model_hash, legacy_hash


class _HashInOrder:
    """SHA-256 of the tensors in the order safetensors lays them out, in a thread (hashlib
    releases the GIL), so the hash costs no time beside the write."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], order: list[str], on_bytes=None):
        import threading

        self._tensors, self._order, self._on_bytes = tensors, order, on_bytes
        self._out: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sshs-hash", daemon=True)

    def _run(self) -> None:
        try:
            h = hashlib.sha256()
            for k in self._order:
                if self._stop.is_set():
                    return
                t = self._tensors[k]
                if t.numel():
                    h.update(t.reshape(-1).view(torch.uint8).numpy())
                    if self._on_bytes is not None:
                        self._on_bytes(t.numel() * t.element_size())
            self._out["model"] = h.hexdigest()
        except BaseException as e:  # surfaced in the caller's thread
            self._out["error"] = e

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> None:
        """Wait for the thread, even through Ctrl-C or SIGTERM (raised again once it has ended): a
        thread left inside torch when the interpreter exits aborts the process ("terminate called")."""
        interrupted = None
        while self._thread.is_alive():
            try:
                self._thread.join()
            except KeyboardInterrupt as e:
                interrupted = e
                self._stop.set()
        if interrupted is not None:
            raise interrupted

    def result(self) -> str:
        self.join()
        if "error" in self._out:
            raise self._out["error"]
        return self._out["model"]


def _file_hashes(f, raw: bytes, meta: Mapping[str, str], order: list[str], streamed: str) -> tuple[Optional[str], Optional[str]]:
    """``(model hash, legacy hash)`` of the file just written, as sd-scripts would compute them.

    sd-scripts hashes the file as saved with only the ss_* metadata: its data section is ours
    byte for byte; its header differs only in ``__metadata__``. ``(None, None)`` when the
    written header is not the layout we expect (the caller then serializes once more).
    """
    header = json.loads(raw)
    model_hash = streamed if _layout_is(header, order) else None
    if header.get("__metadata__") != meta or len(_compact_json(header)) != len(raw.rstrip(b" ")):
        return None, None
    ss_header = dict(header)
    ss_header["__metadata__"] = {k: v for k, v in meta.items() if k.startswith("ss_")}
    n_ss = len(_compact_json(ss_header))
    n_ss += (8 - n_ss % 8) % 8
    data_start = 8 + len(raw)
    if model_hash is None:
        model_hash = _hash_file_data(f, data_start)
    legacy_hash = _legacy_window_hash(f, data_start, 8 + n_ss)
    return (model_hash, legacy_hash) if legacy_hash is not None else (None, None)


def _patch_placeholders(f, raw: bytes, meta: Mapping[str, str], values: Mapping[str, str]) -> None:
    """Overwrite each fixed-width placeholder in the written header with its value, in place."""
    for key, value in values.items():
        needle = _compact_json(key) + b":" + _compact_json(meta[key])
        at = raw.find(needle)
        if at < 0 or raw.find(needle, at + 1) >= 0:
            raise RuntimeError(f"cannot place {key} in the header")
        f.seek(8 + at + len(needle) - len(value) - 1)
        f.write(value.encode("ascii"))


def _data_order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The order safetensors writes these tensors in: by dtype, in the order safetensors itself
    gives (asked with one empty stand-in per dtype), then by name. A guess that safetensors
    ever contradicts only costs speed: the caller checks the written layout."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for k, v in tensors.items():
        by_dtype.setdefault(v.dtype, []).append(k)
    dtypes = list(by_dtype)
    if len(dtypes) > 1:
        blob = st_save({str(i): torch.empty(0, dtype=dt) for i, dt in enumerate(dtypes)})
        n = int.from_bytes(blob[:8], "little")
        dtypes = [dtypes[int(k)] for k in json.loads(blob[8:8 + n]) if k != "__metadata__"]
    return [k for dt in dtypes for k in sorted(by_dtype[dt])]


def _layout_is(header: Mapping, order: list[str]) -> bool:
    """True when the written data section holds ``order``'s tensors back to back, in that order."""
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    if [k for k, _ in entries] != order:
        return False
    at = 0
    for _, v in entries:
        begin, end = v["data_offsets"]
        if begin != at:
            return False
        at = end
    return True


def _hash_file_data(f, data_start: int) -> str:
    f.seek(data_start)
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(16 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _legacy_window_hash(f, data_start: int, ss_data_start: int) -> Optional[str]:
    """sd-scripts' legacy hash (the 64 KiB at 1 MiB of the file saved with ss_* metadata only),
    read from our file's data section; None when that window starts inside the ss_* header."""
    if ss_data_start > _LEGACY_START:
        return None
    f.seek(data_start + _LEGACY_START - ss_data_start)
    return hashlib.sha256(f.read(_LEGACY_END - _LEGACY_START)).hexdigest()[:8]


def _final_mode(p: Path) -> int:
    """The permissions a plain ``open(p, "w")`` would give (mkstemp makes 0600 files), or the
    replaced file's own."""
    try:
        return p.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask




def save_pickle(path, tensors: Mapping[str, torch.Tensor]) -> None:
    """``torch.save`` a training state dict atomically (sd-scripts' ``--save_model_as pt/ckpt``)."""
    with atomic_target(check_output_path(path, overwrite=True, suffix=Path(path).suffix)) as tmp:
        with open(tmp, "wb") as f:  # a file object: a full disk is then an OSError with its errno, not
            torch.save(dict(tensors), f)  # torch's "unexpected pos" RuntimeError


def load_weights_file(file) -> dict[str, torch.Tensor]:
    """A training weights file's tensors: safetensors, or a pickle loaded with ``weights_only=True``.

    Refuses a file with no tensors, a pickle that is not a plain ``{name: tensor}`` dict, and a
    tensor holding NaN or Inf (a diverged save, which would make every image black).
    """
    path = Path(file)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not path.is_file():
            raise LoraFileError(f"{path}: no such file")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors are many kinds; all mean the same to the user
            raise LoraFileError(
                f"{path}: refused to load this pickle file safely ({type(e).__name__}); only plain tensors "
                "are accepted from .pt/.ckpt files. Prefer .safetensors"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise LoraFileError(f"{path}: not a LoRA state dict (expected a dict of tensors)")
        weights = state
    else:
        weights = load_tensors(path)
    if not weights:
        raise LoraFileError(f"{path}: the file holds no tensors")
    for key, tensor in weights.items():
        if not all_finite(tensor):
            raise LoraFileError(
                f"{path}: tensor {key} holds NaN or Inf; the training that wrote it diverged. Use an earlier save"
            )
    return weights
