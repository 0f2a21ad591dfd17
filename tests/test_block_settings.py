"""Per-block rank, alpha and learning rate in one network (issue 6, first half)."""

from __future__ import annotations

import json

import pytest
import torch

import blora_network
from blora_network.files.algos import delta_weight
from blora_network.sdxl.blocks import role_of_kohya_name
from blora_network.files.safefile import load_tensors, read_metadata
from blora_network.sdxl.unet import TINY, build_unet


def make(unet, dim=8, **kwargs):
    return blora_network.create_network(1.0, dim, 1, None, None, unet, **kwargs)


def test_per_block_dims_and_alphas(unet, tmp_path):
    network = make(unet, preset="content_style_layout", content_dim="4", style_dim="16", layout_alpha="2")
    summary = network.block_summary()
    assert (summary["content"]["rank"], summary["content"]["alpha"]) == (4, 4.0)  # alpha follows the block's dim
    assert (summary["style"]["rank"], summary["style"]["alpha"]) == (16, 16.0)
    assert (summary["layout"]["rank"], summary["layout"]["alpha"]) == (8, 2.0)
    network.apply_to(None, unet, False, True)
    with torch.no_grad():  # lora_up starts at zero: give every block a change to keep
        for m in network.unet_loras:
            m.lora_up.weight.normal_(std=0.1)
    path = tmp_path / "dims.safetensors"
    network.save_weights(str(path), None, {})
    tensors = load_tensors(path)
    ranks = {role_of_kohya_name(k): v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")}
    assert ranks == {"content": 4, "style": 16, "layout": 8}
    meta = read_metadata(path)
    assert json.loads(meta["blora_block_dims"]) == {"content": 4, "style": 16, "layout": 8}
    # the file stores one alpha, the largest rank's (issue 14); each block keeps its trained change
    assert json.loads(meta["blora_block_alphas"]) == {"content": 16.0, "style": 16.0, "layout": 16.0}
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "16.0"
    for m in network.unet_loras:
        saved = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(m.lora_name + ".")}
        trained = delta_weight("lora", {k: v.detach() for k, v in m.state_dict().items()})
        assert torch.allclose(delta_weight("lora", saved), trained, rtol=1e-6, atol=1e-12), m.lora_name


def test_per_block_lrs_make_groups_with_descriptions(unet):
    network = make(unet, preset="content_style_layout", content_lr="1e-4", style_lr="3e-5")
    network.apply_to(None, unet, False, True)
    groups, descriptions = network.prepare_optimizer_params(None, 2e-4, 1e-3)
    assert descriptions == ["unet content", "unet style", "unet layout"]
    assert [g["lr"] for g in groups] == [1e-4, 3e-5, 2e-4]  # layout falls back to unet_lr
    assert [len(g["params"]) for g in groups] == [160, 160, 160]


def test_zero_dim_or_lr_turns_a_block_off(unet, tmp_path, batch):
    network = make(unet, preset="content_style_layout", layout_dim="0", style_lr="0")
    assert set(network.block_summary()) == {"content"}
    network.apply_to(None, unet, False, True)
    network.save_weights(str(tmp_path / "c.safetensors"), None, {})
    roles = {role_of_kohya_name(k) for k in load_tensors(tmp_path / "c.safetensors")}
    assert roles == {"content"}


def test_lr_zero_block_unchanged_after_two_steps(batch):
    """A block given lr 0 through a group stays bit-identical while the others train."""
    unet = build_unet(TINY, seed=0)
    network = make(unet, preset="content_style")
    network.apply_to(None, unet, False, True)
    groups, descriptions = network.prepare_optimizer_params(None, 1e-2, 1e-2)
    groups[descriptions.index("unet style")]["lr"] = 0.0
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    x, t, ctx, y = batch
    unet.requires_grad_(False)
    for _ in range(2):
        unet(x, t, ctx, y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = network.state_dict()
    changed = {role_of_kohya_name(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"content"}


def test_preset_file_carries_the_recipe(unet, tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(
        "enable_conv = false\nunet_target_module = []\n"
        "unet_target_name = ['^(?!.*(ff\\.net|proj)).*output_blocks\\.[01]\\.1\\..*$']\n"
        "[blora]\ncontent_dim = 2\nstyle_dim = 6\nstyle_lr = 5e-5\n"
    )
    network = make(unet, preset=str(path))
    summary = network.block_summary()
    assert (summary["content"]["rank"], summary["style"]["rank"]) == (2, 6)
    network.apply_to(None, unet, False, True)
    _, descriptions = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    groups, _ = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]
    # network_args override the file
    assert make(build_unet(TINY), preset=str(path), style_dim="3").block_summary()["style"]["rank"] == 3


@pytest.mark.parametrize("bad", [{"content_dim": "-1"}, {"style_lr": "-1e-4"}, {"layout_dim": "1.5"}])
def test_bad_block_settings(unet, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        make(unet, preset="content_style_layout", **bad)
