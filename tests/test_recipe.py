"""``recipe``: image folders made with Pillow, the two files it writes read the way sd-scripts reads them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import toml
from PIL import Image

from blora_network.cli.main import main as cli_main
from blora_network.sdscripts.recipe import LOWVRAM, PAPER, toml_value
from lora_factories import full_attention_layers, write_kohya, write_sdxl_checkpoint
from sdscripts_schema import dataset_problems, real_sd_scripts, training_args, training_problems


def cli(*argv) -> int:
    return cli_main([str(a) for a in argv])


def image(path: Path, size=(1024, 1024), caption: str | None = None) -> Path:
    Image.new("RGB", size, (120, 30, 200)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


@pytest.fixture
def good(tmp_path) -> Path:
    folder = tmp_path / "dog"
    folder.mkdir()
    image(folder / "dog.png", caption="A [v] dog sitting on the grass")
    return folder


def recipe(folder: Path, out: Path, *extra) -> int:
    model = write_sdxl_checkpoint(folder.parent / "sd_xl_base_1.0.safetensors")  # recipe reads its header only
    return cli("recipe", folder, "--model", model, "-o", out, *extra)


def test_good_folder_writes_the_papers_recipe(good, tmp_path, capsys):
    out = tmp_path / "run"
    assert recipe(good, out) == 0
    text = capsys.readouterr().out
    train, data = out / "dog.toml", out / "dog_dataset.toml"
    values = training_args(train)
    assert training_problems(values) == []
    assert values["network_module"] == "blora_network" and values["network_args"] == ["preset=content_style"]
    assert (values["network_dim"], values["network_alpha"]) == (64, 64.0)
    assert values["network_train_unet_only"] is True and values["optimizer_type"] == "AdamW"
    assert values["optimizer_args"] == ["weight_decay=1e-4", "betas=0.9,0.999", "eps=1e-8"]
    assert (values["learning_rate"], values["lr_scheduler"], values["max_train_steps"]) == (5e-5, "constant", 1000)
    assert (values["train_batch_size"], values["resolution"]) == (1, "1024,1024")
    assert values["mixed_precision"] == values["save_precision"] == "bf16"
    assert values["gradient_checkpointing"] and values["cache_latents"] and values["save_model_as"] == "safetensors"
    assert values["output_dir"] == str(out.resolve()) and values["output_name"] == "dog"
    assert values["pretrained_model_name_or_path"] == str((tmp_path / "sd_xl_base_1.0.safetensors").resolve())
    dataset = toml.load(str(data))
    assert dataset_problems(dataset) == []
    subset = dataset["datasets"][0]["subsets"][0]
    assert subset["image_dir"] == str(good.resolve()) and subset["class_tokens"] == "A [v]"
    assert subset["num_repeats"] == 1000 and dataset["general"]["caption_extension"] == ".txt"
    assert f"accelerate launch sdxl_train_network.py --config_file {train} --dataset_config {data}" in text
    assert "override the file" in text and "1 image(s) (1024x1024), 1 with a caption file" in text
    assert "note:" not in text  # nothing to say about a good folder


def test_missing_captions_small_images_and_ignored_files_are_named(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    image(folder / "a.png", caption="a photo of A [v]")
    image(folder / "b.jpg", size=(640, 480))
    image(folder / "c.png", caption="a red sofa")
    image(folder / "d.Png")
    (folder / "notes.md").write_text("shoot again at noon")
    assert recipe(folder, tmp_path / "out", "--steps", "900") == 0
    text = capsys.readouterr().out
    assert "b.jpg: 640x480 (0.31 MP): sd-scripts' bucketing enlarges it x1.87 to cover the 1152x896 bucket" in text
    assert "b.jpg: no caption file b.txt: it is trained with the caption 'A [v]' (class_tokens)" in text
    assert "c.txt: the caption 'a red sofa' does not contain the trigger token 'A [v]'" in text
    assert "d.Png (sd-scripts looks for .png or .PNG only" in text and "notes.md (not an image type" in text
    subset = toml.load(str(tmp_path / "out" / "imgs_dataset.toml"))["datasets"][0]["subsets"][0]
    assert subset["num_repeats"] == 300  # 900 steps over the 3 images sd-scripts reads


@pytest.mark.parametrize("bad, words", [
    ("text-as-png", ("notes.png (not an image: Pillow cannot identify it", "b'this is not")),
    ("truncated", ("cut.png (broken image",)),
    ("caption-latin1", ("caption dog.txt is not UTF-8",)),
    ("caption-empty", ("caption dog.txt is empty",)),
])
def test_files_sd_scripts_would_stop_on_refuse_and_write_nothing(good, tmp_path, capsys, bad, words):
    if bad == "text-as-png":
        (good / "notes.png").write_text("this is not an image")
    elif bad == "truncated":
        data = image(tmp_path / "full.png", size=(256, 256)).read_bytes()
        (good / "cut.png").write_bytes(data[: len(data) // 2])
    elif bad == "caption-latin1":
        (good / "dog.txt").write_bytes("A [v] caf\xe9".encode("latin-1"))
    else:
        (good / "dog.txt").write_bytes(b"")
    out = tmp_path / "out"
    assert recipe(good, out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing was written" in err[0], err
    for w in words:
        assert w in err[0]
    assert not out.exists() or not list(out.iterdir())


def test_lowvram_options_exist_in_sd_scripts_and_are_explained(good, tmp_path, capsys):
    assert recipe(good, tmp_path / "out", "--lowvram", "--rank", "32", "--preset", "style", "--name", "ink") == 0
    text = capsys.readouterr().out
    values = training_args(tmp_path / "out" / "ink.toml")
    assert training_problems(values) == []
    for option in LOWVRAM:
        assert values[option.key] is True
        assert f"--lowvram: {option.key} = true" in text and option.source in text
    assert (values["network_dim"], values["network_alpha"], values["network_args"]) == (32, 32.0, ["preset=style"])
    assert "leaves out optimizer_type=AdamW8bit" in text
    from blora_network.sdscripts.check import check_config

    assert check_config(tmp_path / "out" / "ink.toml").findings == []  # check finds nothing wrong with a recipe


def test_existing_files_need_force_and_json_is_one_document(good, tmp_path, capsys):
    out = tmp_path / "out"
    assert recipe(good, out) == 0
    capsys.readouterr()
    assert recipe(good, out) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert recipe(good, out, "--force", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["training_config"] == str(out.resolve() / "dog.toml") and doc["scan"]["images"][0]["width"] == 1024


@pytest.mark.parametrize("value", ["C:\\sd\\xl\\base.safetensors", "it's \"quoted\"", "tab\there", "ünïcode"])
def test_strings_read_back_exactly(value):
    """The toml package's own writer mangles '\\x' in Windows paths; ours must not."""
    assert toml.loads(f"k = {toml_value(value)}")["k"] == value


def test_a_preset_file_is_written_as_an_absolute_path(good, tmp_path, monkeypatch, capsys):
    from blora_network.network.presets import builtin_preset_text

    monkeypatch.chdir(tmp_path)
    Path("mine.toml").write_text(builtin_preset_text("content"))
    assert recipe(good, tmp_path / "out", "--preset", "mine.toml") == 0
    assert training_args(tmp_path / "out" / "dog.toml")["network_args"] == [f"preset={tmp_path / 'mine.toml'}"]
    assert recipe(good, tmp_path / "out2", "--preset", "nope.toml") == 1
    assert "preset file nope.toml not found" in capsys.readouterr().err


def test_recipe_files_pass_sd_scripts_own_reader(good, tmp_path, monkeypatch):
    """sd-scripts' read_config_from_file, its dataset schema and its dataset builder on our files
    (needs BLORA_SD_SCRIPTS=/path/to/sd-scripts in a kohya environment; skipped otherwise)."""
    sd, why = real_sd_scripts()
    if sd is None:
        pytest.skip(why)
    image(good / "b.jpg", size=(832, 1216))  # one without a caption: class_tokens
    out = tmp_path / "run"
    assert recipe(good, out, "--lowvram") == 0
    train, data = out / "dog.toml", out / "dog_dataset.toml"
    parser = sd.sdxl_train_network.setup_parser()
    monkeypatch.setattr(sys, "argv", ["sdxl_train_network.py", "--config_file", str(train), "--dataset_config", str(data),
                                      "--max_train_steps", "1500"])
    args = sd.train_util.read_config_from_file(parser.parse_args(), parser)
    assert args.network_module == "blora_network" and args.network_alpha == 64.0 and args.fp8_base is True
    assert args.max_train_steps == 1500 and args.learning_rate == PAPER.learning_rate  # the command line overrides
    sd.train_util.prepare_dataset_args(args, True)
    assert args.resolution == (1024, 1024)
    user_config = sd.config_util.load_user_config(str(data))
    sanitizer = sd.config_util.ConfigSanitizer(True, True, False, True)
    blueprint = sd.config_util.BlueprintGenerator(sanitizer).generate(user_config, args)
    subsets = blueprint.dataset_group.datasets[0].subsets
    assert subsets[0].params.image_dir == str(good.resolve()) and subsets[0].params.class_tokens == "A [v]"
    group, _ = sd.config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    dataset = group.datasets[0]
    captions = sorted(info.caption for info in dataset.image_data.values())
    assert captions == ["A [v]", "A [v] dog sitting on the grass"]


def test_model_as_sd_scripts_loads_it(good, tmp_path, capsys):
    """A single-file SDXL checkpoint or a diffusers folder (model_index.json + unet/) or a Hugging Face
    id pass (sdxl_train_util._load_target_model takes each); a LoRA or a bare folder does not."""
    from blora_network.sdscripts.recipe import check_model

    diffusers = tmp_path / "sdxl-diffusers"
    (diffusers / "unet").mkdir(parents=True)
    (diffusers / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert check_model(str(diffusers)) == (str(diffusers.resolve()), None)
    model, note = check_model("stabilityai/stable-diffusion-xl-base-1.0")
    assert model == "stabilityai/stable-diffusion-xl-base-1.0" and "Hugging Face model id" in note
    assert cli("recipe", good, "--model", diffusers, "-o", tmp_path / "run") == 0
    assert toml.load(str(tmp_path / "run" / "dog.toml"))["model"]["pretrained_model_name_or_path"] == str(diffusers.resolve())
    lora = write_kohya(tmp_path / "mine.safetensors", full_attention_layers(["style"])[:2], 4)
    assert cli("recipe", good, "--model", lora, "-o", tmp_path / "run2") == 1
    err = capsys.readouterr().err
    assert "a LoRA (6 tensors, e.g. lora_unet_output_blocks_1_1_" in err and not (tmp_path / "run2").exists()


def test_kohya_folder_layout_is_read_as_sd_scripts_reads_train_data_dir(tmp_path, capsys):
    """`IMAGES/10_sks dog/*.png` (the kohya_ss GUI's dataset preparation): config_util's
    generate_dreambooth_subsets_config_by_subdirs makes one subset per `N_tokens` folder."""
    root = tmp_path / "img"
    for sub in ("10_sks dog", "5_ink_wash", "misc", "0_off"):
        (root / sub).mkdir(parents=True)
    image(root / "10_sks dog" / "a.png", caption="a photo of sks dog")
    image(root / "10_sks dog" / "b.png")
    image(root / "5_ink_wash" / "c.png", caption="ink_wash painting")
    image(root / "misc" / "d.png")
    image(root / "e.png")
    assert recipe(root, tmp_path / "out", "--steps", "100") == 0
    text = capsys.readouterr().out
    dataset = toml.load(str(tmp_path / "out" / "img_dataset.toml"))
    assert dataset_problems(dataset) == []
    assert dataset["datasets"][0]["subsets"] == [
        {"image_dir": str((root / "10_sks dog").resolve()), "class_tokens": "sks dog", "num_repeats": 10},
        {"image_dir": str((root / "5_ink_wash").resolve()), "class_tokens": "ink_wash", "num_repeats": 5},
    ]
    assert "3 image(s) (1024x1024)" in text and "2 kohya folder(s)" in text
    assert "10_sks dog/b.png: no caption file b.txt: it is trained with the caption 'sks dog' (class_tokens)" in text
    assert "misc/ (not N_class tokens" in text and "0_off/ (0 repeats" in text and "e.png (beside the N_class" in text
    assert "an epoch is images x repeats = 25 steps at batch 1, and the run stops at max_train_steps 100, 4 epoch(s)" in text
    sd, _ = real_sd_scripts()
    if sd is not None:  # sd-scripts' own reader of the same folder
        theirs = sd.config_util.generate_dreambooth_subsets_config_by_subdirs(str(root))
        assert sorted((Path(s["image_dir"]).name, s["num_repeats"], s["class_tokens"]) for s in theirs) == [
            ("10_sks dog", 10, "sks dog"), ("5_ink_wash", 5, "ink_wash")]


def test_a_truncated_jpeg_stops_the_recipe_as_latent_caching_would(good, tmp_path, capsys):
    import random

    from PIL import Image

    rng = random.Random(0)
    noise = Image.frombytes("RGB", (512, 512), bytes(rng.randrange(256) for _ in range(512 * 512 * 3)))
    noise.save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (good / "cut.jpg").write_bytes(data[: len(data) // 3])
    with Image.open(good / "cut.jpg") as im:
        im.verify()  # Pillow's structural check passes: only decoding finds the missing two thirds
    assert recipe(good, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "sd-scripts would stop on 1 file(s): cut.jpg (broken image: image file is truncated" in err
    assert not (tmp_path / "out").exists()


def test_sdxl_bucket_sizes_are_not_flagged_only_what_bucketing_enlarges(tmp_path, capsys):
    folder = tmp_path / "sizes"
    folder.mkdir()
    for w, h in ((1216, 832), (832, 1216), (1344, 768), (1024, 1024), (2048, 1536), (1000, 1000)):
        image(folder / f"{w}x{h}.png", size=(w, h), caption="A [v]")
    assert recipe(folder, tmp_path / "out") == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: 1000x1000.png: 1000x1000 (1.00 MP): sd-scripts' bucketing enlarges it x1.02 to cover the "
                     "1024x1024 bucket, and the blur is learned as part of the style; use a larger image if you have one"]
