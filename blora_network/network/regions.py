"""Regional prompts and pre-calculated weights in sd-scripts' image scripts (``gen_img.py``, ``sdxl_gen_img.py``).

With a mask image and several ``--network_module``s, the image scripts give network ``i`` the
``i``-th mask channel (``set_region(i, is_last, mask)``), split the prompt on `` AND `` into
``n`` sub-prompts, and before each batch call ``set_current_generation(batch, n, width,
height, shared[, ds_ratio])``. The text batch then holds ``B`` unconditional rows followed by
``B * n`` sub-prompt rows (image ``b``'s sub-prompt ``i`` at row ``B + b * n + i``), while the
latents hold ``2B`` rows. The networks share one protocol, read from sd-scripts' networks/lora.py
and followed here so that our networks mix with its LoRAs in one run:

* cross-attention keys/values (``attn2.to_k/to_v``) and text-encoder layers: network ``i`` adds
  its change only to sub-prompt ``i``'s rows;
* every other adapted layer: the change is multiplied by the network's mask, resized to the
  layer's token grid (``ones / n`` where no grid matches);
* ``attn2.to_q`` of the *last* network repeats each conditional query row ``n`` times, so every
  sub-prompt gets its own attention;
* ``attn2.to_out.0``: each network adds its change for its sub-prompt into
  ``shared[layer name] = (changes, masks)``; the last network (outermost hook) creates that entry,
  runs the others, and blends the ``n`` attention outputs by the masks.

The last two must happen at *every* cross-attention of the UNet, not only in the blocks B-LoRA
trains, or the query and key batches would not match: an inference network therefore also puts
a pass-through router on each ``attn2.to_q`` / ``attn2.to_out.0`` it does not adapt.

``--network_pre_calc`` (without regions) bakes each module into its layer per batch
(``restore_weights`` then ``pre_calculation``); while baked, the module's forward is skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from blora_network.sdxl.names import kohya_module_name

__all__ = ["RegionState", "InferenceHooks", "mask_sizes"]

_MASK_EPS = 1e-4  # sd-scripts' floor on the sum of the masks where the attention outputs are blended


def mask_sizes(height: int, width: int, ds_ratio: Optional[float] = None) -> list[tuple[int, int]]:
    """The token grids of the SDXL UNet for an image: latent size, then three halvings (rounded up),
    the even neighbour of an odd grid, and the Deep Shrink grids when ``ds_ratio`` is set."""
    h, w = height // 8, width // 8
    sizes = []
    for _ in range(4):
        sizes.append((h, w))
        if h % 2 or w % 2:
            sizes.append((h + h % 2, w + w % 2))
        if ds_ratio is not None:
            sizes.append((int(h * ds_ratio), int(w * ds_ratio)))
        h, w = (h + 1) // 2, (w + 1) // 2
    return sizes


@dataclass
class RegionState:
    """One network's region: its sub-prompt, its mask, and the current batch's layout."""

    sub_prompt_index: int
    is_last: bool
    mask: torch.Tensor
    """[H, W] in [0, 1]; an all-zero mask means the whole image (sd-scripts' rule)."""
    batch_size: int = 0
    num_sub_prompts: int = 0
    shared: dict = field(default_factory=dict)
    masks_by_area: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.batch_size > 0 and self.num_sub_prompts > 0

    def set_generation(self, batch_size: int, num_sub_prompts: int, width: int, height: int, shared: dict,
                       ds_ratio: Optional[float], like: torch.Tensor) -> None:
        if num_sub_prompts < 1 or self.sub_prompt_index >= num_sub_prompts:
            raise ValueError(
                f"regional prompt: network {self.sub_prompt_index} needs sub-prompt {self.sub_prompt_index}, "
                f"the prompt has {num_sub_prompts}; split it into at least as many parts with ' AND ' as there are networks"
            )
        self.batch_size, self.num_sub_prompts, self.shared = int(batch_size), int(num_sub_prompts), shared
        grid = self.mask.to(torch.float32)[None, None]
        self.masks_by_area = {}
        for mh, mw in mask_sizes(height, width, ds_ratio):
            resized = F.interpolate(grid, (mh, mw), mode="bilinear")
            self.masks_by_area[mh * mw] = resized.to(device=like.device, dtype=like.dtype)

    def mask_for(self, t: torch.Tensor) -> torch.Tensor:
        """The mask on ``t``'s token grid (``[1, L, 1]`` or ``[1, 1, h, w]``), or ``1 / n`` off the grids."""
        area = t.shape[2] * t.shape[3] if t.dim() == 4 else (t.shape[1] if t.dim() == 3 else None)
        mask = self.masks_by_area.get(area) if area is not None else None
        if mask is None:
            return torch.full((1,) * t.dim(), 1.0 / self.num_sub_prompts, device=t.device, dtype=t.dtype)
        mask = mask.to(device=t.device, dtype=t.dtype)
        return mask.reshape(1, -1, 1) if t.dim() == 3 else mask

    @property
    def cond_rows(self) -> slice:
        """The sub-prompt rows of a text or expanded batch: after ``B`` unconditional rows, ``B * n``."""
        return slice(self.batch_size, self.batch_size * (1 + self.num_sub_prompts))

    def expand_query(self, q: torch.Tensor) -> torch.Tensor:
        """``[uncond B, cond B(, real uncond B)]`` -> each conditional row repeated for the ``n`` sub-prompts."""
        b = self.batch_size
        parts = [q[:b], q[b:2 * b].repeat_interleave(self.num_sub_prompts, dim=0)]
        if q.shape[0] // b == 3:
            parts.append(q[-b:])
        return torch.cat(parts)


Delta = Optional[Callable[[torch.Tensor], torch.Tensor]]


def _sub_prompt(state: RegionState, x: torch.Tensor, base: Callable, delta: Delta, text_encoder: bool) -> torch.Tensor:
    """Keys/values and text-encoder layers: this network's change on its own sub-prompt's rows only."""
    b, n, i = state.batch_size, state.num_sub_prompts, state.sub_prompt_index
    out = base(x)
    if delta is None or x.shape[0] == b:  # the unconditional text batch gets no change
        return out
    rows = torch.arange(x.shape[0], device=x.device)
    cond = rows[i::n] if text_encoder else rows[state.cond_rows][i::n]
    out = out.clone()
    out[cond] += delta(x[cond])
    return out


def _to_out(state: RegionState, name: str, x: torch.Tensor, base: Callable, delta: Delta) -> torch.Tensor:
    """``attn2.to_out.0``: gather each network's change and mask; the last network blends them."""
    b, n, i = state.batch_size, state.num_sub_prompts, state.sub_prompt_index
    if state.is_last:
        state.shared[name] = (None, [None] * n)
    if name not in state.shared:
        raise RuntimeError(
            f"regional prompt: {name} has no entry from the last network; the last --network_module "
            "must cover every cross-attention (blora_network does) and be set up with set_region(..., is_last=True)"
        )
    changes, masks = state.shared[name]
    x_i = x[state.cond_rows][i::n]
    change = delta(x_i) if delta is not None else None
    if state.is_last:
        changes = torch.zeros((n * b, *x_i.shape[1:]), device=x.device, dtype=x.dtype)
        state.shared[name] = (changes, masks)
    if change is not None:
        changes[i::n] += change
    masks[i] = state.mask_for(x_i)
    out = base(x)
    if not state.is_last:
        return out
    changes, masks = state.shared.pop(name)
    known = next(m for m in masks if m is not None)
    mask = torch.cat([m if m is not None else torch.zeros_like(known) for m in masks])
    mask_sum = mask.sum(dim=0) + _MASK_EPS
    blended = []
    for k in range(b):
        block = out[b + k * n:b + (k + 1) * n]
        blended.append((block * mask).sum(dim=0) / mask_sum + (changes[k * n:(k + 1) * n] * mask).sum(dim=0))
    parts = [out[:b], torch.stack(blended)]
    if out.shape[0] // b == n + 2:
        parts.append(out[-b:])
    return torch.cat(parts)


def _layer_kind(name: str) -> str:
    if name.startswith("lora_te"):
        return "text_encoder"
    if "attn2_to_k" in name or "attn2_to_v" in name:
        return "sub_prompt"
    if name.endswith("attn2_to_out_0"):
        return "to_out"
    if name.endswith("attn2_to_q"):
        return "to_q"
    return "masked"


def _module_delta_fn(lora) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's change on ``x`` at its multiplier: the bypass path, or forward minus base (DoRA)."""
    if getattr(lora, "bypass_mode", False) and not getattr(lora, "wd", False):
        return lambda t: lora.bypass_forward_diff(t, scale=lora.multiplier)
    return lambda t: type(lora).forward(lora, t) - lora.org_forward(t)


def regional_forward(state: RegionState, name: str, x: torch.Tensor, base: Callable, delta: Delta) -> torch.Tensor:
    """One layer's output under ``state``; ``delta`` None for a layer this network does not adapt."""
    kind = _layer_kind(name)
    if kind in ("text_encoder", "sub_prompt"):
        return _sub_prompt(state, x, base, delta, kind == "text_encoder")
    if kind == "to_out":
        return _to_out(state, name, x, base, delta)
    out = base(x)
    if delta is not None:
        change = delta(x)
        out = out + change * state.mask_for(change)
    if kind == "to_q" and state.is_last:
        out = state.expand_query(out)
    return out


class InferenceHooks:
    """The per-batch switches of an inference network: pre-calculated weights and regions.

    :meth:`hook_modules` runs before LyCORIS hooks the modules in, so LyCORIS installs our
    dispatcher as each layer's forward (and keeps its own chain of networks intact); with no
    region and no pre-calculation, the dispatcher calls the module's own forward.
    """

    def __init__(self) -> None:
        self.region: Optional[RegionState] = None
        self.precalculated = False

    def hook_modules(self, loras) -> None:
        for lora in loras:
            lora.forward = functools.partial(self._module_forward, lora)

    def add_routers(self, unet: torch.nn.Module, adapted: set[str]) -> int:
        """A pass-through on every ``attn2.to_q`` / ``attn2.to_out.0`` not in ``adapted`` (kohya names)."""
        count = 0
        for path, module in unet.named_modules():
            if not (path.endswith("attn2.to_q") or path.endswith("attn2.to_out.0")):
                continue
            name = kohya_module_name(path)
            if name in adapted:
                continue
            module.forward = functools.partial(self._router_forward, name, module.forward)
            count += 1
        return count

    def _module_forward(self, lora, x, *args, **kwargs):
        if self.precalculated:
            return lora.org_forward(x, *args, **kwargs)
        state = self.region
        if state is None or not state.ready:
            return type(lora).forward(lora, x, *args, **kwargs)
        return regional_forward(state, lora.lora_name, x, lora.org_forward, _module_delta_fn(lora))

    def _router_forward(self, name, inner, x, *args, **kwargs):
        state = self.region
        if state is None or not state.ready:
            return inner(x, *args, **kwargs)
        return regional_forward(state, name, x, inner, None)
