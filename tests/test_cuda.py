"""The network on CUDA: mixed precision, --full_bf16, --fp8_base, save/load round trip.

Skipped without a CUDA device (CI has none); run on a GPU machine with ``pytest -m cuda``.
"""

from __future__ import annotations

import pytest
import torch

import blora_network
from blora_network.tools.demo import teacher_target
from blora_network.sdxl.unet import TINY, build_unet, random_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _setup(preset="content_style", **kwargs):
    unet = build_unet(TINY, seed=0)
    batch = random_inputs(TINY, batch=2, seed=1)
    target = teacher_target(unet, preset, batch).cuda()
    network = blora_network.create_network(1.0, 8, 8, None, None, unet, preset=preset, **kwargs)
    network.apply_to(None, unet, False, True)
    unet.cuda().requires_grad_(False)
    network.cuda()
    return unet, network, tuple(v.cuda() for v in batch), target


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_training_on_cuda(dtype):
    unet, network, (x, t, ctx, y), target = _setup()
    unet.to(dtype)
    groups, _ = network.prepare_optimizer_params(None, 3e-3, 3e-3)
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=dtype):
            loss = torch.nn.functional.mse_loss(unet(x, t, ctx, y).float(), target)
        losses.append(float(loss))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in network.parameters())


def test_full_bf16_on_cuda():
    unet, network, (x, t, ctx, y), target = _setup(preset="style")
    unet.to(torch.bfloat16)
    network.to(torch.bfloat16)
    out = unet(x.bfloat16(), t, ctx.bfloat16(), y.bfloat16())
    out.float().mean().backward()
    assert all(p.grad is not None for p in network.parameters())


def test_fp8_base_on_cuda():
    unet, network, (x, t, ctx, y), target = _setup()
    for module in unet.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.float8_e4m3fn)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = unet(x, t, ctx, y)
    out.float().pow(2).mean().backward()
    assert any(p.grad.abs().sum() > 0 for p in network.parameters())


def test_save_on_cuda_load_on_cpu(tmp_path):
    unet, network, (x, t, ctx, y), _ = _setup()
    for m in network.unet_loras:
        torch.nn.init.normal_(m.lora_up.weight, std=0.01)
    with torch.no_grad():
        gpu_out = unet(x, t, ctx, y).cpu()
    path = tmp_path / "gpu.safetensors"
    network.save_weights(str(path), torch.float32, {})
    cpu_unet = build_unet(TINY, seed=0)
    net2, sd = blora_network.create_network_from_weights(1.0, str(path), None, None, cpu_unet, for_inference=True)
    net2.apply_to(None, cpu_unet)
    with torch.no_grad():
        cpu_out = cpu_unet(*(v.cpu() for v in (x, t, ctx, y)))
    assert torch.allclose(cpu_out, gpu_out, atol=1e-3)
