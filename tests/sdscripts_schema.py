"""sd-scripts' config readers, re-derived for tests (no sd-scripts needed), and the real ones when present.

Written for these tests from kohya-ss/sd-scripts main 48d368f; none of its code is used:

- ``train_util.read_config_from_file``: ``toml.load``; a top-level table's keys are lifted to
  the top; the result seeds an argparse Namespace, so each value must already have the type
  argparse would give the option (nothing converts it). :data:`OPTION_KINDS` lists the
  options a B-LoRA config uses, by what their ``add_argument`` says.
- ``config_util.ConfigSanitizer``: a dataset config is ``{general: {...}, datasets: [{...,
  subsets: [{...}]}]}``; each level accepts a fixed set of keys with fixed types, a DreamBooth
  subset requires ``image_dir``; ``resolution`` is an int or two ints.

:func:`real_sd_scripts` imports the real ones from a checkout named by ``BLORA_SD_SCRIPTS``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

import toml

# option -> kind, from the parser: str / int / float / flag (store_true) / list (nargs="*" str)
OPTION_KINDS: dict[str, str] = {
    # train_util.add_sd_models_arguments / add_training_arguments / add_optimizer_arguments / add_dataset_arguments
    "pretrained_model_name_or_path": "str", "output_dir": "str", "output_name": "str", "save_precision": "str",
    "train_batch_size": "int", "max_train_steps": "int", "mixed_precision": "str", "gradient_checkpointing": "flag",
    "full_bf16": "flag", "fp8_base": "flag", "sdpa": "flag", "xformers": "flag", "lowram": "flag",
    "optimizer_type": "str", "optimizer_args": "list", "learning_rate": "float", "lr_scheduler": "str",
    "resolution": "str", "cache_latents": "flag", "cache_latents_to_disk": "flag", "seed": "int",
    "cache_text_encoder_outputs": "flag",
    # train_network.setup_parser
    "network_module": "str", "network_dim": "int", "network_alpha": "float", "network_args": "list",
    "network_train_unet_only": "flag", "save_model_as": "str", "unet_lr": "float",
}
CHOICES = {"mixed_precision": {"no", "fp16", "bf16"}, "save_precision": {None, "float", "fp16", "bf16"},
           "save_model_as": {None, "ckpt", "pt", "safetensors"}}

_SUBSET_ANY_LEVEL = {  # subset keys that may also be given on a dataset or in [general]
    "color_aug": bool, "flip_aug": bool, "num_repeats": int, "random_crop": bool, "shuffle_caption": bool,
    "keep_tokens": int, "keep_tokens_separator": str, "secondary_separator": str, "caption_separator": str,
    "enable_wildcard": bool, "token_warmup_min": int, "token_warmup_step": (int, float), "caption_prefix": str,
    "caption_suffix": str, "custom_attributes": dict, "resize_interpolation": str, "face_crop_aug_range": list,
    "caption_dropout_every_n_epochs": int, "caption_dropout_rate": (int, float), "caption_tag_dropout_rate": (int, float),
    "caption_extension": str, "class_tokens": str, "cache_info": bool,
}
_DATASET_ANY_LEVEL = {
    "batch_size": int, "bucket_no_upscale": bool, "bucket_reso_steps": int, "enable_bucket": bool,
    "max_bucket_reso": int, "min_bucket_reso": int, "validation_seed": int, "validation_split": float,
    "resolution": "resolution", "network_multiplier": float, "resize_interpolation": str,
}
_SUBSET_ONLY = {"image_dir": str, "is_reg": bool, "alpha_mask": bool}


def _type_ok(value: Any, want) -> bool:
    if want == "resolution":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    wants = want if isinstance(want, tuple) else (want,)
    if bool not in wants and isinstance(value, bool):
        return False
    return isinstance(value, wants)


def _check_table(where: str, table: Any, allowed: dict) -> list[str]:
    if not isinstance(table, dict):
        return [f"{where}: must be a table"]
    out = []
    for key, value in table.items():
        if key not in allowed:
            out.append(f"{where}.{key}: not a key sd-scripts accepts here")
        elif not _type_ok(value, allowed[key]):
            out.append(f"{where}.{key} = {value!r}: wrong type")
    return out


def dataset_problems(config: dict) -> list[str]:
    """What sd-scripts' dataset-config validation would reject (DreamBooth datasets)."""
    out = []
    for key in config:
        if key not in ("general", "datasets"):
            out.append(f"{key}: only [general] and [[datasets]] are read")
    out += _check_table("general", config.get("general", {}), {**_DATASET_ANY_LEVEL, **_SUBSET_ANY_LEVEL})
    datasets = config.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        return out + ["datasets: needs at least one [[datasets]] table"]
    for i, ds in enumerate(datasets):
        sub = ds.get("subsets", []) if isinstance(ds, dict) else []
        out += _check_table(f"datasets[{i}]", {k: v for k, v in ds.items() if k != "subsets"},
                            {**_DATASET_ANY_LEVEL, **_SUBSET_ANY_LEVEL})
        if not sub:
            out.append(f"datasets[{i}]: no [[datasets.subsets]]")
        for j, s in enumerate(sub):
            out += _check_table(f"datasets[{i}].subsets[{j}]", s, {**_SUBSET_ANY_LEVEL, **_SUBSET_ONLY})
            if "image_dir" not in s:
                out.append(f"datasets[{i}].subsets[{j}]: image_dir is required")
    return out


def training_args(path: Path) -> dict[str, Any]:
    """The Namespace values read_config_from_file makes of a config (tables lifted one level)."""
    flat: dict[str, Any] = {}
    for key, value in toml.load(str(path)).items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def training_problems(values: dict[str, Any]) -> list[str]:
    """Keys sd-scripts does not know, and values whose type argparse would never produce."""
    kinds = {"str": (str,), "int": (int,), "float": (int, float), "flag": (bool,), "list": (list,)}
    out = []
    for key, value in values.items():
        kind = OPTION_KINDS.get(key)
        if kind is None:
            out.append(f"{key}: not an option of sdxl_train_network.py (as far as this schema knows)")
            continue
        if kind != "flag" and isinstance(value, bool) or not isinstance(value, kinds[kind]):
            out.append(f"{key} = {value!r}: argparse would give a {kind}")
        elif kind == "list" and not all(isinstance(v, str) for v in value):
            out.append(f"{key}: a list of strings")
        if key in CHOICES and value not in CHOICES[key]:
            out.append(f"{key} = {value!r}: not one of its choices")
    return out


def real_sd_scripts() -> tuple[Optional[Any], str]:
    """``(module namespace, "")`` with sd-scripts' sdxl_train_network, train_util and config_util, or
    ``(None, why)``: the checkout named by BLORA_SD_SCRIPTS, importable in this environment."""
    root = os.environ.get("BLORA_SD_SCRIPTS")
    if not root:
        return None, "BLORA_SD_SCRIPTS is not set (point it at a kohya-ss/sd-scripts checkout to test with its own reader)"
    if not (Path(root) / "library" / "config_util.py").is_file():
        return None, f"BLORA_SD_SCRIPTS={root} is not an sd-scripts checkout (no library/config_util.py)"
    sys.path.insert(0, root)
    try:
        import sdxl_train_network  # noqa: F401
        from library import config_util, train_util
    except Exception as e:  # its dependencies (voluptuous, cv2, torchvision...) are a kohya environment's
        return None, f"sd-scripts at {root} cannot be imported here: {type(e).__name__}: {e}"
    return argparse.Namespace(sdxl_train_network=sdxl_train_network, train_util=train_util,
                              config_util=config_util), ""
