"""Multi-GPU training the way sd-scripts does it: accelerate + DDP, here 2 CPU processes on gloo.

``tests/ddp_worker.py`` runs under ``torch.distributed.run --nproc_per_node 2``: each rank builds
the tiny SDXL UNet and our network with the same seed, ``accelerator.prepare(network, optimizer)``
makes the network the DDP module, and a few AdamW steps run on different samples per rank,
with sd-scripts' manual gradient all-reduce, gradient clipping, accelerate's gradient
accumulation (2 micro-batches) or ``--gradient_checkpointing``. The single-process reference
(:func:`ddp_worker.train_reference`) trains on the concatenation of both ranks' samples.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddp_worker as worker
from blora_network.files.safefile import load_tensors, read_metadata

pytest.importorskip("accelerate")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
MODES = list(worker.MODES)
WORKER = Path(worker.__file__).resolve()




@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(out), *MODES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(WORKER.parent.parent))
    assert proc.returncode == 0, f"DDP run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    ranks = {}
    for mode in MODES:
        ranks[mode] = [torch.load(out / mode / f"rank{r}.pt", weights_only=True) for r in range(worker.WORLD)]
    return out, ranks


@pytest.fixture(scope="module")
def references():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # checkpointing mode is compared with a run *without* checkpointing: same numbers expected
        return {mode: worker.train_reference(mode, checkpointing=False) for mode in MODES}
    finally:
        torch.set_num_threads(threads)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("mode", MODES)
def test_network_is_the_ddp_module_on_gloo(ddp_run, mode):
    _, ranks = ddp_run
    for rec in ranks[mode]:
        assert rec["network_is_ddp"] and rec["backend"] == "gloo"
        assert rec["checkpointed_modules"] > 0 if mode == "checkpointing" else rec["checkpointed_modules"] == 0
    if mode == "accumulation":  # accelerate syncs every second micro-batch
        assert ranks[mode][0]["sync_flags"] == [False, True, False, True]


@pytest.mark.parametrize("mode", MODES)
def test_every_rank_holds_bit_identical_adapters(ddp_run, mode):
    r0, r1 = ddp_run[1][mode]
    assert r0["initial"].keys() == r1["initial"].keys() == r0["state"].keys()
    assert all(torch.equal(r0["initial"][k], r1["initial"][k]) for k in r0["initial"])  # same seed, same start
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    moved = [k for k in r0["state"] if k.endswith(".weight") and not torch.equal(r0["state"][k], r0["initial"][k])]
    assert len(moved) == 2 * 160  # every lora_down and lora_up of content and style trained
    assert r0["losses"] != r1["losses"]  # ... on different samples per rank


@pytest.mark.parametrize("mode", MODES)
def test_gradients_are_averaged_like_one_process_on_the_concatenated_batch(ddp_run, references, mode):
    r0, r1 = ddp_run[1][mode]
    ref = references[mode]
    local0, local1 = r0["first_local_grads"], r1["first_local_grads"]
    # Before sd-scripts' manual all-reduce the ranks disagree: they saw different samples, and
    # DDP's own reducer never ran (the forward goes through the UNet, not the DDP module).
    assert any(not torch.equal(local0[k], local1[k]) for k in local0)
    # After it, both ranks hold the same gradient: the mean of theirs, i.e. the gradient of the
    # mean loss over both ranks' samples (and, with accumulation, over both micro-batches).
    scale = max(float(g.abs().max()) for g in ref["first_grads"].values())
    assert scale > 0
    assert all(torch.equal(r0["first_grads"][k], r1["first_grads"][k]) for k in local0)
    assert _max_diff(r0["first_grads"], {k: (local0[k] + local1[k]) / 2 for k in local0}) <= 1e-6 * scale
    assert _max_diff(r0["first_grads"], ref["first_grads"]) <= 1e-4 * scale  # not x2 (a sum) or x0.5
    # After the AdamW steps the weights agree with the reference up to float summation order
    # (Adam amplifies last-bit differences of near-zero gradients a little).
    init = {k: v.detach() for k, v in r0["initial"].items()}
    moved = sum(float((ref["state"][k] - init[k]).pow(2).sum()) for k in init) ** 0.5
    off = sum(float((r0["state"][k] - ref["state"][k]).pow(2).sum()) for k in init) ** 0.5
    assert moved > 0 and off <= 0.05 * moved, (off, moved)


@pytest.mark.parametrize("mode", MODES)
def test_only_rank_zero_writes_the_file(ddp_run, mode):
    out, ranks = ddp_run
    r0, r1 = ranks[mode]
    assert (r0["saved"], r1["saved"]) == (True, False)
    files = sorted(p.name for p in (out / mode).iterdir())
    assert files == ["blora.safetensors", "rank0.pt", "rank1.pt"]  # no temp file, no second file
    path = out / mode / "blora.safetensors"
    assert read_metadata(path)["test_written_by_rank"] == "0"
    tensors = load_tensors(path)
    assert not any(k.startswith("module.") for k in tensors)  # saved from the unwrapped network
    assert tensors.keys() == r0["state"].keys()
    assert all(torch.equal(tensors[k], r0["state"][k].float()) for k in tensors)
