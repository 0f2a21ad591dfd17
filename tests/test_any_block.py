"""Any SDXL block by the name users know (issue 20): the one block table, and ``blocks=`` training.

Training goes through the calls sd-scripts makes (create_network, apply_to, prepare_optimizer_params,
save_weights) on the full-size UNet built on the meta device, and the layers per block are compared
with what ``plan`` reports for the same blocks.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import blora_network
from blora_network.errors import NetworkArgsError, PresetError
from blora_network.files.safefile import load_tensors, read_metadata
from blora_network.network.options import BLOCK_SETTING_KEYS, parse_network_args
from blora_network.network.presets import load_preset
from blora_network.sdxl.blocks import (ATTENTION_BLOCKS, BLOCKS, LABELS, SDXL_BLOCKS, label_of_kohya_name, lookup_sdxl_block,
                                       parse_sdxl_blocks, sdxl_block_of)
from blora_network.sdxl.names import SDXL_BLOCK_WIDTHS, block_of_kohya_name, diffusers_block_of_ldm_block, ldm_block_of_diffusers_block
from blora_network.sdxl.unet import FULL, build_unet, module_names
from blora_network.tools.plan import plan


# -- the table --------------------------------------------------------------------------------

def test_the_table_names_every_sdxl_block_once_with_its_ldm_and_diffusers_names():
    assert [b.name for b in SDXL_BLOCKS] == (["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"]
                                             + [f"OUT{i:02d}" for i in range(9)])  # LBW's BLOCKID20
    modules = dict(module_names(FULL))
    for b in SDXL_BLOCKS[1:]:
        assert any(m == b.ldm or m.startswith(b.ldm + ".") for m in modules), b  # every block exists in the UNet
        holds = any(cls == "Transformer2DModel" and m.startswith(b.ldm + ".") for m, cls in modules.items())
        assert holds == (b.attention is not None), b
        if b.attention:
            assert modules[b.attention] == "Transformer2DModel"
            # the diffusers name agrees with names.py's rule, both ways
            assert diffusers_block_of_ldm_block(b.attention) == b.diffusers_attention
            assert ldm_block_of_diffusers_block(b.diffusers_attention) == b.attention
    assert [b.name for b in ATTENTION_BLOCKS] == ["IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02",
                                                  "OUT03", "OUT04", "OUT05"]
    assert {b.role: (b.name, b.attention) for b in SDXL_BLOCKS if b.role} == {
        "content": ("OUT00", "output_blocks.0.1"), "style": ("OUT01", "output_blocks.1.1"),
        "layout": ("IN08", "input_blocks.8.1")}
    assert [(b.role, b.lbw) for b in BLOCKS] == [("content", "OUT00"), ("style", "OUT01"), ("layout", "IN08")]


@pytest.mark.parametrize("name, block", [
    ("OUT1", "OUT01"), ("out01", "OUT01"), ("style", "OUT01"), ("output_blocks.1.1", "OUT01"),
    ("up_blocks.0.attentions.1", "OUT01"), ("MID", "M00"), ("M00", "M00"), ("mid_block.attentions.0", "M00"),
    ("IN8", "IN08"), ("layout", "IN08"), ("BASE", "BASE"), ("conv_in", "IN00"), ("up_blocks.0.upsamplers.0", "OUT02"),
])
def test_a_block_by_any_of_its_names(name, block):
    assert lookup_sdxl_block(name).name == block


def test_a_typo_gets_a_did_you_mean_and_a_block_without_attention_says_so():
    with pytest.raises(ValueError, match=r"unknown SDXL block 'OUT001'; did you mean OUT01\?"):
        lookup_sdxl_block("OUT001")
    with pytest.raises(ValueError, match="did you mean style"):
        lookup_sdxl_block("stlye")
    with pytest.raises(ValueError, match=r"block OUT07 \(output_blocks.7\) holds no attention layers; blocks that do: IN04"):
        lookup_sdxl_block("OUT07", attention=True)
    with pytest.raises(ValueError, match="block OUT00 is named twice"):
        parse_sdxl_blocks("OUT00,content")


def test_every_layer_of_the_unet_falls_in_the_block_lbw_gives_it():
    for name, cls in module_names(FULL):
        if cls not in ("Linear", "Conv2d") or not name:
            continue
        block = sdxl_block_of(block_of_kohya_name("lora_unet_" + name.replace(".", "_")))
        top = name.split(".")[0]
        if top in ("time_embed", "label_emb", "out"):
            assert block is None, name  # no LBW slot names them
        else:
            assert name.startswith(block.ldm + "."), (name, block)


# -- blocks= training ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_unet():
    return build_unet(FULL, device="meta")


def _per_block(loras) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in loras:
        block = block_of_kohya_name(m.lora_name)
        out[block] = out.get(block, 0) + 1
    return out


@pytest.mark.parametrize("blocks", ["OUT00,OUT01,OUT03", "IN04,MID,OUT05", "OUT1,OUT3,OUT4,OUT5"])
def test_blocks_trains_the_attention_layers_plan_reports(full_unet, blocks):
    network = blora_network.create_network(1.0, 4, 1, None, None, full_unet, blocks=blocks, OUT05_lr="5e-5") \
        if "OUT5" in blocks or "OUT05" in blocks else blora_network.create_network(1.0, 4, 1, None, None, full_unet, blocks=blocks)
    report = plan(f"blocks={blocks}", 4)
    assert _per_block(network.unet_loras) == {b.block: b.modules for b in report.blocks}
    network.apply_to(None, full_unet, False, True)  # the calls sd-scripts makes next
    groups, descriptions = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    labels = [lookup_sdxl_block(b).label for b in blocks.split(",")]
    assert descriptions == [f"unet {label}" for label in sorted(labels, key=list(LABELS).index)]
    assert [len(g["params"]) for g in groups] == [2 * b.modules for b in sorted(
        report.blocks, key=lambda b: list(LABELS).index(lookup_sdxl_block(b.block).label))]
    assert [g["lr"] for g in groups] == [5e-5 if d == "unet OUT05" else 1e-4 for d in descriptions]
    wanted = parse_sdxl_blocks(blocks)
    assert [b.block for b in report.blocks] == [b.attention for b in wanted]
    for b in report.blocks:  # attention projections only: 8 per transformer block (10 deep at 1280, 2 at 640)
        assert all(re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", x) for x in b.layers)
        assert b.modules == 8 * (10 if SDXL_BLOCK_WIDTHS[b.block] == 1280 else 2)


def test_per_block_rank_alpha_lr_for_any_block(unet, tmp_path):
    network = blora_network.create_network(1.0, 8, 1, None, None, unet, blocks="OUT00,OUT01,OUT03,M00",
                                           OUT03_dim="4", OUT03_alpha="2", M00_lr="5e-5", style_dim="16")
    summary = network.block_summary()
    assert {k: (v["rank"], v["alpha"]) for k, v in summary.items()} == {
        "content": (8, 8.0), "style": (16, 16.0), "M00": (8, 8.0), "OUT03": (4, 2.0)}
    network.apply_to(None, unet, False, True)
    groups, descriptions = network.prepare_optimizer_params(None, 2e-4, 1e-3)
    assert descriptions == ["unet content", "unet style", "unet M00", "unet OUT03"]
    assert [g["lr"] for g in groups] == [2e-4, 2e-4, 5e-5, 2e-4]
    with torch.no_grad():
        for m in network.unet_loras:
            m.lora_up.weight.normal_(std=0.1)
    path = tmp_path / "blocks.safetensors"
    network.save_weights(str(path), None, {})
    meta = read_metadata(path)
    assert json.loads(meta["blora_blocks"]) == {"content": "output_blocks.0.1", "style": "output_blocks.1.1",
                                                "M00": "middle_block.1", "OUT03": "output_blocks.3.1"}
    assert json.loads(meta["blora_block_dims"]) == {"content": 8, "style": 16, "M00": 8, "OUT03": 4}
    assert meta["blora_preset"] == "blocks=M00,OUT00,OUT01,OUT03"
    ranks = {label_of_kohya_name(k): v.shape[0] for k, v in load_tensors(path).items() if k.endswith("lora_down.weight")}
    assert ranks == {"content": 8, "style": 16, "M00": 8, "OUT03": 4}


def test_block_keys_survive_the_kohya_gui_quoting():
    # kohya_ss's additional parameters pass [A-Za-z0-9_@%+=:,./-] unquoted
    for key in BLOCK_SETTING_KEYS:
        assert re.fullmatch(r"[A-Za-z0-9_]+", key), key
    assert {"OUT03_dim", "OUT03_alpha", "OUT03_lr", "M00_dim", "IN04_lr", "content_dim", "OUT00_dim"} <= set(BLOCK_SETTING_KEYS)
    assert not {k for k in BLOCK_SETTING_KEYS if k.startswith(("IN00", "IN01", "OUT06", "OUT08", "BASE"))}


@pytest.mark.parametrize("kwargs, message", [
    ({"blocks": "OUT00,OUT9"}, r"unknown SDXL block 'OUT9'; did you mean OUT08"),
    ({"blocks": "OUT00,OUT07"}, r"block OUT07 \(output_blocks.7\) holds no attention layers"),
    ({"blocks": "OUT00,content"}, r"block OUT00 is named twice"),
    ({"blocks": ""}, r"no block named"),
    ({"blocks": "OUT00", "preset": "style"}, r"both preset=style and blocks=OUT00"),
    ({"blocks": "OUT00", "OUT03_dim": "4"}, r"OUT03_dim: OUT03 is not among blocks=content"),
    ({"blocks": "OUT00", "content_dim": "4", "OUT00_dim": "8"}, r"content_dim and OUT00_dim set the same block's dim"),
    ({"blocks": "OUT03", "OUT07_dim": "4"}, r"OUT07_dim: block OUT07 \(output_blocks.7\) holds no attention"),
    ({"blocks": "OUT03", "OUT03_dmi": "4"}, r"unknown network_args key 'OUT03_dmi'. Did you mean 'OUT03_dim'\?"),
    ({"blocks": "OUT03", "OUT3_dim": "4"}, r"write the block as OUT03_dim"),
    ({"blocks": "OUT03", "OUT03_dim": "x"}, r"OUT03_dim='x': not an integer"),
    ({"blocks": "OUT03", "OUT03_lr": "-1"}, r"OUT03_lr=-1: a learning rate cannot be negative"),
])
def test_bad_blocks_args_are_one_line(unet, kwargs, message):
    with pytest.raises(NetworkArgsError, match=message) as e:
        blora_network.create_network(1.0, 8, 1, None, None, unet, **kwargs)
    assert "\n" not in str(e.value)


def test_plan_and_presets_take_blocks_too():
    assert load_preset("blocks=OUT3,MID").blocks == ("M00", "OUT03")
    with pytest.raises(PresetError, match="holds no attention"):
        load_preset("blocks=IN01")
    options = parse_network_args(8, None, {"blocks": "style,OUT02", "OUT02_dim": "4"})
    assert options.blocks == ("style", "OUT02") and options.block_dims == {"OUT02": 4}


def test_the_tools_read_the_trained_blocks_back(unet, tmp_path, capsys):
    from blora_network.cli.main import main as cli_main
    from blora_network.tools.inspection import inspect
    from blora_network.tools.transforms import split

    network = blora_network.create_network(1.0, 4, 1, None, None, unet, blocks="OUT03,M00,style")
    network.apply_to(None, unet, False, True)
    with torch.no_grad():
        for m in network.unet_loras:
            m.lora_up.weight.normal_(std=0.1)
    path = tmp_path / "three.safetensors"
    network.save_weights(str(path), None, {})
    rep = inspect(path, norms=False)
    assert list(rep.blocks) == ["style", "M00", "OUT03"]  # no "other": every layer is in a block it was trained on
    assert (rep.blocks["OUT03"].ldm, rep.blocks["OUT03"].lbw, rep.blocks["OUT03"].modules) == ("output_blocks.3.1", "OUT03", 16)
    assert not any("outside the B-LoRA blocks" in w for w in rep.warnings)
    result = split(path, out_dir=tmp_path / "parts")
    assert [f.blocks for f in result.files] == [["style"], ["M00"], ["OUT03"]] and result.skipped_modules == 0
    assert (tmp_path / "parts" / "three_OUT03.safetensors").exists()
    vectors = {v.name: (v.lbw, v.inspire) for v in rep.block_weights}
    # LBW: BASE,IN04,IN05,IN07,IN08,M00,OUT00..OUT05; Inspire: BASE, then this file's blocks by number change:
    # middle_block.1 and output_blocks.1 share a value there (load_lbw compares block numbers only), then output 3
    assert vectors["OUT03 only"] == ("0,0,0,0,0,0,0,0,0,1,0,0", "0,0,1,0,0,0,0,0,0,0,0,0")
    assert vectors["M00 only"] == ("0,0,0,0,0,1,0,0,0,0,0,0", "0,1,0,0,0,0,0,0,0,0,0,0")
    assert vectors["every block held"][0] == "0,0,0,0,0,1,0,1,0,1,0,0"
    assert cli_main(["inspect", str(path), "--no-norms"]) == 0
    assert "OUT03    output_blocks.3.1 OUT03" in capsys.readouterr().out


def test_a_preset_file_takes_the_same_per_block_keys(unet, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(r"unet_target_name = ['^(?!.*(ff\.net|proj)).*output_blocks\.3\.1\..*$', "
                    r"'^(?!.*(ff\.net|proj)).*output_blocks\.1\.1\..*$']" "\n[blora]\nOUT03_dim = 2\nstyle_alpha = 3\n")
    assert load_preset(str(path)).blocks == ("style", "OUT03")
    network = blora_network.create_network(1.0, 8, 1, None, None, unet, preset=str(path))
    summary = network.block_summary()
    assert (summary["OUT03"]["rank"], summary["style"]["alpha"]) == (2, 3.0)
