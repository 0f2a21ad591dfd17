"""lorafile, algos, sdxl_names: grouping keys into layers under every spelling, the change each algorithm makes,
linear scaling, and recognising the model a LoRA was made for."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from blora_network.sdxl.blocks import BLOCKS, attention_layer_names
from blora_network.errors import LoraFileError
from blora_network.files.algos import delta_norm_sq, delta_weight, scale_tensors
from blora_network.files.lorafile import guess_model, open_lora
from blora_network.sdxl.names import diffusers_path_of_kohya_name, kohya_name_of_diffusers_path
from lora_factories import (
    Layer,
    full_attention_layers,
    kohya_name,
    lycoris_module,
    lycoris_state,
    to_diffusers_path,
    write_diffusers,
    write_kohya,
    write_lycoris,
    write_sd1,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = Layer("output_blocks.0.1.transformer_blocks.0.attn2.to_k", 48, 32)


def _independent_lora_dw(down, up, alpha):
    down, up = down.double(), up.double()
    return (float(alpha) / down.shape[0]) * (up @ down)


# -- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["kohya", "kohya-diffusers", "diffusers", "diffusers-doubled", "peft", "peft-bare",
                                      "peft-base_model"])
def test_every_spelling_gives_the_same_layers_and_blocks(tmp_path, spelling):
    layers = full_attention_layers(["content", "style", "layout"])
    path = tmp_path / "x.safetensors"
    if spelling == "kohya":
        write_kohya(path, layers, 2)
    elif spelling == "kohya-diffusers":
        write_kohya(path, layers, 2, diffusers_blocks=True)
    elif spelling.startswith("diffusers"):
        write_diffusers(path, layers, 2, prefix="unet.unet." if spelling.endswith("doubled") else "unet.")
    else:
        prefix = {"peft": "unet.", "peft-bare": "", "peft-base_model": "base_model.model."}[spelling]
        write_diffusers(path, layers, 2, peft=True, prefix=prefix)
    lora = open_lora(path)
    assert set(lora.layers) == {kohya_name(x.name) for x in layers}
    assert lora.roles() == ["content", "style", "layout"]
    for role in ("content", "style", "layout"):
        mods = lora.role_layers(role)
        assert len(mods) == 80 and all(m.is_attention and m.algo == "lora" and m.rank == 2 for m in mods)
    assert lora.spellings == ({"kohya-diffusers": ("kohya-diffusers",), "kohya": ("kohya",)}.get(spelling)
                              or (("peft",) if spelling.startswith("peft") else ("diffusers",)))
    k = lora.layers[kohya_name("input_blocks.8.1.transformer_blocks.3.attn2.to_v")]
    assert (k.in_features, k.out_features) == (2048, 1280) and k.role == "layout"


def test_diffusers_and_ldm_names_round_trip():
    for b in BLOCKS:
        for ldm, diff in zip(attention_layer_names(b), attention_layer_names(b, diffusers=True)):
            assert to_diffusers_path(ldm) == diff
            assert kohya_name_of_diffusers_path("unet." + diff) == kohya_name(ldm)
            assert kohya_name_of_diffusers_path("unet.unet." + diff) == kohya_name(ldm)
            assert diffusers_path_of_kohya_name(kohya_name(ldm)) == "unet." + diff
    # the general rule, beyond the three B-LoRA blocks
    assert kohya_name_of_diffusers_path("down_blocks.1.attentions.1.proj_in") == "lora_unet_input_blocks_5_1_proj_in"
    assert kohya_name_of_diffusers_path("mid_block.attentions.0.transformer_blocks.9.ff.net.2") == \
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"
    assert diffusers_path_of_kohya_name("lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_out_0") == \
        "unet.up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0"
    assert diffusers_path_of_kohya_name("lora_te2_text_model_encoder_layers_31_self_attn_out_proj") == \
        "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj"
    assert kohya_name_of_diffusers_path("text_encoder.text_model.encoder.layers.0.mlp.fc1") == \
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    assert diffusers_path_of_kohya_name("lora_unet_input_blocks_0_0") is None  # conv_in: no known mapping


def test_header_only_open_reports_shapes_without_reading(tmp_path):
    path = write_kohya(tmp_path / "a.safetensors", full_attention_layers(["style"]), 8, alpha=1, dtype=torch.float16)
    lora = open_lora(path)
    m = lora.layers[kohya_name("output_blocks.1.1.transformer_blocks.0.attn1.to_q")]
    assert m.shapes["lora_down.weight"] == (8, 1280) and m.dtypes["lora_up.weight"] == "F16"
    assert m.nbytes == (8 * 1280 + 1280 * 8 + 1) * 2
    assert lora.size == path.stat().st_size and lora.dtypes == {"F16": 240}


def test_two_spellings_of_one_layer_are_refused(tmp_path):
    path = tmp_path / "mix.safetensors"
    save_file({
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 8),
        "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 8),
    }, str(path))
    with pytest.raises(LoraFileError, match="appears twice"):
        open_lora(path)


def test_layer_missing_a_factor_or_with_mismatched_factors_is_refused(tmp_path):
    m = "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{m}.lora_down.weight": torch.zeros(2, 8)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(LoraFileError, match="no lora_up.weight"):
        open_lora(tmp_path / "a.safetensors")
    save_file({f"{m}.lora_down.weight": torch.zeros(2, 8), f"{m}.lora_up.weight": torch.zeros(8, 3)},
              str(tmp_path / "b.safetensors"))
    with pytest.raises(LoraFileError, match="do not multiply"):
        open_lora(tmp_path / "b.safetensors")


# -- the change dW ----------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [1.0, 4.0, 0.0, 16.0])
def test_lora_delta_weight_is_alpha_over_rank_up_down(alpha):
    g = torch.Generator().manual_seed(3)
    t = {"lora_down.weight": torch.randn(4, 12, generator=g), "lora_up.weight": torch.randn(10, 4, generator=g),
         "alpha": torch.tensor(alpha)}
    expect = _independent_lora_dw(t["lora_down.weight"], t["lora_up.weight"], alpha if alpha else 4)
    assert torch.allclose(delta_weight("lora", t, dtype=torch.float64), expect, atol=1e-12)
    no_alpha = {k: v for k, v in t.items() if k != "alpha"}
    assert torch.allclose(delta_weight("lora", no_alpha, dtype=torch.float64),
                          _independent_lora_dw(t["lora_down.weight"], t["lora_up.weight"], 4), atol=1e-12)


LYCORIS_CASES = [
    ("lora", {}),
    ("loha", {}),
    ("lokr", {}),                                       # w1 full, w2 full (scale forced to 1)
    ("lokr", {"factor": 4}),                            # w1 full, w2 factorized
    ("lokr", {"factor": 8, "decompose_both": True}),    # both factorized
    ("lokr", {"full_matrix": True}),
]


@pytest.mark.parametrize("algo,kw", LYCORIS_CASES, ids=[f"{a}-{'-'.join(k) or 'plain'}" for a, k in LYCORIS_CASES])
@pytest.mark.parametrize("alpha", [1.0, 8.0])
def test_delta_weight_matches_what_lycoris_applies(algo, kw, alpha):
    """dW against LyCORIS's own forward pass (plain and bypass), the change the model sees.

    (LyCORIS 4.1.3's ``get_diff_weight`` applies alpha/rank twice for LoHa/LoKr, unlike its
    forward, ComfyUI and A1111; the forward is the reference.)
    """
    m = lycoris_module(algo, SMALL, 2, alpha, **kw)
    tensors = {k.split(".", 1)[1]: v for k, v in lycoris_state(m).items()}
    x = torch.randn(7, SMALL.in_features)
    m.eval()
    with torch.no_grad():
        seen = m(x) - m.org_forward(x)
        m.bypass_mode = True
        seen_bypass = m(x) - m.org_forward(x)
    dw = delta_weight(algo, tensors)
    assert dw.shape == (SMALL.out_features, SMALL.in_features)
    tol = 1e-5 * float(seen.abs().max())
    assert float((seen - x @ dw.T).abs().max()) <= tol
    assert float((seen_bypass - x @ dw.T).abs().max()) <= tol
    if algo != "lora":
        # the formula the module docstring states, computed here independently
        s = 1.0 if (algo == "lokr" and "lokr_w2" in tensors and "lokr_w1" in tensors) else alpha / 2
        if algo == "loha":
            ref = (tensors["hada_w1_a"] @ tensors["hada_w1_b"]) * (tensors["hada_w2_a"] @ tensors["hada_w2_b"]) * s
        else:
            w1 = tensors.get("lokr_w1", None)
            w1 = w1 if w1 is not None else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
            w2 = tensors.get("lokr_w2", None)
            w2 = w2 if w2 is not None else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
            ref = torch.kron(w1, w2) * s
        assert torch.allclose(dw, ref, atol=1e-6)


@pytest.mark.parametrize("algo,kw", LYCORIS_CASES, ids=[f"{a}-{'-'.join(k) or 'plain'}" for a, k in LYCORIS_CASES])
def test_norm_shortcuts_equal_the_dense_norm(algo, kw):
    m = lycoris_module(algo, SMALL, 2, 3.0, **kw)
    tensors = {k.split(".", 1)[1]: v for k, v in lycoris_state(m).items()}
    dense = float(delta_weight(algo, tensors, dtype=torch.float64).square().sum())
    assert delta_norm_sq(algo, tensors) == pytest.approx(dense, rel=1e-5)


def test_lora_norm_both_branches_and_nan():
    g = torch.Generator().manual_seed(0)
    for r, n in ((2, 64), (40, 16)):  # Gram branch, then dense branch (r large for the layer)
        t = {"lora_down.weight": torch.randn(r, n, generator=g), "lora_up.weight": torch.randn(n, r, generator=g),
             "alpha": torch.tensor(1.0)}
        dense = float(_independent_lora_dw(t["lora_down.weight"], t["lora_up.weight"], 1.0).square().sum())
        assert delta_norm_sq("lora", t) == pytest.approx(dense, rel=1e-5)
    t["lora_up.weight"][3, 1] = float("nan")
    assert delta_norm_sq("lora", t) != delta_norm_sq("lora", t)  # NaN propagates


# -- scaling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("algo,kw", LYCORIS_CASES, ids=[f"{a}-{'-'.join(k) or 'plain'}" for a, k in LYCORIS_CASES])
@pytest.mark.parametrize("w", [0.5, -1.25, 2.0])
def test_scaling_multiplies_the_change_by_w_not_w_squared(tmp_path, algo, kw, w):
    m = lycoris_module(algo, SMALL, 2, 3.0, **kw)
    path = write_lycoris(tmp_path / "l.safetensors", [m])
    lora = open_lora(path)
    (module,) = lora.layers.values()
    assert module.algo == algo
    with lora.reader() as r:
        before = r.tensors(module)
        after = scale_tensors(module.algo, before, w, name=module.name)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == 1  # exactly one factor moves; alpha never does
    assert torch.equal(before["alpha"], after["alpha"])
    # what LyCORIS does with the scaled tensors: the same module with them loaded
    fresh = lycoris_module(algo, SMALL, 2, 3.0, **kw)
    fresh.load_state_dict(after, strict=False)
    x = torch.randn(5, SMALL.in_features)
    fresh.eval()
    m.eval()
    with torch.no_grad():
        got = fresh(x) - fresh.org_forward(x)
        want = (m(x) - m.org_forward(x)) * w
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))


def test_dora_refuses_scaling_but_passes_weight_one(tmp_path):
    m = lycoris_module("lora", SMALL, 2, 2.0, weight_decompose=True)
    lora = open_lora(write_lycoris(tmp_path / "d.safetensors", [m]))
    (module,) = lora.layers.values()
    assert module.dora and module.kind == "lora+dora"
    with lora.reader() as r:
        t = r.tensors(module)
        assert scale_tensors(module.algo, t, 1.0, name=module.name) == t
        with pytest.raises(LoraFileError, match="DoRA.*cannot be scaled linearly"):
            scale_tensors(module.algo, t, 0.5, name=module.name)


def test_scaling_keeps_dtype_and_is_linear_in_bf16():
    g = torch.Generator().manual_seed(1)
    t = {"lora_down.weight": torch.randn(4, 16, generator=g).bfloat16(),
         "lora_up.weight": torch.randn(16, 4, generator=g).bfloat16(), "alpha": torch.tensor(4.0).bfloat16()}
    out = scale_tensors("lora", t, 0.3)
    assert out["lora_up.weight"].dtype == torch.bfloat16
    assert torch.allclose(delta_weight("lora", out), 0.3 * delta_weight("lora", t), rtol=1e-2, atol=1e-2)


# -- which model ------------------------------------------------------------------------------

def test_guess_model_from_cross_attention_width(tmp_path):
    assert guess_model(open_lora(write_sd1(tmp_path / "sd1.safetensors"))).model == "sd1"
    sd1 = guess_model(open_lora(tmp_path / "sd1.safetensors"))
    assert "768" in sd1.reason and "SD1" in sd1.reason
    sdxl = write_kohya(tmp_path / "xl.safetensors", full_attention_layers(["content"]), 2)
    assert guess_model(open_lora(sdxl)).model == "sdxl"
    sd2 = write_kohya(tmp_path / "sd2.safetensors",
                      [Layer("output_blocks.3.1.transformer_blocks.0.attn2.to_k", 1024, 1280)], 2)
    assert guess_model(open_lora(sd2)).model == "sd2"


def test_guess_model_from_layout_when_no_cross_attention(tmp_path):
    # an SD1.x LoRA of self-attention only: input_blocks.1.1 has attention in SD1, not in SDXL
    sd1 = write_kohya(tmp_path / "a.safetensors", [Layer("input_blocks.1.1.transformer_blocks.0.attn1.to_q", 320, 320)], 2)
    assert guess_model(open_lora(sd1)).model == "sd1"
    xl = write_kohya(tmp_path / "b.safetensors", [Layer("output_blocks.1.1.transformer_blocks.0.attn1.to_q", 1280, 1280)], 2)
    assert guess_model(open_lora(xl)).model == "sdxl"


CONV_CASES = [
    ("lora", {}), ("lora", {"use_tucker": True}), ("loha", {}), ("loha", {"use_tucker": True}),
    ("lokr", {"factor": 4}), ("lokr", {"factor": 4, "use_tucker": True, "decompose_both": True}),
]


@pytest.mark.parametrize("algo,kw", CONV_CASES, ids=[f"{a}-{'-'.join(k) or 'plain'}" for a, k in CONV_CASES])
def test_conv_layers_of_a_whole_unet_lycoris_file(algo, kw):
    """Whole-UNet LyCORIS files hold conv layers too (LoCon): inspect measures them right."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False)
    cls = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule}[algo]
    m = cls("lora_unet_input_blocks_1_0_in_layers_2", conv, 1.0, 2, 3.0, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith("org"):
                p.normal_(0, 0.2)
    tensors = {k: v.detach() for k, v in m.state_dict().items()}
    x = torch.randn(2, 16, 6, 6)
    m.eval()
    with torch.no_grad():
        seen = m(x) - conv(x)
    dw = delta_weight(algo, tensors).reshape(32, 16, 3, 3)
    assert torch.allclose(torch.nn.functional.conv2d(x, dw, padding=1), seen, atol=1e-5 * float(seen.abs().max()))
    assert delta_norm_sq(algo, tensors) == pytest.approx(float(dw.double().square().sum()), rel=1e-5)
