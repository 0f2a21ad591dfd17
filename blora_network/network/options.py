"""``--network_args`` parsed strictly into :class:`NetworkOptions`, and translated into LyCORIS's arguments.

sd-scripts hands every value over as a string (``"false"``, ``"64"``) and LyCORIS parses
booleans with ``str(v).lower() != "false"``, so ``"0"`` and ``"no"`` would mean *true* there.
Here a value is parsed by the type of its key, and a value that does not parse is an error
that names the key. Our names for LyCORIS's options (``dora_wd``, ``conv_dim``...) are turned
into its constructor's names (``weight_decompose``, ``conv_lora_dim``...) here too
(:func:`lycoris_kwargs`), so the network never spells them.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from blora_network.errors import NetworkArgsError
from blora_network.sdxl.blocks import BLOCKS, ROLES

__all__ = ["NetworkOptions", "parse_bool", "parse_network_args", "refuse_repeated_keys", "LYCORIS_OPTIONS",
           "LORAPLUS_KEYS", "choose_bypass", "block_algo_map", "lycoris_kwargs", "gui_network_args", "GUI_REFUSED",
           "LYCORIS_PRESETS"]


_TRUE = {"true", "1", "yes", "on", "y", "t"}
_FALSE = {"false", "0", "no", "off", "n", "f", "", "none"}

# LyCORIS options we pass through, with the type each must parse as.
LYCORIS_OPTIONS: dict[str, type] = {
    "algo": str,
    "conv_dim": int,
    "conv_alpha": float,
    "dropout": float,
    "rank_dropout": float,
    "module_dropout": float,
    "use_tucker": bool,
    "use_cp": bool,
    "use_conv_cp": bool,
    "use_scalar": bool,
    "train_norm": bool,
    "constraint": float,
    "rescaled": bool,
    "dora_wd": bool,
    "wd_on_output": bool,
    "full_matrix": bool,
    "rs_lora": bool,
    "unbalanced_factorization": bool,
    "decompose_both": bool,
    "factor": int,
    "block_size": int,
    "rank_dropout_scale": bool,
    "loraplus_lr_ratio": float,
    "loraplus_unet_lr_ratio": float,
    "loraplus_text_encoder_lr_ratio": float,
    "train_on_input": bool,  # iA3: scale the layer's input instead of its output (the GUI's "iA3 train on input")
}
# Our own keys.
_OWN_KEYS: dict[str, type] = {
    "preset": str,
    "alpha": float,
    "train_text_encoder": bool,
    "bypass_mode": str,  # "auto", or a boolean
    **{f"{r}_dim": int for r in ROLES},
    **{f"{r}_alpha": float for r in ROLES},
    **{f"{r}_lr": float for r in ROLES},
}
# Keys sd-scripts or older recipes add that mean nothing for B-LoRA; accepted and ignored.
_IGNORED_KEYS = {"neuron_dropout", "network_dropout", "verbose"}


def parse_bool(key: str, value: Any) -> bool:
    """``"false"``, ``"0"``, ``"no"``, ``"off"`` are false; ``"true"``, ``"1"``, ``"yes"``, ``"on"`` true."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise NetworkArgsError(f"network_args {key}={value!r}: not a boolean; use true or false")


def _parse_number(key: str, value: Any, kind: type) -> Union[int, float]:
    if isinstance(value, bool):
        raise NetworkArgsError(f"network_args {key}={value!r}: expected a number")
    try:
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        number = float(value)
    except (TypeError, ValueError):
        raise NetworkArgsError(
            f"network_args {key}={value!r}: not {'an integer' if kind is int else 'a number'}"
        ) from None
    if not math.isfinite(number):
        raise NetworkArgsError(f"network_args {key}={value!r}: must be a finite number")
    return number


def _parse_value(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        return parse_bool(key, value)
    if kind in (int, float):
        return _parse_number(key, value, kind)
    return str(value).strip()


@dataclass
class NetworkOptions:
    """Everything ``create_network`` decided, typed; recorded in the saved file's metadata."""

    dim: int
    alpha: float
    alpha_given: bool = False
    """True when the user set ``alpha=`` in network_args (otherwise alpha = dim, block by block)."""
    preset: Optional[str] = None
    train_text_encoder: bool = False
    bypass_mode: Optional[bool] = None
    """None means auto: bypass, except for DoRA (see :func:`choose_bypass`)."""
    block_dims: dict[str, int] = field(default_factory=dict)
    block_alphas: dict[str, float] = field(default_factory=dict)
    block_lrs: dict[str, float] = field(default_factory=dict)
    lycoris: dict[str, Any] = field(default_factory=dict)
    """Typed LyCORIS options (algo, dropout, dora_wd, ...)."""

    @property
    def algo(self) -> str:
        return str(self.lycoris.get("algo", "lora")).lower()

    @property
    def dora(self) -> bool:
        return bool(self.lycoris.get("dora_wd", False))

    def dim_for(self, role: str) -> int:
        return self.block_dims.get(role, self.dim)

    def alpha_for(self, role: str) -> float:
        if role in self.block_alphas:
            return self.block_alphas[role]
        if role in self.block_dims and not self.alpha_given:
            return float(self.block_dims[role])
        return self.alpha


def _check_dim(key: str, value: Any, *, allow_zero: bool) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise NetworkArgsError(
            f"{key} is missing: pass --network_dim (the LoRA rank; B-LoRA commonly uses 64)"
        )
    dim = _parse_number(key, value, int)
    if dim < 0 or (dim == 0 and not allow_zero):
        raise NetworkArgsError(f"{key}={value!r}: the rank must be a positive integer (e.g. 64)")
    return int(dim)


def parse_network_args(
    network_dim: Any,
    network_alpha: Any,
    kwargs: Mapping[str, Any],
    preset_settings: Optional[Mapping[str, Union[int, float]]] = None,
) -> NetworkOptions:
    """Turn sd-scripts' arguments into :class:`NetworkOptions`, or raise a NetworkArgsError.

    ``preset_settings`` are the ``[blora]`` per-block keys of the preset file; network_args
    override them.
    """
    dim = _check_dim("network_dim", network_dim, allow_zero=False)
    parsed: dict[str, Any] = {}
    for key, value in (preset_settings or {}).items():
        parsed[key] = value
    for key, value in kwargs.items():
        key = str(key).strip()
        if key in _IGNORED_KEYS:
            continue
        if key == "dropout" and value is None:  # sd-scripts adds dropout=None
            continue
        kind = _OWN_KEYS.get(key) or LYCORIS_OPTIONS.get(key)
        if kind is None:
            known = sorted(set(_OWN_KEYS) | set(LYCORIS_OPTIONS))
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise NetworkArgsError(f"unknown network_args key {key!r}.{hint} Known keys: {', '.join(known)}")
        if key.endswith("_dim") and key[: -len("_dim")] in ROLES:
            parsed[key] = _check_dim(key, value, allow_zero=True)
        else:
            parsed[key] = _parse_value(key, value, kind)

    options = NetworkOptions(dim=dim, alpha=float(dim), preset=parsed.pop("preset", None) or None)
    if "alpha" in parsed:
        options.alpha = float(parsed.pop("alpha"))
        options.alpha_given = True
        if options.alpha <= 0:
            raise NetworkArgsError(f"network_args alpha={options.alpha:g}: must be positive")
    options.train_text_encoder = bool(parsed.pop("train_text_encoder", False))
    bypass = parsed.pop("bypass_mode", "auto")
    options.bypass_mode = None if str(bypass).lower() == "auto" else parse_bool("bypass_mode", bypass)
    for role in ROLES:
        if f"{role}_dim" in parsed:
            options.block_dims[role] = int(parsed.pop(f"{role}_dim"))
        if f"{role}_alpha" in parsed:
            options.block_alphas[role] = float(parsed.pop(f"{role}_alpha"))
        if f"{role}_lr" in parsed:
            lr = float(parsed.pop(f"{role}_lr"))
            if lr < 0:
                raise NetworkArgsError(f"network_args {role}_lr={lr:g}: a learning rate cannot be negative")
            options.block_lrs[role] = lr
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if key in parsed and not 0.0 <= parsed[key] < 1.0:
            raise NetworkArgsError(f"network_args {key}={parsed[key]:g}: must be in [0, 1)")
    options.lycoris = parsed
    return options


def refuse_repeated_keys(items) -> None:
    """A key given twice in ``--network_args`` (``preset=content_style preset=style``) is an error.

    sd-scripts builds ``create_network``'s keyword arguments with a dict, so the last one wins and
    the network never sees the first: the raw list (``prepare_network``'s ``args.network_args``,
    or what ``check`` reads) is the only place the repeat shows. The same item twice loses nothing and
    passes: the kohya_ss GUI writes ``use_tucker=...`` twice for its LoCon and LoHa types.
    """
    seen: dict[str, str] = {}
    for item in items or ():
        if not isinstance(item, str) or "=" not in item:
            continue
        key = item.split("=", 1)[0]
        if key in seen and seen[key] != item:
            raise NetworkArgsError(f"network_args gives {key} twice ({seen[key]!r} and {item!r}): sd-scripts keeps "
                                   "only the last one and drops the other silently; give each key once")
        seen[key] = item


LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
"""Ours, kept on the network for its optimizer groups; never LyCORIS constructor arguments."""


_NO_BYPASS = {
    "full": "LyCORIS's full fine-tuning has no bypass mode (LyCORIS stops: bypass mode is not supported)",
    "dylora": "LyCORIS's DyLoRA fails in bypass mode at the first training step (a matmul shape error; "
              "lycoris-lora 4.1.3, probed)",
}
"""Algorithms that only run in rebuild mode."""


def choose_bypass(options: NetworkOptions) -> bool:
    """Bypass (``base(x) + up(down(x)) * scale``) unless DoRA needs the rebuilt weight.

    Bypass costs one base matmul plus N*r*(in+out); rebuild forms dW = up @ down every call
    and runs a second full-size matmul, so bypass is cheaper for every rank below ~640 on
    SDXL's 1280-wide layers. Bypass is also the only mode where ``dropout`` acts and where
    fp8 base weights (``--fp8_base``) work. DoRA is dropped silently in bypass mode, so DoRA
    gets rebuild mode, and so do the algorithms in :data:`_NO_BYPASS` (the kohya_ss GUI's
    "LyCORIS/Native Fine-Tuning" and "LyCORIS/DyLoRA" types send them without a bypass_mode).
    """
    if options.bypass_mode is None:
        return not options.dora and options.algo not in _NO_BYPASS
    if options.bypass_mode and options.algo in _NO_BYPASS:
        raise NetworkArgsError(f"network_args bypass_mode=true with algo={options.algo}: {_NO_BYPASS[options.algo]}; "
                               "remove bypass_mode (auto picks rebuild mode for it)")
    if options.bypass_mode and options.dora:
        raise NetworkArgsError(
            "network_args bypass_mode=true with dora_wd=true: LyCORIS drops DoRA in bypass mode; "
            "remove bypass_mode (auto picks rebuild mode for DoRA)"
        )
    return options.bypass_mode


def block_algo_map(options: NetworkOptions) -> dict[str, dict]:
    """LyCORIS ``name_algo_map`` entries for the blocks with their own dim or alpha (``content_dim=32``...)."""
    out = {}
    for block in BLOCKS:
        if block.role in options.block_dims or block.role in options.block_alphas:
            dim = options.dim_for(block.role)
            if dim > 0:
                out["^" + re.escape(block.ldm) + r"\."] = {"algo": options.algo, "dim": dim,
                                                          "alpha": options.alpha_for(block.role)}
    return out


def lycoris_kwargs(options: NetworkOptions, *, multiplier: float, bypass: bool) -> dict[str, Any]:
    """``LycorisNetworkKohya.__init__`` keyword arguments for these options."""
    lyco = dict(options.lycoris)
    kwargs: dict[str, Any] = dict(
        multiplier=multiplier,
        lora_dim=options.dim,
        conv_lora_dim=int(lyco.pop("conv_dim", options.dim)),
        alpha=options.alpha,
        conv_alpha=float(lyco.pop("conv_alpha", options.alpha)),
        dropout=float(lyco.pop("dropout", 0.0)),
        rank_dropout=float(lyco.pop("rank_dropout", 0.0)),
        module_dropout=float(lyco.pop("module_dropout", 0.0)),
        use_tucker=bool(lyco.pop("use_tucker", False) or lyco.pop("use_cp", False) or lyco.pop("use_conv_cp", False)),
        network_module=options.algo,
        weight_decompose=bool(lyco.pop("dora_wd", False)),
        wd_on_out=bool(lyco.pop("wd_on_output", True)),
        bypass_mode=bypass,
    )
    lyco.pop("algo", None)
    for key in LORAPLUS_KEYS:
        lyco.pop(key, None)
    kwargs.update(lyco)
    return kwargs


# -- what the kohya_ss GUI hands over (bmaltais/kohya_ss 45088f04, v26: sd-scripts v0.11.1) ----------

GUI_QUOTE = "'"
"""The GUI passes each Additional-parameters word through ``shlex.quote`` to a process started without
a shell, so a word with a character outside ``[A-Za-z0-9_@%+=:,./-]`` arrives wrapped in ``'``."""

LYCORIS_PRESETS = ("attn-mlp", "attn-only", "full", "full-lin", "unet-transformer-only", "unet-convblock-only")
"""The GUI's "LyCORIS Preset" choices (lora_gui.py LYCORIS_PRESETS_CHOICES): LyCORIS's names, not ours."""

_BLOCKS_INSTEAD = ("B-LoRA trains only its preset's blocks: clear the field and set content_dim=, style_dim=, "
                   "content_lr=, style_lr= (0 turns a block off) after --network_args in Additional parameters")
_BLOCK_LR = ("per-block learning-rate weights over sd-scripts' 23 SDXL blocks", _BLOCKS_INSTEAD)
_BLOCK_DIM = ("per-block ranks over sd-scripts' 23 SDXL blocks", _BLOCKS_INSTEAD)
GUI_REFUSED: dict[str, tuple[str, str, str]] = {
    "down_lr_weight": ("Down LR weights", *_BLOCK_LR),
    "mid_lr_weight": ("Mid LR weights", *_BLOCK_LR),
    "up_lr_weight": ("Up LR weights", *_BLOCK_LR),
    "block_lr_zero_threshold": ("Blocks LR zero threshold", *_BLOCK_LR),
    "block_dims": ("Block dims", *_BLOCK_DIM),
    "block_alphas": ("Block alphas", *_BLOCK_DIM),
    "conv_block_dims": ("Conv dims", *_BLOCK_DIM),
    "conv_block_alphas": ("Conv alphas", *_BLOCK_DIM),
    "unit": ("DyLoRA Unit / Block size", "networks.dylora's rank unit (LoRA type Kohya DyLoRA)",
             "for DyLoRA on B-LoRA's blocks choose LoRA type LyCORIS/DyLoRA with a B-LoRA preset file as its LyCORIS "
             "Preset, or set LoRA type Standard"),
}
"""Network args the GUI writes (lora_gui.py train_model: types Standard, Kohya LoCon, LoRA-FA, Kohya
DyLoRA) whose meaning in sd-scripts' ``networks.lora``/``networks.dylora`` a B-LoRA network cannot
have: (field label, what it means there, what to do instead)."""


def _unquoted(key: str, value: Any) -> tuple[str, Any, bool]:
    if key.startswith(GUI_QUOTE) and isinstance(value, str) and value.endswith(GUI_QUOTE) and len(key) > 1:
        return key[1:], value[:-1], True
    return key, value, False


def _windows_path(value: str) -> str:
    """A preset path typed with backslashes, read with either slash: as typed if it exists (Windows),
    else with ``/`` when that exists; as typed otherwise, so an error names what the user wrote."""
    from pathlib import Path

    if "\\" not in value or Path(value).expanduser().exists():
        return value
    forward = value.replace("\\", "/")
    return forward if Path(forward).expanduser().exists() else value


def gui_network_args(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``--network_args`` as the user meant them when they came through the kohya_ss GUI, or an error.

    - ``'preset=C:\\p\\my.toml'`` (the GUI's quotes; sd-scripts splits it into the key ``'preset`` and a
      value ending in ``'``, on the first ``=`` in main and on every ``=`` in v0.9) is read as typed.
    - The GUI's own fields are honoured with ``networks.lora``'s meaning where the network has it:
      ``rank_dropout`` rescales the kept ranks by 1/(1-p) there, so ``rank_dropout_scale`` defaults to
      true here; LoRA+ ratios, ``module_dropout`` and ``network_dropout`` pass through as they are.
    - Block-list fields and LyCORIS preset names are refused, naming the GUI field and what to set.
    """
    import logging

    log = logging.getLogger("blora_network")
    out: dict[str, Any] = {}
    for raw_key, raw_value in kwargs.items():
        key, value, quoted = _unquoted(str(raw_key), raw_value)
        if quoted:
            log.info("blora_network: network_args %s=%s arrived as %s=%s: the kohya_ss GUI quotes words with "
                     "characters outside [A-Za-z0-9_@%%+=:,./-]; read as typed", key, value, raw_key, raw_value)
        if key in GUI_REFUSED:
            label, meaning, instead = GUI_REFUSED[key]
            raise NetworkArgsError(f"network_args {key}={value}: kohya_ss's '{label}' field ({meaning}); {instead}")
        out[key] = value
    preset = out.get("preset")
    if isinstance(preset, str) and preset.strip() in LYCORIS_PRESETS:
        raise NetworkArgsError(
            f"network_args preset={preset}: a LyCORIS preset from kohya_ss's 'LyCORIS Preset' field (a LyCORIS LoRA "
            "type); give the path of a B-LoRA preset file there, or set LoRA type to Standard and add --network_args "
            "preset=content_style (or another B-LoRA preset) to Additional parameters")
    if isinstance(preset, str):
        out["preset"] = _windows_path(preset.strip())
    if out.get("rank_dropout") not in (None, "") and "rank_dropout_scale" not in out:
        out["rank_dropout_scale"] = "true"
    return out
