"""``check``: configs and command lines with each B-LoRA mistake; what fails is what create_network rejects."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import toml

import blora_network
from blora_network.cli.main import main as cli_main
from blora_network.errors import BLoraError
from blora_network.network.presets import builtin_preset_text
from blora_network.sdscripts.recipe import training_config
from blora_network.sdscripts.check import check_arguments, check_command_line, check_config
from blora_network.sdscripts.args import SD_ARGS, parse_command_line
from blora_network.sdxl.unet import TINY, build_unet
from sdscripts_schema import OPTION_KINDS, real_sd_scripts

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe_values(tmp: Path, **changes) -> dict:
    """The recipe's training config, flattened, with ``changes`` (None deletes a key)."""
    tables = training_config(model="/m/sdxl.safetensors", out_dir=tmp, name="run", preset="content_style", rank=64,
                             steps=1000, lowvram=False)
    flat = {k: v for table in tables.values() for k, v in table.items()}
    for key, value in changes.items():
        if value is None:
            flat.pop(key, None)
        else:
            flat[key] = value
    return flat


def write(tmp: Path, name="run.toml", **changes) -> Path:
    path = tmp / name
    path.write_text(toml.dumps(recipe_values(tmp, **changes)))
    return path


def found(report, severity: str) -> list[str]:
    return [f"{f.key}: {f.message}" for f in report.findings if f.severity == severity]


def test_the_recipe_itself_is_clean(tmp_path):
    report = check_config(write(tmp_path))
    assert report.findings == [] and report.exit_status == 0


CASES = [
    # (id, changes to the recipe, severity, words in one finding)
    ("module-missing", dict(network_module=None), "error", ("network_module: not set",)),
    ("module-typo", dict(network_module="blora_netwrok"), "error", ("'blora_netwrok': no such module", "blora_network?")),
    ("module-networks-lora", dict(network_module="networks.lora"), "warning", ("'networks.lora' is not B-LoRA",)),
    ("lycoris-with-builtin-name", dict(network_module="lycoris.kohya"), "error",
     ("lycoris.kohya with preset=content_style", "not a LyCORIS one")),
    ("alpha-differs", dict(network_args=["preset=content_style", "alpha=16"]), "warning",
     ("alpha=16 with dim 64: scale 0.25",)),
    ("block-alpha-differs", dict(network_args=["content_dim=32", "content_alpha=8"]), "warning",
     ("content_alpha=8 with content dim 32",)),
    ("text-encoder-on", dict(network_args=["train_text_encoder=true"]), "warning", ("text-encoder training is on",)),
    ("unet-only-missing", dict(network_train_unet_only=None), "warning", ("network_train_unet_only: not set",)),
    ("te-cache-without-unet-only", dict(network_train_unet_only=None, cache_text_encoder_outputs=True), "error",
     ("cache_text_encoder_outputs: needs network_train_unet_only",)),
    ("lr-whole-unet", dict(learning_rate=1e-4), "warning", ("learning_rate 0.0001 is far from the recipe's 5e-05",)),
    ("unet-lr-whole-unet", dict(unet_lr=3e-4), "warning", ("unet_lr 0.0003 is far",)),
    ("lr-not-set", dict(learning_rate=None), "warning", ("learning_rate 2e-06 (not set: sd-scripts' default)",)),
    ("block-lr-far", dict(network_args=["style_lr=1e-3"]), "warning", ("style_lr=0.001 is far",)),
    ("resolution-sd15", dict(resolution="512,512"), "warning", ("resolution: 512x512 is not SDXL-sized",)),
    ("resolution-odd", dict(resolution="1000,1000"), "warning", ("1000x1000 is not SDXL-sized",)),
    ("resolution-unreadable", dict(resolution="1024x1024"), "error", ("'1024x1024': sd-scripts reads a resolution",)),
    ("preset-unknown", dict(network_args=["preset=contnet_style"]), "error",
     ("unknown preset 'contnet_style'", "Did you mean 'content_style'")),
    ("preset-file-missing", dict(network_args=["preset=/nowhere/mine.toml"]), "error", ("/nowhere/mine.toml not found",)),
    ("args-not-an-int", dict(network_args=["content_dim=abc"]), "error", ("content_dim='abc': not an integer",)),
    ("args-unknown-key", dict(network_args=["contnet_dim=8"]), "error", ("unknown network_args key 'contnet_dim'",)),
    ("args-dropout-range", dict(network_args=["dropout=1.5"]), "error", ("dropout=1.5: must be in [0, 1)",)),
    ("args-unknown-algo", dict(network_args=["algo=lorra"]), "error", ("algo='lorra': unknown LyCORIS algorithm",)),
    ("args-dora-bypass", dict(network_args=["dora_wd=true", "bypass_mode=true"]), "error", ("LyCORIS drops DoRA",)),
    ("args-all-blocks-off", dict(network_args=["content_dim=0", "style_dim=0"]), "error", ("trains no module",)),
    ("args-no-equals", dict(network_args=["preset"]), "error", ("'preset' has no '='",)),
    ("args-value-with-equals", dict(network_args=["preset=content_style", "verbose=a=b"]), "warning",
     ("v0.9 and earlier split on every '='",)),
    ("args-a-string", dict(network_args="preset=content_style"), "error", ("must be a list of strings",)),
    ("dim-missing", dict(network_dim=None), "error", ("network_dim is missing",)),
    ("lr-as-string", dict(learning_rate="5e-5"), "error", ("learning_rate = '5e-5': must be a number without quotes",)),
    ("flag-as-string", dict(gradient_checkpointing="true"), "error", ("gradient_checkpointing = 'true'",)),
    ("precision-choice", dict(mixed_precision="bfloat16"), "error", ("'bfloat16': sd-scripts accepts",)),
    ("fp32", dict(mixed_precision=None), "warning", ("mixed_precision: not set (fp32)",)),
    ("network-dropout-range", dict(network_dropout=1.0), "error", ("dropout=1: must be in [0, 1)",)),
    ("text-encoder-only", dict(network_train_text_encoder_only=True), "error", ("nothing is trained",)),
    ("misspelt-key", dict(network_modul="blora_network"), "warning", ("did you mean network_module?",)),
]


@pytest.mark.parametrize("changes, severity, words", [pytest.param(c, s, w, id=i) for i, c, s, w in CASES])
def test_each_mistake_is_named(tmp_path, changes, severity, words):
    report = check_config(write(tmp_path, **changes))
    lines = found(report, severity)
    assert any(all(w in line for w in words) for line in lines), (words, report.findings)
    assert report.exit_status == (1 if report.errors else 0)
    assert (report.errors > 0) == (severity == "error") or severity == "warning"


def test_lycoris_with_a_blora_preset_file_keeps_the_cli_alpha(tmp_path):
    preset = tmp_path / "blora.toml"
    preset.write_text(builtin_preset_text("content_style"))
    report = check_config(write(tmp_path, network_module="lycoris.kohya", network_alpha=1.0,
                                network_args=[f"preset={preset}"]))
    assert found(report, "warning")[0].startswith(f"network_module: lycoris.kohya with the B-LoRA preset {preset}: "
                                                  "alpha stays at network_alpha 1 = scale 0.01562")
    assert report.exit_status == 0


def test_a_preset_pattern_that_matches_nothing_on_sdxl_fails(tmp_path):
    """Checked on sd-scripts' full-size SDXL names (the meta UNet), as training would."""
    preset = tmp_path / "deep.toml"
    preset.write_text("unet_target_name = ['^output_blocks\\.0\\.1\\.transformer_blocks\\.12\\..*$']\n")
    report = check_config(write(tmp_path, network_args=[f"preset={preset}"]))
    assert any("matches no Linear layer" in line for line in found(report, "error")), report.findings
    preset.write_text("unet_target_name = ['^output_blocks\\.0\\.1\\.transformer_blocks\\.9\\..*$']\n")
    assert found(check_config(write(tmp_path, network_args=[f"preset={preset}"])), "error") == []  # depth 10: exists


@pytest.mark.parametrize("kwargs", [
    {"content_dim": "abc"}, {"contnet_dim": "8"}, {"dropout": "1.5"}, {"algo": "lorra"}, {"preset": "contnet"},
    {"dora_wd": "true", "bypass_mode": "true"}, {"train_text_encoder": "maybe"}, {"style_lr": "-1"}, {"alpha": "0"},
])
def test_check_rejects_exactly_what_create_network_rejects(tmp_path, kwargs):
    with pytest.raises(BLoraError) as err:
        blora_network.create_network(1.0, 64, 64, None, None, build_unet(TINY), **kwargs)
    report = check_config(write(tmp_path, network_args=[f"{k}={v}" for k, v in kwargs.items()]))
    assert f"network_args: {err.value}" in found(report, "error")


def test_command_line_form_and_overrides(tmp_path):
    config = write(tmp_path)
    report = check_command_line(["accelerate", "launch", "--num_cpu_threads_per_process", "1", "sdxl_train_network.py",
                                 "--config_file", str(config),
                                 "--learning_rate", "1e-4", "--network_args", "preset=style", "alpha=32",
                                 "--output_dir", "elsewhere", "--xformers"])
    assert report.network_kwargs == {"preset": "style", "alpha": "32"}  # the command line replaces the file's list
    assert any("learning_rate 0.0001 is far" in x for x in found(report, "warning"))
    assert any("alpha=32 with dim 64" in x for x in found(report, "warning"))
    assert report.source == f"{config} + command line" and report.exit_status == 0
    bad = check_command_line(["--network_module", "blora_network", "--network_dim", "64", "--network_args", "x"])
    assert bad.exit_status == 1 and any("'x' has no '='" in x for x in found(bad, "error"))
    with pytest.raises(BLoraError, match="argument --network_dim: invalid int value: 'sixty'"):
        check_command_line(["--network_dim", "sixty"])


def test_resolution_comes_from_the_dataset_config_when_it_has_one(tmp_path):
    data = tmp_path / "data.toml"
    data.write_text("[general]\nresolution = 768\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n")
    report = check_config(write(tmp_path, dataset_config=str(data)))
    assert found(report, "warning") == [f"resolution in {data}: 768x768 is not SDXL-sized: SDXL and B-LoRA's blocks were "
                                        "trained at about 1024x1024 px (e.g. 1024,1024, 1152,896, 1216,832), sides "
                                        "multiples of 32"]


def test_cli_exit_status_lines_and_json(tmp_path, capsys):
    good, bad = write(tmp_path, "good.toml"), write(tmp_path, "bad.toml", network_args=["algo=lorra"], learning_rate=1e-4)
    assert cli_main(["check", str(good)]) == 0
    assert capsys.readouterr().out.strip().endswith("0 error(s), 0 warning(s); ok to train: every value follows the B-LoRA recipe")
    assert cli_main(["check", str(bad)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("error: network_args: network_args algo='lorra'") and out[1].startswith("warning: learning_rate")
    assert out[-1] == f"{bad}: 1 error(s), 1 warning(s); would fail: fix the errors above before training" and len(out) == 3
    assert cli_main(["check", "--json", "--", "--config_file", str(bad), "--learning_rate", "5e-5"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["errors"] == 1 and doc["warnings"] == 0 and doc["exit_status"] == 1
    assert cli_main(["check", str(good), "--json"]) == 0 and json.loads(capsys.readouterr().out)["findings"] == []


def test_option_kinds_agree_with_the_derived_schema():
    kinds = {"flag": "flag", "list": "list", "str": "str", "int": "int", "float": "float"}
    for name, kind in OPTION_KINDS.items():
        assert name in SD_ARGS, name
        assert kinds[SD_ARGS[name].kind] == kind, name


READ_AS_SD_SCRIPTS_DOES = [
    ["--network_modul", "blora_network", "--network_di", "8", "--lr_warmup_steps", "0.5"],
    ["--learnig_rate", "1e-4", "stray", "--xformers"],
    ["--network_a", "4"],
    ["--network_dim", "sixty"],
    ["--network_args", "preset=style", "alpha=4", "--text_encoder_lr", "1e-5", "2e-5", "--zero_stage", "2"],
]
"""Command lines read by our parser and, where BLORA_SD_SCRIPTS names a checkout, by sd-scripts' own."""


def _ours(line):
    try:
        return parse_command_line(line)
    except BLoraError as e:
        return e


def test_option_kinds_agree_with_sd_scripts_parser():
    """Every option check knows, against sd-scripts' own parser (BLORA_SD_SCRIPTS; skipped otherwise)."""
    sd, why = real_sd_scripts()
    if sd is None:
        pytest.skip(why)
    actions = {a.dest: a for a in sd.sdxl_train_network.setup_parser()._actions}
    assert set(SD_ARGS) == set(actions) - {"help"}  # the whole parser, no more, no less
    for name, arg in SD_ARGS.items():
        action = actions[name]
        if arg.kind == "flag":
            assert action.nargs == 0 and action.const is True, name
        elif arg.kind in ("list", "floats"):
            assert action.nargs == "*" and action.type is (float if arg.kind == "floats" else str), name
        elif arg.kind in ("int", "float"):
            assert action.type is {"int": int, "float": float}[arg.kind], name
        elif arg.kind in ("str", "path"):
            assert action.type in (str, None) or action.type.__name__ == "Path", name
        elif arg.kind == "number":
            assert action.type.__name__ == "int_or_float", name
        if arg.choices:
            assert set(arg.choices) <= set(action.choices), name
    for line in READ_AS_SD_SCRIPTS_DOES:  # the same command lines, read by sd-scripts' own parser
        parser = sd.sdxl_train_network.setup_parser()
        ours = _ours(line)
        try:
            ns, unknown = parser.parse_known_args(line)
        except SystemExit:
            assert isinstance(ours, BLoraError), line
            continue
        assert not isinstance(ours, BLoraError), (line, ours)
        assert ours.unknown == unknown, line
        for key, value in ours.values.items():
            assert getattr(ns, key) == value, (line, key)


# -- a command line, read as sd-scripts' parser reads it (issue 18) ---------------------------------------

BASE = ["--network_module", "blora_network", "--network_dim", "64", "--network_train_unet_only",
        "--learning_rate", "5e-5", "--resolution", "1024,1024", "--mixed_precision", "bf16"]

UNRECOGNIZED = [
    # (id, words added to a clean command line, what sd-scripts reports, the hint)
    ("unknown-option", ["--not_an_option", "3"], "unrecognized arguments: --not_an_option 3", None),
    ("misspelt-option", ["--mixed_precison", "bf16"], "unrecognized arguments: --mixed_precison bf16", "--mixed_precision"),
    ("misspelt-lr", ["--learnig_rate", "1e-4"], "unrecognized arguments: --learnig_rate 1e-4", "--learning_rate"),
    ("value-glued-on", ["--network_dim64"], "unrecognized arguments: --network_dim64", "--network_dim"),
    ("stray-word", ["sks"], "unrecognized arguments: sks", None),
    ("literal-dots", ["..."], "unrecognized arguments: ...", None),
    ("after-double-dash", ["--", "--xformers"], "unrecognized arguments: -- --xformers", None),
]


@pytest.mark.parametrize("extra, said, hint", [pytest.param(e, s, h, id=i) for i, e, s, h in UNRECOGNIZED])
def test_words_sd_scripts_does_not_take_stop_the_run(extra, said, hint):
    report = check_command_line(BASE + extra)
    errors = found(report, "error")
    assert report.exit_status == 1 and len(errors) == 1 and errors[0].startswith(f"command line: {said}"), errors
    assert (f"did you mean {hint}?" in errors[0]) if hint else "did you mean" not in errors[0]


def test_the_clean_command_line_and_every_sd_scripts_option_pass():
    """Options check has no rule for are still sd-scripts options: never "unrecognized"."""
    assert found(check_command_line(BASE), "error") == []
    others = ["--noise_offset", "0.05", "--min_snr_gamma", "5", "--save_state", "--lr_warmup_steps", "10%",
              "--log_with", "tensorboard", "--caption_extention", ".txt", "--huber_c", "0.1", "--zero_stage", "2"]
    assert found(check_command_line(BASE + others), "error") == []
    values = parse_command_line(BASE + others).values
    assert values["lr_warmup_steps"] == 0.1 and values["zero_stage"] == 2 and values["save_state"] is True


def test_abbreviations_mean_what_argparse_makes_of_them():
    report = check_command_line(["--network_modul", "blora_network", "--network_di", "32", *BASE[4:]])
    assert found(report, "error") == [] and report.network_kwargs == {}
    args = parse_command_line(["--network_modul", "blora_network", "--network_di", "32"])
    assert args.values == {"network_module": "blora_network", "network_dim": 32}
    with pytest.raises(BLoraError, match="ambiguous option: --network_a could match --network_alpha, --network_args"):
        check_command_line([*BASE, "--network_a", "4"])
    with pytest.raises(BLoraError, match="argument --mixed_precision: invalid choice: 'bf17'"):
        check_command_line(["--mixed_precision", "bf17"])


def test_an_option_older_releases_lack_is_named():
    report = check_command_line([*BASE, "--validation_split", "0.1"])
    assert found(report, "warning") == ["validation_split: --validation_split is not in sd-scripts v0.9.1 and older "
                                        "(e.g. a kohya_ss GUI install): those stop on it as an unrecognized argument"]


def test_a_config_then_options_is_config_file_then_options(tmp_path):
    config = write(tmp_path, learning_rate=1e-4)
    report = check_arguments([str(config), "--learning_rate", "5e-5"])
    assert report.source == f"{config} + command line" and report.findings == []
    assert check_arguments([str(config), "--", "--learning_rate", "5e-5"]).findings == []
    assert check_arguments(["--", str(config)]).source == str(config)
    assert check_arguments([str(config)]).findings[0].message.startswith("learning_rate 0.0001 is far")


@pytest.mark.parametrize("words, message", [
    (["a.toml", "b.toml"], "2 config files (a.toml, b.toml): sd-scripts reads one training config"),
    (["a.toml", "b.toml", "--xformers"], "2 config files"),
    (["{config}", "--config_file", "{config}"], "two training configs; sd-scripts reads one"),
])
def test_two_configs_are_refused_never_dropped(tmp_path, words, message):
    config = write(tmp_path)
    with pytest.raises(BLoraError, match=re.escape(message)):
        check_arguments([w.format(config=config) for w in words])


def test_a_dataset_config_is_named_not_read_as_a_training_config(tmp_path):
    from PIL import Image

    from blora_network.sdscripts.recipe import write_recipe
    from lora_factories import write_sdxl_checkpoint

    images = tmp_path / "photos"
    images.mkdir()
    Image.new("RGB", (1024, 1024)).save(images / "a.png")
    model = write_sdxl_checkpoint(tmp_path / "sd_xl_base_1.0.safetensors")
    result = write_recipe(images, model=str(model), out_dir=tmp_path / "run")
    dataset = result.dataset_config
    for words in ([dataset], ["--", "--config_file", dataset], [dataset, "--xformers"]):
        with pytest.raises(BLoraError, match=re.escape(f"{dataset}: this is a dataset config (--dataset_config")):
            check_arguments(words)
    wrong_way = check_arguments(["--config_file", result.training_config, "--dataset_config", result.training_config])
    assert any(x.startswith(f"dataset_config: {result.training_config}: not a dataset config") for x in found(wrong_way, "error"))
    assert check_arguments(["--config_file", result.training_config, "--dataset_config", dataset]).findings == []


@pytest.mark.parametrize("changes, key", [
    (dict(learning_rate="5e-5"), "learning_rate"),
    (dict(unet_lr="5e-5"), "unet_lr"),
    (dict(resolution=1024), "resolution"),
    (dict(mixed_precision="bfloat16"), "mixed_precision"),
    (dict(network_train_unet_only="true"), "network_train_unet_only"),
    (dict(network_module=1), "network_module"),
])
def test_a_wrongly_typed_value_is_one_finding(tmp_path, changes, key):
    report = check_config(write(tmp_path, **changes))
    assert [f.key for f in report.findings] == [key] and report.exit_status == 1, report.findings


def test_resolution_must_be_a_string_as_sd_scripts_splits_it(tmp_path):
    report = check_config(write(tmp_path, resolution=1024))
    assert found(report, "error") == ['resolution: resolution = 1024: must be a string in quotes, e.g. resolution = '
                                      '"1024,1024" (sd-scripts splits it on ","); sd-scripts uses config values as '
                                      'TOML typed them']


def test_an_array_left_open_at_the_end_is_a_toml_error_at_its_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('network_module = "blora_network"\nnetwork_dim = 64\nnetwork_args = ["preset=content_style"\n')
    assert toml.load(str(path))["network_args"] == ["preset=content_styl"]  # what the toml package makes of it
    with pytest.raises(BLoraError, match=re.escape(f"{path}:3: TOML syntax error: the '[' on line 3")):
        check_config(path)


def test_a_network_args_key_given_twice_is_refused_by_check_and_by_the_network(tmp_path):
    items = ["preset=content_style", "preset=style"]
    report = check_config(write(tmp_path, network_args=items))
    message = ("network_args gives preset twice ('preset=content_style' and 'preset=style'): sd-scripts keeps only the "
               "last one and drops the other silently; give each key once")
    assert f"network_args: {message}" in found(report, "error")
    # sd-scripts: net_kwargs[key] = value for each item, then create_network(**net_kwargs), then prepare_network(args)
    network = blora_network.create_network(1.0, 4, 4, None, None, build_unet(TINY), preset="style")
    with pytest.raises(BLoraError, match=re.escape(message)):
        network.prepare_network(argparse.Namespace(network_args=items))
    network.prepare_network(argparse.Namespace(network_args=["preset=style", "style_dim=4"]))


def test_a_failing_check_piped_into_head_still_fails(tmp_path):
    """`check bad.toml | head -1`: the closed pipe must not turn the verdict into success."""
    bad = write(tmp_path, "bad.toml", network_args=["algo=lorra"])
    good = write(tmp_path, "good.toml")
    for config, status in ((bad, 1), (good, 0)):
        proc = subprocess.Popen([sys.executable, "-m", "blora_network", "check", str(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before the first line is written
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == status, err


def test_a_training_config_in_a_general_table_is_still_a_training_config(tmp_path):
    """read_config_from_file lifts any table: [general] holding training options is a training config."""
    path = tmp_path / "run.toml"
    path.write_text(toml.dumps({"general": recipe_values(tmp_path)}))
    assert check_config(path).findings == []
