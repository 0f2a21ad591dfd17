"""``inspect``: what a LoRA file holds, block by block, and what looks wrong with it.

Works on any SDXL LoRA file (ours or anyone's): the B-LoRA blocks it holds (content, style,
layout) and everything else as ``other``, with layer counts, ranks, alphas, the size of each
block's change ||dW||_F, the training metadata that matters, and warnings (NaN/Inf, alpha
different from rank, layers outside the B-LoRA blocks, mixed ranks, DoRA). Nothing printed:
the CLI formats the :class:`InspectReport`, and ``--json`` is the dataclass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from blora_network.errors import count
from blora_network.files.algos import all_finite, alpha_value, effective_alpha
from blora_network.files.lorafile import DTYPE_NAMES, LoraFile, LoraLayer, ModelGuess, guess_model, open_sdxl_lora
from blora_network.files.measure import Progress, layer_norm_sq
from blora_network.files.metadata import KEY_PRESET, KEY_WEIGHTS
from blora_network.sdxl.blocks import ROLES, lookup_sdxl_block, sdxl_block_of

from .blockweights import BlockWeights, block_weight_vectors

__all__ = ["BlockReport", "InspectReport", "inspect", "TRAINING_KEYS"]


@dataclass
class BlockReport:
    """One block of a file: content, style, layout, a block its metadata says was trained (``OUT03``,
    ``M00``: ``blocks=`` training), or ``other`` (everything else)."""

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
    block_names: dict[str, str] = field(default_factory=dict)
    """For ``other``: the LoRA Block Weight name of each of ``blocks`` (``input_blocks.4.1`` -> ``IN04``;
    text encoders -> ``BASE``); the time and label embeddings and ``out`` have none."""


@dataclass
class InspectReport:
    file: str
    file_bytes: int
    model: str
    spellings: list[str]
    dtypes: dict[str, int]
    blocks: dict[str, BlockReport]
    """content / style / layout (those present), then ``other`` when the file has more."""
    training: dict[str, Any]
    """The metadata that matters: network module, preset, dim, alpha, steps, base model... (numbers as numbers)."""
    warnings: list[str]
    modules: int
    tensors: int
    nonfinite_tensors: list[str] = field(default_factory=list)
    block_weights: list[BlockWeights] = field(default_factory=list)
    """Vectors for A1111/Forge LoRA Block Weight and ComfyUI Inspire Pack: content only, style only, both."""


TRAINING_KEYS = (
    ("network module", "ss_network_module", str),
    ("preset", KEY_PRESET, str),
    ("dim", "ss_network_dim", int),
    ("alpha", "ss_network_alpha", float),
    ("steps", "ss_steps", int),
    ("max steps", "ss_max_train_steps", int),
    ("epochs", "ss_epoch", int),
    ("learning rate", "ss_learning_rate", float),
    ("base model", "ss_sd_model_name", str),
    ("base model version", "ss_base_model_version", str),
    ("architecture", "modelspec.architecture", str),
    ("network args", "ss_network_args", str),
    ("trained at", "ss_training_finished_at", str),
    ("B-LoRA weights baked", KEY_WEIGHTS, str),
)
"""(label, metadata key, type) of what inspect shows from a file's training metadata. Metadata is
text; numbers are given as numbers where the text is one (``--json`` readers compare them)."""


def _typed(text: str, kind: type):
    if kind is str:
        return text
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):
        return text
    return int(value) if kind is int and value.is_integer() else value


@dataclass
class _Tally:
    """What reading one group's layers found."""

    norm_sq: Optional[float] = 0.0
    alphas: set = field(default_factory=set)
    rank_alpha: set = field(default_factory=set)


def inspect(path, *, norms: bool = True, progress: Optional[Progress] = None) -> InspectReport:
    """What a LoRA file holds, block by block, with the size of each block's change.

    Reads every tensor once, to find NaN/Inf and (with ``norms``) to measure each block's
    change exactly. LoRA norms come from r x r Gram matrices, which costs about
    ``params x rank`` multiply-adds: nothing at B-LoRA's usual ranks, seconds at rank 600+.
    ``norms=False`` skips that and only scans for NaN/Inf.
    """
    lora = open_sdxl_lora(path, need_blora=False)
    groups: dict[str, list[LoraLayer]] = {r: lora.role_layers(r) for r in lora.roles()}
    groups.update(lora.trained_blocks())
    if not groups:  # neither a B-LoRA block nor blocks its metadata names: refused as before
        open_sdxl_lora(path)
    grouped = {m.name for g in groups.values() for m in g}
    others = [m for m in lora.layers.values() if m.name not in grouped]
    if others:
        groups["other"] = others
    tallies, nonfinite = _read_groups(lora, groups, norms, progress)
    guess = guess_model(lora)
    blocks = {group: _block_report(lora, group, layers, tallies[group], norms) for group, layers in groups.items()}
    return InspectReport(
        file=str(lora.path),
        file_bytes=lora.size,
        model=guess.model,
        spellings=list(lora.spellings),
        dtypes={DTYPE_NAMES.get(k, k.lower()): v for k, v in lora.dtypes.items()},
        blocks=blocks,
        training={label: _typed(lora.metadata[key], kind) for label, key, kind in TRAINING_KEYS if key in lora.metadata},
        warnings=_warnings(lora, blocks, {g: t.rank_alpha for g, t in tallies.items()}, nonfinite, guess),
        modules=len(lora.layers),
        tensors=sum(len(m.keys) for m in lora.layers.values()) + len(lora.unparsed),
        nonfinite_tensors=nonfinite,
        block_weights=block_weight_vectors(lora.roles(), [m.block for m in lora.layers.values()],
                                           [g for g in groups if g not in ROLES and g != "other"]),
    )


def _read_groups(lora: LoraFile, groups: dict[str, list[LoraLayer]], norms: bool,
                 progress: Optional[Progress]) -> tuple[dict[str, _Tally], list[str]]:
    """One pass over every tensor: alphas, norms (a group's norm is None when any layer has none), NaN/Inf."""
    tallies = {g: _Tally() for g in groups}
    group_of = {m.name: g for g, layers in groups.items() for m in layers}
    nonfinite: list[str] = []
    threads = torch.get_num_threads()  # before the reader drops to one thread
    with lora.reader() as reader:
        layers = [m for g in groups.values() for m in g]
        for m, tensors in reader.read(layers, progress=progress, refuse_nonfinite=False, extra_keys=lora.unparsed):
            tally = tallies[group_of[m.name]]
            a = effective_alpha(alpha_value(tensors), m.rank) if m.rank is not None else None
            if a is not None:
                tally.alphas.add(a)
                tally.rank_alpha.add((m.rank, a))
            value = layer_norm_sq(m, tensors, threads) if norms and m.algo != "other" and not m.dora else None
            if value is None or not math.isfinite(value):
                nonfinite += [m.keys[s] for s, t in tensors.items() if not all_finite(t)]
            if value is None or tally.norm_sq is None:
                tally.norm_sq = None
            elif math.isfinite(value):
                tally.norm_sq += value
        nonfinite += [key for key in lora.unparsed if not all_finite(reader.get(key))]
    return tallies, nonfinite


def _block_report(lora: LoraFile, group: str, layers: list[LoraLayer], tally: _Tally, norms: bool) -> BlockReport:
    b = None if group == "other" else lookup_sdxl_block(group)
    return BlockReport(
        role=group,
        ldm=b.attention if b else None,
        lbw=b.name if b else None,
        modules=len(layers),
        attention_modules=sum(1 for m in layers if m.is_attention),
        params=sum(m.params for m in layers),
        bytes=sum(m.nbytes for m in layers),
        algos=sorted({m.kind for m in layers}),
        ranks=sorted({m.rank for m in layers if m.rank is not None}),
        alphas=sorted(tally.alphas),
        norm=math.sqrt(tally.norm_sq) if tally.norm_sq is not None and norms else None,
        blocks=lora.other_blocks() if group == "other" else {},
        block_names=_lbw_names(lora.other_blocks()) if group == "other" else {},
    )


def _lbw_names(blocks) -> dict[str, str]:
    return {b: s.name for b in blocks if (s := sdxl_block_of(b)) is not None}


def _warnings(lora: LoraFile, blocks: dict[str, BlockReport], pairs: dict[str, set], nonfinite: list[str],
              guess: ModelGuess) -> list[str]:
    out: list[str] = [f"this file was {guess.reason}"] if guess.model == "demo" else []
    if nonfinite:
        out.append(
            f"{count(len(nonfinite), 'tensor')} {'holds' if len(nonfinite) == 1 else 'hold'} NaN or Inf (first: {nonfinite[0]}); the file will give black or "
            "noise images: use an earlier checkpoint or retrain with a lower learning rate"
        )
    off: dict[tuple, list[str]] = {}
    known = {(r, a) for pr in pairs.values() for r, a in pr if r is not None and a is not None}
    # A file storing one alpha over several ranks (what our writers make, algos.one_alpha) keeps each
    # layer's own alpha/rank in lora_up: only the largest rank's alpha says how the change is scaled.
    top = max((r for r, _ in known), default=None) if len({a for _, a in known}) == 1 else None
    for role, pr in pairs.items():
        for r, a in sorted((r, a) for r, a in pr if r is not None and a is not None
                           and abs(a - r) > 1e-6 * max(1.0, r) and top in (None, r)):
            off.setdefault((r, a), []).append(role)
    for (r, a), roles in off.items():
        out.append(
            f"alpha {a:g} differs from rank {r} in {', '.join(dict.fromkeys(roles))}: the change is scaled by "
            f"alpha/rank = {a / r:.4g} (sd-scripts' default --network_alpha is 1; the original B-LoRA uses alpha = rank)"
        )
    other = blocks.get("other")
    if other is not None:
        shown = ", ".join(f"{b}{' ' + other.block_names[b] if b in other.block_names else ''} ({n})"
                          for b, n in list(other.blocks.items())[:6])
        more = f" and {len(other.blocks) - 6} more" if len(other.blocks) > 6 else ""
        out.append(
            f"{count(other.modules, 'module')} {'lies' if other.modules == 1 else 'lie'} outside the B-LoRA blocks: {shown}{more}; "
            "`blora-network extract` keeps only the B-LoRA attention layers"
        )
    for role in ROLES:
        rep = blocks.get(role)
        if rep is not None and rep.attention_modules < rep.modules:
            out.append(
                f"{role}: {rep.modules - rep.attention_modules} of its {count(rep.modules, 'layer')} {'is' if rep.modules - rep.attention_modules == 1 else 'are'} not attention "
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
        out.append(f"{count(len(lora.unparsed), 'tensor')} {'is' if len(lora.unparsed) == 1 else 'are'} not LoRA layers (first: {lora.unparsed[0]})")
    return out
