"""merge_to equals the forward pass, for every algorithm, alpha, multiplier, DoRA and conv layer.

LyCORIS 4.1.3 merges LoHa and LoKr at (alpha/dim)^2 instead of alpha/dim (``get_diff_weight``
applies the scale twice) and drops a trained ``use_scalar`` scalar; sd-scripts' ``--base_weights``
and ``--network_merge`` go through ``merge_to``. Each case here: adapters with random (trained-
looking) factors, the UNet's output with the modules hooked in, then the same UNet after
``merge_to`` with nothing hooked in: the two must agree to float rounding, while the adapters
move the output by far more than that.
"""

from __future__ import annotations

import copy

import pytest
import torch

import blora_network
from blora_network.errors import NetworkArgsError
from blora_network.network.merge import WeightBackup, merged_weight, module_algo
from blora_network.network.guards import lokr_bypass_leaves_out_scale
from blora_network.sdxl.unet import TINY, build_unet, random_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
_PRISTINE = {}


def fresh_unet():
    """A copy of one tiny UNet (copying is several times faster than building one)."""
    if "unet" not in _PRISTINE:
        _PRISTINE["unet"] = build_unet(TINY, seed=0)
    return copy.deepcopy(_PRISTINE["unet"])


@pytest.fixture(scope="module")
def batch():
    return random_inputs(TINY, batch=2, seed=1)


@pytest.fixture(scope="module")
def base(batch):
    with torch.no_grad():
        return fresh_unet()(*batch)

CONV_PRESET = (
    "enable_conv = true\n"
    "unet_target_module = []\n"
    "unet_target_name = [\n"
    "    '^output_blocks\\.0\\.0\\.(in_layers\\.2|out_layers\\.3|skip_connection)$',\n"
    "    '^(?!.*(ff\\.net|proj)).*output_blocks\\.0\\.1\\..*$',\n"
    "]\n"
    "text_encoder_target_module = []\n"
    "text_encoder_target_name = []\n"
)

# (id, algo, network_args): dim 4 on the tiny UNet's 64-wide layers; LoKr's factor=2 splits them
# 2 x 32, so its w2 side is low-rank (at the default factor LyCORIS falls back to full matrices).
CASES = [
    ("lora", "lora", {}),
    ("loha", "loha", {}),
    ("lokr-lowrank", "lokr", {"factor": "2"}),
    ("lokr-full", "lokr", {}),
    ("lora-dora", "lora", {"dora_wd": "true"}),
    ("loha-dora", "loha", {"dora_wd": "true"}),
    ("lokr-dora", "lokr", {"factor": "2", "dora_wd": "true"}),
    ("loha-scalar", "loha", {"use_scalar": "true"}),
    ("lora-rebuild", "lora", {"bypass_mode": "false"}),
]


def _perturb(network, seed=3, scale=0.3):
    """Random factors (lora_up and friends start at zero): every module makes a change."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def _network(unet, algo, args, multiplier=0.7, preset="content", **more):
    if algo == "lokr" and lokr_bypass_leaves_out_scale():  # lycoris-lora 3.x: refused in bypass mode
        args = dict(args, bypass_mode="false")               # (test_old_lycoris_lokr_bypass_is_guarded)
    network = blora_network.create_network(multiplier, 4, 1, None, None, unet, preset=preset, algo=algo, **args, **more)
    network.apply_to(None, unet, False, True)
    _perturb(network)
    network.eval()
    return network


def _forward_then_merge(network, unet, batch):
    x, t, ctx, y = batch
    with torch.no_grad():
        hooked = unet(x, t, ctx, y)
    network.merge_to(None, unet, None, torch.float32, "cpu")
    with torch.no_grad():
        merged = unet(x, t, ctx, y)
    return hooked, merged


def _check(hooked, merged, base):
    """Equal to float32 rounding (the merged weight is summed in another order than the forward's
    matmuls: about 1e-6 of the change per layer); LyCORIS's double scale is off by a whole factor."""
    effect = float((hooked - base).abs().max())
    assert effect > 0.05, effect  # the adapters really change the output
    off = float((merged - hooked).abs().max())
    assert off <= 2e-4 * max(effect, 1.0), (off, effect)


@pytest.mark.parametrize("alpha", [None, "1"], ids=["alpha=dim", "alpha=1"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_merge_equals_forward(case, alpha, batch, base):
    _, algo, args = case
    unet = fresh_unet()
    network = _network(unet, algo, dict(args, **({"alpha": alpha} if alpha else {})))
    expected = {"lora": "lora", "loha": "loha", "lokr": "lokr"}[algo]
    assert {module_algo(m) for m in network.loras} == {expected}
    hooked, merged = _forward_then_merge(network, unet, batch)
    _check(hooked, merged, base)
    # merged: nothing of the network runs any more (unhooked, or the change would count twice)
    network.set_multiplier(0.0)
    with torch.no_grad():
        assert torch.equal(unet(*batch), merged)


def test_lokr_cases_are_what_they_claim():
    low = _network(fresh_unet(), "lokr", {"factor": "2"})
    assert all("lokr_w2_a" in m.state_dict() for m in low.loras)
    full = _network(fresh_unet(), "lokr", {})
    assert all("lokr_w2" in m.state_dict() and "lokr_w1" in m.state_dict() for m in full.loras)


@pytest.mark.parametrize("algo,args", [("lora", {}), ("lora", {"use_tucker": "true"}), ("loha", {}), ("lokr", {"factor": "2"})],
                         ids=["locon", "locon-tucker", "loha-conv", "lokr-conv"])
def test_conv_layers_merge_exactly(algo, args, tmp_path, batch, base):
    preset = tmp_path / "conv.toml"
    preset.write_text(CONV_PRESET)
    unet = fresh_unet()
    network = _network(unet, algo, dict(args, alpha="2", conv_dim="4", conv_alpha="2"), preset=str(preset))
    convs = [m for m in network.loras if m.org_module[0].weight.dim() == 4]
    assert len(convs) == 3 and {tuple(m.org_module[0].weight.shape[2:]) for m in convs} == {(3, 3), (1, 1)}
    if args.get("use_tucker"):
        assert any("lora_mid.weight" in m.state_dict() for m in convs)
    hooked, merged = _forward_then_merge(network, unet, batch)
    _check(hooked, merged, base)


@pytest.mark.parametrize("algo,args", [("lora", {}), ("loha", {}), ("lokr", {"factor": "2"})])
def test_per_block_alphas_merge_exactly(algo, args, batch, base):
    unet = fresh_unet()
    network = _network(unet, algo, dict(args, content_alpha="1", style_dim="2", style_alpha="8"), preset="content_style")
    summary = network.block_summary()
    assert (summary["content"]["alpha"], summary["style"]["rank"], summary["style"]["alpha"]) == (1.0, 2, 8.0)
    hooked, merged = _forward_then_merge(network, unet, batch)
    _check(hooked, merged, base)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES[:7], ids=[c[0] for c in CASES[:7]])
def test_base_weights_and_network_merge_from_a_file(case, tmp_path, batch, base):
    """sd-scripts' path: a saved file, create_network_from_weights(for_inference=True), merge_to,
    against the same file hooked in with the image scripts' two-argument apply_to."""
    _, algo, args = case
    path = tmp_path / f"{algo}.safetensors"
    trained = _network(fresh_unet(), algo, dict(args, alpha="1"))
    trained.save_weights(str(path), torch.float32, {})
    merged_unet, hooked_unet = fresh_unet(), fresh_unet()
    net1, sd1 = blora_network.create_network_from_weights(0.6, str(path), None, None, merged_unet, for_inference=True)
    net1.merge_to(None, merged_unet, sd1, torch.float32, "cpu")
    net2, sd2 = blora_network.create_network_from_weights(0.6, str(path), None, None, hooked_unet, for_inference=True)
    net2.apply_to(None, hooked_unet)
    net2.load_state_dict(sd2, False)
    with torch.no_grad():
        merged, hooked = merged_unet(*batch), hooked_unet(*batch)
    _check(hooked, merged, base)


def test_merge_keeps_the_layer_dtype_and_skips_modules_not_in_the_file(tmp_path, batch):
    unet = fresh_unet()
    trained = _network(unet, "loha", {"alpha": "1"}, preset="content_style")
    path = tmp_path / "cs.safetensors"
    trained.save_weights(str(path), torch.bfloat16, {})
    target = fresh_unet().to(torch.bfloat16)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    network, sd = blora_network.create_network_from_weights(1.0, str(path), None, None, target, for_inference=True)
    content_only = {k: v for k, v in sd.items() if "output_blocks_0_1_" in k}
    network.merge_to(None, target, content_only, torch.bfloat16, "cpu")
    after = target.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("output_blocks.0.1.") for k in changed)
    assert all(v.dtype == torch.bfloat16 for v in after.values())


def test_merged_weight_honours_multiplier_linearly_and_dora_through_its_epilogue():
    plain = _network(fresh_unet(), "loha", {"alpha": "1"})
    lora = plain.loras[0]
    w = lora.org_module[0].weight.detach().float()
    d1 = merged_weight(lora, 1.0) - w
    assert torch.allclose(merged_weight(lora, 0.25) - w, d1 * 0.25, atol=1e-6)
    assert torch.equal(merged_weight(lora, 0.0), w)
    dora = _network(fresh_unet(), "lora", {"dora_wd": "true"}).loras[0]
    w = dora.org_module[0].weight.detach().float()
    half = merged_weight(dora, 0.5)
    # DoRA renormalizes W + dW per output row: not a linear function of the multiplier
    assert not torch.allclose(half - w, (merged_weight(dora, 1.0) - w) * 0.5, atol=1e-5)


def test_weight_backup_restores_exactly():
    network = _network(fresh_unet(), "lokr", {"factor": "2", "alpha": "1"})
    before = {id(m): m.org_module[0].weight.detach().clone() for m in network.loras}
    backup = WeightBackup()
    assert backup.backup(network.loras) == len(network.loras)
    backup.precalculate(network.loras)
    assert backup.baked and any(not torch.equal(m.org_module[0].weight, before[id(m)]) for m in network.loras)
    assert backup.restore() == len(network.loras) and not backup.baked
    assert all(torch.equal(m.org_module[0].weight, before[id(m)]) for m in network.loras)
    with pytest.raises(RuntimeError, match="backup_weights"):
        WeightBackup().precalculate(network.loras)


def test_old_lycoris_lokr_bypass_is_guarded(tmp_path, batch, base):
    """lycoris-lora 3.x's LoKr bypass forward leaves out alpha/dim: training refuses it, a rebuilt
    inference network runs those modules in rebuild mode (right); 4.x needs neither."""
    make = lambda: blora_network.create_network(1.0, 4, 1, None, None, fresh_unet(), preset="content",  # noqa: E731
                                                algo="lokr", factor="2", alpha="1")
    if not lokr_bypass_leaves_out_scale():
        assert all(m.bypass_mode for m in make().loras)
        return
    with pytest.raises(NetworkArgsError, match="lycoris-lora>=4.0"):
        make()
    trained = _network(fresh_unet(), "lokr", {"factor": "2", "alpha": "1"})
    path = tmp_path / "lokr.safetensors"
    trained.save_weights(str(path), torch.float32, {})
    network, _ = blora_network.create_network_from_weights(1.0, str(path), None, None, fresh_unet(), for_inference=True)
    assert not any(m.bypass_mode for m in network.loras)
