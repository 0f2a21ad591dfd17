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
from blora_network.files.metadata import KEY_WEIGHTS, cumulative_weights, label_order, source_entry, tool_metadata
from blora_network.files.safefile import (
    SAFETENSORS,
    check_output_path,
    make_folders,
    remove_folders,
    write_safetensors_hashed,
)
from blora_network.sdxl.blocks import LABELS, LAYER_CHOICES, ROLES, SdxlBlock, lookup_sdxl_block
from blora_network.sdxl.names import DIFFUSERS_FACTOR_NAMES, WRITE_SPELLINGS, diffusers_path_of_kohya_name

from .blockweights import inspire_layer_weights, lbw_layer_weights

__all__ = ["WrittenFile", "SplitResult", "BlockSource", "split", "split_paths", "combine", "scale", "extract",
           "convert", "LAYER_CHOICES"]


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
    """kohya layer name -> the label of its attention block (``content``, ``OUT03``; None elsewhere)."""
    folded: list[LayerRecord] = field(default_factory=list)
    """Layers written under diffusers/PEFT names, which store no alpha: alpha = rank."""
    losses: dict[str, float] = field(default_factory=dict)
    """Per layer, the share of its scaled dW lost to fp8 rounding (:func:`scaling_loss`)."""

    def rounding_warnings(self, weights: Iterable[float]) -> list[str]:
        """One warning when fp8 rounding moved some layer's dW by :data:`FP8_LOSS_WORTH_SAYING` or more."""
        if not self.losses or max(self.losses.values()) < FP8_LOSS_WORTH_SAYING:
            return []
        worst = max(self.losses, key=self.losses.get)
        shown = ", ".join(dict.fromkeys(f"{w:g}" for w in weights if w not in (0.0, 1.0)))
        return [f"fp8 rounding: scaling by {shown} changed the dW of {count(len(self.losses), 'fp8 layer')} by up to "
                f"{100 * self.losses[worst]:.1f}% ({worst}); pass --dtype bf16 (or fp16/fp32) to write a wider file "
                "that keeps it"]

    def add(self, lora: LoraFile, layer: LoraLayer, tensors: Mapping[str, torch.Tensor]) -> None:
        entry = _kohya_entry(layer, tensors)
        if any(k in self.tensors for k in entry):
            raise LoraFileError(f"{lora.path}: layer {layer.name} is given twice")
        self.tensors.update(entry)
        self.layers[layer.name] = layer.label

    def add_folded(self, layer: LoraLayer, entry: Mapping[str, torch.Tensor]) -> None:
        self.tensors.update(entry)
        self.folded.append(LayerRecord(layer.label, layer.rank, effective_alpha(None, layer.rank)))

    def roles(self) -> list[str]:
        """The attention blocks the file holds, by label: B-LoRA's roles first, then ``IN04``... ``OUT05``."""
        present = set(self.layers.values()) | {r.role for r in self.folded}
        return [r for r in LABELS if r in present]

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
            weights: Optional[Mapping[str, float]] = None, desc: str = "",
            layer_weights: Optional[Mapping[str, float]] = None, dtype=None) -> None:
    """Read ``layers`` (and only those), cast them to ``dtype`` if given, scale each by its block's weight
    (``weights``: role -> w) or its own (``layer_weights``: layer name -> w), noting what fp8 rounding
    loses, and add them under kohya keys."""
    weights = weights or {}
    for layer, tensors in reader.read(layers, progress=progress, desc=desc):
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        w = weights.get(layer.role, 1.0) if layer.role else 1.0
        if layer_weights is not None:
            w = layer_weights.get(layer.name, 1.0)
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
    """Layers of the file in no written file (outside the blocks, or not of the layers asked for)."""


def split_paths(path, out_dir=None, roles: Optional[Iterable[str]] = None) -> dict[str, Path]:
    """``NAME_content.safetensors``, ``NAME_OUT03.safetensors``... beside the input (or in ``out_dir``), by label."""
    src = Path(path)
    folder = Path(out_dir) if out_dir is not None else src.parent
    return {r: folder / f"{src.stem}_{r}.safetensors" for r in (roles or ROLES)}


def split(path, *, out_dir=None, roles: Optional[Sequence[str]] = None, layers: str = "attention", force: bool = False,
          progress: Optional[Progress] = None, dtype: Optional[str] = None) -> SplitResult:
    """One file per B-LoRA block found (and per block ``blocks=`` training put in the file, as its
    metadata says), or per block named in ``roles`` (any SDXL block by any name; each must be in the
    file), holding that block's ``layers`` (see :func:`extract`).

    ``out_dir`` is made when it does not exist yet (and removed again if the split fails).
    """
    cast = output_dtype(dtype)
    named = roles is not None and len(roles) > 0
    blocks = _blocks_named(roles, layers, "split") if named else []
    lora = open_sdxl_lora(path, need_blora=False)
    if not named:  # the B-LoRA blocks, and the blocks its metadata says were trained (blocks=OUT03)
        blocks = [lookup_sdxl_block(r) for r in [*lora.roles(), *lora.trained_blocks()]]
        if not blocks:
            open_sdxl_lora(path)  # refused as before: no B-LoRA block, and what the file holds
    parts = {b.label: _require(lora, b, layers, " to split out") for b in blocks}
    made = make_folders(Path(out_dir)) if out_dir is not None else []
    try:
        return _split(lora, parts, split_paths(lora.path, out_dir, list(parts)), force, progress, cast)
    except BaseException:
        remove_folders(made)  # only empty ones: _split removed the files it made
        raise


def _split(lora: LoraFile, parts: dict[str, list[LoraLayer]], targets: dict[str, Path], force: bool,
           progress: Optional[Progress], cast=None) -> SplitResult:
    for target in targets.values():  # refuse before writing anything
        check_output_path(target, overwrite=force, inputs=[lora.path])
    outs = []
    with lora.reader() as reader:
        # Every block is read (and checked) before the first file is written: a bad tensor in
        # the style block must not leave a content file behind.
        for label, layers in parts.items():
            out = _Output()
            _gather(lora, reader, layers, out, progress, desc=f"reading {label}", dtype=cast)
            outs.append((label, out))
    files, created = [], []
    try:
        for label, out in outs:
            held = out.roles() or [label]
            weights = cumulative_weights(lora.metadata, {}, held)
            done = out.finish(lora.metadata, [_source(lora, held, {r: 1.0 for r in held})], weights)
            new = not targets[label].exists()
            files.append(_write(targets[label], done, force=force, inputs=[lora.path], progress=progress,
                                weights=weights))
            if new:
                created.append(targets[label])
    except BaseException:  # a failed write (disk full): no partial set of new files
        for target in created:
            with contextlib.suppress(OSError):
                target.unlink()
        raise
    written = {m.name for layers in parts.values() for m in layers}
    skipped = sum(1 for m in lora.layers.values() if m.name not in written)
    return SplitResult(source=str(lora.path), files=files, skipped_modules=skipped)


# -- combine ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockSource:
    """Take block ``role`` (a B-LoRA role or any SDXL block by any name) from file ``path``, its change
    multiplied by ``weight``."""

    role: str
    path: str
    weight: float = 1.0


def combine(sources: Sequence[BlockSource], output, *, layers: str = "transformer", force: bool = False,
            progress: Optional[Progress] = None, dtype: Optional[str] = None) -> WrittenFile:
    """The content block of one file, the style block of another (and a layout block, or any SDXL
    block of any SDXL LoRA), weighted; ``layers`` of each block as in :func:`extract` (the default,
    ``transformer``, takes a B-LoRA block whole, as trained).

    The output keeps the metadata of the first source (content when given) and records every
    source, its hash, the block taken and its weight. A weight of 0 leaves that block out.
    """
    if not sources:
        raise LoraFileError("nothing to combine: give a content, style and/or layout source")
    cast = output_dtype(dtype)
    blocks = _blocks_named([s.role for s in sources], layers, "combine")
    if len(blocks) != len(sources):  # _blocks_named refused a block named twice; keep the old wording too
        raise LoraFileError(f"each block can come from one file only; got {', '.join(s.role for s in sources)}")
    by_name = {lookup_sdxl_block(s.role).name: s for s in sources}
    order = {label: i for i, label in enumerate(label_order(b.label for b in blocks))}
    picked = sorted(((b, by_name[b.name]) for b in blocks), key=lambda bs: order[bs[0].label])
    loras = []
    for block, s in picked:
        _check_weight(block.label, s.weight)
        lora = open_sdxl_lora(s.path, need_blora=False)
        _require(lora, block, layers, f" to take {block.label} from")
        loras.append(lora)
    inputs = [lo.path for lo in loras]
    check_output_path(output, overwrite=force, inputs=inputs, suffixes=SAFETENSORS)
    kept = [(b, s, lo) for (b, s), lo in zip(picked, loras) if s.weight != 0.0]
    if not kept:
        raise LoraFileError("every weight is 0: the combined file would be empty")
    out = _Output()
    entries, weights = [], {}
    with contextlib.ExitStack() as stack:
        for block, s, lora in kept:
            reader = stack.enter_context(lora.reader())
            chosen = lora.block_layers(block, layers)
            _gather(lora, reader, chosen, out, progress, layer_weights={m.name: s.weight for m in chosen},
                    desc=f"reading {block.label} from {lora.path.name}", dtype=cast)
            entries.append(_source(lora, [block.label], {block.label: s.weight}))
            weights.update(cumulative_weights(lora.metadata, {block.label: s.weight}, [block.label]))
        done = out.finish(kept[0][2].metadata, entries, weights)
        dropped = [b.label for b, s in picked if s.weight == 0.0]
        warn = [f"weight 0 leaves {', '.join(dropped)} out of the file"] if dropped else []
        warn += out.rounding_warnings(s.weight for _, s, _ in kept)
        return _write(output, done, force=force, inputs=inputs, progress=progress, weights=weights, warnings=warn,
                      applied={b.label: s.weight for b, s, _ in kept})


# -- scale ------------------------------------------------------------------------------------

def scale(path, weights: Optional[Mapping[str, float]], output, *, lbw: Optional[str] = None,
          inspire: Optional[str] = None, force: bool = False, progress: Optional[Progress] = None,
          dtype: Optional[str] = None) -> WrittenFile:
    """Bake per-block weights into a file: each block's dW is multiplied by its weight.

    ``weights`` maps a B-LoRA role (``content``, ``style``, ``layout``: that transformer block) or any
    SDXL block by its LoRA Block Weight name (``OUT03``, ``IN08``, ``M00``, ``BASE``: every layer LBW
    counts in it, resnets and text encoders included) to a weight. Or, instead, ``lbw``/``inspire``
    is a UI's vector, baked so that the file, loaded at 1 with no vector, changes every layer as that
    UI changes it with the vector (:mod:`blora_network.tools.blockweights`). Layers no weight names
    are copied unchanged; a weight of 0 removes the layers. ``dtype`` (``bf16``, ``fp16``, ``fp32``) writes
    every layer in that dtype; without it each keeps its own, and scaling an fp8 file rounds, which the
    file's warnings measure.
    """
    cast = output_dtype(dtype)
    weights = dict(weights or {})
    if sum(bool(x) for x in (weights, lbw, inspire)) > 1:
        raise LoraFileError("give block weights, --lbw or --inspire, not several: a vector already weighs every block")
    if not (weights or lbw or inspire):
        raise LoraFileError("no weight given: name at least one block (content, style, layout, or --block NAME=W) "
                            "or give a vector (--lbw, --inspire)")
    lora = open_sdxl_lora(path, need_blora=False)
    layers = list(lora.layers.values())
    if lbw or inspire:
        per_layer = lbw_layer_weights(layers, lbw) if lbw else inspire_layer_weights(layers, inspire)
        applied = _uniform_by_label(layers, per_layer)
    else:
        per_layer, applied = _named_weights(lora, weights)
    check_output_path(output, overwrite=force, inputs=[lora.path], suffixes=SAFETENSORS)
    keep = [m for m in layers if per_layer.get(m.name, 1.0) != 0.0]
    if not keep:
        raise LoraFileError(f"{lora.path}: every layer would be dropped (weight 0); nothing to write")
    out = _Output()
    with lora.reader() as reader:
        _gather(lora, reader, keep, out, progress, layer_weights=per_layer, dtype=cast)
        for key in lora.unparsed:
            out.tensors[key] = reader.get(key)
        present = out.roles()
        baked = cumulative_weights(lora.metadata, applied, present)
        done = out.finish(lora.metadata, [_source(lora, present, applied)], baked)
        dropped = [r for r, w in applied.items() if w == 0.0]
        warn = [f"weight 0 removed the {', '.join(dropped)} block"] if dropped else []
        if len(keep) < len(layers) and not dropped:
            warn.append(f"weight 0 removed {count(len(layers) - len(keep), 'layer')}")
        warn += out.rounding_warnings(per_layer.values())
        return _write(output, done, force=force, inputs=[lora.path], progress=progress, weights=baked,
                      warnings=warn, applied=applied)


def _named_weights(lora: LoraFile, weights: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-layer weights for named blocks, and the weights by label; a block named twice (``style`` and
    ``OUT01``), or one the file does not hold, is refused."""
    per_layer: dict[str, float] = {}
    applied: dict[str, float] = {}
    seen: dict[str, str] = {}
    for key, w in weights.items():
        name = str(key).strip()
        _check_weight(name, w)
        try:
            block = lookup_sdxl_block(name, where="scale: ")
        except ValueError as e:
            raise LoraFileError(str(e)) from None
        if block.name in seen:
            raise LoraFileError(f"scale: block {block.name} is given twice ({seen[block.name]} and {name}); "
                                "give each block one weight")
        seen[block.name] = name
        if name.lower() in ROLES:  # the B-LoRA block: the transformer block, as the presets train it
            lora.require_roles([name.lower()], " to scale")
            layers, label = lora.role_layers(name.lower()), name.lower()
        else:
            layers, label = lora.require_block(block, "all", " to scale"), block.label
        per_layer.update({m.name: float(w) for m in layers})
        applied[label] = float(w)
    return per_layer, {k: applied[k] for k in label_order(applied)}


def _uniform_by_label(layers: Sequence[LoraLayer], per_layer: Mapping[str, float]) -> dict[str, float]:
    """The weight a vector gave each block the file holds, by label (left out where a block's layers differ)."""
    seen: dict[str, set] = {}
    for m in layers:
        if m.sdxl_block is not None:
            seen.setdefault(m.sdxl_block.label, set()).add(per_layer.get(m.name, 1.0))
    return {k: next(iter(seen[k])) for k in label_order(seen) if len(seen[k]) == 1}


# -- extract ----------------------------------------------------------------------------------

def _blocks_named(names: Sequence[str], layers: str, tool: str) -> list[SdxlBlock]:
    """Blocks by any name, each once, checked for ``layers`` (attention needs a block that has some)."""
    if layers not in LAYER_CHOICES:
        raise LoraFileError(f"{tool}: --layers {layers!r}: use one of {', '.join(LAYER_CHOICES)}")
    blocks: dict[str, tuple[SdxlBlock, str]] = {}
    for name in names:
        try:
            block = lookup_sdxl_block(name, attention=layers != "all", where=f"{tool}: ")
        except ValueError as e:
            raise LoraFileError(f"{e}; or use --layers all" if "holds no attention" in str(e) else str(e)) from None
        if block.name in blocks:
            raise LoraFileError(f"{tool}: block {block.name} is named twice ({blocks[block.name][1]} and {name}); name it once")
        blocks[block.name] = (block, name)
    if not blocks:
        raise LoraFileError(f"{tool}: no block named")
    return [b for b, _ in blocks.values()]


def extract(path, roles: Sequence[str], output, *, layers: str = "attention", force: bool = False,
            progress: Optional[Progress] = None, dtype: Optional[str] = None) -> WrittenFile:
    """From a LoRA trained on the whole UNet, keep the chosen blocks (any SDXL block by any name).

    ``layers="attention"`` (the default, the B-LoRA rule) keeps exactly the layers the presets
    train (attn1/attn2 to_q, to_k, to_v, to_out.0: 80 per full-size 1280-wide block); ``"transformer"``
    adds ff and proj_in/proj_out; ``"all"`` keeps every layer LoRA Block Weight counts in the block.
    """
    cast = output_dtype(dtype)
    blocks = _blocks_named(roles, layers, "extract")
    lora = open_sdxl_lora(path, need_blora=False)
    chosen = [m for b in blocks for m in _require(lora, b, layers, " to extract")]
    check_output_path(output, overwrite=force, inputs=[lora.path], suffixes=SAFETENSORS)
    out = _Output()
    with lora.reader() as reader:
        _gather(lora, reader, chosen, out, progress, dtype=cast)
        labels = out.roles()
        weights = cumulative_weights(lora.metadata, {}, labels)
        done = out.finish(lora.metadata, [_source(lora, labels or [b.name for b in blocks], {})], weights)
        skipped = len(lora.layers) - len(chosen)
        what = "attention layers" if layers == "attention" else "layers"
        warn = [f"left out {count(skipped, 'layer')} outside the chosen blocks' {what}"] if skipped else []
        return _write(output, done, force=force, inputs=[lora.path], progress=progress, weights=weights,
                      warnings=warn)


def _require(lora: LoraFile, block: SdxlBlock, layers: str, what: str) -> list[LoraLayer]:
    """The block's layers; for a B-LoRA role block without attention layers, the message B-LoRA users know."""
    found = lora.block_layers(block, layers)
    if not found and layers != "all" and block.role:
        lora.require_roles([block.role], what)
    if not found and layers == "attention" and block.role and lora.role_layers(block.role):
        have = sorted({m.ldm_path.rsplit(".", 1)[-1] if m.ldm_path else m.name for m in lora.role_layers(block.role)})
        raise LoraFileError(
            f"{lora.path}: the {block.role} block ({block.attention}) has no attention layers (to_q/to_k/to_v/to_out.0), "
            f"only {', '.join(have[:6])}; there is nothing B-LoRA would train to extract"
        )
    return lora.require_block(block, layers, what)


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
            f"{lora.path}: {count(len(lora.unparsed), 'tensor')} {'is' if len(lora.unparsed) == 1 else 'are'} not LoRA "
            "layers this tool knows "
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
