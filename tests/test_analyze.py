"""analyze: the size of a LoRA's change per UNet block and layer kind, checked against dW built
densely from the file's tensors; the suggestion rule at and around its thresholds; every
spelling giving the same numbers; the --plot PNG; and the CLI (--json, --top, one-line errors,
the missing-matplotlib message)."""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blora_network.tools import analyze as analyze_mod
from blora_network.tools.analyze import ALMOST_NONE, DOMINANT_SHARE, LOW_COVERAGE, PART_SHARE, analyze
from blora_network.cli.main import main
from blora_network.errors import LoraFileError
from lora_factories import (
    Layer,
    assert_one_line_cli_error,
    conv_lora,
    full_attention_layers,
    layers_of,
    lycoris_module,
    recording_progress,
    text_encoder_lora,
    write_diffusers,
    write_kohya,
    write_kohya_placed,
    write_lycoris,
    write_sd1,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the independent computation: dense dW from the file, the test's own block/kind rules ---------

def load(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def dense_energy(path) -> dict[str, float]:
    """kohya module -> ||(alpha / r) up @ down||_F^2, the full matrix in float64."""
    t = load(path)
    out = {}
    for key in t:
        if key.endswith(".lora_down.weight"):
            m = key[: -len(".lora_down.weight")]
            down = t[key].double().flatten(1)
            up = t[f"{m}.lora_up.weight"].double().flatten(1)
            alpha = float(t[f"{m}.alpha"]) if f"{m}.alpha" in t else down.shape[0]
            out[m] = float(((alpha / down.shape[0]) * (up @ down)).square().sum())
    return out


def block_of(module: str) -> str:
    m = re.match(r"^lora_unet_(input_blocks|output_blocks)_(\d+)_(\d+)_", module)
    if m:
        return f"{m[1]}.{m[2]}.{m[3]}"
    m = re.match(r"^lora_unet_middle_block_(\d+)_", module)
    if m:
        return f"middle_block.{m[1]}"
    m = re.match(r"^lora_unet_(time_embed|label_emb)_", module)
    if m:
        return m[1]
    assert module.startswith("lora_te"), module
    return "TE"


def kind_of(module: str) -> str:
    if "_attn1_" in module:
        return "self_attn"
    if "_attn2_" in module:
        return "cross_attn"
    if "_ff_net_" in module:
        return "ff"
    if module.endswith(("_proj_in", "_proj_out")):
        return "proj"
    return "other"


def expected(path):
    """block -> kind -> summed ||dW||^2, and the text-encoder total, from dense_energy."""
    blocks: dict[str, dict[str, float]] = {}
    te = 0.0
    for module, e in dense_energy(path).items():
        b = block_of(module)
        if b == "TE":
            te += e
            continue
        blocks.setdefault(b, {})
        k = kind_of(module)
        blocks[b][k] = blocks[b].get(k, 0.0) + e
    return blocks, te


ROLE_BLOCKS = {"content": "output_blocks.0.1", "style": "output_blocks.1.1", "layout": "input_blocks.8.1"}


def attention(blocks, block) -> float:
    return sum(blocks.get(block, {}).get(k, 0.0) for k in ("self_attn", "cross_attn"))


ROLES = ("content", "style", "layout")


def tiny_attention(roles):
    """The B-LoRA attention layers at the tiny test size (dense dW stays cheap)."""
    from blora_network.sdxl.unet import TINY

    return layers_of(TINY, roles=roles, attention_only=True)


@pytest.fixture(scope="module")
def tiny_layers():
    from blora_network.sdxl.unet import TINY

    return layers_of(TINY)


# -- the numbers --------------------------------------------------------------------------------

def test_per_block_and_per_kind_norms_and_shares_match_dense_dw(tmp_path, tiny_layers):
    """A whole-UNet LoRA (attention, ff, proj, embeddings, two convs, two text encoders) whose
    style block is 3x and middle block 0.5x: every number equals the dense computation."""
    extra = {**conv_lora("lora_unet_input_blocks_1_0_in_layers_2", 16, 16, seed=1),
             **conv_lora("lora_unet_output_blocks_8_0_out_layers_3", 16, 16, seed=2),
             **text_encoder_lora("te1", seed=3), **text_encoder_lora("te2", seed=4)}
    path = write_kohya_placed(tmp_path / "w.safetensors", tiny_layers, 4,
                              {"output_blocks.1.1.": 3.0, "middle_block.1.": 0.5}, alpha=2.0, extra=extra)
    rep = analyze(path)
    want, te = expected(path)
    total = sum(sum(k.values()) for k in want.values())

    assert [r.block for r in rep.blocks] == sorted(want, key=_order)  # UNet order
    assert rep.blocks[0].block == "time_embed" and rep.blocks[-1].block == "output_blocks.8.0"
    for r in rep.blocks:
        e = sum(want[r.block].values())
        assert r.norm == pytest.approx(math.sqrt(e), rel=1e-5), r.block
        assert r.share == pytest.approx(e / total, rel=1e-5), r.block
        assert set(r.kinds) == set(want[r.block])
        for k, n in r.kinds.items():
            assert n == pytest.approx(math.sqrt(want[r.block][k]), rel=1e-5), (r.block, k)
        assert r.role == {v: k for k, v in ROLE_BLOCKS.items()}.get(r.block)
    assert sum(r.share for r in rep.blocks) == pytest.approx(1.0)
    assert rep.unet_norm == pytest.approx(math.sqrt(total), rel=1e-5)
    assert rep.unet_modules == len(tiny_layers) + 2

    for k, kt in rep.kinds.items():
        e = sum(v.get(k, 0.0) for v in want.values())
        assert kt.norm == pytest.approx(math.sqrt(e), rel=1e-5) and kt.share == pytest.approx(e / total, rel=1e-5)
    assert rep.kinds["other"].modules == 2 + sum(1 for x in tiny_layers if kind_of("_" + x.name.replace(".", "_")) == "other")
    assert rep.kinds["proj"].modules == 2 * 11

    attn_unet = sum(attention(want, b) for b in want)
    attn_blora = sum(attention(want, b) for b in ROLE_BLOCKS.values())
    assert rep.blora_attention_share == pytest.approx(attn_blora / attn_unet, rel=1e-5)
    for s in rep.blora:
        assert s.block == ROLE_BLOCKS[s.role]
        assert s.share == pytest.approx(attention(want, s.block) / attn_blora, rel=1e-5)
        assert s.unet_attention_share == pytest.approx(attention(want, s.block) / attn_unet, rel=1e-5)
        assert s.attention_norm == pytest.approx(math.sqrt(attention(want, s.block)), rel=1e-5)

    # text encoders: apart, and in no UNet share
    assert [t.name for t in rep.text_encoders] == ["text_encoder_1", "text_encoder_2"]
    assert [t.modules for t in rep.text_encoders] == [2, 2]
    assert rep.text_encoder_norm == pytest.approx(math.sqrt(te), rel=1e-5)
    # style 3x: 9x the energy, so the style block is the largest B-LoRA block
    assert rep.suggestion.roles == ["style"]


def _order(block):
    head = block.split(".")[0]
    return ({"time_embed": 0, "label_emb": 1, "input_blocks": 2, "middle_block": 3, "output_blocks": 4}[head],
            [int(x) for x in re.findall(r"\d+", block)])


# -- the suggestion ----------------------------------------------------------------------------

@pytest.mark.parametrize("role,full", [("style", True), ("content", False), ("layout", False)])
def test_a_block_three_times_stronger_is_suggested_alone(tmp_path, role, full):
    """B-LoRA blocks (at full size: real shapes, so the model is recognised), one at 3x dW."""
    layers = full_attention_layers(ROLES) if full else tiny_attention(ROLES)
    path = write_kohya_placed(tmp_path / "dog.safetensors", layers, 4, {ROLE_BLOCKS[role] + ".": 3.0})
    rep = analyze(path)
    want, _ = expected(path)
    blora = sum(attention(want, b) for b in ROLE_BLOCKS.values())
    share = attention(want, ROLE_BLOCKS[role]) / blora
    assert share > 0.75  # about 9 / 11
    assert rep.model == ("sdxl" if full else "unknown") and rep.blora_attention_share == pytest.approx(1.0)
    assert rep.suggestion.roles == [role]
    assert rep.suggestion.text == (f"{round(100 * share)}% of the attention change in the B-LoRA blocks is in "
                                   f"{ROLE_BLOCKS[role]} ({role}): this LoRA is mostly {role}")
    out = path.with_name(f"dog_{role}.safetensors")
    assert rep.suggestion.command == f"blora-network extract {path} --blocks {role} -o {out}"
    assert rep.suggestion.kept_share == pytest.approx(share, rel=1e-5)  # attention-only file: all is attention
    # and the command does what it says
    assert main(rep.suggestion.command.split()[1:] + ["--no-progress"]) == 0
    assert next(s.share for s in analyze(out).blora if s.role == role) == pytest.approx(1.0)


def _base_attention(path) -> dict[str, float]:
    want, _ = expected(path)
    return {role: attention(want, b) for role, b in ROLE_BLOCKS.items()}


@pytest.mark.parametrize("target,roles", [(DOMINANT_SHARE + 0.02, ["style"]),
                                          (DOMINANT_SHARE - 0.02, ["content", "style"])])
def test_the_dominant_share_threshold(tmp_path, target, roles):
    """The style gain is solved for a style share just above / below 60% of the B-LoRA attention."""
    layers = tiny_attention(["content", "style"])
    base = _base_attention(write_kohya(tmp_path / "base.safetensors", layers, 4))
    gain = math.sqrt(target * base["content"] / ((1 - target) * base["style"]))
    rep = analyze(write_kohya_placed(tmp_path / "cs.safetensors", layers, 4, {"output_blocks.1.1.": gain}))
    style = next(s for s in rep.blora if s.role == "style")
    assert style.share == pytest.approx(target, abs=1e-5)
    assert rep.suggestion.roles == roles
    if len(roles) == 2:
        assert rep.suggestion.text.startswith(f"the attention change in the B-LoRA blocks is split (content "
                                              f"{round(100 * (1 - target))}%, style {round(100 * target)}%): this "
                                              "LoRA holds content and style")
        # the file holds exactly these layers: nothing to extract
        assert rep.suggestion.command is None and "holds only those layers already" in rep.suggestion.text
    else:
        assert "--blocks style" in rep.suggestion.command


def test_blocks_under_the_part_share_are_left_out(tmp_path):
    layers = tiny_attention(ROLES)
    base = _base_attention(write_kohya(tmp_path / "b.safetensors", layers, 4))
    # content 50%, style 35%, layout 15% (< PART_SHARE) of the B-LoRA attention
    gains = {f"{ROLE_BLOCKS[r]}.": math.sqrt(p / base[r]) for r, p in (("content", 0.5), ("style", 0.35), ("layout", 0.15))}
    rep = analyze(write_kohya_placed(tmp_path / "x.safetensors", layers, 4, gains))
    assert [round(s.share, 4) for s in rep.blora] == [0.5, 0.35, 0.15] and 0.15 < PART_SHARE
    assert rep.suggestion.roles == ["content", "style"]
    assert "--blocks content,style -o" in rep.suggestion.command
    assert rep.suggestion.text.endswith("this LoRA holds content and style")


@pytest.mark.parametrize("coverage,command,needle", [  # around ALMOST_NONE (5%) and LOW_COVERAGE (20%)
    (ALMOST_NONE - 0.02, False, "almost none of this LoRA's attention change is in the B-LoRA blocks (3%"),
    (0.12, True, "only 12% of its attention change is in the B-LoRA blocks"),
    (LOW_COVERAGE + 0.1, True, None),
])
def test_how_much_of_the_attention_change_the_blora_blocks_hold(tmp_path, tiny_layers, coverage, command, needle):
    """Whole-UNet LoRA; the B-LoRA blocks' gain is solved for a given share of the UNet's attention change."""
    base, _ = expected(write_kohya(tmp_path / "b.safetensors", tiny_layers, 4))
    inside = sum(attention(base, b) for b in ROLE_BLOCKS.values())
    outside = sum(attention(base, b) for b in base) - inside
    g = math.sqrt(coverage * outside / ((1 - coverage) * inside))
    gains = {f"{b}.": g for b in ROLE_BLOCKS.values()}
    rep = analyze(write_kohya_placed(tmp_path / "w.safetensors", tiny_layers, 4, gains))
    assert rep.blora_attention_share == pytest.approx(coverage, abs=1e-5)
    assert (rep.suggestion.command is not None) == command
    assert bool(rep.suggestion.roles) == command
    if needle:
        assert needle in rep.suggestion.text
    else:
        assert "only" not in rep.suggestion.text


def test_no_attention_in_the_blora_blocks_says_so_and_where_the_change_is(tmp_path):
    layers = [Layer("middle_block.1.transformer_blocks.0.attn2.to_k", 2048, 1280),
              Layer("input_blocks.4.1.transformer_blocks.1.attn1.to_q", 640, 640),
              Layer("output_blocks.0.1.transformer_blocks.0.ff.net.2", 5120, 1280)]  # content block, ff only
    path = write_kohya_placed(tmp_path / "m.safetensors", layers, 4, {"middle_block.1.": 5.0})
    rep = analyze(path)
    assert rep.suggestion.roles == [] and rep.suggestion.command is None
    assert rep.suggestion.text.startswith("this LoRA has no attention layers in the B-LoRA blocks (content "
                                          "output_blocks.0.1, style output_blocks.1.1, layout input_blocks.8.1)")
    assert "most of its change is in middle_block.1" in rep.suggestion.text
    assert [s.modules for s in rep.blora] == [0, 0, 0]
    assert next(r for r in rep.blocks if r.block == "output_blocks.0.1").kinds.keys() == {"ff"}


def test_an_all_zero_lora(tmp_path):
    path = write_kohya_placed(tmp_path / "z.safetensors", full_attention_layers(["style"]), 4, {"": 0.0})
    rep = analyze(path)
    assert rep.unet_norm == 0 and all(r.share == 0 for r in rep.blocks)
    assert rep.suggestion.command is None and "zero" in rep.suggestion.text
    assert any("zero" in w for w in rep.warnings)


def test_attention_layers_with_no_change_and_change_elsewhere(tmp_path):
    layers = full_attention_layers(["style"])[:4] + [Layer("middle_block.1.transformer_blocks.0.ff.net.2", 5120, 1280)]
    rep = analyze(write_kohya_placed(tmp_path / "f.safetensors", layers, 4, {"output_blocks.1.1.": 0.0}))
    assert rep.blora[1].modules == 4 and rep.blora[1].share == 0 and rep.blora_attention_share == 0
    assert rep.suggestion.command is None
    assert rep.suggestion.text.startswith("this LoRA changes no attention layer")
    assert "most of its change is in middle_block.1 (100%)" in rep.suggestion.text


# -- every spelling, every algorithm -----------------------------------------------------------

def _numbers(rep) -> dict:
    d = asdict(rep)
    for k in ("file", "spellings", "suggestion"):
        d.pop(k)
    return d


def _approx_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _approx_equal(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _approx_equal(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-12)
    else:
        assert a == b


def test_diffusers_named_kohya_keys_give_the_same_numbers(tmp_path, tiny_layers):
    gains = {"output_blocks.0.1.": 2.0}
    ldm = analyze(write_kohya_placed(tmp_path / "ldm.safetensors", tiny_layers, 4, gains))
    diff = write_kohya_placed(tmp_path / "diff.safetensors", tiny_layers, 4, gains, diffusers_blocks=True)
    assert any(k.startswith("lora_unet_up_blocks_0_attentions_0_") for k in load(diff))
    rep = analyze(diff)
    assert set(rep.spellings) == {"kohya", "kohya-diffusers"}
    _approx_equal(_numbers(rep), _numbers(ldm))
    assert rep.suggestion.roles == ldm.suggestion.roles == ["content"]


@pytest.mark.parametrize("peft,prefix", [(False, "unet."), (True, ""), (False, "unet.unet.")])
def test_original_blora_diffusers_and_peft_files_give_the_same_numbers(tmp_path, peft, prefix):
    layers = full_attention_layers(["content", "style"])
    kohya = analyze(write_kohya(tmp_path / "k.safetensors", layers, 4, seed=5))  # alpha = rank, as diffusers
    rep = analyze(write_diffusers(tmp_path / "d.safetensors", layers, 4, peft=peft, prefix=prefix, seed=5))
    _approx_equal(_numbers(rep), _numbers(kohya))


def test_diffusers_resnet_and_embedding_names_map_to_ldm_blocks(tmp_path):
    """The same conv/Linear tensors under diffusers-style kohya names and under LDM names."""
    pairs = {"lora_unet_down_blocks_1_resnets_0_conv1": "lora_unet_input_blocks_4_0_in_layers_2",
             "lora_unet_down_blocks_0_downsamplers_0_conv": "lora_unet_input_blocks_3_0_op",
             "lora_unet_mid_block_resnets_1_conv2": "lora_unet_middle_block_2_out_layers_3",
             "lora_unet_up_blocks_0_resnets_2_conv_shortcut": "lora_unet_output_blocks_2_0_skip_connection",
             "lora_unet_up_blocks_1_upsamplers_0_conv": "lora_unet_output_blocks_5_2_conv",
             "lora_unet_conv_in": "lora_unet_input_blocks_0_0",
             "lora_unet_time_embedding_linear_1": "lora_unet_time_embed_0",
             "lora_unet_add_embedding_linear_2": "lora_unet_label_emb_0_2"}
    diff, ldm = {}, {}
    for i, (d, l) in enumerate(pairs.items()):
        t = conv_lora(d, 8, 8, seed=i)
        diff.update(t)
        ldm.update({k.replace(d, l): v for k, v in t.items()})
    style = full_attention_layers(["style"])[:2]
    a = analyze(write_kohya(tmp_path / "d.safetensors", style, 4, extra=diff))
    b = analyze(write_kohya(tmp_path / "l.safetensors", style, 4, extra=ldm))
    assert [r.block for r in a.blocks] == [r.block for r in b.blocks] == [
        "time_embed", "label_emb", "input_blocks.0.0", "input_blocks.3.0", "input_blocks.4.0", "middle_block.2",
        "output_blocks.1.1", "output_blocks.2.0", "output_blocks.5.2"]
    _approx_equal(_numbers(a), _numbers(b))


def forward_dw(module) -> torch.Tensor:
    """dW^T as LyCORIS applies it: the module's forward on the identity, minus the base layer's."""
    eye = torch.eye(module.org_module[0].in_features)
    with torch.no_grad():
        return module(eye) - module.org_forward(eye)


def test_loha_lokr_norms_are_lycoris_own_dw_and_dora_is_not_measured(tmp_path):
    layers = full_attention_layers(["content"])[:3]
    mods = [lycoris_module("loha", layers[0], 4, 2.0), lycoris_module("lokr", layers[1], 4, 2.0, factor=8),
            lycoris_module("lora", layers[2], 4, 2.0, weight_decompose=True)]
    rep = analyze(write_lycoris(tmp_path / "l.safetensors", mods))
    want = [float(forward_dw(m).double().square().sum()) for m in mods[:2]]
    (row,) = rep.blocks
    assert row.block == "output_blocks.0.1" and row.modules == 2
    assert row.norm == pytest.approx(math.sqrt(sum(want)), rel=1e-5)
    assert rep.not_measured == [mods[2].lora_name]
    assert any("not measured" in w and "DoRA" in w for w in rep.warnings)


def test_nan_layers_are_left_out_with_a_warning(tmp_path):
    layers = full_attention_layers(["style"])[:4]
    path = write_kohya(tmp_path / "n.safetensors", layers, 4)
    t = load(path)
    bad = "lora_unet_" + layers[1].name.replace(".", "_")
    t[f"{bad}.lora_up.weight"][0, 0] = float("nan")
    save_file(t, str(path))
    rep = analyze(path)
    assert rep.not_measured == [bad] and rep.blocks[0].modules == 3
    assert any("NaN or Inf" in w and bad in w for w in rep.warnings)


# -- refusals ------------------------------------------------------------------------------------

def test_sd1_and_text_encoder_only_files_are_refused(tmp_path):
    with pytest.raises(LoraFileError, match="SD1.x LoRA.*768-wide"):
        analyze(write_sd1(tmp_path / "sd1.safetensors"))
    te = tmp_path / "te.safetensors"
    save_file(text_encoder_lora("te1"), str(te))
    with pytest.raises(LoraFileError, match="holds no UNet layers, only 2 text-encoder layers"):
        analyze(te)


# -- the chart ------------------------------------------------------------------------------------

def _png_size(path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def whole(tmp_path, tiny_layers):
    return write_kohya_placed(tmp_path / "whole.safetensors", tiny_layers, 4, {"output_blocks.1.1.": 3.0},
                              extra=text_encoder_lora("te1"))


def test_plot_writes_a_valid_png_of_the_expected_size(tmp_path, whole):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from blora_network.tools.plot import FIGSIZE, render

    out = render(analyze(whole), tmp_path / "chart.png")
    assert out == tmp_path / "chart.png" and out.stat().st_size > 10_000
    assert _png_size(out) == (int(FIGSIZE[0] * 100), int(FIGSIZE[1] * 100))
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1400, 900)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50  # a drawing, not a blank page
    import matplotlib.image

    assert matplotlib.image.imread(str(out)).shape[:2] == (900, 1400)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_plot_refuses_what_it_must_not_write(tmp_path, whole):
    pytest.importorskip("matplotlib")
    from blora_network.tools.plot import render

    rep = analyze(whole)
    (tmp_path / "old.png").write_bytes(b"x")
    with pytest.raises(LoraFileError, match="already exists; pass --force"):
        render(rep, tmp_path / "old.png")
    render(rep, tmp_path / "old.png", overwrite=True)
    assert _png_size(tmp_path / "old.png") == (1400, 900)
    with pytest.raises(LoraFileError, match="give a name ending in .png"):
        render(rep, tmp_path / "chart.jpg")
    with pytest.raises(LoraFileError, match="does not exist"):
        render(rep, tmp_path / "nowhere" / "c.png")
    odd = tmp_path / "lora.png"  # a LoRA under a picture's name is still never written over
    odd.write_bytes(whole.read_bytes())
    with pytest.raises(LoraFileError, match="refusing to write over an input file"):
        render(analyze(odd), odd, overwrite=True, inputs=[odd])
    assert odd.read_bytes() == whole.read_bytes()


def test_cli_plot(capsys, tmp_path, whole):
    pytest.importorskip("matplotlib")
    code, out, err = run(capsys, "analyze", str(whole), "--plot", str(tmp_path / "c.png"))
    assert code == 0 and f"wrote {tmp_path / 'c.png'}" in out and _png_size(tmp_path / "c.png") == (1400, 900)
    code, out, err = run(capsys, "analyze", str(whole), "--plot", str(tmp_path / "c.png"))
    assert_one_line_error(code, out, err, "c.png: already exists; pass --force")
    code, out, err = run(capsys, "analyze", str(whole), "--plot", str(tmp_path / "c.png"), "--force", "--json")
    assert code == 0 and json.loads(out)["plot"] == str(tmp_path / "c.png")


def test_without_matplotlib_plot_says_how_to_install_it(capsys, tmp_path, whole, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError

    def not_called(*a, **k):
        raise AssertionError("the check must come before the work")

    code, out, err = run(capsys, "analyze", str(whole), "--plot", str(tmp_path / "c.png"))
    assert_one_line_error(code, out, err, "--plot needs matplotlib", 'pip install "blora-network[plot]"',
                          "pip install matplotlib")
    assert not (tmp_path / "c.png").exists()
    monkeypatch.setattr(analyze_mod, "analyze", not_called)
    assert run(capsys, "analyze", str(whole), "--plot", str(tmp_path / "c.png"))[0] == 1
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run(capsys, "analyze", str(whole))  # the table needs no matplotlib
    assert code == 0 and "suggestion:" in out


# -- the command line ------------------------------------------------------------------------------

def run(capsys, *argv):
    code = main([*argv, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *needles):
    assert_one_line_cli_error(code, out, err, *needles, command="analyze")


def test_help_states_the_share_rule_and_has_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "example:" in out and "blora-network analyze" in out.split("example:")[1]
    assert "||dW||_F^2, which adds up over layers" in out and "60%" in out and "20%" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "analyze" in capsys.readouterr().out


def test_cli_table_top_and_suggestion(capsys, whole):
    code, out, err = run(capsys, "analyze", str(whole))
    assert code == 0 and err == ""
    lines = out.splitlines()
    rep = analyze(whole)
    assert lines[0].startswith(f"{whole}: model unknown, {rep.unet_modules} UNet layers (kohya names)")
    assert "text encoders: 2 layers" in lines[0] and "(not in the shares)" in lines[0]
    assert lines[1].split()[:5] == ["block", "role", "layers", "||dW||_F", "share"]
    assert lines[1].split()[5:] == ["self-attn", "cross-attn", "ff", "proj", "other"]
    style = next(x for x in lines if x.strip().startswith("output_blocks.1.1"))
    row = next(r for r in rep.blocks if r.block == "output_blocks.1.1")
    assert style.split()[1:5] == ["style", "OUT01", str(row.modules), f"{row.norm:.4f}"]
    assert style.split()[5] == f"{100 * row.share:.1f}%"
    assert len([x for x in lines if re.match(r"  (input|output)_blocks|  middle_block|  time_embed|  label_emb", x)]) \
        == len(rep.blocks)
    assert any(x.startswith("  UNet ") and "100.0%" in x for x in lines)
    assert f"suggestion: {rep.suggestion.text}" in lines
    assert f"  {rep.suggestion.command}" in lines

    code, out, _ = run(capsys, "analyze", str(whole), "--top", "3")
    rows = [x for x in out.splitlines() if re.match(r"  (input|output)_blocks|  middle_block", x)]
    top3 = sorted(rep.blocks, key=lambda r: -r.share)[:3]
    assert [x.split()[0] for x in rows] == [r.block for r in top3]
    assert f"... and {len(rep.blocks) - 3} more blocks" in out


def test_cli_json_schema(capsys, whole):
    code, out, _ = run(capsys, "analyze", str(whole), "--json")
    assert code == 0
    d = json.loads(out)
    assert set(d) == {"file", "model", "spellings", "unet_modules", "unet_norm", "blocks", "kinds", "blora",
                      "blora_attention_share", "text_encoders", "text_encoder_norm", "suggestion", "not_measured",
                      "warnings", "plot"}
    assert d["plot"] is None and d["file"] == str(whole)
    assert all(set(b) == {"block", "role", "lbw", "modules", "norm", "share", "kinds"} for b in d["blocks"])
    assert list(d["kinds"]) == ["self_attn", "cross_attn", "ff", "proj", "other"]
    assert all(set(k) == {"kind", "modules", "norm", "share"} for k in d["kinds"].values())
    assert [b["role"] for b in d["blora"]] == ["content", "style", "layout"]
    assert all(set(b) == {"role", "block", "lbw", "modules", "attention_norm", "share", "unet_attention_share"}
               for b in d["blora"])
    assert set(d["suggestion"]) == {"roles", "text", "command", "kept_share"}
    assert d["suggestion"]["roles"] == ["style"]
    assert d["text_encoders"] == [{"name": "text_encoder_1", "modules": 2, "norm": pytest.approx(d["text_encoder_norm"])}]


def test_cli_refusals_are_one_line(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "analyze", str(write_sd1(tmp_path / "sd15.safetensors"))),
                          "sd15.safetensors", "SD1.x LoRA", "768")
    assert_one_line_error(*run(capsys, "analyze", str(tmp_path / "missing.safetensors")), "no such file")
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(tmp_path / "x.safetensors"), "--top", "0"])
    assert e.value.code == 2


def test_progress_reports_every_byte_read(tmp_path, whole):
    bars, Bar = recording_progress()
    analyze(whole, progress=Bar)
    (bar,) = bars
    assert bar.desc == "reading whole.safetensors" and bar.closed and bar.done == bar.total > 0
