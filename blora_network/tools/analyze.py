"""Where a LoRA puts its change: the size of dW per UNet block and per layer kind.

B-LoRA says that in SDXL the attention of ``output_blocks.0.1`` carries content and that of
``output_blocks.1.1`` carries style (``input_blocks.8.1``: layout). :func:`analyze` measures
any SDXL LoRA (kohya, diffusers or PEFT names; LoRA, LoHa, LoKr) against that map: the
Frobenius norm of each layer's change, summed per UNet block and per kind of layer, and a
suggestion of which ``blora-network extract --blocks`` to run.

Sizes and shares
    Every layer's change dW is a separate matrix, so the squared Frobenius norms add up:
    ``||dW_unet||^2 = sum over layers of ||dW_layer||^2``. A block's norm is the square root
    of its layers' sum, and a *share* is always a share of that energy (``||dW||_F^2``), so
    the shares of the blocks (or of the kinds) add up to 100%. Text-encoder layers are
    reported apart and are not part of any UNet share.

Layer kinds
    ``self_attn`` (``attn1``), ``cross_attn`` (``attn2``), ``ff`` (``ff.net``), ``proj``
    (``proj_in``/``proj_out``) and ``other`` (resnet convolutions, time and label embeddings,
    up/downsamplers: what a LoCon or whole-UNet LoRA trains outside the transformers).

The suggestion (:data:`DOMINANT_SHARE`, :data:`PART_SHARE`, :data:`ALMOST_NONE`, :data:`LOW_COVERAGE`)
    Only the attention change (``self_attn`` + ``cross_attn``) inside the three B-LoRA blocks
    counts, since that is what B-LoRA trains and ``extract`` keeps. Each block's share of it:

    1. one block holds at least 60% -> the LoRA is "mostly" that block's role: keep that block;
    2. otherwise keep every block holding at least 20% (e.g. content and style);
    3. when under 5% of the UNet's attention change is in the B-LoRA blocks at all, there is
       nothing worth extracting and no command is given; under 20%, the command comes with a
       note that the extracted file keeps only part of the LoRA's effect.

Nothing here prints; :mod:`blora_network.cli.main` does the talking, :mod:`blora_network.tools.plot` draws.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from typing import Optional

import torch

from blora_network.errors import LoraFileError, count
from blora_network.files.lorafile import LoraFile, guess_model, open_sdxl_lora
from blora_network.files.measure import layer_norm_sq
from blora_network.sdxl.blocks import BLOCKS, block_at, sdxl_block_of
from blora_network.sdxl.names import ATTENTION_KINDS, LAYER_KINDS, SDXL_TRANSFORMER_BLOCKS, block_order, layer_kind

__all__ = [
    "KINDS",
    "KIND_LABELS",
    "SDXL_TRANSFORMER_BLOCKS",
    "DOMINANT_SHARE",
    "PART_SHARE",
    "ALMOST_NONE",
    "LOW_COVERAGE",
    "BlockRow",
    "KindTotal",
    "BLoraShare",
    "TextEncoderRow",
    "Suggestion",
    "AnalyzeReport",
    "analyze",
]

KINDS = LAYER_KINDS
KIND_LABELS = {"self_attn": "self-attn", "cross_attn": "cross-attn", "ff": "ff", "proj": "proj", "other": "other"}

DOMINANT_SHARE = 0.60
"""A B-LoRA block holding this much of the B-LoRA blocks' attention change is suggested alone."""
PART_SHARE = 0.20
"""Otherwise every B-LoRA block holding at least this much is suggested."""
ALMOST_NONE = 0.05
"""Under this share of the UNet's attention change in the B-LoRA blocks: no command is suggested."""
LOW_COVERAGE = 0.20
"""Under this share the suggestion notes that the extracted file keeps only part of the effect."""


@dataclass
class BlockRow:
    """One UNet block (LDM name; ``input_blocks.4.0`` is a resnet, ``input_blocks.4.1`` a transformer)."""

    block: str
    role: Optional[str]
    """``content``, ``style``, ``layout`` for the B-LoRA blocks, else None."""
    lbw: Optional[str]
    modules: int
    norm: float
    """||dW||_F of the block: sqrt of the sum of its layers' ||dW||_F^2."""
    share: float
    """The block's ||dW||_F^2 over the UNet's (0..1)."""
    kinds: dict[str, float] = field(default_factory=dict)
    """Layer kind -> ||dW||_F of that kind in this block (kinds present only)."""


@dataclass
class KindTotal:
    kind: str
    modules: int
    norm: float
    share: float
    """Of the UNet's ||dW||_F^2."""


@dataclass
class BLoraShare:
    """The attention change (attn1 + attn2) of one B-LoRA block."""

    role: str
    block: str
    lbw: str
    modules: int
    """Attention layers of this block in the file (80 for a full B-LoRA block)."""
    attention_norm: float
    share: float
    """Of the attention change in the three B-LoRA blocks together (what the suggestion uses)."""
    unet_attention_share: float
    """Of the attention change in the whole UNet."""


@dataclass
class TextEncoderRow:
    name: str
    """``text_encoder_1``, ``text_encoder_2`` (or ``text_encoder`` for a single-encoder file)."""
    modules: int
    norm: float


@dataclass
class Suggestion:
    roles: list[str]
    """The blocks to extract (empty when nothing is worth extracting)."""
    text: str
    command: Optional[str]
    """The exact ``blora-network extract`` command line, or None."""
    kept_share: float
    """Share of the UNet's ||dW||_F^2 the suggested extract keeps (0 when no roles)."""


@dataclass
class AnalyzeReport:
    file: str
    model: str
    spellings: list[str]
    unet_modules: int
    unet_norm: float
    """||dW||_F over every measured UNet layer."""
    blocks: list[BlockRow]
    """UNet blocks the file changes, in UNet order (input_blocks, middle_block, output_blocks)."""
    kinds: dict[str, KindTotal]
    """All five kinds, in :data:`KINDS` order (modules 0 where absent)."""
    blora: list[BLoraShare]
    """content, style, layout (always all three)."""
    blora_attention_share: float
    """Share of the UNet's attention change (attn1 + attn2) that lies in the B-LoRA blocks."""
    text_encoders: list[TextEncoderRow]
    text_encoder_norm: Optional[float]
    """||dW||_F over the text-encoder layers, None without any; never part of a UNet share."""
    suggestion: Suggestion
    not_measured: list[str] = field(default_factory=list)
    """Layers left out of every number (DoRA, unknown algorithms, NaN/Inf)."""
    warnings: list[str] = field(default_factory=list)


# -- the analysis ------------------------------------------------------------------------------

def analyze(path, *, progress=None) -> AnalyzeReport:
    """Measure ``||dW||_F`` of every layer of an SDXL LoRA file and sum it per block and kind.

    Reads each layer's tensors once (lazily); LoRA norms come from r x r Gram matrices. SD1.x
    and SD2.x files are refused, and so is a file without UNet layers.
    """
    lora = open_sdxl_lora(path, need_blora=False)
    unet = [m for m in lora.layers.values() if not m.is_text_encoder]
    te = [m for m in lora.layers.values() if m.is_text_encoder]
    if not unet:
        raise LoraFileError(
            f"{lora.path}: holds no UNet layers, only {len(te)} text-encoder layers; "
            "B-LoRA blocks are in the UNet, so there is nothing to analyze"
        )
    energy, not_measured, nonfinite, skipped_kinds = _measure(lora, progress)
    if not any(m.name in energy for m in unet):
        why = sorted(skipped_kinds | ({"NaN or Inf"} if nonfinite else set()))
        raise LoraFileError(
            f"{lora.path}: none of its {len(unet)} UNet layers can be measured "
            f"({'; '.join(why)}; first: {unet[0].name})"
        )
    rows, kinds, blora, coverage, attn_unet = _shares(unet, energy)
    total = sum(k.norm ** 2 for k in kinds.values())
    te_rows = []
    for name in sorted({m.block for m in te}):
        ms = [m for m in te if m.block == name and m.name in energy]
        te_rows.append(TextEncoderRow(name=name, modules=len(ms), norm=math.sqrt(sum(energy[m.name] for m in ms))))
    return AnalyzeReport(
        file=str(lora.path),
        model=guess_model(lora).model,
        spellings=list(lora.spellings),
        unet_modules=len(unet),
        unet_norm=math.sqrt(total),
        blocks=rows,
        kinds=kinds,
        blora=blora,
        blora_attention_share=coverage,
        text_encoders=te_rows,
        text_encoder_norm=math.sqrt(sum(r.norm ** 2 for r in te_rows)) if te_rows else None,
        suggestion=_suggest(lora, unet, energy, rows, blora, total, attn_unet, coverage),
        not_measured=not_measured,
        warnings=_warnings(not_measured, nonfinite, skipped_kinds, total),
    )


def _measure(lora: LoraFile, progress) -> tuple[dict[str, float], list[str], list[str], set[str]]:
    """``||dW||_F^2`` per layer name, and the layers left out (DoRA, unknown algorithms, NaN/Inf)."""
    not_measured: list[str] = []
    nonfinite: list[str] = []
    skipped_kinds: set[str] = set()
    measurable = []
    for m in lora.layers.values():
        if m.algo == "other" or m.dora:
            not_measured.append(m.name)
            skipped_kinds.add("DoRA: its change depends on the base weights" if m.dora
                              else "an algorithm these tools do not know")
        else:
            measurable.append(m)
    energy: dict[str, float] = {}
    threads = torch.get_num_threads()  # before the reader drops to one thread
    with lora.reader() as reader:
        for m, tensors in reader.read(measurable, progress=progress, refuse_nonfinite=False):
            value = layer_norm_sq(m, tensors, threads)
            if math.isfinite(value):
                energy[m.name] = value
            else:
                not_measured.append(m.name)
                nonfinite.append(m.name)
    return energy, not_measured, nonfinite, skipped_kinds


def _shares(unet, energy: dict[str, float]):
    """The rows per block and kind, the B-LoRA blocks' attention shares, and the coverage."""
    block_e: dict[str, dict[str, float]] = {}
    block_n: dict[str, int] = {}
    kind_e = {k: 0.0 for k in KINDS}
    kind_n = {k: 0 for k in KINDS}
    attn_modules: dict[str, int] = {}
    for m in unet:
        if m.name not in energy:
            continue
        b, k, e = m.block, layer_kind(m.name), energy[m.name]
        block_e.setdefault(b, {})
        block_e[b][k] = block_e[b].get(k, 0.0) + e
        block_n[b] = block_n.get(b, 0) + 1
        kind_e[k] += e
        kind_n[k] += 1
        if k in ATTENTION_KINDS:
            attn_modules[b] = attn_modules.get(b, 0) + 1
    total = sum(kind_e.values())
    rows = []
    for b in sorted(block_e, key=block_order):
        ks = block_e[b]
        blk = block_at(b)
        rows.append(BlockRow(
            block=b, role=blk.role if blk else None, lbw=getattr(sdxl_block_of(b), "name", None), modules=block_n[b],
            norm=math.sqrt(sum(ks.values())), share=_share(sum(ks.values()), total),
            kinds={k: math.sqrt(ks[k]) for k in KINDS if k in ks},
        ))
    kinds = {k: KindTotal(kind=k, modules=kind_n[k], norm=math.sqrt(kind_e[k]), share=_share(kind_e[k], total))
             for k in KINDS}
    attn_unet = sum(kind_e[k] for k in ATTENTION_KINDS)
    attn_block = {b: sum(ks.get(k, 0.0) for k in ATTENTION_KINDS) for b, ks in block_e.items()}
    attn_blora = sum(attn_block.get(b.ldm, 0.0) for b in BLOCKS)
    blora = [
        BLoraShare(role=b.role, block=b.ldm, lbw=b.lbw, modules=attn_modules.get(b.ldm, 0),
                   attention_norm=math.sqrt(attn_block.get(b.ldm, 0.0)),
                   share=_share(attn_block.get(b.ldm, 0.0), attn_blora),
                   unet_attention_share=_share(attn_block.get(b.ldm, 0.0), attn_unet))
        for b in BLOCKS
    ]
    return rows, kinds, blora, _share(attn_blora, attn_unet), attn_unet


def _share(e: float, of: float) -> float:
    return e / of if of > 0 else 0.0


def _warnings(not_measured: list[str], nonfinite: list[str], skipped_kinds: set[str], total: float) -> list[str]:
    warnings = []
    if nonfinite:
        warnings.append(f"{count(len(nonfinite), 'layer')} {'holds' if len(nonfinite) == 1 else 'hold'} NaN or Inf (first: {nonfinite[0]}) and are left out of every "
                        "number; the file will give black or noise images")
    skipped = [n for n in not_measured if n not in nonfinite]
    if skipped:
        warnings.append(f"{count(len(skipped), 'layer')} {'is' if len(skipped) == 1 else 'are'} not measured and left out of every number "
                        f"({'; '.join(sorted(skipped_kinds))}; first: {skipped[0]})")
    if total == 0:
        warnings.append("every measured UNet layer's change is zero (an untrained LoRA, or lora_up all zeros)")
    return warnings


def _pct(x: float) -> str:
    """``0.8612`` -> ``86%``; small but nonzero shares are not shown as 0."""
    if 0 < x < 0.005:
        return "<1%" if x >= 0.0005 else "<0.1%"
    return f"{100 * x:.0f}%"


def _roles_text(roles) -> str:
    names = list(roles)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _suggest(lora, unet, energy, rows, blora, total, attn_unet, coverage) -> Suggestion:
    """The rule in the module docstring, as text and a command line."""
    none = lambda text: Suggestion(roles=[], text=text, command=None, kept_share=0.0)  # noqa: E731
    where = ", ".join(f"{b.role} {b.ldm}" for b in BLOCKS)
    top = max(rows, key=lambda r: r.share, default=None)
    if total == 0:
        return none("every UNet layer's change is zero: there is nothing to extract")
    if not any(b.modules for b in blora):
        return none(f"this LoRA has no attention layers in the B-LoRA blocks ({where}), so B-LoRA cannot separate "
                    f"its content and style; most of its change is in {top.block} ({_pct(top.share)})")
    if attn_unet == 0:
        return none(f"this LoRA changes no attention layer (its attention layers' change is zero); most of its "
                    f"change is in {top.block} ({_pct(top.share)}): there is nothing B-LoRA would extract")
    if coverage < ALMOST_NONE:
        attn_rows = sorted(((r, sum(r.kinds.get(k, 0.0) ** 2 for k in ATTENTION_KINDS)) for r in rows),
                           key=lambda x: -x[1])
        most = attn_rows[0][0].block
        return none(f"almost none of this LoRA's attention change is in the B-LoRA blocks ({_pct(coverage)}; "
                    f"most is in {most}): extracting them would drop nearly all of its effect")
    ranked = sorted(blora, key=lambda b: -b.share)
    lead = ranked[0]
    if lead.share >= DOMINANT_SHARE:
        roles = [lead.role]
        text = (f"{_pct(lead.share)} of the attention change in the B-LoRA blocks is in {lead.block} ({lead.role}): "
                f"this LoRA is mostly {lead.role}")
    else:
        roles = [b.role for b in blora if b.share >= PART_SHARE]
        split = ", ".join(f"{b.role} {_pct(b.share)}" for b in blora if b.modules)
        text = f"the attention change in the B-LoRA blocks is split ({split}): this LoRA holds {_roles_text(roles)}"
    kept = sum(energy[m.name] for m in unet if m.name in energy and m.role in roles and layer_kind(m.name) in ATTENTION_KINDS)
    kept_share = kept / total
    if coverage < LOW_COVERAGE:
        text += (f"; note that only {_pct(coverage)} of its attention change is in the B-LoRA blocks, so the "
                 "extracted file keeps only part of its effect")
    keep = {m.name for m in unet if m.role in roles and layer_kind(m.name) in ATTENTION_KINDS}
    if keep == set(lora.layers):
        text += f"; {lora.path.name} holds only those layers already, so there is nothing to extract"
        return Suggestion(roles=roles, text=text, command=None, kept_share=kept_share)
    out = lora.path.with_name(f"{lora.path.stem}_{'_'.join(roles)}.safetensors")
    command = (f"blora-network extract {shlex.quote(str(lora.path))} --blocks {','.join(roles)} "
               f"-o {shlex.quote(str(out))}")
    return Suggestion(roles=roles, text=text, command=command, kept_share=kept_share)
