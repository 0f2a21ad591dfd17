"""``recipe``: a folder of images -> the paper's sd-scripts run, as two config files and one command.

Writes ``NAME.toml`` (for ``--config_file``: every value of the B-LoRA recipe),
``NAME_dataset.toml`` (for ``--dataset_config``: the image folder with its captions, or one subset
per kohya ``N_class tokens`` folder with its repeats and class tokens) and ``NAME_kohya_gui.json``
(the same run as a kohya_ss GUI preset, :mod:`.kohya_gui`), after
checking the folder the way sd-scripts will read it (:mod:`blora_network.sdscripts.images`). Resolution
and batch size go in the training config, not the dataset config, so that a command-line
``--resolution`` or ``--train_batch_size`` still overrides them (sd-scripts takes a dataset
config's value over the command line's).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import toml

from blora_network.errors import BLoraError

from .args import IMAGE_EXTENSIONS, SDXL_SCRIPT
from .images import BUCKETING, ImageScan, bucket_of, scan_images
from .kohya_gui import gui_preset

__all__ = ["Recipe", "PAPER", "LowVramOption", "LOWVRAM", "LOWVRAM_LEFT_OUT", "RecipeResult", "write_recipe",
           "training_config", "dataset_config", "check_model"]


@dataclass(frozen=True)
class Recipe:
    """The B-LoRA paper's training recipe (Frenkel et al., ECCV 2024), as sd-scripts options."""

    dim: int = 64
    learning_rate: float = 5e-5
    steps: int = 1000
    batch_size: int = 1
    resolution: int = 1024
    optimizer_type: str = "AdamW"
    optimizer_args: tuple[str, ...] = ("weight_decay=1e-4", "betas=0.9,0.999", "eps=1e-8")
    lr_scheduler: str = "constant"
    precision: str = "bf16"
    token: str = "A [v]"
    """The prompt the paper trains with: the trigger token."""


PAPER = Recipe()


@dataclass(frozen=True)
class LowVramOption:
    key: str
    value: Any
    why: str
    source: str
    """The sd-scripts document that recommends it."""


# From sd-scripts' own documents (main 48d368f): docs/train_network_advanced.md "Other Tips: VRAM
# Usage" lists mixed precision, gradient checkpointing, cache_latents / cache_text_encoder_outputs,
# 8-bit optimizers, full_bf16 and fp8_base; docs/sdxl_train_network.md describes
# --cache_text_encoder_outputs; docs/train_network.md describes --sdpa. The recipe already has
# bf16, gradient checkpointing, cached latents and UNet-only; --lowvram adds the three below.
LOWVRAM: tuple[LowVramOption, ...] = (
    LowVramOption("cache_text_encoder_outputs", True,
                  "the two text encoders run once before training and leave the GPU (B-LoRA does not train them)",
                  "docs/sdxl_train_network.md, --cache_text_encoder_outputs"),
    LowVramOption("sdpa", True, "PyTorch's scaled-dot-product attention: less memory for attention at 1024 px",
                  "docs/train_network.md, --sdpa"),
    LowVramOption("fp8_base", True,
                  "the frozen UNet is held in fp8, about 2.6 GB instead of 5.1 GB in bf16 (sd-scripts calls it "
                  "experimental; blora_network's default bypass mode works with it)",
                  "docs/train_network_advanced.md, Other Tips: VRAM Usage"),
)
LOWVRAM_LEFT_OUT: dict[str, str] = {
    "optimizer_type=AdamW8bit": "the B-LoRA adapter is small ({params} parameters at rank {rank}: {adamw} of AdamW "
                                "states), so 8-bit states would save {saved} and change the paper's optimizer",
    "full_bf16": "bf16 gradients for a {params}-parameter adapter save little, and sd-scripts warns it may be unstable",
    "lowram": "it is for machines with more VRAM than RAM (it loads models to the GPU), the opposite case",
}
"""Memory savers sd-scripts' docs list that --lowvram does not add, and why (filled from the plan)."""


@dataclass
class RecipeResult:
    training_config: str
    dataset_config: str
    gui_preset: str
    """``NAME_kohya_gui.json``: the same run as a kohya_ss GUI LoRA preset."""
    command: str
    name: str
    preset: str
    rank: int
    steps: int
    num_repeats: Optional[int]
    """Repeats per image the recipe chose (a plain folder), or None: the kohya folders' own repeats."""
    epoch_steps: int
    """Steps in one epoch at batch 1: images x repeats, over every subset."""
    lowvram: list[LowVramOption]
    lowvram_left_out: dict[str, str]
    scan: ImageScan
    notes: list[str] = field(default_factory=list)


def _name_from(folder: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.resolve().name).strip("._")
    return name or "blora"


def _preset_arg(preset: str) -> str:
    """A built-in name as it is; a preset file as an absolute path (sd-scripts runs from its own folder)."""
    from blora_network.network.presets import builtin_names

    if preset in builtin_names():
        return preset
    return str(Path(preset).expanduser().resolve())


def training_config(*, model: str, out_dir: Path, name: str, preset: str, rank: int, steps: int,
                    lowvram: bool, recipe: Recipe = PAPER) -> dict[str, dict[str, Any]]:
    """The ``--config_file`` tables; read_config_from_file lifts each key out of its table."""
    training: dict[str, Any] = {
        "max_train_steps": steps,
        "train_batch_size": recipe.batch_size,
        "resolution": f"{recipe.resolution},{recipe.resolution}",
        "mixed_precision": recipe.precision,
        "gradient_checkpointing": True,
        "cache_latents": True,
    }
    if lowvram:
        training.update({o.key: o.value for o in LOWVRAM})
    return {
        "model": {"pretrained_model_name_or_path": model},
        "network": {
            "network_module": "blora_network",
            "network_args": [f"preset={preset}"],
            "network_dim": rank,
            "network_alpha": float(rank),
            "network_train_unet_only": True,
        },
        "optimizer": {
            "optimizer_type": recipe.optimizer_type,
            "optimizer_args": list(recipe.optimizer_args),
            "learning_rate": recipe.learning_rate,
            "lr_scheduler": recipe.lr_scheduler,
        },
        "training": training,
        "saving": {
            "output_dir": str(out_dir),
            "output_name": name,
            "save_model_as": "safetensors",
            "save_precision": recipe.precision,
        },
    }


def dataset_config(scan: ImageScan, *, token: str, num_repeats: Optional[int]) -> dict[str, Any]:
    """The ``--dataset_config`` document: one DreamBooth subset for a plain image folder (``token``,
    ``num_repeats``), or one per kohya ``N_class tokens`` folder with its own repeats and tokens."""
    subsets = [{"image_dir": s.image_dir, "class_tokens": s.class_tokens if scan.kohya_layout else token,
                "num_repeats": s.num_repeats if scan.kohya_layout else num_repeats} for s in scan.subsets]
    return {
        "general": {"caption_extension": scan.caption_extension, **BUCKETING},
        "datasets": [{"subsets": subsets}],
    }


_COMMENTS = {
    "network_module": "B-LoRA: LoRA on the content/style attention blocks only",
    "network_alpha": "alpha = dim: scale 1, as the paper",
    "network_train_unet_only": "B-LoRA trains the UNet only",
    "learning_rate": "the paper's rate; whole-UNet LoRA rates (1e-4 and up) overshoot here",
    "resolution": "SDXL's native size",
    "mixed_precision": "bf16 needs an RTX 30xx / A100 or newer; use fp16 with --no_half_vae otherwise",
}


def toml_value(value: Any) -> str:
    """A TOML literal for a config value. Strings are written here, not by the ``toml`` package,
    whose writer turns a Windows path's ``\\x`` into an escape that does not read back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if "'" not in value and not any(ord(c) < 32 or ord(c) == 127 for c in value):
            return f"'{value}'"  # a literal string: backslashes stay backslashes
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _table_lines(name: str, values: dict[str, Any], comments: dict[str, str], array: bool = False) -> list[str]:
    lines = ["", f"[[{name}]]" if array else f"[{name}]"]
    nested = []
    for key, value in values.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            nested += [line for item in value for line in _table_lines(f"{name}.{key}", item, comments, array=True)]
            continue
        line = f"{key} = {toml_value(value)}"
        lines.append(f"{line}  # {comments[key]}" if key in comments else line)
    return lines + nested


def _toml_text(tables: dict[str, Any], header: str, comments: dict[str, str]) -> str:
    """The document as TOML text with comments; read back with ``toml`` (what sd-scripts uses) to be sure."""
    lines = [f"# {line}" for line in header.splitlines()]
    for name, values in tables.items():
        items = values if isinstance(values, list) else [values]
        for item in items:
            lines += _table_lines(name, item, comments, array=isinstance(values, list))
    text = "\n".join(lines) + "\n"
    if toml.loads(text) != tables:  # pragma: no cover - a bug of ours, never a file sd-scripts misreads
        raise BLoraError("internal error: the TOML written does not read back as written; please report it")
    return text


def _write_all(out: Path, texts: dict[Path, str]) -> None:
    """Write the config files into ``out`` (made if missing), each atomically; on any failure (a
    full disk, Ctrl-C) remove the new files already written and the folders made: all or nothing."""
    from blora_network.files.safefile import atomic_target, make_folders, remove_folders

    made = make_folders(out)
    created: list[Path] = []
    try:
        for path, text in texts.items():
            new = not path.exists()
            with atomic_target(path) as tmp:
                Path(tmp).write_text(text, encoding="utf-8")
            if new:
                created.append(path)
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        remove_folders(made)
        raise


def _refuse_problems(scan: ImageScan) -> None:
    if scan.problems:
        raise BLoraError(
            f"{scan.folder}: sd-scripts would stop on {len(scan.problems)} file(s): {'; '.join(scan.problems)}; "
            "fix them or move them out of the folder; nothing was written"
        )
    if not scan.usable:
        raise BLoraError(
            f"{scan.folder}: no image sd-scripts reads (it looks for {', '.join(sorted({e.lower() for e in IMAGE_EXTENSIONS}))}); "
            "B-LoRA needs one image or more; nothing was written"
        )


def _outputs(out_dir: Path, name: str, force: bool) -> tuple[Path, Path, Path]:
    if out_dir.exists() and not out_dir.is_dir():
        raise BLoraError(f"-o {out_dir}: is a file; give a folder for the config files")
    train, data, gui = out_dir / f"{name}.toml", out_dir / f"{name}_dataset.toml", out_dir / f"{name}_kohya_gui.json"
    for p in (train, data, gui):
        if p.exists() and not force:
            raise BLoraError(f"{p}: already exists; pass --force to replace it, or choose another --name; nothing was written")
    return train, data, gui


def _notes(scan: ImageScan) -> list[str]:
    notes = [f"{scan.shown(i)}: {i.width}x{i.height} ({i.width * i.height / 1e6:.2f} MP): sd-scripts' bucketing "
             f"enlarges it x{i.upscale:.2f} to cover the {'x'.join(map(str, bucket_of(i.width, i.height)[0]))} bucket, "
             "and the blur is learned as part of the style; use a larger image if you have one" for i in scan.small]
    notes += [f"{scan.shown(i)}: no caption file {Path(i.file).stem}{scan.caption_extension}: it is trained with "
              f"the caption {i.class_tokens!r} (class_tokens)" for i in scan.missing_captions]
    notes += [f"{Path(i.caption_file).name}: the caption {i.caption!r} does not contain the trigger token "
              f"{i.class_tokens!r}; the B-LoRA will not answer to it" for i in scan.without_token]
    notes += [f"ignored by sd-scripts: {x}" for x in scan.ignored]
    return notes


_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_LORA_MARKS = ("lora_unet_", "lora_te", ".lora_down.", ".lora_A.", ".hada_w1", ".lokr_w1", "lora_unet.")
_WANT = "give the SDXL base checkpoint (e.g. sd_xl_base_1.0.safetensors) or a diffusers SDXL folder; nothing was written"


def check_model(model: str) -> tuple[str, Optional[str]]:
    """``(what the config names, a note)`` for ``--model``, or a one-line refusal.

    sd-scripts (``sdxl_train_util._load_target_model``) loads a file as a single-file SDXL
    checkpoint (UNet under ``model.diffusion_model.``, text encoders under
    ``conditioner.embedders.``), and anything else with diffusers' ``from_pretrained``: a folder
    with ``model_index.json`` and ``unet/``, or a Hugging Face model id. Only the header of a
    .safetensors file is read.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file() and (path / "unet").is_dir():
            return str(path.resolve()), None
        raise BLoraError(f"--model {model}: a folder without model_index.json and unet/, so not a diffusers model; {_WANT}")
    if not path.exists():
        if _HF_ID.fullmatch(model) and not model.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin")):
            return model, (f"--model {model}: no such file or folder here; sd-scripts will load it as a Hugging Face "
                           "model id (a download)")
        raise BLoraError(f"--model {model}: not found; {_WANT}")
    from blora_network.files.safefile import PICKLE_SUFFIXES, read_header_layout

    if path.suffix.lower() in PICKLE_SUFFIXES:
        return str(path.resolve()), f"--model {path.name}: a pickle checkpoint, not read here (sd-scripts loads it with torch.load)"
    try:
        keys = [k for k in read_header_layout(path)[0] if k != "__metadata__"]
    except BLoraError as e:
        raise BLoraError(f"--model {e}; {_WANT}") from None
    lora = next((k for k in keys if any(m in k for m in _LORA_MARKS)), None)
    if lora is not None:
        raise BLoraError(f"--model {model}: a LoRA ({len(keys)} tensors, e.g. {lora}), not a checkpoint: --model is the "
                         f"base model the B-LoRA trains on; {_WANT}")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise BLoraError(f"--model {model}: no UNet tensors (model.diffusion_model.*), so not a single-file SDXL "
                         f"checkpoint; {_WANT}")
    if not any(k.startswith("conditioner.embedders.") for k in keys):
        raise BLoraError(f"--model {model}: an SD1.x/SD2.x checkpoint (no SDXL text encoders, conditioner.embedders.*): "
                         f"B-LoRA trains SDXL's blocks; {_WANT}")
    return str(path.resolve()), None


def write_recipe(images, *, model: str, out_dir, name: Optional[str] = None, preset: str = "content_style",
                 token: str = PAPER.token, steps: int = PAPER.steps, rank: int = PAPER.dim, lowvram: bool = False,
                 caption_extension: Optional[str] = None, force: bool = False) -> RecipeResult:
    """Check ``images``, then write the training and dataset configs; nothing is written on a problem."""
    from blora_network.tools.plan import plan

    if not token.strip():
        raise BLoraError("--token is empty: give the trigger token, e.g. --token \"A [v]\"")
    resolved_preset = plan(preset, rank)  # refuses a preset that does not load or selects nothing, as training would
    scan = scan_images(images, token=token, caption_extension=caption_extension)
    _refuse_problems(scan)
    out = Path(out_dir).expanduser().resolve()
    name = name or _name_from(Path(scan.folder))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise BLoraError(f"--name {name!r}: use letters, digits, '_', '-' or '.' (it becomes file names)")
    model_path, model_note = check_model(model)
    train_path, data_path, gui_path = _outputs(out, name, force)
    # a plain folder: one epoch covers the run (no per-epoch overhead); kohya folders keep their repeats
    num_repeats = None if scan.kohya_layout else max(1, math.ceil(steps / len(scan.usable)))
    epoch_steps = sum(s.images * (s.num_repeats or num_repeats) for s in scan.subsets)
    train = training_config(model=model_path, out_dir=out, name=name, preset=_preset_arg(preset), rank=rank,
                            steps=steps, lowvram=lowvram)
    data = dataset_config(scan, token=token, num_repeats=num_repeats)
    comments = {**_COMMENTS, **{o.key: f"--lowvram: {o.why} ({o.source})" for o in LOWVRAM}}
    gui = gui_preset(model=model_path, dataset_config=str(data_path), out_dir=str(out), name=name,
                     preset_arg=_preset_arg(preset), rank=rank, steps=steps, learning_rate=PAPER.learning_rate,
                     optimizer=PAPER.optimizer_type, optimizer_args=PAPER.optimizer_args, lr_scheduler=PAPER.lr_scheduler,
                     resolution=PAPER.resolution, precision=PAPER.precision, lowvram=lowvram)
    _write_all(out, {
        train_path: _toml_text(train, f"B-LoRA training config for sd-scripts' {SDXL_SCRIPT} --config_file\n"
                                      "written by blora-network recipe; command-line options given after "
                                      "--config_file override these values", comments),
        data_path: _toml_text(data, f"B-LoRA dataset config for --dataset_config: {len(scan.usable)} image(s) "
                                    f"in {scan.folder}", {}),
        gui_path: json.dumps(gui, indent=2, ensure_ascii=False) + "\n",
    })
    command = f"accelerate launch {SDXL_SCRIPT} --config_file {_quote(train_path)} --dataset_config {_quote(data_path)}"
    return RecipeResult(
        training_config=str(train_path), dataset_config=str(data_path), gui_preset=str(gui_path), command=command,
        name=name, preset=resolved_preset.preset, rank=rank, steps=steps, num_repeats=num_repeats,
        epoch_steps=epoch_steps, lowvram=list(LOWVRAM) if lowvram else [],
        lowvram_left_out=_left_out(resolved_preset, rank) if lowvram else {}, scan=scan,
        notes=_notes(scan) + ([model_note] if model_note else []) + _gui_notes(_preset_arg(preset)),
    )


def _gui_notes(preset_arg: str) -> list[str]:
    if any(c.isspace() for c in preset_arg):
        return [f"preset {preset_arg}: the kohya_ss GUI splits Additional parameters on spaces, so this path cannot "
                "reach sd-scripts from the GUI; move the preset to a path without spaces"]
    return []


def _left_out(resolved, rank: int) -> dict[str, str]:
    adamw, adamw8 = resolved.optimizer_bytes["adamw_states"], resolved.optimizer_bytes["adamw8bit_states"]
    values = dict(params=f"{resolved.params / 1e6:.0f} M", rank=rank, adamw=f"{adamw / 2**20:.0f} MiB",
                  saved=f"{(adamw - adamw8) / 2**20:.0f} MiB")
    return {k: why.format(**values) for k, why in LOWVRAM_LEFT_OUT.items()}


def _quote(path: Path) -> str:
    text = str(path)
    return f'"{text}"' if re.search(r"[^A-Za-z0-9_./:\\-]", text) else text
