"""The file tools that write: split, combine, scale, extract and convert, as plain functions on files.

Each reads a LoRA file lazily (only the tensors it keeps), writes kohya-format files
atomically (never over an input, never over an existing file without ``force``), keeps the
source metadata and updates what changed (:func:`blora_network.files.metadata.tool_metadata`). They
return typed results and never print: :mod:`blora_network.cli.main` does the talking.

Weights are exact: a weight w multiplies a block's change dW by w (one factor is scaled,
never both; :func:`blora_network.files.algos.scale_tensors`), and a weight of 0 drops the block
from the output file. Any float dtype is read, fp8 included; the math runs in float32 and
every tensor keeps the file's dtype.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from blora_network.errors import LoraFileError, count
from blora_network.files.algos import (
    LayerRecord,
    alpha_tensor,
    effective_alpha,
    kohya_layers,
    layer_record,
    module_scale,
    one_alpha,
    output_dtype,
    scale_tensors,
    scaling_loss,
)
from blora_network.files.lorafile import LoraFile, LoraLayer, open_sdxl_lora
from blora_network.files.measure import Progress, progress_bar
from blora_network.files.metadata import KEY_WEIGHTS, cumulative_weights, source_entry, tool_metadata
from blora_network.files.safefile import (
    SAFETENSORS,
    check_output_path,
    make_folders,
    remove_folders,
    write_safetensors_hashed,
)
from blora_network.sdxl.blocks import ROLES, lookup_block
from blora_network.sdxl.names import DIFFUSERS_FACTOR_NAMES, WRITE_SPELLINGS, diffusers_path_of_kohya_name

__all__ = ["WrittenFile", "SplitResult", "BlockSource", "split", "split_paths", "combine", "scale", "extract",
           "convert"]


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
    """The weights baked into the file relative to training (a running product over tools)."""
    warnings: list[str] = field(default_factory=list)
    applied: dict[str, float] = field(default_factory=dict)
    """The weights this call applied (what the user asked for)."""


FP8_LOSS_WORTH_SAYING = 0.005
"""Half a percent of a layer's dW: less than a weight's own precision as users type it (0.7 vs 0.705)."""


@dataclass
class _Output:
    """The tensors of one file being assembled, and the block of each layer in it.

    Nothing about a layer's rank or alpha is kept here: :meth:`finish` derives the file's description
    from the tensors as they will be stored, after they get one alpha.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[str, Optional[str]] = field(default_factory=dict)
    """kohya layer name -> its B-LoRA role (or None)."""
    folded: list[LayerRecord] = field(default_factory=list)
    """Layers written under diffusers/PEFT names, which store no alpha: alpha = rank."""
    losses: dict[str, float] = field(default_factory=dict)
    """Per layer, the share of its scaled dW lost to fp8 rounding (:func:`scaling_loss`)."""

    def rounding_warnings(self, weights: Mapping[str, float]) -> list[str]:
        """One warning when fp8 rounding moved some layer's dW by :data:`FP8_LOSS_WORTH_SAYING` or more."""
        if not self.losses or max(self.losses.values()) < FP8_LOSS_WORTH_SAYING:
            return []
        worst = max(self.losses, key=self.losses.get)
        return [f"fp8 rounding: scaling by {', '.join(f'{w:g}' for w in weights.values() if w not in (0.0, 1.0))} "
                f"changed the dW of {count(len(self.losses), 'fp8 layer')} by up to {100 * self.losses[worst]:.1f}% "
                f"({worst}); pass --dtype bf16 (or fp16/fp32) to write a wider file that keeps it"]

    def add(self, lora: LoraFile, layer: LoraLayer, tensors: Mapping[str, torch.Tensor]) -> None:
        entry = _kohya_entry(layer, tensors)
        if any(k in self.tensors for k in entry):
            raise LoraFileError(f"{lora.path}: layer {layer.name} is given twice")
        self.tensors.update(entry)
        self.layers[layer.name] = layer.role

    def add_folded(self, layer: LoraLayer, entry: Mapping[str, torch.Tensor]) -> None:
        self.tensors.update(entry)
        self.folded.append(LayerRecord(layer.role, layer.rank, effective_alpha(None, layer.rank)))

    def roles(self) -> list[str]:
        present = set(self.layers.values()) | {r.role for r in self.folded}
        return [r for r in ROLES if r in present]

    def finish(self, base: Mapping[str, str], sources: list[dict], weights: Mapping[str, float]) -> _Finished:
        """One alpha for the file's LoRA layers, then the metadata describing the tensors as stored."""
        tensors = one_alpha(self.tensors)
        stored = kohya_layers(tensors)
        records = [layer_record(name, role, stored[name]) for name, role in self.layers.items()] + self.folded
        return _Finished(tensors, tool_metadata(base, records, sources, weights), self.roles(), len(records))


@dataclass(frozen=True)
class _Finished:
    """A file ready to write: its tensors and the metadata that describes them."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    blocks: list[str]
    modules: int


def _kohya_entry(layer: LoraLayer, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's tensors under kohya keys; a LoRA without alpha gets its implied alpha, written out."""
    out = {f"{layer.name}.{suffix}": t for suffix, t in tensors.items()}
    if layer.algo == "lora" and "alpha" not in tensors:
        out[f"{layer.name}.alpha"] = alpha_tensor(effective_alpha(None, layer.rank), tensors["lora_down.weight"])
    return out


def _gather(lora: LoraFile, reader, layers: Sequence[LoraLayer], out: _Output, progress: Optional[Progress],
            weights: Optional[Mapping[str, float]] = None, desc: str = "", dtype=None) -> None:
    """Read ``layers`` (and only those), cast them to ``dtype`` if given, scale each by its block's weight
    (noting what fp8 rounding loses), add them under kohya keys."""
    weights = weights or {}
    for layer, tensors in reader.read(layers, progress=progress, desc=desc):
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        w = weights.get(layer.role, 1.0) if layer.role else 1.0
        if w != 1.0:
            loss = scaling_loss(layer.algo, tensors, w)
            tensors = scale_tensors(layer.algo, tensors, w, name=layer.name, where=f"{lora.path}: ")
            if loss is not None:
                out.losses[layer.name] = loss
        out.add(lora, layer, tensors)


def _write(output, out: _Finished, *, force: bool, inputs: Sequence[Path],
           progress: Optional[Progress], weights=None, warnings=(), applied=None) -> WrittenFile:
    total = sum(t.numel() * t.element_size() for t in out.tensors.values())
    # fsync only when replacing a file: a new output lost to a power cut is lost alone (the
    # inputs are never written) and is made again in seconds; an fsync costs ~0.1-0.3 s per
    # 100-300 MB (benchmarks/RESULTS.md section 4). sd-scripts does not fsync at all.
    replacing = Path(output).exists()
    with progress_bar(progress, total, f"hashing {Path(output).name}") as bar:
        path, model_hash, _ = write_safetensors_hashed(
            output, out.tensors, out.metadata, overwrite=force, inputs=tuple(inputs), on_bytes=bar.update,
            durable=replacing,
        )
    return WrittenFile(
        path=str(path),
        blocks=out.blocks,
        modules=out.modules,
        tensors=len(out.tensors),
        bytes=path.stat().st_size,
        sshs_model_hash=model_hash,
        weights=dict(weights or {}),
        warnings=list(warnings),
        applied=dict(applied or {}),
    )


def _check_weight(role: str, w: float) -> float:
    if not math.isfinite(w):
        raise LoraFileError(f"the {role} weight must be a finite number, not {w}")
    return float(w)


def _source(lora: LoraFile, roles: Sequence[str], weights: Mapping[str, float]) -> dict:
    return source_entry(lora.path.name, lora.metadata, roles, weights)


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
          progress: Optional[Progress] = None, dtype: Optional[str] = None) -> SplitResult:
    """One file per B-LoRA block found (or per block in ``roles``, which must all be present).

    ``out_dir`` is made when it does not exist yet (and removed again if the split fails).
    """
    cast = output_dtype(dtype)
    lora = open_sdxl_lora(path)
    if roles:
        lora.require_roles(roles, " to split out")
        chosen = [r for r in ROLES if r in roles]
    else:
        chosen = lora.roles()
    made = make_folders(Path(out_dir)) if out_dir is not None else []
    try:
        return _split(lora, chosen, split_paths(lora.path, out_dir, chosen), force, progress, cast)
    except BaseException:
        remove_folders(made)  # only empty ones: _split removed the files it made
        raise


def _split(lora: LoraFile, chosen: list[str], targets: dict[str, Path], force: bool,
           progress: Optional[Progress], cast=None) -> SplitResult:
    for target in targets.values():  # refuse before writing anything
        check_output_path(target, overwrite=force, inputs=[lora.path])
    parts = []
    with lora.reader() as reader:
        # Every block is read (and checked) before the first file is written: a bad tensor in
        # the style block must not leave a content file behind.
        for role in chosen:
            out = _Output()
            _gather(lora, reader, lora.role_layers(role), out, progress, desc=f"reading {role}", dtype=cast)
            parts.append((role, out))
    files, created = [], []
    try:
        for role, out in parts:
            weights = cumulative_weights(lora.metadata, {}, [role])
            done = out.finish(lora.metadata, [_source(lora, [role], {role: 1.0})], weights)
            new = not targets[role].exists()
            files.append(_write(targets[role], done, force=force, inputs=[lora.path], progress=progress,
                                weights=weights))
            if new:
                created.append(targets[role])
    except BaseException:  # a failed write (disk full): no partial set of new files
        for target in created:
            with contextlib.suppress(OSError):
                target.unlink()
        raise
    skipped = sum(1 for m in lora.layers.values() if m.role is None)
    return SplitResult(source=str(lora.path), files=files, skipped_modules=skipped)


# -- combine ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockSource:
    """Take block ``role`` from file ``path``, its change multiplied by ``weight``."""

    role: str
    path: str
    weight: float = 1.0


def combine(sources: Sequence[BlockSource], output, *, force: bool = False,
            progress: Optional[Progress] = None, dtype: Optional[str] = None) -> WrittenFile:
    """The content block of one file, the style block of another (and a layout block), weighted.

    The output keeps the metadata of the first source (content when given) and records every
    source, its hash, the block taken and its weight. A weight of 0 leaves that block out.
    """
    if not sources:
        raise LoraFileError("nothing to combine: give a content, style and/or layout source")
    sources = [BlockSource(lookup_block(s.role).role, s.path, s.weight) for s in sources]
    roles = [s.role for s in sources]
    if len(set(roles)) != len(roles):
        raise LoraFileError(f"each block can come from one file only; got {', '.join(roles)}")
    cast = output_dtype(dtype)
    order = {r: i for i, r in enumerate(ROLES)}
    sources = sorted(sources, key=lambda s: order[s.role])
    loras = []
    for s in sources:
        _check_weight(s.role, s.weight)
        lora = open_sdxl_lora(s.path)
        lora.require_roles([s.role], f" to take {s.role} from")
        loras.append(lora)
    inputs = [lo.path for lo in loras]
    check_output_path(output, overwrite=force, inputs=inputs, suffixes=SAFETENSORS)
    kept = [(s, lo) for s, lo in zip(sources, loras) if s.weight != 0.0]
    if not kept:
        raise LoraFileError("every weight is 0: the combined file would be empty")
    out = _Output()
    entries, weights = [], {}
    with contextlib.ExitStack() as stack:
        for s, lora in kept:
            reader = stack.enter_context(lora.reader())
            _gather(lora, reader, lora.role_layers(s.role), out, progress,
                    weights={s.role: s.weight}, desc=f"reading {s.role} from {lora.path.name}", dtype=cast)
            entries.append(_source(lora, [s.role], {s.role: s.weight}))
            weights.update(cumulative_weights(lora.metadata, {s.role: s.weight}, [s.role]))
        done = out.finish(kept[0][1].metadata, entries, weights)
        dropped = [s.role for s in sources if s.weight == 0.0]
        warn = [f"weight 0 leaves {', '.join(dropped)} out of the file"] if dropped else []
        warn += out.rounding_warnings({s.role: s.weight for s, _ in kept})
        return _write(output, done, force=force, inputs=inputs, progress=progress, weights=weights, warnings=warn,
                      applied={s.role: s.weight for s, _ in kept})


# -- scale ------------------------------------------------------------------------------------

def scale(path, weights: Mapping[str, float], output, *, force: bool = False,
          progress: Optional[Progress] = None, dtype: Optional[str] = None) -> WrittenFile:
    """Bake per-block weights into a file: each block's dW is multiplied by its weight.

    Blocks not named keep weight 1; layers outside the B-LoRA blocks are copied unchanged;
    a weight of 0 removes the block's layers. ``dtype`` (``bf16``, ``fp16``, ``fp32``) writes every
    layer in that dtype; without it each keeps its own, and scaling an fp8 file rounds, which the
    file's warnings measure.
    """
    cast = output_dtype(dtype)
    if not weights:
        raise LoraFileError("no weight given: name at least one of content, style and layout")
    weights = {lookup_block(r).role: _check_weight(r, w) for r, w in weights.items()}
    lora = open_sdxl_lora(path)
    lora.require_roles(list(weights), " to scale")
    check_output_path(output, overwrite=force, inputs=[lora.path], suffixes=SAFETENSORS)
    keep = [m for m in lora.layers.values() if not (m.role and weights.get(m.role, 1.0) == 0.0)]
    if not keep:
        raise LoraFileError(f"{lora.path}: every layer would be dropped (weight 0); nothing to write")
    out = _Output()
    with lora.reader() as reader:
        _gather(lora, reader, keep, out, progress, weights=weights, dtype=cast)
        for key in lora.unparsed:
            out.tensors[key] = reader.get(key)
        present = out.roles()
        baked = cumulative_weights(lora.metadata, weights, present)
        done = out.finish(lora.metadata, [_source(lora, present, weights)], baked)
        dropped = [r for r, w in weights.items() if w == 0.0]
        warn = [f"weight 0 removed the {', '.join(dropped)} block"] if dropped else []
        warn += out.rounding_warnings(weights)
        return _write(output, done, force=force, inputs=[lora.path], progress=progress, weights=baked,
                      warnings=warn, applied=weights)


# -- extract ----------------------------------------------------------------------------------

def extract(path, roles: Sequence[str], output, *, force: bool = False,
            progress: Optional[Progress] = None, dtype: Optional[str] = None) -> WrittenFile:
    """From a LoRA trained on the whole UNet, keep the attention layers of the chosen blocks.

    These are exactly the layers the B-LoRA presets train (attn1/attn2 to_q, to_k, to_v,
    to_out.0: 80 per full-size block); ff, proj_in/proj_out and everything else is left out.
    """
    roles = [lookup_block(r).role for r in roles]
    cast = output_dtype(dtype)
    lora = open_sdxl_lora(path)
    lora.require_roles(roles, " to extract")
    for role in roles:
        if not lora.role_layers(role, attention_only=True):
            block = lookup_block(role)
            have = sorted({m.ldm_path.rsplit(".", 1)[-1] if m.ldm_path else m.name for m in lora.role_layers(role)})
            raise LoraFileError(
                f"{lora.path}: the {role} block ({block.ldm}) has no attention layers (to_q/to_k/to_v/to_out.0), "
                f"only {', '.join(have[:6])}; there is nothing B-LoRA would train to extract"
            )
    check_output_path(output, overwrite=force, inputs=[lora.path], suffixes=SAFETENSORS)
    layers = [m for r in roles for m in lora.role_layers(r, attention_only=True)]
    out = _Output()
    with lora.reader() as reader:
        _gather(lora, reader, layers, out, progress, dtype=cast)
        weights = cumulative_weights(lora.metadata, {}, roles)
        done = out.finish(lora.metadata, [_source(lora, roles, {})], weights)
        skipped = len(lora.layers) - len(layers)
        warn = [f"left out {count(skipped, 'layer')} outside the chosen blocks' attention layers"] if skipped else []
        return _write(output, done, force=force, inputs=[lora.path], progress=progress, weights=weights,
                      warnings=warn)


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
    if to not in WRITE_SPELLINGS:
        raise LoraFileError(f"unknown target format {to!r}; use one of {', '.join(WRITE_SPELLINGS)}")
    lora = open_sdxl_lora(path, need_blora=False)
    if lora.unparsed:
        raise LoraFileError(
            f"{lora.path}: {count(len(lora.unparsed), 'tensor')} {'is' if len(lora.unparsed) == 1 else 'are'} not LoRA layers this tool knows "
            f"(first: {lora.unparsed[0]!r}); nothing was converted"
        )
    if to == "kohya" and set(lora.spellings) == {"kohya"}:
        raise LoraFileError(f"{lora.path}: already uses kohya names; convert to diffusers or peft for the other way")
    if to != "kohya":
        _check_diffusers_convertible(lora)
    check_output_path(output, overwrite=force, inputs=[lora.path], suffixes=SAFETENSORS)
    out = _Output()
    layers = list(lora.layers.values())
    with lora.reader() as reader:
        if to == "kohya":
            _gather(lora, reader, layers, out, progress)
        else:
            for m, src in reader.read(layers, progress=progress):
                out.add_folded(m, _diffusers_entry(m, src, to))  # alpha = rank from now on
        roles = out.roles()
        weights = cumulative_weights(lora.metadata, {}, roles) if lora.metadata.get(KEY_WEIGHTS) else {}
        done = out.finish(lora.metadata, [_source(lora, roles, {})], weights)
        return _write(output, done, force=force, inputs=[lora.path], progress=progress)


def _check_diffusers_convertible(lora: LoraFile) -> None:
    for m in lora.layers.values():
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


def _diffusers_entry(m: LoraLayer, src: Mapping[str, torch.Tensor], to: str) -> dict[str, torch.Tensor]:
    path = diffusers_path_of_kohya_name(m.name)
    down, up = src["lora_down.weight"], src["lora_up.weight"]
    s = module_scale("lora", src)
    if s != 1.0:
        up = (up.to(torch.float32) * s).to(up.dtype)
    down_name, up_name = DIFFUSERS_FACTOR_NAMES[to]
    return {f"{path}.{down_name}": down, f"{path}.{up_name}": up}
