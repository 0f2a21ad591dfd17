"""The ``blora-network`` command: each subcommand end to end, --json, --help with an example,
and every bad input ending as one clear line on stderr with a non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from blora_network.cli.main import main
from lora_factories import (
    Layer,
    assert_one_line_cli_error,
    blora_metadata_like_training,
    full_attention_layers,
    write_diffusers,
    write_kohya,
    write_sd1,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SUBCOMMANDS = ["presets", "plan", "inspect", "split", "combine", "scale", "extract", "convert"]


def run(capsys, *argv):
    code = main([*argv, *(["--no-progress"] if argv and argv[0] in SUBCOMMANDS[2:] else [])])
    out, err = capsys.readouterr()
    return code, out, err


def keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), dict(f.metadata() or {})


@pytest.fixture
def blora(tmp_path):
    return write_kohya(tmp_path / "dog.safetensors", full_attention_layers(["content", "style"]), 4, alpha=4.0,
                       metadata=blora_metadata_like_training(4, 4.0), dtype=torch.bfloat16)


# -- help ---------------------------------------------------------------------------------------

def test_help_and_usage_errors_do_not_import_torch():
    """Building the parser (``--help``, a wrong command line) must not pay torch's ~1.5 s import."""
    code = ("import sys; from blora_network.cli.main import main\n"
            "for argv in (['--help'], ['split', '--help'], ['demo', '--help'], ['nosuchcommand']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('torch', 'lycoris', 'safetensors.torch') if m in sys.modules)\n"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help_with_an_example(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"blora-network {command}" in out.split("example:")[1]


def test_top_level_help_lists_the_subcommands_and_demo_when_present(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for c in SUBCOMMANDS:
        assert c in out
    import importlib.util

    assert ("demo" in out) == (importlib.util.find_spec("blora_network.tools.demo") is not None)


# -- presets and plan ---------------------------------------------------------------------------

def test_presets_json_and_text(capsys):
    code, out, _ = run(capsys, "presets", "--json")
    assert code == 0
    items = {p["name"]: p for p in json.loads(out)}
    assert set(items) >= {"content", "style", "content_style", "layout", "content_style_layout"}
    assert items["content_style"]["blocks"] == {"output_blocks.0.1": 80, "output_blocks.1.1": 80}
    assert items["content_style_layout"]["modules"] == 240 and items["layout"]["roles"] == ["layout"]
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "content_style (default)" in out and "160 layers" in out


def test_plan_counts_parameters_size_and_optimizer_memory(capsys, tmp_path):
    code, out, _ = run(capsys, "plan", "--preset", "content_style", "--dim", "64", "--json")
    assert code == 0
    plan = json.loads(out)
    assert [b["block"] for b in plan["blocks"]] == ["output_blocks.0.1", "output_blocks.1.1"]
    assert all(b["modules"] == 80 and b["params"] == 220_160 * 64 for b in plan["blocks"])
    assert plan["params"] == 2 * 220_160 * 64
    assert plan["optimizer_bytes"]["adamw_states"] == 8 * plan["params"]
    # the predicted file size is the size of a real file of those layers (before metadata)
    code, out, _ = run(capsys, "plan", "--preset", "content_style", "--dim", "8", "--json")
    sizes = json.loads(out)["file_bytes"]
    layers = full_attention_layers(["content", "style"])
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        real = write_kohya(tmp_path / f"{name}.safetensors", layers, 8, dtype=dtype)
        assert sizes[name] == real.stat().st_size, name
    code, out, _ = run(capsys, "plan", "--preset", "content", "--dim", "4")
    assert code == 0 and "880,640" in out and "attn2.to_k x10" in out


def test_plan_shows_what_a_handwritten_regex_selects(capsys, tmp_path):
    toml = tmp_path / "wide.toml"
    toml.write_text(
        "enable_conv = false\nunet_target_module = []\n"
        "unet_target_name = ['^output_blocks\\.0\\.1\\..*$']\n"
        "text_encoder_target_module = []\ntext_encoder_target_name = []\n"
    )
    code, out, _ = run(capsys, "plan", "--preset", str(toml), "--dim", "8", "--json")
    assert code == 0
    plan = json.loads(out)
    (block,) = plan["blocks"]
    assert block["block"] == "output_blocks.0.1" and block["modules"] == 102  # ff and proj_in/out too
    assert any("beyond the attention projections" in n for n in plan["notes"])


def test_plan_bad_preset_is_one_line(capsys):
    code, out, err = run(capsys, "plan", "--preset", "contnet", "--dim", "8")
    assert_one_line_cli_error(code, out, err, "unknown preset 'contnet'", "content")


# -- inspect ------------------------------------------------------------------------------------

def test_inspect_text_and_json(capsys, blora):
    code, out, _ = run(capsys, "inspect", str(blora))
    assert code == 0
    assert "content  output_blocks.0.1 OUT0" in out and "bf16" in out and "preset content_style" in out
    code, out, _ = run(capsys, "inspect", str(blora), "--json")
    rep = json.loads(out)
    assert rep["blocks"]["style"]["modules"] == 80 and rep["blocks"]["style"]["ranks"] == [4]
    assert rep["blocks"]["content"]["norm"] > 0 and rep["warnings"] == []


# -- writers ------------------------------------------------------------------------------------

def test_split_combine_scale_extract_convert_end_to_end(capsys, tmp_path, blora):
    before = blora.read_bytes()
    code, out, _ = run(capsys, "split", str(blora))
    assert code == 0 and "dog_content.safetensors" in out and "dog_style.safetensors" in out
    assert len(keys(tmp_path / "dog_content.safetensors")[0]) == 240

    other = write_diffusers(tmp_path / "ink.safetensors", full_attention_layers(["content", "style"]), 2, seed=7)
    code, out, _ = run(capsys, "combine", "--content", str(blora), "--style", str(other), "--style-weight", "0.8",
                       "-o", str(tmp_path / "mix.safetensors"))
    assert code == 0 and "style x0.8" in out
    _, meta = keys(tmp_path / "mix.safetensors")
    assert json.loads(meta["blora_weights"]) == {"content": 1.0, "style": 0.8}

    code, out, _ = run(capsys, "scale", str(blora), "--style", "0", "-o", str(tmp_path / "c.safetensors"))
    assert code == 0 and "removed the style block" in out
    assert all(k.startswith("lora_unet_output_blocks_0_1_") for k in keys(tmp_path / "c.safetensors")[0])

    code, out, _ = run(capsys, "extract", str(blora), "--blocks", "OUT1", "-o", str(tmp_path / "s.safetensors"))
    assert code == 0 and all(k.startswith("lora_unet_output_blocks_1_1_") for k in keys(tmp_path / "s.safetensors")[0])

    code, out, _ = run(capsys, "convert", str(other), "-o", str(tmp_path / "k.safetensors"))
    assert code == 0 and all(k.startswith("lora_unet_") for k in keys(tmp_path / "k.safetensors")[0])
    code, out, _ = run(capsys, "convert", str(blora), "--to", "peft", "-o", str(tmp_path / "p.safetensors"))
    assert code == 0 and all(".lora_A." in k or ".lora_B." in k for k in keys(tmp_path / "p.safetensors")[0])
    assert blora.read_bytes() == before


def test_overwrite_needs_force_and_an_input_is_never_overwritten(capsys, tmp_path, blora):
    out_path = tmp_path / "o.safetensors"
    out_path.write_bytes(b"keep me")
    code, out, err = run(capsys, "scale", str(blora), "--style", "0.5", "-o", str(out_path))
    assert_one_line_cli_error(code, out, err, "already exists; pass --force")
    assert out_path.read_bytes() == b"keep me"
    code, *_ = run(capsys, "scale", str(blora), "--style", "0.5", "-o", str(out_path), "--force")
    assert code == 0 and len(keys(out_path)[0]) == 480
    before = blora.read_bytes()
    code, out, err = run(capsys, "scale", str(blora), "--style", "0.5", "-o", str(blora), "--force")
    assert_one_line_cli_error(code, out, err, "refusing to write over an input")
    assert blora.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog.safetensors", "o.safetensors"]  # no temp files


# -- bad input: one line, exit 1 ----------------------------------------------------------------

def test_bad_files_get_one_clear_line(capsys, tmp_path, blora):
    missing = tmp_path / "nope.safetensors"
    assert_one_line_cli_error(*run(capsys, "inspect", str(missing)), "nope.safetensors", "no such file")

    text = tmp_path / "notes.safetensors"
    text.write_text("these are my training notes, not a LoRA " * 10)
    assert_one_line_cli_error(*run(capsys, "split", str(text)), "notes.safetensors", "not a")

    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(blora.read_bytes()[: blora.stat().st_size // 2])
    assert_one_line_cli_error(*run(capsys, "inspect", str(truncated)), "cut.safetensors", "truncated")

    garbled = tmp_path / "garbled.safetensors"
    data = bytearray(blora.read_bytes())
    data[8:40] = b"\xff" * 32
    garbled.write_bytes(bytes(data))
    assert_one_line_cli_error(*run(capsys, "inspect", str(garbled)), "garbled.safetensors")

    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"\x80\x04")
    assert_one_line_cli_error(*run(capsys, "inspect", str(pickle)), "pickle")


def test_wrong_lora_kinds_get_one_clear_line(capsys, tmp_path, blora):
    sd1 = write_sd1(tmp_path / "sd15.safetensors")
    assert_one_line_cli_error(*run(capsys, "split", str(sd1)), "sd15.safetensors", "SD1.x LoRA", "768")

    mid = write_kohya(tmp_path / "mid.safetensors",
                      [Layer("middle_block.1.transformer_blocks.0.attn1.to_q", 1280, 1280)], 2)
    assert_one_line_cli_error(*run(capsys, "inspect", str(mid)), "holds no B-LoRA block", "middle_block.1 (1)")

    assert_one_line_cli_error(*run(capsys, "scale", str(blora), "--layout", "0.5", "-o", str(tmp_path / "x.safetensors")),
                          "has no layout block", "input_blocks.8.1", "content (80 modules)")
    assert_one_line_cli_error(*run(capsys, "combine", "--layout", str(blora), "-o", str(tmp_path / "x.safetensors")),
                          "has no layout block")
    assert_one_line_cli_error(*run(capsys, "split", str(blora), "--blocks", "layout"), "has no layout block")
    assert not (tmp_path / "x.safetensors").exists()


def test_command_line_mistakes_exit_2(capsys, blora, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["extract", str(blora), "--blocks", "contnet", "-o", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "unknown B-LoRA block 'contnet'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["scale", str(blora), "--style", "lots", "-o", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "not a number: 'lots'" in capsys.readouterr().err
    code, out, err = run(capsys, "scale", str(blora), "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_cli_error(code, out, err, "no weight given")


# -- the installed entry points -----------------------------------------------------------------

def test_python_dash_m_and_console_script(tmp_path):
    """``python -m blora_network`` runs the same CLI and its exit status reaches the shell."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "blora_network", "inspect", str(tmp_path / "missing.safetensors")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "missing.safetensors: no such file" in r.stderr
    exe = shutil.which("blora-network")
    if exe is None:
        pytest.skip("blora-network is not installed as a console script here (pip install -e .)")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "blora-network" in r.stdout


# -- the first ten minutes: mistakes get the subcommand's usage and a hint; scripts get clean output --

@pytest.mark.parametrize("argv,usage,hint", [
    (["combine", "--sytle", "ink.safetensors", "-o", "x.safetensors"], "usage: blora-network combine", "did you mean --style?"),
    (["combine", "--style_weight", "0.8", "-o", "x.safetensors"], "usage: blora-network combine", "did you mean --style-weight?"),
    (["inspect", "--jsn", "x.safetensors"], "usage: blora-network inspect", "did you mean --json?"),
    (["scale", "x.safetensors", "--stlye=0.5", "-o", "y.safetensors"], "usage: blora-network scale", "did you mean --style?"),
])
def test_a_typo_in_an_option_shows_that_subcommands_usage_and_the_closest_option(capsys, argv, usage, hint):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert usage in err and hint in err and "unrecognized arguments" in err
    assert "usage: blora-network [-h]" not in err  # not the top-level usage


def test_an_option_given_twice_is_named(capsys, tmp_path, blora):
    with pytest.raises(SystemExit) as e:
        main(["combine", "--content", str(blora), "--content", str(tmp_path / "b.safetensors"), "-o", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --content: given twice" in err and "b.safetensors" in err
    with pytest.raises(SystemExit):
        main(["scale", str(blora), "--style", "0.5", "--style", "0.7", "-o", str(tmp_path / "o.safetensors")])
    assert "argument --style: given twice (0.5 and 0.7)" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_an_output_without_the_safetensors_suffix_is_refused(capsys, tmp_path, blora):
    for argv in (["scale", str(blora), "--style", "0.5", "-o", str(tmp_path / "dog_s05")],
                 ["extract", str(blora), "--blocks", "style", "-o", str(tmp_path / "dog.pt")],
                 ["combine", "--content", str(blora), "-o", str(tmp_path / "dog.st")]):
        code, out, err = run(capsys, *argv)
        assert_one_line_cli_error(code, out, err, "must end in .safetensors", "did you mean")
    assert list(tmp_path.iterdir()) == [blora]


def test_split_makes_the_out_dir_the_help_example_names(capsys, tmp_path, blora):
    code, out, err = run(capsys, "split", str(blora), "--blocks", "style", "--out-dir", str(tmp_path / "parts" / "new"))
    assert code == 0, err
    assert [p.name for p in (tmp_path / "parts" / "new").iterdir()] == ["dog_style.safetensors"]


def test_plan_refuses_a_preset_that_matches_nothing_as_training_does(capsys, tmp_path):
    preset = tmp_path / "nowhere.toml"
    preset.write_text("unet_target_name = ['^output_blocks\\.0\\.1\\.transformer_blocks\\.12\\..*$']\n")
    code, out, err = run(capsys, "plan", "--preset", str(preset), "--dim", "8")
    assert_one_line_cli_error(code, out, err, "matches no Linear layer", "sd-scripts' LDM names", command="plan")
    from blora_network import create_network
    from blora_network.errors import PresetError
    from blora_network.sdxl.unet import TINY, build_unet

    with pytest.raises(PresetError) as training:
        create_network(1.0, 4, 4, None, None, build_unet(TINY), preset=str(preset))
    # the same sentence up to the model description (plan describes full-size SDXL, training the model given)
    assert err.split("error: ", 1)[1].split("; the model")[0] == str(training.value).split("; the model")[0]


def test_json_stdout_is_one_document_whatever_the_work_prints(tmp_path, blora):
    """A library that prints or logs to stdout (LyCORIS logs there, in colour, through a handler bound
    to sys.stdout at import) cannot get in front of the document: while the work runs, fd 1 is stderr.
    In a real process, since pytest's capture replaces sys.stdout with an object of its own."""
    code = (
        "import logging, os, sys\n"
        "noisy = logging.getLogger('noisy'); noisy.addHandler(logging.StreamHandler(sys.stdout)); noisy.setLevel(20)\n"
        "from blora_network.tools import inspection\n"
        "from blora_network.cli.main import main\n"
        "real = inspection.inspect\n"
        "def inspect_noisily(*a, **k):\n"
        "    print('\\x1b[32mINFO\\x1b[0m: a printed line')\n"
        "    os.write(1, b'raw bytes on fd 1\\n')\n"
        "    noisy.info('a log line')\n"
        "    return real(*a, **k)\n"
        "inspection.inspect = inspect_noisily\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code, "inspect", str(blora), "--json"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["blocks"]["content"]["modules"] == 80
    assert "a printed line" in r.stderr and "raw bytes on fd 1" in r.stderr and "a log line" in r.stderr


@pytest.mark.parametrize("argv", [["presets", "--json"], ["plan", "--preset", "content_style", "--dim", "4", "--json"]])
def test_every_json_document_parses_in_a_real_process(argv):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "blora_network", *argv], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)


def test_a_closed_pipe_is_a_quiet_exit():
    """``blora-network plan ... --list | head -1``: the reader leaves early; no 'Broken pipe' error."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "blora_network", "plan", "--preset", "content_style_layout", "--dim", "4",
                             "--list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before it writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert err == ""


def test_norm_columns_have_the_same_decimals_in_every_row(capsys, tmp_path):
    from blora_network.cli.files import format_norm

    assert [format_norm(x) for x in (0.05, 1.2345678, 12.5, 1234.5)] == ["0.0500", "1.2346", "12.5000", "1234.5000"]
    assert format_norm(0.0) == "0.0000" and format_norm(2e-5) == "2.000e-05" and format_norm(3e6) == "3.000e+06"
    small = write_kohya(tmp_path / "s.safetensors", full_attention_layers(["content"])[:2], 2, alpha=0.002)
    code, out, _ = run(capsys, "inspect", str(small))
    cell = next(line for line in out.splitlines() if line.strip().startswith("content")).split()[-1]
    assert code == 0 and len(cell.split(".")[-1].split("e")[0]) in (3, 4)


def test_scale_shows_the_weight_asked_for_and_the_product_since_training(capsys, tmp_path, blora):
    once = tmp_path / "s1.safetensors"
    code, out, _ = run(capsys, "scale", str(blora), "--style", "0.7", "-o", str(once))
    assert code == 0 and out.strip().endswith("applied style x0.7")
    code, out, _ = run(capsys, "scale", str(once), "--style", "0.8", "-o", str(tmp_path / "s2.safetensors"))
    assert code == 0 and "applied style x0.8; since training style x0.56" in out


def test_inspect_json_gives_numbers_as_numbers(capsys, blora):
    code, out, _ = run(capsys, "inspect", str(blora), "--json")
    training = json.loads(out)["training"]
    assert code == 0
    assert training["dim"] == 4 and training["alpha"] == 4.0 and training["steps"] == 1000
    assert training["network module"] == "blora_network" and training["base model"] == "sd_xl_base_1.0.safetensors"


def test_plan_builds_what_training_builds_from_a_presets_blora_table(capsys, tmp_path):
    """`[blora] style_dim = 32, content_dim = 0`: the plan is the network create_network makes."""
    from blora_network.network.presets import builtin_preset_text

    preset = tmp_path / "mine.toml"
    preset.write_text(builtin_preset_text("content_style") + "\n[blora]\nstyle_dim = 32\ncontent_dim = 0\n")
    code, out, _ = run(capsys, "plan", "--preset", str(preset), "--dim", "64", "--json")
    plan = json.loads(out)
    assert code == 0 and [(b["block"], b["rank"], b["modules"]) for b in plan["blocks"]] == [("output_blocks.1.1", 32, 80)]
    assert plan["params"] == 220_160 * 32 and "content: off (content_dim = 0 in the preset), not trained" in plan["notes"]
    real = write_kohya(tmp_path / "style32.safetensors", full_attention_layers(["style"]), 32, dtype=torch.float16)
    assert plan["file_bytes"]["fp16"] == real.stat().st_size


def test_plan_refuses_an_empty_preset_as_training_does(capsys, tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    code, out, err = run(capsys, "plan", "--preset", str(empty), "--dim", "8")
    assert_one_line_cli_error(code, out, err, f"preset 'empty' ({empty}) has no UNet targets", command="plan")
