"""The whole sd-scripts call sequence, in order, for every built-in preset, on real LyCORIS."""

from __future__ import annotations

import json

import pytest
import torch

import blora_network
from blora_network.sdxl.blocks import role_of_kohya_name
from blora_network.tools.demo import teacher_target
from blora_network.files.safefile import read_metadata
from blora_network.sdxl.unet import TINY, build_unet

PRESETS = {
    "content": {"content": 80},
    "style": {"style": 80},
    "content_style": {"content": 80, "style": 80},
    "layout": {"layout": 80},
    "content_style_layout": {"content": 80, "style": 80, "layout": 80},
}
SD_METADATA = {  # a few of the ~60 keys sd-scripts hands to save_weights
    "ss_network_module": "blora_network",
    "ss_network_dim": "8",
    "ss_network_alpha": "1.0",
    "ss_network_args": json.dumps({"preset": "content_style", "dropout": None}),
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_steps": "3",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
}


def _unet_state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def _train(network, unet, batch, steps=4, lr=3e-3, apply=True, target=None):
    """sd-scripts' steps 3-10; the target must be computed before apply_to (it copies the UNet)."""
    x, t, ctx, y = batch
    if target is None:
        target = teacher_target(unet, network.preset.name, batch)
    if apply:
        network.apply_to(None, unet, False, True)
    groups, descriptions = network.prepare_optimizer_params(None, lr, lr)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4, betas=(0.9, 0.999), eps=1e-8)
    unet.requires_grad_(False)
    network.prepare_grad_etc(None, unet)
    network.on_epoch_start(None, unet)
    losses = []
    for _ in range(steps):
        network.on_step_start(None, unet)
        loss = torch.nn.functional.mse_loss(unet(x, t, ctx, y), target)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses, descriptions


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_full_training_sequence(preset, tmp_path, batch):
    unet = build_unet(TINY, seed=0)
    before = _unet_state(unet)
    network = blora_network.create_network(1.0, "8", "1", None, None, unet, neuron_dropout=None, preset=preset, dropout=None)
    assert {r: s["modules"] for r, s in network.block_summary().items()} == PRESETS[preset]
    target = teacher_target(unet, preset, batch)
    network.apply_to(None, unet, False, True)
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    assert len(initial) == 3 * sum(PRESETS[preset].values())  # lora_down, lora_up, alpha per module
    losses, descriptions = _train(network, unet, batch, apply=False, target=target)
    assert descriptions == [f"unet {r}" for r in PRESETS[preset]]
    assert losses[-1] < losses[0]
    # the frozen UNet is bit-identical; every adapter of the preset's blocks moved
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    moved = {role_of_kohya_name(k) for k, v in network.state_dict().items() if k.endswith("lora_up.weight") and not torch.equal(v, initial[k])}
    assert moved == set(PRESETS[preset])

    # save: an ordinary kohya LoRA file, sd-scripts' metadata kept, effective alpha recorded
    path = tmp_path / "b.safetensors"
    network.save_weights(str(path), torch.float32, dict(SD_METADATA))
    meta = read_metadata(path)
    assert meta["ss_network_alpha"] == "8.0" and meta["ss_network_dim"] == "8"
    assert meta["ss_steps"] == "3" and meta["modelspec.architecture"].endswith("/lora")
    assert json.loads(meta["blora_blocks"]).keys() == PRESETS[preset].keys()
    assert meta["blora_preset"] == preset and len(meta["sshs_model_hash"]) == 64

    x, t, ctx, y = batch
    with torch.no_grad():
        trained_out = unet(x, t, ctx, y)

    # load into a fresh network on a fresh UNet: identical outputs
    unet2 = build_unet(TINY, seed=0)
    net2 = blora_network.create_network(1.0, "8", "1", None, None, unet2, preset=preset)
    net2.apply_to(None, unet2, False, True)
    net2.load_weights(str(path))
    with torch.no_grad():
        assert torch.equal(unet2(x, t, ctx, y), trained_out)

    # inference scripts: create_network_from_weights(for_inference=True), two-argument apply_to
    unet3 = build_unet(TINY, seed=0)
    net3, sd = blora_network.create_network_from_weights(1.0, str(path), None, None, unet3, for_inference=True)
    net3.apply_to(None, unet3)
    net3.load_state_dict(sd, False)
    with torch.no_grad():
        assert torch.allclose(unet3(x, t, ctx, y), trained_out, atol=1e-6)


def test_resume_and_dim_from_weights(tmp_path, batch):
    unet = build_unet(TINY, seed=0)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content_style")
    _train(network, unet, batch, steps=2)
    path = tmp_path / "first.safetensors"
    network.save_weights(str(path), None, {})
    saved = {k: v.clone() for k, v in network.state_dict().items()}

    # --dim_from_weights: (network, weights_sd), then the trainer still calls load_weights
    unet2 = build_unet(TINY, seed=0)
    net2, weights = blora_network.create_network_from_weights(1, str(path), None, None, unet2, preset="content_style")
    assert set(weights) == set(saved)
    assert {r: s["rank"] for r, s in net2.block_summary().items()} == {"content": 4, "style": 4}
    net2.apply_to(None, unet2, False, True)
    net2.load_weights(str(path))
    assert all(torch.equal(net2.state_dict()[k], saved[k]) for k in saved)
    # and training continues from exactly those weights
    x, t, ctx, y = batch
    with torch.no_grad():
        assert torch.equal(unet2(x, t, ctx, y), unet(x, t, ctx, y))
    losses, _ = _train(net2, unet2, batch, steps=3, apply=False, target=teacher_target(build_unet(TINY, seed=0), "content_style", batch))
    assert losses[-1] < losses[0]


def test_base_weights_merge(tmp_path, batch):
    """--base_weights: create_network_from_weights(for_inference=True) then merge_to bakes dW in."""
    unet = build_unet(TINY, seed=0)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content")
    _train(network, unet, batch, steps=2)
    path = tmp_path / "base.safetensors"
    network.save_weights(str(path), None, {})
    x, t, ctx, y = batch
    with torch.no_grad():
        adapted = unet(x, t, ctx, y)

    unet2 = build_unet(TINY, seed=0)
    module, sd = blora_network.create_network_from_weights(0.5, str(path), None, None, unet2, for_inference=True)
    module.merge_to(None, unet2, sd, torch.float32, "cpu")
    # the same file applied unmerged at multiplier 0.5 gives the same output
    unet3 = build_unet(TINY, seed=0)
    net3, sd3 = blora_network.create_network_from_weights(0.5, str(path), None, None, unet3, for_inference=True)
    net3.apply_to(None, unet3)
    plain = build_unet(TINY, seed=0)
    with torch.no_grad():
        merged, applied, base = unet2(x, t, ctx, y), unet3(x, t, ctx, y), plain(x, t, ctx, y)
    assert torch.allclose(merged, applied, atol=1e-5)
    assert not torch.allclose(merged, base, atol=1e-4) and not torch.allclose(merged, adapted, atol=1e-4)
    # merging changed only the preset's layers of the UNet
    changed = {k for k, v in unet2.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert changed and all(k.startswith("output_blocks.0.1.") and ".attn" in k for k in changed)


class InferSdxlUNet2DConditionModel:
    """sd-scripts' inference wrapper: not an nn.Module, delegates to .delegate."""

    def __init__(self, original):
        self.delegate = original

    def __getattr__(self, name):
        return getattr(self.delegate, name)


def test_inference_wrapper_is_unwrapped(tmp_path, batch):
    unet = build_unet(TINY, seed=0)
    network = blora_network.create_network(1.0, 4, 1, None, None, InferSdxlUNet2DConditionModel(unet), preset="style")
    network.apply_to(None, InferSdxlUNet2DConditionModel(unet))
    assert len(network.unet_loras) == 80


def test_prepare_optimizer_params_call_conventions():
    unet = build_unet(TINY, seed=0)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content_style", style_lr="5e-5")
    network.apply_to(None, unet, False, True)
    groups, desc = network.prepare_optimizer_params(None, 1e-4, 1e-3)  # new: 3 args
    assert [g["lr"] for g in groups] == [1e-4, 5e-5] and desc == ["unet content", "unet style"]
    groups, desc = network.prepare_optimizer_params(None, None)  # old fallback: 2 args
    assert [g.get("lr") for g in groups] == [None, 5e-5]
    groups, desc = network.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-3)
    assert desc == ["unet content", "unet style"]
    with pytest.raises(ValueError) as err:  # a TypeError inside must not be swallowed and retried
        network.prepare_optimizer_params(None, [1e-4], 1e-3)
    assert not isinstance(err.value, TypeError)


def test_sd_scripts_v087_gets_a_plain_list(tmp_path):
    """v0.8.7's train_network.py passes the result straight to the optimizer: it must be a list."""
    unet = build_unet(TINY, seed=0)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content")
    network.apply_to(None, unet, False, True)
    old = tmp_path / "train_network.py"
    old.write_text(
        "def train(network, args):\n"
        "    trainable_params = network.prepare_optimizer_params(args[0], args[1], args[2])\n"
        "    return trainable_params\n"
    )
    new = tmp_path / "sdxl_train_network_new" / "train_network.py"
    new.parent.mkdir()
    new.write_text(
        "def train(network, args):\n"
        "    results = network.prepare_optimizer_params(args[0], args[1], args[2])\n"
        "    lr_descriptions = None\n"
        "    return results\n"
    )
    for path, expect_tuple in ((old, False), (new, True)):
        scope = {}
        exec(compile(path.read_text(), str(path), "exec"), scope)
        result = scope["train"](network, (None, 1e-4, 1e-4))
        assert isinstance(result, tuple) is expect_tuple
        groups = result[0] if expect_tuple else result
        torch.optim.AdamW(groups)


def test_multiplier_max_norm_and_hooks(batch):
    unet = build_unet(TINY, seed=0)
    x, t, ctx, y = batch
    with torch.no_grad():
        base = unet(x, t, ctx, y)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content_style")
    _train(network, unet, batch, steps=2)
    network.set_multiplier(0.0)
    with torch.no_grad():
        assert torch.allclose(unet(x, t, ctx, y), base, atol=1e-6)
    network.set_multiplier(1.0)
    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(1e-6, "cpu")
    assert scaled > 0 and max_norm > 0
    for name in ("update_grad_norms", "update_norms", "weight_norms", "grad_norms", "combined_weight_norms"):
        assert not hasattr(network, name), name  # sd-scripts would call these if present
    assert isinstance(network, torch.nn.Module)
    assert not any(n.startswith("lora_") for n, _ in unet.named_children())  # adapters are not UNet submodules
