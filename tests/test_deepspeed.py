"""sd-scripts' ``--deepspeed --zero_stage N``: the wrapper, the parameter sets, the ZeRO-3 refusal, and a
real 2-process DeepSpeed run on the CPU (ZeRO 0, 1, 2 and 2 with accumulation) through accelerate's
DeepSpeed plugin, against one process on both ranks' samples (``tests/deepspeed_worker.py``).

DeepSpeed runs on a CPU: its CPU accelerator falls back to the gloo backend when Intel's oneCCL
bindings are missing, and ZeRO 1/2 partition with torch.distributed collectives.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blora_network
import ddp_worker
import deepspeed_worker as worker
from blora_network.errors import NetworkArgsError
from blora_network.files.safefile import load_tensors, read_metadata
from blora_network.sdxl.unet import TINY, build_unet

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(worker.__file__).resolve()
TRAINED = ["zero0", "zero1", "zero2", "zero2-accumulation"]


def _args(**kw):
    values = dict(deepspeed=True, zero_stage=2, fp8_base=False, network_train_unet_only=True)
    values.update(kw)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("algo,extra", [("lora", {}), ("loha", {}), ("lokr", {"factor": "2"}),
                                        ("lora", {"dora_wd": "true"}), ("loha", {"use_scalar": "true"})],
                         ids=["lora", "loha", "lokr", "dora", "use_scalar"])
def test_wrapper_sees_every_adapter_parameter_once_and_none_on_the_unet(algo, extra):
    unet = build_unet(TINY, seed=0)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content_style", algo=algo, **extra)
    network.apply_to(None, unet, False, True)
    unet.requires_grad_(False)
    groups, _ = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    wrapper = worker.DeepSpeedWrapper(unet=unet, network=network)
    record = worker.parameter_record(wrapper, unet, network, groups)
    assert record == {"network_params": record["network_params"], "group_params_equal_network": True,
                      "on_unet_tree": 0, "registered_twice": 0, "network_in_wrapper": True}
    assert record["network_params"] >= 2 * 160
    trainable = {id(p) for p in wrapper.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in network.parameters()}  # ZeRO partitions exactly the adapters
    assert not any(n.startswith("lora_") for n, _ in unet.named_children())


def test_zero3_is_refused_in_prepare_network_with_the_reason_and_the_alternative(unet):
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content")
    with pytest.raises(NetworkArgsError) as err:
        network.prepare_network(_args(zero_stage=3))
    text = str(err.value)
    assert "--zero_stage 3" in text and "forward" in text and "gather" in text and "--zero_stage 2" in text
    for stage in (0, 1, 2):
        network.prepare_network(_args(zero_stage=stage))
    network.prepare_network(_args(deepspeed=False, zero_stage=3))  # --zero_stage alone means nothing


def _deepspeed_unavailable() -> str:
    if not sys.platform.startswith("linux"):
        return f"DeepSpeed supports Linux (and WSL2) only; this is {sys.platform}"
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed: pip install deepspeed (the test extra installs it on Linux)"
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with gloo is needed for DeepSpeed's CPU accelerator"
    return ""


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    reason = _deepspeed_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("deepspeed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    modes = [*TRAINED, "zero3-unguarded"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(out), *modes]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=str(WORKER.parent.parent))
    assert proc.returncode == 0, f"DeepSpeed run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return out, {m: [torch.load(out / m / f"rank{r}.pt", weights_only=True) for r in range(2)] for m in modes}


@pytest.fixture(scope="module")
def references():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {m: ddp_worker.train_reference(m, checkpointing=False) for m in ("plain", "accumulation")}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("mode", TRAINED)
def test_deepspeed_engine_trains_the_adapters_like_one_process(ds_run, references, mode):
    _, runs = ds_run
    r0, r1 = runs[mode]
    stage, data_mode = worker.MODES[mode]
    for rec in (r0, r1):
        assert rec["engine"] == "DeepSpeedEngine" and rec["zero_stage"] == stage and rec["unwrapped_is_network"]
        assert rec["params"]["group_params_equal_network"] and rec["params"]["on_unet_tree"] == 0
        assert rec["params"]["registered_twice"] == 0 and rec["params"]["network_in_wrapper"]
    assert r0["losses"] != r1["losses"]  # different samples per rank ...
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])  # ... one result
    ref, init = references[data_mode]["state"], r0["initial"]
    moved = sum(float((ref[k] - init[k]).pow(2).sum()) for k in init) ** 0.5
    off = sum(float((r0["state"][k] - ref[k]).pow(2).sum()) for k in init) ** 0.5
    assert moved > 0 and off <= 0.01 * moved, (off, moved)  # the mean gradient over both ranks, not x2 or x0.5


@pytest.mark.slow
@pytest.mark.parametrize("mode", TRAINED)
def test_save_weights_on_the_plain_network_writes_the_same_file(ds_run, tmp_path, mode):
    out, runs = ds_run
    state = runs[mode][0]["state"]
    assert sorted(p.name for p in (out / mode).iterdir()) == ["blora.safetensors", "rank0.pt", "rank1.pt"]
    # the same weights saved by a network that never saw DeepSpeed
    unet, network, _ = ddp_worker.build(False)
    network.load_state_dict(state)
    plain = tmp_path / "plain.safetensors"
    network.save_weights(str(plain), torch.float32, {"ss_network_module": "blora_network"})
    ds_file, plain_file = load_tensors(out / mode / "blora.safetensors"), load_tensors(plain)
    assert ds_file.keys() == plain_file.keys() == state.keys()
    assert all(torch.equal(ds_file[k], plain_file[k]) for k in ds_file)
    assert read_metadata(out / mode / "blora.safetensors") == read_metadata(plain)


@pytest.mark.slow
def test_zero3_really_fails_without_the_refusal(ds_run):
    """Why prepare_network refuses ZeRO-3: the adapters' weights stay partitioned in LyCORIS's forward."""
    for rec in ds_run[1]["zero3-unguarded"]:
        assert rec["zero_stage"] == 3
        assert "error" in rec, "ZeRO-3 trained: LyCORIS or DeepSpeed changed; lift the refusal in prepare_network"
