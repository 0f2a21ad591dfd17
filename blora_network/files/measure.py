"""How the file tools spend CPU: progress bars, torch's thread count, and the per-layer norm.

The tools' per-layer math is small (a few ms). Handing such ops to OpenMP threads gains
little on idle cores and costs ~10-30 ms per op when another process holds a core (the
usual case beside a training run): inspect of an 800 MB rank-128 file took 8.1 s with 2
threads on 2 shared cores instead of ~2 s on one. So small work runs on one thread, and
only a layer big enough to pay for the hand-off gets the caller's threads.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch

from .algos import delta_norm_sq

__all__ = ["Progress", "progress_bar", "torch_threads", "layer_norm_sq", "PARALLEL_WORK"]

Progress = Callable[..., object]
"""A progress-bar factory called as ``progress(total=, desc=, unit=, unit_scale=)``; the object it
returns has ``update(n)`` and ``close()`` (``tqdm.tqdm`` fits). None means no progress reporting."""

PARALLEL_WORK = 1 << 29
"""Multiply-adds above which a layer's norm is worth torch's thread pool (~10 ms on one core)."""


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def progress_bar(progress: Optional[Progress], total: int, desc: str, unit: str = "B") -> Iterator:
    """A bar from ``progress`` (or one that does nothing), closed however the block ends."""
    bar = progress(total=total, desc=desc, unit=unit, unit_scale=True) if progress else _NoBar()
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run on ``n`` torch threads, restored after."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def layer_norm_sq(layer, tensors, threads: int) -> float:
    """``||dW||_F^2`` of one file layer, on one thread unless the layer is big enough for ``threads``."""
    with torch_threads(threads if _norm_work(layer) >= PARALLEL_WORK else 1):
        return delta_norm_sq(layer.algo, tensors)


def _norm_work(layer) -> int:
    """About how many multiply-adds ``delta_norm_sq`` costs for this layer (Gram matrices for LoRA)."""
    if layer.rank is None or layer.out_features is None or layer.in_features is None:
        return 0
    down = layer.shapes.get("lora_down.weight")
    inner = math.prod(down[1:]) if down is not None else layer.in_features
    r = layer.rank
    return r * r * (layer.out_features + inner) if layer.algo == "lora" else r * layer.out_features * inner
