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

:data:`SD_ARGS` is the whole argument parser of ``sdxl_train_network.py`` (``train_util.add_*_arguments``,
``train_network.setup_parser``, ``sdxl_train_util.add_sdxl_training_arguments``,
``config_util.add_config_arguments``...); :func:`sd_parser` reads a command line as it does
(``parse_args``: abbreviations allowed, any word no option takes is "unrecognized arguments").
"""

from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from blora_network import tomlfile
from blora_network.errors import BLoraError

__all__ = ["SdArg", "SD_ARGS", "NEWER_THAN", "IMAGE_EXTENSIONS", "SDXL_SCRIPT", "TrainingArgs", "read_toml",
           "read_training_config", "is_dataset_config", "sd_parser", "parse_command_line", "config_args",
           "check_words", "split_network_arg", "type_problem", "close_option", "unknown_keys", "unrecognized_message"]

SDXL_SCRIPT = "sdxl_train_network.py"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP")
"""``library/train_util.py`` IMAGE_EXTENSIONS without the optional plugins (.avif, .jxl)."""


@dataclass(frozen=True)
class SdArg:
    """One sd-scripts option: what argparse makes of it on the command line."""

    name: str
    kind: str
    """``str``, ``int``, ``float``, ``flag`` (store_true), ``list`` (nargs="*" of str),
    ``floats`` (nargs="*" of float), ``number`` (int or float), ``path`` (a file name)."""
    choices: tuple = ()


def _args(kind: str, *names: str, choices: tuple = ()) -> dict[str, SdArg]:
    return {n: SdArg(n, kind, choices) for n in names}


SD_ARGS: dict[str, SdArg] = {
    **_args("str", "console_log_file", "pretrained_model_name_or_path", "tokenizer_cache_dir", "metadata_title",
            "metadata_author", "metadata_description", "metadata_license", "metadata_tags", "metadata_usage_hint",
            "metadata_thumbnail", "metadata_merged_from", "metadata_trigger_phrase", "metadata_preprocessor",
            "metadata_is_negative_embedding", "train_data_dir", "caption_separator", "caption_extension",
            "caption_extention", "keep_tokens_separator", "secondary_separator", "caption_prefix", "caption_suffix",
            "face_crop_aug_range", "resolution", "dataset_class", "reg_data_dir", "in_json", "output_dir",
            "output_name", "huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo",
            "huggingface_token", "huggingface_repo_visibility", "resume", "vae", "logging_dir", "log_prefix",
            "log_tracker_name", "wandb_run_name", "log_tracker_config", "wandb_api_key", "sample_prompts",
            "config_file", "conditioning_data_dir", "offload_optimizer_nvme_path", "offload_param_nvme_path",
            "optimizer_type", "lr_scheduler_type", "lr_scheduler", "network_weights", "network_module",
            "training_comment"),
    **_args("path", "dataset_config"),
    **_args("str", "console_log_level", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    **_args("str", "resize_interpolation", choices=("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")),
    **_args("str", "save_precision", choices=("float", "fp16", "bf16")),
    **_args("str", "dynamo_backend", choices=("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser",
                                              "cudagraphs", "ofi", "fx2trt", "onnxrt", "tensort", "ipex", "tvm")),
    **_args("str", "mixed_precision", choices=("no", "fp16", "bf16")),
    **_args("str", "log_with", choices=("tensorboard", "wandb", "all")),
    **_args("str", "loss_type", choices=("l1", "l2", "huber", "smooth_l1")),
    **_args("str", "huber_schedule", choices=("constant", "exponential", "snr")),
    **_args("str", "sample_sampler", choices=("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a",
                                              "dpmsolver", "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a",
                                              "k_dpm_2", "k_dpm_2_a")),
    **_args("str", "offload_optimizer_device", "offload_param_device", choices=("cpu", "nvme")),
    **_args("str", "save_model_as", choices=("ckpt", "pt", "safetensors")),
    **_args("int", "keep_tokens", "vae_batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
            "token_warmup_min", "caption_dropout_every_n_epochs", "dataset_repeats", "save_every_n_epochs",
            "save_every_n_steps", "save_n_epoch_ratio", "save_last_n_epochs", "save_last_n_epochs_state",
            "save_last_n_steps", "save_last_n_steps_state", "train_batch_size", "max_train_steps",
            "max_train_epochs", "max_data_loader_n_workers", "seed", "gradient_accumulation_steps", "ddp_timeout",
            "clip_skip", "multires_noise_iterations", "min_timestep", "max_timestep", "sample_every_n_steps",
            "sample_every_n_epochs", "lr_scheduler_num_cycles", "lr_scheduler_timescale", "network_dim",
            "initial_epoch", "initial_step", "validation_seed", "validate_every_n_steps", "validate_every_n_epochs",
            "max_validation_steps"),
    **_args("int", "max_token_length", choices=(150, 225)),
    **_args("int", "zero_stage", choices=(0, 1, 2, 3)),
    **_args("float", "token_warmup_step", "caption_dropout_rate", "caption_tag_dropout_rate", "noise_offset",
            "ip_noise_gamma", "multires_noise_discount", "adaptive_noise_scale", "huber_c", "huber_scale",
            "prior_loss_weight", "learning_rate", "max_grad_norm", "lr_scheduler_power", "lr_scheduler_min_lr_ratio",
            "min_snr_gamma", "v_pred_like_loss", "unet_lr", "network_alpha", "network_dropout", "scale_weight_norms",
            "validation_split"),
    **_args("number", "lr_warmup_steps", "lr_decay_steps"),
    **_args("floats", "text_encoder_lr", "base_weights_multiplier"),
    **_args("list", "optimizer_args", "lr_scheduler_args", "network_args", "base_weights"),
    **_args("flag", "console_log_simple", "v2", "v_parameterization", "cache_info", "shuffle_caption",
            "enable_wildcard", "color_aug", "flip_aug", "random_crop", "debug_dataset", "cache_latents",
            "cache_latents_to_disk", "skip_cache_check", "enable_bucket", "bucket_no_upscale", "alpha_mask",
            "save_state_to_huggingface", "resume_from_huggingface", "async_upload", "save_state",
            "save_state_on_train_end", "mem_eff_attn", "torch_compile", "xformers", "sdpa",
            "persistent_data_loader_workers", "gradient_checkpointing", "full_fp16", "full_bf16", "fp8_base",
            "ddp_gradient_as_bucket_view", "ddp_static_graph", "log_config", "noise_offset_random_strength",
            "ip_noise_gamma_random_strength", "zero_terminal_snr", "lowram", "highvram", "sample_at_first",
            "output_config", "masked_loss", "deepspeed", "zero3_init_flag", "zero3_save_16bit_model",
            "fp16_master_weights_and_gradients", "use_8bit_adam", "use_lion_optimizer", "fused_backward_pass",
            "scale_v_pred_loss_like_noise_pred", "debiased_estimation_loss", "weighted_captions",
            "cpu_offload_checkpointing", "no_metadata", "fp8_base_unet", "network_train_unet_only",
            "network_train_text_encoder_only", "dim_from_weights", "no_half_vae", "skip_until_initial_step",
            "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "disable_mmap_load_safetensors"),
}
"""Every option of ``sdxl_train_network.py``'s parser at main 48d368f (196 besides ``-h/--help``), as
``setup_parser`` builds it (read by running its ``add_*_arguments``)."""

NEWER_THAN: dict[str, str] = {
    **{n: "v0.9.1" for n in ("cpu_offload_checkpointing", "fp8_base_unet", "huber_scale", "max_validation_steps",
                             "metadata_is_negative_embedding", "metadata_merged_from", "metadata_preprocessor",
                             "metadata_thumbnail", "metadata_trigger_phrase", "metadata_usage_hint",
                             "resize_interpolation", "skip_cache_check", "validate_every_n_epochs",
                             "validate_every_n_steps", "validation_seed", "validation_split")},
    **{n: "v0.8.7" for n in ("alpha_mask", "disable_mmap_load_safetensors", "fused_backward_pass", "initial_epoch",
                             "initial_step", "log_config", "lr_decay_steps", "lr_scheduler_min_lr_ratio",
                             "lr_scheduler_timescale", "skip_until_initial_step")},
}
"""Options main has and an older release's parser lacks (the newest release without them): there
they are "unrecognized arguments". v0.9.1 and v0.8.7 have no option main lacks."""


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
    if kind in ("str", "path") and not isinstance(value, str):
        example = '"1024,1024" (sd-scripts splits it on ",")' if key == "resolution" else f'"{value}"'
        return f"{key} = {value!r}: must be a string in quotes, e.g. {key} = {example}"
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
    doc = read_toml(p, "training config")
    if is_dataset_config(doc):
        raise BLoraError(f"{p}: this is a dataset config (--dataset_config: [general] / [[datasets]] tables), not a "
                         "training config; give the training config (--config_file), e.g. the NAME.toml recipe wrote "
                         "beside NAME_dataset.toml")
    for key, value in doc.items():
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
    """Command-line words sd-scripts' parser takes for no option: it stops with "unrecognized arguments"."""
    findings: list[tuple[str, str, str]] = field(default_factory=list)
    """``(severity, key, message)`` found while reading (an old release without an option, the script)."""


DATASET_TABLES = ("general", "datasets")
"""The top-level tables of a ``--dataset_config`` file (``config_util.ConfigSanitizer``)."""


def is_dataset_config(doc: Mapping[str, Any]) -> bool:
    """A ``--dataset_config`` document: ``[[datasets]]`` tables, or nothing but ``[general]``/``[[datasets]]``."""
    datasets = doc.get("datasets")
    if isinstance(datasets, list) and datasets and all(isinstance(d, dict) for d in datasets):
        return True
    general = doc.get("general", {})
    return (bool(doc) and set(doc) <= set(DATASET_TABLES) and isinstance(general, dict)
            and not _TRAINING_ONLY & set(general))


_TRAINING_ONLY = {"network_module", "pretrained_model_name_or_path", "output_dir", "network_dim", "learning_rate"}
"""Keys no dataset config has: a ``[general]`` table holding one is a training config's section."""


def _int_or_float(text: str):
    """``train_util.add_optimizer_arguments``' type for ``--lr_warmup_steps`` / ``--lr_decay_steps``."""
    if text.endswith("%"):
        try:
            return float(text[:-1]) / 100.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"Value '{text}' is not a valid percentage") from None
    try:
        return int(text) if float(text) >= 1 else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an int or float") from None


_int_or_float.__name__ = "int_or_float"


class _SdParser(argparse.ArgumentParser):
    def error(self, message):  # what sd-scripts prints before it exits with status 2
        raise BLoraError(f"command line: sd-scripts stops at startup ({SDXL_SCRIPT}: error: {message}); fix the "
                         "option named there")


def sd_parser() -> argparse.ArgumentParser:
    """sd-scripts' parser: every option of :data:`SD_ARGS` with its type, nargs and choices, and
    argparse's abbreviations (``--network_modul`` is ``--network_module``; an ambiguous prefix
    is an error), as ``setup_parser`` makes it. Options not given are left out of the result."""
    p = _SdParser(prog=SDXL_SCRIPT, add_help=False, allow_abbrev=True, argument_default=argparse.SUPPRESS)
    p.add_argument("-h", "--help", action="store_true")
    types = {"int": int, "float": float, "number": _int_or_float, "floats": float}
    for arg in SD_ARGS.values():
        flag = "--" + arg.name
        if arg.kind == "flag":
            p.add_argument(flag, action="store_true")
        elif arg.kind in ("list", "floats"):
            p.add_argument(flag, nargs="*", type=types.get(arg.kind, str))
        else:
            p.add_argument(flag, type=types.get(arg.kind, str), choices=arg.choices or None)
    return p


_LAUNCHERS = ("accelerate", "python", "python3")


def _is_launcher(word: str) -> bool:
    return word in _LAUNCHERS or word.endswith(".py")


def _script_options(words: list[str], findings: list) -> list[str]:
    """The script's options: without ``accelerate launch [its options] script.py`` or ``python script.py``."""
    if not words or not _is_launcher(words[0]):
        return words
    script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    if script is None:
        findings.append(("error", "command line", f"{words[0]} without a training script (.py): give "
                                                  f"accelerate launch {SDXL_SCRIPT} OPTIONS, or just the options"))
        return words[1:]
    name = Path(words[script]).name
    if name != SDXL_SCRIPT:
        findings.append(("warning", "command line", f"{name}: B-LoRA trains SDXL with {SDXL_SCRIPT}; this check "
                                                    f"reads the options as {SDXL_SCRIPT}'s parser does"))
    return words[script + 1:]


def close_option(name: str) -> Optional[str]:
    """The sd-scripts option a misspelt key probably meant (``network_modul`` -> ``network_module``)."""
    close = difflib.get_close_matches(name, list(SD_ARGS), n=1, cutoff=0.8)
    return close[0] if close else None


def unrecognized_message(unknown: Sequence[str]) -> str:
    """sd-scripts' own words for command-line words no option takes, with the options they may mean."""
    hints = []
    for word in unknown:
        if word == "--":
            break  # what follows is no option to argparse
        if word.startswith("--") and len(word) > 2:
            close = close_option(word[2:].split("=", 1)[0])
            if close and f"--{close}" not in hints:
                hints.append(f"--{close}")
    hint = f"; did you mean {' or '.join(hints)}?" if hints else ""
    return (f"unrecognized arguments: {' '.join(unknown)}{hint} (sd-scripts stops at startup on any word its "
            "parser does not take)")


def parse_command_line(argv: Sequence[str], config: Optional[str] = None) -> TrainingArgs:
    """sd-scripts' view of ``accelerate launch sdxl_train_network.py ARGS``: the ``--config_file``
    values first, the command line over them (``read_config_from_file`` parses the command line
    into a Namespace seeded with the file's values). ``config``: a file given before the options
    (``check CONFIG.toml -- ARGS``), read as ``--config_file CONFIG.toml ARGS``."""
    findings: list = []
    words = _script_options(list(argv), findings)
    ns, unknown = sd_parser().parse_known_args(words)
    given = vars(ns)
    if given.pop("help", False):
        findings.append(("error", "--help", "sd-scripts prints its help and exits: nothing is trained"))
    for key in given:
        if key in NEWER_THAN:
            findings.append(("warning", key, f"--{key} is not in sd-scripts {NEWER_THAN[key]} and older (e.g. a "
                                             "kohya_ss GUI install): those stop on it as an unrecognized argument"))
    if config is not None:
        if "config_file" in given:
            raise BLoraError(f"{config} and --config_file {given['config_file']}: two training configs; sd-scripts "
                             "reads one: give it once")
        given = {"config_file": config, **given}
    values: dict[str, Any] = {}
    source = "command line"
    if "config_file" in given:
        values.update(read_training_config(given["config_file"]))
        source = f"{given['config_file']} + command line"
    values.update(given)
    return TrainingArgs(values=values, source=source, from_command_line=True, unknown=unknown, findings=findings)


def config_args(path: str | Path) -> TrainingArgs:
    """A training config file alone, as sd-scripts would read it."""
    return TrainingArgs(values=read_training_config(path), source=str(path), from_command_line=False, unknown=[])


def check_words(words: Sequence[str]) -> TrainingArgs:
    """What ``blora-network check WORDS`` reads: ``CONFIG.toml`` alone; ``CONFIG.toml ARGS...`` as
    ``--config_file CONFIG.toml ARGS...``; or an sd-scripts command line. Two config files are
    refused: sd-scripts reads one, and dropping either would check a run nobody starts."""
    words = list(words)
    if words[:1] == ["--"]:
        words = words[1:]
    configs = []
    for word in words:
        if word.startswith("-") or _is_launcher(word):
            break
        configs.append(word)
    rest = words[len(configs):]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not words:
        raise BLoraError("nothing to check: give CONFIG.toml, or -- followed by the sd-scripts command line")
    if len(configs) > 1:
        raise BLoraError(f"{len(configs)} config files ({', '.join(configs)}): sd-scripts reads one training config "
                         "(--config_file); check each on its own, and give its options after it: check CONFIG.toml -- ARGS")
    if configs and not rest:
        return config_args(configs[0])
    return parse_command_line(rest, config=configs[0] if configs else None)


def unknown_keys(values: Mapping[str, Any]) -> list[tuple[str, Optional[str]]]:
    """Config keys that are no sd-scripts option (it ignores them): (key, the option it may mean)."""
    return [(key, close_option(key)) for key in values if key not in SD_ARGS]
