"""The kohya_ss GUI (bmaltais/kohya_ss): its saved configs and presets, read as the run they start.

Facts read from the GUI's code at 45088f04 (v26 line; it pins sd-scripts v0.11.1), torch-free:

- The LoRA tab has no network-module field: ``train_model`` derives ``network_module`` and a
  ``network_args`` string from "LoRA type" (lora_gui.py), writes every setting to
  ``config_lora-DATE.toml`` (values ``""``, ``False``, ``None`` and so ``0`` left out, ``"``
  removed from the network args, which are split on spaces) and runs ``accelerate launch
  sdxl_train_network.py --config_file THAT.toml`` followed by "Additional parameters".
- ``run_cmd_advanced_training`` (common_gui.py) removes ``"`` from Additional parameters, splits
  them on whitespace and passes each word through ``shlex.quote`` to a process started without
  a shell: a word with a character outside ``[A-Za-z0-9_@%+=:,./-]`` reaches sd-scripts wrapped
  in ``'``. sd-scripts parses the command line over the file, so a typed ``--network_args``
  replaces the GUI's whole list.
- ``network_train_unet_only`` is set only when the text-encoder rate is 0 and the UNet's is not.
- A preset (``presets/lora/user_presets/NAME.json``) or a saved config is read key by key: a key the
  file leaves out keeps the field's current value.

:func:`gui_run` turns a saved config or preset into the sd-scripts values the GUI would run and names
the GUI's traps; ``check`` then runs every check it runs on an sd-scripts config.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from blora_network.errors import BLoraError

if TYPE_CHECKING:
    from .args import TrainingArgs

__all__ = ["GUI_COMMIT", "MODULE_WORD", "GUI_LABELS", "gui_words", "read_gui_config", "gui_network_module",
           "gui_values", "gui_preset", "gui_run"]

GUI_COMMIT = "45088f04af78e11cec5407ff4652ea3ed2c14422"
MODULE_WORD = "--network_module=blora_network"
_UNSAFE = re.compile(r"[^\w@%+=:,./-]", re.ASCII)  # shlex.quote's test

GUI_LABELS: dict[str, str] = {
    "loraplus_lr_ratio": "LoRA+ learning rate ratio",
    "loraplus_unet_lr_ratio": "LoRA+ Unet learning rate ratio",
    "loraplus_text_encoder_lr_ratio": "LoRA+ Text Encoder learning rate ratio",
    "rank_dropout": "Rank dropout",
    "module_dropout": "Module dropout",
    "down_lr_weight": "Down LR weights",
    "mid_lr_weight": "Mid LR weights",
    "up_lr_weight": "Up LR weights",
    "block_lr_zero_threshold": "Blocks LR zero threshold",
    "block_dims": "Block dims",
    "block_alphas": "Block alphas",
    "conv_block_dims": "Conv dims",
    "conv_block_alphas": "Conv alphas",
    "conv_dim": "Convolution Rank (Dimension)",
    "conv_alpha": "Convolution Alpha",
    "unit": "DyLoRA Unit / Block size",
}
"""The LoRA-tab field behind each network arg the GUI writes."""

_KOHYA_VARS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
               "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
"""What the Standard, Kohya LoCon and LoRA-FA types add when the field is set (truthy)."""
_DYLORA_VARS = ("conv_dim", "conv_alpha", *_KOHYA_VARS[:8], "rank_dropout", "module_dropout", "unit")
_LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
_LOCON = ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode", "dora_wd", "module_dropout",
          "use_tucker", "use_scalar", "rank_dropout_scale")
_LYCORIS: dict[str, tuple[str, tuple[str, ...]]] = {
    # LoRA type: (algo, network args in the GUI's order, "arg=field" where the names differ), preset first
    "LyCORIS/BOFT": ("boft", ("conv_dim", "conv_alpha", "module_dropout", "use_tucker", "rank_dropout",
                              "rank_dropout_scale", "algo", "train_norm")),
    "LyCORIS/Diag-OFT": ("diag-oft", ("conv_dim", "conv_alpha", "module_dropout", "use_tucker", "rank_dropout",
                                      "rank_dropout_scale", "constraint=constrain", "rescaled", "algo", "train_norm")),
    "LyCORIS/DyLoRA": ("dylora", ("conv_dim", "conv_alpha", "use_tucker", "block_size=unit", "rank_dropout",
                                  "module_dropout", "algo", "train_norm")),
    "LyCORIS/GLoRA": ("glora", ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout",
                                "rank_dropout_scale", "algo", "train_norm")),
    "LyCORIS/iA3": ("ia3", ("conv_dim", "conv_alpha", "train_on_input", "algo")),
    "LyCORIS/LoCon": ("locon", (*_LOCON, "algo", "train_norm")),
    "LyCORIS/LoHa": ("loha", (*_LOCON, "algo", "train_norm")),
    "LyCORIS/LoKr": ("lokr", ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode", "dora_wd",
                              "module_dropout", "factor", "use_cp", "use_scalar", "decompose_both",
                              "rank_dropout_scale", "algo", "train_norm")),
    "LyCORIS/Native Fine-Tuning": ("full", ("rank_dropout", "module_dropout", "rank_dropout_scale", "algo",
                                            "train_norm")),
}
"""train_model's network_args string for each LyCORIS type (module ``lycoris.kohya``)."""
_NATIVE_MODULES = {"Standard": "networks.lora", "Kohya LoCon": "networks.lora", "LoRA-FA": "networks.lora_fa",
                   "Kohya DyLoRA": "networks.dylora", "Kohya LoHa": "networks.loha", "Kohya LoKr": "networks.lokr"}
_GUI_KEYS = ("LoRA_type", "additional_parameters", "sdxl", "max_resolution", "optimizer")
"""Keys every GUI-saved LoRA config has and an sd-scripts config never has."""


def gui_words(additional_parameters: str) -> list[str]:
    """The words ``run_cmd_advanced_training`` appends to the command: ``"`` removed, split on
    whitespace, each through ``shlex.quote``."""
    return [shlex.quote(word) for word in str(additional_parameters or "").replace('"', "").split()]


def read_gui_config(path) -> dict[str, Any]:
    """A configuration the GUI saved, or a preset JSON, as a dict; one-line errors naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BLoraError(f"{path}: not found; give a kohya_ss GUI config (.json) or an sd-scripts config (.toml)") from None
    except IsADirectoryError:
        raise BLoraError(f"{path}: is a folder; give the .json file the GUI saved") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BLoraError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BLoraError(f"{path}:{e.lineno}:{e.colno}: JSON syntax error: {e.msg}; the GUI could not load it either") from None
    if not isinstance(data, dict) or not any(key in data for key in _GUI_KEYS):
        raise BLoraError(f"{path}: not a kohya_ss LoRA config (none of {', '.join(_GUI_KEYS)}); give the .json the "
                         "GUI saved (Configuration > Save) or a preset from presets/lora/")
    return data


def _number(value: Any, default: float = 0.0) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _lycoris_args(data: Mapping[str, Any], lora_type: str) -> str:
    algo, keys = _LYCORIS[lora_type]
    args = f" preset={data.get('LyCORIS_preset', 'full')}"
    for spec in keys:
        arg, _, name = spec.partition("=")
        if arg == "algo":
            args += f" algo={algo}"
        elif data.get(name or arg) is not None:  # a partial preset: the GUI would use the field's current value
            args += f" {arg}={data[name or arg]}"
    return args


def _native_loha_lokr_args(data: Mapping[str, Any], lokr: bool) -> str:
    """build_native_loha_lokr_network_args: only values off their defaults."""
    parts = []
    if _number(data.get("conv_dim")) > 0:
        alpha = _number(data.get("conv_alpha"), 1.0)
        parts += [f"conv_dim={int(_number(data.get('conv_dim')))}", f"conv_alpha={int(alpha) if alpha == int(alpha) else alpha}"]
    if data.get("use_tucker"):
        parts.append("use_tucker=True")
    if lokr and int(_number(data.get("factor"), -1)) != -1:
        parts.append(f"factor={int(_number(data.get('factor')))}")
    parts += [f"{k}={data[k]}" for k in ("rank_dropout", "module_dropout") if _number(data.get(k)) > 0]
    return "".join(" " + p for p in parts)


def gui_network_module(data: Mapping[str, Any]) -> tuple[str, str]:
    """``(network_module, network_args string)`` as ``train_model`` derives them from "LoRA type"."""
    lora_type = str(data.get("LoRA_type") or "Standard")
    if lora_type == "LoCon":  # update_my_data renames it on load
        lora_type = "LyCORIS/LoCon"
    args = ""
    if lora_type in _LYCORIS:
        module, args = "lycoris.kohya", _lycoris_args(data, lora_type)
    elif lora_type in _NATIVE_MODULES:
        module = _NATIVE_MODULES[lora_type]
        if lora_type == "Kohya LoCon":
            args += f' conv_dim="{data.get("conv_dim")}" conv_alpha="{data.get("conv_alpha")}"'
        if lora_type in ("Standard", "Kohya LoCon", "LoRA-FA"):
            args += "".join(f" {key}={data[key]}" for key in _KOHYA_VARS if data.get(key))
        elif lora_type == "Kohya DyLoRA":
            args += "".join(f" {key}={data[key]}" for key in dict.fromkeys(_DYLORA_VARS) if data.get(key))
        else:
            args += _native_loha_lokr_args(data, lora_type == "Kohya LoKr")
    else:  # Flux1, Anima, Lumina, ...: not an SDXL UNet network
        module = f"(LoRA type {lora_type})"
    args += "".join(f" {key}={data[key]}" for key in _LORAPLUS if data.get(key))
    return module, args


def _flags(data: Mapping[str, Any]) -> tuple[bool, bool]:
    """resolve_network_train_flags: (network_train_unet_only, network_train_text_encoder_only)."""
    te, unet = _number(data.get("text_encoder_lr")), _number(data.get("unet_lr"))
    return te == 0 and unet != 0, te != 0 and unet == 0


def _split(value: Any) -> Optional[list[str]]:
    return str(value).replace('"', "").split() if value not in (None, "") else None


def gui_values(data: Mapping[str, Any]) -> dict[str, Any]:
    """The sd-scripts values of the TOML ``train_model`` writes for an SDXL LoRA (the keys ``check`` reads)."""
    module, args = gui_network_module(data)
    unet_only, te_only = _flags(data)
    te_lr = _number(data.get("text_encoder_lr"))
    sdxl = bool(data.get("sdxl"))
    attention = data.get("xformers")
    seed = data.get("seed")
    values = {
        "pretrained_model_name_or_path": data.get("pretrained_model_name_or_path"),
        "train_data_dir": data.get("train_data_dir"), "reg_data_dir": data.get("reg_data_dir"),
        "dataset_config": data.get("dataset_config"), "output_dir": data.get("output_dir"),
        "output_name": data.get("output_name"), "logging_dir": data.get("logging_dir"),
        "resolution": data.get("max_resolution"), "caption_extension": data.get("caption_extension"),
        "learning_rate": _number(data.get("learning_rate")),
        "unet_lr": _number(data.get("unet_lr")) or None,
        "text_encoder_lr": [te_lr, te_lr] if te_lr > 0 else None,
        "network_module": module, "network_args": args.replace('"', "").split(),
        "network_dim": data.get("network_dim"), "network_alpha": data.get("network_alpha"),
        "network_dropout": data.get("network_dropout"), "network_weights": data.get("network_weights"),
        "dim_from_weights": data.get("dim_from_weights"),
        "network_train_unet_only": unet_only, "network_train_text_encoder_only": te_only,
        "optimizer_type": data.get("optimizer"), "optimizer_args": _split(data.get("optimizer_args")),
        "lr_scheduler": data.get("lr_scheduler"), "lr_scheduler_args": _split(data.get("lr_scheduler_args")),
        "max_train_steps": int(_number(data.get("max_train_steps"))) or None,
        "max_train_epochs": int(_number(data.get("max_train_epochs"))) or None,
        "train_batch_size": data.get("train_batch_size"),
        "mixed_precision": data.get("mixed_precision"), "save_precision": data.get("save_precision"),
        "save_model_as": data.get("save_model_as"),
        "cache_latents": data.get("cache_latents"), "cache_latents_to_disk": data.get("cache_latents_to_disk"),
        "cache_text_encoder_outputs": True if sdxl and data.get("sdxl_cache_text_encoder_outputs") else None,
        "no_half_vae": True if sdxl and data.get("sdxl_no_half_vae") else None,
        "gradient_checkpointing": data.get("gradient_checkpointing"), "fp8_base": data.get("fp8_base"),
        "full_bf16": data.get("full_bf16"), "full_fp16": data.get("full_fp16"),
        "shuffle_caption": data.get("shuffle_caption"), "enable_bucket": data.get("enable_bucket"),
        "bucket_no_upscale": data.get("bucket_no_upscale"), "vae": data.get("vae"),
        "sdpa": True if attention == "sdpa" else None, "xformers": True if attention == "xformers" else None,
        "seed": int(_number(seed)) or None,
    }
    # train_model drops "", False and None (and so 0 and 0.0, which equal False), then sorts
    return dict(sorted((k, v) for k, v in values.items() if v not in ["", False, None]))


def gui_preset(*, model: str, dataset_config: str, out_dir: str, name: str, preset_arg: str, rank: int, steps: int,
               learning_rate: float, optimizer: str, optimizer_args: Sequence[str], lr_scheduler: str,
               resolution: int, precision: str, lowvram: bool) -> dict[str, Any]:
    """A LoRA-tab preset (``presets/lora/user_presets/NAME.json``) for the recipe's run: the keys and
    value types the GUI's loader reads (tests/data/kohya_gui_fields.json holds them)."""
    return {
        "LoRA_type": "Standard",
        "sdxl": True,
        "pretrained_model_name_or_path": model,
        "dataset_config": dataset_config,
        "train_data_dir": "",
        "output_dir": out_dir,
        "output_name": name,
        "save_model_as": "safetensors",
        "network_dim": rank,
        "network_alpha": rank,
        "learning_rate": learning_rate,
        "unet_lr": learning_rate,
        "text_encoder_lr": 0.0,
        "optimizer": optimizer,
        "optimizer_args": " ".join(optimizer_args),
        "lr_scheduler": lr_scheduler,
        "lr_warmup": 0,
        "lr_warmup_steps": 0,
        "max_train_steps": steps,
        "max_train_epochs": 0,
        "epoch": 1,
        "train_batch_size": 1,
        "max_resolution": f"{resolution},{resolution}",
        "mixed_precision": precision,
        "save_precision": precision,
        "gradient_checkpointing": True,
        "cache_latents": True,
        "bucket_no_upscale": False,  # the GUI's default is on; the recipe lets sd-scripts upscale small images
        "sdxl_cache_text_encoder_outputs": lowvram,
        "fp8_base": lowvram,
        "xformers": "sdpa" if lowvram else "none",
        "additional_parameters": f"{MODULE_WORD} --network_args preset={preset_arg}",
    }


# -- check ------------------------------------------------------------------------------------------

def _word_findings(words: list[str], typed: str) -> list[tuple[str, str, str]]:
    out = []
    if '"' in typed:
        out.append(("warning", "additional_parameters", "holds '\"': the GUI removes every '\"' and splits on spaces, so "
                                                        "a quoted value with a space becomes two words; use paths "
                                                        "without spaces"))
    in_network_args = False
    for word in words:
        if word.startswith("--"):
            in_network_args = word == "--network_args"
        elif in_network_args and "=" not in word:
            out.append(("warning", "additional_parameters", f"{word}: a network arg without '=' (sd-scripts stops); if "
                                                            "it is the rest of a value with a space, the GUI split it "
                                                            "there: use a path without spaces"))
        if not word.startswith("'"):
            continue
        raw = word[1:-1]
        kind = ("Windows backslashes" if "\\" in raw else "brackets" if re.search(r"[\[\](){}]", raw)
                else "characters outside [A-Za-z0-9_@%+=:,./-]")
        if raw.startswith("-"):
            out.append(("error", "additional_parameters", f"{raw}: has {kind}, so the GUI passes it as {word} (quotes "
                                                          "included) and sd-scripts stops on an unrecognized argument; "
                                                          "remove them"))
        elif "\\" in raw and "=" in raw:
            out.append(("warning", "additional_parameters", f"{raw}: has {kind}, so it reaches sd-scripts as {word}; "
                                                            "blora_network reads it as typed, other modules do not: "
                                                            "prefer forward slashes (C:/presets/my.toml)"))
        else:
            out.append(("warning", "additional_parameters", f"{raw}: has {kind}, so it reaches sd-scripts as {word}, "
                                                            "quotes included; blora_network undoes that for its own "
                                                            "network_args, nothing else does"))
    return out


def _lora_type_finding(lora_type: str) -> tuple[str, str, str]:
    if lora_type in _LYCORIS or lora_type == "LoCon":
        return ("warning", "LoRA_type", f"{lora_type!r}: the GUI sends its 'LyCORIS Preset' as preset=, so that field "
                                        "must be the path of a B-LoRA preset file (LyCORIS's own presets are refused); "
                                        "or set LoRA type to Standard")
    if lora_type in _NATIVE_MODULES:
        return ("warning", "LoRA_type", f"{lora_type!r}: blora_network trains LyCORIS LoRA whatever this type says (for "
                                        "LoHa or LoKr add algo=loha or algo=lokr after --network_args); set LoRA type "
                                        "to Standard")
    return ("error", "LoRA_type", f"{lora_type!r}: not an SDXL UNet LoRA type (the GUI runs another model's script); "
                                  "set LoRA type to Standard and tick SDXL")


def _gui_findings(data: Mapping[str, Any], words: list[str], gui_args: list[str], module: Any) -> list[tuple[str, str, str]]:
    out = []
    lora_type = data.get("LoRA_type", "Standard")
    if lora_type != "Standard":
        out.append(_lora_type_finding(str(lora_type)))
    if data.get("sdxl") is False:
        out.append(("error", "sdxl", "off: the GUI runs train_network.py (SD1/SD2), not sdxl_train_network.py; "
                                     "tick the SDXL checkbox"))
    if _number(data.get("text_encoder_lr")) != 0:
        out.append(("warning", "text_encoder_lr", f"{data.get('text_encoder_lr')}: the GUI sets network_train_unet_only "
                                                  "only when the Text Encoder learning rate is 0; set it to 0"))
    if module != "blora_network":
        out.append(("warning", "additional_parameters", f"no {MODULE_WORD}: the GUI runs {module} (it has no network "
                                                      f"module field); add {MODULE_WORD} --network_args "
                                                      "preset=content_style to Advanced > Additional parameters"))
    out += _word_findings(words, str(data.get("additional_parameters") or ""))
    typed_args = any(w == "--network_args" or w.startswith("--network_args=") for w in words)
    if typed_args and gui_args:
        dropped = ", ".join(f"{a} ({GUI_LABELS.get(a.split('=', 1)[0], 'LoRA type ' + str(lora_type))})" for a in gui_args)
        out.append(("warning", "network_args", f"the typed --network_args replaces the GUI's list, so these are dropped: "
                                               f"{dropped}; retype the ones you want after --network_args"))
    return out


def gui_run(path) -> tuple["TrainingArgs", list[tuple[str, str, str]]]:
    """A saved config or preset as the run it starts: the sd-scripts values (its TOML, with the Additional
    parameters over it, as sd-scripts reads a command line over ``--config_file``) and the GUI's traps as
    ``(severity, key, message)``; :func:`blora_network.sdscripts.check.check_gui_config` checks the rest."""
    from .args import TrainingArgs, parse_command_line

    data = read_gui_config(path)
    values = gui_values(data)
    words = gui_words(data.get("additional_parameters", ""))
    findings: list[tuple[str, str, str]] = []
    try:
        typed = parse_command_line(words).values if words else {}
    except BLoraError as e:
        typed = {}
        findings.append(("error", "additional_parameters", str(e)))
    merged = {**values, **typed}  # sd-scripts: the command line over the --config_file
    findings = _gui_findings(data, words, values.get("network_args", []), merged.get("network_module")) + findings
    run = TrainingArgs(values=merged, source=f"{path} (kohya_ss GUI config + Additional parameters)",
                       from_command_line=False, unknown=[])
    return run, findings
