"""What a file says about itself: the metadata of training saves and of tool outputs, from plain data.

safetensors metadata is ``str -> str``; structured values are JSON. Two writers compose it,
``BLoRANetwork.save_weights`` and the file tools, and both go through this module so a
training save and, say, ``scale --content 1 --style 1`` of it say the same thing.

The one rule for ``ss_network_dim`` / ``ss_network_alpha`` (:func:`blora_network.files.algos.network_dim_alpha`): the
dim is the largest rank in the file, and the alpha is the largest alpha among the layers of
that rank (alphas are effective alphas: a missing alpha means alpha = rank). A file whose
blocks differ in rank is described by its largest block, as sd-scripts' own loaders expect;
the per-block ranks are in ``blora_block_dims``.

Every file we write stores one alpha for its LoRA layers, the one :func:`network_dim_alpha`
names (:func:`blora_network.files.algos.one_alpha`: a layer trained at another alpha carries the
ratio in its ``lora_up``), so ``ss_network_alpha`` is every LoRA layer's alpha and
``blora_block_alphas`` records the alpha each block's layers store: that same value for every
LoRA block (a LoHa/LoKr block keeps its own). A training save's per-block settings stay in
sd-scripts' ``ss_network_args``; the change each block makes is the trained one.

The ``blora_*`` keys say which B-LoRA blocks a file holds and where it came from, so no later
tool has to guess.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Optional, Sequence

from blora_network.sdxl.blocks import ATTENTION_BLOCKS, LABELS, SDXL_BLOCKS

from .algos import LayerRecord, network_dim_alpha

__all__ = [
    "KEY_VERSION",
    "KEY_PRESET",
    "KEY_BLOCKS",
    "KEY_DIMS",
    "KEY_ALPHAS",
    "KEY_LRS",
    "KEY_SOURCES",
    "KEY_WEIGHTS",
    "KEY_DEMO",
    "HASH_KEYS",
    "STALE_KEYS",
    "blora_metadata",
    "training_metadata",
    "tool_metadata",
    "source_entry",
    "cumulative_weights",
    "tidy_weight",
    "read_json_key",
    "label_order",
    "blocks_of_metadata",
]

KEY_VERSION = "blora_version"
KEY_PRESET = "blora_preset"
KEY_BLOCKS = "blora_blocks"        # {"content": "output_blocks.0.1", "style": "output_blocks.1.1", "OUT03": "output_blocks.3.1"}
KEY_DIMS = "blora_block_dims"      # {"content": 64, "style": 64}
KEY_ALPHAS = "blora_block_alphas"  # {"content": 64.0, "style": 64.0}: the alpha stored (one per file)
KEY_LRS = "blora_block_lrs"        # {"content": 1e-4, ...} when per-block lrs were used
KEY_SOURCES = "blora_sources"      # [{"file": "a.safetensors", "sshs_model_hash": "...", "blocks": [...]}]
KEY_WEIGHTS = "blora_weights"      # {"content": 1.0, "style": 0.8}: weights baked into the file
KEY_DEMO = "blora_demo"            # set by `blora-network demo`: the file is for its tiny UNet, not SDXL

HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
"""The hashes of the tensors sd-scripts stores so UIs need not hash the file; the writer fills them."""
STALE_KEYS = HASH_KEYS + ("modelspec.hash_sha256",)
"""Keys a new file must not inherit from its source: they describe the source's tensors."""


_ATTENTION_OF = {b.label: b.attention for b in ATTENTION_BLOCKS}
_ORDER = {label: i for i, label in enumerate(dict.fromkeys([*LABELS, *(b.name for b in SDXL_BLOCKS)]))}


def label_order(labels: Iterable[str]) -> list[str]:
    """Block labels (``content``, ``OUT03``, ``IN01``...) each once, in :data:`blora_network.sdxl.blocks.LABELS`
    order (B-LoRA's roles first), then the other blocks in model order; unknown ones last."""
    return sorted(dict.fromkeys(labels), key=lambda x: (_ORDER.get(x, len(_ORDER)), x))


def _per_role(records: Sequence[LayerRecord]) -> tuple[list[str], dict[str, int], dict[str, float]]:
    roles = label_order(x.role for x in records if x.role in _ATTENTION_OF)
    dims, alphas = {}, {}
    for role in roles:
        dim, alpha = network_dim_alpha(x for x in records if x.role == role)
        if dim is not None:
            dims[role] = dim
        if alpha is not None:
            alphas[role] = alpha
    return roles, dims, alphas


def blora_metadata(
    roles: Sequence[str],
    *,
    preset: Optional[str] = None,
    dims: Optional[Mapping[str, int]] = None,
    alphas: Optional[Mapping[str, float]] = None,
    lrs: Optional[Mapping[str, float]] = None,
) -> dict[str, str]:
    """The ``blora_*`` keys for a file holding the blocks ``roles``."""
    from blora_network import __version__

    meta = {
        KEY_VERSION: __version__,
        KEY_BLOCKS: json.dumps({r: _ATTENTION_OF[r] for r in roles if r in _ATTENTION_OF}),
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


def _dim_alpha_keys(meta: dict[str, str], records: Sequence[LayerRecord]) -> None:
    dim, alpha = network_dim_alpha(records)
    if dim is not None:
        meta["ss_network_dim"] = str(dim)
        if alpha is not None:
            meta["ss_network_alpha"] = repr(float(alpha))


def training_metadata(given: Optional[Mapping[str, Any]], records: Sequence[LayerRecord], *, preset: str,
                      lrs: Optional[Mapping[str, float]] = None) -> dict[str, str]:
    """A training save's metadata: what sd-scripts handed over, with the effective dim/alpha and blora_* keys.

    sd-scripts passes ``ss_network_alpha`` as the command-line value (1 unless given), not the
    alpha the network really trained with; both keys are rewritten from the layers.
    """
    meta = {str(k): str(v) for k, v in (given or {}).items()}
    meta.setdefault("ss_network_module", "blora_network")
    _dim_alpha_keys(meta, records)
    roles, dims, alphas = _per_role(records)
    meta.update(blora_metadata(roles, preset=preset, dims=dims, alphas=alphas, lrs=lrs or None))
    return meta


def tool_metadata(base: Mapping[str, str], records: Sequence[LayerRecord], sources: list[dict],
                  weights: Mapping[str, float]) -> dict[str, str]:
    """A tool output's metadata: the source's, updated to describe the new file truthfully.

    ``weights`` are the weights baked in relative to training (:func:`cumulative_weights`);
    ``blora_weights`` is left out while they are all 1 and the source had none.
    """
    meta = {k: v for k, v in base.items() if k not in STALE_KEYS}
    _dim_alpha_keys(meta, records)
    for key in (KEY_BLOCKS, KEY_DIMS, KEY_ALPHAS):
        meta.pop(key, None)
    roles, dims, alphas = _per_role(records)
    if roles:
        meta.update(blora_metadata(roles, preset=base.get(KEY_PRESET), dims=dims, alphas=alphas))
    meta[KEY_SOURCES] = json.dumps(sources)
    if weights and (KEY_WEIGHTS in base or any(w != 1.0 for w in weights.values())):
        meta[KEY_WEIGHTS] = json.dumps({r: float(weights[r]) for r in label_order(weights)})
    else:
        meta.pop(KEY_WEIGHTS, None)
    return meta


def source_entry(file_name: str, metadata: Mapping[str, str], roles: Sequence[str],
                 weights: Mapping[str, float]) -> dict:
    """One ``blora_sources`` entry: the file, its hash, the blocks taken and their weights, and its own sources."""
    entry = {
        "file": file_name,
        "sshs_model_hash": metadata.get("sshs_model_hash"),
        "blocks": list(roles),
        "weights": {r: float(weights.get(r, 1.0)) for r in roles},
    }
    earlier = read_json_key(metadata, KEY_SOURCES)
    if earlier:
        entry["sources"] = earlier
    return entry


def cumulative_weights(metadata: Mapping[str, str], applied: Mapping[str, float], roles: Iterable[str]) -> dict[str, float]:
    """Weights baked so far: what the source says it already holds, times what is applied now."""
    before = read_json_key(metadata, KEY_WEIGHTS, {}) or {}
    out = {}
    for role in roles:
        try:
            prior = float(before.get(role, 1.0)) if isinstance(before, dict) else 1.0
        except (TypeError, ValueError):
            prior = 1.0
        out[role] = tidy_weight(prior * float(applied.get(role, 1.0)))
    return out


def tidy_weight(w: float) -> float:
    """A product of typed weights without its binary noise: 0.8 x 0.7 is 0.5599999999999999 in floating
    point; 12 significant digits are far beyond any weight's meaning and give back 0.56, as typed."""
    return float(f"{w:.12g}")


def read_json_key(metadata: Mapping[str, str], key: str, default: Any = None) -> Any:
    """A JSON-valued metadata key, or ``default`` when it is absent or not valid JSON."""
    raw = metadata.get(key)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return default


def blocks_of_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """``blora_blocks`` as written (label -> LDM attention block), or {} when absent or not ours."""
    raw = read_json_key(metadata, KEY_BLOCKS, {})
    if not isinstance(raw, dict):
        return {}
    return {str(k): str(v) for k, v in raw.items() if _ATTENTION_OF.get(str(k)) == v}
