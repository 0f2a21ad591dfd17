"""Every subcommand over a file of every dtype users save LoRAs in: fp32, fp16, bf16, fp8 e4m3 and e5m2.

fp8 files exist (ComfyUI and Forge users quantize LoRAs to halve them) and once crashed every
writer: the NaN/Inf check summed an fp8 tensor, which torch cannot do on the CPU. Now the math
runs in float32 and each output tensor keeps its input's dtype; no subcommand ends in a traceback.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from blora_network.files.algos import delta_weight
from blora_network.cli.main import main
from lora_factories import full_attention_layers, kohya_name, write_diffusers, write_kohya

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
TOLERANCE = {"fp32": 1e-6, "fp16": 2e-3, "bf16": 1.5e-2, "fp8_e4m3fn": 0.12, "fp8_e5m2": 0.25}
"""Relative Frobenius error of a block's dW after a 0.7 weight is baked in and rounded to the dtype."""
LAYERS = full_attention_layers(["content"])[:3] + full_attention_layers(["style"])[:3]


def _layer_tensors(path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            module, _, suffix = key.partition(".")
            out.setdefault(module, {})[suffix] = f.get_tensor(key)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(params=sorted(DTYPES))
def dtype_file(request, tmp_path):
    name = request.param
    path = write_kohya(tmp_path / f"b_{name}.safetensors", LAYERS, rank=4, alpha=2.0, dtype=DTYPES[name])
    return name, path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert code == 0, err
    return out


def test_inspect_and_analyze_read_every_dtype(capsys, dtype_file):
    name, path = dtype_file
    report = json.loads(_run(capsys, "inspect", path, "--json"))
    assert report["dtypes"] == {name: 3 * len(LAYERS)}
    assert set(report["blocks"]) == {"content", "style"} and not report["nonfinite_tensors"]
    assert all(b["norm"] > 0 for b in report["blocks"].values())
    assert json.loads(_run(capsys, "analyze", path, "--json"))["blora"][0]["modules"] == 3


def test_writers_keep_the_dtype_and_the_change(capsys, tmp_path, dtype_file):
    name, path = dtype_file
    source = _layer_tensors(path)
    outputs = {
        "scale": (["scale", path, "--style", "0.7", "-o", tmp_path / "scaled.safetensors"], {"style": 0.7}),
        "combine": (["combine", "--content", path, "--style", path, "--style-weight", "0.7",
                     "-o", tmp_path / "combined.safetensors"], {"style": 0.7}),
        "extract": (["extract", path, "--blocks", "style", "-o", tmp_path / "extracted.safetensors"], {}),
    }
    for command, (argv, weights) in outputs.items():
        _run(capsys, *argv)
        written = _layer_tensors(argv[-1])
        assert written, command
        for module, tensors in written.items():
            assert tensors["lora_up.weight"].dtype == DTYPES[name], (command, module)
            assert tensors["lora_down.weight"].dtype == DTYPES[name], (command, module)
            w = weights.get("style" if "output_blocks_1_1" in module else "content", 1.0)
            want = w * delta_weight("lora", source[module])
            assert _rel(delta_weight("lora", tensors), want) <= TOLERANCE[name], (command, module)
    _run(capsys, "split", path, "--out-dir", tmp_path / "parts")
    for role in ("content", "style"):
        part = _layer_tensors(tmp_path / "parts" / f"{path.stem}_{role}.safetensors")
        assert {t.dtype for ts in part.values() for k, t in ts.items() if k != "alpha"} == {DTYPES[name]}


def test_convert_both_ways_in_every_dtype(capsys, tmp_path, dtype_file):
    name, path = dtype_file
    _run(capsys, "convert", path, "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {DTYPES[name]}
    original = write_diffusers(tmp_path / f"orig_{name}.safetensors", LAYERS, rank=4, dtype=DTYPES[name])
    _run(capsys, "convert", original, "-o", tmp_path / "k.safetensors")
    back = _layer_tensors(tmp_path / "k.safetensors")
    assert set(back) == {kohya_name(x.name) for x in LAYERS}
    for tensors in back.values():
        assert tensors["lora_up.weight"].dtype == DTYPES[name]
        # the alpha these formats imply (= rank) is written out; an fp8 alpha would round, so fp8 gets fp32
        assert float(tensors["alpha"]) == 4.0
        assert tensors["alpha"].dtype == (torch.float32 if DTYPES[name].itemsize == 1 else DTYPES[name])
