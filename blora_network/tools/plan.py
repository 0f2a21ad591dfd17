"""Before training: what a preset selects on sd-scripts' full-size SDXL UNet, and what it costs.

The one place that joins presets to the stand-in UNet (:mod:`blora_network.sdxl.unet`, built on
the meta device: names and shapes, no memory): ``presets`` lists the built-ins with their layer
counts, ``plan`` is a dry run of one preset at a rank (layers per block, parameters, file size,
optimizer memory). A preset that would train nothing is refused with the same message the
network gives at ``create_network``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

from blora_network.errors import NetworkArgsError
from blora_network.network.modelcheck import check_preset_matches
from blora_network.network.presets import Preset, builtin_names, load_preset
from blora_network.sdxl.blocks import block_at
from blora_network.sdxl.names import block_order, is_attention_layer, kohya_module_name, transformer_block_of

__all__ = ["PresetSummary", "PlanBlock", "Plan", "presets_summary", "plan", "file_bytes"]


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


def _full_unet():
    from blora_network.sdxl.unet import FULL, meta_unet

    return meta_unet(FULL)


def _selected_layers(preset: Preset) -> list:
    """The Linear layers of full-size SDXL the preset selects (class targets included), in model order."""
    from blora_network.sdxl.unet import FULL, linear_layers, module_names

    chosen = set(preset.select(module_names(FULL)))
    return [layer for layer in linear_layers(FULL) if layer.name in chosen]


def _by_block(layers) -> dict[str, list]:
    out: dict[str, list] = {}
    for layer in layers:
        out.setdefault(transformer_block_of(layer.name), []).append(layer)
    return dict(sorted(out.items(), key=lambda kv: block_order(kv[0])))


def presets_summary() -> list[PresetSummary]:
    """The built-in presets and what each selects on sd-scripts' full-size SDXL UNet."""
    out = []
    for name in builtin_names():
        preset = load_preset(name)
        layers = _selected_layers(preset)
        out.append(PresetSummary(
            name=preset.name, source=preset.source, description=preset.description, roles=list(preset.roles),
            blocks={b: len(ls) for b, ls in _by_block(layers).items()}, modules=len(layers),
            trains_text_encoder=preset.trains_text_encoder,
        ))
    return out


def file_bytes(layers, dim: int, dtype: str) -> int:
    """The exact size safetensors would write for these LoRA layers at rank ``dim`` (no metadata)."""
    size, code = _DTYPE_SIZES[dtype]
    entries = []
    for layer in layers:
        name = kohya_module_name(layer.name)
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
    """A dry run: what a preset trains on full-size SDXL at rank ``dim``, and what it costs.

    Raises :class:`~blora_network.errors.PresetError` for a preset that cannot be loaded or whose
    UNet patterns select nothing on SDXL, as ``create_network`` would.
    """
    if dim < 1:
        raise NetworkArgsError(f"dim must be a positive rank, not {dim}")
    preset = load_preset(preset_spec)
    if preset.trains_unet:
        check_preset_matches(preset, _full_unet())
    layers = _selected_layers(preset)
    blocks = [
        PlanBlock(block=b, role=getattr(block_at(b), "role", None), modules=len(ls),
                  params=sum(dim * (x.in_features + x.out_features) for x in ls), layers=[x.name for x in ls])
        for b, ls in _by_block(layers).items()
    ]
    params = sum(b.params for b in blocks)
    return Plan(
        preset=preset.name, source=preset.source, dim=dim, blocks=blocks, modules=len(layers), params=params,
        file_bytes={d: file_bytes(layers, dim, d) for d in _DTYPE_SIZES},
        optimizer_bytes={
            "weights_fp32": 4 * params,
            "grads_fp32": 4 * params,
            "adamw_states": 8 * params,
            "adamw8bit_states": 2 * params,
            "total_adamw": 16 * params,
        },
        notes=_notes(preset, blocks),
    )


def _notes(preset: Preset, blocks: list[PlanBlock]) -> list[str]:
    notes = []
    if not blocks:
        notes.append("this preset selects no Linear layer of sd-scripts' SDXL UNet: training would do nothing")
    if preset.trains_text_encoder:
        notes.append("the preset also trains text-encoder layers, which are not counted here")
    if preset.enable_conv:
        notes.append("enable_conv is on: convolution layers it may select are not counted here")
    off = [b.block for b in blocks if b.role is None]
    if off:
        notes.append(f"layers outside the B-LoRA blocks are trained: {', '.join(off)}")
    for b in blocks:
        extra = [x for x in b.layers if not is_attention_layer(x)]
        if b.role and extra:
            notes.append(f"{b.role}: {len(extra)} layers beyond the attention projections (e.g. {extra[0]})")
    return notes
