"""One rank of a B-LoRA training run driven the way sd-scripts' ``train_network.py`` drives it
under ``accelerate`` (DDP), on the CPU with the gloo backend.

Launched by ``tests/test_multigpu.py``::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR MODE...

MODE is ``plain`` (one optimizer step per batch), ``accumulation`` (accelerate's gradient
accumulation over 2 micro-batches) or ``checkpointing`` (``--gradient_checkpointing``). For
each mode every rank dumps ``OUT_DIR/MODE/rank<R>.pt`` (final adapter state, the first
step's local and averaged gradients, losses, what was wrapped); rank 0 alone writes
``OUT_DIR/MODE/blora.safetensors``.

The same file has :func:`train_reference`: one process, plain torch, the batch of every
rank concatenated. With equal per-rank batch sizes, the mean loss over the concatenation is
the average of the per-rank mean losses, so its gradient is what DDP must produce.

What sd-scripts does, and this worker copies (train_network.py, v0.8.7 to main):
the UNet stays unwrapped (it is frozen; see :func:`train_ddp`), ``accelerator.prepare(network, optimizer)`` (the network becomes the
DDP module), forward through the *UNet* (LyCORIS's hooks), ``accelerator.accumulate(network)``,
``accelerator.backward``, then when ``sync_gradients`` the manual mean all-reduce of every
``network.parameters()`` grad (``all_reduce_network``: DDP's own reducer does not run since
the DDP module's forward is never called), gradient clipping on ``get_trainable_params()``,
``optimizer.step()`` and ``zero_grad(set_to_none=True)`` every micro-step, save on the main
process only through ``accelerator.unwrap_model(network).save_weights``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import blora_network  # noqa: E402
from blora_network.tools.demo import teacher_target  # noqa: E402
from blora_network.sdxl.unet import TINY, build_unet, random_inputs  # noqa: E402

PRESET = "content_style"
DIM = 4
LR = 3e-3
MICRO = 2  # samples per rank per micro-batch
WORLD = 2
MODES = {  # mode: (optimizer steps, gradient accumulation steps, gradient checkpointing)
    "plain": (2, 1, False),
    "accumulation": (2, 2, False),
    "checkpointing": (2, 1, True),
}


def dataset(mode: str):
    """Every sample of the run and its target, the same in every process.

    Sample block ``k * WORLD + r`` (``MICRO`` samples) is micro-step ``k`` of rank ``r``.
    """
    steps, accum, _ = MODES[mode]
    n = steps * accum * WORLD * MICRO
    batch = random_inputs(TINY, batch=n, seed=7)
    target = teacher_target(build_unet(TINY, seed=0), PRESET, batch)
    return batch, target


def _slice(batch, target, start: int, stop: int):
    return tuple(v[start:stop] for v in batch), target[start:stop]


def build(checkpointing: bool):
    """UNet and network after sd-scripts' steps 1-6 (create, apply_to, freeze, optimizer)."""
    unet = build_unet(TINY, seed=0)
    torch.manual_seed(0)
    network = blora_network.create_network(1.0, DIM, 1, None, None, unet, neuron_dropout=None, preset=PRESET, dropout=None)
    network.apply_to(None, unet, False, True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        network.enable_gradient_checkpointing()
    unet.requires_grad_(False)
    groups, _ = network.prepare_optimizer_params(None, LR, LR)
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=1e-2)
    return unet, network, optimizer


def _grads(network) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in network.named_parameters() if p.grad is not None}


def train_reference(mode: str, checkpointing=None) -> dict:
    """One process, every rank's samples of an optimizer step in one batch."""
    steps, accum, mode_checkpointing = MODES[mode]
    checkpointing = mode_checkpointing if checkpointing is None else checkpointing
    batch, target = dataset(mode)
    unet, network, optimizer = build(checkpointing)
    unet.train() if checkpointing else unet.eval()
    network.prepare_grad_etc(None, unet)
    network.on_epoch_start(None, unet)
    per_step = accum * WORLD * MICRO
    first = None
    for s in range(steps):
        (x, t, c, y), tgt = _slice(batch, target, s * per_step, (s + 1) * per_step)
        F.mse_loss(unet(x, t, c, y), tgt).backward()
        if first is None:
            first = _grads(network)
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"state": {k: v.detach().clone() for k, v in network.state_dict().items()}, "first_grads": first}


def all_reduce_network(accelerator, network) -> None:
    """sd-scripts' ``NetworkTrainer.all_reduce_network``: "sync DDP grad manually"."""
    for param in network.parameters():
        if param.grad is not None:
            param.grad = accelerator.reduce(param.grad, reduction="mean")


def train_ddp(mode: str, out: Path) -> None:
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel

    steps, accum, checkpointing = MODES[mode]
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == WORLD, world
    batch, target = dataset(mode)
    unet, network, optimizer = build(checkpointing)
    initial = {k: v.detach().clone() for k, v in network.state_dict().items()}

    # sd-scripts also calls accelerator.prepare(unet) on the frozen UNet: on GPUs accelerate leaves
    # a module without trainable parameters unwrapped; its multi-CPU branch would wrap it and
    # DDP refuses that, so on the CPU the UNet is simply not prepared (the same end state).
    network, optimizer = accelerator.prepare(network, optimizer)
    unwrapped = accelerator.unwrap_model(network)
    unet.train() if checkpointing else unet.eval()
    unwrapped.prepare_grad_etc(None, unet)
    unwrapped.on_epoch_start(None, unet)

    record = {
        "rank": rank,
        "network_is_ddp": isinstance(network, DistributedDataParallel),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "checkpointed_modules": sum(bool(getattr(m, "gradient_checkpointing", False)) for m in unet.modules()),
        "initial": initial,
        "losses": [],
        "sync_flags": [],
    }
    for k in range(steps * accum):
        (x, t, c, y), tgt = _slice(batch, target, (k * world + rank) * MICRO, (k * world + rank + 1) * MICRO)
        with accelerator.accumulate(network):
            unwrapped.on_step_start(None, unet)
            loss = F.mse_loss(unet(x, t, c, y), tgt)
            record["losses"].append(float(loss.detach()))
            accelerator.backward(loss)
            record["sync_flags"].append(bool(accelerator.sync_gradients))
            if accelerator.sync_gradients:
                if "first_local_grads" not in record:
                    record["first_local_grads"] = _grads(unwrapped)
                all_reduce_network(accelerator, network)
                if "first_grads" not in record:
                    record["first_grads"] = _grads(unwrapped)
                accelerator.clip_grad_norm_(unwrapped.get_trainable_params(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    accelerator.wait_for_everyone()
    folder = out / mode
    folder.mkdir(parents=True, exist_ok=True)
    record["saved"] = False
    if accelerator.is_main_process:
        accelerator.unwrap_model(network).save_weights(
            str(folder / "blora.safetensors"), torch.float32, {"ss_network_module": "blora_network", "test_written_by_rank": str(rank)}
        )
        record["saved"] = True
    record["state"] = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
    torch.save(record, folder / f"rank{rank}.pt")
    accelerator.wait_for_everyone()


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    torch.set_num_threads(1)
    for mode in argv[1:]:
        train_ddp(mode, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
