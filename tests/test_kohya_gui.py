"""Training from the kohya_ss GUI: its command, its TOML, its presets, and ``check CONFIG.json``.

The GUI (bmaltais/kohya_ss, a git repository, not a package) is read two ways:

- always, against what was derived from its code at 45088f04: its Additional-parameters handling
  (``run_cmd_advanced_training``: remove ``"``, split, ``shlex.quote`` each word) and its fields
  (tests/data/kohya_gui_fields.json, made by tests/kohya_gui_stub.py);
- with ``KOHYA_SS_DIR`` naming a checkout, against its own code (gradio stubbed, in a child process).

The command is then read as sd-scripts reads it: the GUI's TOML in an ``argparse.Namespace``, the
command line parsed over it, ``network_args`` split on the first ``=`` (main) or every ``=``
(v0.9), and ``create_network`` called as train_network.py calls it, on real LyCORIS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import toml
import torch

import blora_network
from blora_network.cli.main import main as cli_main
from blora_network.errors import NetworkArgsError
from blora_network.sdscripts.check import check_command_line, check_config
from blora_network.sdscripts.kohya_gui import gui_values, gui_words
from blora_network.sdscripts.recipe import write_recipe
from blora_network.sdxl.unet import TINY, build_unet
from lora_factories import write_sdxl_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).resolve().parent
FIELDS = json.loads((HERE / "data" / "kohya_gui_fields.json").read_text())["fields"]
GUI_DIR = os.environ.get("KOHYA_SS_DIR")
needs_gui = pytest.mark.skipif(not GUI_DIR, reason="KOHYA_SS_DIR is not set: the kohya_ss GUI is a git repository, "
                                                   "not a package; set it to a checkout to test against its own code")


def real_gui(action: str, *args: str):
    """tests/kohya_gui_stub.py on the checkout in KOHYA_SS_DIR: its JSON answer. It runs in a scratch
    folder: the GUI's logging writes setup.log into the current one."""
    with tempfile.TemporaryDirectory() as scratch:
        out = subprocess.run([sys.executable, str(HERE / "kohya_gui_stub.py"), GUI_DIR, action, *args],
                             capture_output=True, text=True, timeout=300, cwd=scratch)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def standard(**fields) -> dict:
    """A GUI config for an SDXL run of LoRA type Standard (only the keys these tests need)."""
    data = {"LoRA_type": "Standard", "sdxl": True, "network_dim": 8, "network_alpha": 1, "learning_rate": 5e-5,
            "unet_lr": 5e-5, "text_encoder_lr": 0, "optimizer": "AdamW", "max_resolution": "1024,1024",
            "mixed_precision": "bf16", "max_train_steps": 1000, "additional_parameters": ""}
    data.update(fields)
    return data


def sd_scripts_network(data: dict, tmp_path: Path, *, split_every: bool = False, unet=None):
    """What sd-scripts builds from the GUI's TOML (:func:`gui_values`) and its command."""
    toml_path = tmp_path / "config_lora.toml"
    toml_path.write_text(toml.dumps(gui_values(data)))
    return network_from(toml_path, gui_words(data["additional_parameters"]), split_every=split_every, unet=unet)


def network_from(toml_path: Path, words: list[str], *, split_every: bool = False, unet=None):
    """sd-scripts' reading: the file seeds the namespace, the command line is parsed over it
    (read_config_from_file), train_network.py splits network_args and calls create_network."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config_file")
    parser.add_argument("--network_module")
    parser.add_argument("--network_args", nargs="*")
    parser.add_argument("--network_dim", type=int)
    parser.add_argument("--network_alpha", type=float)
    parser.add_argument("--network_dropout", type=float)
    args = parser.parse_args(["--config_file", str(toml_path), *words], namespace=argparse.Namespace(**toml.load(toml_path)))
    assert args.network_module == "blora_network"
    kwargs = {}
    for item in args.network_args or []:
        key, value = item.split("=") if split_every else item.split("=", 1)
        kwargs[key] = value
    network = blora_network.create_network(1.0, args.network_dim, args.network_alpha, None, None,
                                           build_unet(TINY) if unet is None else unet,
                                           neuron_dropout=getattr(args, "network_dropout", None), **kwargs)
    return network, kwargs


# -- the GUI's quoting ------------------------------------------------------------------------------

QUOTING = [  # typed in Additional parameters -> the words sd-scripts gets (kohya-gui.md, section 1.3)
    ("--network_module=blora_network --network_args preset=content_style",
     ["--network_module=blora_network", "--network_args", "preset=content_style"]),
    ("--network_args preset=/home/u/my.toml", ["--network_args", "preset=/home/u/my.toml"]),
    (r"--network_args preset=C:\presets\my.toml", ["--network_args", r"'preset=C:\presets\my.toml'"]),
    ("--network_args block_lr=[1,0]", ["--network_args", "'block_lr=[1,0]'"]),
    ('--output_name "my run"', ["--output_name", "my", "run"]),
]


@pytest.mark.parametrize("typed,words", QUOTING)
def test_gui_words_are_what_run_cmd_advanced_training_appends(typed, words):
    assert gui_words(typed) == words


@needs_gui
def test_gui_words_match_the_real_gui():
    for typed, words in QUOTING:
        assert real_gui("command", typed) == words


def test_a_windows_preset_path_through_the_gui_quotes_builds_the_preset(tmp_path, caplog):
    preset = tmp_path / "my.toml"
    preset.write_text('unet_target_name = ["^output_blocks\\\\.1\\\\.1\\\\..*attn1\\\\.to_q$"]\n')
    typed = str(preset).replace("/", "\\")  # as typed on Windows; read with either slash
    data = standard(additional_parameters=f"--network_module=blora_network --network_args preset={typed} style_dim=4")
    for split_every in (False, True):  # sd-scripts main splits on the first '=', v0.9 on every '='
        network, kwargs = sd_scripts_network(data, tmp_path, split_every=split_every)
        assert "'preset" in kwargs and kwargs["'preset"].endswith("'")
        assert network.preset.source == str(preset)
        names = [m.lora_name for m in network.unet_loras]
        assert names and all(n.startswith("lora_unet_output_blocks_1_1_") and n.endswith("attn1_to_q") for n in names)
        assert network.unet_loras[0].lora_dim == 4
    assert "the kohya_ss GUI quotes words" in caplog.text


def test_a_preset_path_that_does_not_resolve_is_named_as_typed(tmp_path):
    typed = r"C:\presets\nowhere.toml"
    data = standard(additional_parameters=f"--network_module=blora_network --network_args preset={typed}")
    with pytest.raises(NetworkArgsError.__mro__[1]) as e:  # BLoraError: a PresetError
        sd_scripts_network(data, tmp_path)
    assert f"preset file {typed} not found" in str(e.value)


# -- the fields the GUI writes --------------------------------------------------------------------

def test_the_gui_fields_reach_create_network_with_networks_lora_meaning(tmp_path):
    data = standard(additional_parameters="--network_module=blora_network", loraplus_lr_ratio=16, rank_dropout=0.1,
                    module_dropout=0.2, network_dropout=0.05)
    network, kwargs = sd_scripts_network(data, tmp_path)
    assert kwargs == {"rank_dropout": "0.1", "module_dropout": "0.2", "loraplus_lr_ratio": "16"}
    assert network.preset.name == "content_style" and network.loraplus_lr_ratio == 16.0
    module = network.unet_loras[0]
    assert (module.rank_dropout, module.module_dropout, module.rank_dropout_scale) == (0.1, 0.2, True)
    assert network.options.lycoris["dropout"] == 0.05  # network_dropout: sd-scripts' neuron_dropout
    groups, descriptions = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    lrs = dict(zip(descriptions, (g["lr"] for g in groups)))
    assert lrs["unet content plus"] == pytest.approx(16 * lrs["unet content"])  # LoRA+: lora_up at 16x


def test_a_typed_network_args_replaces_the_gui_list(tmp_path):
    data = standard(additional_parameters="--network_module=blora_network --network_args preset=style",
                    loraplus_lr_ratio=16, rank_dropout=0.1)
    network, kwargs = sd_scripts_network(data, tmp_path)
    assert kwargs == {"preset": "style"} and network.loraplus_lr_ratio is None
    report = check_config(_json(tmp_path, data))
    dropped = [f.message for f in report.findings if "dropped" in f.message]
    assert dropped and "loraplus_lr_ratio=16 (LoRA+ learning rate ratio)" in dropped[0]
    assert "rank_dropout=0.1 (Rank dropout)" in dropped[0]


@pytest.mark.parametrize("fields,words", [
    ({"block_dims": "2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2"}, ("'Block dims'", "content_dim=")),
    ({"up_lr_weight": "1,1,0,0,0,0,0,0,0"}, ("'Up LR weights'", "content_lr=")),
    ({"LoRA_type": "LyCORIS/LoCon", "LyCORIS_preset": "full", "conv_dim": 4, "conv_alpha": 1},
     ("'LyCORIS Preset'", "path of a B-LoRA preset file", "LoRA type to Standard")),
    ({"LoRA_type": "Kohya DyLoRA", "unit": 4}, ("'DyLoRA Unit / Block size'", "LyCORIS/DyLoRA")),
])
def test_gui_fields_the_network_cannot_honour_are_refused_by_name(tmp_path, fields, words):
    data = standard(additional_parameters="--network_module=blora_network", **fields)
    with pytest.raises(NetworkArgsError) as e:
        sd_scripts_network(data, tmp_path)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert check_config(_json(tmp_path, data)).exit_status == 1


LYCORIS_FIELDS = dict(conv_dim=4, conv_alpha=1, use_tucker=False, rank_dropout=0, bypass_mode=False, dora_wd=False,
                      module_dropout=0, use_scalar=False, rank_dropout_scale=False, train_norm=False, factor=-1,
                      use_cp=False, decompose_both=False, unit=1, constrain=0, rescaled=False, train_on_input=True)
"""The LoRA tab's LyCORIS fields at the values a saved config holds (kohya_ss test/config/locon-AdamW.json)."""


@pytest.mark.parametrize("lora_type,module", [
    ("LyCORIS/LoCon", "LoConModule"), ("LyCORIS/LoHa", "LohaModule"), ("LyCORIS/LoKr", "LokrModule"),
    ("LyCORIS/DyLoRA", "DyLoraModule"), ("LyCORIS/GLoRA", "GLoRAModule"), ("LyCORIS/BOFT", "ButterflyOFTModule"),
    ("LyCORIS/Diag-OFT", "DiagOFTModule"), ("LyCORIS/iA3", "IA3Module"), ("LyCORIS/Native Fine-Tuning", "FullModule"),
    ("Kohya LoCon", "LoConModule"), ("LoRA-FA", "LoConModule"), ("Kohya LoHa", "LoConModule"),
])
def test_each_lora_type_trains_b_loras_blocks_with_its_fields(tmp_path, lora_type, module):
    """A LyCORIS type with a B-LoRA preset file as its 'LyCORIS Preset' trains that algorithm on the preset's
    layers; the native types' fields (conv dims, LoHa/LoKr extras) reach the network as LyCORIS options."""
    from blora_network.sdxl.unet import random_inputs

    preset = tmp_path / "style_q.toml"
    preset.write_text('unet_target_name = ["^output_blocks\\\\.1\\\\.1\\\\..*attn1\\\\.to_q$"]\n')
    data = standard(LoRA_type=lora_type, LyCORIS_preset=str(preset), additional_parameters="--network_module=blora_network",
                    **LYCORIS_FIELDS)
    unet = build_unet(TINY, seed=0)
    network, kwargs = sd_scripts_network(data, tmp_path, unet=unet)
    assert {type(m).__name__ for m in network.unet_loras} == {module}
    if lora_type.startswith("LyCORIS/"):
        assert kwargs["preset"] == str(preset) and len(network.unet_loras) == 10
    if lora_type == "LyCORIS/iA3":
        assert all(m.train_input for m in network.unet_loras)  # "iA3 train on input" honoured
    network.apply_to(None, unet, False, True)
    groups, _ = network.prepare_optimizer_params(None, 1e-2, 1e-2)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    unet.requires_grad_(False)
    before = [p.detach().clone() for g in groups for p in g["params"]]
    x, t, ctx, y = random_inputs(TINY, batch=1, seed=1)
    for _ in range(2):
        loss = unet(x, t, ctx, y).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, (p for g in groups for p in g["params"])))


# -- the recipe's GUI preset ----------------------------------------------------------------------

def _recipe(tmp_path, **kw):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (1024, 1024), (90, 20, 20)).save(images / "a.png")
    model = write_sdxl_checkpoint(tmp_path / "sdxl.safetensors")  # recipe reads its header only
    return write_recipe(images, model=str(model), out_dir=tmp_path / "run", **kw)


def _type_ok(value, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"bool": isinstance(value, bool), "str": isinstance(value, str), "number": number,
            "int": isinstance(value, int) and not isinstance(value, bool), "list": isinstance(value, list)}[kind]


@pytest.mark.parametrize("lowvram", [False, True])
def test_recipe_writes_a_gui_preset_the_loader_reads(tmp_path, lowvram):
    result = _recipe(tmp_path, lowvram=lowvram)
    preset = json.loads(Path(result.gui_preset).read_text())
    assert Path(result.gui_preset).name == "images_kohya_gui.json"
    for key, value in preset.items():
        assert key in FIELDS, f"{key}: not a field the GUI's loader reads"
        assert _type_ok(value, FIELDS[key]["type"]), f"{key}={value!r}: the GUI's {FIELDS[key]['component']} holds {FIELDS[key]['type']}"
        assert value in FIELDS[key].get("choices", [value]), f"{key}={value!r}: not one of the GUI's choices"
    assert preset["text_encoder_lr"] == 0 and preset["LoRA_type"] == "Standard" and preset["sdxl"] is True
    assert preset["additional_parameters"] == "--network_module=blora_network --network_args preset=content_style"
    report = check_config(result.gui_preset)
    assert report.errors == 0 and report.warnings == 0, [f.message for f in report.findings]
    values = gui_values(preset)  # what the GUI's TOML holds: the recipe's run
    assert values["network_train_unet_only"] is True and values["dataset_config"] == result.dataset_config
    assert values["max_train_steps"] == 1000 and values["resolution"] == "1024,1024"


@needs_gui
def test_the_real_gui_loads_the_recipe_preset(tmp_path):
    result = _recipe(tmp_path)
    preset = json.loads(Path(result.gui_preset).read_text())
    loaded = real_gui("load", result.gui_preset)
    assert {k: loaded[k] for k in preset} == preset
    fields = real_gui("fields")
    assert {k: v["type"] for k, v in fields.items()} == {k: v["type"] for k, v in FIELDS.items()}


@needs_gui
def test_the_real_gui_print_command_trains_the_recipe(tmp_path):
    result = _recipe(tmp_path)
    printed = real_gui("print", result.gui_preset)
    command = printed["command"]
    script = next(i for i, w in enumerate(command) if w.endswith("sdxl_train_network.py"))
    words = command[script + 1:]
    assert words[0] == "--config_file" and words[2:] == ["--network_module=blora_network", "--network_args",
                                                         "preset=content_style"]
    gui_toml = Path(words[1])
    assert toml.loads(printed["toml"]) == toml.load(gui_toml)
    assert toml.load(gui_toml)["network_module"] == "networks.lora"  # the GUI's own choice, overridden
    network, kwargs = network_from(gui_toml, words[2:])
    assert kwargs == {"preset": "content_style"} and network.preset.name == "content_style"
    assert {m.lora_dim for m in network.unet_loras} == {64}
    report = check_command_line(command)
    assert report.errors == 0, [f.message for f in report.findings]


# -- check CONFIG.json ----------------------------------------------------------------------------

def _json(tmp_path: Path, data: dict, name="gui.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_check_names_every_gui_trap(tmp_path):
    data = standard(LoRA_type="Kohya LoCon", text_encoder_lr=1e-4, loraplus_lr_ratio=4, conv_dim=4, conv_alpha=1,
                    additional_parameters=r'--network_args preset=C:\p\my.toml "style_lr=5e-5 x" --output_name=my[1]')
    report = check_config(_json(tmp_path, data))
    text = "\n".join(f"{f.severity}: {f.key}: {f.message}" for f in report.findings)
    for words in ("LoRA_type: 'Kohya LoCon'", "text_encoder_lr: 0.0001", "no --network_module=blora_network",
                  "Windows backslashes", "--output_name=my[1]: has brackets", "these are dropped: conv_dim=4",
                  "network_module: 'networks.lora' is not B-LoRA", "holds '\"'", "x: a network arg without '='"):
        assert words in text, text
    assert report.exit_status == 1


def test_check_lycoris_still_names_alpha_and_rate(tmp_path):
    config = tmp_path / "lyco.toml"
    config.write_text('network_module = "lycoris.kohya"\nnetwork_dim = 64\nnetwork_alpha = 1\nlearning_rate = 1e-3\n'
                      'network_args = ["preset=full", "algo=lora"]\n')
    keys = [f.key for f in check_config(str(config)).findings]
    assert {"network_module", "network_alpha", "learning_rate"} <= set(keys), keys


def test_check_a_misspelt_module_still_checks_the_network_args(tmp_path):
    config = tmp_path / "typo.toml"
    config.write_text('network_module = "blora_netwrok"\nnetwork_dim = 64\nnetwork_args = ["preset=contnet"]\n')
    messages = [f.message for f in check_config(str(config)).findings]
    assert any("did you mean blora_network" in m for m in messages)
    assert any("unknown preset 'contnet'" in m for m in messages), messages


BAD = [  # (file text, exit status, words)
    ("{", 1, ("gui.json:1:2: JSON syntax error",)),
    ('{"network_dim": 8}', 1, ("not a kohya_ss LoRA config",)),
    ("[1, 2]", 1, ("not a kohya_ss LoRA config",)),
]


@pytest.mark.parametrize("text,status,words", BAD)
def test_check_bad_gui_files_give_one_line(tmp_path, capsys, text, status, words):
    (tmp_path / "gui.json").write_text(text)
    assert cli_main(["check", str(tmp_path / "gui.json")]) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert cli_main(["check", str(tmp_path / "missing.json")]) == 1
    assert "missing.json: not found" in capsys.readouterr().err


def test_a_gui_config_is_checked_alone(tmp_path, capsys):
    """Options after a GUI config would be dropped silently: refused by name instead."""
    (tmp_path / "gui.json").write_text("{}")
    assert cli_main(["check", str(tmp_path / "gui.json"), "--", "--learning_rate", "1e-4"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checked alone (--learning_rate 1e-4 given after it)" in err, err


def test_the_same_network_arg_twice_passes_but_two_values_do_not():
    """The GUI writes use_tucker twice for LoCon and LoHa: the same item twice loses nothing."""
    from blora_network.network.options import refuse_repeated_keys

    refuse_repeated_keys(["preset=content_style", "use_tucker=False", "use_tucker=False"])
    with pytest.raises(NetworkArgsError, match="gives use_tucker twice"):
        refuse_repeated_keys(["use_tucker=False", "use_tucker=True"])


@pytest.mark.parametrize("algo", ["dylora", "full"])
def test_algorithms_without_a_bypass_form_get_rebuild_mode(algo):
    """The GUI's LyCORIS/DyLoRA and Native Fine-Tuning types send no bypass_mode: auto picks rebuild."""
    network = blora_network.create_network(1.0, 4, 1, None, None, build_unet(TINY), preset="style", algo=algo)
    assert network.bypass is False
    with pytest.raises(NetworkArgsError, match="remove bypass_mode"):
        blora_network.create_network(1.0, 4, 1, None, None, build_unet(TINY), preset="style", algo=algo,
                                     bypass_mode="true")
