"""The network's own rules: alpha = dim, UNet-only, strict network_args, zero-match errors,
isolation from LyCORIS's class state, safe loading, dtypes and forward modes."""

from __future__ import annotations

import argparse
import logging
import os
import pickle

import pytest
import torch
import torch.nn as nn

import blora_network
import lycoris.kohya as lycoris_kohya
from blora_network.errors import LoraFileError, NetworkArgsError, PresetError
from blora_network.network.options import parse_bool
from blora_network.files.safefile import read_metadata
from blora_network.sdxl.unet import TINY, build_unet


def make(unet, dim=4, network_alpha=1, **kwargs):
    return blora_network.create_network(1.0, dim, network_alpha, None, None, unet, **kwargs)


def test_alpha_equals_dim_and_log_line(unet, caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="blora_network"):
        network = make(unet, dim=16, network_alpha="1")
    assert {float(m.alpha) for m in network.unet_loras} == {16.0}
    assert {m.scale for m in network.unet_loras} == {1.0}
    assert any("--network_alpha 1 overridden" in r.getMessage() and "alpha=<value>" in r.getMessage() for r in caplog.records)
    network.apply_to(None, unet, False, True)
    network.save_weights(str(tmp_path / "a.safetensors"), None, {"ss_network_alpha": "1"})
    assert read_metadata(tmp_path / "a.safetensors")["ss_network_alpha"] == "16.0"


def test_explicit_alpha_in_network_args(unet):
    network = make(unet, dim=16, network_alpha=1, alpha="4")
    assert {float(m.alpha) for m in network.unet_loras} == {4.0}


def test_unet_only_by_default(unet, text_encoders):
    network = blora_network.create_network(1.0, 4, 1, None, text_encoders, unet)
    assert network.text_encoder_loras == []
    assert len(network.unet_loras) == 160


@pytest.mark.parametrize("flag", ["true", "1", "yes"])
def test_text_encoder_opt_in_matches_clip_attention(unet, text_encoders, flag):
    network = blora_network.create_network(1.0, 4, 1, None, text_encoders, unet, train_text_encoder=flag)
    names = [m.lora_name for m in network.text_encoder_loras]
    layers = text_encoders[0].config.num_hidden_layers
    assert len(names) == 2 * layers * 4
    assert {n.split("_")[1] for n in names} == {"te1", "te2"}
    assert all(n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) for n in names)
    network.apply_to(text_encoders, unet, True, True)
    groups, desc = network.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-4)
    assert desc[:2] == ["textencoder 1", "textencoder 2"]
    assert [g["lr"] for g in groups[:2]] == [1e-5, 2e-5]


@pytest.mark.parametrize("flag", ["false", "0", "no", "off"])
def test_false_means_false(unet, text_encoders, flag):
    network = blora_network.create_network(1.0, 4, 1, None, text_encoders, unet, train_text_encoder=flag)
    assert network.text_encoder_loras == []


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"dropout": "abc"}, ["dropout", "not a number"]),
        ({"content_dim": "x"}, ["content_dim", "not an integer"]),
        ({"train_text_encoder": "maybe"}, ["train_text_encoder", "not a boolean"]),
        ({"algo_name": "lora"}, ["unknown network_args key 'algo_name'", "Did you mean 'algo'"]),
        ({"rank_dropout": "1.5"}, ["rank_dropout", "[0, 1)"]),
    ],
)
def test_network_args_are_parsed_strictly(unet, kwargs, words):
    with pytest.raises(NetworkArgsError) as err:
        make(unet, **kwargs)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("dim", [None, 0, -4, "abc", ""])
def test_bad_network_dim(unet, dim):
    with pytest.raises(NetworkArgsError, match="network_dim"):
        make(unet, dim=dim)


def test_parse_bool_table():
    assert [parse_bool("k", v) for v in ("false", "0", "no", "False", "off", "")] == [False] * 6
    assert [parse_bool("k", v) for v in ("true", "1", "yes", "TRUE", "on", True)] == [True] * 6


class _DiffusersNamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_blocks = nn.ModuleList([nn.Module()])
        self.up_blocks[0].attentions = nn.ModuleList([nn.Module()])
        self.up_blocks[0].attentions[0].proj_in = nn.Linear(8, 8)


class _SD1Like(nn.Module):
    """SD1.x as sd-scripts names it: output_blocks 0-2 have no transformer; context 768."""

    def __init__(self):
        super().__init__()
        self.output_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 1)) for _ in range(4)])
        attn = nn.Module()
        attn.to_k = nn.Linear(768, 8)
        self.output_blocks[3].append(nn.Module())
        self.output_blocks[3][1].attn2 = attn


@pytest.mark.parametrize(
    "model, words",
    [(_DiffusersNamed, ["diffusers names", "up_blocks.0.attentions.0"]), (_SD1Like, ["SD1.x", "768"])],
)
def test_pattern_matching_nothing_is_an_error(model, words):
    with pytest.raises(PresetError) as err:
        make(model(), preset="content")
    message = str(err.value)
    assert r"output_blocks\.0\.1" in message and "matches no Linear layer" in message
    for word in words:
        assert word in message


def test_two_networks_and_lycoris_untouched():
    """LyCORIS keeps presets in class attributes: ours must not leak in or out."""
    cls = lycoris_kohya.LycorisNetworkKohya
    attrs = [a for a in vars(cls) if a.isupper()]
    before = {a: getattr(cls, a) for a in attrs}
    plain_before = len(cls(None, build_unet(TINY)).unet_loras)  # LyCORIS's own default targets
    a = make(build_unet(TINY), preset="content")
    b = make(build_unet(TINY), preset="content_style_layout")
    assert {a_: getattr(cls, a_) for a_ in attrs} == before
    assert all(getattr(cls, a_) is before[a_] for a_ in attrs)
    assert len(a.unet_loras) == 80 and len(b.unet_loras) == 240
    assert {m.lora_name for m in a.unet_loras} < {m.lora_name for m in b.unet_loras}
    assert len(cls(None, build_unet(TINY)).unet_loras) == plain_before
    # and a LyCORIS preset set through lycoris.kohya before ours does not reach our network
    lycoris_kohya.create_network(1.0, 2, 1, None, None, build_unet(TINY), preset="attn-only")
    assert len(make(build_unet(TINY), preset="style").unet_loras) == 80
    for attr, value in before.items():  # leave the class as LyCORIS had it for later tests
        setattr(cls, attr, value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/blora_pwned",))


def test_pickle_weights_never_run_code(tmp_path, unet):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"lora_unet_x.lora_down.weight": _Evil()}, f)
    if os.path.exists("/tmp/blora_pwned"):
        os.unlink("/tmp/blora_pwned")
    network = make(unet, preset="content")
    network.apply_to(None, unet, False, True)
    with pytest.raises(LoraFileError, match="refused to load this pickle"):
        network.load_weights(str(path))
    assert not os.path.exists("/tmp/blora_pwned")


def test_weights_of_another_network_refused(tmp_path, unet):
    a = make(build_unet(TINY), preset="layout")
    a.apply_to(None, build_unet(TINY), False, True)
    a.save_weights(str(tmp_path / "layout.safetensors"), None, {})
    b = make(unet, preset="content")
    b.apply_to(None, unet, False, True)
    with pytest.raises(LoraFileError, match="none of its 80 modules belong to this network"):
        b.load_weights(str(tmp_path / "layout.safetensors"))


def test_rank_mismatch_names_dim_from_weights(tmp_path, unet):
    a = make(build_unet(TINY), dim=8, preset="content")
    a.apply_to(None, build_unet(TINY), False, True)
    a.save_weights(str(tmp_path / "r8.safetensors"), None, {})
    b = make(unet, dim=4, preset="content")
    b.apply_to(None, unet, False, True)
    with pytest.raises(LoraFileError, match="--dim_from_weights"):
        b.load_weights(str(tmp_path / "r8.safetensors"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_with_fp32_adapters(dtype, batch):
    unet = build_unet(TINY, seed=0)
    network = make(unet, preset="content_style")
    network.apply_to(None, unet, False, True)
    unet.to(dtype).requires_grad_(False)
    x, t, ctx, y = (v.to(dtype) if v.is_floating_point() else v for v in batch)
    groups, _ = network.prepare_optimizer_params(None, 1e-3, 1e-3)
    opt = torch.optim.AdamW(groups)
    with torch.autocast("cpu", dtype=dtype):
        out = unet(x, t, ctx, y)
        loss = out.float().pow(2).mean()
    loss.backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in network.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())


def test_full_bf16_network(batch):
    """--full_bf16: the trainer casts the network itself to bf16."""
    unet = build_unet(TINY, seed=0).to(torch.bfloat16)
    network = make(unet, preset="style")
    network.apply_to(None, unet, False, True)
    network.to(torch.bfloat16)
    x, t, ctx, y = (v.to(torch.bfloat16) if v.is_floating_point() else v for v in batch)
    unet(x, t, ctx, y).float().mean().backward()
    assert all(p.dtype == torch.bfloat16 for p in network.parameters())


def test_forward_mode_is_chosen_on_purpose(unet):
    assert all(m.bypass_mode for m in make(build_unet(TINY), preset="content").unet_loras)
    dora = make(build_unet(TINY), preset="content", dora_wd="true")
    assert not any(m.bypass_mode for m in dora.unet_loras)
    assert not any(m.bypass_mode for m in make(unet, preset="content", bypass_mode="false").unet_loras)
    with pytest.raises(NetworkArgsError, match="drops DoRA in bypass mode"):
        make(build_unet(TINY), preset="content", dora_wd="true", bypass_mode="true")


def test_gradient_checkpointing_same_gradients(batch):
    grads = []
    for checkpointing in (False, True):
        unet = build_unet(TINY, seed=0)
        torch.manual_seed(3)
        network = make(unet, preset="content_style")
        for m in network.unet_loras:
            torch.nn.init.normal_(m.lora_up.weight, std=0.01)
        network.apply_to(None, unet, False, True)
        if checkpointing:
            unet.enable_gradient_checkpointing()
            network.enable_gradient_checkpointing()
        unet.train()
        unet.requires_grad_(False)
        x, t, ctx, y = batch
        unet(x, t, ctx, y).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in network.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_algo_passthrough_loha(unet):
    network = make(unet, preset="content", algo="loha")
    assert {type(m).__name__ for m in network.unet_loras} == {"LohaModule"}


def _fp8_linears(unet):
    """--fp8_base: the base Linear weights in float8 (norms stay wider, as autocast needs on CPU)."""
    for module in unet.modules():
        if isinstance(module, nn.Linear):
            module.to(torch.float8_e4m3fn)


def test_fp8_base_trains_in_bypass_mode(batch):
    unet = build_unet(TINY, seed=0)
    network = make(unet, preset="content_style")
    network.prepare_network(argparse.Namespace(fp8_base=True, network_train_unet_only=True))
    network.apply_to(None, unet, False, True)
    _fp8_linears(unet)
    unet.requires_grad_(False)
    x, t, ctx, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, ctx, y)
    out.float().pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())


def test_fp8_base_with_rebuild_mode_is_refused_before_training():
    network = make(build_unet(TINY), preset="content", bypass_mode="false")
    with pytest.raises(NetworkArgsError, match="--fp8_base needs LyCORIS's bypass mode"):
        network.prepare_network(argparse.Namespace(fp8_base=True, network_train_unet_only=True))
