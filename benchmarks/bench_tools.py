"""Issue 5, part 4: the file tools on a whole-UNet SDXL LoRA, against reading + ``save_file``.

The input is generated: every Linear layer inside sd-scripts' SDXL ``Transformer2DModel``
blocks (attention, ff, proj_in/proj_out) and the Linear / 1x1 conv layers of the
``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` blocks at ``--rank``, and their 3x3 convs at a
conv rank chosen so that the file is about ``--size-mb`` (what ``networks.lora`` with
``conv_dim`` trains), fp16, kohya names. A second file with another seed is the other source
of ``combine``.

Each tool runs as a Python function (in this process, so that ``/proc/self/io`` sees its reads)
next to its lower bound, which does only what any such tool must:

- split:   ``safe_open`` the file, ``get_tensor`` each B-LoRA block's tensors, ``save_file`` one
           file per block (three files);
- extract: the same for the attention layers of content and style, into one file;
- combine: content from file A and style from file B into one file;
- inspect: ``get_tensor`` every tensor of the file once (the tool needs all of them, for NaN/Inf
           and norms) and nothing else; ``inspect --no-norms`` has the same bound.

Timings are warm (inputs in the page cache, outputs deleted between calls), interleaved
(ours and the bound alternate, the order flipping every round) and the ratio is the median
of the per-round ratios. Bytes read come from one cold call per row: the inputs are dropped
from the page cache (``posix_fadvise(DONTNEED)``, checked with ``mincore``), then
``read_bytes`` of ``/proc/self/io`` (disk reads this process caused, readahead included;
``rchar`` does not see ``mmap`` reads) and the pages of the inputs that are resident
afterwards (``mincore``) are both divided by the bytes of the tensors the tool keeps.

The ``diagnostic`` rows show what two parts of our writer cost: "with fsync" runs it as it
runs when an output replaces an existing file (fsync before the rename; new files are not
synced), "hash stubbed out" replaces SHA-256 by a no-op (never shipped: outputs carry fresh
``sshs_*`` hashes).

    python benchmarks/bench_tools.py                       # ~800 MB, rank 128, 3 rounds
    python benchmarks/bench_tools.py --cache               # keep the inputs in /tmp for the next run
    python benchmarks/bench_tools.py --phases              # + where our time goes, by phase
    python benchmarks/bench_tools.py --profile             # + cProfile of each tool (main thread)
    python benchmarks/bench_tools.py --record              # + append the run to RESULTS.md, part 4
    python benchmarks/bench_tools.py --size-mb 100 --rank 16 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import datetime as _dt
import gc
import hashlib
import io
import json
import os
import platform
import pstats
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
try:  # the checkout, when the package is not installed
    import blora_network  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(REPO))

import safetensors  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from blora_network.tools import inspection

from blora_network.files import safefile

from blora_network.tools import transforms  # noqa: E402
from blora_network.sdxl.blocks import BLOCKS  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## 4. File tools"
CACHE = Path(tempfile.gettempdir()) / "blora_bench_tools"
_PAGE = os.sysconf("SC_PAGE_SIZE")
_ATTN = re.compile(r"_attn[12]_(to_q|to_k|to_v|to_out_0)$")
PREFIX = {b.role: "lora_unet_" + b.ldm.replace(".", "_") + "_" for b in BLOCKS}


# -- the input file ---------------------------------------------------------------------------

def unet_layers(rank: int) -> tuple[list[tuple], int]:
    """``[(module path, in, out, kernel, rank or None)]`` as sd-scripts' networks.lora targets them
    (rank None: a 3x3 conv, at the conv rank), and the 3x3 convs' bytes per unit of conv rank (fp16)."""
    from blora_network.sdxl.unet import FULL, build_unet

    unet = build_unet(FULL, device="meta")
    out, per_conv_rank = [], 0
    for name, block in unet.named_modules():
        cls = type(block).__name__
        if cls not in ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
            continue
        for child_name, child in block.named_modules():
            path = f"{name}.{child_name}"
            if isinstance(child, nn.Linear):
                out.append((path, child.in_features, child.out_features, 1, rank))
            elif isinstance(child, nn.Conv2d):
                k = child.kernel_size[0]
                if k == 1 or cls == "Transformer2DModel":
                    out.append((path, child.in_channels, child.out_channels, k, rank))
                else:  # conv_dim
                    out.append((path, child.in_channels, child.out_channels, k, None))
                    per_conv_rank += 2 * (child.in_channels * k * k + child.out_channels)
    return out, per_conv_rank


def plan_file(size_mb: float, rank: int) -> tuple[list[tuple], int]:
    """The layers and the conv rank that make the file about ``size_mb`` MB (1 MB = 10^6 bytes)."""
    layers, per = unet_layers(rank)
    fixed = sum(2 * r * (i * k * k + o) + 2 for _, i, o, k, r in layers if r is not None)
    conv_rank = max(0, round((size_mb * 1e6 - fixed) / per)) if per else 0
    if conv_rank == 0:
        layers = [x for x in layers if x[4] is not None]
    layers = [(p, i, o, k, r if r is not None else conv_rank) for p, i, o, k, r in layers]
    return layers, conv_rank


def write_lora(path: Path, layers: list[tuple], seed: int, rank: int, conv_rank: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for p, fin, fout, k, r in layers:
        m = "lora_unet_" + p.replace(".", "_")
        down = torch.randn(r, fin * k * k, generator=g).mul_(0.02)
        up = torch.randn(fout, r, generator=g).mul_(0.02)
        sd[f"{m}.lora_down.weight"] = down.to(torch.float16).reshape(r, fin, k, k) if k > 1 else down.to(torch.float16)
        sd[f"{m}.lora_up.weight"] = up.to(torch.float16).reshape(fout, r, 1, 1) if k > 1 else up.to(torch.float16)
        sd[f"{m}.alpha"] = torch.tensor(float(r), dtype=torch.float16)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))}),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
        "ss_output_name": f"bench_whole_unet_{seed}",
        "ss_steps": "1000",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "sshs_model_hash": "0" * 64,
        "sshs_legacy_hash": "00000000",
    }
    tmp = path.with_suffix(".partial")
    save_file(sd, str(tmp), metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # clean pages: posix_fadvise(DONTNEED) can drop them
    os.replace(tmp, path)


def input_files(folder: Path, size_mb: float, rank: int) -> tuple[Path, Path, int]:
    layers, conv_rank = plan_file(size_mb, rank)
    paths = [folder / f"whole_unet_{size_mb:g}MB_r{rank}_c{conv_rank}_fp16_seed{seed}.safetensors" for seed in (0, 1)]
    for seed, p in enumerate(paths):
        if not p.exists():
            t = time.perf_counter()
            write_lora(p, layers, seed, rank, conv_rank)
            print(f"generated {p} ({p.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s", flush=True)
    return paths[0], paths[1], conv_rank


# -- reading accounting -----------------------------------------------------------------------

def proc_io() -> dict[str, int]:
    with open("/proc/self/io", encoding="ascii") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def resident(path: Path) -> bytes:
    """Per page of the file: 1 when it is in the page cache (mincore)."""
    libc = _libc()
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        vec = (ctypes.c_ubyte * ((size + _PAGE - 1) // _PAGE))()
        if libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return bytes(v & 1 for v in vec)


def evict(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    res = resident(path)
    return sum(res) <= len(res) // 100


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def data_ranges(path: Path, select: Callable[[str], bool]) -> list[tuple[int, int]]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    start = 8 + n
    return [(start + v["data_offsets"][0], start + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__" and select(k)]


# -- the rows ---------------------------------------------------------------------------------

def select_blocks(roles, attention_only=False) -> Callable[[str], bool]:
    prefixes = tuple(PREFIX[r] for r in roles)

    def sel(key: str) -> bool:
        module = key.partition(".")[0]
        return module.startswith(prefixes) and (not attention_only or bool(_ATTN.search(module)))
    return sel


def bound_write(sources: list[tuple[Path, Callable]], out: Path) -> None:
    """The lower bound: read exactly the kept tensors, ``save_file`` them (source metadata kept)."""
    tensors, meta = {}, None
    with contextlib.ExitStack() as stack:
        for src, sel in sources:
            f = stack.enter_context(safe_open(str(src), framework="pt", device="cpu"))
            meta = meta or dict(f.metadata() or {})
            tensors.update({k: f.get_tensor(k) for k in f.keys() if sel(k)})
        save_file(tensors, str(out), metadata=meta)


def bound_read_all(src: Path) -> None:
    with safe_open(str(src), framework="pt", device="cpu") as f:
        for k in f.keys():
            f.get_tensor(k)


class Row:
    def __init__(self, name, command, ours, bound, inputs, kept, outputs, diagnostic=False):
        self.name, self.command, self.ours, self.bound = name, command, ours, bound
        self.inputs, self.kept, self.outputs, self.diagnostic = inputs, kept, outputs, diagnostic
        self.times = {"ours": [], "bound": []}
        self.cpu = {"ours": [], "bound": []}
        self.cold: dict[str, dict] = {}
        self.check = ""


def make_rows(a: Path, b: Path, out: Path, diagnose: bool) -> list[Row]:
    roles = [r for r in ("content", "style", "layout")]
    split_outs = [out / f"{a.stem}_{r}.safetensors" for r in roles]
    o = out / "out.safetensors"
    cs = ["content", "style"]
    rows = [
        Row("split", "blora-network split A.safetensors --out-dir OUT",
            lambda: transforms.split(a, out_dir=out),
            lambda: [bound_write([(a, select_blocks([r]))], p) for r, p in zip(roles, split_outs)],
            [a], [(a, select_blocks(roles))], split_outs),
        Row("extract", "blora-network extract A.safetensors --blocks content,style -o OUT",
            lambda: transforms.extract(a, cs, o),
            lambda: bound_write([(a, select_blocks(cs, attention_only=True))], o),
            [a], [(a, select_blocks(cs, attention_only=True))], [o]),
        Row("combine", "blora-network combine --content A.safetensors --style B.safetensors -o OUT",
            lambda: transforms.combine([transforms.BlockSource("content", str(a)), transforms.BlockSource("style", str(b))], o),
            lambda: bound_write([(a, select_blocks(["content"])), (b, select_blocks(["style"]))], o),
            [a, b], [(a, select_blocks(["content"])), (b, select_blocks(["style"]))], [o]),
        Row("inspect", "blora-network inspect A.safetensors",
            lambda: inspection.inspect(a), lambda: bound_read_all(a), [a], [(a, lambda k: True)], []),
        Row("inspect --no-norms", "blora-network inspect A.safetensors --no-norms",
            lambda: inspection.inspect(a, norms=False), lambda: bound_read_all(a), [a], [(a, lambda k: True)], []),
    ]
    if diagnose:
        base = rows[:3]
        for label, patch in (("with fsync, as when replacing a file", with_fsync), ("hash stubbed out", no_hash)):
            for r in base:
                rows.append(Row(f"{r.name} ({label})", "diagnostic: " + label, _patched(patch, r.ours), r.bound,
                                r.inputs, r.kept, r.outputs, diagnostic=True))
    return rows


# -- diagnostic stubs (never shipped behaviour) ----------------------------------------------

class _NoHash:
    def __init__(self, *a, **k):
        pass

    def update(self, data):
        pass

    def hexdigest(self):
        return "0" * 64


@contextlib.contextmanager
def with_fsync():
    """Our writer as it runs when an output replaces an existing file: fsync before the rename."""
    real = transforms.write_safetensors_hashed

    def durable(*args, **kwargs):
        kwargs["durable"] = True
        return real(*args, **kwargs)
    transforms.write_safetensors_hashed = durable
    try:
        yield
    finally:
        transforms.write_safetensors_hashed = real


@contextlib.contextmanager
def no_hash():
    real = safefile.hashlib
    safefile.hashlib = type("hashlib", (), {"sha256": _NoHash})
    try:
        yield
    finally:
        safefile.hashlib = real


def _patched(patch, fn):
    def run():
        with patch():
            return fn()
    return run


# -- running ----------------------------------------------------------------------------------

def clean(row: Row, out: Path) -> None:
    for p in out.iterdir():
        p.unlink()




VERBOSE = False


def timed(fn, cpu: list | None = None) -> float:
    """Wall seconds of one call; appends (main-thread CPU s, process CPU s) to ``cpu``."""
    gc.collect()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    m0 = time.thread_time()
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    main = time.thread_time() - m0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if cpu is not None:
        cpu.append((main, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime))
    if VERBOSE:
        print(f"  {getattr(fn, '__qualname__', fn)}: wall {wall:.2f} user {r1.ru_utime - r0.ru_utime:.2f} "
              f"sys {r1.ru_stime - r0.ru_stime:.2f} majflt {r1.ru_majflt - r0.ru_majflt} minflt {r1.ru_minflt - r0.ru_minflt} "
              f"nivcsw {r1.ru_nivcsw - r0.ru_nivcsw} nvcsw {r1.ru_nvcsw - r0.ru_nvcsw}", flush=True)
    return wall


def kept_bytes(row: Row) -> int:
    return sum(hi - lo for src, sel in row.kept for lo, hi in data_ranges(src, sel))


def cold_call(row: Row, which: str, out: Path) -> dict:
    """One call with the inputs out of the page cache: disk reads and pages touched."""
    evicted = all(evict(p) for p in row.inputs)
    before = proc_io()
    t = timed(row.ours if which == "ours" else row.bound)
    after = proc_io()
    res = {p: resident(p) for p in row.inputs}
    kept = kept_bytes(row)
    kept_in_cache = sum(res[src][pg] * _PAGE for src, sel in row.kept for lo, hi in data_ranges(src, sel)
                        for pg in range(lo // _PAGE, (hi + _PAGE - 1) // _PAGE))
    return {
        "evicted": evicted,
        "s": t,
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "rchar": after["rchar"] - before["rchar"],
        "touched": sum(sum(r) * _PAGE for r in res.values()),
        "kept_resident": kept_in_cache,
        "kept": kept,
    }


def check_outputs(row: Row) -> str:
    """Our output holds the bound's tensors, and its sshs_model_hash is the SHA-256 of its data."""
    notes = []
    for p in row.outputs:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(16 << 20), b""):
                h.update(chunk)
        ok = header["__metadata__"].get("sshs_model_hash") == h.hexdigest()
        notes.append("hash ok" if ok else "HASH WRONG")
    return ", ".join(sorted(set(notes)))


def _keys(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def run(rows: list[Row], out: Path, repeats: int, cold: bool) -> None:
    for src in {p for r in rows for p in r.inputs}:
        warm(src)
    # check once that the rows do what they claim: same tensors as the bound, correct hashes
    for row in rows:
        if row.diagnostic or not row.outputs:
            continue
        row.bound()
        bound_keys = {p.name: _keys(p) for p in row.outputs}
        clean(row, out)
        row.ours()
        ours_keys = {p.name: _keys(p) for p in row.outputs}
        if ours_keys != bound_keys:
            raise SystemExit(f"{row.name}: our output's tensors differ from the bound's")
        row.check = "same tensors, " + check_outputs(row)
        clean(row, out)
    for i in range(repeats):
        for row in rows:
            order = ("ours", "bound") if (i + rows.index(row)) % 2 == 0 else ("bound", "ours")
            for which in order:
                row.times[which].append(timed(row.ours if which == "ours" else row.bound, row.cpu[which]))
                clean(row, out)
        print(f"round {i + 1}/{repeats} done", flush=True)
    if cold:
        for row in rows:
            if row.diagnostic:
                continue
            for which in ("ours", "bound"):
                row.cold[which] = cold_call(row, which, out)
                clean(row, out)
        for src in {p for r in rows for p in r.inputs}:
            warm(src)


def ratio(row: Row) -> float:
    return statistics.median(o / b for o, b in zip(row.times["ours"], row.times["bound"]))


def _cpu(samples: list, i: int) -> float:
    return statistics.median(x[i] for x in samples)


def table(rows: list[Row]) -> str:
    head = ["row", "command (our side)", "ours s", "bound s", "ratio", "CPU s ours: main thread / all (bound)", "disk read / kept, ours (bound)",
            "pages touched / kept, ours (bound)", "cold s, ours (bound)", "output check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        med = {k: statistics.median(v) for k, v in row.times.items()}
        if row.cold:
            o, b = row.cold["ours"], row.cold["bound"]
            if o["evicted"] and b["evicted"]:
                rb = f"{o['read_bytes'] / o['kept']:.3f} ({b['read_bytes'] / b['kept']:.3f})"
                tb = f"{o['touched'] / o['kept']:.3f} ({b['touched'] / b['kept']:.3f})"
            else:
                rb = tb = "n/a (page cache not evictable)"
            cs = f"{o['s']:.2f} ({b['s']:.2f})"
        else:
            rb = tb = cs = ""
        lines.append(f"| {row.name} | `{row.command}` | {med['ours']:.3f} | {med['bound']:.3f} | "
                     f"{ratio(row):.2f}x | {_cpu(row.cpu['ours'], 0):.2f} / {_cpu(row.cpu['ours'], 1):.2f} ({_cpu(row.cpu['bound'], 1):.2f}) | {rb} | {tb} | {cs} | {row.check} |")
    return "\n".join(lines)


def profile(rows: list[Row], out: Path, top: int) -> str:
    text = []
    for row in rows:
        if row.diagnostic:
            continue
        prof = cProfile.Profile()
        prof.enable()
        row.ours()
        prof.disable()
        clean(row, out)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats("cumulative").print_stats(top)
        text.append(f"#### cProfile: {row.name} (main thread; the hash thread shows as the wait in join)\n\n"
                    "```\n" + "\n".join(s.getvalue().strip().splitlines()[3:]) + "\n```\n")
    return "\n".join(text)


def _phase_points():
    import threading

    from blora_network.files import lorafile

    from blora_network.files import measure

    # patched where they are looked up: each module binds the names it imports
    return [
        ("header (open_sdxl_lora: open_lora, checks)", transforms, "open_sdxl_lora"),
        ("header (open_sdxl_lora: open_lora, checks)", inspection, "open_sdxl_lora"),
        ("tensors from safe_open", lorafile.TensorReader, "tensors"),
        ("layout (_data_order)", safefile, "_data_order"),
        ("save_file (write)", safefile, "st_save_file"),
        ("fsync", os, "fsync"),
        ("waiting for the hash thread", threading.Thread, "join"),
        ("norms (delta_norm_sq)", measure, "delta_norm_sq"),
        ("NaN/Inf scan (all_finite)", lorafile, "all_finite"),
        ("NaN/Inf scan (all_finite)", inspection, "all_finite"),
    ]


def phases(rows: list[Row], out: Path, repeats: int) -> str:
    """Where our time goes, by phase (wall seconds in the main thread, median of ``repeats`` warm calls)."""
    points = _phase_points()
    spent: dict[str, float] = {}

    def wrap(label, fn):
        def timed_fn(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t
        return timed_fn

    originals = [(owner, name, getattr(owner, name)) for _, owner, name in points]
    for (label, owner, name), (_, _, fn) in zip(points, originals):
        setattr(owner, name, wrap(label, fn))
    results: dict[str, dict[str, float]] = {}
    try:
        for row in rows:
            if row.diagnostic:
                continue
            samples = []
            for _ in range(repeats):
                spent.clear()
                total = timed(row.ours)
                clean(row, out)
                samples.append({**spent, "total": total})
            results[row.name] = {k: statistics.median(s.get(k, 0.0) for s in samples)
                                 for k in ["total", *dict.fromkeys(label for label, _, _ in points)]}
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    labels = [label for label in dict.fromkeys(lb for lb, _, _ in points) if any(r[label] > 0.0005 for r in results.values())]
    head = ["phase (s, main thread)", *results]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label in ["total", *labels]:
        lines.append(f"| {label} | " + " | ".join(f"{r[label]:.3f}" for r in results.values()) + " |")
    lines.append("| other (metadata, Python) | " + " | ".join(
        f"{r['total'] - sum(r[x] for x in labels):.3f}" for r in results.values()) + " |")
    return "\n".join(lines) + "\n"


def sha256_speed() -> float:
    buf = os.urandom(64 << 20)
    t = time.perf_counter()
    for _ in range(3):
        hashlib.sha256(buf).hexdigest()
    return 3 * len(buf) / (time.perf_counter() - t) / 1e9


# -- machine and recording --------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(folder: Path) -> dict:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores (nproc), torch threads {torch.get_num_threads()}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, safetensors {safetensors.__version__}",
        "files in": f"{folder} ({_fs_of(folder)}); SHA-256 here {sha256_speed():.2f} GB/s (one core)",
        "load average at start (1/5/15 min)": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def _fs_of(folder: Path) -> str:
    best = ("?", "?", "")
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                dev, mnt, fs = line.split()[:3]
                if str(folder.resolve()).startswith(mnt) and len(mnt) >= len(best[2]):
                    best = (dev, fs, mnt)
    except OSError:
        pass
    return f"{best[1]} on {best[0]}"


def command_line() -> str:
    args = [a if a and all(c.isalnum() or c in "-_=./,:" for c in a) else repr(a) for a in sys.argv[1:]]
    return " ".join(["python benchmarks/bench_tools.py", *args])


def record(text: str) -> None:
    """Append the run at the end of section 4 of RESULTS.md (replacing its placeholder)."""
    content = RESULTS.read_text(encoding="utf-8")
    start = content.find(SECTION)
    if start < 0:
        content = content.rstrip() + f"\n\n{SECTION}\n"
        start = content.find(SECTION)
    nxt = content.find("\n## ", start + len(SECTION))
    end = len(content) if nxt < 0 else nxt + 1
    section = content[start:end]
    section = re.sub(r"\n\(placeholder[^\n]*\)\n", "\n", section)
    section = section.rstrip() + "\n\n" + text.rstrip() + "\n\n"
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(content[:start] + section + content[end:], encoding="utf-8")
    os.replace(tmp, RESULTS)
    print(f"recorded in {RESULTS}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=800, help="input file size in MB (10^6 bytes), about (default 800)")
    p.add_argument("--rank", type=int, default=128, help="rank of the Linear layers (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are taken (default 3)")
    p.add_argument("--dir", type=Path, default=None, help=f"folder for the inputs and outputs (default: a temp dir; "
                   f"with --cache, {CACHE})")
    p.add_argument("--cache", action="store_true", help=f"keep the generated inputs in {CACHE} for the next run")
    p.add_argument("--rows", default="", help="only these rows, comma-separated names (split,extract,combine,inspect,"
                   "'inspect --no-norms')")
    p.add_argument("--no-diagnose", action="store_true", help="skip the diagnostic rows (with fsync; hash stubbed out)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache calls (bytes read)")
    p.add_argument("--profile", action="store_true", help="also cProfile each tool once (warm; printed, not recorded)")
    p.add_argument("--phases", action="store_true", help="also time our tools' phases (recorded with --record)")
    p.add_argument("--verbose", action="store_true", help="print every timed call (wall, user, sys, faults, switches)")
    p.add_argument("--note", default="", help="a line recorded with the run (e.g. which code was measured)")
    p.add_argument("--record", action="store_true", help="append the run to benchmarks/RESULTS.md, section 4")
    args = p.parse_args(argv)
    global VERBOSE
    VERBOSE = args.verbose

    folder = args.dir or (CACHE if args.cache else Path(tempfile.mkdtemp(prefix="blora_bench_tools_")))
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < 4 * args.size_mb * 1e6:
        raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free; need about {4 * args.size_mb / 1e3:.1f} GB")
    out = Path(tempfile.mkdtemp(prefix="out_", dir=folder))
    info = machine(folder)
    try:
        a, b, conv_rank = input_files(folder, args.size_mb, args.rank)
        rows = make_rows(a, b, out, diagnose=not args.no_diagnose)
        if args.rows:
            wanted = {w.strip() for w in args.rows.split(",")}
            rows = [r for r in rows if r.name in wanted or r.name.split(" (")[0] in wanted]
        t0 = time.perf_counter()
        run(rows, out, args.repeats, cold=not args.no_cold)
        prof = profile(rows, out, 25) if args.profile else ""
        phase_table = phases(rows, out, args.repeats) if args.phases else ""
        elapsed = time.perf_counter() - t0
        with safe_open(str(a), "pt") as f:
            n_tensors = len(list(f.keys()))
        kept = {r.name: kept_bytes(r) for r in rows if not r.diagnostic}
        info["input"] = (f"{a.stat().st_size / 1e6:.0f} MB ({a.stat().st_size / 2**20:.0f} MiB), {n_tensors} tensors, "
                         f"fp16, Linear/1x1 rank {args.rank}, 3x3 conv rank {conv_rank}; second file for combine: "
                         "same layout, other seed")
        info["kept bytes"] = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in kept.items())
        info["load average at end (1/5/15 min)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
        info["wall time of the measurements"] = f"{elapsed:.0f} s"
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not args.cache and args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    body = table(rows)
    head = [f"### File tools vs read + save_file ({info.pop('date')})", "", f"`{command_line()}`", ""]
    if args.note:
        head += [f"- note: {args.note}"]
    import blora_network as _pkg
    head += [f"- blora_network from: {Path(_pkg.__file__).parent}"]
    head += [f"- {k}: {v}" for k, v in info.items()]
    text = "\n".join(head) + "\n\n" + body + "\n"
    if phase_table:
        text += ("\nWhere our time goes (warm, median of the rounds; the hash thread runs beside "
                 "save_file and is waited for in join):\n\n" + phase_table)
    print(text)
    if prof:
        print(prof)
    if args.record:
        record(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
