"""One rule, one owner: the rules several writers and readers share give the same answer everywhere.

- ``ss_network_dim`` / ``ss_network_alpha``: a training save and a tool output of it say the same
  (metadata.network_dim_alpha), also when blocks differ in rank and alpha;
- "alpha missing or 0 means alpha = rank" (algos.effective_alpha) in inspect, the writers' metadata,
  the network's summary, and LyCORIS's own reading of the file;
- the CLI's last line of defence: even an error we did not foresee is one line and an exit status.
"""

from __future__ import annotations

import json

import pytest
import torch

import blora_network
from blora_network.files.algos import effective_alpha
from blora_network.cli.main import main
from blora_network.files.algos import LayerRecord, network_dim_alpha
from blora_network.files.safefile import read_metadata
from blora_network.sdxl.unet import TINY, build_unet
from lora_factories import full_attention_layers, write_kohya

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_rule_itself():
    records = [LayerRecord("content", 8, 8.0), LayerRecord("style", 4, 16.0), LayerRecord(None, 8, 4.0)]
    assert network_dim_alpha(records) == (8, 8.0)  # the largest rank, and the largest alpha *at* that rank
    assert network_dim_alpha([LayerRecord("style", None, None)]) == (None, None)
    assert effective_alpha(None, 4) == effective_alpha(0, 4) == effective_alpha(0.0, 4) == 4.0
    assert effective_alpha(2.0, 4) == 2.0 and effective_alpha(None, None) is None


def test_training_save_and_tool_output_state_the_same_dim_and_alpha(tmp_path, capsys):
    """content_dim=8, style_dim=4 with style_alpha=16: the largest alpha (16) is not the alpha of the
    largest rank (8); the save once said alpha 16 where the tools said 8."""
    unet = build_unet(TINY)
    network = blora_network.create_network(1.0, 8, 1, None, None, unet, preset="content_style",
                                           content_dim="8", style_dim="4", style_alpha="16")
    network.apply_to(None, unet, False, True)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.normal_(std=0.1)
    saved = tmp_path / "trained.safetensors"
    network.save_weights(str(saved), torch.float32, {"ss_network_alpha": "1", "ss_network_dim": "8"})
    assert main(["scale", str(saved), "--content", "1", "--style", "1", "-o", str(tmp_path / "same.safetensors")]) == 0
    capsys.readouterr()
    a, b = read_metadata(saved), read_metadata(tmp_path / "same.safetensors")
    assert (a["ss_network_dim"], a["ss_network_alpha"]) == (b["ss_network_dim"], b["ss_network_alpha"]) == ("8", "8.0")
    assert json.loads(a["blora_block_dims"]) == json.loads(b["blora_block_dims"]) == {"content": 8, "style": 4}
    summary = network.block_summary()
    assert (summary["content"]["rank"], summary["style"]["rank"]) == (8, 4)


def test_alpha_zero_means_alpha_equals_rank_everywhere(tmp_path, capsys):
    layers = full_attention_layers(["content"])[:2]
    path = write_kohya(tmp_path / "zero.safetensors", layers, rank=4, alpha=0.0)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["blocks"]["content"]["alphas"] == [4.0]
    assert not any("differs from rank" in w for w in report["warnings"])
    assert main(["extract", str(path), "--blocks", "content", "-o", str(tmp_path / "x.safetensors")]) == 0
    capsys.readouterr()
    assert read_metadata(tmp_path / "x.safetensors")["ss_network_alpha"] == "4.0"
    # LyCORIS reads the file the same way: alpha 0 -> scale 1
    from blora_network.files.lorafile import open_lora

    lora = open_lora(path)
    with lora.reader() as r:
        from blora_network.files.algos import module_scale

        assert {module_scale("lora", r.tensors(m)) for m in lora.layers.values()} == {1.0}


def test_an_unforeseen_error_is_still_one_line_with_its_own_status(tmp_path, capsys, monkeypatch):
    from blora_network.tools import inspection

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(inspection, "inspect", broken)
    code = main(["inspect", str(tmp_path / "any.safetensors")])
    out, err = capsys.readouterr()
    assert code == 3 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "unexpected TypeError: unsupported operand" in lines[0] and "bug in blora-network" in lines[0]
