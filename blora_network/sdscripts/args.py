"""What sd-scripts does with a training config and a command line, for ``recipe`` and ``check``.

Facts read from kohya-ss/sd-scripts main 48d368f (v0.10.1, 2026-02); torch-free:

- ``train_util.read_config_from_file`` loads ``--config_file`` with ``toml.load``, lifts every
  key of a top-level table to the top (one level: ``[network] network_dim = 64`` is
  ``network_dim``), puts them in an ``argparse.Namespace`` and parses the command line over
  it. So a command-line option given after ``--config_file`` overrides the file, and a value
  from the file is used **as TOML typed it**: argparse converts only what the command line
  says (``learning_rate = "5e-5"`` stays a string and fails at the optimizer).
- ``train_network.py`` splits each ``--network_args`` item on the first ``=``
  (``key, value = net_arg.split("=", 1)``); v0.9 and earlier split on every ``=`` (a value
  holding ``=`` does not unpack there). An item without ``=`` fails in both.
- ``--optimizer_args`` items are ``key=value`` with ``ast.literal_eval`` on the value.
- Images are found by ``glob_images`` with ``IMAGE_EXTENSIONS`` (case-sensitive on Linux).
- A DreamBooth subset reads the caption from ``<image stem><caption_extension>`` (first line,
  UTF-8; an empty file fails an assert); an image without one gets ``class_tokens``.

:data:`SD_ARGS` is the part of the argument parser (``train_util.add_*_arguments``,
``train_network.setup_parser``, ``sdxl_train_util.add_sdxl_training_arguments``,
``config_util.add_config_arguments``) that the recipe writes or the check reads.
"""

from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from blora_network import tomlfile
from blora_network.errors import BLoraError

__all__ = ["SdArg", "SD_ARGS", "IMAGE_EXTENSIONS", "SDXL_SCRIPT", "REAL_NEIGHBOURS", "TrainingArgs", "read_toml",
           "read_training_config", "parse_command_line", "config_args", "split_network_arg", "type_problem",
           "close_option", "unknown_keys"]

SDXL_SCRIPT = "sdxl_train_network.py"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP")
"""``library/train_util.py`` IMAGE_EXTENSIONS without the optional plugins (.avif, .jxl)."""


@dataclass(frozen=True)
class SdArg:
    """One sd-scripts option: what argparse makes of it on the command line."""

    name: str
    kind: str
    """``str``, ``int``, ``float``, ``flag`` (store_true), ``list`` (nargs="*" of str),
    ``floats`` (nargs="*" of float), ``number`` (int or float)."""
    choices: tuple = ()


def _args(kind: str, *names: str, choices: tuple = ()) -> dict[str, SdArg]:
    return {n: SdArg(n, kind, choices) for n in names}


SD_ARGS: dict[str, SdArg] = {
    **_args("str", "pretrained_model_name_or_path", "output_dir", "output_name", "network_module", "network_weights",
            "optimizer_type", "lr_scheduler", "resolution", "train_data_dir", "reg_data_dir", "in_json",
            "caption_extension", "config_file", "dataset_config", "logging_dir", "vae"),
    **_args("str", "mixed_precision", choices=("no", "fp16", "bf16")),
    **_args("str", "save_precision", choices=("float", "fp16", "bf16")),
    **_args("str", "save_model_as", choices=("ckpt", "pt", "safetensors")),
    **_args("int", "network_dim", "max_train_steps", "max_train_epochs", "train_batch_size", "seed",
            "gradient_accumulation_steps", "save_every_n_steps", "save_every_n_epochs", "min_bucket_reso",
            "max_bucket_reso", "bucket_reso_steps", "max_data_loader_n_workers", "max_token_length"),
    **_args("float", "network_alpha", "learning_rate", "unet_lr", "max_grad_norm", "network_dropout"),
    **_args("floats", "text_encoder_lr"),
    **_args("number", "lr_warmup_steps"),
    **_args("list", "network_args", "optimizer_args", "lr_scheduler_args", "base_weights"),
    **_args("flag", "network_train_unet_only", "network_train_text_encoder_only", "dim_from_weights",
            "gradient_checkpointing", "cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs",
            "cache_text_encoder_outputs_to_disk", "sdpa", "xformers", "mem_eff_attn", "full_bf16", "full_fp16",
            "fp8_base", "lowram", "highvram", "no_half_vae", "enable_bucket", "bucket_no_upscale",
            "persistent_data_loader_workers", "output_config", "shuffle_caption"),
}


def type_problem(key: str, value: Any) -> Optional[str]:
    """Why sd-scripts would choke on this config value (argparse never converts it), or None."""
    arg = SD_ARGS.get(key)
    if arg is None or value is None:
        return None
    kind = arg.kind
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "flag" and not isinstance(value, bool):
        return f"{key} = {value!r}: must be true or false (a TOML boolean, no quotes)"
    if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
        return f"{key} = {value!r}: must be a whole number without quotes, e.g. {key} = 64"
    if kind in ("float", "number") and not number:
        return f"{key} = {value!r}: must be a number without quotes, e.g. {key} = 5e-5"
    if kind == "floats" and not (number or (isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))):
        return f"{key} = {value!r}: must be a number or a list of numbers"
    if kind == "list" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        hint = f' = ["{value}"]' if isinstance(value, str) else ' = ["key=value", ...]'
        return f"{key} = {value!r}: must be a list of strings, e.g. {key}{hint} (a plain string is read one character at a time)"
    if kind == "str" and not isinstance(value, str):
        return f"{key} = {value!r}: must be a string in quotes"
    if arg.choices and value not in arg.choices:
        return f"{key} = {value!r}: sd-scripts accepts {', '.join(map(repr, arg.choices))}"
    if number and isinstance(value, float) and not math.isfinite(value):
        return f"{key} = {value!r}: must be a finite number"
    return None


def split_network_arg(item: str) -> tuple[str, str]:
    """``"preset=content_style"`` -> ``("preset", "content_style")``, as sd-scripts main splits it."""
    if "=" not in item:
        raise BLoraError(f"network_args item {item!r} has no '=': sd-scripts fails at startup "
                         "(\"not enough values to unpack\"); write key=value, e.g. preset=content_style")
    key, value = item.split("=", 1)
    return key, value


def read_toml(path: str | Path, what: str) -> dict:
    """A TOML file as a dict, or one-line errors naming the file (:mod:`blora_network.tomlfile`)."""
    return tomlfile.read_toml(Path(path), what=what, syntax_hint="sd-scripts could not read this config either")


def read_training_config(path: str | Path) -> dict[str, Any]:
    """A ``--config_file`` TOML as sd-scripts sees it: top-level tables lifted one level."""
    p = Path(path)
    if p.suffix != ".toml":  # read_config_from_file appends .toml to a name without it
        p = p.with_name(p.name + ".toml")
    flat: dict[str, Any] = {}
    for key, value in read_toml(p, "training config").items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


@dataclass
class TrainingArgs:
    """The options of one run as sd-scripts would see them, and where they came from."""

    values: dict[str, Any]
    source: str
    """The config file, ``command line``, or both."""
    from_command_line: bool
    unknown: list[str]
    """Command-line words no option of :data:`SD_ARGS` took (other sd-scripts options and their values)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for arg in SD_ARGS.values():
        flag = "--" + arg.name
        if arg.kind == "flag":
            p.add_argument(flag, action="store_true", default=None)
        elif arg.kind in ("list", "floats"):
            p.add_argument(flag, nargs="*", type=float if arg.kind == "floats" else str)
        else:
            p.add_argument(flag, type=str)
    return p


class _Stop(Exception):
    pass


def _convert(arg: SdArg, text: str) -> Any:
    try:
        if arg.kind == "int":
            return int(text)
        if arg.kind == "float":
            return float(text)
        if arg.kind == "number":
            return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise BLoraError(f"--{arg.name} {text!r}: not {'a whole number' if arg.kind == 'int' else 'a number'}; "
                         "sd-scripts' argument parser would stop here") from None
    return text


def _script_options(words: list[str]) -> list[str]:
    """The script's options: without ``accelerate launch [its options] script.py`` or ``python script.py``."""
    if words and (words[0] in ("accelerate", "python", "python3") or words[0].endswith(".py")):
        script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        if script is not None:
            return words[script + 1:]
    return words


def parse_command_line(argv: Sequence[str]) -> TrainingArgs:
    """sd-scripts' view of ``accelerate launch sdxl_train_network.py ARGS``: the ``--config_file``
    values first, the command line over them (as ``read_config_from_file`` does)."""
    words = _script_options(list(argv))
    parser = _parser()

    def fail(message: str):
        raise BLoraError(f"command line: {message}")

    parser.error = fail  # type: ignore[method-assign]
    ns, unknown = parser.parse_known_args(words)
    given = {k: v for k, v in vars(ns).items() if v is not None}
    values: dict[str, Any] = {}
    source = "command line"
    if "config_file" in given:
        values.update(read_training_config(given["config_file"]))
        source = f"{given['config_file']} + command line"
    for key, value in given.items():
        arg = SD_ARGS[key]
        values[key] = _convert(arg, value) if isinstance(value, str) else value
    return TrainingArgs(values=values, source=source, from_command_line=True, unknown=unknown)


def config_args(path: str | Path) -> TrainingArgs:
    """A training config file alone, as sd-scripts would read it."""
    return TrainingArgs(values=read_training_config(path), source=str(path), from_command_line=False, unknown=[])


REAL_NEIGHBOURS = frozenset({"caption_extention", "sample_every_n_epochs", "sample_every_n_steps"})
"""sd-scripts options (main 48d368f, all 199 names compared) close enough to one of :data:`SD_ARGS`
to look misspelt, which they are not."""


def close_option(name: str) -> Optional[str]:
    """The sd-scripts option a misspelt key probably meant (``network_modul`` -> ``network_module``)."""
    if name in REAL_NEIGHBOURS:
        return None
    close = difflib.get_close_matches(name, list(SD_ARGS), n=1, cutoff=0.85)
    return close[0] if close else None


def unknown_keys(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Config keys that look like a misspelt option this check knows: (key, option)."""
    out = []
    for key in values:
        if key not in SD_ARGS:
            close = close_option(key)
            if close:
                out.append((key, close))
    return out
