"""LoRA files as modules, not keys: names, algorithms, rank, alpha and the change dW they make.

A LoRA file is a flat dict of tensors whose names encode the layer, the algorithm and the
factor (``lora_unet_output_blocks_0_1_..._to_q.lora_up.weight``). The tools need to reason
about layers: which B-LoRA block a layer is in, how to scale its change linearly, what its
change is. This module reads only the header to build that view (:class:`LoraFile`), and
reads tensors only when asked, so a tool touches the tensors it keeps and nothing else.

Three spellings are understood and mapped to one canonical name per layer, the kohya name
sd-scripts' SDXL UNet gives it (LDM block names):

* kohya / LyCORIS: ``lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q.lora_up.weight``,
  also with diffusers block names (``lora_unet_up_blocks_0_attentions_0_...``);
* diffusers: ``unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight``;
* PEFT: ``unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight``
  (also with a doubled ``unet.unet.`` prefix or none). These have no alpha: alpha = rank.

The change each algorithm makes, as LyCORIS computes it (``get_diff_weight``), with
``scale = alpha / rank`` (alpha 0 or missing means alpha = rank):

* LoRA: ``scale * up @ down`` (conv: flattened; with ``lora_mid``: the Tucker product);
* LoHa: ``scale * (w1_a @ w1_b) * (w2_a @ w2_b)``;
* LoKr: ``scale * kron(w1, w2)`` where ``w1 = w1_a @ w1_b`` and ``w2 = w2_a @ w2_b`` when
  factorized; rank is the inner size of ``w1_a`` (else of ``w2_a``), and when both ``w1``
  and ``w2`` are full matrices LyCORIS uses scale 1 whatever the stored alpha.

DoRA (a ``dora_scale`` tensor) renormalizes ``W + dW`` per output channel, so its effect is
not linear in dW: it can be moved, not scaled.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import torch

from .blocks import BLOCKS, block_for_role, block_order, is_attention_layer, ldm_name_of_kohya_key, role_of_kohya_key
from .errors import LoraFileError
from .safefile import open_safetensors, read_header_layout

__all__ = [
    "LORA_SUFFIXES",
    "LOHA_SUFFIXES",
    "LOKR_SUFFIXES",
    "LoraModule",
    "LoraFile",
    "ModelGuess",
    "open_lora",
    "module_scale",
    "delta_weight",
    "delta_norm_sq",
    "scale_module_tensors",
    "scaled_factor",
    "kohya_name_of_diffusers_path",
    "diffusers_path_of_kohya_name",
    "ldm_block_of_diffusers_block",
    "diffusers_block_of_ldm_block",
    "guess_model",
]

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_COMMON_SUFFIXES = ("alpha", "dora_scale")
_KNOWN_SUFFIXES = frozenset(LORA_SUFFIXES + LOHA_SUFFIXES + LOKR_SUFFIXES + _COMMON_SUFFIXES)

# The factor a weight multiplies, per algorithm: one factor, so the change scales linearly.
_SCALED_FACTOR = {"lora": "lora_up.weight", "loha": "hada_w1_a"}

# diffusers / PEFT factor spellings -> kohya suffix.
_DIFFUSERS_SUFFIXES = {
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "alpha": "alpha",
}
_DIFFUSERS_SPELLING = {"lora.down.weight": "diffusers", "lora.up.weight": "diffusers",
                       "lora_A.weight": "peft", "lora_B.weight": "peft"}
_KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
_DIFFUSERS_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "conv_out.", "time_embedding.",
                         "add_embedding.", "conv_norm_out.")

# diffusers <-> LDM for the Transformer2DModel blocks (the general rule in sdxl-blocks.md).
_DIFF_ATTN_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)$")
_LDM_ATTN_RE = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1$")


def ldm_block_of_diffusers_block(path: str) -> Optional[str]:
    """``up_blocks.0.attentions.1`` -> ``output_blocks.1.1``; None for non-attention blocks."""
    if path == "mid_block.attentions.0":
        return "middle_block.1"
    m = _DIFF_ATTN_RE.match(path)
    if m is None:
        return None
    level, k = int(m.group(2)), int(m.group(3))
    if m.group(1) == "down_blocks":
        return f"input_blocks.{3 * level + k + 1}.1"
    return f"output_blocks.{3 * level + k}.1"


def diffusers_block_of_ldm_block(path: str) -> Optional[str]:
    """``input_blocks.8.1`` -> ``down_blocks.2.attentions.1``; None for non-attention blocks."""
    if path == "middle_block.1":
        return "mid_block.attentions.0"
    m = _LDM_ATTN_RE.match(path)
    if m is None:
        return None
    n = int(m.group(2))
    if m.group(1) == "input_blocks":
        if n == 0:
            return None
        return f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}"
    return f"up_blocks.{n // 3}.attentions.{n % 3}"


_DIFF_ATTN_KOHYA_RE = re.compile(r"^lora_unet_(down_blocks|up_blocks)_(\d+)_attentions_(\d+)_(.+)$")
_MID_ATTN_KOHYA_RE = re.compile(r"^lora_unet_mid_block_attentions_0_(.+)$")


def _canonical_kohya_name(module: str) -> str:
    """Rename diffusers-named kohya modules inside attention blocks to LDM names (as sd-scripts does)."""
    m = _DIFF_ATTN_KOHYA_RE.match(module)
    if m:
        ldm = ldm_block_of_diffusers_block(f"{m.group(1)}.{m.group(2)}.attentions.{m.group(3)}")
        return f"lora_unet_{ldm.replace('.', '_')}_{m.group(4)}"
    m = _MID_ATTN_KOHYA_RE.match(module)
    if m:
        return f"lora_unet_middle_block_1_{m.group(1)}"
    return module


def _strip_unet_prefix(path: str) -> str:
    """``unet.``, the doubled ``unet.unet.`` of some uploads, PEFT's ``base_model.model.``."""
    while True:
        for prefix in ("unet.", "base_model.model."):
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
        else:
            return path


def kohya_name_of_diffusers_path(path: str) -> str:
    """``unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` -> the kohya module name.

    Layers inside attention blocks get sd-scripts' LDM names; other UNet layers keep their
    diffusers names in kohya spelling (sd-scripts and A1111 rename those on load).
    """
    p = _strip_unet_prefix(path)
    for prefix, kohya in (("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te1_")):
        if p.startswith(prefix):
            return kohya + p[len(prefix):].replace(".", "_")
    parts = p.split(".")
    for n in (4, 3):  # down_blocks.2.attentions.1 / mid_block.attentions.0
        ldm = ldm_block_of_diffusers_block(".".join(parts[:n]))
        if ldm is not None and len(parts) > n:
            return "lora_unet_" + ldm.replace(".", "_") + "_" + "_".join(parts[n:])
    return "lora_unet_" + p.replace(".", "_")


_TE_REST_RULES = (
    (re.compile(r"^text_model_encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj$"), r"text_model.encoder.layers.\1.self_attn.\2_proj"),
    (re.compile(r"^text_model_encoder_layers_(\d+)_mlp_(fc1|fc2)$"), r"text_model.encoder.layers.\1.mlp.\2"),
)


def diffusers_path_of_kohya_name(module: str) -> Optional[str]:
    """The diffusers module path (``unet.up_blocks.0.attentions.0...``) of a kohya module name.

    None when the layer has no unambiguous diffusers name we know (convolutions and other
    layers outside the transformer blocks).
    """
    for prefix, root in (("lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2."), ("lora_te_", "text_encoder.")):
        if module.startswith(prefix):
            rest = module[len(prefix):]
            for rule, repl in _TE_REST_RULES:
                if rule.match(rest):
                    return root + rule.sub(repl, rest)
            return None
    ldm = ldm_name_of_kohya_key(_canonical_kohya_name(module))
    if ldm is None:
        return None
    for n in (3, 2):  # output_blocks.0.1 / middle_block.1
        head = ".".join(ldm.split(".")[:n])
        diff = diffusers_block_of_ldm_block(head)
        if diff is not None:
            return "unet." + diff + ldm[len(head):]
    return None


# -- parsing keys -----------------------------------------------------------------------------

def _parse_key(key: str) -> Optional[tuple[str, str, str, str]]:
    """``key`` -> ``(canonical module, kohya suffix, spelling, module as spelled)``, or None."""
    if key.startswith(_KOHYA_PREFIXES):
        module, _, suffix = key.partition(".")
        canonical = _canonical_kohya_name(module)
        return canonical, suffix, "kohya" if canonical == module else "kohya-diffusers", module
    for spelled, suffix in _DIFFUSERS_SUFFIXES.items():
        if key.endswith("." + spelled):
            path = key[: -len(spelled) - 1]
            bare = _strip_unet_prefix(path)
            if not (path != bare or bare.startswith(("text_encoder.", "text_encoder_2.")) or bare.startswith(_DIFFUSERS_UNET_ROOTS)):
                return None
            return kohya_name_of_diffusers_path(path), suffix, _DIFFUSERS_SPELLING.get(spelled, "diffusers"), path
    return None


# -- the module view --------------------------------------------------------------------------

_BLOCK_RE = re.compile(
    r"^lora_unet_(?:(input_blocks|output_blocks)_(\d+)_(\d+)|(middle_block)_(\d+)"
    r"|(down_blocks|up_blocks)_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)"
    r"|(mid_block)_(attentions|resnets)_(\d+))(?:_|$)"
)


def _block_of(module: str) -> str:
    """The UNet block (LDM path where known) or text encoder a kohya module name lives in."""
    if module.startswith("lora_te1_"):
        return "text_encoder_1"
    if module.startswith("lora_te2_"):
        return "text_encoder_2"
    if module.startswith("lora_te_"):
        return "text_encoder"
    m = _BLOCK_RE.match(module)
    if m is None:
        rest = module[len("lora_unet_"):] if module.startswith("lora_unet_") else module
        return "unet." + "_".join(rest.split("_")[:2])
    g = m.groups()
    if g[0]:
        return f"{g[0]}.{g[1]}.{g[2]}"
    if g[3]:
        return f"{g[3]}.{g[4]}"
    if g[5]:
        return f"{g[5]}.{g[6]}.{g[7]}.{g[8]}"
    return f"{g[9]}.{g[10]}.{g[11]}"


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: its tensors in the file and what the header alone says about it."""

    name: str
    """Canonical kohya module name (LDM block names for layers in attention blocks)."""
    spelled: str
    """The module name as the file spells it."""
    keys: Mapping[str, str]
    """kohya suffix (``lora_up.weight``, ``hada_w1_a``, ``alpha``...) -> tensor name in the file."""
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]
    algo: str
    """``lora``, ``loha``, ``lokr`` or ``other`` (an algorithm these tools do not rewrite)."""
    dora: bool
    rank: Optional[int]
    out_features: Optional[int]
    in_features: Optional[int]
    block: str
    """``output_blocks.0.1``, ``input_blocks.4.1``, ``text_encoder_1``..."""
    role: Optional[str]
    """``content``, ``style``, ``layout`` or None outside the B-LoRA blocks."""
    ldm_path: Optional[str]
    """sd-scripts module path for layers inside a transformer block, else None."""

    @property
    def is_attention(self) -> bool:
        """An attention projection (what the B-LoRA presets train), not ff/proj_in/proj_out."""
        return self.ldm_path is not None and is_attention_layer(self.ldm_path)

    @property
    def kind(self) -> str:
        """``lora``, ``loha``, ``lokr``, with ``+dora`` when weight-decomposed."""
        return self.algo + ("+dora" if self.dora else "")

    @property
    def nbytes(self) -> int:
        """Bytes of this module's tensors in the file."""
        return sum(_DTYPE_BYTES.get(self.dtypes[s], 4) * _numel(self.shapes[s]) for s in self.keys)

    @property
    def params(self) -> int:
        return sum(_numel(self.shapes[s]) for s in self.keys if s != "alpha")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _algo_of(name: str, suffixes: set[str], shapes: Mapping[str, tuple]) -> tuple[str, Optional[int], Optional[int], Optional[int]]:
    """``(algo, rank, out_features, in_features)`` from the tensor names and shapes alone."""
    def need(*req: str) -> None:
        missing = [s for s in req if s not in suffixes]
        if missing:
            raise LoraFileError(f"layer {name} has {', '.join(sorted(suffixes))} but no {', '.join(missing)}")

    unknown = suffixes - _KNOWN_SUFFIXES
    if unknown:
        return "other", None, None, None
    if suffixes & set(LORA_SUFFIXES):
        need("lora_down.weight", "lora_up.weight")
        down, up = shapes["lora_down.weight"], shapes["lora_up.weight"]
        if len(down) < 2 or len(up) < 2 or (up[1] != down[0] and "lora_mid.weight" not in suffixes):
            raise LoraFileError(
                f"layer {name}: lora_up {list(up)} and lora_down {list(down)} do not multiply "
                "(the file is corrupt or not a LoRA)"
            )
        return "lora", _rank_of("lora", shapes), int(up[0]), int(down[1])
    if suffixes & set(LOHA_SUFFIXES):
        need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        w1b = shapes["hada_w1_b"]
        tucker = "hada_t1" in suffixes
        out = shapes["hada_w1_a"][1] if tucker else shapes["hada_w1_a"][0]
        return "loha", _rank_of("loha", shapes), int(out), int(w1b[1])
    if suffixes & set(LOKR_SUFFIXES):
        if not ({"lokr_w1"} <= suffixes or {"lokr_w1_a", "lokr_w1_b"} <= suffixes):
            need("lokr_w1")
        if not ({"lokr_w2"} <= suffixes or {"lokr_w2_a", "lokr_w2_b"} <= suffixes):
            need("lokr_w2")
        w1 = shapes["lokr_w1"] if "lokr_w1" in suffixes else (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        if "lokr_w2" in suffixes:
            w2 = shapes["lokr_w2"][:2]
        elif "lokr_t2" in suffixes:
            w2 = (shapes["lokr_w2_a"][1], shapes["lokr_w2_b"][1])
        else:
            w2 = (shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1])
        return "lokr", _rank_of("lokr", shapes), int(w1[0] * w2[0]), int(w1[1] * w2[1])
    return "other", None, None, None


def _rank_of(algo: str, shapes: Mapping[str, Sequence[int]]) -> Optional[int]:
    """The rank LyCORIS divides alpha by, from the factor shapes (None: a LoKr with no factorized side)."""
    if algo == "lora":
        return int(shapes["lora_down.weight"][0])
    if algo == "loha":
        return int(shapes["hada_w1_b"][0])
    if algo == "lokr":
        if "lokr_w1_a" in shapes:
            return int(shapes["lokr_w1_a"][1])
        if "lokr_w2_a" in shapes:  # w2_a is [out, r], or [r, out] with a Tucker core
            return int(shapes["lokr_w2_a"][0 if "lokr_t2" in shapes else 1])
        return None
    raise LoraFileError(f"no scale rule for algorithm {algo!r}")


@dataclass
class LoraFile:
    """A LoRA file seen as layers, from its header alone. Tensors are read on demand."""

    path: Path
    size: int
    metadata: dict[str, str]
    modules: dict[str, LoraModule]
    """Canonical kohya module name -> module, in file order."""
    spellings: tuple[str, ...]
    """``kohya``, ``kohya-diffusers``, ``diffusers``, ``peft`` (more than one is allowed)."""
    unparsed: tuple[str, ...] = ()
    """Tensor names that are not LoRA layers (e.g. a textual-inversion embedding)."""
    dtypes: dict[str, int] = field(default_factory=dict)
    """dtype -> number of tensors."""
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Tensor name -> ``(start, end)`` byte offsets of its data in the file (for prefetching)."""

    # -- grouping ------------------------------------------------------------------------------
    def roles(self) -> list[str]:
        """The B-LoRA blocks present, in canonical order (content, style, layout)."""
        present = {m.role for m in self.modules.values() if m.role}
        return [b.role for b in BLOCKS if b.role in present]

    def role_modules(self, role: str, *, attention_only: bool = False) -> list[LoraModule]:
        return [m for m in self.modules.values() if m.role == role and (m.is_attention or not attention_only)]

    def other_blocks(self) -> dict[str, int]:
        """Blocks outside the B-LoRA blocks -> module count (``{"input_blocks.4.1": 40}``)."""
        out: dict[str, int] = {}
        for m in self.modules.values():
            if m.role is None:
                out[m.block] = out.get(m.block, 0) + 1
        return out

    def describe_blocks(self) -> str:
        """One line naming every block the file holds, for error messages."""
        parts = [f"{r} ({len(self.role_modules(r))} modules)" for r in self.roles()]
        others = self.other_blocks()
        if others:
            shown = sorted(others.items(), key=lambda kv: block_order(kv[0]))
            text = ", ".join(f"{b} ({n})" for b, n in shown[:8])
            if len(shown) > 8:
                text += f" and {len(shown) - 8} more blocks"
            parts.append(text)
        if self.unparsed:
            parts.append(f"{len(self.unparsed)} tensors that are not LoRA layers")
        return "; ".join(parts) if parts else "no LoRA layers at all"

    def require_roles(self, roles, what: str = "") -> None:
        """Refuse a B-LoRA block the file lacks, naming what it has."""
        for role in roles:
            if not self.role_modules(role):
                block = block_for_role(role)
                raise LoraFileError(
                    f"{self.path}: has no {role} block ({block.ldm}, {block.lbw}){what}; it holds: {self.describe_blocks()}"
                )

    # -- reading -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reader(self) -> Iterator["TensorReader"]:
        """A lazy handle: ``r.tensors(module)`` reads that module's tensors and nothing else."""
        with open_safetensors(self.path, check=not self.spans) as handle:  # open_lora checked it
            reader = TensorReader(self, handle)
            try:
                yield reader
            finally:
                reader.close()


class TensorReader:
    """Reads a module's tensors through an open ``safe_open`` handle."""

    def __init__(self, lora: LoraFile, handle):
        self._lora = lora
        self._handle = handle
        self._plan: Optional[_PrefetchPlan] = None

    def get(self, key: str) -> torch.Tensor:
        if self._plan is not None:
            self._plan.reached(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type for damaged data
            raise LoraFileError(f"{self._lora.path}: cannot read tensor {key!r} ({e})") from None

    def tensors(self, module: LoraModule) -> dict[str, torch.Tensor]:
        """kohya suffix -> tensor for one module (the file's dtype, no copy where possible)."""
        if self._plan is not None:
            self._plan.reached(module.name)
        return {suffix: self.get(key) for suffix, key in module.keys.items()}

    def prefetch(self, modules, keys=()) -> None:
        """Announce that these modules (then ``keys``) will be read, in this order.

        safetensors reads through ``mmap``, and a page fault on an uncached page reads the
        device's whole readahead window around it (8 MiB on some disks), pulling in skipped
        tensors next to kept ones. Instead, each :meth:`tensors` call first asks the kernel
        (``posix_fadvise(WILLNEED)``, in 2 MiB requests, which it never truncates) for
        exactly the planned bytes up to 64 MiB past that module: reads start early and
        touch kept bytes only. Best effort: nothing happens where ``posix_fadvise`` is
        missing or fails, and reading works the same.
        """
        self._plan = _PrefetchPlan.make(self._lora, [(m.name, list(m.keys.values())) for m in modules]
                                        + [(k, [k]) for k in keys])
        if self._plan is not None:
            self._plan.advance(0)

    def close(self) -> None:
        if self._plan is not None:
            self._plan.close()
            self._plan = None


_PREFETCH_CHUNK = 2 << 20  # the kernel caps one WILLNEED request at max(readahead window, io size)
_PREFETCH_AHEAD = 64 << 20


class _PrefetchPlan:
    """The byte ranges a reader will read, in reading order, handed to the kernel a window ahead."""

    def __init__(self, path: Path, chunks: list[tuple[int, int]], ends: dict[str, int]):
        self.chunks, self.ends = chunks, ends
        self.next = 0
        self.issued = 0
        self.fd: Optional[int] = os.open(path, os.O_RDONLY)

    @classmethod
    def make(cls, lora: "LoraFile", items: list[tuple[str, list[str]]]) -> Optional["_PrefetchPlan"]:
        if not hasattr(os, "posix_fadvise") or not lora.spans:
            return None
        chunks: list[list[int]] = []
        ends: dict[str, int] = {}
        total = 0
        for name, keys in items:
            for lo, hi in sorted(lora.spans[k] for k in keys if k in lora.spans):
                total += hi - lo
                while lo < hi:
                    if chunks and chunks[-1][1] == lo and chunks[-1][1] - chunks[-1][0] < _PREFETCH_CHUNK:
                        take = min(hi, chunks[-1][0] + _PREFETCH_CHUNK)
                        chunks[-1][1] = take
                    else:
                        take = min(hi, lo + _PREFETCH_CHUNK)
                        chunks.append([lo, take])
                    lo = take
            ends[name] = total
        try:
            return cls(lora.path, [(a, b) for a, b in chunks], ends)
        except OSError:
            return None

    def advance(self, upto: int) -> None:
        """Issue the planned requests up to ``upto`` bytes of reading plus the look-ahead window."""
        while self.fd is not None and self.next < len(self.chunks) and self.issued < upto + _PREFETCH_AHEAD:
            a, b = self.chunks[self.next]
            try:
                os.posix_fadvise(self.fd, a, b - a, os.POSIX_FADV_WILLNEED)
            except OSError:
                self.close()
                return
            self.issued += b - a
            self.next += 1

    def reached(self, name: str) -> None:
        end = self.ends.get(name)
        if end is not None:
            self.advance(end)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_lora(path) -> LoraFile:
    """Read the header of a LoRA file and group its tensors into layers (no tensor data read).

    Raises :class:`LoraFileError` for a missing, non-safetensors, truncated or corrupt file,
    for two spellings of the same layer, and for a layer missing one of its factors.
    """
    p = Path(path)
    header, data_start, size = read_header_layout(p)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise LoraFileError(f"{p}: corrupt safetensors header (__metadata__ is not a mapping)")
    spans: dict[str, tuple[int, int]] = {}
    grouped: dict[str, dict] = {}
    unparsed: list[str] = []
    spellings: list[str] = []
    dtypes: dict[str, int] = {}
    for key, info in header.items():
        if not isinstance(info, dict) or "shape" not in info or "dtype" not in info:
            raise LoraFileError(f"{p}: corrupt safetensors header (entry {key!r} has no shape/dtype)")
        dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
        offsets = info.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets):
            spans[key] = (data_start + offsets[0], data_start + offsets[1])
        parsed = _parse_key(key)
        if parsed is None:
            unparsed.append(key)
            continue
        name, suffix, spelling, spelled = parsed
        if spelling not in spellings:
            spellings.append(spelling)
        g = grouped.setdefault(name, {"spelled": spelled, "keys": {}, "shapes": {}, "dtypes": {}})
        if suffix in g["keys"]:
            raise LoraFileError(
                f"{p}: layer {name} appears twice ({g['keys'][suffix]!r} and {key!r}); "
                "the file mixes two spellings of the same layer"
            )
        g["keys"][suffix] = key
        g["shapes"][suffix] = tuple(int(d) for d in info["shape"])
        g["dtypes"][suffix] = info["dtype"]
    modules: dict[str, LoraModule] = {}
    for name, g in grouped.items():
        algo, rank, out_f, in_f = _algo_of(name, set(g["keys"]), g["shapes"])
        modules[name] = LoraModule(
            name=name,
            spelled=g["spelled"],
            keys=dict(g["keys"]),
            shapes=dict(g["shapes"]),
            dtypes=dict(g["dtypes"]),
            algo=algo,
            dora="dora_scale" in g["keys"],
            rank=rank,
            out_features=out_f,
            in_features=in_f,
            block=_block_of(name),
            role=role_of_kohya_key(name),
            ldm_path=ldm_name_of_kohya_key(name),
        )
    return LoraFile(
        path=p,
        size=size,
        metadata={str(k): str(v) for k, v in meta.items()},
        modules=modules,
        spellings=tuple(spellings),
        unparsed=tuple(unparsed),
        dtypes=dtypes,
        spans=spans,
    )


# -- the math ---------------------------------------------------------------------------------

def _alpha_value(tensors: Mapping[str, torch.Tensor]) -> Optional[float]:
    a = tensors.get("alpha")
    if a is None:
        return None
    return float(a.detach().float().reshape(-1)[0]) if a.numel() else None


def module_scale(algo: str, tensors: Mapping[str, torch.Tensor]) -> float:
    """LyCORIS's ``scale`` for a module: alpha / rank (alpha missing or 0 means alpha = rank)."""
    alpha = _alpha_value(tensors)
    rank = _rank_of(algo, {k: t.shape for k, t in tensors.items()})
    if rank is None:
        return 1.0  # LoKr with neither side factorized: LyCORIS forces alpha = rank
    if alpha is None or alpha == 0:
        return 1.0
    return alpha / rank


def _lokr_side(tensors, side: str, dtype) -> torch.Tensor:
    full = tensors.get(f"lokr_{side}")
    if full is not None:
        return full.to(dtype)
    a, b = tensors[f"lokr_{side}_a"].to(dtype), tensors[f"lokr_{side}_b"].to(dtype)
    t = tensors.get(f"lokr_t{side[-1]}")
    if t is not None:  # Tucker: t [r, r, k...], a [r, out], b [r, in]
        return torch.einsum("i j ..., i p, j r -> p r ...", t.to(dtype), a, b)
    if b.dim() > 2:  # conv, not Tucker: b [r, in * k * k]
        return (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])
    return a @ b


def delta_weight(algo: str, tensors: Mapping[str, torch.Tensor], *, dtype=torch.float32) -> torch.Tensor:
    """The change ``dW`` a module makes to its layer's weight (multiplier 1), as LyCORIS computes it.

    Linear layers give ``[out, in]``; conv layers ``[out, in, k, k]``. DoRA's renormalization
    is not included (it depends on the base weight).
    """
    scale = module_scale(algo, tensors)
    if algo == "lora":
        down, up = tensors["lora_down.weight"].to(dtype), tensors["lora_up.weight"].to(dtype)
        mid = tensors.get("lora_mid.weight")
        if mid is not None:  # LoCon Tucker: up [out, r, 1, 1], mid [r, r, k, k], down [r, in, 1, 1]
            dw = torch.einsum("i j ..., i p, j r -> p r ...", mid.to(dtype), up.flatten(1).T, down.flatten(1))
        else:
            dw = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return dw * scale
    if algo == "loha":
        w1a, w1b = tensors["hada_w1_a"].to(dtype), tensors["hada_w1_b"].to(dtype)
        w2a, w2b = tensors["hada_w2_a"].to(dtype), tensors["hada_w2_b"].to(dtype)
        t1, t2 = tensors.get("hada_t1"), tensors.get("hada_t2")
        if t1 is not None and t2 is not None:
            r1 = torch.einsum("i j ..., j r, i p -> p r ...", t1.to(dtype), w1b, w1a)
            r2 = torch.einsum("i j ..., j r, i p -> p r ...", t2.to(dtype), w2b, w2a)
            return r1 * r2 * scale
        return (w1a @ w1b.flatten(1)) * (w2a @ w2b.flatten(1)) * scale
    if algo == "lokr":
        w1, w2 = _lokr_side(tensors, "w1", dtype), _lokr_side(tensors, "w2", dtype)
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        return torch.kron(w1, w2.contiguous()) * scale
    raise LoraFileError(f"cannot compute the change of a {algo!r} module")


def delta_norm_sq(algo: str, tensors: Mapping[str, torch.Tensor]) -> float:
    """``||dW||_F^2`` without building dW where that is cheaper.

    LoRA: ``s^2 * sum((U^T U) * (D D^T))`` costs ``r^2 (in + out)`` instead of ``r in out``;
    LoKr: ``||kron(A, B)|| = ||A|| ||B||``. Returns inf/nan when a factor holds Inf/NaN.
    """
    if algo == "lora" and "lora_mid.weight" not in tensors:
        s = module_scale(algo, tensors)
        up = tensors["lora_up.weight"].flatten(1).float()
        down = tensors["lora_down.weight"].flatten(1).float()
        r, out, inn = down.shape[0], up.shape[0], down.shape[1]
        if r * r * (out + inn) < r * out * inn:
            g = (up.T @ up) * (down @ down.T)
            return float(g.double().sum()) * s * s
        return float((up @ down).double().square().sum()) * s * s
    if algo == "lokr":
        s = module_scale(algo, tensors)
        w1, w2 = _lokr_side(tensors, "w1", torch.float32), _lokr_side(tensors, "w2", torch.float32)
        return float(w1.double().square().sum() * w2.double().square().sum()) * s * s
    return float(delta_weight(algo, tensors).double().square().sum())


def scaled_factor(module: LoraModule) -> str:
    """The one tensor a weight multiplies for this module (so ``dW`` scales by exactly w)."""
    if module.algo == "lokr":
        return "lokr_w1" if "lokr_w1" in module.keys else "lokr_w1_a"
    if module.algo in _SCALED_FACTOR:
        return _SCALED_FACTOR[module.algo]
    raise LoraFileError(f"layer {module.name} uses an algorithm ({module.algo}) these tools cannot scale")


def scale_module_tensors(module: LoraModule, tensors: Mapping[str, torch.Tensor], weight: float,
                         *, where: str = "") -> dict[str, torch.Tensor]:
    """The module's tensors with its change multiplied by ``weight`` (linear, never w squared).

    One factor is multiplied (LoRA ``lora_up``, LoHa ``hada_w1_a``, LoKr ``lokr_w1``/``lokr_w1_a``);
    alpha and the other factors are untouched. The product is taken in float32 and cast
    back to the file's dtype. DoRA modules are refused unless ``weight`` is 1.
    """
    if weight == 1.0:
        return dict(tensors)
    if module.dora:
        raise LoraFileError(
            f"{where}layer {module.name} is DoRA (it has dora_scale): DoRA renormalizes W + dW, so its "
            "change cannot be scaled linearly; use weight 1 for this block, or set the strength in your UI"
        )
    try:
        factor = scaled_factor(module)
    except LoraFileError as e:
        raise LoraFileError(f"{where}{e}; use weight 1 for its block") from None
    out = dict(tensors)
    t = tensors[factor]
    out[factor] = (t.to(torch.float32) * float(weight)).to(t.dtype)
    return out


# -- which model a file was made for ----------------------------------------------------------

@dataclass(frozen=True)
class ModelGuess:
    """``sdxl``, ``sd1``, ``sd2`` or ``unknown``, and the evidence."""

    model: str
    reason: str


_CONTEXT_MODEL = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_MODEL_TEXT = {"sd1": "an SD1.x LoRA", "sd2": "an SD2.x LoRA", "sdxl": "an SDXL LoRA"}


def guess_model(lora: LoraFile) -> ModelGuess:
    """Which Stable Diffusion a LoRA was trained on, from shapes first, then names, then metadata.

    The cross-attention ``attn2.to_k`` input width is the text-embedding width: 768 in SD1.x,
    1024 in SD2.x, 2048 in SDXL. Without one, the layout decides: a single text encoder
    (``lora_te_``), attention in ``input_blocks.1`` / ``down_blocks.0`` / ``up_blocks.3``
    (SD1/2 only) or in ``output_blocks.0``-``2`` / ``up_blocks.0`` (SDXL only).
    """
    widths: dict[int, str] = {}
    for m in lora.modules.values():
        if m.name.endswith("attn2_to_k") and m.in_features:
            widths.setdefault(m.in_features, m.spelled)
    for width, name in widths.items():
        model = _CONTEXT_MODEL.get(width)
        if model != "sdxl":
            what = _MODEL_TEXT.get(model, "not an SDXL LoRA")
            return ModelGuess(model or "unknown", f"{what}: {name} takes {width}-wide text embeddings (SDXL's take 2048)")
    if widths:
        return ModelGuess("sdxl", "attn2.to_k takes 2048-wide text embeddings")
    names = list(lora.modules)
    # Attention blocks only one of the two has (canonical LDM names; SD1/2: input 1,2,4,5,7,8 and
    # output 3-11; SDXL: input 4,5,7,8 and output 0-5).
    sd1_layout = [n for n in names if n.startswith("lora_te_") or re.match(
        r"lora_unet_(input_blocks_[12]_1_|output_blocks_([6-9]|1[01])_1_)", n)]
    sdxl_layout = [n for n in names if n.startswith(("lora_te1_", "lora_te2_")) or re.match(
        r"lora_unet_output_blocks_[0-2]_1_", n)]
    if sd1_layout and not sdxl_layout:
        return ModelGuess("sd1", f"an SD1.x/SD2.x LoRA: it has {sd1_layout[0]}, a layer SDXL does not have")
    if sdxl_layout and not sd1_layout:
        return ModelGuess("sdxl", f"layer names of SDXL ({sdxl_layout[0]})")
    meta = lora.metadata
    base = (meta.get("ss_base_model_version", "") + " " + meta.get("modelspec.architecture", "")).lower()
    if "xl" in base:
        return ModelGuess("sdxl", f"metadata says {base.strip()}")
    if base.strip():
        model = "sd2" if ("v2" in base or meta.get("ss_v2") == "True") else "sd1"
        return ModelGuess(model, f"{_MODEL_TEXT[model]}: its metadata says {base.strip()}")
    return ModelGuess("unknown", "no layer or metadata says which model")
