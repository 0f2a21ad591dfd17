"""LoRA files as layers, not keys: which layers a file holds, what each is, and reading their tensors.

A LoRA file is a flat dict of tensors whose names encode the layer, the algorithm and the
factor (``lora_unet_output_blocks_0_1_..._to_q.lora_up.weight``). The tools need to reason
about layers: which B-LoRA block a layer is in, its algorithm and rank, its shape. This module
reads only the header to build that view (:class:`LoraFile`), and reads tensors only when
asked, through one read loop (:meth:`TensorReader.read`) that owns prefetching, the progress
count and the NaN/Inf check, so a tool touches the tensors it keeps and nothing else.

Every spelling :mod:`blora_network.sdxl.names` knows (kohya, kohya with diffusers block
names, diffusers, PEFT) is mapped to one canonical name per layer, the kohya name sd-scripts'
SDXL UNet gives it. The per-algorithm arithmetic is :mod:`blora_network.files.algos`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch

from blora_network.errors import LoraFileError, count
from blora_network.sdxl.blocks import (
    BLOCKS,
    SdxlBlock,
    label_of_kohya_name,
    lookup_block,
    role_of_kohya_name,
    sdxl_block_of,
)
from blora_network.sdxl.names import (
    CONTEXT_WIDTH_MODEL,
    SD_BLOCK_WIDTHS,
    SDXL_BLOCK_WIDTHS,
    block_of_kohya_name,
    block_order,
    is_attention_layer,
    ldm_path_of_kohya_name,
    other_architecture,
    parse_lora_key,
    sdxl_linear_shape,
    transformer_block_of,
)

from .algos import algo_of, all_finite
from .measure import Progress, progress_bar, torch_threads
from .metadata import KEY_DEMO, blocks_of_metadata
from .safefile import open_safetensors, read_header_layout

DEMO_TEXT = ("made by blora-network demo for its tiny SDXL-shaped UNet (64 channels at the widest, 32-wide text): "
             "for trying the tools only; it does not load on SDXL")

__all__ = ["LoraLayer", "LoraFile", "TensorReader", "ModelGuess", "open_lora", "open_sdxl_lora", "guess_model",
           "DTYPE_NAMES", "DEMO_TEXT"]

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DTYPE_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64", "F8_E4M3": "fp8_e4m3fn",
               "F8_E5M2": "fp8_e5m2"}
"""safetensors dtype codes -> the names users know."""


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer of a file: its tensors' names and what the header alone says about it."""

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
    """sd-scripts' LDM block (``output_blocks.0.1``, ``input_blocks.4.0``) or ``text_encoder_1``..."""
    role: Optional[str]
    """``content``, ``style``, ``layout`` or None outside the B-LoRA blocks."""
    ldm_path: Optional[str]
    """sd-scripts module path for layers inside a transformer block, else None."""

    @property
    def is_attention(self) -> bool:
        """An attention projection (what the B-LoRA presets train), not ff/proj_in/proj_out."""
        return self.ldm_path is not None and is_attention_layer(self.ldm_path)

    @property
    def sdxl_block(self) -> Optional[SdxlBlock]:
        """Its block in LoRA Block Weight's notation (``input_blocks.4.0`` and ``.1`` -> IN04; text
        encoders -> BASE); None for the time and label embeddings and ``out``."""
        return sdxl_block_of(self.block)

    @property
    def label(self) -> Optional[str]:
        """The label of its attention block (``content``, ``OUT03``...), None outside the eleven."""
        return label_of_kohya_name(self.name)

    @property
    def is_text_encoder(self) -> bool:
        return self.block.startswith("text_encoder")

    @property
    def kind(self) -> str:
        """``lora``, ``loha``, ``lokr``, with ``+dora`` when weight-decomposed."""
        return self.algo + ("+dora" if self.dora else "")

    @property
    def nbytes(self) -> int:
        """Bytes of this layer's tensors in the file."""
        return sum(_DTYPE_BYTES.get(self.dtypes[s], 4) * math.prod(self.shapes[s]) for s in self.keys)

    @property
    def params(self) -> int:
        return sum(math.prod(self.shapes[s]) for s in self.keys if s != "alpha")

    def key_of(self, suffix: str) -> str:
        """The file's tensor name for a suffix of this layer."""
        return self.keys.get(suffix, f"{self.name}.{suffix}")


@dataclass
class LoraFile:
    """A LoRA file seen as layers, from its header alone. Tensors are read on demand."""

    path: Path
    size: int
    metadata: dict[str, str]
    layers: dict[str, LoraLayer]
    """Canonical kohya module name -> layer, in file order."""
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
        present = {m.role for m in self.layers.values() if m.role}
        return [b.role for b in BLOCKS if b.role in present]

    def role_layers(self, role: str, *, attention_only: bool = False) -> list[LoraLayer]:
        return [m for m in self.layers.values() if m.role == role and (m.is_attention or not attention_only)]

    def trained_blocks(self) -> dict[str, list[LoraLayer]]:
        """The blocks beyond B-LoRA's that the metadata says were trained (``blocks=OUT03`` writes
        ``blora_blocks``), by label, with their layers; a block it names but does not hold is left out."""
        out = {}
        for label, attention in blocks_of_metadata(self.metadata).items():
            layers = [m for m in self.layers.values() if m.block == attention and m.role is None]
            if layers:
                out[label] = layers
        return out

    def block_layers(self, block: SdxlBlock, layers: str = "all") -> list[LoraLayer]:
        """The layers of an SDXL block: ``all`` of it (resnets, samplers, the transformer), its
        ``transformer`` (attention, ff, proj) or its ``attention`` projections only."""
        if layers == "all":
            return [m for m in self.layers.values() if m.sdxl_block == block]
        inside = [m for m in self.layers.values() if block.attention and m.block == block.attention]
        return [m for m in inside if m.is_attention] if layers == "attention" else inside

    def require_block(self, block: SdxlBlock, layers: str = "all", what: str = "") -> list[LoraLayer]:
        """:meth:`block_layers`, refusing a block the file does not hold (or holds no attention of)."""
        found = self.block_layers(block, layers)
        if not found:
            part = {"all": "", "transformer": " transformer", "attention": " attention"}[layers]
            held = self.block_layers(block, "all")
            more = f" (it has {len(held)} other layers there)" if held else ""
            raise LoraFileError(f"{self.path}: has no{part} layers of block {block.name} ({block.ldm}){more}{what}; "
                                f"it holds: {self.describe_blocks()}")
        return found

    def other_blocks(self) -> dict[str, int]:
        """Blocks outside the B-LoRA blocks -> layer count (``{"input_blocks.4.1": 40}``), in model order."""
        out: dict[str, int] = {}
        for m in self.layers.values():
            if m.role is None:
                out[m.block] = out.get(m.block, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: block_order(kv[0])))

    def describe_blocks(self) -> str:
        """One line naming every block the file holds, for error messages."""
        parts = [f"{r} ({count(len(self.role_layers(r)), 'module')})" for r in self.roles()]
        shown = list(self.other_blocks().items())
        if shown:
            text = ", ".join(f"{b} ({n})" for b, n in shown[:8])
            if len(shown) > 8:
                text += f" and {count(len(shown) - 8, 'more block')}"
            parts.append(text)
        if self.unparsed:
            parts.append(f"{count(len(self.unparsed), 'tensor')} that {'is not a LoRA layer' if len(self.unparsed) == 1 else 'are not LoRA layers'}")
        return "; ".join(parts) if parts else "no LoRA layers at all"

    def require_roles(self, roles, what: str = "") -> None:
        """Refuse a B-LoRA block the file lacks, naming what it has."""
        for role in roles:
            if not self.role_layers(role):
                block = lookup_block(role)
                raise LoraFileError(
                    f"{self.path}: has no {role} block ({block.ldm}, {block.lbw}){what}; it holds: {self.describe_blocks()}"
                )

    # -- reading -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reader(self) -> Iterator["TensorReader"]:
        """A lazy handle: ``r.read(layers)`` reads those layers' tensors and nothing else."""
        with open_safetensors(self.path, check=not self.spans) as handle:  # open_lora checked it
            reader = TensorReader(self, handle)
            try:
                yield reader
            finally:
                reader.close()


class TensorReader:
    """Reads layers' tensors through an open ``safe_open`` handle."""

    def __init__(self, lora: LoraFile, handle):
        self._lora = lora
        self._handle = handle
        self._plan: Optional[_PrefetchPlan] = None

    def get(self, key: str) -> torch.Tensor:
        """One tensor by its name in the file."""
        if self._plan is not None:
            self._plan.reached(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type for damaged data
            raise LoraFileError(f"{self._lora.path}: cannot read tensor {key!r} ({e})") from None

    def tensors(self, layer: LoraLayer) -> dict[str, torch.Tensor]:
        """kohya suffix -> tensor for one layer (the file's dtype, no copy where possible)."""
        if self._plan is not None:
            self._plan.reached(layer.name)
        return {suffix: self.get(key) for suffix, key in layer.keys.items()}

    def read(self, layers: Sequence[LoraLayer], *, progress: Optional[Progress] = None, desc: str = "",
             refuse_nonfinite: bool = True, extra_keys: Iterable[str] = ()) -> Iterator[tuple[LoraLayer, dict]]:
        """The read loop every tool uses: ``(layer, tensors)`` for each layer, in order.

        It announces the reads to the kernel (:meth:`prefetch`), counts bytes on a progress
        bar, runs torch on one thread (the per-layer work is small; see
        :mod:`blora_network.files.measure`), and refuses a layer holding NaN or Inf unless
        ``refuse_nonfinite`` is False (inspect and analyze report those instead).
        """
        self.prefetch(layers, extra_keys)
        total = sum(m.nbytes for m in layers)
        with progress_bar(progress, total, desc or f"reading {self._lora.path.name}") as bar, torch_threads(1):
            for layer in layers:
                tensors = self.tensors(layer)
                if refuse_nonfinite:
                    self.refuse_nonfinite(layer, tensors)
                yield layer, tensors
                bar.update(layer.nbytes)

    def refuse_nonfinite(self, layer: LoraLayer, tensors: Mapping[str, torch.Tensor]) -> None:
        """A NaN/Inf copied into a new file gives black images wherever the file goes; stop here."""
        for suffix, t in tensors.items():
            if not all_finite(t):
                raise LoraFileError(
                    f"{self._lora.path}: tensor {layer.key_of(suffix)} holds NaN or Inf; the training that "
                    "wrote it diverged, so nothing was written. Use an earlier save (inspect lists every such tensor)"
                )

    def prefetch(self, layers, keys=()) -> None:
        """Announce that these layers (then ``keys``) will be read, in this order.

        safetensors reads through ``mmap``, and a page fault on an uncached page reads the
        device's whole readahead window around it (8 MiB on some disks), pulling in skipped
        tensors next to kept ones. Instead, each :meth:`tensors` call first asks the kernel
        (``posix_fadvise(WILLNEED)``, in 2 MiB requests, which it never truncates) for
        exactly the planned bytes up to 64 MiB past that layer: reads start early and
        touch kept bytes only. Best effort: nothing happens where ``posix_fadvise`` is
        missing or fails, and reading works the same.
        """
        if self._plan is not None:
            self._plan.close()
        self._plan = _PrefetchPlan.make(self._lora, [(m.name, list(m.keys.values())) for m in layers]
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
        parsed = parse_lora_key(key)
        if parsed is None:
            unparsed.append(key)
            continue
        if parsed.spelling not in spellings:
            spellings.append(parsed.spelling)
        g = grouped.setdefault(parsed.module, {"spelled": parsed.spelled, "keys": {}, "shapes": {}, "dtypes": {}})
        if parsed.suffix in g["keys"]:
            raise LoraFileError(
                f"{p}: layer {parsed.module} appears twice ({g['keys'][parsed.suffix]!r} and {key!r}); "
                "the file mixes two spellings of the same layer"
            )
        g["keys"][parsed.suffix] = key
        g["shapes"][parsed.suffix] = tuple(int(d) for d in info["shape"])
        g["dtypes"][parsed.suffix] = info["dtype"]
    return LoraFile(
        path=p,
        size=size,
        metadata={str(k): str(v) for k, v in meta.items()},
        layers={name: _layer(name, g) for name, g in grouped.items()},
        spellings=tuple(spellings),
        unparsed=tuple(unparsed),
        dtypes=dtypes,
        spans=spans,
    )


def _layer(name: str, g: dict) -> LoraLayer:
    algo, rank, out_f, in_f = algo_of(name, set(g["keys"]), g["shapes"])
    return LoraLayer(
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
        block=block_of_kohya_name(name),
        role=role_of_kohya_name(name),
        ldm_path=ldm_path_of_kohya_name(name),
    )


def open_sdxl_lora(path, *, need_blora: bool = True) -> LoraFile:
    """:func:`open_lora` with the checks every tool makes before it works on a file.

    Refuses a file with no LoRA layer, a LoRA made for SD1.x or SD2.x (see :func:`guess_model`)
    and, unless ``need_blora`` is False, a file holding none of the three B-LoRA blocks; each
    message says what the file holds instead.
    """
    lora = open_lora(path)
    other = _by_architecture(lora)
    if other is not None:
        raise LoraFileError(f"{lora.path}: {other.reason}; B-LoRA blocks exist only in SDXL")
    if not lora.layers:
        raise LoraFileError(
            f"{lora.path}: holds no LoRA layers ({count(len(lora.unparsed), 'tensor')}, none named like a LoRA: "
            f"e.g. {lora.unparsed[0]!r})" if lora.unparsed else f"{lora.path}: holds no tensors at all"
        )
    guess = guess_model(lora)
    if guess.model not in ("sdxl", "unknown", "demo"):
        raise LoraFileError(f"{lora.path}: {guess.reason}; B-LoRA blocks exist only in SDXL")
    for layer in lora.layers.values():
        _refuse_malformed(lora.path, layer, check_shape=guess.model == "sdxl")
    if need_blora and not lora.roles():
        known = ", ".join(f"{b.role} {b.ldm}" for b in BLOCKS)
        raise LoraFileError(f"{lora.path}: holds no B-LoRA block ({known}); it holds: {lora.describe_blocks()}")
    return lora


_INTEGER_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}


def _refuse_malformed(path: Path, layer: LoraLayer, *, check_shape: bool) -> None:
    """Tensors no trainer writes, named by key before any tool uses them: integer factors (a quantized
    file this math cannot read), an alpha that is not one number, a factor whose width does not fit
    the SDXL layer its name gives (it would fail to load, or load into nothing, in sd-scripts and the UIs)."""
    for suffix, key in layer.keys.items():
        dtype, shape = layer.dtypes[suffix], layer.shapes[suffix]
        if suffix == "alpha":
            if math.prod(shape) != 1:
                raise LoraFileError(f"{path}: {key} holds {math.prod(shape)} numbers {list(shape)}; an alpha is one "
                                    "number (the file is damaged or not a LoRA)")
        elif dtype in _INTEGER_DTYPES:
            raise LoraFileError(f"{path}: {key} is {dtype}, an integer tensor; LoRA factors are floating point "
                                "(a quantized file?): use the float16/bfloat16/float32 original")
    expected = sdxl_linear_shape(layer.ldm_path) if check_shape and layer.ldm_path else None
    if expected is None or layer.out_features is None or layer.in_features is None:
        return
    for got, want, factors, side in ((layer.out_features, expected[0], _OUT_FACTORS, "output"),
                                     (layer.in_features, expected[1], _IN_FACTORS, "input")):
        if got != want:
            raise LoraFileError(f"{path}: {_key(layer, factors)} has {side} width {got}, but SDXL's {layer.ldm_path} "
                                f"is {expected[0]}x{expected[1]} (out x in): the file is damaged or not an SDXL LoRA")


# -- which model a file was made for ----------------------------------------------------------

@dataclass(frozen=True)
class ModelGuess:
    """``sdxl``, ``sd1``, ``sd2`` or ``unknown``, and the evidence."""

    model: str
    reason: str


_MODEL_TEXT = {"sd1": "an SD1.x LoRA", "sd2": "an SD2.x LoRA", "sdxl": "an SDXL LoRA"}
_OUT_FACTORS = ("lora_up.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")
_IN_FACTORS = ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b")


def _key(layer: LoraLayer, factors: Sequence[str]) -> str:
    """The file's own name of the tensor that shows a width (the user's key, never our translation)."""
    return next((layer.keys[f] for f in factors if f in layer.keys), next(iter(layer.keys.values())))


def guess_model(lora: LoraFile) -> ModelGuess:
    """Which Stable Diffusion a LoRA was trained on: from shapes first, then names, then metadata.

    1. The cross-attention ``attn2.to_k``/``to_v`` input width is the text-embedding width: 768 in
       SD1.x, 1024 in SD2.x, 2048 in SDXL (any other: not a Stable Diffusion we know).
    2. The channels of each transformer block (the output width of its layers): SD1.x/SD2.x and
       SDXL share block names but not widths (``output_blocks.3.1`` is 1280 wide in SD1.x, 640 in
       SDXL), so a file with SDXL-looking names and SD1.x widths is named as SD1.x.
    3. The layout: a single text encoder (``lora_te_``), attention in ``input_blocks.1``/``2`` or
       ``output_blocks.6``-``11`` (SD1/2 only), or in ``output_blocks.0``-``2`` (SDXL only).
    4. The metadata (``ss_base_model_version``, ``modelspec.architecture``).
    A file made by ``blora-network demo`` (metadata ``blora_demo``) is ``demo``: its tiny UNet is no SDXL.
    Messages quote the file's own tensor names.
    """
    if KEY_DEMO in lora.metadata:
        return ModelGuess("demo", DEMO_TEXT)
    found = _by_architecture(lora) or _by_text_width(lora) or _by_block_widths(lora) or _by_layout(lora) or _by_metadata(lora.metadata)
    return found or ModelGuess("unknown", "no layer or metadata says which model")


def _by_architecture(lora: LoraFile) -> Optional[ModelGuess]:
    """Flux and SD3 files, by names no SDXL layer has (their layers are not SDXL's, so most keys do
    not even parse as layers)."""
    for key in [m.spelled for m in lora.layers.values()] + list(lora.unparsed):
        model = other_architecture(key)
        if model is not None:
            article = "an" if model.startswith("SD") else "a"
            return ModelGuess(model.lower().replace(" ", "_"), f"{article} {model} LoRA: it has {key}, a layer of "
                                                                f"{'that model' if ' or ' in model else model}")
    return None


def _by_text_width(lora: LoraFile) -> Optional[ModelGuess]:
    seen = None
    for m in lora.layers.values():
        if m.ldm_path and m.ldm_path.endswith(("attn2.to_k", "attn2.to_v")) and m.in_features:
            model = CONTEXT_WIDTH_MODEL.get(m.in_features)
            if model != "sdxl":
                what = _MODEL_TEXT.get(model, "not an SDXL LoRA")
                return ModelGuess(model or "unknown", f"{what}: {_key(m, _IN_FACTORS)} takes {m.in_features}-wide "
                                                      "text embeddings (SDXL's take 2048)")
            seen = seen or ModelGuess("sdxl", "attn2.to_k takes 2048-wide text embeddings")
    return seen


def _by_block_widths(lora: LoraFile) -> Optional[ModelGuess]:
    sdxl_match = None
    for m in lora.layers.values():
        if not m.ldm_path or m.out_features is None or ".ff.net.0." in m.ldm_path:
            continue
        block = transformer_block_of(m.ldm_path)
        xl, sd = SDXL_BLOCK_WIDTHS.get(block), SD_BLOCK_WIDTHS.get(block)
        if m.out_features == sd and m.out_features != xl:
            there = f"SDXL's {block} is {xl} wide" if xl else f"SDXL has no transformer at {block}"
            return ModelGuess("sd1", f"an SD1.x/SD2.x LoRA: {_key(m, _OUT_FACTORS)} is {m.out_features} wide, as "
                                     f"{block} is in SD1.x/SD2.x ({there})")
        if m.out_features == xl and xl != sd:
            sdxl_match = sdxl_match or ModelGuess("sdxl", f"{block} is {xl} wide, as in SDXL")
    return sdxl_match


def _by_layout(lora: LoraFile) -> Optional[ModelGuess]:
    # Attention blocks only one of the two has (canonical LDM names; SD1/2: input 1,2,4,5,7,8 and
    # output 3-11; SDXL: input 4,5,7,8 and output 0-5).
    sd1 = [m for n, m in lora.layers.items() if n.startswith("lora_te_") or re.match(
        r"lora_unet_(input_blocks_[12]_1_|output_blocks_([6-9]|1[01])_1_)", n)]
    sdxl = [m for n, m in lora.layers.items() if n.startswith(("lora_te1_", "lora_te2_")) or re.match(
        r"lora_unet_output_blocks_[0-2]_1_", n)]
    if sd1 and not sdxl:
        return ModelGuess("sd1", f"an SD1.x/SD2.x LoRA: it has {sd1[0].spelled}, a layer SDXL does not have")
    if sdxl and not sd1:
        return ModelGuess("sdxl", f"layer names of SDXL ({sdxl[0].spelled})")
    return None


def _by_metadata(meta: Mapping[str, str]) -> Optional[ModelGuess]:
    base = (meta.get("ss_base_model_version", "") + " " + meta.get("modelspec.architecture", "")).lower()
    if "xl" in base:
        return ModelGuess("sdxl", f"metadata says {base.strip()}")
    if base.strip():
        model = "sd2" if ("v2" in base or meta.get("ss_v2") == "True") else "sd1"
        return ModelGuess(model, f"{_MODEL_TEXT[model]}: its metadata says {base.strip()}")
    return None
