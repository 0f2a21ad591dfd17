"""What kind of UNet were we given? Used to turn "the preset matched nothing" into advice.

LyCORIS matches names silently: a B-LoRA preset run against a diffusers-named or an SD1.x
UNet creates no module and trains nothing for hours. We check every pattern up front and,
when one matches nothing, say what the model looks like instead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

import torch

from blora_network.errors import ModelMismatchError, PresetError

from .presets import Preset

__all__ = ["unwrap_unet", "describe_unet", "check_preset_matches"]


def unwrap_unet(unet):
    """sd-scripts' ``InferSdxlUNet2DConditionModel`` is a plain wrapper around ``.delegate``."""
    seen = 0
    while not isinstance(unet, torch.nn.Module) and hasattr(unet, "delegate") and seen < 4:
        unet = unet.delegate
        seen += 1
    if not isinstance(unet, torch.nn.Module):
        raise ModelMismatchError(
            f"expected the SDXL UNet (a torch.nn.Module), got {type(unet).__name__}; pass sd-scripts' "
            "SdxlUNet2DConditionModel"
        )
    return unet


def _context_dims(unet: torch.nn.Module) -> set[int]:
    dims = set()
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k") and isinstance(module, torch.nn.Linear):
            dims.add(module.in_features)
    return dims


def describe_unet(unet: torch.nn.Module) -> str:
    """One sentence on what this UNet is, from its module names."""
    names = [n for n, _ in unet.named_modules()]
    top = sorted({n.split(".")[0] for n in names if n})
    ctx = _context_dims(unet)
    ctx_text = f" (cross-attention context {', '.join(map(str, sorted(ctx)))})" if ctx else ""
    if any(n.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for n in names):
        if ctx and max(ctx) in (768, 1024):  # sd-scripts' own SD1.x/SD2 UNet has diffusers names
            return (
                "the model looks like an SD1.x/SD2 UNet" + ctx_text + " (diffusers names, as sd-scripts' "
                "train_network.py loads SD1.x/SD2); B-LoRA's blocks exist only in SDXL: train with "
                "sdxl_train_network.py and an SDXL checkpoint"
            )
        return (
            "the model has diffusers names (down_blocks / mid_block / up_blocks)" + ctx_text + ", but sd-scripts' "
            "SDXL UNet uses LDM names (input_blocks / middle_block / output_blocks): B-LoRA's content block is "
            "output_blocks.0.1 there (diffusers up_blocks.0.attentions.0). Train with sd-scripts' "
            "sdxl_train_network.py, which loads the UNet with LDM names"
        )
    if "output_blocks" in top:
        has_content = any(n.startswith("output_blocks.0.1.") for n in names)
        if not has_content or (ctx and max(ctx) in (768, 1024)):
            return (
                "the model looks like an SD1.x/SD2 UNet" + ctx_text + ": it has no transformer in output_blocks.0 / "
                "output_blocks.1 like SDXL; B-LoRA needs SDXL (use sdxl_train_network.py with an SDXL checkpoint)"
            )
        blocks = sorted({n.split(".transformer_blocks.")[0] for n in names if ".transformer_blocks." in n})
        return f"the model has sd-scripts' LDM names{ctx_text}; its transformer blocks are {', '.join(blocks)}"
    return f"the model's top-level modules are {', '.join(top[:12]) or '(none)'}{ctx_text}; it is not sd-scripts' SDXL UNet"


def _named_classes(unet: torch.nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in unet.named_modules() if n]


def check_preset_matches(preset: Preset, unet: torch.nn.Module) -> None:
    """Every UNet pattern and class of ``preset`` must select at least one layer of ``unet``.

    Raises :class:`PresetError` naming the first pattern that matches nothing, with
    :func:`describe_unet`'s sentence. (LyCORIS does the selection itself afterwards.)
    """
    modules = _named_classes(unet)
    checks = [(f"UNet pattern '{p}' matches no Linear layer", _only(preset, names=(p,))) for p in preset.unet_target_name]
    checks += [(f"no {c!r} module with Linear layers", _only(preset, classes=(c,))) for c in preset.unet_target_module]
    for problem, single in checks:
        if not single.select(modules):
            raise PresetError(f"preset {preset.name!r} ({preset.source}): {problem} in this model; {describe_unet(unet)}")


def _only(preset: Preset, names: Iterable[str] = (), classes: Iterable[str] = ()) -> Preset:
    return replace(preset, unet_target_name=tuple(names), unet_target_module=tuple(classes))
