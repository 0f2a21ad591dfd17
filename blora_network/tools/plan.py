"""Before training: what a preset selects on sd-scripts' full-size SDXL UNet, and what it costs.

The one place that joins presets to the stand-in UNet (:mod:`blora_network.sdxl.unet`, built on
the meta device: names and shapes, no memory): ``presets`` lists the built-ins with their layer
counts, ``plan`` is a dry run of one preset at a rank (layers per block, parameters, file size,
optimizer memory). ``plan`` builds the network the way training does (``network_options`` then
the :class:`~blora_network.network.kohya.BLoRANetwork` constructor, :func:`build_on_sdxl`), so a
preset's ``[blora]`` table (``style_dim = 32``, ``0`` turns a block off) is honoured and a preset
that would train nothing is refused with the network's own message. ``check`` builds it here too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

from blora_network.errors import NetworkArgsError
from blora_network.network.presets import Preset, builtin_names, load_preset
from blora_network.sdxl.blocks import block_at
from blora_network.sdxl.names import block_order, is_attention_layer, kohya_module_name, transformer_block_of

__all__ = ["PresetSummary", "PlanBlock", "Plan", "presets_summary", "plan", "file_bytes", "build_on_sdxl"]


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
    rank: int = 0
    """The rank the network gives this block's layers (a preset's ``[blora]`` dims, else ``dim``)."""


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


def file_bytes(layers, dim, dtype: str) -> int:
    """The exact size safetensors would write for these LoRA layers (no metadata): at rank ``dim``,
    or ``dim`` a list of one rank per layer."""
    size, code = _DTYPE_SIZES[dtype]
    ranks = dim if isinstance(dim, (list, tuple)) else [dim] * len(layers)
    entries = []
    for layer, rank in zip(layers, ranks):
        name = kohya_module_name(layer.name)
        entries += [(f"{name}.alpha", []), (f"{name}.lora_down.weight", [rank, layer.in_features]),
                    (f"{name}.lora_up.weight", [layer.out_features, rank])]
    entries.sort()
    header, offset = {}, 0
    for key, shape in entries:
        n = size * (math.prod(shape) if shape else 1)
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    h = len(json.dumps(header, separators=(",", ":")))
    return 8 + h + (8 - h % 8) % 8 + offset


def build_on_sdxl(preset, options):
    """The network's constructor on sd-scripts' full-size SDXL UNet, on the meta device (no memory):
    every check ``create_network`` makes on the model, and the modules it would train."""
    import logging

    import torch

    from blora_network.network.kohya import BLoRANetwork

    loggers = [logging.getLogger(name) for name in ("LyCORIS", "blora_network")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:  # LyCORIS logs its module table to stdout: not part of a report
            lg.setLevel(logging.WARNING)
        with torch.device("meta"):
            return BLoRANetwork(None, _full_unet(), preset=preset, options=options)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _trained_layers(network) -> list[tuple]:
    """``(layer, rank, parameters)`` for each Linear layer the network adapts, in model order."""
    from blora_network.sdxl.unet import FULL, linear_layers

    modules = {m.lora_name: m for m in network.unet_loras}
    out = []
    for layer in linear_layers(FULL):
        module = modules.get(kohya_module_name(layer.name))
        if module is not None:
            out.append((layer, int(module.lora_dim), sum(p.numel() for p in module.parameters())))
    return out


def plan(preset_spec: str, dim: int) -> Plan:
    """A dry run: what training builds for a preset on full-size SDXL at rank ``dim``, and what it costs.

    Raises the network's own error (:class:`~blora_network.errors.PresetError`...) for a preset
    that cannot be loaded, that has no UNet targets, or whose layers all end up off, as
    ``create_network`` would.
    """
    from blora_network.network.kohya import network_options

    if dim < 1:
        raise NetworkArgsError(f"dim must be a positive rank, not {dim}")
    preset, options = network_options(dim, float(dim), None, preset=preset_spec)
    trained = _trained_layers(build_on_sdxl(preset, options))
    by_block: dict[str, list] = {}
    for item in trained:
        by_block.setdefault(transformer_block_of(item[0].name), []).append(item)
    blocks = [
        PlanBlock(block=b, role=getattr(block_at(b), "role", None), modules=len(items),
                  params=sum(n for _, _, n in items), layers=[x.name for x, _, _ in items], rank=items[0][1])
        for b, items in sorted(by_block.items(), key=lambda kv: block_order(kv[0]))
    ]
    params = sum(b.params for b in blocks)
    layers, ranks = [x for x, _, _ in trained], [r for _, r, _ in trained]
    return Plan(
        preset=preset.name, source=preset.source, dim=dim, blocks=blocks, modules=len(trained), params=params,
        file_bytes={d: file_bytes(layers, ranks, d) for d in _DTYPE_SIZES},
        optimizer_bytes={
            "weights_fp32": 4 * params,
            "grads_fp32": 4 * params,
            "adamw_states": 8 * params,
            "adamw8bit_states": 2 * params,
            "total_adamw": 16 * params,
        },
        notes=_notes(preset, blocks) + [f"{role}: off ({key} = 0 in the preset), not trained"
                                        for key, role in _off(options)],
    )


def _off(options) -> list[tuple[str, str]]:
    """``(setting, role)`` for each block a ``0`` dim or learning rate turns off."""
    return [(f"{role}_dim", role) for role, d in options.block_dims.items() if d == 0] + [
        (f"{role}_lr", role) for role, lr in options.block_lrs.items() if lr == 0 and options.block_dims.get(role) != 0]


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
