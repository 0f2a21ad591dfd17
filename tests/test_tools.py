"""tools: every subcommand's output, tensor by tensor and dW by dW, its metadata, that inputs
are untouched, that only kept tensors are read, and that the files load in LyCORIS and diffusers."""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blora_network.tools import inspection

from blora_network.tools import transforms
from blora_network.errors import LoraFileError
from blora_network.files.safefile import model_hashes, read_header_layout, write_safetensors_hashed
from lora_factories import (
    Layer,
    blora_metadata_like_training,
    full_attention_layers,
    kohya_name,
    lora_tensors,
    lycoris_module,
    recording_progress,
    write_diffusers,
    write_kohya,
    write_lycoris,
    write_sd1,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONTENT_STYLE = full_attention_layers(["content", "style"])


# -- helpers: an independent reading of the files --------------------------------------------

def load(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


_PROBES: dict[int, torch.Tensor] = {}


def probe(n: int) -> torch.Tensor:
    """A fixed random [n, 3] float64 matrix: dW @ probe pins dW down (any wrong factor, scale or
    layer changes it) at the cost of a rank-r product instead of a dense out x in matrix."""
    if n not in _PROBES:
        _PROBES[n] = torch.randn(n, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    return _PROBES[n]


def lora_dw(down, up, alpha) -> torch.Tensor:
    """(alpha / r) up @ down, applied to the probe."""
    down, up = down.double(), up.double()
    return (float(alpha) / down.shape[0]) * (up @ (down @ probe(down.shape[1])))


def kohya_dw(path) -> dict[str, torch.Tensor]:
    """module -> (alpha/r) up @ down (probed), straight from the kohya keys of a file."""
    t, _ = load(path)
    out = {}
    for key in t:
        if key.endswith(".lora_down.weight"):
            m = key[: -len(".lora_down.weight")]
            down = t[key]
            alpha = float(t[f"{m}.alpha"]) if f"{m}.alpha" in t else down.shape[0]
            out[m] = lora_dw(down, t[f"{m}.lora_up.weight"], alpha)
    return out


def expected_dw(layers, rank, *, seed=0, alpha=None, weight=1.0) -> dict[str, torch.Tensor]:
    """dW the factories put in (probed), keyed by kohya module name (alpha None means alpha = rank)."""
    return {kohya_name(name): weight * lora_dw(t["down"], t["up"], rank if alpha is None else alpha)
            for name, t in lora_tensors(layers, rank, seed=seed).items()}


def assert_dw_equal(got: dict, want: dict, rtol=1e-6):
    assert set(got) == set(want)
    for k in want:
        scale = float(want[k].abs().max()) or 1.0
        assert float((got[k] - want[k]).abs().max()) <= rtol * scale + 1e-12, k


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_fresh_hashes(path):
    t, meta = load(path)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == model_hashes(t, meta)


@pytest.fixture
def trained(tmp_path):
    """A content+style B-LoRA as blora_network trains it: rank 4, alpha 1, sd-scripts' metadata."""
    return write_kohya(tmp_path / "dog.safetensors", CONTENT_STYLE, 4, alpha=1.0, seed=1,
                       metadata=blora_metadata_like_training(4, 1.0))


# -- safefile.write_safetensors_hashed ------------------------------------------------------

@pytest.mark.parametrize("n,meta", [
    (0, {"ss_a": "1"}),
    (10, {}),
    (300_000, {"ss_x": "é\n\"" * 500, "other": "z" * 5000}),
    (262_100, {"ss_x": "1", "blora_blocks": "{}"}),
    (400_000, {"ss_big": "q" * (1 << 20)}),  # header past 1 MiB: the in-memory fallback
])
def test_streamed_hashes_equal_sd_scripts_hashes(tmp_path, n, meta):
    g = torch.Generator().manual_seed(n)
    t = {} if n == 0 else {"a": torch.randn(n, generator=g), "b": torch.randn(999, generator=g).half(),
                           "c": torch.zeros(0)}
    p, h, legacy = write_safetensors_hashed(tmp_path / "x.safetensors", t, meta)
    assert (h, legacy) == model_hashes(t, meta)
    _, written = load(p)
    assert written["sshs_model_hash"] == h and written["sshs_legacy_hash"] == legacy
    assert {k: v for k, v in written.items() if not k.startswith("sshs_")} == meta
    assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert [x.name for x in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary left behind


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_hash_order_is_the_written_layout_for_mixed_dtypes_and_names():
    """The hash thread hashes in _data_order's order; the file must be laid out in that order
    (else the hash is taken again from the file: right, but slower)."""
    from safetensors.torch import save

    from blora_network.files.safefile import _data_order, _layout_is

    names = ["b.alpha", "a.lora_up.weight", "Z_x", "é1", "a_b", "a.lora_down.weight", "_"]
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.float64, torch.uint8, torch.bool]
    t = {n: torch.zeros(2, dtype=dtypes[i % k]) for k in (1, 2, 7) for i, n in enumerate(names)}
    blob = save(t)
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    assert _layout_is(header, _data_order(t))


def test_tools_fsync_only_when_replacing_a_file(tmp_path, monkeypatch, trained):
    """A new output is not fsynced (the inputs are never touched); replacing one is."""
    import blora_network.files.safefile as safefile

    synced = []
    real = safefile.os.fsync
    monkeypatch.setattr(safefile.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    out = tmp_path / "c.safetensors"
    transforms.extract(trained, ["content"], out)
    assert synced == []
    transforms.extract(trained, ["content"], out, force=True)
    assert len(synced) == 2  # the data, then the patched header


# -- inspect ----------------------------------------------------------------------------------

def test_inspect_reports_blocks_ranks_norms_and_metadata(trained):
    rep = inspection.inspect(trained)
    assert list(rep.blocks) == ["content", "style"]
    c = rep.blocks["content"]
    assert (c.modules, c.attention_modules, c.ranks, c.alphas, c.algos) == (80, 80, [4], [1.0], ["lora"])
    assert (c.ldm, c.lbw, c.params) == ("output_blocks.0.1", "OUT00", 220_160 * 4)
    tensors = lora_tensors(full_attention_layers(["content"]), 4, seed=1)  # content comes first under seed 1
    norm = math.sqrt(sum(float(((0.25 * t["up"].double()) @ t["down"].double()).square().sum()) for t in tensors.values()))
    assert c.norm == pytest.approx(norm, rel=1e-5)
    assert rep.model == "sdxl" and rep.dtypes == {"fp32": 480} and rep.file_bytes == trained.stat().st_size
    assert rep.training["network module"] == "blora_network" and rep.training["preset"] == "content_style"
    assert rep.training["dim"] == 4 and rep.training["steps"] == 1000
    assert rep.training["base model"] == "sd_xl_base_1.0.safetensors"
    assert any("alpha 1 differs from rank 4 in content, style" in w for w in rep.warnings)
    assert not rep.nonfinite_tensors


def test_inspect_warns_about_nan_and_layers_outside_the_blocks(tmp_path):
    layers = full_attention_layers(["style"]) + [Layer("input_blocks.4.1.transformer_blocks.0.attn1.to_q", 640, 640)]
    extra = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 768),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 4)}
    path = write_kohya(tmp_path / "x.safetensors", layers, 4, extra=extra)
    t, meta = load(path)
    bad = kohya_name("output_blocks.1.1.transformer_blocks.2.attn2.to_v") + ".lora_up.weight"
    t[bad][0, 0] = float("inf")
    save_file(t, str(path))
    rep = inspection.inspect(path)
    assert rep.nonfinite_tensors == [bad]
    assert rep.blocks["style"].norm is not None  # the finite modules still count
    assert rep.blocks["other"].modules == 2
    assert rep.blocks["other"].blocks == {"text_encoder_1": 1, "input_blocks.4.1": 1}
    text = " ".join(rep.warnings)
    assert "NaN or Inf" in text and bad in text
    assert "2 modules lie outside the B-LoRA blocks" in text


def test_inspect_loha_lokr_from_lycoris(tmp_path):
    layers = full_attention_layers(["content"])[:3]
    mods = [lycoris_module("loha", layers[0], 4, 2.0), lycoris_module("lokr", layers[1], 4, 2.0, factor=8),
            lycoris_module("lora", layers[2], 4, 2.0, weight_decompose=True)]
    rep = inspection.inspect(write_lycoris(tmp_path / "l.safetensors", mods))
    c = rep.blocks["content"]
    assert c.algos == ["loha", "lokr", "lora+dora"] and c.norm is None
    assert any("DoRA" in w for w in rep.warnings)


# -- split ------------------------------------------------------------------------------------

def test_split_writes_one_exact_file_per_block(trained):
    before = digest(trained)
    src, src_meta = load(trained)
    result = transforms.split(trained)
    assert digest(trained) == before
    assert [Path(f.path).name for f in result.files] == ["dog_content.safetensors", "dog_style.safetensors"]
    for f, prefix in zip(result.files, ("lora_unet_output_blocks_0_1_", "lora_unet_output_blocks_1_1_")):
        t, meta = load(f.path)
        assert set(t) == {k for k in src if k.startswith(prefix)} and len(t) == 240
        assert all(torch.equal(t[k], src[k]) and t[k].dtype == src[k].dtype for k in t)
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "1.0"
        role = f.blocks[0]
        assert json.loads(meta["blora_blocks"]) == {role: {"content": "output_blocks.0.1", "style": "output_blocks.1.1"}[role]}
        assert json.loads(meta["blora_block_dims"]) == {role: 4}
        assert json.loads(meta["blora_sources"]) == [
            {"file": "dog.safetensors", "sshs_model_hash": "f" * 64, "blocks": [role], "weights": {role: 1.0}}]
        assert meta["my_note"] == "kept as is" and meta["ss_steps"] == "1000" and meta["blora_preset"] == "content_style"
        assert meta["sshs_model_hash"] != src_meta["sshs_model_hash"]
        assert_fresh_hashes(f.path)


def test_split_refuses_to_overwrite_then_force_replaces(trained, tmp_path):
    transforms.split(trained, roles=["style"])
    out = tmp_path / "dog_style.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(LoraFileError, match="already exists; pass --force"):
        transforms.split(trained)
    assert out.read_bytes() == b"precious" and not (tmp_path / "dog_content.safetensors").exists()
    transforms.split(trained, force=True)
    assert len(load(out)[0]) == 240


def test_split_a_block_the_file_lacks(trained):
    with pytest.raises(LoraFileError, match=r"has no layout block \(input_blocks.8.1, IN08\).*it holds: content \(80"):
        transforms.split(trained, roles=["layout"])


# -- combine ----------------------------------------------------------------------------------

def test_combine_takes_content_of_one_and_style_of_another_scaled_linearly(tmp_path, trained):
    other = write_diffusers(tmp_path / "ink.safetensors", CONTENT_STYLE, 8, seed=5, prefix="unet.unet.")
    before = (digest(trained), digest(other))
    out = tmp_path / "dog_ink.safetensors"
    res = transforms.combine([transforms.BlockSource("style", str(other), -0.75), transforms.BlockSource("content", str(trained), 0.5)], out)
    assert (digest(trained), digest(other)) == before
    got = kohya_dw(out)
    want_c = {k: v for k, v in expected_dw(CONTENT_STYLE, 4, seed=1, alpha=1.0, weight=0.5).items() if "output_blocks_0_1" in k}
    want_s = {k: v for k, v in expected_dw(CONTENT_STYLE, 8, seed=5, weight=-0.75).items() if "output_blocks_1_1" in k}
    assert_dw_equal(got, {**want_c, **want_s})
    t, meta = load(out)
    # LoRA weights scale lora_up only; the file stores one alpha (the largest rank's, 8), so the
    # content layers' lora_up also carry their own alpha / 8 (issue 14): down is the source's own
    src, _ = load(trained)
    k = kohya_name("output_blocks.0.1.transformer_blocks.4.attn1.to_v")
    assert torch.equal(t[f"{k}.lora_down.weight"], src[f"{k}.lora_down.weight"])
    assert torch.equal(t[f"{k}.lora_up.weight"], src[f"{k}.lora_up.weight"] * (0.5 * 1.0 / 8.0))
    assert {float(v) for key, v in t.items() if key.endswith(".alpha")} == {8.0}
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert json.loads(meta["blora_block_dims"]) == {"content": 4, "style": 8}
    assert json.loads(meta["blora_weights"]) == {"content": 0.5, "style": -0.75}
    assert json.loads(meta["blora_sources"]) == [
        {"file": "dog.safetensors", "sshs_model_hash": "f" * 64, "blocks": ["content"], "weights": {"content": 0.5}},
        {"file": "ink.safetensors", "sshs_model_hash": None, "blocks": ["style"], "weights": {"style": -0.75}},
    ]
    assert meta["ss_network_module"] == "blora_network"  # the content source's metadata, kept
    assert_fresh_hashes(out)
    assert res.blocks == ["content", "style"] and res.modules == 160


def test_combine_weight_zero_leaves_the_block_out_and_layout_joins(tmp_path, trained):
    lay = write_kohya(tmp_path / "lay.safetensors", full_attention_layers(["layout"]), 2, seed=9)
    out = tmp_path / "o.safetensors"
    res = transforms.combine([transforms.BlockSource("content", str(trained)), transforms.BlockSource("style", str(trained), 0.0),
                         transforms.BlockSource("layout", str(lay), 2.0)], out)
    assert res.blocks == ["content", "layout"] and any("weight 0" in w for w in res.warnings)
    _, meta = load(out)
    assert json.loads(meta["blora_blocks"]) == {"content": "output_blocks.0.1", "layout": "input_blocks.8.1"}
    want = {k: v for k, v in expected_dw(CONTENT_STYLE, 4, seed=1, alpha=1.0).items() if "output_blocks_0_1" in k}
    want.update(expected_dw(full_attention_layers(["layout"]), 2, seed=9, weight=2.0))
    assert_dw_equal(kohya_dw(out), want)


def test_combine_refusals(tmp_path, trained):
    only_style = write_kohya(tmp_path / "s.safetensors", full_attention_layers(["style"]), 2)
    with pytest.raises(LoraFileError, match=r"s.safetensors: has no content block .*it holds: style \(80 modules\)"):
        transforms.combine([transforms.BlockSource("content", str(only_style))], tmp_path / "o.safetensors")
    with pytest.raises(LoraFileError, match="refusing to write over an input"):
        transforms.combine([transforms.BlockSource("content", str(trained))], trained)
    assert not (tmp_path / "o.safetensors").exists()


# -- scale ------------------------------------------------------------------------------------

def test_scale_bakes_per_block_weights_exactly(tmp_path, trained):
    before = digest(trained)
    out = tmp_path / "scaled.safetensors"
    res = transforms.scale(trained, {"content": 1.0, "style": 0.6}, out)
    assert digest(trained) == before
    want = expected_dw(CONTENT_STYLE, 4, seed=1, alpha=1.0)
    want = {k: v * (0.6 if "output_blocks_1_1" in k else 1.0) for k, v in want.items()}
    assert_dw_equal(kohya_dw(out), want)
    t, meta = load(out)
    src, _ = load(trained)
    changed = {k for k in t if not torch.equal(t[k], src[k])}
    assert changed == {k for k in src if k.startswith("lora_unet_output_blocks_1_1_") and k.endswith("lora_up.weight")}
    assert json.loads(meta["blora_weights"]) == {"content": 1.0, "style": 0.6}
    assert res.weights == {"content": 1.0, "style": 0.6}
    # scaling again multiplies: the metadata says what is baked in relative to training
    again = tmp_path / "again.safetensors"
    transforms.scale(out, {"style": 0.5}, again)
    assert json.loads(load(again)[1]["blora_weights"]) == {"content": 1.0, "style": pytest.approx(0.3)}
    assert json.loads(load(again)[1]["blora_sources"])[0]["sources"][0]["file"] == "dog.safetensors"


def test_scale_zero_drops_the_block_and_keeps_other_layers(tmp_path):
    extra = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 768),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 2)}
    src = write_kohya(tmp_path / "x.safetensors", CONTENT_STYLE, 2, extra=extra)
    out = tmp_path / "o.safetensors"
    transforms.scale(src, {"style": 0, "content": 3}, out)
    t, meta = load(out)
    assert not any(k.startswith("lora_unet_output_blocks_1_1_") for k in t)
    assert torch.equal(t["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"],
                       extra["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"])
    assert json.loads(meta["blora_blocks"]) == {"content": "output_blocks.0.1"}


def test_scale_loha_and_lokr_from_lycoris_and_refuse_dora(tmp_path):
    layers = full_attention_layers(["content", "style"])
    specs = [("loha", layers[0], {}, -0.5), ("lokr", layers[1], {"factor": 8}, -0.5),
             ("lokr", layers[2], {"factor": 8, "decompose_both": True}, -0.5),
             ("lora", layers[80], {"weight_decompose": True}, 1.0)]
    mods = [lycoris_module(algo, layer, 4, 2.0, seed=i, **kw) for i, (algo, layer, kw, _) in enumerate(specs)]
    src = write_lycoris(tmp_path / "l.safetensors", mods)
    out = tmp_path / "o.safetensors"
    transforms.scale(src, {"content": -0.5}, out)  # style is DoRA and keeps weight 1: allowed
    t, _ = load(out)
    for (algo, layer, kw, w), m in zip(specs, mods):
        fresh = lycoris_module(algo, layer, 4, 2.0, seed=99, **kw)
        fresh.load_state_dict({k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(m.lora_name + ".")},
                              strict=False)
        with torch.no_grad():
            fresh.org_module[0].weight.copy_(m.org_module[0].weight)
        m.eval()
        fresh.eval()
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            got, ref = fresh(x) - fresh.org_forward(x), m(x) - m.org_forward(x)
        assert torch.allclose(got, w * ref, atol=1e-5 * float(ref.abs().max())), algo
    with pytest.raises(LoraFileError, match="DoRA"):
        transforms.scale(src, {"style": 0.5}, tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


# -- extract ----------------------------------------------------------------------------------

def test_extract_keeps_exactly_the_80_attention_layers_per_block_of_a_full_unet_lora(tmp_path):
    from blora_network.sdxl.unet import FULL

    from lora_factories import layers_of

    layers = layers_of(FULL)
    src = write_kohya(tmp_path / "whole.safetensors", layers, 1, alpha=1.0, dtype=torch.float16,
                      metadata={"ss_network_module": "networks.lora", "ss_network_dim": "1"})
    out = tmp_path / "b.safetensors"
    res = transforms.extract(src, ["content", "style", "layout"], out)
    t, meta = load(out)
    modules = {k.split(".")[0] for k in t}
    want = {kohya_name(x.name) for x in full_attention_layers(["content", "style", "layout"])}
    assert modules == want and res.modules == 240
    assert not any("ff_net" in m or "proj_in" in m or "proj_out" in m for m in modules)
    src_t, _ = load(src)
    assert all(torch.equal(t[k], src_t[k]) for k in t)
    assert json.loads(meta["blora_blocks"]) == {"content": "output_blocks.0.1", "style": "output_blocks.1.1",
                                                "layout": "input_blocks.8.1"}
    assert meta["ss_network_module"] == "networks.lora"
    assert any("left out" in w for w in res.warnings)


def test_extract_from_diffusers_named_kohya_and_refuse_missing_block(tmp_path):
    from blora_network.sdxl.unet import TINY

    from lora_factories import layers_of

    layers = layers_of(TINY)
    src = write_kohya(tmp_path / "w.safetensors", layers, 2, diffusers_blocks=True)
    assert any(k.startswith("lora_unet_up_blocks_0_attentions_0_") for k in load(src)[0])
    out = tmp_path / "c.safetensors"
    transforms.extract(src, ["OUT0"], out)
    want = {kohya_name(x.name) for x in layers_of(TINY, roles=["content"], attention_only=True)}
    assert set(kohya_dw(out)) == want
    assert_dw_equal(kohya_dw(out), {k: v for k, v in expected_dw(layers, 2).items() if k in want})
    no_style = write_kohya(tmp_path / "n.safetensors", [x for x in layers if not x.name.startswith("output_blocks.1.1.")
                                                        or "ff" in x.name], 2)
    with pytest.raises(LoraFileError, match=r"style block \(output_blocks.1.1\) has no attention layers"):
        transforms.extract(no_style, ["style"], tmp_path / "x.safetensors")


# -- convert ----------------------------------------------------------------------------------

@pytest.mark.parametrize("peft,prefix", [(False, "unet."), (True, "unet."), (False, "unet.unet."), (True, "")])
def test_convert_original_blora_output_to_kohya(tmp_path, peft, prefix):
    src = write_diffusers(tmp_path / "orig.safetensors", CONTENT_STYLE, 4, peft=peft, prefix=prefix, seed=3)
    out = tmp_path / "k.safetensors"
    transforms.convert(src, out)
    t, meta = load(out)
    assert all(k.startswith("lora_unet_output_blocks_") for k in t)
    assert {float(v) for k, v in t.items() if k.endswith(".alpha")} == {4.0}
    assert_dw_equal(kohya_dw(out), expected_dw(CONTENT_STYLE, 4, seed=3))
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["blora_blocks"]) == {"content": "output_blocks.0.1", "style": "output_blocks.1.1"}


@pytest.mark.parametrize("to,names", [("diffusers", ("lora.down.weight", "lora.up.weight")),
                                      ("peft", ("lora_A.weight", "lora_B.weight"))])
def test_convert_kohya_to_diffusers_folds_alpha_and_round_trips(tmp_path, trained, to, names):
    out = tmp_path / "d.safetensors"
    transforms.convert(trained, out, to=to)
    t, _ = load(out)
    assert not any(k.endswith("alpha") for k in t)
    k = "unet.up_blocks.0.attentions.1.transformer_blocks.7.attn2.to_k"
    assert t[f"{k}.{names[0]}"].shape == (4, 2048) and t[f"{k}.{names[1]}"].shape == (1280, 4)
    back = tmp_path / "k.safetensors"
    transforms.convert(out, back)
    assert_dw_equal(kohya_dw(back), expected_dw(CONTENT_STYLE, 4, seed=1, alpha=1.0))


def test_convert_refusals(tmp_path, trained):
    with pytest.raises(LoraFileError, match="already uses kohya names"):
        transforms.convert(trained, tmp_path / "o.safetensors")
    loha = write_lycoris(tmp_path / "l.safetensors", [lycoris_module("loha", CONTENT_STYLE[0], 2, 2.0)])
    with pytest.raises(LoraFileError, match="is loha; the diffusers/PEFT formats hold plain LoRA only"):
        transforms.convert(loha, tmp_path / "o.safetensors", to="diffusers")


# -- what every tool refuses ------------------------------------------------------------------

def test_sd1_and_no_blora_blocks_are_refused_with_what_the_file_holds(tmp_path):
    sd1 = write_sd1(tmp_path / "sd1.safetensors")
    for call in (lambda: inspection.inspect(sd1), lambda: transforms.split(sd1),
                 lambda: transforms.extract(sd1, ["content"], tmp_path / "o.safetensors")):
        with pytest.raises(LoraFileError, match="SD1.x LoRA.*768-wide"):
            call()
    elsewhere = write_kohya(tmp_path / "mid.safetensors",
                            [Layer("middle_block.1.transformer_blocks.0.attn2.to_k", 2048, 1280),
                             Layer("input_blocks.4.1.transformer_blocks.1.attn1.to_q", 640, 640)], 2)
    with pytest.raises(LoraFileError, match=r"holds no B-LoRA block .*it holds: input_blocks.4.1 \(1\), middle_block.1 \(1\)"):
        transforms.split(elsewhere)


# -- lazy reading: only the kept tensors come off the disk ------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _resident(path) -> bytes:
    """Per page of the file: 1 when it is in the page cache (mincore), else 0."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        vec = (ctypes.c_ubyte * ((size + _PAGE - 1) // _PAGE))()
        assert libc.mincore(addr, size, vec) == 0
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return bytes(v & 1 for v in vec)


def _evict(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    res = _resident(path)
    return sum(res) <= len(res) // 50


def _bytes_in_cache(path, ranges, resident) -> int:
    return sum(resident[p] * _PAGE for lo, hi in ranges for p in range(lo // _PAGE, (hi + _PAGE - 1) // _PAGE))


def _data_ranges(path, select) -> list[tuple[int, int]]:
    header = read_header_layout(path)[0]
    start = 8 + int.from_bytes(Path(path).read_bytes()[:8], "little")
    return [(start + v["data_offsets"][0], start + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and select(k)]


def _far_from(ranges, kept, margin) -> list[tuple[int, int]]:
    """Parts of ``ranges`` more than ``margin`` bytes away from every kept range (readahead slack)."""
    out = []
    for lo, hi in ranges:
        if all(hi + margin <= klo or lo >= khi + margin for klo, khi in kept):
            out.append((lo, hi))
    return out


@pytest.mark.parametrize("tool", ["split", "extract"])
def test_tools_read_only_the_tensors_they_keep(tmp_path, tool):
    """A real measurement: evict the file from the page cache, run the tool, ask the kernel
    (mincore) which pages of the input came back. Skipped layers must stay on disk."""
    content = full_attention_layers(["content"])
    # ~94 MB of layers to skip (input_blocks sort before output_blocks in the data section) and
    # ff layers interleaved with the kept attention layers
    big = [Layer(f"input_blocks.7.1.transformer_blocks.{i}.ff.net.0.proj", 1280, 10240) for i in range(64)]  # SDXL widths
    big += [Layer(f"output_blocks.0.1.transformer_blocks.{i}.ff.net.2", 5120, 1280) for i in range(10)]
    src = write_kohya(tmp_path / "big.safetensors", content + big, 64, dtype=torch.float16)
    if not _evict(src):
        pytest.skip("cannot evict the test file from the page cache here")
    if tool == "split":
        transforms.split(src, roles=["content"], layers="transformer")  # ff too: interleaved with the kept layers
        kept_sel = lambda k: k.startswith("lora_unet_output_blocks_0_1_")  # noqa: E731
    else:
        transforms.extract(src, ["content"], tmp_path / "c.safetensors")
        kept_sel = lambda k: k.startswith("lora_unet_output_blocks_0_1_") and "ff_net" not in k  # noqa: E731
    resident = _resident(src)
    kept = _data_ranges(src, kept_sel)
    skipped = _data_ranges(src, lambda k: not kept_sel(k))
    kept_bytes = sum(hi - lo for lo, hi in kept)
    assert _bytes_in_cache(src, kept, resident) >= 0.9 * kept_bytes  # the measurement sees reads
    far = _far_from(skipped, kept, margin=16 << 20)  # beyond any readahead window
    far_bytes = sum(hi - lo for lo, hi in far)
    assert far_bytes > 50 << 20
    assert _bytes_in_cache(src, far, resident) <= 0.02 * far_bytes


# -- the outputs load where users load them ---------------------------------------------------

def test_written_files_load_in_lycoris_on_the_right_block(tmp_path):
    from lycoris.kohya import create_network_from_weights

    from blora_network.sdxl.unet import TINY, build_unet

    from lora_factories import layers_of

    a = write_kohya(tmp_path / "a.safetensors", layers_of(TINY, roles=["content", "style"], attention_only=True), 4,
                    alpha=2.0, seed=1)
    b = write_diffusers(tmp_path / "b.safetensors", layers_of(TINY, roles=["style", "layout"], attention_only=True), 2,
                        seed=2, peft=True)
    out = tmp_path / "mix.safetensors"
    transforms.combine([transforms.BlockSource("content", str(a), 0.7), transforms.BlockSource("style", str(b), 1.3)], out)
    unet = build_unet(TINY, seed=0)
    network, _ = create_network_from_weights(1.0, str(out), None, None, unet)
    names = {m.lora_name for m in network.unet_loras}
    want = kohya_dw(out)
    assert names == set(want) and len(names) == 2 * len(layers_of(TINY, roles=["content"], attention_only=True))
    assert all(n.startswith(("lora_unet_output_blocks_0_1_", "lora_unet_output_blocks_1_1_")) for n in names)
    for m in network.unet_loras:
        d = m.get_diff_weight(1.0)[0].double() @ probe(m.org_module[0].in_features)
        assert torch.allclose(d, want[m.lora_name], atol=1e-5 * float(want[m.lora_name].abs().max()))


def test_lycoris_loads_scaled_loha_and_lokr_files_with_the_scaled_change(tmp_path):
    from lycoris.kohya import create_network_from_weights

    from blora_network.sdxl.unet import TINY, build_unet

    from lora_factories import layers_of

    layers = layers_of(TINY, roles=["content", "style"], attention_only=True)
    mods = {}
    for i, layer in enumerate(layers):
        loha = layer.name.startswith("output_blocks.0.1.")
        m = lycoris_module("loha" if loha else "lokr", layer, 4, 2.0, seed=i, **({} if loha else {"factor": 4}))
        mods[m.lora_name] = m
    src = write_lycoris(tmp_path / "ly.safetensors", list(mods.values()))
    out = tmp_path / "scaled.safetensors"
    transforms.scale(src, {"content": 0.5, "style": -2.0}, out)
    network, _ = create_network_from_weights(1.0, str(out), None, None, build_unet(TINY, seed=0))
    assert {m.lora_name for m in network.unet_loras} == set(mods)
    for loaded in network.unet_loras:
        orig = mods[loaded.lora_name]
        assert type(loaded) is type(orig)
        w = 0.5 if "output_blocks_0_1" in loaded.lora_name else -2.0
        eye = torch.eye(orig.org_module[0].in_features)
        loaded.eval()
        orig.eval()
        with torch.no_grad():
            got = loaded(eye) - loaded.org_forward(eye)
            ref = orig(eye) - orig.org_forward(eye)
        assert torch.allclose(got, w * ref, atol=1e-5 * float(ref.abs().max())), loaded.lora_name


def _tiny_diffusers_pipeline():
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 32), layers_per_block=2, transformer_layers_per_block=(1, 1, 10),
        cross_attention_dim=24, attention_head_dim=(2, 4, 8), norm_num_groups=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=48,
    )
    pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=diffusers.EulerDiscreteScheduler())
    return pipe


def _diffusers_blora_layers(unet, roles) -> list[Layer]:
    """The pipeline UNet's attention Linear layers in the B-LoRA blocks, by LDM name."""
    from blora_network.sdxl.blocks import BLOCKS
    from blora_network.sdxl.names import is_attention_layer

    out = []
    for b in BLOCKS:
        if b.role not in roles:
            continue
        for name, mod in unet.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith(b.diffusers + ".") and is_attention_layer(name):
                out.append(Layer(b.ldm + name[len(b.diffusers):], mod.in_features, mod.out_features))
    return out


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_written_files_load_in_diffusers_on_the_right_block(tmp_path, to):
    pipe = _tiny_diffusers_pipeline()
    from peft.tuners.lora import LoraLayer

    layers = _diffusers_blora_layers(pipe.unet, ["content", "style", "layout"])
    assert len(layers) == 3 * 80  # 10 transformer blocks x 8 projections in each B-LoRA block
    src = write_kohya(tmp_path / "src.safetensors", layers, 4, alpha=1.0, seed=4)
    out = tmp_path / "content_style.safetensors"
    transforms.scale(src, {"content": 0.5, "style": 2.0, "layout": 0.0}, out)
    if to == "diffusers":
        transforms.convert(out, tmp_path / "d.safetensors", to="diffusers")
        out = tmp_path / "d.safetensors"
    pipe.load_lora_weights(str(out), adapter_name="blora")
    adapted = {n for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    assert {".".join(n.split(".")[:4]) for n in adapted} == {"up_blocks.0.attentions.0", "up_blocks.0.attentions.1"}
    assert len(adapted) == 160
    want = expected_dw(layers, 4, seed=4, alpha=1.0)
    for name in sorted(adapted):
        ldm = name.replace("up_blocks.0.attentions.0", "output_blocks.0.1").replace("up_blocks.0.attentions.1",
                                                                                   "output_blocks.1.1")
        w = 0.5 if "output_blocks.0.1" in ldm else 2.0
        mod = pipe.unet.get_submodule(name)
        got = mod.get_delta_weight("blora").double() @ probe(mod.in_features)
        assert torch.allclose(got, w * want[kohya_name(ldm)], atol=1e-6), name


def test_progress_reports_the_work_done(tmp_path, trained):
    """The CLI's tqdm bars are fed by the tools: every byte read and hashed is reported."""
    bars, Bar = recording_progress()
    res = transforms.combine([transforms.BlockSource("content", str(trained), 0.5)], tmp_path / "o.safetensors", progress=Bar)
    assert [b.desc for b in bars] == ["reading content from dog.safetensors", "hashing o.safetensors"]
    assert all(b.closed and b.done == b.total > 0 for b in bars)
    assert bars[1].total == res.bytes - (8 + int.from_bytes((tmp_path / "o.safetensors").read_bytes()[:8], "little"))
