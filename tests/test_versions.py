"""sd-scripts' call conventions, old and new, and transformers' CLIP attention class names.

The code blocks below are sd-scripts' own calling code (train_network.py of main / v0.10,
v0.9.1 and v0.8.7), paraphrased line for line, so the network is driven exactly the way each
version drives it. test_contract.py covers the common sequence; this file covers what differs.
"""

from __future__ import annotations

import argparse
import textwrap

import pytest
import torch

import blora_network
from blora_network.errors import NetworkArgsError, PresetError
from blora_network.network.kohya import TEXT_ENCODER_ATTENTION_CLASSES
from blora_network.sdxl.unet import TINY, build_unet

pytestmark = pytest.mark.usefixtures("one_thread")



# --- network creation: how each version turns --network_args into kwargs ------------------------


def sd_scripts_create(args: argparse.Namespace, unet, text_encoder=None, *, split_every_eq: bool):
    """train_network.py's network creation block (main splits on the first '=', v0.8.7/v0.9 on every '=')."""
    net_kwargs = {}
    for net_arg in args.network_args or []:
        if split_every_eq:
            key, value = net_arg.split("=")
        else:
            key, value = net_arg.split("=", 1)
        net_kwargs[key] = value
    if "dropout" not in net_kwargs:
        net_kwargs["dropout"] = args.network_dropout  # "workaround for LyCORIS": a float or None
    return blora_network.create_network(
        1.0, args.network_dim, args.network_alpha, None, text_encoder, unet, neuron_dropout=args.network_dropout, **net_kwargs
    )


def _ns(network_args, network_dropout=None, network_dim=8, network_alpha=1.0):
    return argparse.Namespace(network_args=network_args, network_dropout=network_dropout, network_dim=network_dim, network_alpha=network_alpha)


def _layout(network):
    return sorted((m.lora_name, m.lora_dim, float(m.alpha)) for m in network.unet_loras)


def test_old_and_new_network_args_splitting_build_the_same_network():
    args = ["preset=content_style", "content_dim=4", "style_lr=5e-5", "bypass_mode=auto", "train_text_encoder=false"]
    new = sd_scripts_create(_ns(args), build_unet(TINY), split_every_eq=False)
    old = sd_scripts_create(_ns(args), build_unet(TINY), split_every_eq=True)
    assert _layout(new) == _layout(old)
    assert {m.lora_dim for m in new.unet_loras} == {4, 8}
    assert new.options.block_lrs == old.options.block_lrs == {"style": 5e-5}


def test_value_with_equals_sign_works_on_main(tmp_path):
    """A preset path holding '=' reaches us whole on main; old versions fail in their own split."""
    folder = tmp_path / "run=1"
    folder.mkdir()
    preset = folder / "mine.toml"
    preset.write_text("unet_target_module = []\nunet_target_name = ['^(?!.*(ff\\.net|proj)).*output_blocks\\.1\\.1\\..*$']\n")
    network = sd_scripts_create(_ns([f"preset={preset}"]), build_unet(TINY), split_every_eq=False)
    assert network.preset.source == str(preset) and len(network.unet_loras) == 80
    with pytest.raises(ValueError, match="too many values to unpack"):  # sd-scripts v0.9's own line, not ours
        sd_scripts_create(_ns([f"preset={preset}"]), build_unet(TINY), split_every_eq=True)


@pytest.mark.parametrize(
    "network_args, network_dropout, expected",
    [
        ([], None, 0.0),  # dropout=None injected: no dropout
        ([], 0.1, 0.1),  # --network_dropout 0.1: a float, not a string
        (["dropout=0.2"], 0.1, 0.2),  # network_args win over --network_dropout
    ],
)
def test_injected_dropout(network_args, network_dropout, expected):
    network = sd_scripts_create(_ns(["preset=content", *network_args], network_dropout), build_unet(TINY), split_every_eq=False)
    probs = {m.dropout.p if isinstance(m.dropout, torch.nn.Dropout) else 0.0 for m in network.unet_loras}
    assert probs == {expected}


# --- optimizer groups: the three versions' calling blocks ----------------------------------------

MAIN_BLOCK = """
def prepare(network, args):
    calls.append("first")
    support_multiple_lrs = hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs")
    if support_multiple_lrs:
        text_encoder_lr = args.text_encoder_lr
    else:
        if args.text_encoder_lr is None or isinstance(args.text_encoder_lr, (float, int)):
            text_encoder_lr = args.text_encoder_lr
        else:
            text_encoder_lr = None if len(args.text_encoder_lr) == 0 else args.text_encoder_lr[0]
    try:
        if support_multiple_lrs:
            results = network.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, args.unet_lr, args.learning_rate)
        else:
            results = network.prepare_optimizer_params(text_encoder_lr, args.unet_lr, args.learning_rate)
        if type(results) is tuple:
            trainable_params = results[0]
            lr_descriptions = results[1]
        else:
            trainable_params = results
            lr_descriptions = None
    except TypeError as e:
        calls.append("fallback")
        trainable_params = network.prepare_optimizer_params(text_encoder_lr, args.unet_lr)
        lr_descriptions = None
    return trainable_params, lr_descriptions
"""

V091_BLOCK = """
def prepare(network, args):
    calls.append("first")
    try:
        results = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
        if type(results) is tuple:
            trainable_params = results[0]
            lr_descriptions = results[1]
        else:
            trainable_params = results
            lr_descriptions = None
    except TypeError as e:
        calls.append("fallback")
        trainable_params = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr)
        lr_descriptions = None
    return trainable_params, lr_descriptions
"""

V087_BLOCK = """
def prepare(network, args):
    calls.append("first")
    try:
        trainable_params = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    except TypeError:
        calls.append("fallback")
        trainable_params = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr)
    return trainable_params, None
"""

BLOCKS = {"main": MAIN_BLOCK, "v0.9.1": V091_BLOCK, "v0.8.7": V087_BLOCK}


def sd_scripts_prepare(version: str, tmp_path, network, calls=None, **lrs):
    """Run a version's block from a file named train_network.py, as the trainer does."""
    path = tmp_path / version / "train_network.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(BLOCKS[version]))
    scope = {"calls": [] if calls is None else calls}
    exec(compile(path.read_text(), str(path), "exec"), scope)
    args = argparse.Namespace(**{"text_encoder_lr": None, "unet_lr": None, "learning_rate": 1e-4, **lrs})
    groups, descriptions = scope["prepare"](network, args)
    return groups, descriptions, scope["calls"]


@pytest.fixture
def te_network(text_encoders):
    unet = build_unet(TINY, seed=0)
    network = blora_network.create_network(1.0, 4, 1, None, text_encoders, unet, preset="content", train_text_encoder="true")
    network.apply_to(text_encoders, unet, True, True)
    return network


@pytest.mark.parametrize(
    "version, te_lr, expected",
    [
        ("main", None, (1e-4, 1e-4)),  # --text_encoder_lr not given: learning_rate
        ("main", [], (1e-4, 1e-4)),  # --text_encoder_lr with no value (nargs="*")
        ("main", [1e-5], (1e-5, 1e-5)),  # one value: both encoders
        ("main", [1e-5, 2e-5], (1e-5, 2e-5)),  # one per encoder
        ("main", 3e-5, (3e-5, 3e-5)),  # a float from an old --config_file TOML
        ("v0.9.1", None, (1e-4, 1e-4)),
        ("v0.9.1", 3e-5, (3e-5, 3e-5)),
        ("v0.8.7", 3e-5, (3e-5, 3e-5)),
    ],
)
def test_text_encoder_lr_conventions(te_network, tmp_path, version, te_lr, expected):
    groups, descriptions, calls = sd_scripts_prepare(version, tmp_path, te_network, text_encoder_lr=te_lr, unet_lr=2e-4)
    assert calls == ["first"]  # never the two-argument fallback
    assert isinstance(groups, list) and all(isinstance(g, dict) for g in groups)
    lrs = [g["lr"] for g in groups]
    assert lrs == [expected[0], expected[1], 2e-4]
    if version == "v0.8.7":
        assert descriptions is None  # it only understands a list of groups
    else:
        assert descriptions == ["textencoder 1", "textencoder 2", "unet content"]
    torch.optim.AdamW(groups)  # the optimizer accepts them


@pytest.mark.parametrize("version", sorted(BLOCKS))
def test_type_error_inside_surfaces_instead_of_a_wrong_retry(tmp_path, monkeypatch, version):
    """sd-scripts catches TypeError and calls again with two arguments: a real error must not be a TypeError."""
    unet = build_unet(TINY, seed=0)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content")
    network.apply_to(None, unet, False, True)

    def broken():
        raise TypeError("unsupported operand type(s) for *: 'NoneType' and 'float'")

    monkeypatch.setattr(network, "modules_by_role", broken)
    calls = []
    with pytest.raises(NetworkArgsError, match="cannot build optimizer groups: unsupported operand") as err:
        sd_scripts_prepare(version, tmp_path, network, calls, unet_lr=1e-4)
    assert not isinstance(err.value, TypeError)
    assert calls == ["first"]  # the two-argument retry never happened


def test_non_numeric_text_encoder_lr_in_list_surfaces(te_network, tmp_path):
    with pytest.raises(NetworkArgsError, match="cannot build optimizer groups"):
        sd_scripts_prepare("main", tmp_path, te_network, text_encoder_lr=[None], unet_lr=1e-4)


# --- per-epoch and per-step hooks -----------------------------------------------------------------


def test_on_epoch_start_two_positional_args_sets_train_mode():
    unet = build_unet(TINY, seed=0)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content")
    network.apply_to(None, unet, False, True)
    network.eval()  # as after a validation pass
    assert not network.training
    network.on_epoch_start(None, unet)  # v0.8.7 to main: two positional arguments
    assert network.training and all(m.training for m in network.unet_loras)
    network.on_step_start(None, unet)


def _train_steps(set_every_step: bool, batch, steps=3):
    unet = build_unet(TINY, seed=0)
    torch.manual_seed(1)
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, preset="content")
    network.apply_to(None, unet, False, True)
    unet.requires_grad_(False)
    groups, _ = network.prepare_optimizer_params(None, 1e-2, 1e-2)
    opt = torch.optim.AdamW(groups)
    network.on_epoch_start(None, unet)
    x, t, c, y = batch
    for _ in range(steps):
        if set_every_step:  # v0.8.7/v0.9: set_multiplier(batch["network_multipliers"][0].item()) each step
            network.set_multiplier(torch.tensor([1.0, 1.0])[0].item())
        unet(x, t, c, y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return network, unet


def test_set_multiplier_every_step_changes_nothing_at_one(batch):
    a, _ = _train_steps(False, batch)
    b, unet = _train_steps(True, batch)
    state = b.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in a.state_dict().items())
    x, t, c, y = batch
    with torch.no_grad():  # and a per-step multiplier really acts: 0 is the base model, 0.5 in between
        outs = []
        for m in (0.0, 0.5, 1.0):
            b.set_multiplier(m)
            outs.append(unet(x, t, c, y))
    base, half, full = outs
    assert 0 < float((half - base).norm()) < float((full - base).norm())


# --- transformers' CLIP attention class names --------------------------------------------------


def _rename_attention(text_encoders, class_name: str):
    """Give every CLIP attention module the class name another transformers version uses."""
    from transformers.models.clip.modeling_clip import CLIPAttention

    renamed = type(class_name, (CLIPAttention,), {})
    count = 0
    for te in text_encoders:
        for module in te.modules():
            if type(module) is CLIPAttention:
                module.__class__ = renamed
                count += 1
    assert count == 2 * text_encoders[0].config.num_hidden_layers
    return text_encoders


@pytest.mark.parametrize("class_name", ["CLIPAttention", "CLIPSdpaAttention"])
def test_text_encoder_training_matches_both_clip_attention_names(text_encoders, class_name):
    """transformers >= 4.48 (sd-scripts main): CLIPAttention; 4.44 (sd-scripts v0.9): CLIPSdpaAttention."""
    assert class_name in TEXT_ENCODER_ATTENTION_CLASSES
    tes = _rename_attention(text_encoders, class_name)
    assert {type(m).__name__ for te in tes for m in te.modules()} >= {class_name}
    unet = build_unet(TINY, seed=0)
    network = blora_network.create_network(1.0, 4, 1, None, tes, unet, preset="content", train_text_encoder="true")
    layers = tes[0].config.num_hidden_layers
    names = [m.lora_name for m in network.text_encoder_loras]
    assert len(names) == 2 * layers * 4
    assert sum(n.startswith("lora_te1_") for n in names) == sum(n.startswith("lora_te2_") for n in names) == layers * 4
    network.apply_to(tes, unet, True, True)
    tokens = torch.randint(0, 1000, (1, 8))
    out = tes[0](tokens).last_hidden_state
    out.pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for m in network.text_encoder_loras for p in m.parameters())


def test_text_encoder_training_with_unknown_attention_class_is_an_error(text_encoders):
    """A future or exotic attention class must not silently train the UNet only."""
    tes = _rename_attention(text_encoders, "CLIPFancyNewAttention")
    with pytest.raises(PresetError) as err:
        blora_network.create_network(1.0, 4, 1, None, tes, build_unet(TINY), preset="content", train_text_encoder="true")
    message = str(err.value)
    assert "train_text_encoder" in message and "CLIPFancyNewAttention" in message


# --- lycoris-lora versions --------------------------------------------------------------------------


def test_exclude_name_works_or_is_refused_by_lycoris_version(tmp_path):
    """exclude_name acts from lycoris-lora 4.1 (is_excluded); 3.x and 4.0 accept and ignore it, so
    there a preset using it is refused instead of silently training the excluded layers."""
    from lycoris.kohya import LycorisNetworkKohya

    path = tmp_path / "self_attention.toml"
    path.write_text(
        "unet_target_module = []\n"
        "unet_target_name = ['^(?!.*(ff\\.net|proj)).*output_blocks\\.0\\.1\\..*$']\n"
        "exclude_name = ['.*attn2.*']\n"
    )
    if hasattr(LycorisNetworkKohya, "is_excluded"):
        network = blora_network.create_network(1.0, 4, 1, None, None, build_unet(TINY), preset=str(path))
        names = [m.lora_name for m in network.unet_loras]
        assert len(names) == 40 and not any("attn2" in n for n in names)
    else:
        with pytest.raises(PresetError, match=r"exclude_name, which needs lycoris-lora>=4.1"):
            blora_network.create_network(1.0, 4, 1, None, None, build_unet(TINY), preset=str(path))


def test_installed_lycoris_is_in_the_declared_range():
    """setup.cfg's lycoris-lora range is what CI tests: the newest release here, the oldest in
    .ci/lycoris_compat.sh. A version outside it means the range or the environment is stale."""
    import configparser
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    requirements = [Requirement(line) for line in cfg["options"]["install_requires"].split("\n") if line.strip()]
    lycoris = next(r for r in requirements if r.name == "lycoris-lora")
    assert lycoris.specifier.contains(version("lycoris-lora"))
    assert not lycoris.specifier.contains("3.2.0")  # breaks sd-scripts' on_epoch_start (LyCORIS #249)
    assert lycoris.specifier.contains("3.2.0.post2") and lycoris.specifier.contains("3.4.0")
