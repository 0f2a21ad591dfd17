"""What the installed LyCORIS gets wrong, found by measuring it, and how the network guards against it.

Each guard names the fault and the fix in its message. The merge fault (LoHa/LoKr merged at
(alpha/dim)^2) is avoided in :mod:`blora_network.network.merge`; the LoKr faults are here. The facts,
as read in lycoris-lora's ``lycoris/modules/lokr.py`` and measured: its rank-dropout mask is built with
``torch.rand(weight.size(0))`` on the CPU and not moved to the weight's device (LoHa and LoCon move it;
still so in 4.1.3); in 3.x ``bypass_forward_diff`` does not multiply by ``self.scale`` (4.0 does), which
:func:`lokr_bypass_leaves_out_scale` asks the installed version directly.
"""

from __future__ import annotations

import functools
import logging

import torch

from blora_network.errors import NetworkArgsError, count

__all__ = ["guard_lokr", "lokr_bypass_leaves_out_scale"]

logger = logging.getLogger("blora_network")


def guard_lokr(loras, *, training: bool) -> None:
    """Two LyCORIS LoKr faults, refused (training) or avoided (a rebuilt inference network).

    * rank_dropout: LoKr ignores it in bypass mode and, in rebuild mode, builds its mask on the
      CPU (lycoris-lora <= 4.1.3), which fails on a CUDA weight;
    * lycoris-lora 3.x's LoKr bypass forward leaves out alpha/dim (fixed in 4.0): it would train,
      or apply a file, at scale 1 where the file means alpha/dim. Rebuild mode is right there.
    """
    lokr = [m for m in loras if type(m).__name__ == "LokrModule"]
    dropping = [m.lora_name for m in lokr if getattr(m, "rank_dropout", 0)]
    if training and dropping:
        raise NetworkArgsError(
            f"network_args rank_dropout with LoKr ({count(len(dropping), 'module')}, first {dropping[0]}): LyCORIS's LoKr "
            "ignores rank dropout in bypass mode and, in rebuild mode, builds its dropout mask on the CPU, which "
            "fails on a GPU. Remove rank_dropout, or use algo=lora or algo=loha for rank dropout"
        )
    scaled = [m for m in lokr if getattr(m, "bypass_mode", False) and m.scale != 1.0]
    if not scaled or not lokr_bypass_leaves_out_scale():
        return
    if training:
        raise NetworkArgsError(
            f"algo=lokr with alpha != dim ({scaled[0].lora_name}: scale {scaled[0].scale:g}): this lycoris-lora's "
            "LoKr bypass forward leaves out alpha/dim, so it would train at scale 1 while the file says otherwise. "
            "Upgrade to lycoris-lora>=4.0, add bypass_mode=false to --network_args, or keep alpha = dim"
        )
    for m in scaled:
        m.bypass_mode = False
    logger.info("blora_network: %d LoKr modules run in rebuild mode (this lycoris-lora's LoKr bypass leaves out "
                "alpha/dim)", len(scaled))


@functools.lru_cache(maxsize=None)
def lokr_bypass_leaves_out_scale() -> bool:
    """Ask the installed LyCORIS once: does LoKr's bypass forward apply alpha/dim (4.x) or not (3.x)?"""
    from lycoris.modules.lokr import LokrModule

    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 64, bias=False)
    module = LokrModule("probe", layer, 1.0, lora_dim=2, alpha=1, factor=2, bypass_mode=True)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(2, 64, generator=gen)
        bypass = module.bypass_forward_diff(x, 1.0)
        rebuild = torch.nn.functional.linear(x, module.get_weight(module.shape))
    return not torch.allclose(bypass, rebuild, rtol=1e-3, atol=1e-5)
