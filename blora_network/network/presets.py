"""Presets: a built-in name or a LyCORIS-format TOML file, validated into a frozen :class:`Preset`.

The built-ins are the TOML files in ``blora_network/builtin_presets/``, beside this loader and
shipped inside the wheel; they are written from :func:`builtin_preset_text` (one regex per
block, :func:`blora_network.sdxl.blocks.block_pattern`), and a test holds the files to it. A user's
own file uses the same format (LyCORIS's preset keys), plus an optional ``[blora]`` table for
per-block settings (``content_dim``, ``style_lr``, ...) that is stripped before LyCORIS sees it.
Every problem is a :class:`PresetError` that names the file, the key or pattern, and the fix.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import toml

from blora_network.errors import PresetError
from blora_network.sdxl.blocks import (
    ATTENTION_BLOCKS,
    BLOCKS,
    attention_layer_names,
    block_pattern,
    block_pattern_of,
    lookup_block,
    lookup_sdxl_block,
    parse_sdxl_blocks,
)
from blora_network.tomlfile import read_toml

from .options import BLOCK_SETTING_KEYS

__all__ = ["Preset", "DEFAULT_PRESET", "BUILTIN_ROLES", "BLOCK_SETTING_KEYS", "builtin_names", "builtin_preset_text",
           "load_preset", "preset_from_dict", "preset_for_blocks"]

DEFAULT_PRESET = "content_style"
BUILTIN_ROLES: dict[str, tuple[str, ...]] = {
    "content": ("content",),
    "style": ("style",),
    "content_style": ("content", "style"),
    "layout": ("layout",),
    "content_style_layout": ("content", "style", "layout"),
}
"""Each built-in preset and the B-LoRA blocks it trains (attention layers only)."""
_BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_presets"

# LyCORIS's preset keys and the Python types their values must have.
_LYCORIS_KEYS: dict[str, type] = {
    "enable_conv": bool,
    "unet_target_module": list,
    "unet_target_name": list,
    "text_encoder_target_module": list,
    "text_encoder_target_name": list,
    "module_algo_map": dict,
    "name_algo_map": dict,
    "use_fnmatch": bool,
    "exclude_name": list,
}
_BLORA_KEYS: dict[str, type] = {"description": str, **BLOCK_SETTING_KEYS}


@dataclass(frozen=True)
class Preset:
    """What to train: LyCORIS's target lists plus B-LoRA's per-block settings.

    ``roles`` is derived, not declared: the B-LoRA blocks whose attention layers the UNet
    patterns select, so a hand-written regex is described by what it does.
    """

    name: str
    source: str
    """``built-in`` or the path of the TOML file."""
    unet_target_name: tuple[str, ...] = ()
    unet_target_module: tuple[str, ...] = ()
    text_encoder_target_name: tuple[str, ...] = ()
    text_encoder_target_module: tuple[str, ...] = ()
    exclude_name: tuple[str, ...] = ()
    enable_conv: bool = False
    use_fnmatch: bool = False
    module_algo_map: Mapping[str, Any] = field(default_factory=dict)
    name_algo_map: Mapping[str, Any] = field(default_factory=dict)
    block_settings: Mapping[str, Union[int, float]] = field(default_factory=dict)
    """``[blora]`` keys such as ``content_dim = 32`` or ``style_lr = 5e-5``."""
    description: str = ""

    # -- matching, the way LyCORIS matches -------------------------------------------------
    def _match(self, pattern: str, name: str) -> bool:
        if self.use_fnmatch:
            return fnmatch.fnmatch(name, pattern)
        return name == pattern or re.match(pattern, name) is not None

    def _excluded(self, name: str) -> bool:
        return any(self._match(p, name) for p in self.exclude_name)

    def matches_unet_name(self, name: str) -> bool:
        """True when a UNet module path is targeted by name (what ``unet_target_name`` does)."""
        return not self._excluded(name) and any(self._match(p, name) for p in self.unet_target_name)

    def select(self, modules: Iterable[Union[str, tuple[str, str]]]) -> list[str]:
        """The module paths LyCORIS would wrap, from ``named_modules()`` paths.

        Items are paths (taken as Linear layers) or ``(path, class_name)`` pairs, e.g. from
        :func:`blora_network.sdxl.unet.module_names`. Class targets (``unet_target_module``) wrap
        every Linear (and, with ``enable_conv``, Conv) below a module of that class.
        """
        items = [(m, "Linear") if isinstance(m, str) else (m[0], m[1]) for m in modules]
        wrappable = {"Linear"} | ({"Conv2d", "Conv1d", "Conv3d"} if self.enable_conv else set())
        containers = [p for p, cls in items if cls in self.unet_target_module and not self._excluded(p)]
        out = []
        for path, cls in items:
            if cls not in wrappable or self._excluded(path):
                continue
            by_class = any(path.startswith(c + ".") for c in containers)
            if by_class or self.matches_unet_name(path):
                out.append(path)
        return out

    @property
    def roles(self) -> tuple[str, ...]:
        """The B-LoRA blocks (content, style, layout) whose attention layers this preset trains."""
        return _roles_of(self)

    @property
    def blocks(self) -> tuple[str, ...]:
        """The labels (``IN04``, ``content``, ``OUT03``...) of every attention block this preset trains a layer of."""
        return tuple(b.label for b in ATTENTION_BLOCKS
                     if self.select([f"{b.attention}.transformer_blocks.0.{a}.{p}"
                                     for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]))

    @property
    def trains_unet(self) -> bool:
        return bool(self.unet_target_name or self.unet_target_module)

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.text_encoder_target_name or self.text_encoder_target_module)

    def lycoris_dict(self) -> dict[str, Any]:
        """Every LyCORIS preset key, set explicitly (a key left out would keep a stale value)."""
        return {
            "enable_conv": self.enable_conv,
            "unet_target_module": list(self.unet_target_module),
            "unet_target_name": list(self.unet_target_name),
            "text_encoder_target_module": list(self.text_encoder_target_module),
            "text_encoder_target_name": list(self.text_encoder_target_name),
            "module_algo_map": dict(self.module_algo_map),
            "name_algo_map": dict(self.name_algo_map),
            "use_fnmatch": self.use_fnmatch,
            "exclude_name": list(self.exclude_name),
        }


def _roles_of(preset: Preset) -> tuple[str, ...]:
    roles = []
    for block in BLOCKS:
        names = attention_layer_names(block)
        if preset.select(names):
            roles.append(block.role)
    return tuple(roles)


def builtin_names() -> tuple[str, ...]:
    """Names of the built-in presets, e.g. ``("content", "content_style", ...)``."""
    return tuple(sorted(BUILTIN_ROLES))


def builtin_preset_text(name: str) -> str:
    """The TOML text of a built-in preset, as its file in ``builtin_presets/`` holds it."""
    blocks = [lookup_block(r) for r in BUILTIN_ROLES[name]]
    what = ", ".join(f"{b.role} ({b.ldm})" for b in blocks)
    default = "; the default" if name == DEFAULT_PRESET else ""
    patterns = "".join(f"    '{block_pattern(b)}',\n" for b in blocks)
    return (
        f"# B-LoRA preset \"{name}\": {what}{default}\n"
        "# LyCORIS preset format. Each pattern is re.match-ed against sd-scripts' SDXL UNet module\n"
        "# paths; the negative lookahead keeps ff.net and proj_in/proj_out out, so only the\n"
        "# attention projections (attn1/attn2 to_q, to_k, to_v, to_out.0) are trained: 80 per block.\n"
        "enable_conv = false\n"
        "unet_target_module = []\n"
        f"unet_target_name = [\n{patterns}]\n"
        "text_encoder_target_module = []\n"
        "text_encoder_target_name = []\n"
    )


def preset_for_blocks(labels) -> Preset:
    """The preset ``blocks=OUT00,OUT01,OUT03`` stands for: each block's attention layers, with the
    regex the built-ins use (:func:`blora_network.sdxl.blocks.block_pattern_of`), ``ff.net`` and ``proj`` left out."""
    blocks = [lookup_sdxl_block(label) for label in labels]  # a label is a block's name (content, OUT03)
    return Preset(name="blocks=" + ",".join(b.name for b in blocks), source="built-in",
                  unet_target_name=tuple(block_pattern_of(b.attention) for b in blocks))


def _check_type(where: str, key: str, value: Any, want: type) -> Any:
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if want in (int, float) and isinstance(value, bool) or not isinstance(value, want):
        raise PresetError(
            f"{where}: key {key!r} must be {want.__name__}, got {type(value).__name__} {value!r}"
        )
    if want is list and not all(isinstance(v, str) for v in value):
        raise PresetError(f"{where}: key {key!r} must be a list of strings, got {value!r}")
    return value


_ALGO_NUMBERS = ("dim", "alpha", "conv_dim", "conv_alpha", "factor", "block_size", "dropout", "rank_dropout",
                 "module_dropout", "constraint")


def _check_algo_config(where: str, key: str, config: Any) -> None:
    """One ``module_algo_map``/``name_algo_map`` entry: a table whose algo is a string and whose
    numbers are numbers (LyCORIS would otherwise fail deep inside with a KeyError or TypeError)."""
    if not isinstance(config, Mapping):
        raise PresetError(f"{where}: {key} must be a table such as {{ algo = 'lora', dim = 8 }}, got {config!r}")
    if "algo" in config and not isinstance(config["algo"], str):
        raise PresetError(f"{where}: {key}.algo must be a string such as 'lora', got {config['algo']!r}")
    for name in _ALGO_NUMBERS:
        if name not in config:
            continue
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PresetError(f"{where}: {key}.{name} must be a number, got {value!r}")
        if name in ("dim", "conv_dim") and (value < 0 or not float(value).is_integer()):
            raise PresetError(f"{where}: {key}.{name} must be a whole number >= 0 (0: the network's dim), got {value!r}")


def _unknown_key(where: str, key: str, allowed: Iterable[str], table: str = "") -> PresetError:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return PresetError(f"{where}: unknown preset key {table}{key!r}{hint} Known keys: {', '.join(allowed)}")


def preset_from_dict(raw: Mapping[str, Any], *, name: str, source: str) -> Preset:
    """Validate a parsed TOML document (keys, types, regexes) into a :class:`Preset`."""
    if not isinstance(raw, Mapping):
        raise PresetError(f"{source}: a preset is a TOML table of keys, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "blora":
            continue
        if key not in _LYCORIS_KEYS:
            raise _unknown_key(source, key, list(_LYCORIS_KEYS) + ["blora"])
        values[key] = _check_type(source, key, value, _LYCORIS_KEYS[key])
    blora = raw.get("blora", {})
    if not isinstance(blora, Mapping):
        raise PresetError(f"{source}: [blora] must be a table, got {blora!r}")
    settings: dict[str, Union[int, float]] = {}
    description = ""
    for key, value in blora.items():
        if key not in _BLORA_KEYS:
            raise _unknown_key(source, key, _BLORA_KEYS, table="blora.")
        value = _check_type(source, f"blora.{key}", value, _BLORA_KEYS[key])
        if key == "description":
            description = value
        elif value < 0:
            raise PresetError(f"{source}: blora.{key} must not be negative, got {value}")
        else:
            settings[key] = value
    for key in ("module_algo_map", "name_algo_map"):
        for target, config in values.get(key, {}).items():
            _check_algo_config(source, f"{key}.{target!r}", config)
    use_fnmatch = bool(values.get("use_fnmatch", False))
    if not use_fnmatch:
        for key in ("unet_target_name", "text_encoder_target_name", "exclude_name"):
            for pattern in values.get(key, []):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise PresetError(
                        f"{source}: {key} has an invalid regular expression {pattern!r}: {e}. "
                        r"Escape literal dots as \. and check brackets and parentheses"
                    ) from None
    return Preset(
        name=name,
        source=source,
        unet_target_name=tuple(values.get("unet_target_name", ())),
        unet_target_module=tuple(values.get("unet_target_module", ())),
        text_encoder_target_name=tuple(values.get("text_encoder_target_name", ())),
        text_encoder_target_module=tuple(values.get("text_encoder_target_module", ())),
        exclude_name=tuple(values.get("exclude_name", ())),
        enable_conv=bool(values.get("enable_conv", False)),
        use_fnmatch=use_fnmatch,
        module_algo_map=dict(values.get("module_algo_map", {})),
        name_algo_map=dict(values.get("name_algo_map", {})),
        block_settings=settings,
        description=description,
    )


@lru_cache(maxsize=64)
def _load_builtin(name: str) -> Preset:
    path = _BUILTIN_DIR / f"{name}.toml"
    text = path.read_text(encoding="utf-8")
    return preset_from_dict(toml.loads(text), name=name, source="built-in")


def load_preset(name_or_path: Optional[str] = None) -> Preset:
    """A built-in preset by name, ``blocks=OUT00,OUT03`` (:func:`preset_for_blocks`), or a TOML file by
    path; the default is ``content_style``.

    >>> load_preset("style").roles
    ('style',)
    """
    spec = (name_or_path if name_or_path is not None else DEFAULT_PRESET).strip()
    if not spec:
        spec = DEFAULT_PRESET
    if spec in builtin_names():
        return _load_builtin(spec)
    if spec.startswith("blocks="):  # what network_args blocks= trains, for plan and check
        try:
            blocks = parse_sdxl_blocks(spec[len("blocks="):], attention=True, where=f"{spec}: ")
        except ValueError as e:
            raise PresetError(str(e)) from None
        return preset_for_blocks(b.label for b in blocks)
    looks_like_path = spec.endswith(".toml") or "/" in spec or "\\" in spec
    if not looks_like_path:
        close = difflib.get_close_matches(spec, builtin_names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PresetError(
            f"unknown preset {spec!r}.{hint} Built-in presets: {', '.join(builtin_names())}; "
            "or give the path of a TOML preset file"
        )
    path = Path(spec).expanduser()
    raw = read_toml(path, what="preset file", shown=spec, error=PresetError,
                    not_found_hint=f"; use a built-in preset ({', '.join(builtin_names())}) or the path of a TOML file",
                    syntax_hint="fix the file (TOML strings with regexes are easiest in single quotes)")
    return preset_from_dict(raw, name=path.stem, source=str(path))
