"""blora_network.sdxl.unet: sd-scripts' SDXL UNet tree, exact at full size (on meta) and at TINY width."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import blora_network.sdxl.unet as sdxl
from blora_network.sdxl.unet import FULL, TINY, UNetSize, build_unet, linear_layers, module_names, random_inputs

BLORA_BLOCKS = ("output_blocks.0.1", "output_blocks.1.1", "input_blocks.8.1")  # content, style, layout
ATTENTION = re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
# every Transformer2DModel of SDXL and its depth (sdxl-blocks.md)
TRANSFORMERS = {
    "input_blocks.4.1": 2, "input_blocks.5.1": 2, "input_blocks.7.1": 10, "input_blocks.8.1": 10,
    "middle_block.1": 10, "output_blocks.0.1": 10, "output_blocks.1.1": 10, "output_blocks.2.1": 10,
    "output_blocks.3.1": 2, "output_blocks.4.1": 2, "output_blocks.5.1": 2,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The TINY model's ops are tiny: a second thread only adds contention (seconds on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grads(unet: nn.Module, batch) -> dict[str, torch.Tensor]:
    unet.zero_grad(set_to_none=True)
    unet(*batch).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


# --- full size, on meta ---------------------------------------------------------------------------


def test_full_on_meta_has_sd_scripts_parameter_count():
    unet = build_unet(FULL, device="meta")
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert unet.device.type == "meta" and unet.dtype == torch.float32
    assert build_unet(FULL, device="meta", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_full_transformer_blocks_sit_where_sd_scripts_puts_them():
    names = module_names(FULL)
    found = {p: cls for p, cls in names if cls == "Transformer2DModel"}
    assert set(found) == set(TRANSFORMERS)
    for path, depth in TRANSFORMERS.items():
        blocks = {p for p, cls in names if cls == "BasicTransformerBlock" and p.startswith(path + ".")}
        assert blocks == {f"{path}.transformer_blocks.{i}" for i in range(depth)}


@pytest.mark.parametrize("block", BLORA_BLOCKS)
def test_each_blora_block_has_80_attention_linears_with_sdxl_shapes(block):
    mine = {l.name[len(block) + 1:]: l for l in linear_layers(FULL) if l.name.startswith(block + ".")}
    attention = [n for n in mine if ATTENTION.search("." + n)]
    assert len(attention) == 80 and len(mine) == 102  # + 10 x ff (2) + proj_in + proj_out
    assert attention == [
        f"transformer_blocks.{i}.{attn}.{proj}"
        for i in range(10)
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    shape = {n: (l.in_features, l.out_features, l.bias) for n, l in mine.items()}
    assert shape["proj_in"] == shape["proj_out"] == (1280, 1280, True)
    for i in range(10):
        tb = f"transformer_blocks.{i}"
        for attn in ("attn1", "attn2"):
            assert shape[f"{tb}.{attn}.to_q"] == (1280, 1280, False)
            assert shape[f"{tb}.{attn}.to_out.0"] == (1280, 1280, True)
        assert shape[f"{tb}.attn1.to_k"] == shape[f"{tb}.attn1.to_v"] == (1280, 1280, False)
        assert shape[f"{tb}.attn2.to_k"] == shape[f"{tb}.attn2.to_v"] == (2048, 1280, False)
        assert shape[f"{tb}.ff.net.0.proj"] == (1280, 10240, True)
        assert shape[f"{tb}.ff.net.2"] == (5120, 1280, True)


def test_class_names_containers_and_indices_match_sd_scripts():
    classes = dict(module_names(FULL))
    expected = {
        "": "SdxlUNet2DConditionModel",
        "time_embed": "Sequential", "time_embed.0": "Linear", "time_embed.1": "SiLU", "time_embed.2": "Linear",
        "label_emb": "Sequential", "label_emb.0": "Sequential", "label_emb.0.0": "Linear", "label_emb.0.2": "Linear",
        "input_blocks.0": "Sequential", "input_blocks.0.0": "Conv2d",
        "input_blocks.1": "ModuleList", "input_blocks.1.0": "ResnetBlock2D",
        "input_blocks.1.0.in_layers.0": "GroupNorm32", "input_blocks.1.0.in_layers.2": "Conv2d",
        "input_blocks.1.0.emb_layers.1": "Linear",
        "input_blocks.1.0.out_layers.2": "Identity", "input_blocks.1.0.out_layers.3": "Conv2d",
        "input_blocks.1.0.skip_connection": "Identity", "input_blocks.4.0.skip_connection": "Conv2d",
        "input_blocks.3": "Sequential", "input_blocks.3.0": "Downsample2D", "input_blocks.3.0.op": "Conv2d",
        "input_blocks.6.0": "Downsample2D",
        "input_blocks.4.1.norm": "GroupNorm", "input_blocks.4.1.proj_in": "Linear", "input_blocks.4.1.proj_out": "Linear",
        "middle_block": "ModuleList", "middle_block.0": "ResnetBlock2D", "middle_block.1": "Transformer2DModel",
        "middle_block.2": "ResnetBlock2D",
        "output_blocks.2.2": "Upsample2D", "output_blocks.2.2.conv": "Conv2d", "output_blocks.5.2": "Upsample2D",
        "output_blocks.8": "ModuleList", "output_blocks.8.0": "ResnetBlock2D",
        "out": "ModuleList", "out.0": "GroupNorm32", "out.1": "SiLU", "out.2": "Conv2d",
    }
    assert {p: classes.get(p) for p in expected} == expected
    tb = "output_blocks.0.1.transformer_blocks.0"
    block = {p[len(tb) + 1:]: c for p, c in classes.items() if p.startswith(tb + ".")}
    assert block == {
        "attn1": "CrossAttention", "attn1.to_q": "Linear", "attn1.to_k": "Linear", "attn1.to_v": "Linear",
        "attn1.to_out": "ModuleList", "attn1.to_out.0": "Linear",
        "ff": "FeedForward", "ff.net": "ModuleList", "ff.net.0": "GEGLU", "ff.net.0.proj": "Linear",
        "ff.net.1": "Identity", "ff.net.2": "Linear",
        "attn2": "CrossAttention", "attn2.to_q": "Linear", "attn2.to_k": "Linear", "attn2.to_v": "Linear",
        "attn2.to_out": "ModuleList", "attn2.to_out.0": "Linear",
        "norm1": "LayerNorm", "norm2": "LayerNorm", "norm3": "LayerNorm",
    }
    assert list(block)[:2] == ["attn1", "attn1.to_q"] and list(block).index("ff") < list(block).index("attn2")
    top = {p.split(".")[0] + "." + p.split(".")[1] for p in classes if p.startswith(("input_blocks.", "output_blocks."))}
    assert len([t for t in top if t.startswith("input")]) == 9 and len([t for t in top if t.startswith("output")]) == 9
    assert "Dropout" not in classes.values()
    assert not any(p.endswith("to_out.1") or p.endswith("output_blocks.8.1") for p in classes)


def test_tiny_tree_is_the_full_tree_at_another_width():
    assert module_names(TINY) == module_names(FULL)
    assert [l.name for l in linear_layers(TINY)] == [l.name for l in linear_layers(FULL)]
    assert {l.in_features for l in linear_layers(TINY)} < {16, 32, 64, 128, 256, 512}


def test_tables_are_cached():
    assert linear_layers(FULL) is linear_layers(FULL) and module_names() is module_names(FULL)


def test_size_must_split_into_groups_and_heads():
    with pytest.raises(ValueError, match="groups"):
        UNetSize(model_channels=20, context_dim=32, head_dim=8, adm_in_channels=32, norm_groups=8)


# --- TINY, on CPU ---------------------------------------------------------------------------------


def test_random_inputs_shapes_and_dtypes():
    x, t, ctx, y = random_inputs(TINY, batch=3, latent=16, seq_len=5, seed=4, dtype=torch.bfloat16)
    assert x.shape == (3, 4, 16, 16) and ctx.shape == (3, 5, TINY.context_dim) and y.shape == (3, TINY.adm_in_channels)
    assert t.shape == (3,) and t.dtype == torch.long
    assert x.dtype == ctx.dtype == y.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(random_inputs(seed=4), random_inputs(seed=4)))


def test_tiny_forward_keeps_shape_is_seeded_and_reads_every_input():
    batch = random_inputs(TINY, seed=1)
    unet = build_unet(TINY, seed=0).eval()
    with torch.no_grad():
        out = unet(*batch)
        assert out.shape == batch[0].shape and torch.isfinite(out).all()
        assert torch.equal(build_unet(TINY, seed=0).eval()(*batch), out)
        assert not torch.allclose(build_unet(TINY, seed=1).eval()(*batch), out)
        other = random_inputs(TINY, seed=2)
        for i in range(4):  # x, timesteps, context, y each change the output
            changed = list(batch)
            changed[i] = other[i]
            assert not torch.allclose(unet(*changed), out)
    assert unet.dtype == torch.float32 and unet.device.type == "cpu"


def test_gradients_reach_every_attention_layer_of_content_and_style():
    unet = build_unet(TINY, seed=0)
    grads = _grads(unet, random_inputs(TINY, seed=1))
    for block in BLORA_BLOCKS[:2]:
        attention = [n for n in grads if n.startswith(block + ".") and ATTENTION.search(n.removesuffix(".weight"))]
        assert len(attention) == 80
        assert all(grads[n].abs().sum() > 0 for n in attention)


def test_gradient_checkpointing_is_real_and_gives_the_same_gradients(monkeypatch):
    unet = build_unet(TINY, seed=0).train()
    batch = random_inputs(TINY, seed=1)
    plain = _grads(unet, batch)

    calls = []
    real = sdxl.checkpoint
    monkeypatch.setattr(sdxl, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    unet.enable_gradient_checkpointing()
    assert unet.is_gradient_checkpointing()
    checkpointed = _grads(unet, batch)
    # 17 ResnetBlock2D + 70 BasicTransformerBlock + 2 Downsample2D + 2 Upsample2D
    assert len(calls) == 91 and all(k == {"use_reentrant": False} for k in calls)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    calls.clear()
    unet.disable_gradient_checkpointing()
    assert not unet.is_gradient_checkpointing()
    _grads(unet, batch)
    assert calls == []


def test_build_unet_dtype_and_unseeded():
    assert build_unet(TINY, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert isinstance(build_unet(TINY, seed=None), sdxl.SdxlUNet2DConditionModel)


# --- text encoders ---------------------------------------------------------------------------------


def test_text_encoders_are_sdxls_two_clip_models_with_kohya_attention_names():
    pytest.importorskip("transformers")
    te1, te2 = sdxl.build_text_encoders(seed=0)
    assert (type(te1).__name__, type(te2).__name__) == ("CLIPTextModel", "CLIPTextModelWithProjection")
    for te in (te1, te2):
        attentions = [m for n, m in te.named_modules() if n.endswith("self_attn")]
        assert len(attentions) == 2
        for attn in attentions:
            assert all(isinstance(getattr(attn, p), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    ids = torch.randint(0, 1000, (1, 7))
    with torch.no_grad():
        assert te1(ids).last_hidden_state.shape == (1, 7, 32) and te2(ids).text_embeds.shape == (1, 32)
    again = sdxl.build_text_encoders(seed=0)[0]
    assert all(torch.equal(a, b) for a, b in zip(te1.state_dict().values(), again.state_dict().values()))
