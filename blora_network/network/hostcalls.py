"""Every method sd-scripts calls on a network, in the order it calls them, and who answers each.

Read from kohya-ss/sd-scripts main 48d368f (2026-02): ``train_network.py`` (``sdxl_train_network.py``
subclasses its NetworkTrainer and calls nothing more on the network), ``gen_img.py`` and
``sdxl_gen_img.py``. "guarded" means the host looks the method up with ``hasattr`` first; an
unguarded call to a missing method stops the run with an AttributeError. The module-level
entry points (``create_network``, ``create_network_from_weights``) are not methods and are
covered by the contract tests.

``tests/test_host_calls.py`` walks this table in order against a real network: every method
marked provided must be there and answer the host's arguments; every one marked absent must
stay absent (the host would call it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HostCall", "HOST_CALLS", "TRAINING", "INFERENCE", "provided"]

TRAINING = "train_network.py"
INFERENCE = "gen_img.py, sdxl_gen_img.py"


@dataclass(frozen=True)
class HostCall:
    method: str
    caller: str
    when: str
    """The call as the host writes it, and the flag or moment that triggers it."""
    guarded: bool
    when_missing: str
    ours: str
    """``blora_network`` (our code), ``LyCORIS`` (inherited), ``torch`` (nn.Module), or ``absent``."""


HOST_CALLS: tuple[HostCall, ...] = (
    # -- train_network.py, in order ----------------------------------------------------------
    HostCall("merge_to", TRAINING, "merge_to(te, unet, weights_sd, dtype, device) per --base_weights file, on "
             "create_network_from_weights(m, file, vae, te, unet, for_inference=True)", False,
             "AttributeError", "blora_network: exact for every algorithm (merge.py)"),
    HostCall("prepare_network", TRAINING, "prepare_network(args) right after create_network", True,
             "skipped", "blora_network: refuses --fp8_base in rebuild mode, --deepspeed --zero_stage 3 and a --network_args key given twice"),
    HostCall("apply_max_norm_regularization", TRAINING, "looked up at setup; with --scale_weight_norms each step: "
             "apply_max_norm_regularization(max_norm, device) -> (keys_scaled, mean_norm, max_norm)", True,
             "a warning, and --scale_weight_norms is turned off",
             "blora_network: LyCORIS scales each module; the mean and largest norm of every module are logged"),
    HostCall("apply_to", TRAINING, "apply_to(te, unet, train_te, train_unet)", False, "AttributeError",
             "blora_network (also the image scripts' two-argument call)"),
    HostCall("load_weights", TRAINING, "load_weights(file) with --network_weights", False, "AttributeError",
             "blora_network: checks names and shapes against this network"),
    HostCall("enable_gradient_checkpointing", TRAINING, "with --gradient_checkpointing", False, "AttributeError",
             "LyCORIS (no-op; the UNet checkpoints)"),
    HostCall("prepare_optimizer_params_with_multiple_te_lrs", TRAINING, "(te_lrs, unet_lr, learning_rate)", True,
             "prepare_optimizer_params is called instead", "blora_network: one group per block"),
    HostCall("prepare_optimizer_params", TRAINING, "(te_lr, unet_lr, learning_rate), again with two arguments "
             "after a TypeError", False, "AttributeError", "blora_network: one group per block"),
    HostCall("to", TRAINING, "to(weight_dtype) with --full_fp16 / --full_bf16", False, "AttributeError", "torch"),
    HostCall("prepare_grad_etc", TRAINING, "prepare_grad_etc(te, unet) after accelerator.prepare", False,
             "AttributeError", "LyCORIS (requires_grad_(True))"),
    HostCall("on_epoch_start", TRAINING, "on_epoch_start(te, unet) each epoch", False, "AttributeError",
             "LyCORIS (train())"),
    HostCall("on_step_start", TRAINING, "on_step_start(te, unet) each step, on the unwrapped network", True,
             "a no-op lambda", "LyCORIS (no-op)"),
    HostCall("set_multiplier", TRAINING, "set_multiplier(0.0) then (1.0) around diff-output-preservation batches",
             False, "AttributeError", "LyCORIS (every module's multiplier; DoRA keeps W + dW renormalized at 0)"),
    HostCall("parameters", TRAINING, "all_reduce_network: parameters() grads averaged by hand", False,
             "AttributeError", "torch"),
    HostCall("get_trainable_params", TRAINING, "for clip_grad_norm_ when --max_grad_norm != 0 (default 1.0)",
             False, "AttributeError", "LyCORIS (parameters())"),
    HostCall("update_grad_norms", TRAINING, "after clipping at each sync step", True, "skipped",
             "absent: feeds GGPO (networks/lora_flux.py); nothing to update for B-LoRA"),
    HostCall("update_norms", TRAINING, "after clipping at each sync step", True, "skipped",
             "absent: feeds GGPO (networks/lora_flux.py)"),
    HostCall("weight_norms", TRAINING, "without --scale_weight_norms, each step; then grad_norms() and "
             "combined_weight_norms() unguarded, each .mean().item()", True, "no norm/* logs",
             "absent: defining it obliges grad_norms and combined_weight_norms (GGPO's); --scale_weight_norms logs the norms"),
    HostCall("grad_norms", TRAINING, "only when weight_norms exists", False, "AttributeError if weight_norms exists",
             "absent (with weight_norms)"),
    HostCall("combined_weight_norms", TRAINING, "only when weight_norms exists", False,
             "AttributeError if weight_norms exists", "absent (with weight_norms)"),
    HostCall("eval", TRAINING, "eval() / train() around validation", False, "AttributeError", "torch"),
    HostCall("save_weights", TRAINING, "save_weights(file, save_dtype, metadata) on the unwrapped network", False,
             "AttributeError", "blora_network: ordinary kohya LoRA file"),
    # -- gen_img.py / sdxl_gen_img.py, in order ------------------------------------------------
    HostCall("is_mergeable", INFERENCE, "is_mergeable() for each network", False, "AttributeError",
             "LyCORIS (False only for weight-only fp8 layers, 4.x)"),
    HostCall("load_state_dict", INFERENCE, "apply_to([te1, te2], unet) then load_state_dict(weights_sd, False) "
             "when not merging", False, "AttributeError", "torch"),
    HostCall("backup_weights", INFERENCE, "with --network_pre_calc, once after .to(dtype).to(device)", False,
             "AttributeError", "blora_network (merge.WeightBackup)"),
    HostCall("set_region", INFERENCE, "set_region(i, i == last, mask) with a mask image (regional prompts)", False,
             "AttributeError", "blora_network (regions.py, sd-scripts' protocol)"),
    HostCall("set_current_generation", INFERENCE, "each regional batch: (batch, n_sub_prompts, width, height, shared)"
             " in sdxl_gen_img.py, + ds_ratio in gen_img.py", False, "AttributeError", "blora_network (regions.py)"),
    HostCall("restore_weights", INFERENCE, "each batch with --network_pre_calc and no regions", False,
             "AttributeError", "blora_network (merge.WeightBackup)"),
    HostCall("pre_calculation", INFERENCE, "each batch with --network_pre_calc and no regions, after restore_weights",
             False, "AttributeError", "blora_network: bakes each module in exactly, skips its forward"),
)
"""merge_to also serves the image scripts (--network_merge / --network_merge_n_models), and
set_multiplier their per-batch multipliers; each is listed once, at its first call."""


def provided(call: HostCall) -> bool:
    return not call.ours.startswith("absent")
