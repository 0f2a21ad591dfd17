"""The B-LoRA vocabulary: which SDXL UNet block plays which role, under every spelling.

B-LoRA (Frenkel et al., ECCV 2024) trains LoRA on two SDXL attention blocks only:
``output_blocks.0.1`` learns content, ``output_blocks.1.1`` learns style, and optionally
``input_blocks.8.1`` learns layout. Inside a block only the attention projections are
trained (``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``, ``to_out.0``): 80 Linear layers
per full-size block; the feed-forward (``ff.net``) and ``proj_in``/``proj_out`` are left out.

Everything else in the package asks this module how a name maps to a role, so the rule
lives in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = [
    "block_at",
    "block_order",
    "Block",
    "BLOCKS",
    "ROLES",
    "ATTENTION_LAYER_RE",
    "block_for_role",
    "parse_roles",
    "block_pattern",
    "is_attention_layer",
    "attention_layer_names",
    "ATTENTION_PROJECTIONS",
    "TRANSFORMER_DEPTH",
    "ldm_name_of_kohya_key",
    "role_of_module_name",
    "role_of_kohya_key",
    "kohya_prefix",
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
        """Key prefix of this block's modules in a kohya LoRA file (ends with ``_``)."""
        return kohya_prefix(self.ldm)


BLOCKS: tuple[Block, ...] = (
    Block("content", "output_blocks.0.1", "up_blocks.0.attentions.0", "OUT0"),
    Block("style", "output_blocks.1.1", "up_blocks.0.attentions.1", "OUT1"),
    Block("layout", "input_blocks.8.1", "down_blocks.2.attentions.1", "IN08"),
)
ROLES: tuple[str, ...] = tuple(b.role for b in BLOCKS)
_BY_LDM = {b.ldm: b for b in BLOCKS}

_BY_ALIAS = {}
for _b in BLOCKS:
    for _alias in (_b.role, _b.ldm, _b.diffusers, _b.lbw, _b.lbw.replace("0", "", 1)):
        _BY_ALIAS[_alias.lower()] = _b

# The layer rule: attention projections, never the feed-forward or proj_in/proj_out.
ATTENTION_LAYER_RE = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def kohya_prefix(module_path: str, unet_prefix: str = "lora_unet") -> str:
    """``output_blocks.0.1`` -> ``lora_unet_output_blocks_0_1_``."""
    return f"{unet_prefix}_{module_path.replace('.', '_')}_"


def block_for_role(name: str) -> Block:
    """Look a block up by role, LDM name, diffusers name or LBW name (``OUT0``, ``OUT1``, ``IN08``).

    >>> block_for_role("style").ldm
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
        role = block_for_role(item).role
        if role not in roles:
            roles.append(role)
    if not roles:
        raise ValueError("no B-LoRA block named; use content, style and/or layout")
    return roles


def block_pattern(block: Block) -> str:
    """The regex the built-in presets use for a block: attention layers only.

    It is a negative lookahead LyCORIS understands on every version (``exclude_name``
    only works from 4.1).
    """
    return r"^(?!.*(ff\.net|proj)).*" + re.escape(block.ldm) + r"\..*$"


TRANSFORMER_DEPTH = 10
"""Transformer blocks inside each of the three B-LoRA blocks (SDXL's deepest level)."""
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


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


def is_attention_layer(module_path: str) -> bool:
    """True for ``...attn1.to_q`` and friends, False for ``ff.net.*``, ``proj_in``, norms."""
    return ATTENTION_LAYER_RE.search(module_path) is not None


def role_of_module_name(module_path: str) -> Optional[str]:
    """The role of a UNet module path (LDM or diffusers spelling), or None outside the blocks."""
    for b in BLOCKS:
        for base in (b.ldm, b.diffusers):
            if module_path == base or module_path.startswith(base + "."):
                return b.role
    return None


# kohya keys spell dots as underscores, which is ambiguous ("to_out_0"), so map the
# parts we need back by pattern rather than by replacing every underscore.
_KOHYA_LAYER_RE = re.compile(
    r"^(?P<block>(?:input_blocks|output_blocks)_\d+_\d+|middle_block_\d+)"
    r"_(?P<rest>.+)$"
)
_KOHYA_REST_RULES = (
    (re.compile(r"^transformer_blocks_(\d+)_(attn[12])_(to_q|to_k|to_v)$"), r"transformer_blocks.\1.\2.\3"),
    (re.compile(r"^transformer_blocks_(\d+)_(attn[12])_to_out_0$"), r"transformer_blocks.\1.\2.to_out.0"),
    (re.compile(r"^transformer_blocks_(\d+)_ff_net_0_proj$"), r"transformer_blocks.\1.ff.net.0.proj"),
    (re.compile(r"^transformer_blocks_(\d+)_ff_net_2$"), r"transformer_blocks.\1.ff.net.2"),
    (re.compile(r"^(proj_in|proj_out|norm)$"), r"\1"),
)


def ldm_name_of_kohya_key(key: str, unet_prefix: str = "lora_unet") -> Optional[str]:
    """``lora_unet_output_blocks_0_1_transformer_blocks_3_attn2_to_out_0.lora_up.weight``
    -> ``output_blocks.0.1.transformer_blocks.3.attn2.to_out.0``.

    Only names inside a transformer block are mapped (that is all B-LoRA needs); anything
    else returns None.
    """
    module = key.split(".", 1)[0]
    head = unet_prefix + "_"
    if not module.startswith(head):
        return None
    m = _KOHYA_LAYER_RE.match(module[len(head):])
    if m is None:
        return None
    parts = m.group("block").split("_")
    if parts[0] == "middle":
        block = f"middle_block.{parts[2]}"
    else:
        block = f"{parts[0]}_{parts[1]}.{parts[2]}.{parts[3]}"
    for rule, repl in _KOHYA_REST_RULES:
        if rule.match(m.group("rest")):
            return block + "." + rule.sub(repl, m.group("rest"))
    return None


def role_of_kohya_key(key: str) -> Optional[str]:
    """The role of a kohya LoRA key (``lora_unet_output_blocks_1_1_...``), or None."""
    for b in BLOCKS:
        if key.startswith(b.kohya_prefix):
            return b.role
    return None


_HEAD_ORDER = {"text_encoder": 0, "text_encoder_1": 0, "text_encoder_2": 0, "time_embed": 1, "label_emb": 2,
               "input_blocks": 3, "down_blocks": 3, "middle_block": 4, "mid_block": 4, "output_blocks": 5,
               "up_blocks": 5, "out": 6}


def block_order(block: str):
    """Sort key for block paths in model order: text encoders, time and label embeddings, input
    (down) blocks, middle, output (up) blocks, ``out``, then anything else; LDM or diffusers names."""
    head = block.split(".")[0]
    return (_HEAD_ORDER.get(head, 7), head, tuple(int(x) for x in re.findall(r"\d+", block)), block)


def block_at(ldm_path: str) -> Optional[Block]:
    """The B-LoRA block at an LDM block path (``output_blocks.0.1`` -> content), or None."""
    return _BY_LDM.get(ldm_path)
