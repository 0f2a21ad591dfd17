"""Every call sd-scripts makes on a network (blora_network.network.hostcalls.HOST_CALLS), in the host's order.

The training walk follows train_network.py from --base_weights to save_weights; the inference
walks follow sdxl_gen_img.py / gen_img.py with --network_pre_calc and with regional prompts
(a mask per network, the prompt split on " AND "). Regions are checked against an identity that
needs no reference implementation: two copies of one network with complementary masks and
identical sub-prompts must give what one network gives with the plain prompt.
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

import blora_network
from blora_network.errors import BLoraError, NetworkArgsError
from blora_network.network.hostcalls import HOST_CALLS, INFERENCE, TRAINING, provided
from blora_network.network.regions import mask_sizes
from blora_network.sdxl.unet import TINY, build_unet, random_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
LATENT = 16  # 16x16 latents: token grids 16x16, 8x8, 4x4
_PRISTINE = {}


def fresh_unet():
    if "unet" not in _PRISTINE:
        _PRISTINE["unet"] = build_unet(TINY, seed=0)
    return copy.deepcopy(_PRISTINE["unet"])


def sd_scripts_args(**overrides) -> argparse.Namespace:
    """The attributes of sd-scripts' Namespace that prepare_network reads, at their defaults."""
    values = dict(deepspeed=False, zero_stage=2, fp8_base=False, network_train_unet_only=True, scale_weight_norms=None)
    values.update(overrides)
    return argparse.Namespace(**values)


def _trained_file(tmp_path, name="b.safetensors", seed=3, preset="content_style", **args):
    unet = fresh_unet()
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset=preset, **args)
    network.apply_to(None, unet, False, True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    path = tmp_path / name
    network.save_weights(str(path), torch.float32, {})
    return path


def test_the_table_covers_what_the_contract_lists():
    methods = [c.method for c in HOST_CALLS]
    assert len(methods) == len(set(methods))
    for name in ("on_step_start", "update_grad_norms", "update_norms", "weight_norms", "grad_norms",
                 "combined_weight_norms", "set_multiplier", "is_mergeable", "backup_weights", "restore_weights",
                 "pre_calculation", "set_region", "set_current_generation", "merge_to", "prepare_network"):
        assert name in methods, name
    assert {c.caller for c in HOST_CALLS} == {TRAINING, INFERENCE}


def test_provided_calls_exist_and_absent_ones_stay_absent(unet):
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content")
    for call in HOST_CALLS:
        assert hasattr(network, call.method) is provided(call), (call.method, call.ours)


def test_training_calls_in_the_hosts_order(tmp_path, caplog):
    base_file = _trained_file(tmp_path, "base.safetensors", seed=5, preset="style")
    resume_file = _trained_file(tmp_path, "resume.safetensors", seed=6)
    unet = fresh_unet()
    x, t, ctx, y = random_inputs(TINY, batch=2, latent=LATENT, seed=1)
    walked = []

    # --base_weights: merge_to on a network rebuilt for inference
    module, sd = blora_network.create_network_from_weights(1.0, str(base_file), None, None, unet, for_inference=True)
    module.merge_to(None, unet, sd, torch.float32, "cpu")
    walked.append("merge_to")
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content_style", dropout=None)
    network.prepare_network(sd_scripts_args())
    walked.append("prepare_network")
    assert hasattr(network, "apply_max_norm_regularization")  # else --scale_weight_norms is turned off
    walked.append("apply_max_norm_regularization")
    network.apply_to(None, unet, False, True)
    walked.append("apply_to")
    assert "deferred" not in str(network.load_weights(str(resume_file)))
    walked.append("load_weights")
    network.enable_gradient_checkpointing()
    walked.append("enable_gradient_checkpointing")
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-3, 1e-3)
    walked.append("prepare_optimizer_params_with_multiple_te_lrs")
    assert network.prepare_optimizer_params(None, 1e-3, 1e-3)[1] == descriptions == ["unet content", "unet style"]
    walked.append("prepare_optimizer_params")
    network.to(torch.float32)
    walked.append("to")
    unet.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    network.prepare_grad_etc(None, unet)
    walked.append("prepare_grad_etc")
    network.on_epoch_start(None, unet)
    walked.append("on_epoch_start")
    assert network.training
    network.on_step_start(None, unet)
    walked.append("on_step_start")
    network.set_multiplier(0.0)  # diff output preservation: the prior without the adapters
    with torch.no_grad():
        prior = unet(x, t, ctx, y)
    network.set_multiplier(1.0)
    walked.append("set_multiplier")
    loss = torch.nn.functional.mse_loss(unet(x, t, ctx, y), prior)
    loss.backward()
    assert any(p.grad is not None for p in network.parameters())
    walked.append("parameters")
    torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
    walked.append("get_trainable_params")
    for name in ("update_grad_norms", "update_norms", "weight_norms", "grad_norms", "combined_weight_norms"):
        assert not hasattr(network, name)
        walked.append(name)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # --scale_weight_norms: real norms logged even when no key needed scaling
    keys, mean_norm, max_norm = network.apply_max_norm_regularization(1e6, "cpu")
    assert (keys, type(mean_norm), type(max_norm)) == (0, float, float) and 0 < mean_norm <= max_norm
    cap = mean_norm / 2
    keys, mean_norm, max_norm = network.apply_max_norm_regularization(cap, "cpu")
    assert keys > 0 and max_norm <= cap * (1 + 1e-4)
    network.eval()
    network.train()
    walked.append("eval")
    out = tmp_path / "out.safetensors"
    network.save_weights(str(out), torch.float16, {"ss_network_module": "blora_network"})
    walked.append("save_weights")
    assert out.exists()
    assert walked == [c.method for c in HOST_CALLS if c.caller == TRAINING]


def test_scale_weight_norms_reports_and_caps_every_module(unet):
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content", algo="loha", alpha="1")
    network.apply_to(None, unet, False, True)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    _, mean_before, max_before = network.apply_max_norm_regularization(1e9, "cpu")
    cap = mean_before
    keys, mean_norm, max_norm = network.apply_max_norm_regularization(cap, "cpu")
    assert 0 < keys < len(network.loras) and max_norm <= cap * (1 + 1e-4) and mean_norm < mean_before
    assert network.apply_max_norm_regularization(cap, "cpu")[2] <= cap * (1 + 1e-4)  # stays within the cap


def _inference_network(path, unet, multiplier=1.0):
    network, sd = blora_network.create_network_from_weights(multiplier, str(path), None, None, unet, for_inference=True)
    assert network.is_mergeable()
    network.apply_to([None, None], unet)
    network.load_state_dict(sd, False)
    network.to(torch.float32).to("cpu")
    return network


def test_network_pre_calc_in_the_hosts_order(tmp_path):
    path = _trained_file(tmp_path, algo="loha", alpha="1")
    batch = random_inputs(TINY, batch=2, latent=LATENT, seed=1)
    hooked_unet, unet = fresh_unet(), fresh_unet()
    reference = _inference_network(path, hooked_unet)
    network = _inference_network(path, unet)
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    network.backup_weights()
    for multiplier in (0.8, 0.3):  # two batches, each: set_multiplier, restore_weights, pre_calculation
        network.set_multiplier(multiplier)
        network.restore_weights()
        network.pre_calculation()
        reference.set_multiplier(multiplier)
        with torch.no_grad():
            expected, got = hooked_unet(*batch), unet(*batch)
        assert float((got - expected).abs().max()) <= 2e-4 * max(1.0, float(expected.abs().max()))
        assert not torch.equal(unet.state_dict()["output_blocks.0.1.transformer_blocks.0.attn1.to_q.weight"],
                               original["output_blocks.0.1.transformer_blocks.0.attn1.to_q.weight"])
    network.restore_weights()
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())
    with torch.no_grad():  # modules run again after restore
        assert torch.allclose(unet(*batch), hooked_unet(*batch), atol=1e-6)


def _regional_batch(n_sub, seed=1, same_sub_prompts=True):
    """Latents [uncond, cond], text [uncond, sub-prompt 0..n-1], as sdxl_gen_img.py lays them out."""
    x, t, ctx, y = random_inputs(TINY, batch=2, latent=LATENT, seed=seed)
    extra = random_inputs(TINY, batch=n_sub, latent=LATENT, seed=seed + 100)[2]
    subs = [ctx[1:2]] * n_sub if same_sub_prompts else [ctx[1:2]] + [extra[i:i + 1] for i in range(1, n_sub)]
    return x, t, torch.cat([ctx[:1], *subs]), y


def _halves(size=LATENT * 8):
    left = torch.zeros(size, size)
    left[:, : size // 2] = 1.0
    return left, 1.0 - left


@pytest.mark.parametrize("ds_ratio", [None, 0.5], ids=["sdxl_gen_img-5-args", "gen_img-6-args"])
def test_regions_with_complementary_masks_add_up_to_the_plain_network(tmp_path, ds_ratio):
    path = _trained_file(tmp_path)
    x, t, regional_ctx, y = _regional_batch(2)
    plain_unet = fresh_unet()
    _inference_network(path, plain_unet)
    with torch.no_grad():
        plain = plain_unet(x, t, regional_ctx[:2], y)
    unet = fresh_unet()
    networks = [_inference_network(path, unet), _inference_network(path, unet)]
    for i, (network, mask) in enumerate(zip(networks, _halves())):
        network.set_region(i, i == len(networks) - 1, mask)
    shared = {}
    for network in networks:
        network.set_multiplier(1.0)
        args = (1, 2, LATENT * 8, LATENT * 8, shared) + (() if ds_ratio is None else (ds_ratio,))
        network.set_current_generation(*args)
    with torch.no_grad():
        regional = unet(x, t, regional_ctx, y)
    assert regional.shape == plain.shape and shared == {}  # the last network consumed every entry
    # the conditional row: (sd-scripts leaves the unconditional text and attention output unadapted)
    assert float((regional[1] - plain[1]).abs().max()) <= 2e-3 * float(plain[1].abs().max())
    with torch.no_grad():  # and the identity is not trivial: one network alone in its half differs
        networks[1].set_multiplier(0.0)
        assert float((unet(x, t, regional_ctx, y)[1] - plain[1]).abs().max()) > 1e-2


def test_regions_one_network_full_mask_is_the_plain_network(tmp_path):
    path = _trained_file(tmp_path)
    x, t, ctx, y = _regional_batch(1)
    plain_unet, unet = fresh_unet(), fresh_unet()
    _inference_network(path, plain_unet)
    network = _inference_network(path, unet)
    network.set_region(0, True, torch.zeros(LATENT * 8, LATENT * 8))  # an empty mask channel means everywhere
    network.set_current_generation(1, 1, LATENT * 8, LATENT * 8, {})
    with torch.no_grad():
        regional, plain = unet(x, t, ctx, y), plain_unet(x, t, ctx, y)
    assert float((regional[1] - plain[1]).abs().max()) <= 2e-3 * float(plain[1].abs().max())  # the 1e-4 mask floor


def test_regions_give_each_sub_prompt_its_own_network(tmp_path):
    """Different files and sub-prompts: the result changes when either network or sub-prompt does."""
    a, b = _trained_file(tmp_path, "a.safetensors", seed=3), _trained_file(tmp_path, "b.safetensors", seed=4)
    x, t, ctx, y = _regional_batch(2, same_sub_prompts=False)

    def run(files, context):
        unet = fresh_unet()
        networks = [_inference_network(f, unet) for f in files]
        for i, (network, mask) in enumerate(zip(networks, _halves())):
            network.set_region(i, i == 1, mask)
            network.set_current_generation(1, 2, LATENT * 8, LATENT * 8, shared)
        with torch.no_grad():
            return unet(x, t, context, y)

    shared = {}
    ab = run((a, b), ctx)
    assert torch.isfinite(ab).all() and shared == {}
    assert not torch.allclose(ab, run((b, a), ctx), atol=1e-4)
    assert not torch.allclose(ab, run((a, b), torch.cat([ctx[:1], ctx[2:3], ctx[1:2]])), atol=1e-4)


def test_region_errors_name_the_fix(tmp_path, unet):
    path = _trained_file(tmp_path)
    network = _inference_network(path, unet)
    with pytest.raises(BLoraError, match="set_region first"):
        network.set_current_generation(1, 2, 64, 64, {})
    network.set_region(2, True, torch.ones(64, 64))
    with pytest.raises(ValueError, match="' AND '"):
        network.set_current_generation(1, 2, 64, 64, {})
    training = blora_network.create_network(1.0, 4, 1, None, None, fresh_unet(), preset="content")
    with pytest.raises(BLoraError, match="for_inference=True"):
        training.set_region(0, True, torch.ones(64, 64))
    with pytest.raises(BLoraError, match="for_inference=True"):
        training.backup_weights()


def test_mask_sizes_follow_the_unet_grids():
    assert mask_sizes(1024, 1024) == [(128, 128), (64, 64), (32, 32), (16, 16)]
    assert mask_sizes(1000, 1000)[:3] == [(125, 125), (126, 126), (63, 63)]
    assert (64, 64) in mask_sizes(1024, 1024, ds_ratio=0.5)


def test_lokr_rank_dropout_is_refused_with_the_reason(unet):
    with pytest.raises(NetworkArgsError, match="builds its dropout mask on the CPU"):
        blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content", algo="lokr", rank_dropout="0.1")
    # LoHa and LoRA build theirs on the weight's device: allowed
    blora_network.create_network(1.0, 4, 1, None, None, fresh_unet(), preset="content", algo="loha", rank_dropout="0.1")
