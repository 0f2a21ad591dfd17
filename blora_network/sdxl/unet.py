"""The SDXL UNet as sd-scripts names it, at any width.

B-LoRA selects layers by sd-scripts' module paths and class names
(``library/sdxl_original_unet.SdxlUNet2DConditionModel``: LDM names such as
``output_blocks.0.1.transformer_blocks.3.attn2.to_k``). Tests and the demo need that exact tree
without a 10 GB checkpoint, and ``plan`` needs the full-size Linear table. :data:`FULL` has
sd-scripts' sizes (2,567,463,684 parameters; build it on the meta device), :data:`TINY` the
same tree, module for module, at a width that trains in a fraction of a second on a CPU.
Written from sd-scripts' names and shapes, not from its code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "UNetSize",
    "FULL",
    "TINY",
    "SdxlUNet2DConditionModel",
    "build_unet",
    "LinearLayer",
    "linear_layers",
    "meta_unet",
    "module_names",
    "random_inputs",
    "build_text_encoders",
]

Device = Union[str, torch.device, None]


@dataclass(frozen=True)
class UNetSize:
    """The numbers that set an SDXL UNet's width; the tree of names is the same at any size."""

    model_channels: int  # level widths are 1x, 2x, 4x this
    context_dim: int  # text embedding width that attn2.to_k / to_v read
    head_dim: int  # attention heads = channels // head_dim
    adm_in_channels: int  # width of the pooled-text + size conditioning vector y
    transformer_depth: tuple[int, int, int] = (0, 2, 10)  # BasicTransformerBlocks per level
    norm_groups: int = 32
    in_channels: int = 4

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != 3:
            raise ValueError(f"transformer_depth needs 3 levels, got {self.transformer_depth!r}")
        for mult in (1, 2, 4):
            c = self.model_channels * mult
            if c % self.norm_groups or c % self.head_dim:
                raise ValueError(f"{c} channels do not split into {self.norm_groups} groups / heads of {self.head_dim}")

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


FULL = UNetSize(model_channels=320, context_dim=2048, head_dim=64, adm_in_channels=2816)
TINY = UNetSize(model_channels=16, context_dim=32, head_dim=8, adm_in_channels=32, norm_groups=8)

_LEVEL_MULT = (1, 2, 4)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that computes in fp32 when its weights are fp32 (sd-scripts' class of that name)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None or self.weight.dtype != torch.float32:
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


class _Checkpointed(nn.Module):
    """Runs ``forward_body`` under activation checkpointing when training with it switched on."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def forward(self, *args: Tensor) -> Tensor:
        if self.training and self.gradient_checkpointing:
            return checkpoint(self.forward_body, *args, use_reentrant=False)
        return self.forward_body(*args)

    def forward_body(self, *args: Tensor) -> Tensor:
        raise NotImplementedError


class ResnetBlock2D(_Checkpointed):
    def __init__(self, size: UNetSize, in_channels: int, out_channels: int):
        super().__init__()
        g = size.norm_groups
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_layers = nn.Sequential(
            GroupNorm32(g, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(size.time_embed_dim, out_channels))
        # index 2 is an Identity in sd-scripts (where the original's dropout sat): out_layers.3 is the conv
        self.out_layers = nn.Sequential(
            GroupNorm32(g, out_channels), nn.SiLU(), nn.Identity(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward_body(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample2D(_Checkpointed):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = self.out_channels = channels
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward_body(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample2D(_Checkpointed):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = self.out_channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward_body(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """Self-attention (attn1, ``context_dim=None``) or cross-attention on the text (attn2)."""

    def __init__(self, dim: int, context_dim: Optional[int], heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # no dropout entry in sd-scripts

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        context = x if context is None else context.to(x.dtype)

        def heads(t: Tensor) -> Tensor:  # batch from each tensor, as sd-scripts' reshape_heads_to_batch_dim:
            return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # regional prompts resize it

        out = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context)))
        return self.to_out[0](out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is an Identity in sd-scripts (the original's dropout), so the output Linear is net.2
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for module in self.net:
            x = module(x)
        return x


class BasicTransformerBlock(_Checkpointed):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        # registration order is sd-scripts': attn1, ff, attn2, norm1..3 (it sets named_modules() order)
        self.attn1 = CrossAttention(dim, None, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward_body(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer with linear projections; its BasicTransformerBlocks checkpoint themselves."""

    def __init__(self, size: UNetSize, channels: int, depth: int):
        super().__init__()
        self.in_channels = channels
        self.gradient_checkpointing = False  # present (unused) in sd-scripts too
        self.norm = nn.GroupNorm(size.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, channels // size.head_dim, size.head_dim, size.context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hidden = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        return self.proj_out(hidden).reshape(b, h, w, c).permute(0, 3, 1, 2) + x


def _timestep_embedding(timesteps: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding, cos first, frequencies spaced over ``half - 1`` steps (as sd-scripts)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - 1))
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class SdxlUNet2DConditionModel(nn.Module):
    """sd-scripts' SDXL UNet tree (same module paths, class names and containers) at ``size``."""

    def __init__(self, size: UNetSize = TINY):
        super().__init__()
        self.size = size
        ch, ted = size.model_channels, size.time_embed_dim
        self.in_channels = self.out_channels = size.in_channels
        self.model_channels, self.time_embed_dim, self.adm_in_channels = ch, ted, size.adm_in_channels
        self.gradient_checkpointing = False

        self.time_embed = nn.Sequential(nn.Linear(ch, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(size.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))

        def layers(level: int, c_in: int, c_out: int) -> list[nn.Module]:
            out: list[nn.Module] = [ResnetBlock2D(size, c_in, c_out)]
            if size.transformer_depth[level]:
                out.append(Transformer2DModel(size, c_out, size.transformer_depth[level]))
            return out

        # containers as in sd-scripts: the stem conv and the downsamplers sit in Sequentials,
        # the other blocks in ModuleLists
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(size.in_channels, ch, 3, padding=1))])
        skips, c = [ch], ch
        for level, mult in enumerate(_LEVEL_MULT):
            for _ in range(2):
                self.input_blocks.append(nn.ModuleList(layers(level, c, ch * mult)))
                c = ch * mult
                skips.append(c)
            if level < len(_LEVEL_MULT) - 1:
                self.input_blocks.append(nn.Sequential(Downsample2D(c)))
                skips.append(c)

        self.middle_block = nn.ModuleList(
            [ResnetBlock2D(size, c, c), Transformer2DModel(size, c, size.transformer_depth[-1]), ResnetBlock2D(size, c, c)]
        )

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(_LEVEL_MULT))):
            for i in range(3):
                block = layers(level, c + skips.pop(), ch * _LEVEL_MULT[level])
                c = ch * _LEVEL_MULT[level]
                if level > 0 and i == 2:
                    block.append(Upsample2D(c))
                self.output_blocks.append(nn.ModuleList(block))

        self.out = nn.ModuleList([GroupNorm32(size.norm_groups, c), nn.SiLU(), nn.Conv2d(c, size.in_channels, 3, padding=1)])

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_gradient_checkpointing(self, value: bool = False) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = value

    def is_gradient_checkpointing(self) -> bool:
        return any(isinstance(m, _Checkpointed) and m.gradient_checkpointing for m in self.modules())

    def enable_gradient_checkpointing(self) -> None:
        self.set_gradient_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self.set_gradient_checkpointing(False)

    @staticmethod
    def _run(block: nn.Module, h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        for layer in block:
            if isinstance(layer, ResnetBlock2D):
                h = layer(h, emb)
            elif isinstance(layer, Transformer2DModel):
                h = layer(h, context)
            else:
                h = layer(h)
        return h

    def forward(
        self,
        x: Tensor,
        timesteps: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        y: Optional[Tensor] = None,
        **kwargs,
    ) -> Tensor:
        """sd-scripts' signature: latents, timesteps [B] (or one, broadcast), text [B, L, C], pooled+size y."""
        assert x.shape[0] == y.shape[0], f"batch size mismatch: {x.shape[0]} != {y.shape[0]}"
        assert x.dtype == y.dtype, f"dtype mismatch: {x.dtype} != {y.dtype}"
        timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(_timestep_embedding(timesteps, self.model_channels).to(x.dtype)) + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self._run(self.out, h.type(x.dtype), emb, context)


def _init_weights(unet: nn.Module, seed: int) -> None:
    """Fill every parameter from a CPU generator: the same numbers on any device.

    Small random weights everywhere (no zero-initialised output layers as in real SD), so the
    output depends on the input and on every attention layer.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.02)
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                module.weight.fill_(1.0)
                module.bias.zero_()


def build_unet(
    size: UNetSize = TINY, *, device: Device = None, dtype: Optional[torch.dtype] = None, seed: Optional[int] = 0
) -> SdxlUNet2DConditionModel:
    """The UNet at ``size``; ``device="meta"`` gives the structure without memory (and no weights).

    With a ``seed`` the weights are deterministic (the same on CPU and GPU); with ``seed=None``
    they come from torch's default initialisation and global RNG.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if seed is None and device.type != "meta":
        return SdxlUNet2DConditionModel(size).to(device=device, dtype=dtype)
    with torch.device("meta"):  # skips torch's own initialisation, which we overwrite anyway
        unet = SdxlUNet2DConditionModel(size)
    if dtype is not None:
        unet = unet.to(dtype)
    if device.type == "meta":
        return unet
    unet = unet.to_empty(device=device)
    _init_weights(unet, seed)
    return unet


@dataclass(frozen=True)
class LinearLayer:
    """One nn.Linear of the UNet: its path and shape."""

    name: str
    in_features: int
    out_features: int
    bias: bool


@lru_cache(maxsize=8)
def meta_unet(size: UNetSize = FULL) -> SdxlUNet2DConditionModel:
    """The UNet's structure at ``size`` on the meta device (no memory, no weights; cached): for
    questions about names and shapes, never for running it."""
    return build_unet(size, device="meta")


@lru_cache(maxsize=8)
def _meta_tree(size: UNetSize) -> tuple[tuple[str, nn.Module], ...]:
    return tuple(meta_unet(size).named_modules())


def linear_layers(size: UNetSize = FULL) -> tuple[LinearLayer, ...]:
    """Every nn.Linear of the UNet at ``size``, in ``named_modules()`` order (cached)."""
    return _linear_layers(size)


@lru_cache(maxsize=8)
def _linear_layers(size: UNetSize) -> tuple[LinearLayer, ...]:
    return tuple(
        LinearLayer(name, m.in_features, m.out_features, m.bias is not None)
        for name, m in _meta_tree(size)
        if isinstance(m, nn.Linear)
    )


def module_names(size: UNetSize = FULL) -> tuple[tuple[str, str], ...]:
    """``(path, class name)`` for every ``named_modules()`` entry, the root ``("", ...)`` first (cached)."""
    return _module_names(size)


@lru_cache(maxsize=8)
def _module_names(size: UNetSize) -> tuple[tuple[str, str], ...]:
    return tuple((name, type(m).__name__) for name, m in _meta_tree(size))


def random_inputs(
    size: UNetSize = TINY,
    *,
    batch: int = 2,
    latent: int = 8,
    seq_len: int = 8,
    seed: int = 0,
    device: Device = None,
    dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, timesteps, context, y)`` for one forward pass, the same for a seed on any device.

    ``dtype`` applies to the float tensors; ``timesteps`` stay int64.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, size.in_channels, latent, latent, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, seq_len, size.context_dim, generator=gen)
    y = torch.randn(batch, size.adm_in_channels, generator=gen)
    x, context, y = (v.to(device=device, dtype=dtype) for v in (x, context, y))
    return x, t.to(device), context, y


def build_text_encoders(*, seed: int = 0) -> list:
    """SDXL's two text encoders as sd-scripts passes them: ``[CLIPTextModel, CLIPTextModelWithProjection]``, tiny."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError as e:
        raise ImportError("build_text_encoders needs transformers: pip install transformers") from e
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without moving the caller's RNG
        torch.manual_seed(seed)
        return [CLIPTextModel(config), CLIPTextModelWithProjection(config)]
