"""Real safetensors LoRA files for the tool tests, in every spelling users bring.

Import explicitly (``from lora_factories import ...``); conftest.py is not ours. Every
factory writes a file and returns its path; tensors are random (seeded) so that a tool
mixing up two layers or two factors shows up in the numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from safetensors.torch import save_file

from blora_network.sdxl.blocks import BLOCKS, attention_layer_names


@dataclass(frozen=True)
class Layer:
    """A Linear layer by sd-scripts module path (LDM names)."""

    name: str
    in_features: int
    out_features: int


def full_attention_layers(roles: Iterable[str]) -> list[Layer]:
    """The 80 attention layers per full-size B-LoRA block (attn2 to_k/to_v read 2048-wide text)."""
    out = []
    for b in BLOCKS:
        if b.role in roles:
            for name in attention_layer_names(b):
                wide = name.endswith(("attn2.to_k", "attn2.to_v"))
                out.append(Layer(name, 2048 if wide else 1280, 1280))
    return out


def layers_of(size, *, roles: Optional[Iterable[str]] = None, attention_only: bool = False) -> list[Layer]:
    """Linear layers of sd-scripts' SDXL UNet at ``size`` (from blora_network.sdxl.unet)."""
    from blora_network.sdxl.names import is_attention_layer
    from blora_network.sdxl.unet import linear_layers

    chosen = []
    ldms = [b.ldm for b in BLOCKS if roles is None or b.role in roles]
    for layer in linear_layers(size):
        if roles is not None and not any(layer.name.startswith(ldm + ".") for ldm in ldms):
            continue
        if attention_only and not is_attention_layer(layer.name):
            continue
        chosen.append(Layer(layer.name, layer.in_features, layer.out_features))
    return chosen


def kohya_name(path: str, prefix: str = "lora_unet") -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def to_diffusers_path(ldm_path: str) -> str:
    """``output_blocks.0.1.x`` -> ``up_blocks.0.attentions.0.x`` (the test's own copy of the rule)."""
    parts = ldm_path.split(".")
    n = int(parts[1]) if parts[0] != "middle_block" else None
    if parts[0] == "output_blocks":
        head = f"up_blocks.{n // 3}.attentions.{n % 3}"
        rest = parts[3:]
    elif parts[0] == "input_blocks":
        head = f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}"
        rest = parts[3:]
    else:
        head = "mid_block.attentions.0"
        rest = parts[2:]
    return ".".join([head, *rest])


def lora_tensors(layers: Sequence[Layer], rank: int, *, seed: int = 0, dtype=torch.float32,
                 alpha: Optional[float] = None, ranks: Optional[dict[str, int]] = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"down", "up", "alpha"?}}``: random factors (up not zero, so dW is not)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        r = (ranks or {}).get(layer.name, rank)
        item = {
            "down": (torch.randn(r, layer.in_features, generator=g) * 0.1).to(dtype),
            "up": (torch.randn(layer.out_features, r, generator=g) * 0.1).to(dtype),
        }
        if alpha is not None:
            item["alpha"] = torch.tensor(float(alpha), dtype=dtype)
        out[layer.name] = item
    return out


def write_kohya(path, layers: Sequence[Layer], rank: int = 4, *, alpha: Optional[float] = None, seed: int = 0,
                dtype=torch.float32, metadata: Optional[dict] = None, diffusers_blocks: bool = False,
                extra: Optional[dict[str, torch.Tensor]] = None, ranks=None) -> Path:
    """A kohya LoRA (``lora_unet_..._to_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``)."""
    alpha = rank if alpha is None else alpha
    sd = {}
    for name, t in lora_tensors(layers, rank, seed=seed, dtype=dtype, alpha=alpha, ranks=ranks).items():
        in_attention_block = re.match(r"^((input|output)_blocks\.\d+\.1|middle_block\.1)\.", name)
        module = kohya_name(to_diffusers_path(name) if diffusers_blocks and in_attention_block else name)
        sd[f"{module}.lora_down.weight"] = t["down"]
        sd[f"{module}.lora_up.weight"] = t["up"]
        sd[f"{module}.alpha"] = t["alpha"]
    sd.update(extra or {})
    save_file(sd, str(path), metadata=metadata)
    return Path(path)


def write_diffusers(path, layers: Sequence[Layer], rank: int = 4, *, peft: bool = False, prefix: str = "unet.",
                    seed: int = 0, dtype=torch.float32, metadata: Optional[dict] = None) -> Path:
    """The original B-LoRA repository's output: diffusers names, no alpha (alpha = rank)."""
    names = ("lora_A.weight", "lora_B.weight") if peft else ("lora.down.weight", "lora.up.weight")
    sd = {}
    for name, t in lora_tensors(layers, rank, seed=seed, dtype=dtype).items():
        base = prefix + to_diffusers_path(name)
        sd[f"{base}.{names[0]}"] = t["down"]
        sd[f"{base}.{names[1]}"] = t["up"]
    save_file(sd, str(path), metadata=metadata)
    return Path(path)


def blora_metadata_like_training(dim: int, alpha: float, preset: str = "content_style") -> dict[str, str]:
    """The metadata sd-scripts + blora_network write, trimmed to what the tools look at."""
    return {
        "ss_network_module": "blora_network",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
        "ss_steps": "1000",
        "ss_output_name": "dog",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "blora_preset": preset,
        "sshs_model_hash": "f" * 64,
        "sshs_legacy_hash": "abcdef01",
        "my_note": "kept as is",
    }


# -- LyCORIS's own modules ----------------------------------------------------------------------

def lycoris_module(algo: str, layer: Layer, rank: int, alpha: float, *, seed: int = 0, **kw):
    """A LyCORIS LoHa / LoKr / LoCon(+DoRA) module on a Linear layer, with random weights everywhere."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    torch.manual_seed(seed)
    base = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
    cls = {"loha": LohaModule, "lokr": LokrModule, "lora": LoConModule}[algo]
    module = cls(kohya_name(layer.name), base, 1.0, rank, alpha, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if pname.startswith("org_") or pname == "scalar":
                continue
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def lycoris_state(module) -> dict[str, torch.Tensor]:
    """The tensors LyCORIS saves for a module, under kohya keys."""
    return {f"{module.lora_name}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()
            if not k.startswith("org_")}


def write_lycoris(path, modules, *, metadata: Optional[dict] = None, dtype=torch.float32) -> Path:
    sd = {}
    for m in modules:
        sd.update({k: v.to(dtype) for k, v in lycoris_state(m).items()})
    save_file(sd, str(path), metadata=metadata)
    return Path(path)


def write_sd1(path, rank: int = 4, seed: int = 0) -> Path:
    """An SD1.x LoRA as sd-scripts writes it: diffusers block names, 768-wide cross-attention."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for blk in ("down_blocks_0_attentions_0", "up_blocks_1_attentions_0", "up_blocks_3_attentions_2"):
        for proj, fin in (("attn1_to_q", 320), ("attn2_to_k", 768), ("attn2_to_v", 768)):
            m = f"lora_unet_{blk}_transformer_blocks_0_{proj}"
            sd[f"{m}.lora_down.weight"] = torch.randn(rank, fin, generator=g)
            sd[f"{m}.lora_up.weight"] = torch.randn(320, rank, generator=g)
            sd[f"{m}.alpha"] = torch.tensor(1.0)
    m = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd[f"{m}.lora_down.weight"] = torch.randn(rank, 768, generator=g)
    sd[f"{m}.lora_up.weight"] = torch.randn(768, rank, generator=g)
    save_file(sd, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return Path(path)


# -- LoRAs whose change sits in known places (analyze) -------------------------------------------

def write_kohya_placed(path, layers: Sequence[Layer], rank: int = 4, gains: Optional[dict[str, float]] = None, *,
                       alpha: Optional[float] = None, seed: int = 0, dtype=torch.float32,
                       diffusers_blocks: bool = False, extra: Optional[dict[str, torch.Tensor]] = None,
                       metadata: Optional[dict] = None) -> Path:
    """``write_kohya`` with each layer's change multiplied by the gain of the first ``gains`` prefix
    its module path starts with (``{"output_blocks.1.1.": 3.0}`` makes the style block's dW 3x, its
    ||dW||^2 9x); layers matching no prefix keep gain 1. The gain goes into ``lora_up``."""
    sd = {}
    for name, t in lora_tensors(layers, rank, seed=seed, alpha=rank if alpha is None else alpha).items():
        gain = next((g for prefix, g in (gains or {}).items() if name.startswith(prefix)), 1.0)
        in_attention_block = re.match(r"^((input|output)_blocks\.\d+\.1|middle_block\.1)\.", name)
        module = kohya_name(to_diffusers_path(name) if diffusers_blocks and in_attention_block else name)
        sd[f"{module}.lora_down.weight"] = t["down"].to(dtype)
        sd[f"{module}.lora_up.weight"] = (t["up"] * gain).to(dtype)
        sd[f"{module}.alpha"] = t["alpha"].to(dtype)
    sd.update(extra or {})
    save_file(sd, str(path), metadata=metadata)
    return Path(path)


def conv_lora(module: str, in_channels: int, out_channels: int, rank: int = 4, *, kernel: int = 3,
              alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoCon conv module (``lora_down`` [r, in, k, k], ``lora_up`` [out, r, 1, 1]) under a
    kohya module name, for ``extra=``."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{module}.lora_down.weight": torch.randn(rank, in_channels, kernel, kernel, generator=g) * 0.1,
        f"{module}.lora_up.weight": torch.randn(out_channels, rank, 1, 1, generator=g) * 0.1,
        f"{module}.alpha": torch.tensor(float(alpha)),
    }


def text_encoder_lora(encoder: str = "te1", layers: int = 2, width: int = 32, rank: int = 4,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """kohya text-encoder modules (``lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj``), for ``extra=``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        m = f"lora_{encoder}_text_model_encoder_layers_{i}_self_attn_q_proj"
        out[f"{m}.lora_down.weight"] = torch.randn(rank, width, generator=g)
        out[f"{m}.lora_up.weight"] = torch.randn(width, rank, generator=g)
        out[f"{m}.alpha"] = torch.tensor(float(rank))
    return out


# -- CLI and progress helpers -------------------------------------------------------------------


def assert_one_line_cli_error(code, out, err, *needles, command: str = ""):
    """Exit status 1 and exactly one stderr line, ``blora-network COMMAND: error: ...``, holding every needle."""
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"blora-network {command}: error:" if command else "blora-network "
    assert "Traceback" not in err and lines[0].startswith(prefix)
    for n in needles:
        assert n in lines[0], lines[0]


def recording_progress():
    """``(bars, Bar)``: ``Bar`` stands in for tqdm as the tools call it; every bar made is in ``bars``."""
    bars = []

    class Bar:
        def __init__(self, total, desc, unit, unit_scale):
            self.total, self.desc, self.done, self.closed = total, desc, 0, False
            bars.append(self)

        def update(self, n=1):
            self.done += n

        def close(self):
            self.closed = True

    return bars, Bar


def write_sdxl_checkpoint(path, *, sd1: bool = False) -> Path:
    """A single-file checkpoint with the key names of sd_xl_base_1.0.safetensors (SGM layout:
    ``model.diffusion_model.`` UNet, ``conditioner.embedders.0/1`` text encoders,
    ``first_stage_model.`` VAE), or SD1.x's (``cond_stage_model.``), one small tensor per part:
    ``recipe --model`` reads only the names in the header."""
    te = ("cond_stage_model.transformer.text_model.final_layer_norm.weight",) if sd1 else (
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.ln_final.weight")
    keys = ("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight", *te)
    if not sd1:
        keys += ("model.diffusion_model.label_emb.0.0.weight",)
    save_file({k: torch.zeros(2) for k in keys}, str(path))
    return Path(path)
