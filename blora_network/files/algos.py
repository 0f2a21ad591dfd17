"""The rules of each adapter algorithm: rank, the alpha rule, the change dW, linear scaling, finiteness.

One place for the arithmetic every part of the package relies on: the file tools (to
measure and rescale a layer), the network (to summarise and merge its LyCORIS modules) and
the metadata (to say what a file holds). Tensors are keyed by kohya factor suffix
(``lora_down.weight``, ``hada_w1_a``, ``lokr_w1``, ``alpha``...), which is also how a LyCORIS
module names them in its ``state_dict()``, so a file's layer and a live module go through the
same functions.

The change each algorithm makes, as LyCORIS's forward pass applies it, with
``scale = alpha / rank`` (:func:`effective_alpha`: alpha missing or 0 means alpha = rank):

* LoRA / LoCon: ``scale * up @ down`` (conv: flattened; with ``lora_mid``: the Tucker product);
* LoHa: ``scale * (w1_a @ w1_b) * (w2_a @ w2_b)``;
* LoKr: ``scale * kron(w1, w2)`` where ``w1 = w1_a @ w1_b`` and ``w2 = w2_a @ w2_b`` when
  factorized; rank is the inner size of ``w1_a`` (else of ``w2_a``), and when both ``w1``
  and ``w2`` are full matrices LyCORIS uses scale 1 whatever the stored alpha.

DoRA (a ``dora_scale`` tensor) renormalizes ``W + dW`` per output channel, so its effect is
not linear in dW: it can be moved, not scaled.

One alpha per file (:func:`one_alpha`): every client applies ``alpha / rank`` per layer, but
diffusers' kohya loader does not: from 0.32 on its per-layer ``alpha_pattern`` keys keep the
old ``...processor.to_k_lora.down.weight`` spelling and match no module, so every layer gets
the file's most common alpha. A file whose LoRA layers all store one alpha, each ``lora_up``
multiplied by its own alpha / that alpha, has the same dW for sd-scripts, LyCORIS, ComfyUI,
A1111/Forge and diffusers. The rule lives here, used by the file tools and the training save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch

from blora_network.errors import LoraFileError

__all__ = [
    "FP8_DTYPES",
    "OUTPUT_DTYPES",
    "output_dtype",
    "scaling_loss",
    "LORA_SUFFIXES",
    "LOHA_SUFFIXES",
    "LOKR_SUFFIXES",
    "KNOWN_SUFFIXES",
    "ALGOS",
    "effective_alpha",
    "alpha_value",
    "algo_of",
    "algo_of_tensors",
    "rank_of",
    "layer_shape",
    "module_scale",
    "rank_and_alpha",
    "delta_weight",
    "delta_norm_sq",
    "scaled_factor",
    "scale_tensors",
    "all_finite",
    "alpha_tensor",
    "kohya_layers",
    "restate_alpha",
    "one_alpha",
]

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_COMMON_SUFFIXES = ("alpha", "dora_scale")
KNOWN_SUFFIXES = frozenset(LORA_SUFFIXES + LOHA_SUFFIXES + LOKR_SUFFIXES + _COMMON_SUFFIXES)
ALGOS = ("lora", "loha", "lokr")
"""The algorithms these rules cover; anything else is ``other`` (kept, never rewritten)."""

# The factor a weight multiplies, per algorithm: one factor, so the change scales linearly.
_SCALED_FACTOR = {"lora": "lora_up.weight", "loha": "hada_w1_a"}


# -- the alpha rule -----------------------------------------------------------------------------

def effective_alpha(alpha: Optional[float], rank: Optional[int]) -> Optional[float]:
    """The alpha a layer really has: a missing alpha, or 0, means alpha = rank (scale 1).

    This is how sd-scripts, LyCORIS, ComfyUI and diffusers all read a file (diffusers and
    PEFT files carry no alpha at all). None only when the rank is unknown too.
    """
    if alpha is None or alpha == 0:
        return None if rank is None else float(rank)
    return float(alpha)


def alpha_value(tensors: Mapping[str, torch.Tensor]) -> Optional[float]:
    """The stored ``alpha`` of a layer's tensors, as a float (None when there is none)."""
    a = tensors.get("alpha")
    if a is None or not a.numel():
        return None
    return float(a.detach().reshape(-1)[0].float())


def alpha_tensor(value: float, like: torch.Tensor) -> torch.Tensor:
    """An ``alpha`` scalar to store beside factors of ``like``'s dtype.

    Stored in the factors' dtype as sd-scripts does, except fp8, whose 3 or 2 mantissa bits
    would round an alpha such as 100 to 96: fp8 files get an fp32 alpha.
    """
    dtype = like.dtype if like.is_floating_point() and like.element_size() > 1 else torch.float32
    return torch.tensor(float(value), dtype=dtype)


# -- shapes -------------------------------------------------------------------------------------

def algo_of(name: str, suffixes: set[str], shapes: Mapping[str, tuple]) -> tuple[str, Optional[int], Optional[int], Optional[int]]:
    """``(algo, rank, out_features, in_features)`` of a layer from its tensor names and shapes alone.

    Raises :class:`LoraFileError` for a layer missing one of its factors or whose factors do
    not multiply; an unknown tensor name makes the layer ``other``.
    """
    def need(*req: str) -> None:
        missing = [s for s in req if s not in suffixes]
        if missing:
            raise LoraFileError(f"layer {name} has {', '.join(sorted(suffixes))} but no {', '.join(missing)}")

    if suffixes - KNOWN_SUFFIXES:
        return "other", None, None, None
    if suffixes & set(LORA_SUFFIXES):
        need("lora_down.weight", "lora_up.weight")
        down, up = shapes["lora_down.weight"], shapes["lora_up.weight"]
        if len(down) < 2 or len(up) < 2 or (up[1] != down[0] and "lora_mid.weight" not in suffixes):
            raise LoraFileError(
                f"layer {name}: lora_up {list(up)} and lora_down {list(down)} do not multiply "
                "(the file is corrupt or not a LoRA)"
            )
        return "lora", rank_of("lora", shapes), int(up[0]), int(down[1])
    if suffixes & set(LOHA_SUFFIXES):
        need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        tucker = "hada_t1" in suffixes
        out = shapes["hada_w1_a"][1] if tucker else shapes["hada_w1_a"][0]
        return "loha", rank_of("loha", shapes), int(out), int(shapes["hada_w1_b"][1])
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
        return "lokr", rank_of("lokr", shapes), int(w1[0] * w2[0]), int(w1[1] * w2[1])
    return "other", None, None, None


def rank_of(algo: str, shapes: Mapping[str, Sequence[int]]) -> Optional[int]:
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


def layer_shape(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in tensors.items()}


def algo_of_tensors(name: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """:func:`algo_of`'s algorithm for a layer's tensors in hand (a LyCORIS module's ``state_dict()``)."""
    return algo_of(name, set(tensors), layer_shape(tensors))[0]


def rank_and_alpha(algo: str, tensors: Mapping[str, torch.Tensor]) -> tuple[Optional[int], Optional[float]]:
    """``(rank, effective alpha)`` of a layer; a full-matrix LoKr has neither (its scale is 1)."""
    rank = rank_of(algo, layer_shape(tensors))
    return rank, effective_alpha(alpha_value(tensors), rank)


@dataclass(frozen=True)
class LayerRecord:
    """What a file's description needs to know of one layer as stored: its block, rank and alpha."""

    role: Optional[str]
    """The label of its attention block (``content``, ``style``, ``layout``, ``OUT03``...) or None."""
    rank: Optional[int]
    alpha: Optional[float]
    """The effective alpha (:func:`effective_alpha`)."""


def layer_record(name: str, role: Optional[str], tensors: Mapping[str, torch.Tensor], *,
                 rank_if_unknown: Optional[int] = None) -> LayerRecord:
    """A layer as the metadata sees it, read from its tensors as they are stored (alpha missing means rank).

    The one way a written file's description is derived, for training saves and tool outputs alike.
    ``rank_if_unknown``: the rank of an algorithm with no rank rule here (LyCORIS's ``lora_dim``).
    """
    algo = algo_of_tensors(name, tensors) if tensors else "other"
    if algo == "other":
        return LayerRecord(role, rank_if_unknown, None)
    rank, alpha = rank_and_alpha(algo, tensors)
    return LayerRecord(role, rank, alpha)


def network_dim_alpha(records: Iterable[LayerRecord]) -> tuple[Optional[int], Optional[float]]:
    """The file's ``ss_network_dim``/``ss_network_alpha``: the largest rank, and the largest alpha among the
    layers of that rank (a file whose blocks differ in rank is described by its largest, as sd-scripts'
    loaders expect; :func:`one_alpha` gives every LoRA layer that alpha)."""
    ranked = [(r.rank, r.alpha) for r in records if r.rank is not None]
    if not ranked:
        return None, None
    top = max(rank for rank, _ in ranked)
    alphas = [a for rank, a in ranked if rank == top and a is not None]
    return top, (max(alphas) if alphas else None)


def module_scale(algo: str, tensors: Mapping[str, torch.Tensor]) -> float:
    """LyCORIS's ``scale`` for a layer: effective alpha / rank (1 for a full-matrix LoKr)."""
    rank, alpha = rank_and_alpha(algo, tensors)
    return 1.0 if rank is None else alpha / rank


# -- the change dW ------------------------------------------------------------------------------

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
    """The change ``dW`` a layer makes to its weight (multiplier 1), as LyCORIS's forward applies it.

    Linear layers give ``[out, in]``; conv layers ``[out, in, k, k]``. DoRA's renormalization
    is not included (it depends on the base weight). Computed in ``dtype`` (float32 by
    default, whatever the file's dtype, fp8 included).
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
    raise LoraFileError(f"cannot compute the change of a {algo!r} layer")


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


# -- linear scaling -----------------------------------------------------------------------------

def scaled_factor(algo: str, suffixes: Sequence[str], *, name: str = "") -> str:
    """The one tensor a weight multiplies for a layer (so ``dW`` scales by exactly w)."""
    if algo == "lokr":
        return "lokr_w1" if "lokr_w1" in suffixes else "lokr_w1_a"
    if algo in _SCALED_FACTOR:
        return _SCALED_FACTOR[algo]
    raise LoraFileError(f"layer {name} uses an algorithm ({algo}) these tools cannot scale")


def scale_tensors(algo: str, tensors: Mapping[str, torch.Tensor], weight: float, *, name: str = "",
                  where: str = "") -> dict[str, torch.Tensor]:
    """The layer's tensors with its change multiplied by ``weight`` (linear, never w squared).

    One factor is multiplied (LoRA ``lora_up``, LoHa ``hada_w1_a``, LoKr ``lokr_w1``/``lokr_w1_a``);
    alpha and the other factors are untouched. The product is taken in float32 and cast
    back to the tensor's dtype (fp8 included). DoRA layers are refused unless ``weight`` is 1.
    """
    if weight == 1.0:
        return dict(tensors)
    if "dora_scale" in tensors:
        raise LoraFileError(
            f"{where}layer {name} is DoRA (it has dora_scale): DoRA renormalizes W + dW, so its "
            "change cannot be scaled linearly; use weight 1 for this block, or set the strength in your UI"
        )
    try:
        factor = scaled_factor(algo, list(tensors), name=name)
    except LoraFileError as e:
        raise LoraFileError(f"{where}{e}; use weight 1 for its block") from None
    out = dict(tensors)
    t = tensors[factor]
    out[factor] = (t.to(torch.float32) * float(weight)).to(t.dtype)
    return out


OUTPUT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The dtypes the writers' ``--dtype`` offers: wide enough that scaling loses nothing worth saying."""


def output_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """``bf16`` -> ``torch.bfloat16``; None keeps each tensor's own dtype."""
    if name is None:
        return None
    if name not in OUTPUT_DTYPES:
        raise LoraFileError(f"dtype {name!r}: choose one of {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[name]


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def scaling_loss(algo: str, tensors: Mapping[str, torch.Tensor], weight: float) -> Optional[float]:
    """The share of a layer's scaled ``dW`` lost to rounding when fp8 ``tensors`` are scaled by ``weight``:
    ``||dW(stored) - w dW|| / ||w dW||``; None for a wider dtype (its rounding is far below a percent).
    fp8 has 3 or 2 mantissa bits, so a weight such as 0.7 moves each element by up to 6-12% of itself;
    a power of two moves only the elements it pushes below fp8's normal range."""
    if weight in (0.0, 1.0) or "dora_scale" in tensors:
        return None
    factor = scaled_factor(algo, list(tensors))
    if tensors[factor].dtype not in FP8_DTYPES:
        return None
    exact = dict(tensors)
    exact[factor] = tensors[factor].to(torch.float32) * float(weight)
    stored = scale_tensors(algo, tensors, weight)
    want = delta_weight(algo, exact)
    norm = float(want.double().norm())
    return float((delta_weight(algo, stored) - want).double().norm()) / norm if norm > 0 else None


# -- one alpha per file ------------------------------------------------------------------------

def kohya_layers(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {suffix: tensor}}`` of a kohya state dict (``module.suffix`` keys; kohya module names hold no dot)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        module, dot, suffix = key.partition(".")
        if dot:
            out.setdefault(module, {})[suffix] = t
    return out


_LYCORIS_ONLY = frozenset(LOHA_SUFFIXES + LOKR_SUFFIXES)


def _is_lora(tensors: Mapping[str, torch.Tensor]) -> bool:
    return "lora_down.weight" in tensors and "lora_up.weight" in tensors and not _LYCORIS_ONLY & set(tensors)


def _stored_alpha(tensors: Mapping[str, torch.Tensor], dtype) -> Optional[float]:
    """The effective alpha of a LoRA layer as it will be stored (its alpha cast to ``dtype`` first)."""
    a = tensors.get("alpha")
    if a is not None and dtype is not None:
        a = a.to(dtype)
    return effective_alpha(alpha_value({"alpha": a}) if a is not None else None, rank_of("lora", layer_shape(tensors)))


def restate_alpha(tensors: Mapping[str, torch.Tensor], alpha: torch.Tensor, *, dtype=None) -> Mapping[str, torch.Tensor]:
    """A LoRA layer's tensors storing ``alpha``, with ``lora_up`` times its own alpha / ``alpha``: the same dW.

    DoRA layers too: DoRA renormalizes ``W + (alpha / rank) up @ down``, which is unchanged.
    The product is taken in float64 and cast once to ``dtype`` (default: ``lora_up``'s own).
    Returns ``tensors`` itself when its effective alpha, as stored in ``dtype``, is already ``alpha``
    and not spelled 0 (which ComfyUI, A1111 and diffusers read as scale 0, not as alpha = rank).
    """
    own, target = _stored_alpha(tensors, dtype), float(alpha)
    stored = tensors.get("alpha")
    if own == target and not (stored is not None and alpha_value({"alpha": stored}) == 0):
        return tensors
    if target == 0 or not math.isfinite(target):
        raise LoraFileError(f"cannot restate a LoRA layer with alpha {target} (it must be finite and not 0)")
    up = tensors["lora_up.weight"]
    out = dict(tensors)
    out["lora_up.weight"] = (up.to(torch.float64) * (own / target)).to(dtype or up.dtype)
    out["alpha"] = alpha.detach().clone()
    return out


def one_alpha(state: Mapping[str, torch.Tensor], *, dtype=None) -> dict[str, torch.Tensor]:
    """A kohya state dict whose LoRA layers all store one alpha, every layer's dW unchanged.

    The alpha is the one :func:`network_dim_alpha` names (the largest
    rank's largest alpha), so ``ss_network_alpha`` is every LoRA layer's alpha. Layers that
    already store it are left as they are: a file with one alpha comes back unchanged,
    tensor for tensor. LoHa/LoKr layers keep their own alpha (diffusers loads no LyCORIS
    algorithm, and clients read LoKr's rank differently). ``dtype``: the dtype the state is
    about to be saved in (alphas compare as stored there; rewritten tensors are cast to it).
    """
    layers = {name: t for name, t in kohya_layers(state).items() if _is_lora(t)}
    stored = {name: (rank_of("lora", layer_shape(t)), _stored_alpha(t, dtype)) for name, t in layers.items()}
    top, common = network_dim_alpha(LayerRecord(None, rank, alpha) for rank, alpha in stored.values())
    if common is None:
        return dict(state)
    ref = layers[next(name for name, ra in stored.items() if ra == (top, common))]
    target = ref.get("alpha")
    if target is None or effective_alpha(alpha_value({"alpha": target}), None) != common:
        target = alpha_tensor(common, ref["lora_down.weight"])
    if dtype is not None:
        target = target.to(dtype)
    out = dict(state)
    for name, tensors in layers.items():
        new = restate_alpha(tensors, target, dtype=dtype)
        if new is not tensors:
            out.update({f"{name}.{suffix}": t for suffix, t in new.items()})
    return out


# -- finiteness ---------------------------------------------------------------------------------

def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``, for every float dtype including fp8.

    A sum is NaN/Inf whenever an element is (and is fast); only when it is not finite do we
    look element by element (a sum can overflow). fp8 tensors have no ``sum`` on the CPU, so
    they are widened to fp16 first (both fp8 formats fit in fp16 exactly, NaN and Inf too).
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:
        t = t.to(torch.float16)
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())
