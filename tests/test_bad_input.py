"""Bad input: one clear message, nothing lost.

One table, one row per mistake users make: what they do (through sd-scripts' calls or the
CLI), the exception type or exit status they get, and the words the message must contain.
The last section is security: no code runs from a weights file or a preset, metadata is text.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import blora_network
from blora_network.cli.main import main as cli_main
from blora_network.errors import LoraFileError, NetworkArgsError, PresetError
from blora_network.network.presets import builtin_names, load_preset
from blora_network.files.safefile import MAX_METADATA_BYTES, load_tensors, read_metadata, write_safetensors_hashed
from blora_network.sdxl.unet import TINY, build_unet
from lora_factories import Layer, write_kohya, write_sd1, write_sdxl_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")




# -- helpers the rows use ---------------------------------------------------------------------------


def make(unet=None, dim=4, **kwargs):
    return blora_network.create_network(1.0, dim, 1, None, None, unet if unet is not None else build_unet(TINY), **kwargs)


def applied(preset="content_style", dim=4):
    unet = build_unet(TINY)
    network = make(unet, dim=dim, preset=preset)
    network.apply_to(None, unet, False, True)
    return network


def preset_file(tmp: Path, text: str, name="mine.toml") -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def diffusers_named_unet(context_dim: int) -> nn.Module:
    """A UNet tree with diffusers names (down_blocks/up_blocks/attentions), like diffusers' SDXL
    UNet or sd-scripts' own SD1.x/SD2 UNet (library/original_unet.py), at a tiny width."""
    root = nn.Module()
    root.conv_in = nn.Conv2d(4, 8, 1)
    for side in ("down_blocks", "up_blocks"):
        blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.attentions = nn.ModuleList([nn.Module()])
            attention = block.attentions[0]
            attention.proj_in = nn.Linear(8, 8)
            attention.transformer_blocks = nn.ModuleList([nn.Module()])
            for name, ctx in (("attn1", 8), ("attn2", context_dim)):
                attn = nn.Module()
                attn.to_q, attn.to_k, attn.to_v = nn.Linear(8, 8), nn.Linear(ctx, 8), nn.Linear(ctx, 8)
                attn.to_out = nn.ModuleList([nn.Linear(8, 8)])
                setattr(attention.transformer_blocks[0], name, attn)
            blocks.append(block)
        setattr(root, side, blocks)
    root.mid_block = nn.Module()
    root.mid_block.resnets = nn.ModuleList([nn.Conv2d(8, 8, 1)])
    return root


@pytest.fixture(scope="module")
def blora_file(tmp_path_factory) -> Path:
    """A real content+style file as the network saves it (up weights non-zero)."""
    network = applied()
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.normal_(std=0.01)
    path = tmp_path_factory.mktemp("lora") / "blora.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "blora_network"})
    return path


def bad_copy(blora_file: Path, tmp: Path, kind: str) -> Path:
    path = tmp / f"{kind}.safetensors"
    data = blora_file.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "notes":
        path.write_text("epoch 3: the style is too strong, try style_lr=5e-5\n" * 20)
    elif kind == "no-tensors":
        save_file({}, str(path), metadata={"ss_network_module": "blora_network"})
    elif kind in ("nan", "inf"):
        tensors = load_tensors(blora_file)
        key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[3]
        tensors[key][0, 0] = float("nan") if kind == "nan" else float("inf")
        save_file(tensors, str(path), metadata=read_metadata(blora_file))
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


def unwritable_folder(tmp: Path) -> Path:
    """A folder the current user cannot create files in: a chmod 555 folder, or (as root, who
    ignores permissions) a kernel filesystem that refuses new files."""

    def can_create(folder: Path) -> bool:
        probe = folder / ".blora_probe"
        try:
            probe.touch()
        except OSError:
            return False
        probe.unlink()
        return True

    folder = tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if not can_create(folder):
        return folder
    folder.chmod(0o755)
    for candidate in (Path("/sys"), Path("/proc/sys")):
        if candidate.is_dir() and not can_create(candidate):
            return candidate
    pytest.skip("no unwritable folder available here (root with writable kernel filesystems)")


def image_folder(tmp: Path, images: list[str], text_as: str = "") -> Path:
    """A folder of 1024x1024 PNGs (and a text file named like an image)."""
    from PIL import Image

    folder = tmp / "photos"
    folder.mkdir()
    for name in images:
        Image.new("RGB", (1024, 1024)).save(folder / name)
    if text_as:
        (folder / text_as).write_text("not an image, just notes")
    return folder


def tools_scale(*args, **kwargs):
    from blora_network.tools.transforms import scale

    return scale(*args, **kwargs)


def cli(*argv) -> int:
    return cli_main([str(a) for a in argv])


def sd_shaped(tmp: Path, *, diffusers_blocks: bool = False, context: int = 0, name: str = "sdx.safetensors") -> Path:
    """A LoRA whose keys look like SDXL's but whose shapes are SD1.x/SD2.x's: ``output_blocks.3.1``
    1280 wide (SDXL's is 640), or SDXL's content block reading ``context``-wide text."""
    if context:
        layers = [Layer("output_blocks.0.1.transformer_blocks.0.attn2.to_k", context, 1280),
                  Layer("output_blocks.0.1.transformer_blocks.0.attn2.to_q", 1280, 1280)]
    else:
        layers = [Layer("output_blocks.3.1.transformer_blocks.0.attn1.to_q", 1280, 1280),
                  Layer("output_blocks.3.1.transformer_blocks.0.attn1.to_k", 1280, 1280)]
    return write_kohya(tmp / name, layers, 2, diffusers_blocks=diffusers_blocks)


# -- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Path, Path], object]
    """``run(tmp_path, blora_file)``; returns the CLI exit status for CLI rows."""
    expect: Union[type, int]
    """The exception class, or the CLI exit status."""
    words: tuple[str, ...]
    """Text the message must contain; ``{tmp}`` is the test's tmp_path."""
    known_gap: str = ""
    """Set while the behaviour is missing: the row is a strict xfail (it fails loudly once fixed)."""


BUILTINS = ", ".join(builtin_names())
PATTERN_NOWHERE = r"^output_blocks\.0\.1\.transformer_blocks\.12\..*$"
BAD_REGEX = r"output_blocks\.0\.1\.("

CASES = [
    # presets
    Case("unknown-preset-name", lambda tmp, f: make(preset="contnet_style"), PresetError,
         ("unknown preset 'contnet_style'", f"Built-in presets: {BUILTINS}", "Did you mean 'content_style'")),
    Case("preset-path-with-nul-byte", lambda tmp, f: make(preset="mine\x00.toml"), PresetError,
         ("not a file name (it holds a NUL byte)", BUILTINS)),
    Case("preset-file-missing", lambda tmp, f: make(preset=str(tmp / "presets" / "mine.toml")), PresetError,
         ("{tmp}/presets/mine.toml", "not found", BUILTINS)),
    Case("toml-syntax-error", lambda tmp, f: make(preset=preset_file(tmp, "unet_target_module = []\nenable_conv = ture\n")),
         PresetError, ("{tmp}/mine.toml:2", "TOML syntax error", "enable_conv = ture")),
    Case("unknown-preset-key", lambda tmp, f: make(preset=preset_file(tmp, "unet_target_nmae = ['x']\n")), PresetError,
         ("{tmp}/mine.toml", "unknown preset key 'unet_target_nmae'", "did you mean 'unet_target_name'")),
    Case("invalid-regex", lambda tmp, f: make(preset=preset_file(tmp, f"unet_target_name = ['{BAD_REGEX}']\n")), PresetError,
         ("{tmp}/mine.toml", "invalid regular expression", repr(BAD_REGEX), "missing ), unterminated subpattern")),
    Case("pattern-matches-nothing",
         lambda tmp, f: make(preset=preset_file(tmp, f"unet_target_module = []\nunet_target_name = ['{PATTERN_NOWHERE}']\n")),
         PresetError, (f"UNet pattern '{PATTERN_NOWHERE}' matches no Linear layer", "sd-scripts' LDM names")),
    # models
    Case("diffusers-named-sdxl-unet", lambda tmp, f: make(diffusers_named_unet(2048), preset="content"), PresetError,
         ("matches no Linear layer", "diffusers names", "up_blocks.0.attentions.0", "2048", "sdxl_train_network.py")),
    Case("sd1-unet", lambda tmp, f: make(diffusers_named_unet(768), preset="content"), PresetError,
         ("matches no Linear layer", "SD1.x/SD2", "768", "sdxl_train_network.py")),
    # network_dim and network_args
    Case("network-dim-missing", lambda tmp, f: make(dim=None), NetworkArgsError, ("network_dim is missing", "--network_dim")),
    Case("network-dim-zero", lambda tmp, f: make(dim="0"), NetworkArgsError, ("network_dim='0'", "positive integer")),
    Case("network-dim-negative", lambda tmp, f: make(dim=-8), NetworkArgsError, ("network_dim=-8", "positive integer")),
    Case("network-dim-not-a-number", lambda tmp, f: make(dim="sixty-four"), NetworkArgsError,
         ("network_dim='sixty-four'", "not an integer")),
    Case("network-args-abc-for-int", lambda tmp, f: make(content_dim="abc"), NetworkArgsError, ("content_dim='abc'", "not an integer")),
    Case("network-args-abc-for-float", lambda tmp, f: make(style_lr="abc"), NetworkArgsError, ("style_lr='abc'", "not a number")),
    Case("network-args-abc-for-bool", lambda tmp, f: make(train_text_encoder="abc"), NetworkArgsError,
         ("train_text_encoder='abc'", "not a boolean")),
    Case("network-args-unknown-algo", lambda tmp, f: make(algo="lorra"), NetworkArgsError,
         ("algo='lorra'", "unknown LyCORIS algorithm", "loha, lokr, lora")),
    Case("preset-algo-map-unknown-algo",
         lambda tmp, f: make(preset=preset_file(tmp, "unet_target_module = []\nunet_target_name = ['^output_blocks']\n"
                                                     "name_algo_map = {'^output' = {algo = 'lorra'}}\n")),
         PresetError, ("{tmp}/mine.toml", "uses algo 'lorra', unknown to LyCORIS")),
    Case("preset-algo-map-dim-not-a-number",
         lambda tmp, f: make(preset=preset_file(tmp, "unet_target_name = ['^output_blocks']\n"
                                                     "name_algo_map = {'^output' = {algo = 'lora', dim = '8'}}\n")),
         PresetError, ("{tmp}/mine.toml", "name_algo_map.'^output'.dim must be a number, got '8'")),
    Case("conflict-preset-without-unet-blocks-unet-only",
         lambda tmp, f: make(preset=preset_file(tmp, "unet_target_module = []\nunet_target_name = []\n")), PresetError,
         ("{tmp}/mine.toml", "no UNet targets", "text-encoder training is off")),
    # weights files (--network_weights, --dim_from_weights)
    Case("network-weights-sd1-lora", lambda tmp, f: applied().load_weights(str(write_sd1(tmp / "sd15.safetensors"))),
         LoraFileError, ("sd15.safetensors", "none of its", "belong to this network", "start without --network_weights")),
    Case("dim-from-weights-sd1-lora",
         lambda tmp, f: blora_network.create_network_from_weights(1, str(write_sd1(tmp / "sd15.safetensors")), None, None, build_unet(TINY)),
         LoraFileError, ("sd15.safetensors", "not in this model", "another architecture")),
    Case("network-weights-other-rank", lambda tmp, f: applied(dim=8).load_weights(str(f)), LoraFileError,
         ("has shape", "expects", "--dim_from_weights")),
    Case("lora-empty", lambda tmp, f: applied().load_weights(str(bad_copy(f, tmp, "empty"))), LoraFileError,
         ("empty.safetensors", "not a safetensors file", "0 bytes")),
    Case("lora-no-tensors", lambda tmp, f: applied().load_weights(str(bad_copy(f, tmp, "no-tensors"))), LoraFileError,
         ("no-tensors.safetensors", "holds no tensors")),
    Case("lora-truncated", lambda tmp, f: applied().load_weights(str(bad_copy(f, tmp, "truncated"))), LoraFileError,
         ("truncated.safetensors", "truncated")),
    Case("lora-not-safetensors", lambda tmp, f: applied().load_weights(str(bad_copy(f, tmp, "notes"))), LoraFileError,
         ("notes.safetensors", "not a safetensors file")),
    Case("lora-nan", lambda tmp, f: applied().load_weights(str(bad_copy(f, tmp, "nan"))), LoraFileError,
         ("nan.safetensors", "lora_up.weight holds NaN or Inf", "Use an earlier save")),
    Case("lora-inf-dim-from-weights",
         lambda tmp, f: blora_network.create_network_from_weights(1, str(bad_copy(f, tmp, "inf")), None, None, build_unet(TINY)),
         LoraFileError, ("inf.safetensors", "holds NaN or Inf")),
    Case("lora-missing-file", lambda tmp, f: applied().load_weights(str(tmp / "last.safetensors")), LoraFileError,
         ("last.safetensors", "no such file")),
    # output paths
    Case("save-to-missing-folder", lambda tmp, f: applied().save_weights(str(tmp / "out" / "b.safetensors"), None, {}),
         LoraFileError, ("{tmp}/out/b.safetensors", "folder {tmp}/out does not exist")),
    Case("save-to-read-only-folder", lambda tmp, f: applied().save_weights(str(unwritable_folder(tmp) / "b.safetensors"), None, {}),
         LoraFileError, ("b.safetensors", "not writable")),
    Case("save-ckpt-to-missing-folder", lambda tmp, f: applied().save_weights(str(tmp / "out" / "b.ckpt"), None, {}),
         LoraFileError, ("does not exist",)),
    # the same files through the CLI: exit 1 and one line
    Case("cli-empty-file", lambda tmp, f: cli("inspect", bad_copy(f, tmp, "empty")), 1, ("empty.safetensors", "0 bytes")),
    Case("cli-truncated-file", lambda tmp, f: cli("split", bad_copy(f, tmp, "truncated"), "--out-dir", tmp), 1,
         ("truncated.safetensors", "truncated")),
    Case("cli-nan-file", lambda tmp, f: cli("scale", bad_copy(f, tmp, "nan"), "--style", "0.5", "-o", tmp / "x.safetensors"), 1,
         ("nan.safetensors", "NaN", "nothing was written")),
    Case("cli-output-missing-folder", lambda tmp, f: cli("scale", f, "--style", "0.5", "-o", tmp / "out" / "x.safetensors"), 1,
         ("{tmp}/out/x.safetensors", "does not exist")),
    Case("cli-output-read-only-folder",
         lambda tmp, f: cli("split", f, "--out-dir", unwritable_folder(tmp)), 1, ("not writable",)),
    Case("cli-output-without-suffix", lambda tmp, f: cli("scale", f, "--style", "0.5", "-o", tmp / "x"), 1,
         ("{tmp}/x: the output name must end in .safetensors", "did you mean {tmp}/x.safetensors?")),
    # SD1.x/SD2.x told by shapes, named as such, with the user's own key
    Case("cli-sd1-widths-under-sdxl-names", lambda tmp, f: cli("inspect", sd_shaped(tmp)), 1,
         ("an SD1.x/SD2.x LoRA", "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_k.lora_up.weight is 1280 wide",
          "SDXL's output_blocks.3.1 is 640 wide", "B-LoRA blocks exist only in SDXL")),
    Case("cli-sd1-widths-diffusers-spelled", lambda tmp, f: cli("analyze", sd_shaped(tmp, diffusers_blocks=True)), 1,
         ("an SD1.x/SD2.x LoRA", "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight")),
    Case("cli-sd2-context-under-sdxl-names", lambda tmp, f: cli("split", sd_shaped(tmp, context=1024)), 1,
         ("an SD2.x LoRA", "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k.lora_down.weight takes "
          "1024-wide text embeddings")),
    Case("cli-sd1-context-extract", lambda tmp, f: cli("extract", sd_shaped(tmp, context=768), "--blocks", "content",
                                                       "-o", tmp / "x.safetensors"), 1, ("an SD1.x LoRA", "768-wide")),
    # plan refuses what training refuses
    Case("cli-plan-pattern-matches-nothing",
         lambda tmp, f: cli("plan", "--preset", preset_file(tmp, f"unet_target_name = ['{PATTERN_NOWHERE}']\n"), "--dim", "4"),
         1, (f"UNet pattern '{PATTERN_NOWHERE}' matches no Linear layer", "sd-scripts' LDM names")),
    Case("toml-unclosed-list", lambda tmp, f: make(preset=preset_file(tmp, "unet_target_name = [\n  '^output_blocks',\n")),
         PresetError, ("{tmp}/mine.toml:1", "'[' on line 1", "is never closed", "add the matching ']'")),
    Case("toml-unclosed-table-header", lambda tmp, f: make(preset=preset_file(tmp, "[blora\ncontent_dim = 4\n")),
         PresetError, ("{tmp}/mine.toml:1", "('[blora')", "is never closed")),
    # any SDXL block by name (issue 20): training and the block tools
    Case("blocks-unknown", lambda tmp, f: make(blocks="OUT00,OUT9"), NetworkArgsError,
         ("blocks=OUT00,OUT9", "unknown SDXL block 'OUT9'", "did you mean OUT08?")),
    Case("blocks-no-attention", lambda tmp, f: make(blocks="IN01"), NetworkArgsError,
         ("block IN01 (input_blocks.1) holds no attention layers", "blocks that do: IN04")),
    Case("blocks-twice", lambda tmp, f: make(blocks="OUT01,style"), NetworkArgsError, ("block OUT01 is named twice",)),
    Case("block-dim-not-a-number", lambda tmp, f: make(blocks="OUT03", OUT03_dim="big"), NetworkArgsError,
         ("OUT03_dim='big'", "not an integer")),
    Case("scale-unknown-block", lambda tmp, f: tools_scale(f, {"OUT9": 1.0}, tmp / "x.safetensors"), LoraFileError,
         ("unknown SDXL block 'OUT9'", "did you mean OUT08?")),
    Case("cli-scale-lbw-wrong-length", lambda tmp, f: cli("scale", f, "--lbw", "1,0,1", "-o", tmp / "x.safetensors"), 1,
         ("--lbw has 3 values", "12 (BASE,IN04", "or 20")),
    Case("cli-scale-lbw-not-a-number",
         lambda tmp, f: cli("scale", f, "--lbw", "1,0,0,0,0,0,1,R,0,0,0,0", "-o", tmp / "x.safetensors"), 1,
         ("--lbw value 8 ('R') is not a number",)),
    Case("cli-scale-inspire-too-short", lambda tmp, f: cli("scale", f, "--inspire", "1,0,1", "-o", tmp / "x.safetensors"), 1,
         ("--inspire has 3 values", "at least 12")),
    Case("cli-scale-same-block-twice",
         lambda tmp, f: cli("scale", f, "--style", "0.5", "--block", "OUT1=2", "-o", tmp / "x.safetensors"), 1,
         ("block OUT01 is given twice (style and OUT1)",)),
    Case("cli-scale-block-not-in-file", lambda tmp, f: cli("scale", f, "--block", "M00=0.5", "-o", tmp / "x.safetensors"), 1,
         ("blora.safetensors: has no layers of block M00 (middle_block)", "it holds: content (80 modules)")),
    Case("cli-extract-block-not-in-file", lambda tmp, f: cli("extract", f, "--blocks", "OUT03", "-o", tmp / "x.safetensors"),
         1, ("has no attention layers of block OUT03 (output_blocks.3)",)),
    Case("cli-extract-block-without-attention",
         lambda tmp, f: cli("extract", f, "--blocks", "OUT07", "-o", tmp / "x.safetensors"), 1,
         ("block OUT07 (output_blocks.7) holds no attention layers", "or use --layers all")),
    Case("cli-combine-same-block-twice",
         lambda tmp, f: cli("combine", "--style", f, "--block", f"OUT01={f}", "-o", tmp / "x.safetensors"), 1,
         ("block OUT01 is named twice",)),
    # the demo
    Case("cli-demo-device-gpu", lambda tmp, f: cli("demo", "--device", "gpu", "-o", tmp / "x.safetensors"), 1,
         ("--device gpu: not a device name", "the devices here are: cpu")),
    Case("cli-demo-existing-output", lambda tmp, f: cli("demo", "-o", f), 1, ("already exists; pass --force",)),
    # recipe: the image folder and the files it would write
    Case("cli-recipe-missing-folder", lambda tmp, f: cli("recipe", tmp / "photos", "--model", "m", "-o", tmp / "run"), 1,
         ("image folder {tmp}/photos does not exist",)),
    Case("cli-recipe-folder-is-a-file", lambda tmp, f: cli("recipe", f, "--model", "m", "-o", tmp / "run"), 1,
         ("blora.safetensors is a file; give the folder",)),
    Case("cli-recipe-no-images", lambda tmp, f: cli("recipe", image_folder(tmp, []), "--model", "m", "-o", tmp / "run"), 1,
         ("no image sd-scripts reads", "nothing was written")),
    Case("cli-recipe-text-named-png",
         lambda tmp, f: cli("recipe", image_folder(tmp, ["ok.png"], text_as="fake.png"), "--model", "m", "-o", tmp / "run"), 1,
         ("sd-scripts would stop on 1 file(s): fake.png (not an image", "nothing was written")),
    Case("cli-recipe-bad-name", lambda tmp, f: cli("recipe", image_folder(tmp, ["ok.png"]), "--model", "m", "-o", tmp / "run",
                                                   "--name", "my run"), 1, ("--name 'my run'", "letters, digits")),
    Case("cli-recipe-bad-preset", lambda tmp, f: cli("recipe", image_folder(tmp, ["ok.png"]), "--model", "m", "-o", tmp / "run",
                                                     "--preset", "contnet"), 1, ("unknown preset 'contnet'",)),
    Case("cli-recipe-zero-steps", lambda tmp, f: cli("recipe", image_folder(tmp, ["ok.png"]), "--model", "m", "-o", tmp / "run",
                                                     "--steps", "0"), 1, ("--steps and --rank must be at least 1",)),
    # recipe --model: the SDXL base model, not a LoRA, a stray folder or a typo
    Case("cli-recipe-model-is-a-lora", lambda tmp, f: cli("recipe", image_folder(tmp, ["ok.png"]), "--model", f, "-o", tmp / "run"),
         1, ("blora.safetensors: a LoRA (", "lora_unet_", "not a checkpoint", "sd_xl_base_1.0.safetensors")),
    Case("cli-recipe-model-is-a-folder", lambda tmp, f: cli("recipe", image_folder(tmp, ["ok.png"]), "--model", tmp, "-o", tmp / "run"),
         1, ("--model {tmp}: a folder without model_index.json and unet/",)),
    Case("cli-recipe-model-missing", lambda tmp, f: cli("recipe", image_folder(tmp, ["ok.png"]), "--model", tmp / "sdxl.safetensors",
                                                        "-o", tmp / "run"), 1, ("--model {tmp}/sdxl.safetensors: not found",)),
    Case("cli-recipe-model-sd15", lambda tmp, f: cli("recipe", image_folder(tmp, ["ok.png"]), "--model",
                                                     write_sdxl_checkpoint(tmp / "v1-5.safetensors", sd1=True), "-o", tmp / "run"),
         1, ("an SD1.x/SD2.x checkpoint",)),
    Case("cli-recipe-model-not-safetensors", lambda tmp, f: cli("recipe", image_folder(tmp, ["ok.png"]), "--model",
                                                                preset_file(tmp, "notes", "model.safetensors"), "-o", tmp / "run"),
         1, ("--model {tmp}/model.safetensors: not a", "give the SDXL base checkpoint")),
    # check: a command line sd-scripts would stop on, files it must not take for a training config
    Case("cli-check-ambiguous-option", lambda tmp, f: cli("check", "--", "--network_a", "4"), 1,
         ("ambiguous option: --network_a could match --network_alpha, --network_args",)),
    Case("cli-check-two-configs", lambda tmp, f: cli("check", tmp / "a.toml", tmp / "b.toml"), 1,
         ("2 config files", "sd-scripts reads one training config")),
    Case("cli-check-dataset-config", lambda tmp, f: cli("check", preset_file(tmp, "[[datasets]]\n[[datasets.subsets]]\n"
                                                                                  "image_dir = 'x'\n", "d.toml")), 1,
         ("{tmp}/d.toml: this is a dataset config (--dataset_config", "give the training config")),
    Case("cli-check-unclosed-array-at-end", lambda tmp, f: cli("check", preset_file(tmp, "network_dim = 64\nnetwork_args = "
                                                                                        "['preset=style'\n", "run.toml")),
         1, ("{tmp}/run.toml:2: TOML syntax error: the '[' on line 2",)),
    # check: a config it cannot read
    Case("cli-check-missing-config", lambda tmp, f: cli("check", tmp / "run.toml"), 1, ("training config {tmp}/run.toml not found",)),
    Case("cli-check-toml-syntax", lambda tmp, f: cli("check", preset_file(tmp, "network_dim = 64\nnetwork_alpha = = 1\n", "run.toml")),
         1, ("{tmp}/run.toml:2", "TOML syntax error")),
    Case("cli-check-missing-dataset-config-in-command-line",
         lambda tmp, f: cli("check", "--", "--config_file", tmp / "nope.toml"), 1, ("{tmp}/nope.toml not found",)),
    Case("cli-check-nothing", lambda tmp, f: cli("check"), 1, ("nothing to check",)),
]


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.known_gap, strict=True)] if c.known_gap else []) for c in CASES],
)
def test_bad_input_gives_one_clear_message(case: Case, tmp_path, blora_file, capsys):
    before = sorted(p.name for p in tmp_path.iterdir())
    if isinstance(case.expect, int):
        code = case.run(tmp_path, blora_file)
        captured = capsys.readouterr()
        assert code == case.expect, captured.err
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err  # one line, no traceback
        message = lines[0]
    else:
        with pytest.raises(case.expect) as err:
            case.run(tmp_path, blora_file)
        message = str(err.value)
        assert type(err.value).__module__ == "blora_network.errors"
        assert "\n" not in message
    for word in case.words:
        assert word.format(tmp=tmp_path) in message, f"{word!r} not in {message!r}"
    # nothing half-written, no temp file left behind
    after = [p.name for p in tmp_path.iterdir() if p.name not in before]
    assert not [n for n in after if ".blora-tmp-" in n], after
    assert not (tmp_path / "x.safetensors").exists()
    assert blora_file.stat().st_size > 0


@pytest.mark.parametrize("tool", ["split", "combine", "extract", "convert"])
def test_tools_refuse_nan_anywhere_and_write_nothing(tool, tmp_path, blora_file, capsys):
    """NaN in the style block (read last): no file at all, not even the content part."""
    tensors = load_tensors(blora_file)
    key = sorted(k for k in tensors if "output_blocks_1_1" in k and k.endswith("lora_down.weight"))[-1]
    tensors[key][0, 0] = float("inf")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=read_metadata(blora_file))
    out = tmp_path / "out"
    out.mkdir()
    argv = {"split": ["split", bad, "--out-dir", out],
            "combine": ["combine", "--content", blora_file, "--style", bad, "-o", out / "x.safetensors"],
            "extract": ["extract", bad, "--blocks", "content,style", "-o", out / "x.safetensors"],
            "convert": ["convert", bad, "--to", "diffusers", "-o", out / "x.safetensors"]}[tool]
    assert cli(*argv) == 1
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and key in err and "NaN or Inf" in err and "nothing was written" in err
    assert list(out.iterdir()) == []


def test_table_covers_every_case_the_issue_lists():
    ids = {c.id for c in CASES}
    for needed in ("unknown-preset-name", "preset-file-missing", "toml-syntax-error", "unknown-preset-key", "invalid-regex",
                   "pattern-matches-nothing", "diffusers-named-sdxl-unet", "sd1-unet", "network-dim-missing", "network-dim-zero",
                   "network-dim-negative", "network-dim-not-a-number", "network-args-abc-for-int",
                   "conflict-preset-without-unet-blocks-unet-only", "network-weights-sd1-lora", "lora-empty", "lora-truncated",
                   "lora-not-safetensors", "lora-nan", "save-to-missing-folder", "save-to-read-only-folder"):
        assert needed in ids


# -- security: no code from a weights file or a preset; metadata is untrusted text ------------------


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_weights_never_run_code(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q.lora_down.weight": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(LoraFileError, match="refused to load this pickle file safely"):
        blora_network.create_network_from_weights(1, str(path), None, None, build_unet(TINY))
    with pytest.raises(LoraFileError, match="refused to load this pickle file safely"):
        applied().load_weights(str(path))
    with pytest.raises(LoraFileError, match="are Python pickles; the blora-network tools read .safetensors only"):
        read_metadata(path)  # the file readers refuse pickles outright
    assert cli("inspect", path) == 1
    assert not marker.exists()


def test_plain_tensor_pickle_loads_with_weights_only(tmp_path, blora_file):
    """A .ckpt holding only tensors (old sd-scripts --save_model_as ckpt) still resumes."""
    path = tmp_path / "old.ckpt"
    torch.save(load_tensors(blora_file), path)
    network = applied()
    network.load_weights(str(path))
    state = network.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in load_tensors(blora_file).items())


def test_metadata_is_returned_as_text_never_evaluated(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payloads = {
        "ss_network_args": f"__import__('os').system('touch {marker}')",
        "blora_block_dims": f"{{'content': __import__('os').system('touch {marker}')}}",
        "ss_tag_frequency": "{\"a\": " * 50 + "1" + "}" * 50,
        "modelspec.title": "\x1b[2J\x1b[31mred\x00nul",
    }
    path = tmp_path / "meta.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(path), metadata=payloads)
    assert read_metadata(path) == payloads  # exactly the strings, nothing interpreted
    cli("inspect", path, "--json")
    capsys.readouterr()
    assert not marker.exists()


def test_inspect_does_not_pass_terminal_control_characters_through(tmp_path, capsys):
    path = tmp_path / "escape.safetensors"
    name = "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q"
    write_safetensors_hashed(path, {f"{name}.lora_down.weight": torch.zeros(2, 1280), f"{name}.lora_up.weight": torch.zeros(1280, 2)},
                      {"ss_network_module": "\x1b[2J\x1b[31mred\x07", "blora_preset": "x\x1b]0;new title\x07"})
    assert cli("inspect", path) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out


def test_metadata_size_is_capped(tmp_path):
    path = tmp_path / "huge.safetensors"
    n = MAX_METADATA_BYTES + 1
    with open(path, "wb") as f:  # a header claiming more than the cap: refused before reading it
        f.write(n.to_bytes(8, "little"))
        f.write(b"{" + b" " * 64)
        f.truncate(8 + n + 16)
    with pytest.raises(LoraFileError, match="not a safetensors file"):
        read_metadata(path)
    assert cli("inspect", path) == 1


def test_preset_loader_reads_toml_only(tmp_path):
    marker = tmp_path / "pwned"
    code = f"import os\nos.system('touch {marker}')\nunet_target_name = ['x']\n"
    for name in ("evil.py", "evil.toml", "evil"):
        path = tmp_path / name
        path.write_text(code)
        spec = str(path)
        with pytest.raises(PresetError) as err:
            load_preset(spec)
        assert str(path) in str(err.value) and "TOML" in str(err.value)
    # a Python module name is not imported either: it is an unknown preset name
    with pytest.raises(PresetError, match="unknown preset 'os'"):
        load_preset("os")
    assert not marker.exists()
