"""What users do with B-LoRA files after training, as plain functions on files.

Each tool reads a LoRA file lazily (only the tensors it keeps), writes kohya-format files
atomically (never over an input, never over an existing file without ``force``), keeps the
source metadata and updates what changed: ``ss_network_dim``/``ss_network_alpha``, the
``blora_*`` keys, fresh ``sshs_*`` hashes and where the file came from. They return typed
results and never print: :mod:`blora_network.cli` does the talking.

Weights are exact: a weight w multiplies a block's change dW by w (one factor is scaled,
never both), and a weight of 0 drops the block from the output file.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

from .blocks import BLOCKS, ROLES, block_at, block_for_role, block_order
from .errors import LoraFileError
from .lorafile import (
    LoraFile,
    LoraModule,
    _alpha_value,
    _numel,
    delta_norm_sq,
    diffusers_path_of_kohya_name,
    guess_model,
    module_scale,
    open_lora,
    scale_module_tensors,
)
from .metadata import (
    KEY_ALPHAS,
    KEY_BLOCKS,
    KEY_DIMS,
    KEY_PRESET,
    KEY_SOURCES,
    KEY_WEIGHTS,
    blora_metadata,
    read_json_key,
)
from .safefile import check_output_path, write_safetensors_hashed

__all__ = [
    "Progress",
    "BlockReport",
    "InspectReport",
    "WrittenFile",
    "SplitResult",
    "BlockSource",
    "PresetSummary",
    "PlanBlock",
    "Plan",
    "inspect",
    "split",
    "combine",
    "scale",
    "extract",
    "convert",
    "presets_summary",
    "plan",
    "CONVERT_TARGETS",
]

Progress = Callable[..., object]
"""A progress-bar factory called as ``progress(total=, desc=, unit=)``; the object it returns
has ``update(n)`` and ``close()`` (``tqdm.tqdm`` fits). None means no progress reporting."""

CONVERT_TARGETS = ("kohya", "diffusers", "peft")
_STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
_DTYPE_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _bar(progress: Optional[Progress], total: int, desc: str, unit: str = "B"):
    bar = progress(total=total, desc=desc, unit=unit, unit_scale=True) if progress else _NoBar()
    try:
        yield bar
    finally:
        bar.close()


# -- loading with the checks every tool makes ---------------------------------------------

def _load(path, *, need_blora: bool = True) -> LoraFile:
    """Open a LoRA file; refuse SD1.x/SD2.x files and (by default) files with no B-LoRA block."""
    lora = open_lora(path)
    if not lora.modules:
        raise LoraFileError(
            f"{lora.path}: holds no LoRA layers ({len(lora.unparsed)} tensors, none named like a LoRA: "
            f"e.g. {lora.unparsed[0]!r})" if lora.unparsed else f"{lora.path}: holds no tensors at all"
        )
    guess = guess_model(lora)
    if guess.model not in ("sdxl", "unknown"):
        raise LoraFileError(f"{lora.path}: {guess.reason}; B-LoRA blocks exist only in SDXL")
    if need_blora and not lora.roles():
        known = ", ".join(f"{b.role} {b.ldm}" for b in BLOCKS)
        raise LoraFileError(f"{lora.path}: holds no B-LoRA block ({known}); it holds: {lora.describe_blocks()}")
    return lora


def _alpha_of(module: LoraModule, tensors: Mapping[str, torch.Tensor]) -> Optional[float]:
    """The effective alpha (implied alpha = rank when the file has none or 0)."""
    if module.rank is None:
        return None
    value = _alpha_value(tensors)
    return value if value else float(module.rank)


def _kohya_entry(module: LoraModule, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's tensors under kohya keys; a LoRA without alpha gets alpha = rank, explicitly."""
    out = {f"{module.name}.{suffix}": t for suffix, t in tensors.items()}
    if module.algo == "lora" and "alpha" not in tensors:
        down = tensors["lora_down.weight"]
        out[f"{module.name}.alpha"] = torch.tensor(float(module.rank), dtype=down.dtype)
    return out


def _fmt_alpha(a: float) -> str:
    return repr(float(a))


# -- metadata -------------------------------------------------------------------------------

@dataclass
class _Written:
    """What went into an output file, for its metadata."""

    modules: list[tuple[LoraModule, Optional[float]]] = field(default_factory=list)  # (module, alpha)

    def add(self, module: LoraModule, tensors: Mapping[str, torch.Tensor]) -> None:
        self.modules.append((module, _alpha_of(module, tensors)))

    def roles(self) -> list[str]:
        present = {m.role for m, _ in self.modules if m.role}
        return [r for r in ROLES if r in present]


def _rank_alpha(items: Iterable[tuple[LoraModule, Optional[float]]]) -> tuple[Optional[int], Optional[float]]:
    """The largest rank and the largest alpha among the modules of that rank."""
    ranked = [(m.rank, a) for m, a in items if m.rank is not None]
    if not ranked:
        return None, None
    top = max(r for r, _ in ranked)
    alphas = [a for r, a in ranked if r == top and a is not None]
    return top, (max(alphas) if alphas else None)


def _source_entry(lora: LoraFile, roles: Sequence[str], weights: Mapping[str, float]) -> dict:
    entry = {
        "file": lora.path.name,
        "sshs_model_hash": lora.metadata.get("sshs_model_hash"),
        "blocks": list(roles),
        "weights": {r: float(weights.get(r, 1.0)) for r in roles},
    }
    earlier = read_json_key(lora.metadata, KEY_SOURCES)
    if earlier:
        entry["sources"] = earlier
    return entry


def _output_metadata(base: Mapping[str, str], written: _Written, sources: list[dict],
                     weights: Mapping[str, float]) -> dict[str, str]:
    """The base file's metadata, updated to describe the new file truthfully."""
    meta = {k: v for k, v in base.items() if k not in _STALE_KEYS}
    rank, alpha = _rank_alpha(written.modules)
    if rank is not None:
        meta["ss_network_dim"] = str(rank)
        if alpha is not None:
            meta["ss_network_alpha"] = _fmt_alpha(alpha)
    roles = written.roles()
    for key in (KEY_BLOCKS, KEY_DIMS, KEY_ALPHAS):
        meta.pop(key, None)
    if roles:
        dims, alphas = {}, {}
        for role in roles:
            r, a = _rank_alpha((m, al) for m, al in written.modules if m.role == role)
            if r is not None:
                dims[role] = r
            if a is not None:
                alphas[role] = a
        meta.update(blora_metadata(roles, preset=base.get(KEY_PRESET), dims=dims, alphas=alphas))
    meta[KEY_SOURCES] = json.dumps(sources)
    # blora_weights: what is baked in relative to training; left out while that is all 1
    if weights and (KEY_WEIGHTS in base or any(w != 1.0 for w in weights.values())):
        meta[KEY_WEIGHTS] = json.dumps({r: float(weights[r]) for r in ROLES if r in weights})
    else:
        meta.pop(KEY_WEIGHTS, None)
    return meta


def _cumulative_weights(lora: LoraFile, applied: Mapping[str, float], roles: Iterable[str]) -> dict[str, float]:
    """Weights baked so far: what the source says it already holds, times what we apply."""
    before = read_json_key(lora.metadata, KEY_WEIGHTS, {}) or {}
    out = {}
    for role in roles:
        try:
            prior = float(before.get(role, 1.0)) if isinstance(before, dict) else 1.0
        except (TypeError, ValueError):
            prior = 1.0
        out[role] = prior * float(applied.get(role, 1.0))
    return out


# -- writing ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WrittenFile:
    """One file a tool wrote."""

    path: str
    blocks: list[str]
    modules: int
    tensors: int
    bytes: int
    sshs_model_hash: str
    weights: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _write(output, tensors: dict[str, torch.Tensor], metadata: dict[str, str], written: _Written, *,
           force: bool, inputs: Sequence[Path], progress: Optional[Progress], weights=None,
           warnings=()) -> WrittenFile:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    # fsync only when replacing a file: a new output lost to a power cut is lost alone (the
    # inputs are never written) and is made again in seconds; an fsync costs ~0.1-0.3 s per
    # 100-300 MB (issue 5, benchmarks/RESULTS.md section 4). sd-scripts does not fsync at all.
    replacing = Path(output).exists()
    with _bar(progress, total, f"hashing {Path(output).name}") as bar:
        path, model_hash, _ = write_safetensors_hashed(
            output, tensors, metadata, overwrite=force, inputs=tuple(inputs), on_bytes=bar.update,
            durable=replacing,
        )
    return WrittenFile(
        path=str(path),
        blocks=written.roles(),
        modules=len(written.modules),
        tensors=len(tensors),
        bytes=path.stat().st_size,
        sshs_model_hash=model_hash,
        weights=dict(weights or {}),
        warnings=list(warnings),
    )


def _gather(lora: LoraFile, reader, modules: Sequence[LoraModule], out: dict, written: _Written,
            progress: Optional[Progress], weights: Mapping[str, float] | None = None, desc: str = "") -> None:
    """Read ``modules`` (and only those), scale each by its block's weight, add under kohya keys."""
    weights = weights or {}
    reader.prefetch(modules)
    with _bar(progress, sum(m.nbytes for m in modules), desc or f"reading {lora.path.name}") as bar, _torch_threads(1):
        for m in modules:
            tensors = reader.tensors(m)
            _refuse_nonfinite(lora, m, tensors)
            w = weights.get(m.role, 1.0) if m.role else 1.0
            if w != 1.0:
                tensors = scale_module_tensors(m, tensors, w, where=f"{lora.path}: ")
            entry = _kohya_entry(m, tensors)
            clash = next((k for k in entry if k in out), None)
            if clash is not None:
                raise LoraFileError(f"{lora.path}: layer {m.name} is given twice")
            out.update(entry)
            written.add(m, tensors)
            bar.update(m.nbytes)


def _refuse_nonfinite(lora: LoraFile, m: LoraModule, tensors: Mapping[str, torch.Tensor]) -> None:
    """A NaN/Inf copied into a new file gives black images wherever the file goes; stop here."""
    for suffix, t in tensors.items():
        if not _finite(t):
            raise LoraFileError(
                f"{lora.path}: tensor {m.keys.get(suffix, m.name + '.' + suffix)} holds NaN or Inf; the training that "
                "wrote it diverged, so nothing was written. Use an earlier save (inspect lists every such tensor)"
            )


def _check_weight(role: str, w: float) -> float:
    if not math.isfinite(w):
        raise LoraFileError(f"the {role} weight must be a finite number, not {w}")
    return float(w)


# -- inspect ----------------------------------------------------------------------------------

@dataclass
class BlockReport:
    """One block of a file: content, style, layout, or ``other`` (everything else)."""

    role: str
    ldm: Optional[str]
    lbw: Optional[str]
    modules: int
    attention_modules: int
    params: int
    bytes: int
    algos: list[str]
    ranks: list[int]
    alphas: list[float]
    norm: Optional[float]
    """Frobenius norm of the block's whole change (all its layers' dW together); None for DoRA/unknown."""
    blocks: dict[str, int] = field(default_factory=dict)
    """For ``other``: the UNet blocks / text encoders it covers and their module counts."""


@dataclass
class InspectReport:
    file: str
    file_bytes: int
    model: str
    spellings: list[str]
    dtypes: dict[str, int]
    blocks: dict[str, BlockReport]
    """content / style / layout (those present), then ``other`` when the file has more."""
    training: dict[str, str]
    """The metadata that matters: network module, preset, dim, alpha, steps, base model..."""
    warnings: list[str]
    modules: int
    tensors: int
    nonfinite_tensors: list[str] = field(default_factory=list)


_TRAINING_KEYS = (
    ("network module", "ss_network_module"),
    ("preset", KEY_PRESET),
    ("dim", "ss_network_dim"),
    ("alpha", "ss_network_alpha"),
    ("steps", "ss_steps"),
    ("max steps", "ss_max_train_steps"),
    ("epochs", "ss_epoch"),
    ("learning rate", "ss_learning_rate"),
    ("base model", "ss_sd_model_name"),
    ("base model version", "ss_base_model_version"),
    ("architecture", "modelspec.architecture"),
    ("network args", "ss_network_args"),
    ("trained at", "ss_training_finished_at"),
    ("B-LoRA weights baked", KEY_WEIGHTS),
)


def inspect(path, *, norms: bool = True, progress: Optional[Progress] = None) -> InspectReport:
    """What a LoRA file holds, block by block, with the size of each block's change.

    Reads every tensor once, to find NaN/Inf and (with ``norms``) to measure each block's
    change exactly. LoRA norms come from r x r Gram matrices, which costs about
    ``params x rank`` multiply-adds: nothing at B-LoRA's usual ranks, seconds at rank 600+.
    ``norms=False`` skips that and only scans for NaN/Inf.
    """
    lora = _load(path)
    groups: dict[str, list[LoraModule]] = {r: lora.role_modules(r) for r in lora.roles()}
    others = [m for m in lora.modules.values() if m.role is None]
    if others:
        groups["other"] = others
    nonfinite: list[str] = []
    norms_sq: dict[str, Optional[float]] = {g: 0.0 for g in groups}
    alphas: dict[str, set] = {g: set() for g in groups}
    alpha_rank_pairs: dict[str, set] = {g: set() for g in groups}
    total = sum(m.nbytes for m in lora.modules.values())
    default_threads = torch.get_num_threads()
    with lora.reader() as reader, _bar(progress, total, f"reading {lora.path.name}") as bar, _torch_threads(1):
        reader.prefetch([m for modules in groups.values() for m in modules], lora.unparsed)
        for group, modules in groups.items():
            for m in modules:
                tensors = reader.tensors(m)
                a = _alpha_of(m, tensors)
                if a is not None:
                    alphas[group].add(a)
                    alpha_rank_pairs[group].add((m.rank, a))
                value: Optional[float] = None
                if norms and m.algo != "other" and not m.dora:
                    value = _norm_sq(m, tensors, default_threads)
                if value is None or not math.isfinite(value):
                    nonfinite += [m.keys[s] for s, t in tensors.items() if not _finite(t)]
                if value is None or norms_sq[group] is None:
                    norms_sq[group] = None
                elif math.isfinite(value):
                    norms_sq[group] += value
                bar.update(m.nbytes)
        for key in lora.unparsed:
            if not _finite(reader.get(key)):
                nonfinite.append(key)

    blocks: dict[str, BlockReport] = {}
    for group, modules in groups.items():
        b = next((x for x in BLOCKS if x.role == group), None)
        sub = lora.other_blocks() if group == "other" else {}
        n = norms_sq[group]
        blocks[group] = BlockReport(
            role=group,
            ldm=b.ldm if b else None,
            lbw=b.lbw if b else None,
            modules=len(modules),
            attention_modules=sum(1 for m in modules if m.is_attention),
            params=sum(m.params for m in modules),
            bytes=sum(m.nbytes for m in modules),
            algos=sorted({m.kind for m in modules}),
            ranks=sorted({m.rank for m in modules if m.rank is not None}),
            alphas=sorted(alphas[group]),
            norm=(math.sqrt(n) if n is not None and norms else None),
            blocks=dict(sorted(sub.items(), key=lambda kv: block_order(kv[0]))),
        )

    training = {label: lora.metadata[key] for label, key in _TRAINING_KEYS if key in lora.metadata}
    warnings = _inspect_warnings(lora, blocks, alpha_rank_pairs, nonfinite)
    return InspectReport(
        file=str(lora.path),
        file_bytes=lora.size,
        model=guess_model(lora).model,
        spellings=list(lora.spellings),
        dtypes={_DTYPE_NAMES.get(k, k.lower()): v for k, v in lora.dtypes.items()},
        blocks=blocks,
        training=training,
        warnings=warnings,
        modules=len(lora.modules),
        tensors=sum(len(m.keys) for m in lora.modules.values()) + len(lora.unparsed),
        nonfinite_tensors=nonfinite,
    )


_PARALLEL_WORK = 1 << 29
"""Multiply-adds above which a layer's norm is worth torch's thread pool (~10 ms on one core)."""


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run on ``n`` torch threads, restored after.

    The tools' per-layer math is small (a few ms). Handing such ops to OpenMP threads gains
    little on idle cores and costs ~10-30 ms per op when another process holds a core (the
    usual case beside a training run): inspect of an 800 MB rank-128 file took 8.1 s with 2
    threads on 2 shared cores instead of ~2 s on one. So small work runs on one thread.
    """
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _norm_sq(m: LoraModule, tensors: Mapping[str, torch.Tensor], threads: int) -> float:
    """``||dW||_F^2`` of one layer, on one thread unless the layer is big enough for ``threads``."""
    with _torch_threads(threads if _norm_work(m) >= _PARALLEL_WORK else 1):
        return delta_norm_sq(m.algo, tensors)


def _norm_work(m: LoraModule) -> int:
    """About how many multiply-adds ``delta_norm_sq`` costs for this layer (Gram matrices for LoRA)."""
    if m.rank is None or m.out_features is None or m.in_features is None:
        return 0
    inner = max((_numel(shape[1:]) for s, shape in m.shapes.items() if s == "lora_down.weight"), default=m.in_features)
    return m.rank * m.rank * (m.out_features + inner) if m.algo == "lora" else m.rank * m.out_features * inner


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``. A sum is NaN/Inf whenever an element is (and is fast);
    only when it is not finite do we look element by element (a sum can overflow)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _inspect_warnings(lora: LoraFile, blocks: dict[str, BlockReport], pairs: dict[str, set],
                      nonfinite: list[str]) -> list[str]:
    out: list[str] = []
    if nonfinite:
        out.append(
            f"{len(nonfinite)} tensors hold NaN or Inf (first: {nonfinite[0]}); the file will give black or "
            "noise images: use an earlier checkpoint or retrain with a lower learning rate"
        )
    off: dict[tuple, list[str]] = {}
    for role, pr in pairs.items():
        for r, a in sorted((r, a) for r, a in pr if r is not None and a is not None and abs(a - r) > 1e-6 * max(1.0, r)):
            off.setdefault((r, a), []).append(role)
    for (r, a), roles in off.items():
        out.append(
            f"alpha {a:g} differs from rank {r} in {', '.join(dict.fromkeys(roles))}: the change is scaled by "
            f"alpha/rank = {a / r:.4g} (sd-scripts' default --network_alpha is 1; the original B-LoRA uses alpha = rank)"
        )
    other = blocks.get("other")
    if other is not None:
        shown = ", ".join(f"{b} ({n})" for b, n in list(other.blocks.items())[:6])
        more = f" and {len(other.blocks) - 6} more" if len(other.blocks) > 6 else ""
        out.append(
            f"{other.modules} modules lie outside the B-LoRA blocks: {shown}{more}; "
            "`blora-network extract` keeps only the B-LoRA attention layers"
        )
    for role in ROLES:
        rep = blocks.get(role)
        if rep is not None and rep.attention_modules < rep.modules:
            out.append(
                f"{role}: {rep.modules - rep.attention_modules} of its {rep.modules} layers are not attention "
                "projections (ff/proj_in/proj_out); the B-LoRA presets train only the attention layers"
            )
    ranks = sorted({r for rep in blocks.values() for r in rep.ranks})
    if len(ranks) > 1:
        per = ", ".join(f"{g} {'/'.join(map(str, rep.ranks))}" for g, rep in blocks.items() if rep.ranks)
        out.append(f"mixed ranks ({per}); ss_network_dim records the largest, {ranks[-1]}")
    declared = lora.metadata.get("ss_network_dim")
    if declared and ranks and declared.strip() != str(ranks[-1]):
        out.append(f"metadata ss_network_dim is {declared} but the largest rank in the file is {ranks[-1]}")
    dora = [g for g, rep in blocks.items() if any("dora" in a for a in rep.algos)]
    if dora:
        out.append(f"DoRA layers in {', '.join(dora)}: their change depends on the base weights and cannot be "
                   "scaled; scale/combine accept only weight 1 for those blocks")
    odd = [g for g, rep in blocks.items() if "other" in rep.algos]
    if odd:
        out.append(f"layers of an algorithm these tools do not rewrite in {', '.join(odd)} (no norm reported)")
    if lora.unparsed:
        out.append(f"{len(lora.unparsed)} tensors are not LoRA layers (first: {lora.unparsed[0]})")
    return out


# -- split ------------------------------------------------------------------------------------

@dataclass
class SplitResult:
    source: str
    files: list[WrittenFile]
    skipped_modules: int
    """Layers outside the B-LoRA blocks, not written anywhere."""


def split_paths(path, out_dir=None, roles: Optional[Iterable[str]] = None) -> dict[str, Path]:
    """``NAME_content.safetensors`` etc. beside the input (or in ``out_dir``)."""
    src = Path(path)
    folder = Path(out_dir) if out_dir is not None else src.parent
    return {r: folder / f"{src.stem}_{r}.safetensors" for r in (roles or ROLES)}


def split(path, *, out_dir=None, roles: Optional[Sequence[str]] = None, force: bool = False,
          progress: Optional[Progress] = None) -> SplitResult:
    """One file per B-LoRA block found (or per block in ``roles``, which must all be present)."""
    lora = _load(path)
    if roles:
        lora.require_roles(roles, " to split out")
        chosen = [r for r in ROLES if r in roles]
    else:
        chosen = lora.roles()
    targets = split_paths(lora.path, out_dir, chosen)
    for target in targets.values():  # refuse before writing anything
        check_output_path(target, overwrite=force, inputs=[lora.path])
    parts = []
    with lora.reader() as reader:
        # Every block is read (and checked) before the first file is written: a bad tensor in
        # the style block must not leave a content file behind.
        for role in chosen:
            tensors: dict[str, torch.Tensor] = {}
            written = _Written()
            _gather(lora, reader, lora.role_modules(role), tensors, written, progress, desc=f"reading {role}")
            parts.append((role, tensors, written))
    files, created = [], []
    try:
        for role, tensors, written in parts:
            weights = _cumulative_weights(lora, {}, [role])
            meta = _output_metadata(lora.metadata, written, [_source_entry(lora, [role], {role: 1.0})], weights)
            new = not targets[role].exists()
            files.append(_write(targets[role], tensors, meta, written, force=force, inputs=[lora.path],
                                progress=progress, weights=weights))
            if new:
                created.append(targets[role])
    except BaseException:  # a failed write (disk full): no partial set of new files
        for target in created:
            with contextlib.suppress(OSError):
                target.unlink()
        raise
    skipped = sum(1 for m in lora.modules.values() if m.role is None)
    return SplitResult(source=str(lora.path), files=files, skipped_modules=skipped)


# -- combine ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockSource:
    """Take block ``role`` from file ``path``, its change multiplied by ``weight``."""

    role: str
    path: str
    weight: float = 1.0


def combine(sources: Sequence[BlockSource], output, *, force: bool = False,
            progress: Optional[Progress] = None) -> WrittenFile:
    """The content block of one file, the style block of another (and a layout block), weighted.

    The output keeps the metadata of the first source (content when given) and records every
    source, its hash, the block taken and its weight. A weight of 0 leaves that block out.
    """
    if not sources:
        raise LoraFileError("nothing to combine: give --content, --style and/or --layout")
    sources = [BlockSource(block_for_role(s.role).role, s.path, s.weight) for s in sources]
    roles = [s.role for s in sources]
    if len(set(roles)) != len(roles):
        raise LoraFileError(f"each block can come from one file only; got {', '.join(roles)}")
    order = {r: i for i, r in enumerate(ROLES)}
    sources = sorted(sources, key=lambda s: order[s.role])
    loras = []
    for s in sources:
        _check_weight(s.role, s.weight)
        lora = _load(s.path)
        lora.require_roles([s.role], f" to take {s.role} from")
        loras.append(lora)
    inputs = [lo.path for lo in loras]
    check_output_path(output, overwrite=force, inputs=inputs)
    kept = [(s, lo) for s, lo in zip(sources, loras) if s.weight != 0.0]
    if not kept:
        raise LoraFileError("every weight is 0: the combined file would be empty")
    tensors: dict[str, torch.Tensor] = {}
    written = _Written()
    entries, weights = [], {}
    with contextlib.ExitStack() as stack:
        for s, lora in kept:
            reader = stack.enter_context(lora.reader())
            _gather(lora, reader, lora.role_modules(s.role), tensors, written, progress,
                    weights={s.role: s.weight}, desc=f"reading {s.role} from {lora.path.name}")
            entries.append(_source_entry(lora, [s.role], {s.role: s.weight}))
            weights.update(_cumulative_weights(lora, {s.role: s.weight}, [s.role]))
        meta = _output_metadata(kept[0][1].metadata, written, entries, weights)
        dropped = [s.role for s in sources if s.weight == 0.0]
        warn = [f"weight 0 leaves {', '.join(dropped)} out of the file"] if dropped else []
        return _write(output, tensors, meta, written, force=force, inputs=inputs, progress=progress,
                      weights=weights, warnings=warn)


# -- scale ------------------------------------------------------------------------------------

def scale(path, weights: Mapping[str, float], output, *, force: bool = False,
          progress: Optional[Progress] = None) -> WrittenFile:
    """Bake per-block weights into a file: each block's dW is multiplied by its weight.

    Blocks not named keep weight 1; layers outside the B-LoRA blocks are copied unchanged;
    a weight of 0 removes the block's layers.
    """
    if not weights:
        raise LoraFileError("no weight given: pass --content, --style and/or --layout")
    weights = {block_for_role(r).role: _check_weight(r, w) for r, w in weights.items()}
    lora = _load(path)
    lora.require_roles(list(weights), " to scale")
    check_output_path(output, overwrite=force, inputs=[lora.path])
    keep = [m for m in lora.modules.values() if not (m.role and weights.get(m.role, 1.0) == 0.0)]
    if not keep:
        raise LoraFileError(f"{lora.path}: every layer would be dropped (weight 0); nothing to write")
    tensors: dict[str, torch.Tensor] = {}
    written = _Written()
    with lora.reader() as reader:
        _gather(lora, reader, keep, tensors, written, progress, weights=weights)
        for key in lora.unparsed:
            tensors[key] = reader.get(key)
        present = [r for r in written.roles()]
        applied = _cumulative_weights(lora, weights, present)
        meta = _output_metadata(lora.metadata, written, [_source_entry(lora, present, weights)], applied)
        dropped = [r for r, w in weights.items() if w == 0.0]
        warn = [f"weight 0 removed the {', '.join(dropped)} block"] if dropped else []
        return _write(output, tensors, meta, written, force=force, inputs=[lora.path], progress=progress,
                      weights=applied, warnings=warn)


# -- extract ----------------------------------------------------------------------------------

def extract(path, roles: Sequence[str], output, *, force: bool = False,
            progress: Optional[Progress] = None) -> WrittenFile:
    """From a LoRA trained on the whole UNet, keep the attention layers of the chosen blocks.

    These are exactly the layers the B-LoRA presets train (attn1/attn2 to_q, to_k, to_v,
    to_out.0: 80 per full-size block); ff, proj_in/proj_out and everything else is left out.
    """
    roles = [block_for_role(r).role for r in roles]
    lora = _load(path)
    lora.require_roles(roles, " to extract")
    for role in roles:
        if not lora.role_modules(role, attention_only=True):
            block = block_for_role(role)
            have = sorted({m.ldm_path.rsplit(".", 1)[-1] if m.ldm_path else m.name for m in lora.role_modules(role)})
            raise LoraFileError(
                f"{lora.path}: the {role} block ({block.ldm}) has no attention layers (to_q/to_k/to_v/to_out.0), "
                f"only {', '.join(have[:6])}; there is nothing B-LoRA would train to extract"
            )
    check_output_path(output, overwrite=force, inputs=[lora.path])
    modules = [m for r in roles for m in lora.role_modules(r, attention_only=True)]
    tensors: dict[str, torch.Tensor] = {}
    written = _Written()
    with lora.reader() as reader:
        _gather(lora, reader, modules, tensors, written, progress)
        weights = _cumulative_weights(lora, {}, roles)
        meta = _output_metadata(lora.metadata, written, [_source_entry(lora, roles, {})], weights)
        skipped = len(lora.modules) - len(modules)
        warn = [f"left out {skipped} layers outside the chosen blocks' attention layers"] if skipped else []
        return _write(output, tensors, meta, written, force=force, inputs=[lora.path], progress=progress,
                      weights=weights, warnings=warn)


# -- convert ----------------------------------------------------------------------------------

def convert(path, output, *, to: str = "kohya", force: bool = False,
            progress: Optional[Progress] = None) -> WrittenFile:
    """Rename a LoRA between kohya names and the diffusers/PEFT names the original B-LoRA wrote.

    ``to="kohya"``: diffusers (``lora.down``/``lora.up``), PEFT (``lora_A``/``lora_B``) or
    diffusers-named kohya keys become sd-scripts' names, with alpha = rank written out.
    ``to="diffusers"`` / ``"peft"``: kohya LoRA layers get ``unet.<diffusers path>.lora.down.weight``
    (or ``.lora_A.weight``) names; alpha/rank is folded into the up factor since these formats
    have no alpha. The change of every layer is the same before and after.
    """
    if to not in CONVERT_TARGETS:
        raise LoraFileError(f"unknown target format {to!r}; use one of {', '.join(CONVERT_TARGETS)}")
    lora = _load(path, need_blora=False)
    if lora.unparsed:
        raise LoraFileError(
            f"{lora.path}: {len(lora.unparsed)} tensors are not LoRA layers this tool knows "
            f"(first: {lora.unparsed[0]!r}); nothing was converted"
        )
    if to == "kohya" and set(lora.spellings) == {"kohya"}:
        raise LoraFileError(f"{lora.path}: already uses kohya names; use --to diffusers or --to peft for the other way")
    if to != "kohya":
        _check_diffusers_convertible(lora)
    check_output_path(output, overwrite=force, inputs=[lora.path])
    tensors: dict[str, torch.Tensor] = {}
    written = _Written()
    modules = list(lora.modules.values())
    with lora.reader() as reader:
        if to == "kohya":
            _gather(lora, reader, modules, tensors, written, progress)
        else:
            reader.prefetch(modules)
            with _bar(progress, sum(m.nbytes for m in modules), f"reading {lora.path.name}") as bar, _torch_threads(1):
                for m in modules:
                    src = reader.tensors(m)
                    _refuse_nonfinite(lora, m, src)
                    tensors.update(_diffusers_entry(m, src, to))
                    written.add(m, {"lora_down.weight": src["lora_down.weight"]})  # alpha = rank from now on
                    bar.update(m.nbytes)
        roles = written.roles()
        meta = _output_metadata(lora.metadata, written, [_source_entry(lora, roles, {})],
                                _cumulative_weights(lora, {}, roles) if lora.metadata.get(KEY_WEIGHTS) else {})
        return _write(output, tensors, meta, written, force=force, inputs=[lora.path], progress=progress)


def _check_diffusers_convertible(lora: LoraFile) -> None:
    for m in lora.modules.values():
        if m.algo != "lora" or m.dora or "lora_mid.weight" in m.keys:
            raise LoraFileError(
                f"{lora.path}: layer {m.name} is {m.kind}; the diffusers/PEFT formats hold plain LoRA only "
                "(keep kohya names: ComfyUI, A1111 and diffusers' load_lora_weights read them)"
            )
        if diffusers_path_of_kohya_name(m.name) is None:
            raise LoraFileError(
                f"{lora.path}: layer {m.name} has no diffusers name this tool knows (only transformer-block "
                "and text-encoder layers convert); keep kohya names, which diffusers' load_lora_weights reads"
            )


def _diffusers_entry(m: LoraModule, src: Mapping[str, torch.Tensor], to: str) -> dict[str, torch.Tensor]:
    path = diffusers_path_of_kohya_name(m.name)
    down, up = src["lora_down.weight"], src["lora_up.weight"]
    s = module_scale("lora", src)
    if s != 1.0:
        up = (up.to(torch.float32) * s).to(up.dtype)
    names = ("lora.down.weight", "lora.up.weight") if to == "diffusers" else ("lora_A.weight", "lora_B.weight")
    return {f"{path}.{names[0]}": down, f"{path}.{names[1]}": up}


# -- presets and plan -------------------------------------------------------------------------

def _block_of_path(path: str) -> str:
    parts = path.split(".")
    if parts[0] in ("input_blocks", "output_blocks") and len(parts) >= 3:
        return ".".join(parts[:3])
    if parts[0] == "middle_block" and len(parts) >= 2:
        return ".".join(parts[:2])
    return parts[0]


@dataclass
class PresetSummary:
    name: str
    source: str
    description: str
    roles: list[str]
    blocks: dict[str, int]
    """Block (LDM path) -> Linear layers the preset trains there, on full-size SDXL."""
    modules: int
    trains_text_encoder: bool


def _selected_layers(preset) -> list:
    from . import sdxl

    layers = sdxl.linear_layers(sdxl.FULL)
    chosen = set(preset.select([layer.name for layer in layers]))
    return [layer for layer in layers if layer.name in chosen]


def presets_summary() -> list[PresetSummary]:
    """The built-in presets and what each selects on sd-scripts' full-size SDXL UNet."""
    from .presets import builtin_names, load_preset

    out = []
    for name in builtin_names():
        preset = load_preset(name)
        layers = _selected_layers(preset)
        blocks: dict[str, int] = {}
        for layer in layers:
            b = _block_of_path(layer.name)
            blocks[b] = blocks.get(b, 0) + 1
        out.append(PresetSummary(
            name=preset.name, source=preset.source, description=preset.description, roles=list(preset.roles),
            blocks=blocks, modules=len(layers), trains_text_encoder=preset.trains_text_encoder,
        ))
    return out


@dataclass
class PlanBlock:
    block: str
    role: Optional[str]
    modules: int
    params: int
    layers: list[str]
    """Module paths trained in this block."""


@dataclass
class Plan:
    preset: str
    source: str
    dim: int
    blocks: list[PlanBlock]
    modules: int
    params: int
    file_bytes: dict[str, int]
    """fp16 / bf16 / fp32 -> size of the saved file (tensors and header, before training metadata)."""
    optimizer_bytes: dict[str, int]
    """Training memory of the adapter alone: fp32 weights, grads, AdamW / AdamW8bit states."""
    notes: list[str]


_DTYPE_SIZES = {"fp16": (2, "F16"), "bf16": (2, "BF16"), "fp32": (4, "F32")}


def _file_bytes(layers, dim: int, dtype: str) -> int:
    """The exact size safetensors would write for these LoRA layers (no metadata)."""
    size, code = _DTYPE_SIZES[dtype]
    entries = []
    for layer in layers:
        name = "lora_unet_" + layer.name.replace(".", "_")
        entries += [(f"{name}.alpha", []), (f"{name}.lora_down.weight", [dim, layer.in_features]),
                    (f"{name}.lora_up.weight", [layer.out_features, dim])]
    entries.sort()
    header, offset = {}, 0
    for key, shape in entries:
        n = size * (math.prod(shape) if shape else 1)
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    h = len(json.dumps(header, separators=(",", ":")))
    return 8 + h + (8 - h % 8) % 8 + offset


def plan(preset_spec: str, dim: int) -> Plan:
    """A dry run: what a preset trains on full-size SDXL at rank ``dim``, and what it costs."""
    from .presets import load_preset

    if dim < 1:
        raise LoraFileError(f"--dim must be a positive rank, not {dim}")
    preset = load_preset(preset_spec)
    layers = _selected_layers(preset)
    by_block: dict[str, list] = {}
    for layer in layers:
        by_block.setdefault(_block_of_path(layer.name), []).append(layer)
    blocks = [
        PlanBlock(block=b, role=getattr(block_at(b), "role", None), modules=len(ls),
                  params=sum(dim * (x.in_features + x.out_features) for x in ls), layers=[x.name for x in ls])
        for b, ls in sorted(by_block.items(), key=lambda kv: block_order(kv[0]))
    ]
    params = sum(b.params for b in blocks)
    notes = []
    if not layers:
        notes.append("this preset selects no Linear layer of sd-scripts' SDXL UNet: training would do nothing")
    if preset.trains_text_encoder:
        notes.append("the preset also trains text-encoder layers, which are not counted here")
    if preset.enable_conv:
        notes.append("enable_conv is on: convolution layers it may select are not counted here")
    off = [b.block for b in blocks if b.role is None]
    if off:
        notes.append(f"layers outside the B-LoRA blocks are trained: {', '.join(off)}")
    for b in blocks:
        extra = [x for x in b.layers if not re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", x)]
        if b.role and extra:
            notes.append(f"{b.role}: {len(extra)} layers beyond the attention projections (e.g. {extra[0]})")
    return Plan(
        preset=preset.name, source=preset.source, dim=dim, blocks=blocks, modules=len(layers), params=params,
        file_bytes={d: _file_bytes(layers, dim, d) for d in _DTYPE_SIZES},
        optimizer_bytes={
            "weights_fp32": 4 * params,
            "grads_fp32": 4 * params,
            "adamw_states": 8 * params,
            "adamw8bit_states": 2 * params,
            "total_adamw": 16 * params,
        },
        notes=notes,
    )
