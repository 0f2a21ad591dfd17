"""Block-weight vectors that apply only the content, only the style, or both, in the UIs.

Two tools, two notations (read from their source; nothing of their code is used here):

- **A1111/Forge, LoRA Block Weight** (hako-mikan/sd-webui-lora-block-weight,
  ``scripts/lora_block_weight.py`` at b403cb7): an SDXL LoRA takes 12 weights in the order of
  ``BLOCKID12 = BASE, IN04, IN05, IN07, IN08, M00, OUT00, OUT01, OUT02, OUT03, OUT04, OUT05``
  (``<lora:NAME:1:lbw=...>``). ``to26`` places them on the 26 slots of ``BLOCKID26`` and
  ``ratiodealer`` gives each layer the weight of the slot whose key it contains:
  ``BLOCKS`` maps slot 0 to ``encoder``/``embedders`` (the text encoders: BASE), slot 1+k to
  ``diffusion_model_input_blocks_k_``, 13 to ``diffusion_model_middle_block_`` and 14+k to
  ``diffusion_model_output_blocks_k_``. Blocks missing from the 12 get 0; a layer no slot
  names keeps weight 1. The position of a block is fixed, whatever the file holds.
- **ComfyUI, Inspire Pack** (ltdrdata/ComfyUI-Inspire-Pack, ``inspire/lora_block_weight.py`` at
  1aef2c5, ``LoraLoaderBlockWeight.load_lbw``): the first value is BASE (every layer outside
  ``input_blocks``/``middle_block``/``output_blocks``); the next values go, one each, to the
  UNet blocks **the file holds**, sorted input, middle, output, by block number (a new value
  starts where the block number changes). ``validate`` wants at least 12 values; values past
  the file's blocks are not used. So the vector depends on the file: for a content+style
  B-LoRA, value 2 is output_blocks.0 (content) and value 3 is output_blocks.1 (style).

Both weight a whole UNet block (its resnets too); a B-LoRA file holds only attention layers
there, so the vectors are exact for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from blora_network.sdxl.blocks import lookup_block

__all__ = ["LBW_SDXL_BLOCKS", "BlockWeights", "lbw_slot", "lbw_vector", "inspire_blocks", "inspire_vector",
           "block_weight_vectors"]

LBW_SDXL_BLOCKS: tuple[str, ...] = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00",
                                    "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
"""sd-webui-lora-block-weight's ``BLOCKID12``: its SDXL LoRA notation, in order."""
INSPIRE_MIN_VALUES = 12
"""Inspire Pack's ``validate`` refuses a vector with fewer values."""

_UNET_BLOCK_RE = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)")
_LBW_PREFIX = {"input_blocks": "IN", "middle_block": "M", "output_blocks": "OUT"}
_ORDER = ("input_blocks", "middle_block", "output_blocks")


def unet_block(ldm_block: str) -> Optional[tuple[str, int]]:
    """``output_blocks.1.1`` -> ``("output_blocks", 1)``; text encoders, embeddings, ``out`` -> None."""
    m = _UNET_BLOCK_RE.match(ldm_block)
    return (m.group(1), int(m.group(2))) if m else None


def lbw_slot(ldm_block: str) -> str:
    """The LoRA Block Weight name of a layer's block: ``IN08``, ``M00``, ``OUT01``; ``BASE`` outside the UNet blocks."""
    ub = unet_block(ldm_block)
    if ub is None:
        return "BASE"
    kind, n = ub
    if kind == "middle_block":
        return "M00"  # one slot for the whole middle block (BLOCKS: diffusion_model_middle_block_)
    return f"{_LBW_PREFIX[kind]}{n:02d}"


def _fmt(w: float) -> str:
    return str(int(w)) if float(w).is_integer() else f"{w:g}"


def lbw_vector(weights: dict[str, float]) -> str:
    """The 12-value SDXL vector for LoRA Block Weight; ``weights`` maps LDM blocks to weights, the rest 0."""
    slots = {lbw_slot(b): w for b, w in weights.items()}
    missing = [s for s in slots if s not in LBW_SDXL_BLOCKS]
    if missing:
        raise ValueError(f"blocks {missing} have no place in the 12-value SDXL notation")
    return ",".join(_fmt(slots.get(s, 0.0)) for s in LBW_SDXL_BLOCKS)


def inspire_blocks(ldm_blocks: Iterable[str]) -> list[tuple[str, int]]:
    """The UNet blocks of a file in the order Inspire Pack gives them vector values: one entry per
    change of block number along input (by number), middle, output (by number)."""
    present = sorted({ub for b in ldm_blocks if (ub := unet_block(b))}, key=lambda x: (_ORDER.index(x[0]), x[1]))
    out: list[tuple[str, int]] = []
    for kind, n in present:
        if out and out[-1][1] == n:  # load_lbw compares block numbers only: e.g. input 8 then output 8 share a value
            continue
        out.append((kind, n))
    return out


def inspire_vector(ldm_blocks: Iterable[str], weights: dict[str, float], base: float = 0.0) -> str:
    """The Inspire Pack vector for a file holding ``ldm_blocks``; ``weights`` maps LDM blocks to weights."""
    by_block = {unet_block(b): w for b, w in weights.items()}
    values = [base] + [by_block.get(ub, 0.0) for ub in inspire_blocks(ldm_blocks)]
    values += [0.0] * (INSPIRE_MIN_VALUES - len(values))
    return ",".join(map(_fmt, values))


@dataclass
class BlockWeights:
    """One way to apply a B-LoRA file in the UIs."""

    name: str
    """``content only``, ``style only``, ``content+style``..."""
    roles: list[str]
    lbw: str
    """A1111/Forge LoRA Block Weight, 12-value SDXL notation: ``<lora:NAME:1:lbw=...>``."""
    inspire: str
    """ComfyUI Inspire Pack ``LoraLoaderBlockWeight`` block_vector, for this file."""


def _combos(roles: list[str]) -> list[list[str]]:
    combos = [[r] for r in roles]
    if "content" in roles and "style" in roles:
        combos.append(["content", "style"])
    if len(roles) == 3:
        combos.append(list(roles))
    return combos


def block_weight_vectors(roles: list[str], ldm_blocks: Iterable[str]) -> list[BlockWeights]:
    """Vectors for each B-LoRA block alone, content+style, and all three, for a file holding
    ``roles`` and layers in ``ldm_blocks`` (every layer's LDM block, text encoders included)."""
    blocks = list(ldm_blocks)
    out = []
    for combo in _combos(roles):
        weights = {lookup_block(r).ldm: 1.0 for r in combo}
        name = combo[0] + " only" if len(combo) == 1 else "+".join(combo)
        out.append(BlockWeights(name=name, roles=combo, lbw=lbw_vector(weights), inspire=inspire_vector(blocks, weights)))
    return out

