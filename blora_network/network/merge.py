"""Exact merging: bake a LyCORIS module's change into the weight it adapts, as its forward pass applies it.

LyCORIS (4.1.3 and every 3.x) merges through ``get_diff_weight``, which for LoHa and LoKr
applies ``alpha / dim`` twice (``get_weight`` already holds it) and leaves out a trained
``use_scalar`` scalar: a LoHa or LoKr trained with alpha != dim merges at ``(alpha/dim)^2``.
That hits sd-scripts' ``--base_weights`` and the image scripts' ``--network_merge``.

Here the change comes from the module's file-style tensors (``state_dict()``: the factors with
the scalar folded in, and ``alpha``) through :func:`blora_network.files.algos.delta_weight`, the one
dW rule the file tools use too. DoRA is not linear in dW: the merged weight is LyCORIS's own
DoRA epilogue (``apply_weight_decompose``, the one its forward pass calls) of ``W + dW``, at
the module's multiplier, so it equals that forward pass exactly, for LoRA, LoHa and LoKr alike.

The same merged weight serves sd-scripts' ``--network_pre_calc`` (:class:`WeightBackup`):
bake it in per batch, hook the module out, and put the original weight back afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch

from blora_network.files.algos import algo_of_tensors, delta_weight

__all__ = ["module_algo", "merged_weight", "merge_module", "WeightBackup"]


def _read(lora) -> tuple[str, dict[str, torch.Tensor]]:
    """The module's algorithm and its file-style tensors (one ``state_dict()``, which computes up * scalar)."""
    tensors = {k: v.detach() for k, v in lora.state_dict().items()}
    return algo_of_tensors(lora.lora_name, tensors), tensors


def module_algo(lora) -> str:
    """``lora``, ``loha``, ``lokr`` (what :func:`delta_weight` covers) or ``other``."""
    return _read(lora)[0]


def merged_weight(lora, multiplier: Optional[float] = None, *, device=None) -> torch.Tensor:
    """``W + m * dW`` (DoRA: LyCORIS's DoRA epilogue of ``W + dW`` at ``m``), float32, on ``device``.

    ``m`` is the module's own multiplier unless given. Raises ``LoraFileError`` for an
    algorithm :func:`delta_weight` does not cover (see :func:`merge_module`).
    """
    return _merged(lora, *_read(lora), multiplier, device=device)


def _target(lora) -> torch.nn.Module:
    return lora.org_module[0]


def _delta(lora, algo: str, tensors: dict[str, torch.Tensor], *, device=None) -> torch.Tensor:
    """The module's dW at multiplier 1, float32, shaped like the weight it adapts (DoRA not applied)."""
    weight = _target(lora).weight
    device = weight.device if device is None else torch.device(device)
    dw = delta_weight(algo, {k: v.to(device) for k, v in tensors.items()})
    return dw.reshape(weight.shape)


def _merged(lora, algo: str, tensors: dict[str, torch.Tensor], multiplier: Optional[float], *, device=None) -> torch.Tensor:
    """:func:`merged_weight` from tensors already read (:func:`_read`)."""
    m = float(lora.multiplier if multiplier is None else multiplier)
    weight = _target(lora).weight
    device = weight.device if device is None else torch.device(device)
    w = weight.detach().to(device=device, dtype=torch.float32)
    dw = _delta(lora, algo, tensors, device=device)
    if getattr(lora, "wd", False) and hasattr(lora, "dora_scale"):
        with _float32_on(lora, device):  # the epilogue reads dora_scale from the module
            return lora.apply_weight_decompose(w + dw, m).to(torch.float32)
    return w + dw * m


@contextlib.contextmanager
def _float32_on(lora, device):
    """The module in float32 on ``device`` for the duration, then back where and as it was."""
    first = next(iter(lora.parameters()), None)
    where = None if first is None else (first.device, first.dtype)  # .to() changes first in place
    lora.to(device=device, dtype=torch.float32)
    try:
        yield
    finally:
        if where is not None:
            lora.to(device=where[0], dtype=where[1])


def merge_module(lora, multiplier: Optional[float] = None, *, device=None) -> str:
    """Write the merged weight into the adapted layer, in place and in its own dtype; returns the algo.

    Algorithms outside LoRA/LoCon/LoHa/LoKr (full, IA3, OFT...) use LyCORIS's own merge.
    """
    algo, tensors = _read(lora)
    m = float(lora.multiplier if multiplier is None else multiplier)
    if algo == "other":
        with _float32_on(lora, device or _target(lora).weight.device):
            lora.merge_to(m)
        return algo
    weight = _target(lora).weight
    new = _merged(lora, algo, tensors, m, device=device)
    with torch.no_grad():
        weight.copy_(new.to(device=weight.device, dtype=weight.dtype))
    return algo


class WeightBackup:
    """The original weights of the layers a network adapts (sd-scripts' ``--network_pre_calc``).

    ``backup`` copies each weight once (on its own device, as sd-scripts does); ``restore``
    writes back those that a pre-calculation changed; ``precalculate`` bakes each module in at
    its current multiplier.
    """

    def __init__(self) -> None:
        self._saved: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
        self._baked: set[int] = set()

    def backup(self, loras: Iterable) -> int:
        for lora in loras:
            layer = _target(lora)
            if id(layer) not in self._saved:
                self._saved[id(layer)] = (layer, layer.weight.detach().clone())
        return len(self._saved)

    @property
    def baked(self) -> bool:
        return bool(self._baked)

    def restore(self) -> int:
        restored = 0
        with torch.no_grad():
            for key in sorted(self._baked):
                layer, original = self._saved[key]
                layer.weight.copy_(original)
                restored += 1
        self._baked.clear()
        return restored

    def precalculate(self, loras: Iterable) -> int:
        count = 0
        for lora in loras:
            layer = _target(lora)
            if id(layer) not in self._saved:
                raise RuntimeError(
                    f"pre_calculation: {lora.lora_name} was not backed up; sd-scripts calls backup_weights() "
                    "after apply_to, call it before pre_calculation()"
                )
            merge_module(lora)
            self._baked.add(id(layer))
            count += 1
        return count
