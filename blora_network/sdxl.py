"""The SDXL UNet as sd-scripts names it, at any width.

Tests, the demo and the benchmarks need a model whose module paths and class names are
exactly those of sd-scripts' ``library/sdxl_original_unet.SdxlUNet2DConditionModel`` (LDM
names: ``input_blocks``, ``middle_block``, ``output_blocks``), without a 10 GB checkpoint.
:data:`FULL` has sd-scripts' sizes (2,567,463,684 parameters; build it on the meta device),
:data:`TINY` the same tree at a small width, fast on two CPU cores. ``plan`` reads the
full-size Linear layer table from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "UNetSize",
    "FULL",
    "TINY",
    "SdxlUNet2DConditionModel",
    "build_unet",
    "LinearLayer",
    "linear_layers",
    "module_names",
    "random_inputs",
    "build_text_encoders",
]


@dataclass(frozen=True)
class UNetSize:
    """The numbers that set an SDXL UNet's width; the tree of names is the same at any size."""

    model_channels: int = 320
    context_dim: int = 2048
    head_dim: int = 64
    adm_in_channels: int = 2816
    transformer_depth: tuple[int, int, int] = (0, 2, 10)
    norm_groups: int = 32
    in_channels: int = 4

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


FULL = UNetSize()
TINY = UNetSize(model_channels=16, context_dim=32, head_dim=8, adm_in_channels=32, norm_groups=8)


class GroupNorm32(nn.GroupNorm):
    """sd-scripts' GroupNorm that computes in fp32 when its weights are fp32."""

    def forward(self, x):
        if self.weight is None or self.weight.dtype != torch.float32:
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


class _Checkpointed(nn.Module):
    """Runs ``forward_body`` under activation checkpointing when training with it on."""

    gradient_checkpointing = False

    def forward(self, *args):
        if self.training and self.gradient_checkpointing:
            return checkpoint(self.forward_body, *args, use_reentrant=False)
        return self.forward_body(*args)


class ResnetBlock2D(_Checkpointed):
    def __init__(self, size: UNetSize, in_channels: int, out_channels: int):
        super().__init__()
        g = size.norm_groups
        self.in_layers = nn.Sequential(GroupNorm32(g, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(size.time_embed_dim, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(g, out_channels), nn.SiLU(), nn.Identity(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward_body(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample2D(_Checkpointed):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward_body(self, x):
        return self.op(x)


class Upsample2D(_Checkpointed):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward_body(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: Optional[int], heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x, context=None):
        context = x if context is None else context.to(x.dtype)
        b = x.shape[0]
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, x.shape[1], -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])

    def forward(self, x):
        for module in self.net:
            x = module(x)
        return x


class BasicTransformerBlock(_Checkpointed):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward_body(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    def __init__(self, size: UNetSize, channels: int, depth: int):
        super().__init__()
        heads = channels // size.head_dim
        self.norm = nn.GroupNorm(size.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, size.head_dim, size.context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, context):
        b, c, h, w = x.shape
        hidden = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        hidden = self.proj_out(hidden).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return hidden + x


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class SdxlUNet2DConditionModel(nn.Module):
    """sd-scripts' SDXL UNet tree: the same module paths and class names, at ``size``."""

    def __init__(self, size: UNetSize = TINY):
        super().__init__()
        self.size = size
        ch = size.model_channels
        mult = (1, 2, 4)
        ted = size.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(ch, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(size.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))

        def level_layers(level: int, c_in: int, c_out: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResnetBlock2D(size, c_in, c_out)]
            if size.transformer_depth[level]:
                layers.append(Transformer2DModel(size, c_out, size.transformer_depth[level]))
            return layers

        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(size.in_channels, ch, 3, padding=1)])])
        skip = [ch]
        c = ch
        for level, m in enumerate(mult):
            for _ in range(2):
                self.input_blocks.append(nn.ModuleList(level_layers(level, c, ch * m)))
                c = ch * m
                skip.append(c)
            if level < len(mult) - 1:
                self.input_blocks.append(nn.ModuleList([Downsample2D(c)]))
                skip.append(c)
        self.middle_block = nn.ModuleList(
            [ResnetBlock2D(size, c, c), Transformer2DModel(size, c, size.transformer_depth[-1]), ResnetBlock2D(size, c, c)]
        )
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(3):
                layers = level_layers(level, c + skip.pop(), ch * m)
                c = ch * m
                if level > 0 and i == 2:
                    layers.append(Upsample2D(c))
                self.output_blocks.append(nn.ModuleList(layers))
        self.out = nn.Sequential(GroupNorm32(size.norm_groups, c), nn.SiLU(), nn.Conv2d(c, size.in_channels, 3, padding=1))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _set_checkpointing(self, on: bool) -> None:
        for module in self.modules():
            if isinstance(module, _Checkpointed):
                module.gradient_checkpointing = on

    def enable_gradient_checkpointing(self) -> None:
        self._set_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self._set_checkpointing(False)

    @staticmethod
    def _run(layers: nn.ModuleList, h, emb, context):
        for layer in layers:
            if isinstance(layer, ResnetBlock2D):
                h = layer(h, emb)
            elif isinstance(layer, Transformer2DModel):
                h = layer(h, context)
            else:
                h = layer(h)
        return h

    def forward(self, x, timesteps, context, y):
        emb = self.time_embed(timestep_embedding(timesteps, self.size.model_channels).to(x.dtype))
        emb = emb + self.label_emb(y.to(x.dtype))
        skips = []
        h = x
        for layers in self.input_blocks:
            h = self._run(layers, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for layers in self.output_blocks:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h.to(x.dtype))


def _init_weights(unet: nn.Module, seed: int) -> None:
    """Small random weights everywhere, so output depends on input and on every attention layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.02)


def build_unet(
    size: UNetSize = TINY, *, device=None, dtype: Optional[torch.dtype] = None, seed: Optional[int] = 0
) -> SdxlUNet2DConditionModel:
    """Build the UNet; ``device="meta"`` gives the full-size structure without memory."""
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            unet = SdxlUNet2DConditionModel(size)
        return unet.to(dtype) if dtype is not None else unet
    unet = SdxlUNet2DConditionModel(size)
    if seed is not None:
        _init_weights(unet, seed)
    if device is not None or dtype is not None:
        unet = unet.to(device=device, dtype=dtype)
    return unet


@dataclass(frozen=True)
class LinearLayer:
    """One nn.Linear of the UNet: its path and shape."""

    name: str
    in_features: int
    out_features: int
    bias: bool


@lru_cache(maxsize=8)
def _meta_tree(size: UNetSize):
    unet = build_unet(size, device="meta")
    return tuple(unet.named_modules())


@lru_cache(maxsize=8)
def linear_layers(size: UNetSize = FULL) -> tuple[LinearLayer, ...]:
    """Every nn.Linear of the UNet at ``size``, in ``named_modules()`` order."""
    return tuple(
        LinearLayer(name, m.in_features, m.out_features, m.bias is not None)
        for name, m in _meta_tree(size)
        if isinstance(m, nn.Linear)
    )


@lru_cache(maxsize=8)
def module_names(size: UNetSize = FULL) -> tuple[tuple[str, str], ...]:
    """``(path, class name)`` for every module of the UNet (the root excluded)."""
    return tuple((name, type(m).__name__) for name, m in _meta_tree(size) if name)


def random_inputs(
    size: UNetSize = TINY, *, batch: int = 2, latent: int = 8, seq_len: int = 8, seed: int = 0, device=None, dtype=None
):
    """``(x, timesteps, context, y)`` for one forward pass, deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, size.in_channels, latent, latent, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, seq_len, size.context_dim, generator=gen)
    y = torch.randn(batch, size.adm_in_channels, generator=gen)
    out = []
    for v in (x, t, context, y):
        if v.is_floating_point() and dtype is not None:
            v = v.to(dtype)
        out.append(v.to(device) if device is not None else v)
    return tuple(out)


def build_text_encoders(*, seed: int = 0) -> list:
    """SDXL's two CLIP text encoders (transformers' classes) at a tiny width."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError as e:  # pragma: no cover - transformers is in the test extra
        raise ImportError("build_text_encoders needs transformers: pip install transformers") from e
    torch.manual_seed(seed)
    config = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=77, projection_dim=32)
    return [CLIPTextModel(CLIPTextConfig(**config)), CLIPTextModelWithProjection(CLIPTextConfig(**config))]
