"""The ``blora_*`` metadata keys: what a file says about its own B-LoRA blocks.

The network writes them at save time and every tool updates them, so no later tool has to
guess which blocks a file holds or where it came from. Values are strings (safetensors
metadata is ``str -> str``); structured values are JSON.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from .blocks import BLOCKS

__all__ = [
    "KEY_VERSION",
    "KEY_PRESET",
    "KEY_BLOCKS",
    "KEY_DIMS",
    "KEY_ALPHAS",
    "KEY_LRS",
    "KEY_SOURCES",
    "KEY_WEIGHTS",
    "blora_metadata",
    "read_json_key",
]

KEY_VERSION = "blora_version"
KEY_PRESET = "blora_preset"
KEY_BLOCKS = "blora_blocks"        # {"content": "output_blocks.0.1", "style": "output_blocks.1.1"}
KEY_DIMS = "blora_block_dims"      # {"content": 64, "style": 64}
KEY_ALPHAS = "blora_block_alphas"  # {"content": 64.0, "style": 64.0}
KEY_LRS = "blora_block_lrs"        # {"content": 1e-4, ...} when per-block lrs were used
KEY_SOURCES = "blora_sources"      # [{"file": "a.safetensors", "sshs_model_hash": "...", "blocks": [...]}]
KEY_WEIGHTS = "blora_weights"      # {"content": 1.0, "style": 0.8}: weights baked into the file


def blora_metadata(
    roles: list[str],
    *,
    preset: Optional[str] = None,
    dims: Optional[Mapping[str, int]] = None,
    alphas: Optional[Mapping[str, float]] = None,
    lrs: Optional[Mapping[str, float]] = None,
) -> dict[str, str]:
    """The ``blora_*`` keys for a file holding the blocks ``roles``."""
    from . import __version__

    by_role = {b.role: b.ldm for b in BLOCKS}
    meta = {
        KEY_VERSION: __version__,
        KEY_BLOCKS: json.dumps({r: by_role[r] for r in roles if r in by_role}),
    }
    if preset is not None:
        meta[KEY_PRESET] = preset
    if dims:
        meta[KEY_DIMS] = json.dumps(dict(dims))
    if alphas:
        meta[KEY_ALPHAS] = json.dumps({k: float(v) for k, v in alphas.items()})
    if lrs:
        meta[KEY_LRS] = json.dumps({k: float(v) for k, v in lrs.items()})
    return meta


def read_json_key(metadata: Mapping[str, str], key: str, default: Any = None) -> Any:
    """A JSON-valued metadata key, or ``default`` when it is absent or not valid JSON."""
    raw = metadata.get(key)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return default
