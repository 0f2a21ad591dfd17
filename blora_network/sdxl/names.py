"""Every name of SDXL's UNet and text encoders, in every spelling users bring, and the maps between them.

A layer has up to five spellings: sd-scripts' LDM module path (``output_blocks.0.1.transformer_blocks.0.attn1.to_q``),
its kohya key (``lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q``), the same key with diffusers
block names (``lora_unet_up_blocks_0_attentions_0_...``), and the diffusers / PEFT paths
(``unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``, with ``lora.down``/``lora.up`` or
``lora_A``/``lora_B`` factors). The rest of the package asks this module, and only this module, how one
spelling maps to another, which block a layer is in and what kind of layer it is. No torch here: the CLI
uses it for ``--help`` and argument checks.

The block rule (sd-scripts' ``library/sdxl_original_unet.py`` beside diffusers' ``UNet2DConditionModel``): ``input_blocks.{3l+k+1}.1`` = ``down_blocks.{l}.attentions.{k}``,
``output_blocks.{3l+k}.1`` = ``up_blocks.{l}.attentions.{k}``, ``middle_block.1`` = ``mid_block.attentions.0``.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

__all__ = [
    "UNET_PREFIX",
    "TEXT_ENCODER_PREFIXES",
    "ATTENTION_PROJECTIONS",
    "ATTENTION_LAYER_RE",
    "SDXL_TRANSFORMER_BLOCKS",
    "SDXL_BLOCK_WIDTHS",
    "SD_BLOCK_WIDTHS",
    "CONTEXT_WIDTH_MODEL",
    "sdxl_linear_shape",
    "other_architecture",
    "LAYER_KINDS",
    "ATTENTION_KINDS",
    "SPELLINGS",
    "WRITE_SPELLINGS",
    "DIFFUSERS_FACTOR_NAMES",
    "ParsedKey",
    "is_attention_layer",
    "kohya_module_name",
    "kohya_prefix",
    "ldm_block_of_diffusers_block",
    "diffusers_block_of_ldm_block",
    "canonical_kohya_name",
    "ldm_path_of_kohya_name",
    "kohya_name_of_diffusers_path",
    "diffusers_path_of_kohya_name",
    "parse_lora_key",
    "block_of_kohya_name",
    "transformer_block_of",
    "layer_kind",
    "layer_kind_detail",
    "text_encoder_index",
    "block_order",
]

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te_")
"""SDXL's two encoders (``te1`` CLIP-L, ``te2`` OpenCLIP-G), and SD1.x's single ``lora_te_``."""
_KOHYA_PREFIXES = (UNET_PREFIX + "_",) + TEXT_ENCODER_PREFIXES

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ATTENTION_LAYER_RE = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
"""The layer rule B-LoRA trains: attention projections, never ``ff.net``, ``proj_in``/``proj_out`` or norms."""

SDXL_TRANSFORMER_BLOCKS = (
    "input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1", "middle_block.1",
    "output_blocks.0.1", "output_blocks.1.1", "output_blocks.2.1", "output_blocks.3.1", "output_blocks.4.1",
    "output_blocks.5.1",
)
"""The eleven Transformer2DModel blocks of SDXL's UNet, in order (LDM names)."""

SDXL_BLOCK_WIDTHS = {
    "input_blocks.4.1": 640, "input_blocks.5.1": 640, "input_blocks.7.1": 1280, "input_blocks.8.1": 1280,
    "middle_block.1": 1280, "output_blocks.0.1": 1280, "output_blocks.1.1": 1280, "output_blocks.2.1": 1280,
    "output_blocks.3.1": 640, "output_blocks.4.1": 640, "output_blocks.5.1": 640,
}
"""Channels of each SDXL transformer block (its attention layers' ``to_q`` width)."""

SD_BLOCK_WIDTHS = {
    "input_blocks.1.1": 320, "input_blocks.2.1": 320, "input_blocks.4.1": 640, "input_blocks.5.1": 640,
    "input_blocks.7.1": 1280, "input_blocks.8.1": 1280, "middle_block.1": 1280,
    **{f"output_blocks.{i}.1": w for i, w in ((3, 1280), (4, 1280), (5, 1280), (6, 640), (7, 640), (8, 640),
                                              (9, 320), (10, 320), (11, 320))},
}
"""The same for SD1.x and SD2.x (they share the layout; the text width tells them apart)."""

CONTEXT_WIDTH_MODEL = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
"""Cross-attention context width (``attn2.to_k`` input) -> model: the text embedding each one reads."""

_TRANSFORMER_LAYER_SHAPES = (  # (suffix, out, in) as multiples of the block width w; 0 = the text width
    (re.compile(r"\.attn1\.(to_q|to_k|to_v|to_out\.0)$"), 1, 1),
    (re.compile(r"\.attn2\.(to_q|to_out\.0)$"), 1, 1),
    (re.compile(r"\.attn2\.(to_k|to_v)$"), 1, 0),
    (re.compile(r"\.ff\.net\.0\.proj$"), 8, 1),  # GEGLU: two 4w halves
    (re.compile(r"\.ff\.net\.2$"), 1, 4),
    (re.compile(r"\.(proj_in|proj_out)$"), 1, 1),
)


def sdxl_linear_shape(ldm_path: str) -> Optional[tuple[int, int]]:
    """``(out_features, in_features)`` of a Linear layer inside one of SDXL's transformer blocks, from its
    block's width (:data:`SDXL_BLOCK_WIDTHS`) and the text width 2048; None for any other layer.

    Header-only checks use it: a factor whose width does not fit its layer would fail only at load time
    in sd-scripts or a UI, far from the file that caused it.
    """
    width = SDXL_BLOCK_WIDTHS.get(transformer_block_of(ldm_path))
    if width is None:
        return None
    for pattern, out_mult, in_mult in _TRANSFORMER_LAYER_SHAPES:
        if pattern.search(ldm_path):
            return width * out_mult, (width * in_mult if in_mult else 2048)
    return None


_OTHER_ARCHITECTURES = (
    ("Flux", re.compile(r"(^|[._])(double_blocks|single_blocks)[._]\d|(^|\.)single_transformer_blocks\.\d")),
    ("SD3", re.compile(r"(^|[._])joint_blocks[._]\d")),
    ("Flux or SD3", re.compile(r"^(transformer|diffusion_model)\.transformer_blocks\.\d")),
)
"""Diffusion transformers whose LoRA keys kohya's and diffusers' trainers write (sd-scripts'
``networks/lora_flux.py`` names ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_*``;
``lora_sd3.py`` ``lora_unet_joint_blocks_*``; diffusers ``transformer.single_transformer_blocks.*``)."""


def other_architecture(key: str) -> Optional[str]:
    """``Flux``/``SD3`` when a tensor name belongs to one of those models (no SDXL layer is named so)."""
    return next((name for name, pattern in _OTHER_ARCHITECTURES if pattern.search(key)), None)


LAYER_KINDS = ("self_attn", "cross_attn", "ff", "proj", "other")
ATTENTION_KINDS = ("self_attn", "cross_attn")

SPELLINGS = ("kohya", "kohya-diffusers", "diffusers", "peft")
"""How a file names its layers: sd-scripts' keys, sd-scripts' keys with diffusers block names,
diffusers' ``lora.down``/``lora.up`` paths, PEFT's ``lora_A``/``lora_B`` paths."""
WRITE_SPELLINGS = ("kohya", "diffusers", "peft")
"""The spellings ``convert`` writes."""
DIFFUSERS_FACTOR_NAMES = {
    "diffusers": ("lora.down.weight", "lora.up.weight"),
    "peft": ("lora_A.weight", "lora_B.weight"),
}
"""(down, up) factor suffixes of the two path spellings; neither has an alpha (alpha = rank)."""

# diffusers / PEFT factor spellings -> (kohya suffix, spelling)
_PATH_SUFFIXES = {
    "lora.down.weight": ("lora_down.weight", "diffusers"),
    "lora.up.weight": ("lora_up.weight", "diffusers"),
    "lora_A.weight": ("lora_down.weight", "peft"),
    "lora_B.weight": ("lora_up.weight", "peft"),
    "alpha": ("alpha", "diffusers"),
}
_DIFFUSERS_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "conv_out.", "time_embedding.",
                         "add_embedding.", "conv_norm_out.")

_DIFF_ATTN_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)$")
_LDM_ATTN_RE = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1$")
_DIFF_ATTN_KOHYA_RE = re.compile(r"^lora_unet_(down_blocks|up_blocks)_(\d+)_attentions_(\d+)_(.+)$")
_MID_ATTN_KOHYA_RE = re.compile(r"^lora_unet_mid_block_attentions_0_(.+)$")


def is_attention_layer(module_path: str) -> bool:
    """True for ``...attn1.to_q`` and friends, False for ``ff.net.*``, ``proj_in``, norms."""
    return ATTENTION_LAYER_RE.search(module_path) is not None


def kohya_module_name(module_path: str, prefix: str = UNET_PREFIX) -> str:
    """``output_blocks.0.1.transformer_blocks.0.attn1.to_q`` -> ``lora_unet_output_blocks_0_1_..._attn1_to_q``."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def kohya_prefix(module_path: str, prefix: str = UNET_PREFIX) -> str:
    """``output_blocks.0.1`` -> ``lora_unet_output_blocks_0_1_``: what every layer key of that block starts with."""
    return kohya_module_name(module_path, prefix) + "_"


# -- blocks: LDM <-> diffusers ----------------------------------------------------------------

def ldm_block_of_diffusers_block(path: str) -> Optional[str]:
    """``up_blocks.0.attentions.1`` -> ``output_blocks.1.1``; None for non-attention blocks."""
    if path == "mid_block.attentions.0":
        return "middle_block.1"
    m = _DIFF_ATTN_RE.match(path)
    if m is None:
        return None
    level, k = int(m.group(2)), int(m.group(3))
    if m.group(1) == "down_blocks":
        return f"input_blocks.{3 * level + k + 1}.1"
    return f"output_blocks.{3 * level + k}.1"


def diffusers_block_of_ldm_block(path: str) -> Optional[str]:
    """``input_blocks.8.1`` -> ``down_blocks.2.attentions.1``; None for non-attention blocks."""
    if path == "middle_block.1":
        return "mid_block.attentions.0"
    m = _LDM_ATTN_RE.match(path)
    if m is None:
        return None
    n = int(m.group(2))
    if m.group(1) == "input_blocks":
        if n == 0:
            return None
        return f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}"
    return f"up_blocks.{n // 3}.attentions.{n % 3}"


# -- layers: kohya <-> LDM <-> diffusers ------------------------------------------------------

def canonical_kohya_name(module: str) -> str:
    """Rename diffusers-named kohya modules inside attention blocks to LDM names (as sd-scripts does on load)."""
    m = _DIFF_ATTN_KOHYA_RE.match(module)
    if m:
        ldm = ldm_block_of_diffusers_block(f"{m.group(1)}.{m.group(2)}.attentions.{m.group(3)}")
        return f"{kohya_prefix(ldm)}{m.group(4)}"
    m = _MID_ATTN_KOHYA_RE.match(module)
    if m:
        return f"{kohya_prefix('middle_block.1')}{m.group(1)}"
    return module


# kohya keys spell dots as underscores, which is ambiguous ("to_out_0"), so the parts inside a
# transformer block are mapped back by pattern rather than by replacing every underscore.
_KOHYA_LAYER_RE = re.compile(r"^(?P<block>(?:input_blocks|output_blocks)_\d+_\d+|middle_block_\d+)_(?P<rest>.+)$")
_KOHYA_REST_RULES = (
    (re.compile(r"^transformer_blocks_(\d+)_(attn[12])_(to_q|to_k|to_v)$"), r"transformer_blocks.\1.\2.\3"),
    (re.compile(r"^transformer_blocks_(\d+)_(attn[12])_to_out_0$"), r"transformer_blocks.\1.\2.to_out.0"),
    (re.compile(r"^transformer_blocks_(\d+)_ff_net_0_proj$"), r"transformer_blocks.\1.ff.net.0.proj"),
    (re.compile(r"^transformer_blocks_(\d+)_ff_net_2$"), r"transformer_blocks.\1.ff.net.2"),
    (re.compile(r"^(proj_in|proj_out|norm)$"), r"\1"),
)
_TE_REST_RULES = (
    (re.compile(r"^text_model_encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj$"), r"text_model.encoder.layers.\1.self_attn.\2_proj"),
    (re.compile(r"^text_model_encoder_layers_(\d+)_mlp_(fc1|fc2)$"), r"text_model.encoder.layers.\1.mlp.\2"),
)


def ldm_path_of_kohya_name(key: str) -> Optional[str]:
    """``lora_unet_output_blocks_0_1_transformer_blocks_3_attn2_to_out_0[.lora_up.weight]``
    -> ``output_blocks.0.1.transformer_blocks.3.attn2.to_out.0``.

    Only names inside a transformer block are mapped (that is all B-LoRA needs); anything
    else returns None.
    """
    module = key.split(".", 1)[0]
    head = UNET_PREFIX + "_"
    if not module.startswith(head):
        return None
    m = _KOHYA_LAYER_RE.match(module[len(head):])
    if m is None:
        return None
    parts = m.group("block").split("_")
    block = f"middle_block.{parts[2]}" if parts[0] == "middle" else f"{parts[0]}_{parts[1]}.{parts[2]}.{parts[3]}"
    for rule, repl in _KOHYA_REST_RULES:
        if rule.match(m.group("rest")):
            return block + "." + rule.sub(repl, m.group("rest"))
    return None


def _strip_unet_prefix(path: str) -> str:
    """``unet.``, the doubled ``unet.unet.`` of some uploads, PEFT's ``base_model.model.``."""
    while True:
        for prefix in ("unet.", "base_model.model."):
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
        else:
            return path


def kohya_name_of_diffusers_path(path: str) -> str:
    """``unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` -> the kohya module name.

    Layers inside attention blocks get sd-scripts' LDM names; other UNet layers keep their
    diffusers names in kohya spelling (sd-scripts and A1111 rename those on load).
    """
    p = _strip_unet_prefix(path)
    for prefix, kohya in (("text_encoder_2.", "lora_te2"), ("text_encoder.", "lora_te1")):
        if p.startswith(prefix):
            return kohya_module_name(p[len(prefix):], kohya)
    parts = p.split(".")
    for n in (4, 3):  # down_blocks.2.attentions.1 / mid_block.attentions.0
        ldm = ldm_block_of_diffusers_block(".".join(parts[:n]))
        if ldm is not None and len(parts) > n:
            return kohya_module_name(".".join([ldm, *parts[n:]]))
    return kohya_module_name(p)


def diffusers_path_of_kohya_name(module: str) -> Optional[str]:
    """The diffusers module path (``unet.up_blocks.0.attentions.0...``) of a kohya module name.

    None when the layer has no unambiguous diffusers name we know (convolutions and other
    layers outside the transformer blocks).
    """
    for prefix, root in (("lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2."), ("lora_te_", "text_encoder.")):
        if module.startswith(prefix):
            rest = module[len(prefix):]
            for rule, repl in _TE_REST_RULES:
                if rule.match(rest):
                    return root + rule.sub(repl, rest)
            return None
    ldm = ldm_path_of_kohya_name(canonical_kohya_name(module))
    if ldm is None:
        return None
    for n in (3, 2):  # output_blocks.0.1 / middle_block.1
        head = ".".join(ldm.split(".")[:n])
        diff = diffusers_block_of_ldm_block(head)
        if diff is not None:
            return "unet." + diff + ldm[len(head):]
    return None


class ParsedKey(NamedTuple):
    """One tensor name, understood."""

    module: str
    """The canonical kohya module name (LDM block names inside attention blocks)."""
    suffix: str
    """The kohya factor suffix: ``lora_up.weight``, ``hada_w1_a``, ``alpha``..."""
    spelling: str
    """One of :data:`SPELLINGS`."""
    spelled: str
    """The module name as the file spells it."""


def parse_lora_key(key: str) -> Optional[ParsedKey]:
    """A tensor name in any spelling -> :class:`ParsedKey`, or None when it is not a LoRA layer's tensor."""
    if key.startswith(_KOHYA_PREFIXES):
        module, _, suffix = key.partition(".")
        canonical = canonical_kohya_name(module)
        return ParsedKey(canonical, suffix, "kohya" if canonical == module else "kohya-diffusers", module)
    for spelled, (suffix, spelling) in _PATH_SUFFIXES.items():
        if key.endswith("." + spelled):
            path = key[: -len(spelled) - 1]
            bare = _strip_unet_prefix(path)
            if not (path != bare or bare.startswith(("text_encoder.", "text_encoder_2.")) or bare.startswith(_DIFFUSERS_UNET_ROOTS)):
                return None
            return ParsedKey(kohya_name_of_diffusers_path(path), suffix, spelling, path)
    return None


# -- which block, which kind ------------------------------------------------------------------

_BLOCK_RE = re.compile(
    r"^lora_unet_(?:(input_blocks|output_blocks)_(\d+)_(\d+)|(middle_block)_(\d+)"
    r"|(down_blocks|up_blocks)_(\d+)_(resnets|downsamplers|upsamplers)_(\d+)"
    r"|(mid_block)_resnets_(\d+))(?:_|$)"
)
_TOP_LEVEL = (
    ("time_embed", ("time_embed", "time_embedding")),
    ("label_emb", ("label_emb", "add_embedding")),
    ("input_blocks.0.0", ("conv_in",)),
    ("out", ("out", "conv_out", "conv_norm_out")),
)


def block_of_kohya_name(module: str) -> str:
    """The UNet block (sd-scripts' LDM path) or text encoder of a canonical kohya module name.

    ``input_blocks.4.1`` (transformer), ``input_blocks.4.0`` (resnet), ``middle_block.1``,
    ``time_embed``, ``label_emb``, ``out``, ``text_encoder_1``; diffusers-named resnets and
    samplers (``down_blocks.1.resnets.0``, ``up_blocks.0.upsamplers.0``, ``conv_in``...) are
    mapped to their LDM blocks. An unknown name gives ``unet.<first two parts>``.
    """
    for prefix, name in (("lora_te1_", "text_encoder_1"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder")):
        if module.startswith(prefix):
            return name
    m = _BLOCK_RE.match(module)
    if m is not None:
        g = m.groups()
        if g[0]:
            return f"{g[0]}.{g[1]}.{g[2]}"
        if g[3]:
            return f"{g[3]}.{g[4]}"
        if g[5]:
            level, part, k = int(g[6]), g[7], int(g[8])
            if part == "resnets":
                return f"input_blocks.{3 * level + k + 1}.0" if g[5] == "down_blocks" else f"output_blocks.{3 * level + k}.0"
            if part == "downsamplers":
                return f"input_blocks.{3 * level + 3}.0"
            return f"output_blocks.{3 * level + 2}.2"  # SDXL's upsampling levels (0, 1) have attention
        return "middle_block.0" if g[10] == "0" else "middle_block.2"
    rest = module[len(UNET_PREFIX) + 1:] if module.startswith(UNET_PREFIX + "_") else module
    for target, heads in _TOP_LEVEL:
        if any(rest == h or rest.startswith(h + "_") for h in heads):
            return target
    return "unet." + "_".join(rest.split("_")[:2])


def transformer_block_of(ldm_path: str) -> str:
    """``output_blocks.0.1.transformer_blocks.3.attn1.to_q`` -> ``output_blocks.0.1``; other paths: their top module."""
    parts = ldm_path.split(".")
    if parts[0] in ("input_blocks", "output_blocks") and len(parts) >= 3:
        return ".".join(parts[:3])
    if parts[0] == "middle_block" and len(parts) >= 2:
        return ".".join(parts[:2])
    return parts[0]


_KIND_RES = (
    ("self_attn", re.compile(r"(_|\.)attn1(_|\.)")),
    ("cross_attn", re.compile(r"(_|\.)attn2(_|\.)")),
    ("ff", re.compile(r"(_|\.)ff(_|\.)net(_|\.)")),
    ("proj", re.compile(r"(_|\.)proj_(in|out)$")),
)


def layer_kind(name: str) -> str:
    """``self_attn``, ``cross_attn``, ``ff``, ``proj`` or ``other``, from a kohya name or an LDM path."""
    for kind, rx in _KIND_RES:
        if rx.search(name):
            return kind
    return "other"


def layer_kind_detail(ldm_path: str) -> str:
    """The part of a path that says what the layer is: ``attn1.to_q``, ``ff.net.2``, ``proj_in``."""
    parts = ldm_path.split(".")
    if "transformer_blocks" in parts:
        return ".".join(parts[parts.index("transformer_blocks") + 2:])
    return parts[-1]


def text_encoder_index(lora_name: str) -> int:
    """``lora_te2_...`` -> 2; ``lora_te1_...`` and SD1's ``lora_te_...`` -> 1."""
    m = re.match(r"lora_te(\d*)_", lora_name)
    return int(m.group(1) or 1) if m else 1


_HEAD_ORDER = {"text_encoder": 0, "text_encoder_1": 0, "text_encoder_2": 0, "time_embed": 1, "label_emb": 2,
               "input_blocks": 3, "down_blocks": 3, "middle_block": 4, "mid_block": 4, "output_blocks": 5,
               "up_blocks": 5, "out": 6}


def block_order(block: str):
    """Sort key for block paths in model order: text encoders, time and label embeddings, input
    (down) blocks, middle, output (up) blocks, ``out``, then anything else; LDM or diffusers names."""
    head = block.split(".")[0]
    return (_HEAD_ORDER.get(head, 7), head, tuple(int(x) for x in re.findall(r"\d+", block)), block)
