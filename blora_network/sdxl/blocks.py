"""B-LoRA's three blocks: which SDXL UNet block plays which role, and which of its layers are trained.

B-LoRA (Frenkel et al., ECCV 2024) trains LoRA on two SDXL attention blocks only:
``output_blocks.0.1`` learns content, ``output_blocks.1.1`` learns style, and optionally
``input_blocks.8.1`` learns layout. Inside a block only the attention projections are
trained (``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``, ``to_out.0``): 80 Linear layers
per full-size block; the feed-forward (``ff.net``) and ``proj_in``/``proj_out`` are left out.

Names in general (spellings, kinds, block maps) live in :mod:`blora_network.sdxl.names`; this
module says only what is special about these three blocks, including the one regex the
built-in presets are written from (:func:`block_pattern`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from .names import ATTENTION_PROJECTIONS, kohya_prefix

__all__ = [
    "Block",
    "BLOCKS",
    "ROLES",
    "TRANSFORMER_DEPTH",
    "lookup_block",
    "parse_roles",
    "block_at",
    "block_pattern",
    "attention_layer_names",
    "role_of_kohya_name",
]


@dataclass(frozen=True)
class Block:
    """One B-LoRA block under the names each tool uses for it."""

    role: str
    """``content``, ``style`` or ``layout``."""
    ldm: str
    """sd-scripts' (LDM/SGM) module path, e.g. ``output_blocks.0.1``."""
    diffusers: str
    """diffusers' module path, e.g. ``up_blocks.0.attentions.0``."""
    lbw: str
    """The LoRA Block Weight name users know (``OUT0``, ``OUT1``, ``IN08``)."""

    @property
    def kohya_prefix(self) -> str:
        """Key prefix of this block's layers in a kohya LoRA file (ends with ``_``)."""
        return kohya_prefix(self.ldm)


BLOCKS: tuple[Block, ...] = (
    Block("content", "output_blocks.0.1", "up_blocks.0.attentions.0", "OUT0"),
    Block("style", "output_blocks.1.1", "up_blocks.0.attentions.1", "OUT1"),
    Block("layout", "input_blocks.8.1", "down_blocks.2.attentions.1", "IN08"),
)
ROLES: tuple[str, ...] = tuple(b.role for b in BLOCKS)
TRANSFORMER_DEPTH = 10
"""Transformer blocks inside each of the three B-LoRA blocks (SDXL's deepest level)."""

_BY_LDM = {b.ldm: b for b in BLOCKS}
_BY_ALIAS = {alias.lower(): b for b in BLOCKS for alias in (b.role, b.ldm, b.diffusers, b.lbw, b.lbw.replace("0", "", 1))}


def lookup_block(name: str) -> Block:
    """A block by any of its names: role, LDM name, diffusers name or LBW name (``OUT0``, ``OUT1``, ``IN08``).

    >>> lookup_block("style").ldm
    'output_blocks.1.1'
    """
    block = _BY_ALIAS.get(name.strip().lower())
    if block is None:
        known = ", ".join(f"{b.role} ({b.ldm}, {b.lbw})" for b in BLOCKS)
        raise ValueError(f"unknown B-LoRA block {name!r}; known blocks: {known}")
    return block


def parse_roles(spec: str | Iterable[str]) -> list[str]:
    """``"content,style"`` (or any alias, e.g. ``"OUT0,OUT1"``) -> ``["content", "style"]``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    roles: list[str] = []
    for item in items:
        if not item.strip():
            continue
        role = lookup_block(item).role
        if role not in roles:
            roles.append(role)
    if not roles:
        raise ValueError("no B-LoRA block named; use content, style and/or layout")
    return roles


def block_at(ldm_path: str) -> Optional[Block]:
    """The B-LoRA block at an LDM block path (``output_blocks.0.1`` -> content), or None."""
    return _BY_LDM.get(ldm_path)


def block_pattern(block: Block) -> str:
    """The regex a preset uses for a block: its attention layers only.

    A negative lookahead that LyCORIS understands on every version (``exclude_name`` only
    works from 4.1). The built-in preset files are written from it (a test holds them to it).
    """
    return r"^(?!.*(ff\.net|proj)).*" + re.escape(block.ldm) + r"\..*$"


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
