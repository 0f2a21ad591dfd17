"""Block-weight vectors, applied the way each UI applies them, to real files.

The two appliers below are re-derived for this test from the tools' source (nothing copied):
- hako-mikan/sd-webui-lora-block-weight ``scripts/lora_block_weight.py`` (b403cb7): ``BLOCKID12``,
  ``BLOCKID26``, the ``BLOCKS`` key fragments, ``to26`` and ``ratiodealer`` (a layer takes the
  weight of the last fragment its key contains; none: weight 1).
- ltdrdata/ComfyUI-Inspire-Pack ``inspire/lora_block_weight.py`` (1aef2c5), ``load_lbw``:
  UNet keys sorted input/middle/output by block number, one value per change of number; all
  other keys take value 0 (BASE).
"""

from __future__ import annotations

import json
import re

import pytest

from blora_network.sdxl.blocks import BLOCKS
from blora_network.tools.blockweights import LBW_SDXL_BLOCKS, inspire_blocks, lbw_slot
from blora_network.cli.main import main as cli_main
from blora_network.tools.inspection import inspect
from blora_network.sdxl.unet import TINY
from lora_factories import layers_of, text_encoder_lora, write_kohya

BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
BLOCKID26 = (["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])
LBW_FRAGMENTS = (["encoder"] + [f"diffusion_model_input_blocks_{i}_" for i in range(12)] + ["diffusion_model_middle_block_"]
                 + [f"diffusion_model_output_blocks_{i}_" for i in range(12)] + ["embedders", "transformer_resblocks"])


def lbw_apply(a1111_key: str, vector: str) -> float:
    values = [float(v) for v in vector.split(",")]
    assert len(values) == 12
    slots = [0.0] * 26
    for block_id, v in zip(BLOCKID12, values):
        slots[BLOCKID26.index(block_id)] = v
    ratio = 1.0
    for i, fragment in enumerate(LBW_FRAGMENTS):
        if fragment in a1111_key:
            ratio = slots[0 if i >= 26 else i]
    return ratio


def a1111_key(kohya_module: str) -> str:
    """How A1111/Forge name an SDXL LoRA layer (UNet: diffusion_model_..., text encoders: ...embedders_N_...)."""
    if kohya_module.startswith("lora_unet_"):
        return "diffusion_model_" + kohya_module[len("lora_unet_"):]
    m = re.match(r"lora_te(\d)_(.*)", kohya_module)
    return f"conditioner_embedders_{int(m.group(1)) - 1}_transformer_{m.group(2)}"


def inspire_apply(comfy_keys: list[str], vector: str) -> dict[str, float]:
    values = [float(v) for v in vector.split(",")]
    assert len(values) >= 12  # Inspire's validate
    groups = {"input_blocks": [], "middle_block": [], "output_blocks": []}
    out = {}
    for key in comfy_keys:
        m = re.match(r"diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)", key)
        if m:
            groups[m.group(1)].append((int(m.group(2)), key))
        else:
            out[key] = values[0]
    last, i = None, 0
    for kind in groups:
        for number, key in sorted(groups[kind], key=lambda x: x[0]):
            if number != last:
                i += 1
            last = number
            out[key] = values[i]
    return out


def comfy_key(layer) -> str:
    return f"diffusion_model.{layer.ldm_path}.weight" if layer.ldm_path else f"clip.{layer.name}.weight"


def applied(path, vectors):
    """{vector name: {layer name: (weight in A1111/Forge, weight in ComfyUI)}} for a real file."""
    from blora_network.files.lorafile import open_lora

    lora = open_lora(path)
    layers = list(lora.layers.values())
    out = {}
    for v in vectors:
        comfy = inspire_apply([comfy_key(m) for m in layers], v.inspire)
        out[v.name] = {m.name: (lbw_apply(a1111_key(m.name), v.lbw), comfy[comfy_key(m)]) for m in layers}
    return out, {m.name: m.role for m in layers}


@pytest.mark.parametrize("roles", [("content", "style"), ("content", "style", "layout"), ("style",), ("content",)])
def test_each_vector_selects_exactly_its_blocks_in_both_tools(tmp_path, roles):
    path = write_kohya(tmp_path / "b.safetensors", layers_of(TINY, roles=roles, attention_only=True))
    report = inspect(path, norms=False)
    names = [v.name for v in report.block_weights]
    expected = [f"{r} only" for r in roles] + (["content+style"] if {"content", "style"} <= set(roles) else [])
    assert names == expected + (["content+style+layout"] if len(roles) == 3 else [])
    weights, role_of = applied(path, report.block_weights)
    for v in report.block_weights:
        for name, (lbw, comfy) in weights[v.name].items():
            want = 1.0 if role_of[name] in v.roles else 0.0
            assert (lbw, comfy) == (want, want), (v.name, name)


def test_the_vectors_for_a_content_style_file(tmp_path):
    path = write_kohya(tmp_path / "b.safetensors", layers_of(TINY, roles=("content", "style"), attention_only=True))
    vectors = {v.name: (v.lbw, v.inspire) for v in inspect(path, norms=False).block_weights}
    assert vectors == {
        "content only": ("0,0,0,0,0,0,1,0,0,0,0,0", "0,1,0,0,0,0,0,0,0,0,0,0"),
        "style only": ("0,0,0,0,0,0,0,1,0,0,0,0", "0,0,1,0,0,0,0,0,0,0,0,0"),
        "content+style": ("0,0,0,0,0,0,1,1,0,0,0,0", "0,1,1,0,0,0,0,0,0,0,0,0"),
    }


def test_other_blocks_and_text_encoders_are_off(tmp_path):
    """A whole-UNet file with text-encoder layers: only the chosen B-LoRA block keeps weight 1."""
    layers = [x for x in layers_of(TINY) if ".transformer_blocks." in x.name]
    path = write_kohya(tmp_path / "whole.safetensors", layers, extra=text_encoder_lora("te1") | text_encoder_lora("te2"))
    report = inspect(path, norms=False)
    weights, role_of = applied(path, report.block_weights)
    assert {role_of[n] for n in weights["content only"]} >= {"content", "style", "layout", None}
    for v in report.block_weights:
        if v.name == "every block held":  # issue 20: the one vector that keeps everything, text encoders too
            assert all(pair == (1.0, 1.0) for pair in weights[v.name].values())
            continue
        for name, pair in weights[v.name].items():
            assert pair == ((1.0, 1.0) if role_of[name] in v.roles else (0.0, 0.0)), (v.name, name)


def test_notation_matches_the_extension_and_blocks_py():
    assert list(LBW_SDXL_BLOCKS) == BLOCKID12
    assert [lbw_slot(b.ldm) for b in BLOCKS] == ["OUT00", "OUT01", "IN08"]
    assert [b.lbw for b in BLOCKS] == ["OUT00", "OUT01", "IN08"]  # one table: sdxl.blocks.SDXL_BLOCKS
    assert lbw_slot("text_encoder_1") == "BASE" and lbw_slot("middle_block.1") == "M00"
    # Inspire compares block numbers only: input 8 followed by output 8 is one value there
    assert inspire_blocks(["input_blocks.8.1", "output_blocks.8.0", "output_blocks.0.1"]) == [
        ("input_blocks", 8), ("output_blocks", 0), ("output_blocks", 8)]
    assert inspire_blocks(["input_blocks.8.1", "output_blocks.8.0"]) == [("input_blocks", 8)]


def test_inspect_prints_them_and_json_carries_them(tmp_path, capsys):
    path = write_kohya(tmp_path / "b.safetensors", layers_of(TINY, roles=("content", "style"), attention_only=True))
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "block weights, content only: A1111/Forge lbw=0,0,0,0,0,0,1,0,0,0,0,0  ComfyUI Inspire 0,1,0,0,0,0,0,0,0,0,0,0" in out
    assert cli_main(["inspect", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in doc["block_weights"]] == ["content only", "style only", "content+style"]
    assert doc["block_weights"][1] == {"name": "style only", "roles": ["style"], "lbw": "0,0,0,0,0,0,0,1,0,0,0,0",
                                       "inspire": "0,0,1,0,0,0,0,0,0,0,0,0"}
