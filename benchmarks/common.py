"""Shared pieces of the benchmarks: the two B-LoRA blocks, the step variants, the machine line.

Not a test module and not part of the package: the scripts in this folder import it as
``common`` (Python puts the script's folder first on ``sys.path``).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Always this checkout's package, even when another copy is installed: the benchmarks measure
# the code they sit next to.
sys.path.insert(0, str(REPO))

import torch
import torch.nn as nn
import torch.nn.functional as F

from blora_network.sdxl.unet import FULL, TINY, UNetSize, build_unet

RESULTS = REPO / "benchmarks" / "RESULTS.md"
CONTENT, STYLE = "output_blocks.0.1", "output_blocks.1.1"


# -- machine and recording -------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    """What the numbers were measured on (and which blora_network, at which commit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count()
    try:
        from importlib.metadata import version

        lyco = version("lycoris-lora")
    except Exception:  # pragma: no cover
        lyco = "?"
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu_model()}, {cores} cores (nproc), torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "lycoris-lora": lyco,
        "python": platform.python_version(),
        "blora_network": _checkout(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "load average at start (1/5/15 min)": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    # glibc's allocator settings change CPU step times (page faults on freed-and-reused memory)
    tuned = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    if tuned:
        info["allocator environment"] = " ".join(f"{k}={v}" for k, v in sorted(tuned.items()))
    if str(device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
        info["lycoris kernel backend"] = os.environ.get("LYCORIS_KERNEL_BACKEND", "auto") + (
            " (triton installed)" if _has("triton") else " (no triton)"
        )
    return info


def _checkout() -> str:
    import subprocess

    import blora_network

    where = Path(blora_network.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--", "blora_network"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    return f"{where}" + (f" at {head}" if head else "") + (" + uncommitted changes in blora_network/" if dirty else "")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def command_line() -> str:
    args = [a if a and all(c.isalnum() or c in "-_=./,:" for c in a) else repr(a) for a in sys.argv[1:]]
    return " ".join(["python", os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0], *args])


def record(title: str, info: dict, body: str) -> None:
    """Append one run to RESULTS.md, under its heading, with command line and machine."""
    lines = [f"\n### {title} ({info['date']})\n", f"`{command_line()}`\n"]
    lines += [f"- {k}: {v}" for k, v in info.items() if k != "date"]
    lines.append("- load average at end (1/5/15 min): " + " / ".join(f"{v:.2f}" for v in os.getloadavg()))
    text = "\n".join(lines) + "\n\n" + body.rstrip() + "\n"
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(text)
    print(f"recorded in {RESULTS}")


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# -- the model: content and style transformer blocks at SDXL width ---------------------------
class TwoBlocks(nn.Module):
    """``output_blocks.0.1`` (content) then ``output_blocks.1.1`` (style), with sd-scripts' paths.

    Index 0 of each output block (a ResnetBlock2D in the UNet) is an ``nn.Identity``
    placeholder so that the module paths, and thus the preset's selection, are the UNet's.
    """

    def __init__(self, content: nn.Module, style: nn.Module):
        super().__init__()
        self.output_blocks = nn.ModuleList([nn.ModuleList([nn.Identity(), content]), nn.ModuleList([nn.Identity(), style])])

    def forward(self, x, context):
        x = self.output_blocks[0][1](x, context)
        return self.output_blocks[1][1](x, context)


def size_named(name: str) -> UNetSize:
    return {"full": FULL, "tiny": TINY}[name]


def build_two_blocks(size: UNetSize, device="cpu", dtype=torch.float32, seed: int = 0) -> TwoBlocks:
    """The two blocks taken from ``build_unet(size, device="meta")``, materialised on ``device``.

    Weights are filled from one random buffer (a few hundred ms instead of ~10 s of
    per-tensor init at full width); values only need to be finite and of a sane scale.
    """
    unet = build_unet(size, device="meta")
    model = TwoBlocks(unet.output_blocks[0][1], unet.output_blocks[1][1])
    del unet
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    buf = torch.randn(1 << 22, generator=gen).to(device=device, dtype=dtype)
    offset = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                flat = module.weight.view(-1)
                for start in range(0, flat.numel(), buf.numel()):
                    n = min(buf.numel(), flat.numel() - start)
                    o = offset % (buf.numel() - n + 1)
                    flat[start : start + n].copy_(buf[o : o + n])
                    offset += 7919
                flat.mul_(1.0 / math.sqrt(module.in_features))
                if module.bias is not None:
                    module.bias.copy_(buf[: module.bias.numel()]).mul_(0.02)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                module.weight.fill_(1.0)
                module.bias.zero_()
    model.requires_grad_(False)
    return model


def step_inputs(size: UNetSize, latent: int, batch: int, context_len: int, device, dtype, seed: int = 1):
    """x (requires grad: the backward runs through the blocks in every variant), context, target."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    channels = size.model_channels * 4
    x = torch.randn(batch, channels, latent, latent, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    context = torch.randn(batch, context_len, size.context_dim, generator=gen).to(device=device, dtype=dtype)
    target = torch.randn(batch, channels, latent, latent, generator=gen).to(device=device)
    return x, context, target


# -- (b): the minimal hand-written LoRA ------------------------------------------------------
class MinimalLoRA(nn.Module):
    """``base(x) + up(down(x)) * scale`` on one Linear: bypass-mode LoRA, nothing else.

    The addition and the scale are one fused ``torch.add(..., alpha=scale)``; the
    adapter weights meet the activation through autocast, like any Linear.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, down: torch.Tensor | None = None):
        super().__init__()
        self.base = [base]  # not a submodule: its weights are not ours to train or save
        self.scale = float(scale)
        self.down = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        with torch.no_grad():
            if down is not None:
                self.down.copy_(down)
            else:
                nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def forward(self, x):
        base = self.base[0]
        return torch.add(F.linear(x, base.weight, base.bias), F.linear(F.linear(x, self.down), self.up), alpha=self.scale)


# -- attaching the variants -------------------------------------------------------------------
def create_ours(model: nn.Module, dim: int, alpha: float | None = None, preset: str = "content_style", device="cpu"):
    """Our network exactly as sd-scripts drives it: create_network, apply_to, groups, train()."""
    from blora_network import create_network

    net = create_network(1.0, dim, dim if alpha is None else alpha, None, None, model, preset=preset)
    net.apply_to(None, model, False, True)
    net.to(device)
    res = net.prepare_optimizer_params(None, 1e-4, 1e-4)
    groups = res[0] if isinstance(res, tuple) else res
    net.on_epoch_start(None, model)
    return net, groups


def lora_layers(net) -> list[nn.Linear]:
    return [lora.org_module[0] for lora in net.unet_loras]


def layer_names(model: nn.Module, layers) -> list[str]:
    wanted = {id(m) for m in layers}
    return [name for name, m in model.named_modules() if id(m) in wanted]


def create_minimal(layers, dim: int, scale: float, downs=None) -> nn.ModuleList:
    minis = nn.ModuleList(
        MinimalLoRA(layer, dim, scale, None if downs is None else downs[i]) for i, layer in enumerate(layers)
    )
    return minis


class Switch:
    """Puts one variant's forward on the shared Linear layers: ``a`` (none), ``b`` (minimal), ``ours``."""

    def __init__(self, layers, net=None, minis=None):
        self.layers = list(layers)
        self.ours = [lora.forward for lora in net.unet_loras] if net is not None else None
        self.minis = [m.forward for m in minis] if minis is not None else None

    def use(self, variant: str) -> None:
        for i, layer in enumerate(self.layers):
            if variant == "a":
                layer.__dict__.pop("forward", None)
            elif variant == "b":
                layer.forward = self.minis[i]
            else:
                layer.forward = self.ours[i]


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def whole_unet_lora_params(rank: int) -> dict:
    """Trainable parameters of sd-scripts' default ``networks.lora`` on SDXL at ``rank``.

    Its default targets (no conv_dim) are every Linear and 1x1 Conv2d inside a
    ``Transformer2DModel`` (proj_in, attn1/attn2 q/k/v/out, ff, proj_out) for the UNet,
    and every Linear inside ``CLIPAttention``/``CLIPMLP`` for the two text encoders.
    A LoRA on an (in -> out) Linear holds rank * (in + out) parameters.
    """
    from blora_network.sdxl.unet import linear_layers, module_names

    transformers = [p for p, cls in module_names(FULL) if cls == "Transformer2DModel"]
    unet = [l for l in linear_layers(FULL) if any(l.name.startswith(t + ".") for t in transformers)]
    unet_params = sum(rank * (l.in_features + l.out_features) for l in unet)
    te = 0
    te_layers = 0
    for hidden, inter, layers in ((768, 3072, 12), (1280, 5120, 32)):  # CLIP ViT-L, OpenCLIP bigG
        per_layer = 4 * rank * (hidden + hidden) + rank * (hidden + inter) + rank * (inter + hidden)
        te += layers * per_layer
        te_layers += layers * 6
    return {"unet_modules": len(unet), "unet_params": unet_params, "te_modules": te_layers, "te_params": te}


def preset_layers(model: nn.Module, preset: str = "content_style") -> list[nn.Linear]:
    """The Linear layers a preset selects, by the preset's own matching (no LyCORIS involved)."""
    from blora_network.network.presets import load_preset

    modules = dict(model.named_modules())
    chosen = set(load_preset(preset).select([(n, type(m).__name__) for n, m in modules.items() if n]))
    return [m for n, m in modules.items() if n in chosen]
