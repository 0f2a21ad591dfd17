"""``blora-network demo``: a B-LoRA trained end to end in under a minute, with no download.

It makes the calls sd-scripts' ``train_network.py`` makes, in the same order, on a small
UNet with sd-scripts' exact SDXL module names, so a user can see what the network trains
and what it writes before spending GPU hours. :func:`train` is also what the tests drive.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the CLI builds its parser from this module: no torch import for --help
    import torch

__all__ = ["DemoResult", "teacher_target", "train"]


@dataclass
class DemoResult:
    """What a demo run trained and wrote."""

    preset: str
    device: str
    dim: int
    steps: int
    blocks: dict = field(default_factory=dict)
    """Per role: modules, parameters, rank, alpha."""
    trainable_parameters: int = 0
    loss_before: float = 0.0
    loss_after: float = 0.0
    file: Optional[str] = None
    file_bytes: int = 0
    seconds: float = 0.0
    threads: Optional[int] = None
    """torch's CPU threads during the run (None on a GPU); see :func:`choose_threads`."""
    torch: str = ""
    """torch's version, which says its build (``+cpu``, ``+cu126``)."""
    note: Optional[str] = None
    """Advice on the install (a CUDA torch on a machine without a GPU), if any."""


def teacher_target(unet: torch.nn.Module, preset: str, batch: tuple, *, seed: int = 0, rank: int = 2, strength: float = 0.5) -> torch.Tensor:
    """The UNet's output after a random rank-``rank`` change to exactly the preset's layers.

    A target the adapter can reach, so a falling loss shows it learns, not that it fits noise.
    Call it before ``apply_to`` (it copies the model).
    """
    import torch

    from blora_network.network.presets import load_preset

    teacher = copy.deepcopy(unet)
    selected = set(load_preset(preset).select((n, type(m).__name__) for n, m in teacher.named_modules() if n))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in teacher.named_modules():
            if name in selected:
                up = torch.randn(module.out_features, rank, generator=gen)
                down = torch.randn(rank, module.in_features, generator=gen)
                delta = strength * (up @ down) / math.sqrt(module.in_features * rank)
                module.weight += delta.to(module.weight)
        return teacher(*batch)


def resolve_device(name: str) -> "torch.device":
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda``, ``cuda:N``, ``mps``: a device that is there.

    Anything else, or a device this torch cannot use, is a :class:`DeviceError` naming the devices
    there are (a CPU-only torch says so, with the line that installs a CUDA build).
    """
    import torch

    from blora_network.errors import DeviceError

    there = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        there.append("mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name}: not a device name; the devices here are: {', '.join(there)} "
                          "(or auto)") from None
    wanted = str(device) if device.index is not None or device.type != "cuda" else "cuda:0"
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build, but no GPU is visible" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"--device {name}: this torch ({torch.__version__}) is {build}; the devices here are: "
                          f"{', '.join(there)}")
    if wanted not in there:
        raise DeviceError(f"--device {name}: not available; the devices here are: {', '.join(there)}")
    return device


def choose_threads(device: "torch.device", threads: Optional[int]) -> Optional[int]:
    """torch's CPU threads for the demo: one unless told otherwise.

    The tiny model's ops take microseconds; on more threads each one waits for OpenMP's hand-off,
    which costs milliseconds as soon as other jobs hold the cores (a 30-step run took 187-402 s
    with torch's default threads on a busy machine, 4 s with one). None on a GPU: it is not used.
    """
    if device.type != "cpu":
        return None
    return 1 if threads is None else threads


def _torch_build_note(device: "torch.device") -> Optional[str]:
    import torch

    if device.type == "cpu" and torch.version.cuda and not torch.cuda.is_available():
        return (f"this torch ({torch.__version__}) is a CUDA {torch.version.cuda} build, but no GPU is visible; "
                "on a CPU-only machine the CPU build is much smaller: "
                "pip install torch --index-url https://download.pytorch.org/whl/cpu")
    return None


def train(
    *,
    preset: str = "content_style",
    dim: int = 8,
    steps: int = 30,
    lr: float = 1e-3,
    device: str = "auto",
    output: Optional[str] = "blora_demo.safetensors",
    force: bool = False,
    threads: Optional[int] = None,
    seed: int = 0,
    network_args: Optional[dict] = None,
    progress: bool = False,
) -> DemoResult:
    """Train a B-LoRA on the tiny SDXL-shaped UNet with synthetic data, the way sd-scripts does.

    The batch is fixed and the target is what the UNet outputs after a random low-rank change
    to the preset's layers (:func:`teacher_target`), so the loss has a reachable minimum. The
    output path is checked before any training (an existing file needs ``force``).
    """
    import torch

    from blora_network.files.measure import torch_threads
    from blora_network.files.safefile import SAFETENSORS, check_output_path

    started = time.perf_counter()
    dev = resolve_device(device)
    if output:
        check_output_path(output, overwrite=force, suffixes=SAFETENSORS)
    n_threads = choose_threads(dev, threads)
    with torch_threads(n_threads) if n_threads else contextlib.nullcontext():
        result = _train(preset, dim, steps, lr, dev, seed, network_args or {}, progress, output)
    result.threads = n_threads
    result.torch = torch.__version__
    result.note = _torch_build_note(dev)
    result.seconds = time.perf_counter() - started
    return result


def _train(preset, dim, steps, lr, dev, seed, network_args, progress, output) -> DemoResult:
    import torch

    from blora_network import create_network
    from blora_network.sdxl.unet import TINY, build_unet, random_inputs

    torch.manual_seed(seed)
    unet = build_unet(TINY, seed=seed).to(dev)
    x, t, ctx, y = random_inputs(TINY, batch=2, seed=seed, device=dev)
    target = teacher_target(unet, preset, (x, t, ctx, y), seed=seed + 1)

    args = {"preset": preset, **network_args}
    # 1. create_network, exactly as train_network.py calls it (values are strings there).
    network = create_network(1.0, dim, float(dim), None, None, unet, neuron_dropout=None, **{k: str(v) for k, v in args.items()})
    # 3. apply_to(text_encoder, unet, train_text_encoder, train_unet): --network_train_unet_only.
    network.apply_to(None, unet, False, True)
    # 6. optimizer groups, then AdamW as the README recommends.
    groups, _descriptions = network.prepare_optimizer_params(None, lr, lr)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4, betas=(0.9, 0.999), eps=1e-8)
    # 8. the trainer freezes the UNet; the adapter lives outside it.
    unet.requires_grad_(False)
    network.prepare_grad_etc(None, unet)
    network.on_epoch_start(None, unet)

    def loss_now() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(unet(x, t, ctx, y), target))

    loss_before = loss_now()
    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="demo training", unit="step")
    for _ in iterator:
        network.on_step_start(None, unet)
        loss = torch.nn.functional.mse_loss(unet(x, t, ctx, y), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(network.get_trainable_params()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = DemoResult(
        preset=preset, device=str(dev), dim=dim, steps=steps, blocks=network.block_summary(),
        trainable_parameters=sum(p.numel() for p in network.parameters() if p.requires_grad),
        loss_before=loss_before, loss_after=loss_now(),
    )
    if output:
        network.save_weights(output, torch.bfloat16, _metadata(dim, steps, args, output))
        result.file = str(output)
        result.file_bytes = Path(output).stat().st_size
    return result


def _metadata(dim: int, steps: int, args: dict, output: str) -> dict[str, str]:
    """What sd-scripts would hand ``save_weights``, for a model that is not SDXL and says so."""
    from blora_network.files.lorafile import DEMO_TEXT
    from blora_network.files.metadata import KEY_DEMO

    return {
        "ss_network_module": "blora_network",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(dim)),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": "blora_demo_tiny_unet",
        "ss_steps": str(steps),
        "ss_output_name": Path(output).stem,
        "modelspec.architecture": "blora-demo-tiny-unet/lora",
        KEY_DEMO: DEMO_TEXT,
    }
