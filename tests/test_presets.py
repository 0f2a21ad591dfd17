"""Presets: the built-in TOML files, their exact selections on full-size SDXL, and the loader's errors."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import toml

from blora_network.sdxl.blocks import block_pattern, lookup_block
from blora_network.errors import PresetError
from blora_network.network.presets import BUILTIN_ROLES, builtin_names, builtin_preset_text, load_preset
from blora_network.sdxl.names import is_attention_layer
from blora_network.sdxl.unet import FULL, module_names

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {
    "content": ({"output_blocks.0.1"}, 80),
    "style": ({"output_blocks.1.1"}, 80),
    "content_style": ({"output_blocks.0.1", "output_blocks.1.1"}, 160),
    "layout": ({"input_blocks.8.1"}, 80),
    "content_style_layout": ({"output_blocks.0.1", "output_blocks.1.1", "input_blocks.8.1"}, 240),
}


BUILTIN_DIR = ROOT / "blora_network" / "network" / "builtin_presets"


def test_builtin_names_are_the_five_toml_files_beside_the_loader():
    assert set(builtin_names()) == set(EXPECTED)
    assert {p.stem for p in BUILTIN_DIR.glob("*.toml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_files_are_written_from_block_pattern(name):
    """One regex source: each built-in file is exactly what builtin_preset_text makes from
    blocks.block_pattern, so a change to the rule cannot leave a file behind."""
    text = (BUILTIN_DIR / f"{name}.toml").read_text()
    assert text == builtin_preset_text(name)
    patterns = toml.loads(text)["unet_target_name"]
    assert patterns == [block_pattern(lookup_block(r)) for r in BUILTIN_ROLES[name]]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_toml_is_attention_only_lycoris_format(name):
    raw = toml.load(BUILTIN_DIR / f"{name}.toml")
    assert raw["enable_conv"] is False
    assert raw["unet_target_module"] == []
    assert raw["text_encoder_target_module"] == [] and raw["text_encoder_target_name"] == []
    for pattern in raw["unet_target_name"]:
        assert pattern.startswith(r"^(?!.*(ff\.net|proj))")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_selection_on_full_size_sdxl_names(name):
    blocks, count = EXPECTED[name]
    selected = load_preset(name).select(module_names(FULL))
    assert len(selected) == count
    assert {".".join(s.split(".")[:3]) for s in selected} == blocks
    assert all(is_attention_layer(s) for s in selected)
    # exactly to_q, to_k, to_v, to_out.0 of attn1 and attn2 in 10 transformer blocks, per block
    for block in blocks:
        mine = [s for s in selected if s.startswith(block + ".")]
        assert len(mine) == 80
        assert not any(re.search(r"ff\.net|proj_in|proj_out", s) for s in mine)


def test_roles_are_derived_from_patterns():
    assert load_preset("content_style").roles == ("content", "style")
    assert load_preset("content_style_layout").roles == ("content", "style", "layout")
    assert load_preset().name == "content_style"  # the default


def test_user_toml_same_format(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        "enable_conv = false\nunet_target_module = []\n"
        "unet_target_name = ['^(?!.*(ff\\.net|proj)).*output_blocks\\.1\\.1\\..*attn2.*$']\n"
        "[blora]\nstyle_dim = 16\nstyle_lr = 5e-5\ndescription = 'cross-attention of style only'\n"
    )
    preset = load_preset(str(path))
    assert preset.name == "mine" and preset.source == str(path)
    assert preset.roles == ("style",)
    assert len(preset.select(module_names(FULL))) == 40
    assert preset.block_settings == {"style_dim": 16, "style_lr": 5e-5}


def test_prefix_only_pattern_takes_ff_and_proj(tmp_path):
    """The pattern from sd-scripts issue #1215 selects 102 layers per block, not B-LoRA's 80."""
    path = tmp_path / "prefix.toml"
    path.write_text("unet_target_module = []\nunet_target_name = ['output_blocks\\.0\\.1\\.']\n")
    assert len(load_preset(str(path)).select(module_names(FULL))) == 102


@pytest.mark.parametrize(
    "content, words",
    [
        ("unet_target_name = ['a']\nenable_conv = ture\n", ["bad.toml:2", "TOML syntax error", "ture"]),
        ("unet_target_nmae = ['x']\n", ["unknown preset key", "unet_target_nmae", "did you mean 'unet_target_name'"]),
        ("unet_target_name = ['output_blocks\\.0\\.1\\.(']\n", ["invalid regular expression", "output_blocks"]),
        ("unet_target_name = 'output'\n", ["must be list"]),
        ("[blora]\ncontent_dim = 'x'\n", ["blora.content_dim", "must be int"]),
        ("[blora]\ncontent_rank = 4\n", ["unknown preset key", "blora.", "content_rank"]),
    ],
)
def test_bad_preset_files_name_file_and_fix(tmp_path, content, words):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(PresetError) as err:
        load_preset(str(path))
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_unknown_name_lists_builtins():
    with pytest.raises(PresetError, match="Built-in presets: content, content_style") as err:
        load_preset("contnet_style")
    assert "Did you mean 'content_style'" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(PresetError, match="not found"):
        load_preset(str(tmp_path / "nope.toml"))


@pytest.mark.slow
def test_wheel_ships_the_presets(tmp_path):
    """A plain `pip install .` must resolve built-in names and import every subpackage: all are in the wheel."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    wheel = next(tmp_path.glob("blora_network-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in EXPECTED:
        assert f"blora_network/network/builtin_presets/{name}.toml" in names
    source = {str(p.relative_to(ROOT)).replace("\\", "/") for p in (ROOT / "blora_network").rglob("*.py")}
    assert source - set(names) == set(), "modules of the source tree missing from the wheel"
    # the metadata says Apache-2.0: the license text ships with it, as the license requires
    license_file = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE"))
    text = zipfile.ZipFile(wheel).read(license_file).decode()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert text == (ROOT / "LICENSE").read_text()
