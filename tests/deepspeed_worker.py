"""One rank of a B-LoRA training run driven the way sd-scripts' ``train_network.py --deepspeed`` drives it,
on the CPU (DeepSpeed's CPU accelerator, gloo).

Launched by ``tests/test_deepspeed.py``::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/deepspeed_worker.py OUT_DIR MODE...

MODE is ``zero0``, ``zero1``, ``zero2`` (one optimizer step per batch) or ``zero2-accumulation``
(2 micro-batches per step). Each rank dumps ``OUT_DIR/MODE/rank<R>.pt``; rank 0 writes
``OUT_DIR/MODE/blora.safetensors``. ``zero3-unguarded`` skips our refusal (``prepare_network``) and
records how the first step fails, which is why prepare_network refuses ZeRO-3. The data, the model and the single-process reference are
``ddp_worker``'s (same seeds, both ranks' samples concatenated in one process).

What sd-scripts does and this worker follows (library/deepspeed_utils.py, train_network.py, main):
``DeepSpeedPlugin(zero_stage, gradient_accumulation_steps, gradient_clipping=max_grad_norm, ...)`` with
``train_micro_batch_size_per_gpu`` and ``train_batch_size`` set, ``set_mixed_precision``;
``Accelerator(..., deepspeed_plugin=plugin)`` with ``InitProcessGroupKwargs(backend="gloo")`` (what
sd-scripts passes on a host with several devices and no CUDA); the UNet and the network in one
wrapper module (:class:`DeepSpeedWrapper`, a stand-in written from the facts: an ``nn.Module``
whose ``models`` ModuleDict holds each model, forwards left alone without mixed precision);
``accelerator.prepare(wrapper, optimizer)``; the forward through the UNet; ``accelerate.accumulate
(wrapper)``; ``accelerator.backward`` (DeepSpeed reduces, clips and steps there); the manual
all-reduce of ``network.parameters()``; ``clip_grad_norm_``; ``optimizer.step``/``zero_grad``; the
plain network (never wrapped) saves on the main process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_worker as base  # noqa: E402  (data, model, reference)

MODES = {  # mode: (ZeRO stage, ddp_worker mode giving steps and accumulation)
    "zero0": (0, "plain"),
    "zero1": (1, "plain"),
    "zero2": (2, "plain"),
    "zero2-accumulation": (2, "accumulation"),
    "zero3-unguarded": (3, "plain"),
}


class DeepSpeedWrapper(torch.nn.Module):
    """sd-scripts' wrapper, as its facts say: one nn.Module holding every trained model in a ModuleDict."""

    def __init__(self, **models) -> None:
        super().__init__()
        self.models = torch.nn.ModuleDict()
        for key, model in models.items():
            assert isinstance(model, torch.nn.Module), f"{key} is {type(model)}"
            self.models.update(torch.nn.ModuleDict({key: model}))


def skip_shared_memory_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory op at start (about 90 s on 2 cores), used only
    by its inference all-reduce; training collectives go through torch.distributed (gloo) either way."""
    import deepspeed.ops

    ops = dict(deepspeed.ops.__compatible_ops__)
    ops["deepspeed_shm_comm"] = False
    deepspeed.ops.__compatible_ops__ = ops


def make_accelerator(stage: int, accumulation: int):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=accumulation, gradient_clipping=1.0)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = base.MICRO
    plugin.deepspeed_config["train_batch_size"] = base.MICRO * accumulation * int(os.environ["WORLD_SIZE"])
    plugin.set_mixed_precision("no")
    return Accelerator(gradient_accumulation_steps=accumulation, mixed_precision="no", deepspeed_plugin=plugin,
                       kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])


def parameter_record(wrapper, unet, network, optimizer_groups) -> dict:
    ids = lambda params: [id(p) for p in params]  # noqa: E731
    network_ids = ids(network.parameters())
    in_groups = [i for g in optimizer_groups for i in ids(g["params"])]
    every = list(wrapper.named_parameters(remove_duplicate=False))
    return {
        "network_params": len(network_ids),
        "group_params_equal_network": sorted(in_groups) == sorted(network_ids),
        "on_unet_tree": len(set(network_ids) & set(ids(unet.parameters()))),
        "registered_twice": len(every) - len({id(p) for _, p in every}),
        "network_in_wrapper": set(network_ids) <= {id(p) for _, p in every},
    }


def train(mode: str, out: Path) -> None:
    from accelerate.state import AcceleratorState, GradientState

    stage, data_mode = MODES[mode]
    steps, accum, _ = base.MODES[data_mode]
    accelerator = make_accelerator(stage, accum)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == base.WORLD, world
    batch, target = base.dataset(data_mode)
    unet, network, optimizer = base.build(False)
    if mode != "zero3-unguarded":
        network.prepare_network(_args(stage))
    initial = {k: v.detach().clone() for k, v in network.state_dict().items()}
    groups = [dict(g) for g in optimizer.param_groups]

    wrapper = DeepSpeedWrapper(unet=unet, network=network)
    record = {"rank": rank, "params": parameter_record(wrapper, unet, network, groups), "initial": initial, "losses": []}
    wrapper, optimizer = accelerator.prepare(wrapper, optimizer)
    record["engine"] = type(wrapper).__name__
    record["zero_stage"] = int(wrapper.zero_optimization_stage())
    record["unwrapped_is_network"] = accelerator.unwrap_model(network) is network
    unet.eval()
    network.prepare_grad_etc(None, unet)
    network.on_epoch_start(None, unet)
    try:
        _steps(accelerator, wrapper, optimizer, unet, network, batch, target, steps * accum, record)
    except Exception as e:  # noqa: BLE001 - zero3-unguarded records its failure
        if mode != "zero3-unguarded":
            raise
        record["error"] = f"{type(e).__name__}: {e}"
    accelerator.wait_for_everyone()
    folder = out / mode
    folder.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process and "error" not in record:
        accelerator.unwrap_model(network).save_weights(str(folder / "blora.safetensors"), torch.float32,
                                                       {"ss_network_module": "blora_network"})
    record["state"] = {k: v.detach().clone() for k, v in network.state_dict().items()}
    torch.save(record, folder / f"rank{rank}.pt")
    accelerator.wait_for_everyone()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _steps(accelerator, wrapper, optimizer, unet, network, batch, target, micro_steps, record) -> None:
    rank, world = accelerator.process_index, accelerator.num_processes
    for k in range(micro_steps):
        start = (k * world + rank) * base.MICRO
        (x, t, c, y), tgt = base._slice(batch, target, start, start + base.MICRO)
        with accelerator.accumulate(wrapper):
            network.on_step_start(None, unet)
            loss = F.mse_loss(unet(x, t, c, y), tgt)
            record["losses"].append(float(loss.detach()))
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                base.all_reduce_network(accelerator, network)
                accelerator.clip_grad_norm_(network.get_trainable_params(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _args(stage: int):
    import argparse

    return argparse.Namespace(deepspeed=True, zero_stage=stage, fp8_base=False, network_train_unet_only=True)


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    torch.set_num_threads(1)
    skip_shared_memory_build()
    for mode in argv[1:]:
        train(mode, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
