"""SDXL's blocks by the names users know, and B-LoRA's three: which block plays which role, which layers are trained.

:data:`SDXL_BLOCKS` is the one table of blocks: each SDXL UNet block in LoRA Block Weight's notation
(``IN00``-``IN08``, ``M00``, ``OUT00``-``OUT08``, ``BASE`` for the text encoders) with its LDM and
diffusers names, its transformer (attention) block if it has one, and its B-LoRA role if any.
Every place that names a block asks it (:func:`lookup_sdxl_block`, with a "did you mean"); a block
label (its role, else its LBW name) is how options, metadata and reports key a block.

B-LoRA (Frenkel et al., ECCV 2024) trains LoRA on two SDXL attention blocks only:
``output_blocks.0.1`` learns content, ``output_blocks.1.1`` learns style, and optionally
``input_blocks.8.1`` learns layout. Inside a block only the attention projections are
trained (``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``, ``to_out.0``): 80 Linear layers
per full-size block; the feed-forward (``ff.net``) and ``proj_in``/``proj_out`` are left out.

Names in general (spellings, kinds, layer maps) live in :mod:`blora_network.sdxl.names`; this
module says what the blocks are, including the one regex the built-in presets and ``blocks=``
are written from (:func:`block_pattern_of`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Optional

from .names import ATTENTION_PROJECTIONS, kohya_prefix

__all__ = [
    "SdxlBlock",
    "SDXL_BLOCKS",
    "ATTENTION_BLOCKS",
    "LAYER_CHOICES",
    "LABELS",
    "lookup_sdxl_block",
    "parse_sdxl_blocks",
    "sdxl_block_of",
    "block_pattern_of",
    "label_of_kohya_name",
    "Block",
    "BLOCKS",
    "ROLES",
    "TRANSFORMER_DEPTH",
    "lookup_block",
    "block_at",
    "block_pattern",
    "attention_layer_names",
    "role_of_kohya_name",
]


@dataclass(frozen=True)
class SdxlBlock:
    """One SDXL block under every name users bring: LoRA Block Weight's, sd-scripts' (LDM), diffusers'.

    The LoRA Block Weight notation (``IN00``-``IN08``, ``M00``, ``OUT00``-``OUT08``, ``BASE``) names
    whole LDM blocks: ``OUT00`` is everything under ``output_blocks.0`` (its resnet and its
    attention block). ``BASE`` is both text encoders.
    """

    name: str
    """The LoRA Block Weight name: ``IN04``, ``M00``, ``OUT01``, ``BASE``."""
    ldm: str
    """sd-scripts' module path of the whole block (``output_blocks.0``; ``text_encoder`` for BASE)."""
    diffusers: tuple[str, ...]
    """diffusers' modules that make up the block (``up_blocks.0.resnets.0``, ``up_blocks.0.attentions.0``)."""
    attention: Optional[str]
    """The LDM path of its transformer (attention) block (``output_blocks.0.1``), or None when it has none."""
    role: Optional[str] = None
    """``content``, ``style`` or ``layout`` for B-LoRA's three blocks."""

    @property
    def label(self) -> str:
        """How files and options name the block: its B-LoRA role if it has one, else its LBW name."""
        return self.role or self.name

    @property
    def diffusers_attention(self) -> Optional[str]:
        return next((d for d in self.diffusers if ".attentions." in d), None)


def _sdxl_blocks() -> tuple[SdxlBlock, ...]:
    # SDXL's levels (sd-scripts' library/sdxl_original_unet.py): level 0 has no transformer,
    # levels 1 and 2 do; input_blocks 3 and 6 are downsamplers; output_blocks 2 and 5 end with an
    # upsampler (their third module); the deepest level has no downsampler, the last no upsampler.
    roles = {"output_blocks.0.1": "content", "output_blocks.1.1": "style", "input_blocks.8.1": "layout"}
    out = [SdxlBlock("BASE", "text_encoder", ("text_encoder", "text_encoder_2"), None),
           SdxlBlock("IN00", "input_blocks.0", ("conv_in",), None)]
    for n in range(1, 9):
        level, k = (n - 1) // 3, (n - 1) % 3
        if k == 2:
            out.append(SdxlBlock(f"IN{n:02d}", f"input_blocks.{n}", (f"down_blocks.{level}.downsamplers.0",), None))
            continue
        parts = (f"down_blocks.{level}.resnets.{k}",) + ((f"down_blocks.{level}.attentions.{k}",) if level else ())
        attn = f"input_blocks.{n}.1" if level else None
        out.append(SdxlBlock(f"IN{n:02d}", f"input_blocks.{n}", parts, attn, roles.get(attn or "")))
    out.append(SdxlBlock("M00", "middle_block", ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"),
                         "middle_block.1"))
    for n in range(9):
        level, k = n // 3, n % 3
        parts = (f"up_blocks.{level}.resnets.{k}",)
        attn = f"output_blocks.{n}.1" if level < 2 else None
        if attn:
            parts += (f"up_blocks.{level}.attentions.{k}",)
        if k == 2 and level < 2:
            parts += (f"up_blocks.{level}.upsamplers.0",)
        out.append(SdxlBlock(f"OUT{n:02d}", f"output_blocks.{n}", parts, attn, roles.get(attn or "")))
    return tuple(out)


SDXL_BLOCKS: tuple[SdxlBlock, ...] = _sdxl_blocks()
"""Every SDXL block in model order: BASE, IN00-IN08, M00, OUT00-OUT08 (LoRA Block Weight's 20-value order)."""
LAYER_CHOICES = ("attention", "transformer", "all")
"""Which layers of a named block a tool takes: its attention projections (the B-LoRA rule), its whole
transformer (attention, ff, proj_in/proj_out), or every layer LoRA Block Weight counts in it (resnets too)."""
ATTENTION_BLOCKS: tuple[SdxlBlock, ...] = tuple(b for b in SDXL_BLOCKS if b.attention)
"""The eleven blocks that hold a transformer: what ``blocks=`` can train and what ``--layers attention`` keeps."""


def _aliases(b: SdxlBlock) -> set[str]:
    names = {b.name, b.ldm, *b.diffusers}
    m = re.match(r"^(IN|OUT)0(\d)$", b.name)
    if m:
        names.add(m.group(1) + m.group(2))  # OUT0, IN8: how the B-LoRA README and some UIs write them
    if b.name == "M00":
        names |= {"MID", "M0", "M", "middle_block.1", "mid_block"}
    if b.name == "BASE":
        names |= {"text_encoder_1", "text_encoder_2", "te", "te1", "te2"}
    if b.attention:
        names.add(b.attention)
    if b.role:
        names.add(b.role)
    return {n.lower() for n in names}


_SDXL_BY_ALIAS = {alias: b for b in SDXL_BLOCKS for alias in _aliases(b)}
_SDXL_BY_NAME = {b.name: b for b in SDXL_BLOCKS}


def lookup_sdxl_block(name: str, *, attention: bool = False, where: str = "") -> SdxlBlock:
    """Any SDXL block by any of its names (``OUT01``, ``OUT1``, ``MID``, ``style``, ``output_blocks.1``,
    ``up_blocks.0.attentions.1``); a typo gets a "did you mean". With ``attention``, a block that
    holds no transformer is refused and the blocks that do are named.

    >>> lookup_sdxl_block("OUT1").attention
    'output_blocks.1.1'
    """
    text = str(name).strip()
    block = _SDXL_BY_ALIAS.get(text.lower())
    if block is None:
        known = [b.name for b in SDXL_BLOCKS] + list(ROLES) + ["MID"]
        close = difflib.get_close_matches(text.upper(), known, n=1) or difflib.get_close_matches(text.lower(), known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ValueError(f"{where}unknown SDXL block {text!r}{hint} Known blocks: {', '.join(known)}")
    if attention and block.attention is None:
        raise ValueError(
            f"{where}block {block.name} ({block.ldm}) holds no attention layers; blocks that do: "
            f"{', '.join(b.name for b in ATTENTION_BLOCKS)}"
        )
    return block


def parse_sdxl_blocks(spec, *, attention: bool = False, where: str = "") -> list[SdxlBlock]:
    """``"OUT00,OUT01,IN08"`` (or a list) -> blocks in model order; the same block twice is an error."""
    items = [i for i in (spec.split(",") if isinstance(spec, str) else list(spec)) if str(i).strip()]
    if not items:
        raise ValueError(f"{where}no block named; use names such as OUT00,OUT01 ({', '.join(b.name for b in SDXL_BLOCKS)})")
    seen: dict[str, str] = {}
    for item in items:
        block = lookup_sdxl_block(item, attention=attention, where=where)
        if block.name in seen:
            raise ValueError(f"{where}block {block.name} is named twice ({seen[block.name]!r} and {str(item).strip()!r}); "
                             "name each block once")
        seen[block.name] = str(item).strip()
    return [b for b in SDXL_BLOCKS if b.name in seen]


def sdxl_block_of(block_path: str) -> Optional[SdxlBlock]:
    """The SDXL block of a layer's block as :func:`blora_network.sdxl.names.block_of_kohya_name` gives it
    (``input_blocks.4.1`` -> IN04, ``middle_block.2`` -> M00, ``text_encoder_2`` -> BASE); None for the
    time and label embeddings and ``out``, which no LoRA Block Weight slot names."""
    if block_path.startswith("text_encoder"):
        return _SDXL_BY_NAME["BASE"]
    m = re.match(r"^(input_blocks|output_blocks)\.(\d+)(\.|$)", block_path)
    if m:
        return _SDXL_BY_NAME.get(f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}")
    if block_path.startswith("middle_block"):
        return _SDXL_BY_NAME["M00"]
    return None


@dataclass(frozen=True)
class Block:
    """One B-LoRA block under the names each tool uses for it (a view of :data:`SDXL_BLOCKS`)."""

    role: str
    """``content``, ``style`` or ``layout``."""
    ldm: str
    """sd-scripts' (LDM/SGM) module path, e.g. ``output_blocks.0.1``."""
    diffusers: str
    """diffusers' module path, e.g. ``up_blocks.0.attentions.0``."""
    lbw: str
    """The LoRA Block Weight name users know (``OUT00``, ``OUT01``, ``IN08``)."""

    @property
    def kohya_prefix(self) -> str:
        """Key prefix of this block's layers in a kohya LoRA file (ends with ``_``)."""
        return kohya_prefix(self.ldm)


_ROLE_ORDER = ("content", "style", "layout")
BLOCKS: tuple[Block, ...] = tuple(
    Block(b.role, b.attention, b.diffusers_attention, b.name)
    for role in _ROLE_ORDER for b in SDXL_BLOCKS if b.role == role
)
ROLES: tuple[str, ...] = tuple(b.role for b in BLOCKS)
TRANSFORMER_DEPTH = 10
"""Transformer blocks inside each of the three B-LoRA blocks (SDXL's deepest level)."""

LABELS: tuple[str, ...] = ROLES + tuple(b.label for b in ATTENTION_BLOCKS if not b.role)
"""Every attention block's label: B-LoRA's roles first (content, style, layout), then ``IN04``, ``IN05``,
``IN07``, ``M00``, ``OUT02``-``OUT05``: the order files, groups and reports list blocks in."""

_BY_LDM = {b.ldm: b for b in BLOCKS}
_BY_ROLE = {b.role: b for b in BLOCKS}


def lookup_block(name: str) -> Block:
    """A B-LoRA block by any name of it in :data:`SDXL_BLOCKS`: role, LDM, diffusers or LBW name.

    >>> lookup_block("style").ldm
    'output_blocks.1.1'
    """
    try:
        sdxl = lookup_sdxl_block(name)
    except ValueError:
        sdxl = None
    if sdxl is None or sdxl.role is None:
        known = ", ".join(f"{b.role} ({b.ldm}, {b.lbw})" for b in BLOCKS)
        raise ValueError(f"unknown B-LoRA block {name!r}; known blocks: {known}")
    return _BY_ROLE[sdxl.role]


def block_at(ldm_path: str) -> Optional[Block]:
    """The B-LoRA block at an LDM block path (``output_blocks.0.1`` -> content), or None."""
    return _BY_LDM.get(ldm_path)


def block_pattern(block: Block) -> str:
    """The regex a preset uses for a block: its attention layers only.

    A negative lookahead that LyCORIS understands on every version (``exclude_name`` only
    works from 4.1). The built-in preset files are written from it (a test holds them to it).
    """
    return block_pattern_of(block.ldm)


def block_pattern_of(attention_path: str) -> str:
    """:func:`block_pattern` for any transformer block by its LDM path (``output_blocks.3.1``)."""
    return r"^(?!.*(ff\.net|proj)).*" + re.escape(attention_path) + r"\..*$"


def attention_layer_names(block: Block, *, diffusers: bool = False) -> list[str]:
    """The 80 Linear layers B-LoRA trains in one block, as module paths.

    >>> attention_layer_names(BLOCKS[0])[0]
    'output_blocks.0.1.transformer_blocks.0.attn1.to_q'
    """
    base = block.diffusers if diffusers else block.ldm
    return [
        f"{base}.transformer_blocks.{i}.{attn}.{proj}"
        for i in range(TRANSFORMER_DEPTH)
        for attn in ("attn1", "attn2")
        for proj in ATTENTION_PROJECTIONS
    ]


def role_of_kohya_name(name: str) -> Optional[str]:
    """The role of a canonical kohya module name or key (``lora_unet_output_blocks_1_1_...``), or None."""
    for b in BLOCKS:
        if name.startswith(b.kohya_prefix):
            return b.role
    return None


def label_of_kohya_name(name: str) -> Optional[str]:
    """The label of a canonical kohya module name or key inside one of the eleven attention blocks
    (``lora_unet_output_blocks_3_1_...`` -> ``OUT03``, ``..._output_blocks_1_1_...`` -> ``style``), or None."""
    for b in ATTENTION_BLOCKS:
        if name.startswith(kohya_prefix(b.attention)):
            return b.label
    return None
