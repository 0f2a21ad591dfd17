"""The block tools on any SDXL block (issue 20), exact, on a whole-UNet LoRA with full SDXL shapes.

The file holds every SDXL block sd-scripts' UNet has (the first transformer block of each attention
block, the resnets, samplers, time/label embeddings, ``out``) with LoRA, LoHa and LoKr Linear layers,
LoCon 3x3 convolutions and both text encoders, all at their full-size shapes. Every output is checked
against dW computed here, in float64, from the factors (this file's own formulas), times the weight
each layer must get. The weights a baked UI vector must give are applied the way each UI's code does,
re-derived for this test from their source (nothing copied):

- hako-mikan/sd-webui-lora-block-weight ``scripts/lora_block_weight.py`` (b403cb7): ``to26`` spreads a
  12/20-value SDXL vector over ``BLOCKID26`` (blocks left out: 0); ``ratiodealer`` gives a layer the
  slot of the last ``BLOCKS`` fragment its A1111 key contains, and a key none contains ratio 1; ``lbw``
  multiplies one factor by it.
- ltdrdata/ComfyUI-Inspire-Pack ``inspire/lora_block_weight.py`` (1aef2c5), ``load_lbw``: keys outside
  input/middle/output blocks take value 0; the others, sorted input, middle, output by the two characters
  after the block kind, take the next value when that number changes, the last one once the vector ends.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blora_network.cli.main import main as cli_main
from blora_network.files.safefile import read_metadata
from blora_network.sdxl.unet import FULL, build_unet, linear_layers
from blora_network.tools import transforms
from blora_network.tools.inspection import inspect

pytestmark = pytest.mark.usefixtures("one_thread")

RANK = 2


# -- the file -----------------------------------------------------------------------------------

_FF_IN = ("input_blocks.4.1.", "output_blocks.1.1.")
"""The blocks whose (large) ff layers are in the file too; the other blocks keep attention and proj only,
so the float64 checks stay quick."""


def _sampled_linear() -> list[tuple[str, int, int]]:
    """Every full-size Linear layer outside transformer blocks 1..9 (one transformer block per attention block)."""
    out = []
    for layer in linear_layers(FULL):
        m = re.search(r"\.transformer_blocks\.(\d+)\.", layer.name)
        if m and m.group(1) != "0" or (".ff.net." in layer.name and not layer.name.startswith(_FF_IN)):
            continue
        out.append((layer.name, layer.in_features, layer.out_features))
    return out


def _convs() -> list[tuple[str, int, int, int]]:
    """The first 3x3 convolution of every block (conv_in, resnets, samplers, out), full size."""
    unet = build_unet(FULL, device="meta")
    out, seen = [], set()
    for name, m in unet.named_modules():
        block = ".".join(name.split(".")[:2]) if name.startswith(("input_blocks", "output_blocks")) else name.split(".")[0]
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] == 3 and block not in seen:
            seen.add(block)
            out.append((name, m.in_channels, m.out_channels, m.kernel_size[0]))
    return out


def _factors(algo: str, out_f: int, in_f: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    if algo == "lora":
        return {"lora_down.weight": r(RANK, in_f), "lora_up.weight": r(out_f, RANK), "alpha": torch.tensor(1.0)}
    if algo == "loha":
        return {"hada_w1_a": r(out_f, RANK), "hada_w1_b": r(RANK, in_f), "hada_w2_a": r(out_f, RANK),
                "hada_w2_b": r(RANK, in_f), "alpha": torch.tensor(1.0)}
    # LoKr: w1 full [4, 4], w2 factorized [out/4, r] @ [r, in/4]
    return {"lokr_w1": r(4, 4), "lokr_w2_a": r(out_f // 4, RANK), "lokr_w2_b": r(RANK, in_f // 4),
            "alpha": torch.tensor(1.0)}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """``(path, {kohya module: (A1111 key, ComfyUI key)})`` of the whole-UNet file."""
    g = torch.Generator().manual_seed(7)
    sd, keys = {}, {}
    algos = ("lora", "loha", "lokr")
    for i, (path, in_f, out_f) in enumerate(_sampled_linear()):
        module = "lora_unet_" + path.replace(".", "_")
        sd.update({f"{module}.{k}": v for k, v in _factors(algos[i % 3], out_f, in_f, g).items()})
        keys[module] = ("diffusion_model_" + path.replace(".", "_"), f"diffusion_model.{path}.weight")
    for path, cin, cout, k in _convs():
        module = "lora_unet_" + path.replace(".", "_")
        sd[f"{module}.lora_down.weight"] = torch.randn(RANK, cin, k, k, generator=g) * 0.1
        sd[f"{module}.lora_up.weight"] = torch.randn(cout, RANK, 1, 1, generator=g) * 0.1
        sd[f"{module}.alpha"] = torch.tensor(1.0)
        keys[module] = ("diffusion_model_" + path.replace(".", "_"), f"diffusion_model.{path}.weight")
    for te, width, index in (("te1", 768, 0), ("te2", 1280, 1)):
        for layer in range(2):
            for j, proj in enumerate(("q_proj", "out_proj")):
                rest = f"text_model_encoder_layers_{layer}_self_attn_{proj}"
                module = f"lora_{te}_{rest}"
                sd.update({f"{module}.{k}": v for k, v in _factors(algos[j], width, width, g).items()})
                keys[module] = (f"conditioner_embedders_{index}_transformer_{rest}", f"clip_{te}.{rest}.weight")
    path = tmp_path_factory.mktemp("whole") / "whole.safetensors"
    save_file(sd, str(path))
    return path, keys


# -- dW in float64, this test's own formulas ------------------------------------------------------

def _dw(t: dict[str, torch.Tensor]) -> torch.Tensor:
    t = {k: v.double() for k, v in t.items()}
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        scale = t["alpha"].item() / down.shape[0]
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale
    if "hada_w1_a" in t:
        scale = t["alpha"].item() / t["hada_w1_b"].shape[0]
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale
    scale = t["alpha"].item() / t["lokr_w2_a"].shape[1]
    return torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * scale


def _layers(path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            module, _, suffix = key.partition(".")
            out.setdefault(module, {})[suffix] = f.get_tensor(key)
    return out


def assert_weighted(src, dst, weight_of) -> None:
    """Every layer of ``dst`` is ``weight_of(module)`` times the same layer of ``src`` (dW, float64);
    a layer of weight 0 is absent, every other layer present."""
    before, after = _layers(src), _layers(dst)
    expected = {m for m in before if weight_of(m) != 0.0}
    assert set(after) == expected, sorted(set(after) ^ expected)[:5]
    for module in expected:
        want = _dw(before[module]) * weight_of(module)
        got = _dw(after[module])
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item()), module


# -- the UIs, re-derived ---------------------------------------------------------------------------

BLOCKID26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
BLOCKID20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
FRAGMENTS = (["encoder"] + [f"diffusion_model_input_blocks_{i}_" for i in range(12)] + ["diffusion_model_middle_block_"]
             + [f"diffusion_model_output_blocks_{i}_" for i in range(12)] + ["embedders", "transformer_resblocks"])


def lbw_ratio(a1111_key: str, vector: list[float]) -> float:
    ids = {12: BLOCKID12, 20: BLOCKID20}[len(vector)]
    slots = [0.0] * 26
    for block, v in zip(ids, vector):
        slots[BLOCKID26.index(block)] = v
    ratio = 1.0
    for i, fragment in enumerate(FRAGMENTS):
        if fragment in a1111_key:
            ratio = slots[0 if i >= 26 else i]
    return ratio


def inspire_ratios(comfy_keys: list[str], vector: list[float]) -> dict[str, float]:
    unet, out = [], {}
    for key in comfy_keys:
        m = re.match(r"diffusion_model\.(input_blocks|middle_block|output_blocks)\.(.{2})", key)
        if m:
            two = m.group(2)
            unet.append((("input_blocks", "middle_block", "output_blocks").index(m.group(1)),
                         int(two[0]) if two[1] == "." else int(two), key))
        else:
            out[key] = vector[0]
    ratio, last, i = 1.0, None, 1
    for _, number, key in sorted(unet, key=lambda x: (x[0], x[1])):
        if number != last and i < len(vector):
            ratio, i = vector[i], i + 1
        last = number
        out[key] = ratio
    return out


# -- scale ------------------------------------------------------------------------------------------

def _lbw_block(module: str) -> str:
    """The test's own reading of a module's LBW block (for --block expectations)."""
    if module.startswith("lora_te"):
        return "BASE"
    m = re.match(r"lora_unet_(input_blocks|output_blocks)_(\d+)_", module)
    if m:
        return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"
    return "M00" if module.startswith("lora_unet_middle_block_") else "-"


def test_scale_any_block_exactly_every_algorithm(whole, tmp_path):
    src, _ = whole
    out = tmp_path / "s.safetensors"
    weights = {"OUT01": 0.5, "IN08": 0.0, "BASE": -1.0, "IN01": 3.0, "M00": 0.25, "content": 2.0}
    result = transforms.scale(src, weights, out)

    def weight_of(module):
        if module.startswith("lora_unet_output_blocks_0_1_"):
            return 2.0  # content: B-LoRA's transformer block only; its resnet output_blocks.0.0 keeps 1
        return {"OUT01": 0.5, "IN08": 0.0, "BASE": -1.0, "IN01": 3.0, "M00": 0.25}.get(_lbw_block(module), 1.0)

    assert_weighted(src, out, weight_of)
    assert result.applied == {"content": 2.0, "style": 0.5, "layout": 0.0, "M00": 0.25, "IN01": 3.0, "BASE": -1.0}
    meta = read_metadata(out)
    baked = json.loads(meta["blora_weights"])
    assert {k: baked.pop(k) for k in ("content", "style", "M00")} == {"content": 2.0, "style": 0.5, "M00": 0.25}
    assert set(baked.values()) == {1.0} and "OUT03" in baked
    assert "layout" not in json.loads(meta["blora_blocks"]) and "OUT03" in json.loads(meta["blora_blocks"])


@pytest.mark.parametrize("vector", [
    "1,0,0,0,0,0,1,0.6,0,0,0,0",  # the example: BASE, OUT00, OUT01 at 0.6; blocks a 12-vector leaves out: 0
    "0.5,0,1,0,0,-1,0,0,2,0,0.25,1,0,0,0,0,0,0,3,0",  # the 20-value notation
])
def test_a_baked_lbw_vector_changes_every_layer_as_the_extension_does(whole, tmp_path, vector):
    src, keys = whole
    out = tmp_path / "lbw.safetensors"
    transforms.scale(src, None, out, lbw=vector)
    values = [float(v) for v in vector.split(",")]
    assert_weighted(src, out, lambda m: lbw_ratio(keys[m][0], values))
    # time_embed, label_emb and out: no fragment names them, so the extension leaves them at 1
    kept = _layers(out)
    assert any(m.startswith("lora_unet_time_embed_") for m in kept) and any(m.startswith("lora_unet_out_") for m in kept)


@pytest.mark.parametrize("vector", [
    "0.5,1,0,2,0,0,-1,0,1,0,0,0.3",  # 12 values for ~20 blocks: the last value goes on
    ",".join(str(v) for v in [1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8,
                               1.9, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 9, 9, 9]),  # more values than blocks
])
def test_a_baked_inspire_vector_changes_every_layer_as_the_node_does(whole, tmp_path, vector):
    src, keys = whole
    out = tmp_path / "inspire.safetensors"
    transforms.scale(src, None, out, inspire=vector)
    ratios = inspire_ratios([k[1] for k in keys.values()], [float(v) for v in vector.split(",")])
    assert_weighted(src, out, lambda m: ratios[keys[m][1]])


# -- extract, split, combine -------------------------------------------------------------------------

def _is_attention(module: str) -> bool:
    return re.search(r"_attn[12]_(to_q|to_k|to_v|to_out_0)$", module) is not None


def test_extract_any_blocks_attention_or_all(whole, tmp_path):
    src, _ = whole
    a = tmp_path / "a.safetensors"
    transforms.extract(src, ["IN08", "OUT00", "OUT03"], a)
    chosen = ("lora_unet_input_blocks_8_1_", "lora_unet_output_blocks_0_1_", "lora_unet_output_blocks_3_1_")
    assert_weighted(src, a, lambda m: 1.0 if m.startswith(chosen) and _is_attention(m) else 0.0)
    assert json.loads(read_metadata(a)["blora_blocks"]) == {"content": "output_blocks.0.1", "layout": "input_blocks.8.1",
                                                            "OUT03": "output_blocks.3.1"}
    b = tmp_path / "b.safetensors"
    transforms.extract(src, ["IN01", "OUT03", "BASE"], b, layers="all")
    assert_weighted(src, b, lambda m: 1.0 if _lbw_block(m) in ("IN01", "OUT03", "BASE") else 0.0)


def test_split_any_blocks_one_file_each(whole, tmp_path):
    src, _ = whole
    result = transforms.split(src, out_dir=tmp_path, roles=["MID", "OUT03"], layers="transformer")
    assert [f.blocks for f in result.files] == [["M00"], ["OUT03"]]
    assert_weighted(src, tmp_path / "whole_M00.safetensors", lambda m: float(m.startswith("lora_unet_middle_block_1_")))
    assert_weighted(src, tmp_path / "whole_OUT03.safetensors", lambda m: float(m.startswith("lora_unet_output_blocks_3_1_")))


def test_combine_named_blocks_of_two_sdxl_loras(whole, tmp_path):
    src, _ = whole
    other = tmp_path / "other.safetensors"
    transforms.scale(src, {"OUT03": 3.0, "OUT01": -2.0}, other)  # a second LoRA, different where it matters
    out = tmp_path / "c.safetensors"
    code = cli_main(["combine", "--block", f"OUT00={src}", "--block", f"OUT01={other}", "--block", f"OUT03={other}",
                     "--weight", "OUT03=0.5", "--layers", "attention", "-o", str(out)])
    assert code == 0
    before, after = _layers(src), _layers(out)
    for module, tensors in after.items():
        want = _dw(before[module])
        if module.startswith("lora_unet_output_blocks_1_1_"):
            want = want * -2.0
        elif module.startswith("lora_unet_output_blocks_3_1_"):
            want = want * 1.5
        else:
            assert module.startswith("lora_unet_output_blocks_0_1_")
        assert _is_attention(module)
        assert torch.allclose(_dw(tensors), want, rtol=1e-5, atol=1e-6 * want.abs().max().item()), module
    assert len(after) == 3 * 8


# -- inspect: LBW names beside LDM ones, vectors over every block held -------------------------------

def test_inspect_names_every_block_and_offers_a_vector_for_all_it_holds(whole, capsys):
    src, keys = whole
    rep = inspect(src, norms=False)
    other = rep.blocks["other"]
    assert other.block_names["input_blocks.4.0"] == "IN04" and other.block_names["middle_block.2"] == "M00"
    assert other.block_names["text_encoder_2"] == "BASE" and "time_embed" not in other.block_names
    every = next(v for v in rep.block_weights if v.name == "every block held")
    values = [float(x) for x in every.lbw.split(",")]
    assert len(values) == 20 and all(v == 1.0 for v in values)  # every SDXL block is in this file
    ratios = inspire_ratios([k[1] for k in keys.values()], [float(x) for x in every.inspire.split(",")])
    assert set(ratios.values()) == {1.0}
    assert cli_main(["inspect", str(src), "--no-norms"]) == 0
    assert "input_blocks.4.1 IN04 (" in capsys.readouterr().out
