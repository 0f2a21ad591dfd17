"""The demo a new user runs first: its device and thread choices, its output file, and --json.

The end-to-end runs go through a real subprocess (``python -m blora_network demo``), as a user
runs it, so what is checked is what a terminal or a script would see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blora_network.cli.main import main
from blora_network.tools.demo import choose_threads, resolve_device, train
from blora_network.errors import DeviceError
from blora_network.files.safefile import read_metadata

ROOT = Path(__file__).resolve().parent.parent


def _demo(tmp_path, *argv, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "blora_network", "demo", *map(str, argv)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_json_is_one_document_and_the_file_says_it_is_for_the_tiny_unet(tmp_path):
    run = _demo(tmp_path, "--json", "--steps", "2", "--dim", "2")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)  # nothing but the document: LyCORIS's log lines never reach stdout
    assert result["steps"] == 2 and result["file"] == "blora_demo.safetensors" and result["loss_after"] < result["loss_before"]
    assert result["torch"] == torch.__version__
    assert result["threads"] == (1 if result["device"] == "cpu" else None)
    meta = read_metadata(tmp_path / "blora_demo.safetensors")
    assert "tiny" in meta["blora_demo"] and "does not load on SDXL" in meta["blora_demo"]
    assert meta["modelspec.architecture"] != "stable-diffusion-xl-v1-base/lora"
    # inspect says so too, and still works on it
    inspected = subprocess.run([sys.executable, "-m", "blora_network", "inspect", "blora_demo.safetensors", "--json"],
                               cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    report = json.loads(inspected.stdout)
    assert report["model"] == "demo" and any("does not load on SDXL" in w for w in report["warnings"])
    # a second run does not replace the file silently
    again = _demo(tmp_path, "--steps", "1", "--dim", "2")
    assert again.returncode == 1 and "already exists; pass --force" in again.stderr
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert _demo(tmp_path, "--steps", "1", "--dim", "2", "--force").returncode == 0


def test_demo_text_output_names_device_threads_and_torch(tmp_path):
    run = _demo(tmp_path, "--steps", "1", "--dim", "2", "-o", "d.safetensors")
    assert run.returncode == 0, run.stderr
    first = run.stdout.splitlines()[0]
    assert f"torch {torch.__version__}" in first
    if not torch.cuda.is_available():
        assert "on cpu, 1 torch thread (the fastest for this tiny model; --threads N to change)" in first
    assert "not for SDXL" in run.stdout and "LyCORIS" not in run.stdout


def test_threads_are_chosen_on_purpose_and_restored(tmp_path):
    assert choose_threads(torch.device("cpu"), None) == 1
    assert choose_threads(torch.device("cpu"), 3) == 3
    assert choose_threads(torch.device("meta"), None) is None  # not the CPU: no thread setting
    before = torch.get_num_threads()
    seen = []
    import blora_network.tools.demo as demo

    real = demo._train

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    demo._train = spy
    try:
        train(steps=1, dim=2, device="cpu", output=str(tmp_path / "t.safetensors"))
    finally:
        demo._train = real
    assert seen == [1] and torch.get_num_threads() == before


@pytest.mark.parametrize("name", ["gpu", "cuda:7", "tpu", "cuda"])
def test_a_device_that_is_not_there_is_one_line_naming_the_devices(name, tmp_path, capsys):
    if name == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with pytest.raises(DeviceError, match="the devices here are: cpu"):
        resolve_device(name)
    code = main(["demo", "--device", name, "-o", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and f"--device {name}" in err and "devices here are" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_cpu_torch_says_cpu_only_build_for_cuda():
    if torch.cuda.is_available() or torch.version.cuda:
        pytest.skip("a CUDA build of torch")
    with pytest.raises(DeviceError, match=r"is a CPU-only build"):
        resolve_device("cuda")
