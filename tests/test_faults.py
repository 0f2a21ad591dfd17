"""Faults: a write that dies halfway, a tool killed mid-write, resuming, saving twice, and two
networks (ours and LyCORIS's own) in one process.

What a killed write can leave behind: every write goes to a hidden temporary file beside the
target (``.NAME.blora-tmp-HOST-PID-XXXXXXXX``), renamed over the target only when complete. An
exception or SIGTERM removes the temporary file; a SIGKILL cannot, so one may remain until the next
write to that folder removes it. The target is never touched until the rename.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import blora_network
import blora_network.files.safefile as safefile
import lycoris.kohya as lycoris_kohya
from blora_network.cli.main import main as cli_main
from blora_network.tools.demo import teacher_target
from blora_network.files.safefile import load_tensors, open_safetensors, read_metadata, write_safetensors_hashed
from blora_network.sdxl.unet import TINY, build_unet

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent




def _tensors(seed=0, n=4, size=64):
    g = torch.Generator().manual_seed(seed)
    return {f"lora_unet_output_blocks_0_1_transformer_blocks_{i}_attn1_to_q.lora_down.weight": torch.randn(4, size, generator=g)
            for i in range(n)}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".blora-tmp-" in p.name)


class DiskFull(OSError):
    pass


def _half_then_fail(real_save):
    """safetensors' save_file that writes half of the file, then hits 'disk full'."""

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise DiskFull(28, "No space left on device")

    return save_file


WRITERS = {
    "durable": lambda path, tensors: write_safetensors_hashed(path, tensors, {"ss_network_module": "blora_network"}),
    "not durable": lambda path, tensors: write_safetensors_hashed(path, tensors, {"ss_network_module": "blora_network"},
                                                                  durable=False),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "replacing"])
def test_write_failing_halfway_leaves_target_absent_or_intact(tmp_path, monkeypatch, writer, existing):
    target = tmp_path / "b.safetensors"
    if existing:
        WRITERS[writer](target, _tensors(seed=1))
        old_bytes, old_inode = target.read_bytes(), target.stat().st_ino
    monkeypatch.setattr(safefile, "st_save_file", _half_then_fail(safefile.st_save_file))
    with pytest.raises(OSError, match="No space left"):
        WRITERS[writer](target, _tensors(seed=2))
    assert _leftovers(tmp_path) == []
    if existing:
        assert target.read_bytes() == old_bytes and target.stat().st_ino == old_inode
        assert all(torch.equal(v, _tensors(seed=1)[k]) for k, v in load_tensors(target).items())
    else:
        assert not target.exists()


@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_failure_after_the_data_is_written(tmp_path, monkeypatch, stage):
    target = tmp_path / "b.safetensors"
    write_safetensors_hashed(target, _tensors(seed=1))
    old = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(safefile.os, "fsync" if stage == "fsync" else "replace", boom)
    with pytest.raises(OSError, match="Input/output error"):
        write_safetensors_hashed(target, _tensors(seed=2))
    monkeypatch.undo()
    assert target.read_bytes() == old and _leftovers(tmp_path) == []


def test_save_weights_failing_halfway_keeps_the_last_good_save(tmp_path, monkeypatch):
    """sd-scripts saves every N steps to the same name: a failed save must not cost the last one."""
    unet = build_unet(TINY)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content")
    network.apply_to(None, unet, False, True)
    target = tmp_path / "last.safetensors"
    network.save_weights(str(target), torch.float16, {"ss_steps": "1000"})
    good = target.read_bytes()
    monkeypatch.setattr(safefile, "st_save_file", _half_then_fail(safefile.st_save_file))
    with pytest.raises(OSError):
        network.save_weights(str(target), torch.float16, {"ss_steps": "2000"})
    assert target.read_bytes() == good and read_metadata(target)["ss_steps"] == "1000"
    assert _leftovers(tmp_path) == []


def test_cli_tool_failing_halfway_exits_1_and_keeps_the_old_output(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    unet = build_unet(TINY)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content_style")
    network.apply_to(None, unet, False, True)
    network.save_weights(str(src), None, {})
    assert cli_main(["scale", str(src), "--style", "0.5", "-o", str(out)]) == 0
    old = out.read_bytes()
    monkeypatch.setattr(safefile, "st_save_file", _half_then_fail(safefile.st_save_file))
    assert cli_main(["scale", str(src), "--style", "0.25", "-o", str(out), "--force"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == old and _leftovers(tmp_path) == []


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import blora_network.files.safefile as safefile
    from safetensors.torch import save

    def slow_save_file(tensors, filename, metadata=None):  # a slow disk: 1 MiB per 20 ms
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            for at in range(0, len(data), 1 << 20):
                f.write(data[at:at + (1 << 20)])
                f.flush()
                time.sleep(0.02)

    safefile.st_save_file = slow_save_file
    from blora_network.cli.main import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_tool_killed_mid_write_leaves_target_intact(tmp_path):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(10):  # about 50 MiB (SDXL's 1280-wide layers): the slow writer needs ~1 s
        name = f"lora_unet_output_blocks_1_1_transformer_blocks_{i}_attn1_to_q"
        tensors[f"{name}.lora_down.weight"] = torch.randn(512, 1280, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(1280, 512, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(512.0)
    write_safetensors_hashed(src, tensors)
    write_safetensors_hashed(out, _tensors(seed=5))  # the user's previous output
    old = out.read_bytes()
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), "scale", str(src), "--style", "0.5", "-o", str(out), "--force"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.glob(".out.safetensors.blora-tmp-*") if p.stat().st_size > (4 << 20)]
            if partial:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the writer finished before it could be killed: {proc.stderr.read()!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == old  # the target is untouched
    assert all(torch.equal(v, _tensors(seed=5)[k]) for k, v in load_tensors(out).items())
    left = _leftovers(tmp_path)
    assert left and all(n.startswith(".out.safetensors.") for n in left)  # only our hidden temp file
    # the next run replaces the target normally and removes the killed run's temporary file
    assert cli_main(["scale", str(src), "--style", "0.5", "-o", str(out), "--force"]) == 0
    assert load_tensors(out).keys() == tensors.keys()
    assert _leftovers(tmp_path) == []


# -- resume and save twice -----------------------------------------------------------------------


def _train(network, unet, batch, target, steps, lr=3e-3):
    x, t, c, y = batch
    groups, _ = network.prepare_optimizer_params(None, lr, lr)
    opt = torch.optim.AdamW(groups, lr=lr)
    network.on_epoch_start(None, unet)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(unet(x, t, c, y), target)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize("load_before_apply", [False, True], ids=["after-apply_to", "before-apply_to"])
def test_resume_with_network_weights_continues_from_the_same_weights(tmp_path, batch, load_before_apply):
    target = teacher_target(build_unet(TINY), "content_style", batch)
    unet = build_unet(TINY)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content_style")
    network.apply_to(None, unet, False, True)
    unet.requires_grad_(False)
    _train(network, unet, batch, target, steps=2)
    path = tmp_path / "step2.safetensors"
    network.save_weights(str(path), None, {})
    saved = {k: v.clone() for k, v in network.state_dict().items()}

    # a new process: create, apply_to, load_weights (--network_weights; the optimizer starts fresh)
    unet2 = build_unet(TINY)
    torch.manual_seed(123)  # another random init: loading must overwrite all of it
    resumed = blora_network.create_network(1.0, 4, 1, None, None, unet2, preset="content_style")
    if load_before_apply:
        resumed.load_weights(str(path))
        resumed.apply_to(None, unet2, False, True)
    else:
        resumed.apply_to(None, unet2, False, True)
        info = resumed.load_weights(str(path))
        assert not info.get("missing keys") and not info.get("unexpected keys")
    unet2.requires_grad_(False)
    state = resumed.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    # both continue identically: same losses, same weights after two more steps with a fresh optimizer
    cont = _train(network, unet, batch, target, steps=2)
    res = _train(resumed, unet2, batch, target, steps=2)
    assert cont == res
    state = resumed.state_dict()
    assert all(torch.equal(state[k], v) for k, v in network.state_dict().items())


def test_saving_twice_replaces_the_file_atomically(tmp_path):
    unet = build_unet(TINY)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content")
    network.apply_to(None, unet, False, True)
    path = tmp_path / "b.safetensors"
    network.save_weights(str(path), None, {"ss_steps": "1"})
    first_inode = path.stat().st_ino
    first = load_tensors(path)
    with open_safetensors(path) as reader:  # e.g. a UI that has the file open while training saves
        key = next(k for k in reader.keys() if k.endswith("lora_up.weight"))
        with torch.no_grad():
            for lora in network.unet_loras:
                lora.lora_up.weight.add_(1.0)
        network.save_weights(str(path), None, {"ss_steps": "2"})
        assert torch.equal(reader.get_tensor(key), first[key])  # the reader still sees one whole file
    assert path.stat().st_ino != first_inode  # a new file renamed over the old one, not rewritten in place
    second = load_tensors(path)
    assert read_metadata(path)["ss_steps"] == "2"
    assert all(torch.equal(second[k], v) for k, v in network.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() gives, not mkstemp's private 0600


# -- two networks in one process --------------------------------------------------------------------


def _lycoris_network(unet):
    torch.manual_seed(7)
    net = lycoris_kohya.create_network(1.0, 2, 2, None, None, unet, preset="attn-only")
    net.apply_to(None, unet, False, True)
    return net


def _ours(unet):
    torch.manual_seed(8)
    net = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content_style")
    net.apply_to(None, unet, False, True)
    return net


def _step(network, unet, batch, lr=1e-2):
    unet.requires_grad_(False)
    x, t, c, y = batch
    groups = network.prepare_optimizer_params(None, lr, lr)
    groups = groups[0] if isinstance(groups, tuple) else groups
    opt = torch.optim.SGD(groups, lr=lr)
    unet(x, t, c, y).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_lycoris_before_and_after_ours_no_state_leaks(batch):
    cls = lycoris_kohya.LycorisNetworkKohya
    class_state = {a: getattr(cls, a) for a in vars(cls) if a.isupper()}
    try:
        # each alone
        u_l, u_o = build_unet(TINY), build_unet(TINY)
        lyco_alone, ours_alone = _lycoris_network(u_l), _ours(u_o)
        for _ in range(2):
            _step(lyco_alone, u_l, batch)
        for _ in range(2):
            _step(ours_alone, u_o, batch)
        # together: LyCORIS's network first, ours, then LyCORIS's again; steps interleaved
        u1, u2, u3 = build_unet(TINY), build_unet(TINY), build_unet(TINY)
        before = _lycoris_network(u1)
        ours = _ours(u2)
        after = _lycoris_network(u3)
        for _ in range(2):
            for net, unet in ((before, u1), (ours, u2), (after, u3)):
                _step(net, unet, batch)
        lyco_state, ours_state = lyco_alone.state_dict(), ours_alone.state_dict()
        for net in (before, after):
            assert [m.lora_name for m in net.unet_loras] == [m.lora_name for m in lyco_alone.unet_loras]
            assert {type(m) for m in net.unet_loras} == {type(m) for m in lyco_alone.unet_loras}  # not our subclass
            state = net.state_dict()
            assert state.keys() == lyco_state.keys() and all(torch.equal(v, lyco_state[k]) for k, v in state.items())
        state = ours.state_dict()
        assert state.keys() == ours_state.keys() and all(torch.equal(v, ours_state[k]) for k, v in state.items())
        # each UNet carries only its own network: ours off gives u2 its base output back
        x, t, c, y = batch
        with torch.no_grad():
            ours.set_multiplier(0.0)
            assert torch.equal(u2(x, t, c, y), build_unet(TINY)(x, t, c, y))
            after.set_multiplier(0.0)
            assert torch.equal(u3(x, t, c, y), build_unet(TINY)(x, t, c, y))
    finally:
        for attr, value in class_state.items():  # LyCORIS's own create_network keeps its preset in the class
            setattr(cls, attr, value)
