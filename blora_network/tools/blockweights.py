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

Baking a vector into a file (``scale --lbw`` / ``--inspire``) gives each layer the weight that
tool gives it (:func:`lbw_layer_weights`, :func:`inspire_layer_weights`); both multiply one
factor (LBW's ``lbw()``: ``up``, ``w1a``, ``w1``) or the patch strength (ComfyUI), so the change
is linear in the weight, which :func:`blora_network.files.algos.scale_tensors` reproduces. Not
comfyUI-Realtime-Lora's way (``lora_analyzer_v2.py``, ``_filter_lora_by_blocks`` at 6449f6d), which
multiplies ``lora_down``, ``lora_up`` and ``alpha`` alike: a strength s becomes s^3.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional

from blora_network.errors import LoraFileError
from blora_network.sdxl.blocks import ATTENTION_BLOCKS, SDXL_BLOCKS, lookup_block, lookup_sdxl_block, sdxl_block_of

__all__ = ["LBW_SDXL_BLOCKS", "LBW_SDXL_FULL", "BlockWeights", "lbw_slot", "lbw_vector", "inspire_blocks",
           "inspire_vector", "block_weight_vectors", "parse_vector", "lbw_layer_weights", "inspire_layer_weights"]

LBW_SDXL_BLOCKS: tuple[str, ...] = ("BASE",) + tuple(b.name for b in ATTENTION_BLOCKS)
"""sd-webui-lora-block-weight's ``BLOCKID12``: its SDXL LoRA notation, in order (BASE and the attention blocks)."""
LBW_SDXL_FULL: tuple[str, ...] = tuple(b.name for b in SDXL_BLOCKS)
"""Its ``BLOCKID20`` ("20(XL full)"): BASE, IN00-IN08, M00, OUT00-OUT08 (our table's order)."""
INSPIRE_MIN_VALUES = 12
"""Inspire Pack's ``validate`` refuses a vector with fewer values."""

_UNET_BLOCK_RE = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)")
_ORDER = ("input_blocks", "middle_block", "output_blocks")


def unet_block(ldm_block: str) -> Optional[tuple[str, int]]:
    """``output_blocks.1.1`` -> ``("output_blocks", 1)``; text encoders, embeddings, ``out`` -> None."""
    m = _UNET_BLOCK_RE.match(ldm_block)
    return (m.group(1), int(m.group(2))) if m else None


def lbw_slot(ldm_block: str) -> str:
    """The LoRA Block Weight name of a layer's block: ``IN08``, ``M00``, ``OUT01``; ``BASE`` outside the UNet blocks."""
    block = sdxl_block_of(ldm_block)  # one slot for the whole middle block (BLOCKS: diffusion_model_middle_block_)
    return block.name if block else "BASE"


def _fmt(w: float) -> str:
    return str(int(w)) if float(w).is_integer() else f"{w:g}"


def lbw_vector(weights: dict[str, float]) -> str:
    """The SDXL vector for LoRA Block Weight; ``weights`` maps LDM blocks to weights, the rest 0: the
    12-value notation when every weighted block has a place in it, else the 20-value one."""
    slots = {lbw_slot(b): w for b, w in weights.items()}
    order = LBW_SDXL_BLOCKS if all(s in LBW_SDXL_BLOCKS for s in slots) else LBW_SDXL_FULL
    return ",".join(_fmt(slots.get(s, 0.0)) for s in order)


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


def block_weight_vectors(roles: list[str], ldm_blocks: Iterable[str], trained: Iterable[str] = ()) -> list[BlockWeights]:
    """Vectors for each B-LoRA block alone, content+style, and all three, for a file holding
    ``roles`` and layers in ``ldm_blocks`` (every layer's LDM block, text encoders included); then,
    when the file holds blocks beyond B-LoRA's, one vector keeping every block it holds (1 each, to
    edit in the UI; ``roles`` of that entry are the LBW names). ``trained``: labels of further blocks
    the file was trained on (``blocks=OUT03``), each of which gets an "only" vector too."""
    blocks = list(ldm_blocks)
    out = []
    for label in trained:
        weights = {lookup_sdxl_block(label).attention: 1.0}
        out.append(BlockWeights(name=f"{label} only", roles=[label], lbw=lbw_vector(weights),
                                inspire=inspire_vector(blocks, weights)))
    for combo in _combos(roles):
        weights = {lookup_block(r).ldm: 1.0 for r in combo}
        name = combo[0] + " only" if len(combo) == 1 else "+".join(combo)
        out.append(BlockWeights(name=name, roles=combo, lbw=lbw_vector(weights), inspire=inspire_vector(blocks, weights)))
    held = {b.name: b for b in filter(None, map(sdxl_block_of, blocks))}
    role_blocks = {lookup_block(r).lbw for r in roles}
    if set(held) - role_blocks - {"BASE"}:
        names = [b.name for b in SDXL_BLOCKS if b.name in held]
        weights = {b.ldm if b.name != "BASE" else "text_encoder": 1.0 for b in held.values()}
        every = {ub: 1.0 for ub in inspire_blocks(blocks)}
        inspire = ",".join(map(_fmt, [1.0 if "BASE" in held else 0.0] + list(every.values())
                               + [0.0] * max(0, INSPIRE_MIN_VALUES - 1 - len(every))))
        out.append(BlockWeights(name="every block held", roles=names, lbw=lbw_vector(weights), inspire=inspire))
    return out


# -- baking a vector: the weight each tool gives each layer ------------------------------------

def parse_vector(text: str, *, option: str) -> list[float]:
    """``"1,0,0.5"`` -> numbers; a value that is not a number is refused (the UIs' R/U/X/A/B draw or
    inherit values at load time, so no file can hold them)."""
    values = []
    for i, item in enumerate(str(text).split(","), 1):
        item = item.strip()
        try:
            v = float(item)
        except ValueError:
            raise LoraFileError(f"{option} value {i} ({item!r}) is not a number; a baked vector holds numbers only") from None
        if not math.isfinite(v):
            raise LoraFileError(f"{option} value {i} ({item!r}) must be a finite number")
        values.append(v)
    return values


def lbw_layer_weights(layers, vector: str) -> dict[str, float]:
    """The weight sd-webui-lora-block-weight gives each layer for an SDXL ``lbw=`` vector.

    ``scripts/lora_block_weight.py`` (b403cb7): a 12- or 20-value vector (``BLOCKID12``/``BLOCKID20``)
    is spread over ``BLOCKID26`` by ``to26``, blocks it leaves out getting 0; ``ratiodealer`` gives a
    layer the slot of the ``BLOCKS`` fragment in its key (``encoder``/``embedders``/``transformer_resblocks``:
    the text encoders, slot BASE; ``diffusion_model_middle_block_``: all of the middle block); a layer
    no fragment names (``time_embed``, ``label_emb``, ``out``) is not picked and keeps ratio 1.
    """
    values = parse_vector(vector, option="--lbw")
    ids = {len(LBW_SDXL_BLOCKS): LBW_SDXL_BLOCKS, len(LBW_SDXL_FULL): LBW_SDXL_FULL}.get(len(values))
    if ids is None:
        raise LoraFileError(f"--lbw has {len(values)} values; an SDXL vector has {len(LBW_SDXL_BLOCKS)} "
                            f"({','.join(LBW_SDXL_BLOCKS)}) or {len(LBW_SDXL_FULL)} ({LBW_SDXL_FULL[0]},"
                            f"{LBW_SDXL_FULL[1]}-{LBW_SDXL_FULL[9]},M00,OUT00-OUT08)")
    slots = dict(zip(ids, values))
    out = {}
    for m in layers:
        block = m.sdxl_block
        out[m.name] = 1.0 if block is None else slots.get(block.name, 0.0)
    return out


def inspire_layer_weights(layers, vector: str) -> dict[str, float]:
    """The weight ComfyUI Inspire Pack's ``LoraLoaderBlockWeight`` gives each layer for ``block_vector``.

    ``inspire/lora_block_weight.py`` (1aef2c5), ``load_lbw``: ``validate`` wants 12 values or more;
    value 0 goes to every key outside ``input_blocks``/``middle_block``/``output_blocks`` (text
    encoders, ``time_embed``, ``label_emb``, ``out``); the UNet keys, sorted input, middle, output by
    block number, take the next value each time the number changes, and once the vector is used up
    the last value goes on ("use last used ratio"). Values past the file's blocks are not used.
    """
    values = parse_vector(vector, option="--inspire")
    if len(values) < INSPIRE_MIN_VALUES:
        raise LoraFileError(f"--inspire has {len(values)} values; Inspire Pack wants at least {INSPIRE_MIN_VALUES} "
                            "(BASE, then one per UNet block the file holds, input to output)")
    per_block: dict[tuple[str, int], float] = {}
    ratio, last, i = 1.0, None, 1
    for kind, n in _inspire_order(m.block for m in layers):
        if n != last and i < len(values):
            ratio, i = values[i], i + 1
        last = n
        per_block[(kind, n)] = ratio
    return {m.name: per_block.get(unet_block(m.block), values[0]) for m in layers}


def _inspire_order(ldm_blocks: Iterable[str]) -> list[tuple[str, int]]:
    return sorted({ub for b in ldm_blocks if (ub := unet_block(b))}, key=lambda x: (_ORDER.index(x[0]), x[1]))

