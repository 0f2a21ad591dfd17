"""The sd-scripts network: LyCORIS's kohya network, driven by a B-LoRA preset.

LyCORIS makes and runs the adapter modules; this module decides *which* modules (a preset,
checked against the model), with what rank and alpha (alpha = dim unless asked otherwise),
how they run (bypass or rebuild), and how they are grouped, saved and loaded so that every
sd-scripts version can drive them. LyCORIS keeps its preset in class attributes; we set
them only for the duration of one constructor call and restore them afterwards, so other
users of ``lycoris.kohya`` in the same process see no change.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from lycoris.kohya import LycorisNetworkKohya
from lycoris.modules import get_module, make_module

try:  # the algo names LyCORIS's kohya network looks up (3.2 to 4.x)
    from lycoris.wrapper import network_module_dict as _LYCORIS_ALGOS
except ImportError:  # pragma: no cover - depends on the installed LyCORIS
    _LYCORIS_ALGOS = None

from blora_network.errors import BLoraError, LoraFileError, NetworkArgsError, PresetError, count
from blora_network.files.algos import (
    LayerRecord,
    effective_alpha,
    kohya_layers,
    layer_record,
    network_dim_alpha,
    one_alpha,
    restate_alpha,
)
from blora_network.files.metadata import training_metadata
from blora_network.files.safefile import PICKLE_SUFFIXES, load_weights_file, save_pickle, write_safetensors_hashed
from blora_network.sdxl.blocks import LABELS, label_of_kohya_name
from blora_network.sdxl.names import kohya_module_name, text_encoder_index

from .guards import guard_lokr
from .merge import WeightBackup, merge_module
from .modelcheck import check_preset_matches, unwrap_unet
from .options import (
    LORAPLUS_KEYS,
    NetworkOptions,
    block_algo_map,
    choose_bypass,
    gui_network_args,
    lycoris_kwargs,
    parse_network_args,
    refuse_repeated_keys,
)
from .presets import Preset, load_preset, preset_for_blocks
from .regions import InferenceHooks, RegionState

__all__ = ["BLoRANetwork", "create_network", "create_network_from_weights", "network_options", "TEXT_ENCODER_ATTENTION_CLASSES"]

logger = logging.getLogger("blora_network")

TEXT_ENCODER_ATTENTION_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2")
"""transformers >= 4.48 names CLIP's attention ``CLIPAttention``; 4.44 (old sd-scripts) ``CLIPSdpaAttention``
(``CLIPFlashAttention2`` with flash attention)."""

_PRESET_ATTRS = (
    "ENABLE_CONV",
    "UNET_TARGET_REPLACE_MODULE",
    "UNET_TARGET_REPLACE_NAME",
    "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "TEXT_ENCODER_TARGET_REPLACE_NAME",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "USE_FNMATCH",
    "TARGET_EXCLUDE_NAME",
)
_PRESET_LOCK = threading.RLock()
_INIT_PARAMS = set(inspect.signature(LycorisNetworkKohya.__init__).parameters)


@contextlib.contextmanager
def _lycoris_preset(preset: dict) -> Iterator[None]:
    """Set LyCORIS's class-level preset for one constructor call, then put the old one back."""
    with _PRESET_LOCK:
        saved = {a: LycorisNetworkKohya.__dict__[a] for a in _PRESET_ATTRS if a in LycorisNetworkKohya.__dict__}
        try:
            LycorisNetworkKohya.apply_preset(preset)
            yield
        finally:
            for attr in _PRESET_ATTRS:
                if attr in saved:
                    setattr(LycorisNetworkKohya, attr, saved[attr])


def _lycoris_preset_for(preset: Preset, options: NetworkOptions) -> dict:
    """The preset dict LyCORIS gets: the file's keys, the per-block dims/alphas, the CLIP classes; validated."""
    lyco = preset.lycoris_dict()
    # 3.x/4.0 inherit TARGET_EXCLUDE_NAME from LycorisNetwork but ignore it; is_excluded came with 4.1
    if preset.exclude_name and not hasattr(LycorisNetworkKohya, "is_excluded"):
        raise PresetError(
            f"preset {preset.name!r} ({preset.source}) uses exclude_name, which needs lycoris-lora>=4.1; "
            r"upgrade lycoris-lora or use a negative lookahead such as '^(?!.*(ff\.net|proj)).*output_blocks\.0\.1\..*$'"
        )
    lyco["name_algo_map"] = {**block_algo_map(options), **lyco["name_algo_map"]}
    if _LYCORIS_ALGOS is not None:
        known = ", ".join(sorted(_LYCORIS_ALGOS))
        if options.algo not in _LYCORIS_ALGOS:
            raise NetworkArgsError(f"network_args algo={options.algo!r}: unknown LyCORIS algorithm; this lycoris-lora knows {known}")
        for key in ("module_algo_map", "name_algo_map"):
            for target, config in lyco[key].items():
                if isinstance(config, dict) and config.get("algo", options.algo) not in _LYCORIS_ALGOS:
                    raise PresetError(
                        f"preset {preset.name!r} ({preset.source}): {key} {target!r} uses algo {config['algo']!r}, "
                        f"unknown to LyCORIS; this lycoris-lora knows {known}"
                    )
    if options.train_text_encoder and not preset.trains_text_encoder:
        lyco["text_encoder_target_module"] = list(TEXT_ENCODER_ATTENTION_CLASSES)
    return lyco


def _role_of_lora(lora_name: str) -> str:
    """``te`` for text-encoder modules, the label of its attention block (a B-LoRA role, or
    ``OUT03``...: :func:`blora_network.sdxl.blocks.label_of_kohya_name`), or ``other``."""
    if lora_name.startswith("lora_te"):
        return "te"
    return label_of_kohya_name(lora_name) or "other"


def _record(lora, tensors=None) -> LayerRecord:
    """A LyCORIS module as the metadata sees it (:func:`~blora_network.files.algos.layer_record`).

    ``tensors``: the module's tensors as they are saved, when not its own state (one host read).
    """
    tensors = lora.state_dict() if tensors is None else tensors
    return layer_record(lora.lora_name, _role_of_lora(lora.lora_name), tensors,
                        rank_if_unknown=getattr(lora, "lora_dim", None))


def _caller_understands_descriptions() -> bool:
    """sd-scripts v0.8.x only accepts a list of groups; later versions a (groups, descriptions) tuple.

    The caller that unpacks descriptions keeps them in a local named ``lr_descriptions``;
    an sd-scripts trainer without that local gets the plain list.
    """
    frame = sys._getframe(2)
    code = frame.f_code
    if os.path.basename(code.co_filename).endswith("train_network.py"):
        return "lr_descriptions" in code.co_varnames
    return True


class BLoRANetwork(LycorisNetworkKohya):
    """LyCORIS's kohya network with B-LoRA's preset, defaults, groups and file format."""

    def __init__(
        self,
        text_encoder,
        unet,
        *,
        preset: Preset,
        options: NetworkOptions,
        multiplier: float = 1.0,
        check_matches: bool = True,
    ) -> None:
        unet = unwrap_unet(unet)
        if check_matches and preset.trains_unet:
            check_preset_matches(preset, unet)
        lyco_preset = _lycoris_preset_for(preset, options)
        bypass = choose_bypass(options)
        kwargs = lycoris_kwargs(options, multiplier=multiplier, bypass=bypass)
        if "warn_on_unmatched" in _INIT_PARAMS:
            kwargs["warn_on_unmatched"] = False  # we check matches ourselves, with better messages
        te = text_encoder if (options.train_text_encoder or preset.trains_text_encoder) else None
        with _lycoris_preset(lyco_preset):
            super().__init__(te, unet, **kwargs)
        if check_matches and te is not None and not self.text_encoder_loras:
            _refuse_unmatched_text_encoder(te, lyco_preset)
        # Keep this network's own view of the preset, whatever the class holds later.
        for attr, key in (("USE_FNMATCH", "use_fnmatch"), ("TARGET_EXCLUDE_NAME", "exclude_name"), ("NAME_ALGO_MAP", "name_algo_map")):
            setattr(self, attr, lyco_preset[key])
        self.preset, self.options, self.bypass = preset, options, bypass
        self.loraplus_lr_ratio, self.loraplus_unet_lr_ratio, self.loraplus_text_encoder_lr_ratio = (
            options.lycoris.get(k) for k in LORAPLUS_KEYS)
        self._drop_blocks({role for role, dim in options.block_dims.items() if dim == 0}
                          | {role for role, lr in options.block_lrs.items() if lr == 0})
        guard_lokr(self.text_encoder_loras + self.unet_loras, training=True)
        if check_matches and not self.unet_loras and not self.text_encoder_loras:
            raise PresetError(
                f"preset {preset.name!r} ({preset.source}) with these network_args trains no module; "
                "check the block dims and learning rates (0 turns a block off)"
            )

    @classmethod
    def from_modules(cls, unet, modules: list, *, preset: Preset, options: NetworkOptions,
                     multiplier: float = 1.0) -> "BLoRANetwork":
        """A network holding already-made LyCORIS modules (rebuilt from a file), for ``preset``'s record."""
        empty = replace(preset, unet_target_name=(), unet_target_module=(), text_encoder_target_name=(),
                        text_encoder_target_module=())
        network = cls(None, unet, preset=empty, options=options, multiplier=multiplier, check_matches=False)
        network.preset = preset
        network.text_encoder_loras = [m for m in modules if m.lora_name.startswith("lora_te")]
        network.unet_loras = [m for m in modules if not m.lora_name.startswith("lora_te")]
        network.loras = network.text_encoder_loras + network.unet_loras
        for lora in network.loras:
            lora.multiplier = float(multiplier)
            if hasattr(lora, "bypass_mode"):
                lora.bypass_mode = network.bypass and not getattr(lora, "wd", False)
        guard_lokr(network.loras, training=False)
        return network

    # -- bookkeeping --------------------------------------------------------------------
    def _drop_blocks(self, roles: set) -> None:
        if not roles:
            return
        self.unet_loras = [m for m in self.unet_loras if _role_of_lora(m.lora_name) not in roles]
        self.loras = self.text_encoder_loras + self.unet_loras
        logger.info("B-LoRA blocks turned off (dim 0 or lr 0): %s", ", ".join(sorted(roles)))

    def modules_by_role(self) -> dict[str, list]:
        """``{"content": [...], "style": [...], "te": [...], "other": [...]}`` of LyCORIS modules."""
        out: dict[str, list] = {}
        for lora in self.text_encoder_loras + self.unet_loras:
            out.setdefault(_role_of_lora(lora.lora_name), []).append(lora)
        return out

    def block_summary(self) -> dict[str, dict[str, Any]]:
        """Per role: module count, parameter count, rank and alpha (what the demo and metadata report)."""
        summary = {}
        for role, loras in self.modules_by_role().items():
            rank, alpha = network_dim_alpha(_record(m) for m in loras)
            summary[role] = {
                "modules": len(loras),
                "parameters": sum(p.numel() for m in loras for p in m.parameters()),
                "rank": rank,
                "alpha": alpha,
            }
        return summary

    # -- the sd-scripts calls -------------------------------------------------------------
    def prepare_network(self, args) -> None:
        """sd-scripts' hook with the whole argparse Namespace: refuse what would fail at step 1.

        It runs before ``accelerator.prepare`` wraps anything, so a refusal costs no model load.
        """
        refuse_repeated_keys(getattr(args, "network_args", None))
        if getattr(args, "deepspeed", False) and int(getattr(args, "zero_stage", 2) or 0) >= 3:
            raise NetworkArgsError(
                "--deepspeed --zero_stage 3 cannot train LyCORIS adapters: they replace each adapted layer's "
                "forward, so ZeRO-3's parameter-gathering hooks (which run in nn.Module.__call__) never fire for "
                "the adapters' own weights, which stay partitioned and the first step fails. Use --zero_stage 2 "
                "(it shards the adapters' gradients and optimizer state), 1 or 0; to save memory on the frozen "
                "UNet use --gradient_checkpointing, --cache_latents or --fp8_base instead"
            )
        if getattr(args, "fp8_base", False) and not self.bypass:
            raise NetworkArgsError(
                "--fp8_base needs LyCORIS's bypass mode (rebuild mode cannot multiply fp8 weights); "
                "remove bypass_mode=false from --network_args" + (" (DoRA needs rebuild mode: drop dora_wd)" if self.options.dora else "")
            )
        if not getattr(args, "network_train_unet_only", True) and not self.text_encoder_loras:
            logger.info(
                "blora_network: no text-encoder modules (B-LoRA is UNet-only); pass --network_train_unet_only "
                "so sd-scripts can cache text-encoder outputs"
            )

    def apply_to(self, text_encoder, unet, apply_text_encoder=None, apply_unet=None):
        """Hook the modules into the model. sd-scripts' image scripts call this with two args."""
        if getattr(self, "_applied", False):
            logger.warning("blora_network: apply_to called twice; the modules are already hooked in")
            return None
        if apply_text_encoder is None:
            apply_text_encoder = bool(self.text_encoder_loras)
        if apply_unet is None:
            apply_unet = True
        self._applied = True
        unet = unwrap_unet(unet)
        hooks = self._inference_hooks if getattr(self, "for_inference", False) else None
        if hooks is not None:  # before LyCORIS hooks the modules in, so its chain holds our dispatcher
            hooks.hook_modules(self.text_encoder_loras + self.unet_loras)
        result = super().apply_to(text_encoder, unet, bool(apply_text_encoder), bool(apply_unet))
        if hooks is not None and apply_unet:
            hooks.add_routers(unet, {m.lora_name for m in self.unet_loras})
        return result

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, learning_rate=None):
        """One param group per B-LoRA block (``unet content``, ``unet style``, ...).

        Returns ``(groups, descriptions)``; sd-scripts v0.8.x, which only takes a list, gets
        the list. A TypeError inside would be swallowed by sd-scripts and the call retried
        with two arguments, so none escapes.
        """
        groups, descriptions = self._param_groups(text_encoder_lr, unet_lr, learning_rate)
        if _caller_understands_descriptions():
            return groups, descriptions
        return groups

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        """sd-scripts main: the same groups, with one lr per text encoder."""
        return self._param_groups(text_encoder_lr, unet_lr, default_lr)

    def _param_groups(self, text_encoder_lr, unet_lr, learning_rate):
        """The groups and their descriptions. sd-scripts catches a TypeError from the call and
        retries it with two arguments, which would hide the real error: none escapes."""
        try:
            return self._make_param_groups(text_encoder_lr, unet_lr, learning_rate)
        except TypeError as e:
            raise NetworkArgsError(f"cannot build optimizer groups: {e}") from e

    def _make_param_groups(self, text_encoder_lr, unet_lr, learning_rate):
        self.requires_grad_(True)
        if isinstance(text_encoder_lr, (list, tuple)):
            te_lrs = [float(x) for x in text_encoder_lr] or [learning_rate]
        else:
            te_lrs = [text_encoder_lr if text_encoder_lr is not None else learning_rate]
        base_unet_lr = unet_lr if unet_lr is not None else learning_rate
        groups: list[dict] = []
        descriptions: list[str] = []

        def add(loras, lr, name, ratio):
            if not loras or (lr is not None and float(lr) == 0.0):
                return
            plain, plus = [], []
            for lora in loras:
                for pname, param in lora.named_parameters():
                    (plus if ratio and "lora_up" in pname else plain).append(param)
            for params, desc, factor in ((plain, name, 1.0), (plus, name + " plus", ratio or 1.0)):
                if params:
                    groups.append({"params": params} if lr is None else {"params": params, "lr": float(lr) * factor})
                    descriptions.append(desc)

        by_role = self.modules_by_role()
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        te_loras = by_role.get("te", [])
        for index in sorted({text_encoder_index(m.lora_name) for m in te_loras}):
            lr = te_lrs[min(index - 1, len(te_lrs) - 1)]
            add([m for m in te_loras if text_encoder_index(m.lora_name) == index], lr, f"textencoder {index}", te_ratio)
        for role in [*LABELS, "other"]:
            add(by_role.get(role, []), self.options.block_lrs.get(role, base_unet_lr), f"unet {role}", unet_ratio)
        return groups, descriptions

    def load_weights(self, file):
        """Load a saved file (``--network_weights``) after checking it fits this network."""
        weights = load_weights_file(file)
        mine = {m.lora_name for m in self.text_encoder_loras + self.unet_loras}
        theirs = {k.split(".", 1)[0] for k in weights}
        if mine and not (mine & theirs):
            raise LoraFileError(
                f"{file}: none of its {count(len(theirs), 'module')} belong to this network "
                f"({count(len(mine), 'module')}, preset {self.preset.name!r}); it was trained for other layers "
                "or another model. Use the same preset, or start without --network_weights"
            )
        own = {m.lora_name: m.state_dict() for m in self.loras}
        shapes = {f"{name}.{k}": v.shape for name, tensors in own.items() for k, v in tensors.items()}
        for key, tensor in weights.items():
            if key in shapes and tuple(shapes[key]) != tuple(tensor.shape):
                raise LoraFileError(
                    f"{file}: {key} has shape {tuple(tensor.shape)}, this network expects {tuple(shapes[key])}; "
                    "the file has another rank: set --network_dim to it or use --dim_from_weights"
                )
        weights = _restated_to_own_alphas(weights, own)
        self.weights_sd = weights
        if not any(True for _ in self.named_children()):  # before apply_to: LyCORIS's apply_to loads self.weights_sd
            return {"deferred until apply_to": True}
        missing, unexpected = self.load_state_dict(weights, strict=False)
        info = {}
        if missing:
            info["missing keys"] = missing
        if unexpected:
            info["unexpected keys"] = unexpected
        return info

    def merge_to(self, text_encoder, unet, weights_sd, dtype, device):
        """``--base_weights`` and the image scripts' ``--network_merge``: bake each module into its layer.

        Exactly what the forward pass applies, at each module's multiplier (merge.py; LyCORIS's own
        merge scales LoHa/LoKr by alpha/dim twice). The layers keep their dtype. A network that
        was hooked in (apply_to) is unhooked afterwards, or its change would count twice.
        """
        if weights_sd:
            names = {k.split(".", 1)[0] for k in weights_sd}
            self.text_encoder_loras = [m for m in self.text_encoder_loras if m.lora_name in names]
            self.unet_loras = [m for m in self.unet_loras if m.lora_name in names]
        self.loras = self.text_encoder_loras + self.unet_loras
        algos: dict[str, int] = {}
        for lora in self.loras:
            algo = merge_module(lora, device=device)
            algos[algo] = algos.get(algo, 0) + 1
        if getattr(self, "_applied", False):
            for lora in self.loras:
                lora.restore()
            self._applied = False
        if algos.get("other"):
            logger.info("blora_network: %d modules of other algorithms merged by LyCORIS itself", algos["other"])
        logger.info("blora_network: merged %d modules (%s)", len(self.loras),
                    ", ".join(f"{a} {n}" for a, n in sorted(algos.items())))

    # -- the image scripts' per-batch calls (inference networks) ------------------------------
    @property
    def _inference_hooks(self) -> InferenceHooks:
        hooks = self.__dict__.get("_blora_hooks")
        if hooks is None:
            if not getattr(self, "for_inference", False):
                raise BLoraError(
                    "blora_network: regional prompts and --network_pre_calc work on networks made by "
                    "create_network_from_weights(..., for_inference=True), as sd-scripts' image scripts make them"
                )
            hooks = self.__dict__["_blora_hooks"] = InferenceHooks()
        return hooks

    def _weight_backup(self) -> WeightBackup:
        backup = self.__dict__.get("_blora_backup")
        if backup is None:
            backup = self.__dict__["_blora_backup"] = WeightBackup()
        return backup

    def backup_weights(self) -> None:
        """``--network_pre_calc``: keep the adapted layers' weights (once, on their device)."""
        self._inference_hooks  # refuses a training network
        self._weight_backup().backup(self.loras)

    def restore_weights(self) -> None:
        """Put back the weights a pre-calculation changed, and run the modules again."""
        self._weight_backup().restore()
        self._inference_hooks.precalculated = False

    def pre_calculation(self) -> None:
        """Bake every module in at its current multiplier; its forward is skipped until restore_weights."""
        hooks = self._inference_hooks
        self._weight_backup().precalculate(self.loras)
        hooks.precalculated = True

    def set_region(self, sub_prompt_index, is_last_network, mask) -> None:
        """Regional prompts: this network acts on sub-prompt ``sub_prompt_index`` inside ``mask`` [H, W]."""
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if float(mask.max()) == 0.0:  # sd-scripts: an empty mask channel means the whole image
            mask = torch.ones_like(mask)
        self._inference_hooks.region = RegionState(int(sub_prompt_index), bool(is_last_network), mask)

    def set_current_generation(self, batch_size, num_sub_prompts, width, height, shared, ds_ratio=None) -> None:
        """Before each regional batch: the batch layout and the masks for this image size.

        ``gen_img.py`` passes Deep Shrink's ``ds_ratio`` (6 arguments), ``sdxl_gen_img.py`` does not (5).
        """
        state = self._inference_hooks.region
        if state is None:
            raise BLoraError("blora_network: set_current_generation before set_region; sd-scripts calls set_region first")
        like = next(iter(self.parameters()), torch.empty(0))
        state.set_generation(batch_size, num_sub_prompts, width, height, shared, ds_ratio, like)

    def apply_max_norm_regularization(self, max_norm_value, device):
        """``--scale_weight_norms``: LyCORIS scales each module (it owns the factors); returns what sd-scripts logs.

        ``(keys scaled, mean norm, largest norm)`` after scaling, as floats over every module, as
        sd-scripts' own LoRA reports them (LyCORIS reports 0 for both norms whenever no key was scaled).
        """
        scaled, norms = 0, []
        for lora in self.loras:
            was_scaled, norm = lora.apply_max_norm(max_norm_value, device)
            if was_scaled is None:  # an algorithm without max-norm support
                continue
            scaled += int(bool(was_scaled))
            norms.append(torch.as_tensor(norm).detach().reshape(()).float().cpu())
        if not norms:
            return 0, 0.0, 0.0
        stacked = torch.stack(norms)
        return scaled, float(stacked.mean()), float(stacked.max())

    def save_weights(self, file, dtype, metadata):
        """Write an ordinary kohya LoRA file, atomically, with the effective dim/alpha and blora_* keys.

        The file stores one alpha (:func:`blora_network.files.algos.one_alpha`): blocks trained at
        different alphas keep their change, which diffusers then loads right too.
        """
        state = one_alpha({k: v.detach().to("cpu") for k, v in self.state_dict().items()}, dtype=dtype)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        if Path(file).suffix.lower() in PICKLE_SUFFIXES:
            save_pickle(file, state)
            return
        saved = kohya_layers(state)
        records = [_record(m, saved.get(m.lora_name)) for m in self.text_encoder_loras + self.unet_loras]
        preset = self.preset.name if self.preset.source == "built-in" else self.preset.source
        meta = training_metadata(metadata, records, preset=preset, lrs=self.options.block_lrs)
        write_safetensors_hashed(file, state, meta)


def _restated_to_own_alphas(weights: dict, own_tensors: dict[str, dict]) -> dict:
    """The file's LoRA layers restated to the alphas this network was built with (the same dW).

    Saves store one alpha per file (:func:`blora_network.files.algos.one_alpha`), and a LyCORIS
    module keeps the scale it was built with whatever ``alpha`` it loads, so a block trained
    at alpha 4 gets its ``lora_up`` back from a file that stores alpha 8: resuming continues
    from exactly the saved change.
    """
    layers = kohya_layers(weights)
    out = dict(weights)
    for name, own in own_tensors.items():
        theirs = layers.get(name)
        if not theirs or "lora_up.weight" not in theirs or "lora_up.weight" not in own or "alpha" not in own:
            continue
        restated = restate_alpha(theirs, own["alpha"].detach().to("cpu", torch.float32), dtype=torch.float32)
        if restated is not theirs:
            out.update({f"{name}.{k}": v for k, v in restated.items()})
    return out


def _refuse_unmatched_text_encoder(te, lyco_preset: dict) -> None:
    wanted = lyco_preset["text_encoder_target_module"] + lyco_preset["text_encoder_target_name"]
    encoders = te if isinstance(te, (list, tuple)) else [te]
    found = sorted({type(m).__name__ for enc in encoders for m in enc.modules() if "Attention" in type(m).__name__})
    raise PresetError(
        f"train_text_encoder is on but no text-encoder module matches {', '.join(map(repr, wanted))}; "
        f"the text encoder's attention classes are {', '.join(found) or '(none)'}. Add them to "
        "text_encoder_target_module in a preset file, or leave train_text_encoder off"
    )


def _warn_alpha(options: NetworkOptions, network_alpha: Any) -> None:
    if options.alpha_given:
        logger.info("blora_network: alpha=%g from network_args (scale %.4g)", options.alpha, options.alpha / options.dim)
        return
    try:
        given = float(network_alpha) if network_alpha is not None else None
    except (TypeError, ValueError):
        given = None
    if given is not None and given != options.alpha:
        logger.warning(
            "blora_network: --network_alpha %g overridden: B-LoRA keeps alpha = dim = %d (scale 1.0). "
            "To train with another alpha, add alpha=<value> to --network_args",
            given,
            options.dim,
        )


def network_options(network_dim, network_alpha, neuron_dropout=None, **kwargs) -> tuple[Preset, NetworkOptions]:
    """The preset and typed options ``create_network`` would use, or the error it would raise
    before touching the model (``blora-network check`` runs this too)."""
    kwargs = gui_network_args(kwargs)
    raw_preset = kwargs.pop("preset", None)  # read once, here; options.preset is set from the loaded preset
    if neuron_dropout is not None and kwargs.get("dropout") is None:
        kwargs["dropout"] = neuron_dropout
    if kwargs.get("blocks") is not None:
        if raw_preset is not None and str(raw_preset).strip():
            raise NetworkArgsError(
                f"network_args has both preset={raw_preset} and blocks={kwargs['blocks']}: they both say what to "
                "train; keep one (a preset file may set per-block keys such as OUT03_dim in its [blora] table)"
            )
        options = parse_network_args(network_dim, network_alpha, kwargs)
        preset = preset_for_blocks(options.blocks)
        _refuse_settings_outside(options)
    else:
        preset = load_preset(str(raw_preset) if raw_preset is not None else None)
        options = parse_network_args(network_dim, network_alpha, kwargs, preset.block_settings)
    options.preset = preset.name
    if not preset.trains_unet and not options.train_text_encoder and not preset.trains_text_encoder:
        raise PresetError(
            f"preset {preset.name!r} ({preset.source}) has no UNet targets and text-encoder training is off "
            "(B-LoRA is UNet-only by default): add unet_target_name patterns, or train_text_encoder=true"
        )
    return preset, options


def _refuse_settings_outside(options: NetworkOptions) -> None:
    """``blocks=OUT00 OUT03_dim=8``: a setting for a block that is not trained is a mistake, not a no-op."""
    for what, settings in (("dim", options.block_dims), ("alpha", options.block_alphas), ("lr", options.block_lrs)):
        for label in settings:
            if label not in options.blocks:
                raise NetworkArgsError(
                    f"network_args {label}_{what}: {label} is not among blocks={','.join(options.blocks)}; "
                    "add it to blocks= or remove the setting"
                )


def create_network(
    multiplier,
    network_dim,
    network_alpha,
    vae,
    text_encoder,
    unet,
    neuron_dropout=None,
    **kwargs,
) -> BLoRANetwork:
    """sd-scripts' entry point: ``--network_module=blora_network --network_args preset=...``."""
    preset, options = network_options(network_dim, network_alpha, neuron_dropout, **kwargs)
    _warn_alpha(options, network_alpha)
    network = BLoRANetwork(text_encoder, unet, preset=preset, options=options, multiplier=float(multiplier))
    summary = network.block_summary()
    logger.info(
        "blora_network: preset %s, %s",
        preset.name,
        ", ".join(f"{role} {count(s['modules'], 'module')} (rank {s['rank']}, alpha {_number(s['alpha'])})" for role, s in summary.items()),
    )
    return network


def _number(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:g}"


def _module_names_by_kohya(text_encoder, unet) -> dict[str, torch.nn.Module]:
    out = {}
    for name, module in unet.named_modules():
        if name:
            out[kohya_module_name(name)] = module
    if text_encoder is not None:
        encoders = text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]
        indexed = isinstance(text_encoder, (list, tuple))
        for i, te in enumerate(encoders):
            prefix = f"lora_te{i + 1}" if indexed else "lora_te"
            for name, module in te.named_modules():
                if name:
                    out[kohya_module_name(name, prefix)] = module
    return out


def create_network_from_weights(
    multiplier,
    file,
    vae,
    text_encoder,
    unet,
    weights_sd=None,
    for_inference=False,
    **kwargs,
):
    """Rebuild a network from a saved file: ``--dim_from_weights``, ``--base_weights``, inference.

    Returns ``(network, weights_sd)`` as sd-scripts expects. The modules, their ranks and
    their alphas come from the file (LyCORIS reads each module's algo and shape); the file
    must fit the model.
    """
    unet = unwrap_unet(unet)
    weights = dict(weights_sd) if weights_sd is not None else load_weights_file(file)
    for_lookup = _module_names_by_kohya(text_encoder, unet)
    names = sorted({k.split(".", 1)[0] for k in weights if "." in k})
    unknown = [n for n in names if n not in for_lookup]
    if unknown:
        raise LoraFileError(
            f"{file}: {len(unknown)} of its {count(len(names), 'module')} are not in this model "
            f"(first: {unknown[0]}); the file is for another architecture (SD1.x, diffusers names, another model)"
        )
    if not names:
        raise LoraFileError(f"{file}: no LoRA module found in the file")
    for name in names:  # files converted from diffusers have no alpha: write out the alpha they mean
        down = weights.get(f"{name}.lora_down.weight")
        if down is not None and f"{name}.alpha" not in weights:
            weights[f"{name}.alpha"] = torch.tensor(effective_alpha(None, down.shape[0]))
    modules, ranks = [], []
    for name in names:
        lyco_type, params = get_module(weights, name)
        module = make_module(lyco_type, params, name, for_lookup[name]) if lyco_type is not None else None
        if module is None:
            raise LoraFileError(f"{file}: module {name} is not a LoRA/LyCORIS module LyCORIS can rebuild")
        modules.append(module.to(torch.float32))
        rank = getattr(module, "lora_dim", None)
        if rank:
            ranks.append(int(rank))
    options = parse_network_args(max(ranks) if ranks else 1, None, {k: v for k, v in kwargs.items() if k != "preset"})
    chosen = preset_for_blocks(options.blocks) if options.blocks else load_preset(kwargs.get("preset"))
    preset = replace(chosen, name=Path(str(file)).stem, source=str(file))
    network = BLoRANetwork.from_modules(unet, modules, preset=preset, options=options, multiplier=float(multiplier))
    network.for_inference = bool(for_inference)
    return network, weights
