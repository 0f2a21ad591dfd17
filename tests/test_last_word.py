"""Signals, full disks and the last line: what a command says at its end is true, and nothing is left behind.

Real processes and real signals where the behaviour is about processes (a CLI started with
``python -m blora_network``, SIGTERM or SIGKILL sent while its temporary file exists), a real
full file system where the sandbox lets us mount one (a tmpfs filled to the brim), and every
writer the package has.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from blora_network.cli.main import SUBCOMMANDS, build_parser
from blora_network.cli.main import main as cli_main
from blora_network.errors import LoraFileError
from blora_network.files import safefile
from blora_network.files.safefile import STALE_AFTER_S, load_tensors, write_safetensors_hashed
from lora_factories import assert_one_line_cli_error, full_attention_layers, layers_of, write_diffusers, write_kohya
from blora_network.sdxl.unet import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

TEMP = re.compile(r"^\..*\.blora-tmp-[0-9a-f]{8}-\d+-[0-9a-f]{8}$")


def cli(*argv) -> int:
    return cli_main([str(a) for a in argv])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def big_lora(tmp_path_factory) -> Path:
    """~115 MB of content and style blocks at full SDXL width: a write that takes a while."""
    return write_kohya(tmp_path_factory.mktemp("big") / "big.safetensors",
                       full_attention_layers(["content", "style"]), rank=64)


@pytest.fixture(scope="module")
def small_lora(tmp_path_factory) -> Path:
    return write_kohya(tmp_path_factory.mktemp("small") / "small.safetensors",
                       layers_of(TINY, roles=["content", "style"]), rank=4)


def start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blora_network", *map(str, argv), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def when_a_temporary_file_appears(proc: subprocess.Popen, folder: Path, before: list[str]) -> bool:
    """Wait until ``proc`` has a hidden temporary file in ``folder``; False if it ended first."""
    while proc.poll() is None:
        if [n for n in hidden(folder) if n not in before]:
            return True
        time.sleep(0.001)
    return False


def signalled_during_write(folder: Path, argv: list, signum: int, tries: int = 4):
    """Start the CLI, send ``signum`` as soon as its temporary file exists; ``(proc, stdout, stderr)``."""
    for _ in range(tries):
        before = hidden(folder)
        proc = start(*argv)
        if when_a_temporary_file_appears(proc, folder, before):
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=120)
            return proc, out, err
        proc.communicate(timeout=120)
    pytest.fail(f"the write finished before its temporary file was seen, {tries} times")


# -- 1. SIGTERM is Ctrl-C during a write; a SIGKILL's leftover is removed by the next write --------------------


def test_sigterm_during_a_replace_leaves_no_temporary_file_and_says_what_became_of_the_file(big_lora, tmp_path):
    target = tmp_path / "out.safetensors"
    shutil.copy(big_lora, target)
    original = digest(target)
    proc, out, err = signalled_during_write(tmp_path, ["scale", big_lora, "--style", "0.5", "-o", target, "--force"],
                                            signal.SIGTERM)
    assert hidden(tmp_path) == [], "the temporary file was left behind"
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blora-network scale: terminated (SIGTERM);"), err
    if digest(target) == original:
        assert f"{target} is untouched" in lines[0]
    else:  # the signal came after the rename: the file is complete, and the line says so
        assert f"{target} was replaced (complete)" in lines[0]
        assert load_tensors(target)


def test_sigkill_leftover_is_recognisable_and_the_next_write_removes_it(big_lora, small_lora, tmp_path):
    target = tmp_path / "out.safetensors"
    proc, _, _ = signalled_during_write(tmp_path, ["scale", big_lora, "--style", "0.5", "-o", target], signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    left = hidden(tmp_path)
    assert len(left) == 1 and TEMP.match(left[0]) and left[0].startswith(".out.safetensors."), left
    done = subprocess.run([sys.executable, "-m", "blora_network", "scale", small_lora, "--style", "0.5",
                           "-o", tmp_path / "next.safetensors"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert hidden(tmp_path) == []
    said = [line for line in done.stderr.splitlines() if "temporary file" in line]
    assert len(said) == 1 and f"{tmp_path}: removed 1 temporary file" in said[0] and left[0] in said[0], done.stderr


def test_which_leftovers_are_stale(tmp_path):
    """Dead PID on this machine, or untouched for hours: removed. A live writer's, another machine's recent
    one, and files that are not ours: kept."""
    host = safefile._host_tag()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {
            "dead": f".a.safetensors.blora-tmp-{host}-{dead.pid}-0123abcd",
            "live": f".a.safetensors.blora-tmp-{host}-{sleeper.pid}-0123abcd",
            "elsewhere": f".a.safetensors.blora-tmp-00000000-{dead.pid}-0123abcd",
            "elsewhere_old": f".b.safetensors.blora-tmp-00000000-{sleeper.pid}-0123abcd",
            "not_ours": ".a.safetensors.k2j3h4.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"x" * 100)
        old = time.time() - STALE_AFTER_S - 60
        os.utime(tmp_path / names["elsewhere_old"], (old, old))
        write_safetensors_hashed(tmp_path / "new.safetensors", {"w": torch.ones(4)}, {})
        assert set(hidden(tmp_path)) == {names["live"], names["elsewhere"], names["not_ours"]}
    finally:
        sleeper.kill()
        sleeper.wait()


LIBRARY_WRITER = textwrap.dedent("""
    import sys, torch
    from blora_network.files.safefile import save_pickle, write_safetensors_hashed
    tensors = {f"t{i}": torch.randn(1024, 1024) for i in range(32)}   # 128 MiB, as a training save
    write = save_pickle if sys.argv[1].endswith(".pt") else write_safetensors_hashed
    while True:   # sd-scripts saving every few steps; the parent kills it during a save
        write(sys.argv[1], tensors)
""")


@pytest.mark.parametrize("name", ["last.safetensors", "last.pt"])
def test_sigterm_during_a_training_save_removes_the_temporary_file(tmp_path, name):
    """In sd-scripts' process nobody handles SIGTERM: the save cleans up, then the process still dies of SIGTERM."""
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", LIBRARY_WRITER, str(tmp_path / name)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if when_a_temporary_file_appears(proc, tmp_path, []):
            break
    else:
        pytest.fail("the save never started")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err
    assert hidden(tmp_path) == [], "the temporary file was left behind"


# -- 2. Ctrl-C around a --force replace: the last line says what happened ---------------------------------------


def _interrupt_at_rename(monkeypatch, after: bool):
    real = os.replace

    def replace(src, dst, *a, **kw):
        if ".blora-tmp-" not in str(src):
            return real(src, dst, *a, **kw)
        if after:
            real(src, dst, *a, **kw)
        raise KeyboardInterrupt  # Ctrl-C just before or just after the rename system call

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("after, exists, said", [
    (True, True, "{out} was replaced (complete)"),
    (False, True, "{out} is untouched"),
    (True, False, "{out} was written (complete)"),
    (False, False, "{out} was not written"),
])
def test_ctrl_c_around_the_rename_is_reported_truly(small_lora, tmp_path, monkeypatch, capsys, after, exists, said):
    out = tmp_path / "out.safetensors"
    if exists:
        shutil.copy(small_lora, out)
    before = digest(out) if exists else None
    _interrupt_at_rename(monkeypatch, after)
    code = cli("scale", small_lora, "--style", "0.5", "-o", out, "--force")
    err = capsys.readouterr().err.strip()
    assert code == 130 and err.startswith("blora-network scale: interrupted;"), err
    assert said.format(out=out) in err
    assert "no partial file" not in err
    if after:
        assert digest(out) != before
    else:
        assert (digest(out) == before) if exists else not out.exists()
    assert hidden(tmp_path) == []


def test_ctrl_c_before_any_write_says_so(small_lora, tmp_path, monkeypatch, capsys):
    import blora_network.tools.transforms as transforms

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(transforms, "open_sdxl_lora", interrupted)
    assert cli("scale", small_lora, "--style", "0.5", "-o", tmp_path / "o.safetensors") == 130
    assert "interrupted before any file was written" in capsys.readouterr().err


# -- 3. A full disk: one line naming the path, exit 1, nothing left -------------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    """A real file system with no space left: a 512 KiB tmpfs filled to the brim."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}): a full disk needs one")
    try:
        with contextlib.suppress(OSError), open(mount / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _left_on(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.iterdir() if p.name != "filler")


@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory) -> Path:
    return write_diffusers(tmp_path_factory.mktemp("d") / "d.safetensors", layers_of(TINY, roles=["content", "style"]))


@pytest.mark.parametrize("command, argv, target", [
    ("scale", ["{small}", "--style", "0.5", "-o", "{disk}/o.safetensors"], "{disk}/o.safetensors"),
    ("extract", ["{small}", "--blocks", "style", "-o", "{disk}/o.safetensors"], "{disk}/o.safetensors"),
    ("combine", ["--content", "{small}", "--style", "{small}", "-o", "{disk}/o.safetensors"], "{disk}/o.safetensors"),
    ("convert", ["{diffusers}", "-o", "{disk}/o.safetensors"], "{disk}/o.safetensors"),
    ("split", ["{small}", "--out-dir", "{disk}/parts"], "{disk}/parts/small_content.safetensors"),
    ("analyze", ["{small}", "--plot", "{disk}/o.png"], "{disk}/o.png"),
    ("demo", ["--no-progress", "--steps", "1", "--dim", "2", "-o", "{disk}/o.safetensors"], "{disk}/o.safetensors"),
])
def test_a_full_disk_is_one_line_naming_the_path(full_disk, small_lora, diffusers_lora, capsys, command, argv, target):
    fill = dict(small=small_lora, disk=full_disk, diffusers=diffusers_lora)
    code = cli(command, *[a.format(**fill) for a in argv])
    out, err = capsys.readouterr()
    assert_one_line_cli_error(code, out, err, target.format(**fill), "No space left on device (ENOSPC)",
                              "free space", command=command)
    assert "bug" not in err and "[Errno" not in err
    assert _left_on(full_disk) == []  # no temporary file, no half file, no folder made for it


def test_recipe_on_a_full_disk_leaves_no_folder(full_disk, tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "photos"
    images.mkdir()
    Image.new("RGB", (1024, 1024)).save(images / "a.png")
    code = cli("recipe", images, "--model", "stabilityai/stable-diffusion-xl-base-1.0", "-o", full_disk / "run" / "configs")
    out, err = capsys.readouterr()
    assert_one_line_cli_error(code, out, err, str(full_disk / "run" / "configs"), "No space left on device (ENOSPC)",
                              command="recipe")
    assert _left_on(full_disk) == []


@pytest.mark.parametrize("name", ["last.safetensors", "last.pt"])
def test_a_training_save_on_a_full_disk_names_the_file(full_disk, name):
    import blora_network
    from blora_network.sdxl.unet import build_unet

    unet = build_unet(TINY)
    network = blora_network.create_network(1.0, 4, 4, None, None, unet)
    network.apply_to(None, unet, False, True)
    with pytest.raises(LoraFileError, match=re.escape(f"{full_disk / name}: cannot write: No space left on device")):
        network.save_weights(str(full_disk / name), torch.float32, {})
    assert _left_on(full_disk) == []


def test_file_size_limit_is_named_too(small_lora, tmp_path):
    """EFBIG (``ulimit -f``) through a real child process: the same one line, another fix."""
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
              "from blora_network.cli.main import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "o.safetensors"
    done = subprocess.run([sys.executable, "-c", script, "scale", str(small_lora), "--style", "0.5", "-o", str(out)],
                          capture_output=True, text=True)
    assert_one_line_cli_error(done.returncode, done.stdout, done.stderr, str(out), "File too large (EFBIG)",
                              "ulimit -f", command="scale")
    assert hidden(tmp_path) == [] and not out.exists()


# -- 4. Bad paths and numbers are usage errors, said as they are --------------------------------------------------


@pytest.mark.parametrize("argv, code, words", [
    (["scale", "{small}", "--style", "0.5", "-o", ""], 2, ["argument -o/--output: empty"]),
    (["demo", "-o", ""], 2, ["argument -o/--output: empty"]),
    (["analyze", "{small}", "--plot", ""], 2, ["argument --plot: empty"]),
    (["split", "{small}", "--out-dir", ""], 2, ["argument --out-dir: empty"]),
    (["recipe", "{tmp}", "--model", "m", "-o", ""], 2, ["argument -o/--out-dir: empty"]),
    (["demo", "--lr", "-1"], 2, ["argument --lr: must be a finite number above 0, not -1"]),
    (["demo", "--lr", "0"], 2, ["argument --lr: must be a finite number above 0"]),
    (["demo", "--lr", "inf"], 2, ["argument --lr: must be a finite number above 0"]),
    (["demo", "--steps", "0"], 2, ["argument --steps: must be at least 1"]),
    (["split", "{small}", "--out-dir", "{small}"], 1, ["{small}: is a file, not a folder"]),
    (["scale", "{small}", "--style", "0.5", "-o", "{tmp}"], 1, ["{tmp}: is a folder; give a file name ending in .safetensors"]),
    (["analyze", "{small}", "--plot", "{tmp}"], 1, ["{tmp}: is a folder; give a file name ending in .png"]),
    (["scale", "{small}", "--style", "0.5", "-o", "{tmp}/" + "a" * 300 + ".safetensors"], 1,
     ["File name too long (ENAMETOOLONG); choose a shorter name"]),
    (["split", "{small}", "--out-dir", "{tmp}/" + "a" * 300], 1, ["File name too long (ENAMETOOLONG)"]),
    (["analyze", "{small}", "--plot", "{tmp}/" + "a" * 300 + ".png"], 1, ["File name too long (ENAMETOOLONG)"]),
])
def test_bad_paths_and_numbers_are_named(small_lora, tmp_path, capsys, argv, code, words):
    fill = dict(small=small_lora, tmp=tmp_path)
    argv = [a.format(**fill) for a in argv]
    if code == 2:
        with pytest.raises(SystemExit) as e:
            cli(*argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
    else:
        assert cli(*argv) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
    assert "bug" not in err and "did you mean" not in err
    for w in words:
        assert w.format(**fill) in err, err


# -- 5. No option may be given twice, in any subcommand ----------------------------------------------------------


def _a_value(action: argparse.Action) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(list(action.choices)[0])]
    for candidate in ("2", "0.5", "style", "x.safetensors"):
        try:
            (action.type or str)(candidate)
            return [candidate]
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            continue
    raise AssertionError(f"no value for {action.option_strings}")


def _options():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in SUBCOMMANDS:
        sub = subparsers.choices[command.name]
        for action in sub._actions:
            if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._AppendAction)):
                yield pytest.param(command.name, action, id=f"{command.name} {action.option_strings[-1]}")


def test_the_options_meant_to_repeat_do():
    """``scale --block OUT01=0.5 --block IN08=0`` and ``combine --block``/``--weight`` collect every value;
    they are the only options that may be given twice (a block named twice is refused by the tool)."""
    parser = build_parser()
    args = parser.parse_args(["scale", "in.safetensors", "--block", "OUT01=0.5", "--block", "IN08=0", "-o", "o.safetensors"])
    assert len(args.block) == 2
    args = parser.parse_args(["combine", "--block", "OUT01=a.safetensors", "--block", "OUT03=b.safetensors",
                              "--weight", "OUT01=0.5", "--weight", "OUT03=2", "-o", "o.safetensors"])
    assert len(args.block) == 2 and len(args.weight) == 2
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    repeating = sorted(f"{name} {a.option_strings[-1]}" for name, sub in subparsers.choices.items()
                       for a in sub._actions if isinstance(a, argparse._AppendAction))
    assert repeating == ["combine --block", "combine --weight", "scale --block"]


@pytest.mark.parametrize("command, action", list(_options()))
def test_every_option_given_twice_is_refused_by_name(command, action, capsys):
    flag = action.option_strings[-1]
    value = _a_value(action)
    with pytest.raises(SystemExit) as e:
        cli(command, flag, *value, flag, *value)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"argument {'/'.join(action.option_strings)}: given twice" in err, err
