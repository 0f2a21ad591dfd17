"""One alpha per file (issue 14): every file we write loads exactly in diffusers, and resumes exactly.

diffusers' kohya loader (0.32 on) turns per-layer alphas into PEFT ``alpha_pattern`` keys that
keep the old ``...processor.to_k_lora.down.weight`` spelling and match no module, so every layer
gets the file's most common alpha. Our writers store one alpha per file instead, each layer's
``lora_up`` carrying its own alpha / that alpha (:func:`blora_network.files.algos.one_alpha`): the same
change dW = (alpha / rank) * up @ down for every client.

The diffusers checks go through ``StableDiffusionXLPipeline.load_lora_weights``, the call a user
makes (``lora_state_dict``'s kohya conversion, then ``load_lora_into_unet`` and PEFT's
``LoraConfig`` with ``rank_pattern``/``alpha_pattern``), into a diffusers ``UNet2DConditionModel``
with SDXL's block layout at the stand-in UNet's TINY widths.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import blora_network
from blora_network.tools import transforms
from blora_network.files.algos import delta_weight, kohya_layers, one_alpha, rank_and_alpha, restate_alpha
from blora_network.sdxl.blocks import role_of_kohya_name
from blora_network.files.algos import LayerRecord, network_dim_alpha
from blora_network.files.safefile import load_tensors, read_metadata
from blora_network.sdxl.names import diffusers_path_of_kohya_name
from blora_network.sdxl.unet import TINY, build_unet, random_inputs
from lora_factories import blora_metadata_like_training, kohya_name, layers_of, lora_tensors, lycoris_module, lycoris_state

ATTN = [m for m in layers_of(TINY, roles=["content", "style", "layout"], attention_only=True)
        if ".transformer_blocks.0." in m.name or ".transformer_blocks.1." in m.name]
"""Two of each block's ten transformer blocks (16 layers a block): PEFT's injection is most of a load's time."""
BLOCK_RANK_ALPHA = {"content": (8, 8.0), "style": (4, 4.0), "layout": (2, 0.5)}
"""What an earlier combine wrote: content rank 8 / alpha 8, style rank 4 / alpha 4, layout alpha != rank."""


def role_of(layer) -> str:
    return role_of_kohya_name(kohya_name(layer.name))


def write_blocks(path, blocks: dict[str, tuple[int, float]], *, seed=0, dtype=torch.float32) -> Path:
    """A kohya file of the TINY attention layers of ``blocks``, each block its own rank and alpha."""
    layers = [m for m in ATTN if role_of(m) in blocks]
    ranks = {m.name: blocks[role_of(m)][0] for m in layers}
    sd = {}
    for name, t in lora_tensors(layers, 1, seed=seed, dtype=dtype, ranks=ranks).items():
        k = kohya_name(name)
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = t["down"], t["up"]
        sd[f"{k}.alpha"] = torch.tensor(blocks[role_of_kohya_name(k)][1], dtype=dtype)
    save_file(sd, str(path), metadata=blora_metadata_like_training(8, 8.0))
    return Path(path)


def file_dw(path) -> dict[str, torch.Tensor]:
    """diffusers module path -> the file's change in float64: (alpha / rank) up @ down (kohya), up @ down (diffusers)."""
    out = {}
    for name, t in kohya_layers(load_file(str(path))).items():
        if "lora_down.weight" in t:
            down, up = t["lora_down.weight"].double(), t["lora_up.weight"].double()
            alpha = float(t["alpha"]) if "alpha" in t else down.shape[0]
            out[diffusers_path_of_kohya_name(name)[len("unet."):]] = (alpha / down.shape[0]) * up @ down
        elif name == "unet":  # diffusers spelling: unet.<path>.lora.down.weight, no alpha
            for key in t:
                if key.endswith(".lora.down.weight"):
                    path_ = key[: -len(".lora.down.weight")]
                    out[path_] = t[f"{path_}.lora.up.weight"].double() @ t[key].double()
    return out


def intended_dw(sources: dict[str, Path], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """The change each block should have: its source file's, times its weight."""
    out = {}
    for role, path in sources.items():
        for name, dw in file_dw(path).items():
            if _role_of_diffusers(name) == role:
                out[name] = weights.get(role, 1.0) * dw
    return out


def _role_of_diffusers(path: str):
    from blora_network.sdxl.blocks import BLOCKS

    return next((b.role for b in BLOCKS if path.startswith(b.diffusers + ".")), None)


def assert_same_dw(got: dict, want: dict, rtol=1e-6):
    assert set(got) == set(want)
    for k in want:
        assert float((got[k] - want[k]).abs().max()) <= rtol * float(want[k].abs().max()) + 1e-12, k


@pytest.fixture(scope="module")
def diffusers_unet():
    """A diffusers SDXL-layout UNet whose linear layers have the stand-in TINY UNet's shapes."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=TINY.context_dim, attention_head_dim=(2, 4, 8), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=56,
    )


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


UNMATCHED = ("did not match", "alpha_pattern", "rank_pattern", "unexpected key", "unexpected_keys", "missing key",
             "missing_keys", "not correctly renamed")
"""What the loader says when a key of the file matched no module (the text-encoder note is not one)."""


def assert_loads_exactly_in_diffusers(path, template) -> int:
    """``load_lora_weights`` applies the file's own (alpha / rank) up @ down to every layer, forward and fused."""
    import diffusers
    from peft.tuners.lora import LoraLayer

    want = file_dw(path)
    unet = copy.deepcopy(template)
    base = {n: unet.get_submodule(n).weight.detach().clone() for n in want}
    pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=diffusers.EulerDiscreteScheduler())
    logs = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(logs)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), adapter_name="blora")
    finally:
        for lg in loggers:
            lg.removeHandler(logs)
    said = [str(w.message) for w in caught] + logs.messages
    assert not [m for m in said if any(s in m for s in UNMATCHED)], said
    adapted = {n for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == set(want)
    g = torch.Generator().manual_seed(7)
    for name, dw in want.items():
        mod = unet.get_submodule(name)
        x = torch.randn(3, mod.in_features, generator=g)
        with torch.no_grad():
            got = (mod(x) - mod.base_layer(x)).double()
        ref = x.double() @ dw.T
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), f"{path}: {name} (forward)"
    pipe.fuse_lora()
    for name, dw in want.items():
        got = unet.get_submodule(name).base_layer.weight.detach().double() - base[name].double()
        assert float((got - dw).abs().max()) <= 1e-5 * float(dw.abs().max()), f"{path}: {name} (fused)"
    return len(adapted)


# -- the rule ------------------------------------------------------------------------------------

def _layer_dict(tensors, name):
    return {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_one_alpha_keeps_every_layer_change_and_leaves_lycoris_layers(dtype):
    """Mixed ranks and alphas (no alpha, alpha 0, alpha != rank, DoRA, conv) come back with one alpha, same dW."""
    lay = layers_of(TINY, roles=["content"], attention_only=True)[:6]
    ranks = {lay[0].name: 8, lay[1].name: 4, lay[2].name: 4, lay[3].name: 8, lay[4].name: 2, lay[5].name: 8}
    alphas = {lay[0].name: 8.0, lay[1].name: 4.0, lay[2].name: 3.0, lay[3].name: None, lay[4].name: 0.0, lay[5].name: 2.0}
    state = {}
    for name, t in lora_tensors(lay, 1, seed=3, ranks=ranks).items():
        k = kohya_name(name)
        state[f"{k}.lora_down.weight"], state[f"{k}.lora_up.weight"] = t["down"].to(dtype), t["up"].to(dtype)
        if alphas[name] is not None:
            state[f"{k}.alpha"] = torch.tensor(alphas[name], dtype=torch.float32 if dtype.itemsize == 1 else dtype)
    dora = kohya_name(lay[5].name)
    state[f"{dora}.dora_scale"] = torch.rand(1, lay[5].in_features).to(dtype)
    conv = "lora_unet_input_blocks_4_0_in_layers_2"
    state[f"{conv}.lora_down.weight"] = torch.randn(2, 16, 3, 3).to(dtype)
    state[f"{conv}.lora_up.weight"] = torch.randn(32, 2, 1, 1).to(dtype)
    state[f"{conv}.alpha"] = torch.tensor(1.0).to(state[f"{kohya_name(lay[0].name)}.alpha"].dtype)
    loha = lycoris_module("loha", layers_of(TINY, roles=["style"], attention_only=True)[0], 4, 1.0, seed=2)
    state.update({k: v.to(dtype) for k, v in lycoris_state(loha).items()})
    out = one_alpha(state)
    names = {k.split(".", 1)[0] for k in state}
    stored = {rank_and_alpha("lora", _layer_dict(out, n))[1] for n in names - {loha.lora_name}}
    assert stored == {8.0}  # the largest rank's largest alpha (network_dim_alpha's rule)
    assert f"{kohya_name(lay[3].name)}.alpha" not in out  # implied alpha 8 already: nothing added
    assert network_dim_alpha([LayerRecord(None, 8, 8.0), LayerRecord(None, 8, 2.0), LayerRecord(None, 4, 4.0)]) == (8, 8.0)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float8_e4m3fn: 2 ** -3}[dtype]
    for n in names - {loha.lora_name}:
        before, after = _layer_dict(state, n), _layer_dict(out, n)
        assert after["lora_up.weight"].dtype == dtype and after["lora_down.weight"] is before["lora_down.weight"]
        want = delta_weight("lora", before)
        err = float((delta_weight("lora", after) - want).abs().max() / want.abs().max())
        assert err <= tol, (n, err)
    assert out[f"{kohya_name(lay[0].name)}.lora_up.weight"] is state[f"{kohya_name(lay[0].name)}.lora_up.weight"]
    assert all(out[k] is v for k, v in state.items() if k.startswith(loha.lora_name + "."))
    assert f"{dora}.dora_scale" in out and out[f"{dora}.dora_scale"] is state[f"{dora}.dora_scale"]


def test_one_alpha_leaves_a_file_with_one_alpha_alone():
    """Ranks may differ; one alpha already: the very same tensors (no gratuitous rescaling, nor a missing alpha added)."""
    lay = layers_of(TINY, roles=["content"], attention_only=True)[:3]
    state = {}
    for i, (name, t) in enumerate(lora_tensors(lay, 1, seed=1, ranks={lay[0].name: 8, lay[1].name: 4, lay[2].name: 2}).items()):
        k = kohya_name(name)
        state[f"{k}.lora_down.weight"], state[f"{k}.lora_up.weight"] = t["down"], t["up"]
        if i < 2:
            state[f"{k}.alpha"] = torch.tensor(2.0)
    out = one_alpha(state)  # the third layer's implied alpha is its rank, 2: the same alpha
    assert out.keys() == state.keys() and all(out[k] is v for k, v in state.items())
    k = kohya_name(lay[2].name)
    state[f"{k}.alpha"] = torch.tensor(0.0)  # alpha = rank to sd-scripts and LyCORIS, scale 0 to ComfyUI and diffusers
    out = one_alpha(state)
    assert float(out[f"{k}.alpha"]) == 2.0 and torch.equal(out[f"{k}.lora_up.weight"], state[f"{k}.lora_up.weight"])
    assert all(out[n] is v for n, v in state.items() if not n.startswith(k + "."))


def test_alphas_compare_as_they_will_be_stored():
    """A training save in bf16: alphas equal once cast are one alpha already, and factors are rounded once."""
    lay = layers_of(TINY, roles=["content"], attention_only=True)[:2]
    state = {}
    for name, t in lora_tensors(lay, 4, seed=2).items():
        k = kohya_name(name)
        state[f"{k}.lora_down.weight"], state[f"{k}.lora_up.weight"] = t["down"], t["up"]
        state[f"{k}.alpha"] = torch.tensor(0.3)
    state[f"{kohya_name(lay[1].name)}.alpha"] = torch.tensor(0.3 + 1e-6)  # the same value in bf16
    assert one_alpha(state, dtype=torch.bfloat16).keys() == state.keys()
    assert all(one_alpha(state, dtype=torch.bfloat16)[k] is v for k, v in state.items())
    state[f"{kohya_name(lay[1].name)}.alpha"] = torch.tensor(3.0)
    out = one_alpha(state, dtype=torch.bfloat16)
    k0, k1 = kohya_name(lay[0].name), kohya_name(lay[1].name)
    assert out[f"{k1}.lora_up.weight"] is state[f"{k1}.lora_up.weight"]  # alpha 3 is the largest: it stays
    assert out[f"{k0}.alpha"].dtype == torch.bfloat16 and float(out[f"{k0}.alpha"]) == 3.0
    stored = float(torch.tensor(0.3).to(torch.bfloat16))  # what the save would have stored: 0.30078125
    want = (state[f"{k0}.lora_up.weight"].double() * (stored / 3.0)).to(torch.bfloat16)
    assert torch.equal(out[f"{k0}.lora_up.weight"], want)  # one rounding, from the fp32 factor


def test_restate_alpha_refuses_a_zero_or_infinite_alpha():
    t = {"lora_down.weight": torch.randn(4, 8), "lora_up.weight": torch.randn(8, 4), "alpha": torch.tensor(4.0)}
    with pytest.raises(blora_network.errors.LoraFileError, match="alpha inf"):
        restate_alpha(t, torch.tensor(float("inf")))
    assert restate_alpha(t, torch.tensor(4.0)) is t


# -- every writer, through diffusers ------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three trainings (one per block, each its own rank and alpha) and the mixed file an earlier combine made of them."""
    d = tmp_path_factory.mktemp("sources")
    per_role = {role: write_blocks(d / f"{role}.safetensors", {r: ra for r in BLOCK_RANK_ALPHA}, seed=i)
                for i, (role, ra) in enumerate(BLOCK_RANK_ALPHA.items())}
    # the file a pre-issue-14 combine of those wrote: each block's tensors and alpha as they were
    mixed = {}
    for role, path in per_role.items():
        mixed.update({k: v for k, v in load_file(str(path)).items() if role_of_kohya_name(k) == role})
    save_file(mixed, str(d / "mixed.safetensors"), metadata=blora_metadata_like_training(8, 8.0))
    return {"per_role": per_role, "mixed": d / "mixed.safetensors"}


def _writes(case, tmp_path, sources):
    """(file written, the change each of its blocks should have) for one writer."""
    mixed, per_role = sources["mixed"], sources["per_role"]
    all_mixed = {r: mixed for r in BLOCK_RANK_ALPHA}
    if case == "combine":
        w = {"content": 1.0, "style": 0.7, "layout": -1.5}
        out = tmp_path / "c.safetensors"
        transforms.combine([transforms.BlockSource(r, str(p), w[r]) for r, p in per_role.items()], out)
        return [(out, intended_dw(per_role, w))]
    if case == "scale":
        w = {"content": 0.5, "style": 2.0}
        transforms.scale(mixed, w, tmp_path / "s.safetensors")
        return [(tmp_path / "s.safetensors", intended_dw(all_mixed, w))]
    if case == "split":
        files = transforms.split(mixed, out_dir=tmp_path).files
        return [(Path(f.path), intended_dw({f.blocks[0]: mixed}, {})) for f in files]
    if case == "extract":
        transforms.extract(mixed, ["content", "style"], tmp_path / "e.safetensors")
        return [(tmp_path / "e.safetensors", intended_dw({"content": mixed, "style": mixed}, {}))]
    if case == "convert-to-diffusers":
        transforms.convert(mixed, tmp_path / "d.safetensors", to="diffusers")
        return [(tmp_path / "d.safetensors", intended_dw(all_mixed, {}))]
    if case == "convert-to-kohya":  # from diffusers names with mixed ranks: alpha = rank per layer
        transforms.convert(mixed, tmp_path / "d.safetensors", to="diffusers")
        transforms.convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", to="kohya")
        return [(tmp_path / "k.safetensors", intended_dw(all_mixed, {}))]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["combine", "scale", "split", "extract", "convert-to-kohya", "convert-to-diffusers"])
def test_every_tool_output_loads_exactly_in_diffusers(case, tmp_path, sources, diffusers_unet):
    for path, want in _writes(case, tmp_path, sources):
        assert_same_dw(file_dw(path), want)  # the tool kept every block's change...
        stored = {float(v) for k, v in load_file(str(path)).items() if k.endswith(".alpha")}
        assert len(stored) <= 1, stored  # ...in one alpha (none in the diffusers spelling)...
        meta = read_metadata(path)
        if stored:  # ...which the metadata names
            assert {float(a) for a in json.loads(meta["blora_block_alphas"]).values()} == stored
            assert float(meta["ss_network_alpha"]) in stored
        assert assert_loads_exactly_in_diffusers(path, diffusers_unet) == len(want)  # ...which diffusers applies


def test_the_old_mixed_file_is_what_diffusers_got_wrong(sources, diffusers_unet):
    """The check above can fail: the file an earlier combine wrote loads wrong (the issue's error)."""
    with pytest.raises(AssertionError):
        assert_loads_exactly_in_diffusers(sources["mixed"], diffusers_unet)


def _trained_network(unet, seed=5, **network_args):
    network = blora_network.create_network(1.0, 4, 1, None, None, unet, **network_args)
    network.apply_to(None, unet, False, True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained state: lora_up starts at zero
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return network


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_training_save_with_per_block_dims_loads_exactly_in_diffusers(dtype, tmp_path, diffusers_unet):
    """sd-scripts with content_dim=8 style_dim=2 (alpha follows each block's dim)."""
    network = _trained_network(build_unet(TINY, seed=0), preset="content_style", content_dim="8", style_dim="2")
    path = tmp_path / "trained.safetensors"
    network.save_weights(str(path), dtype, {"ss_network_dim": "4", "ss_network_alpha": "1"})
    saved = load_tensors(path)
    assert {float(v) for k, v in saved.items() if k.endswith(".alpha")} == {8.0}
    meta = read_metadata(path)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "8.0")
    assert json.loads(meta["blora_block_dims"]) == {"content": 8, "style": 2}
    assert json.loads(meta["blora_block_alphas"]) == {"content": 8.0, "style": 8.0}
    for m in network.unet_loras:  # the file holds the trained change of every module, as the save dtype holds it
        trained = {k: v.detach().to(dtype or v.dtype) for k, v in m.state_dict().items()}
        want = delta_weight("lora", trained, dtype=torch.float64)
        got = delta_weight("lora", _layer_dict(saved, m.lora_name), dtype=torch.float64)
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), m.lora_name
    assert assert_loads_exactly_in_diffusers(path, diffusers_unet) == 160


# -- resuming and rebuilding from a one-alpha file ----------------------------------------------

RESUME_ARGS = {"preset": "content_style_layout", "content_dim": "4", "style_dim": "16", "layout_alpha": "3"}
"""Alphas 4, 16 and 3 at ranks 4, 16 and 4: the file stores 16; content's and layout's lora_up are rescaled."""


def _detached(module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def _fresh(**kw):
    unet = build_unet(TINY, seed=0)
    return unet, blora_network.create_network(1.0, 4, 1, None, None, unet, **kw)


@pytest.mark.parametrize("when", ["before apply_to", "after apply_to"])
def test_resume_from_a_one_alpha_save_continues_the_trained_change(when, tmp_path):
    """--network_weights: LyCORIS keeps each module's scale from construction, so load_weights restates the file."""
    unet = build_unet(TINY, seed=0)
    network = _trained_network(unet, **RESUME_ARGS)
    x, t, ctx, y = random_inputs(TINY, batch=2, seed=1)
    with torch.no_grad():
        ref = unet(x, t, ctx, y)
    path = tmp_path / "resume.safetensors"
    network.save_weights(str(path), None, {})
    assert {float(v) for k, v in load_tensors(path).items() if k.endswith(".alpha")} == {16.0}
    unet2, again = _fresh(**RESUME_ARGS)
    if when == "before apply_to":
        again.load_weights(str(path))
        again.apply_to(None, unet2, False, True)
    else:
        again.apply_to(None, unet2, False, True)
        again.load_weights(str(path))
    with torch.no_grad():
        out = unet2(x, t, ctx, y)
    assert float((out - ref).norm() / ref.norm()) <= 1e-5  # layout's lora_up moved by an ulp (below)
    mine, theirs = network.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:  # power-of-two ratios (content 4/16) come back bit for bit; layout's 3/16 within an ulp
        if k.endswith(".alpha") or "layout" not in (role_of_kohya_name(k) or ""):
            assert torch.equal(mine[k], theirs[k]), k
        else:
            assert torch.allclose(mine[k], theirs[k], rtol=2 ** -23, atol=0), k


def test_rebuilt_from_the_file_the_network_makes_the_same_change(tmp_path):
    """create_network_from_weights (--dim_from_weights, inference): modules built from the file, the same dW."""
    network = _trained_network(build_unet(TINY, seed=0), **RESUME_ARGS)
    path = tmp_path / "resume.safetensors"
    network.save_weights(str(path), None, {})
    unet = build_unet(TINY, seed=0)
    rebuilt, _ = blora_network.create_network_from_weights(1.0, str(path), None, None, unet)
    by_name = {m.lora_name: m for m in network.unet_loras}
    assert {m.lora_name for m in rebuilt.unet_loras} == set(by_name)
    for m in rebuilt.unet_loras:
        want = delta_weight("lora", _detached(by_name[m.lora_name]), dtype=torch.float64)
        got = delta_weight("lora", _detached(m), dtype=torch.float64)
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), m.lora_name
        assert m.scale == pytest.approx(16.0 / m.lora_dim)


def test_a_file_with_one_alpha_is_written_as_before(tmp_path):
    """No gratuitous rescaling: a tool output and a training save with one alpha keep every tensor bit for bit."""
    src = write_blocks(tmp_path / "one.safetensors", {"content": (4, 2.0), "style": (8, 2.0)}, seed=4, dtype=torch.bfloat16)
    transforms.scale(src, {"content": 1.0}, tmp_path / "out.safetensors")
    a, b = load_file(str(src)), load_file(str(tmp_path / "out.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    network = _trained_network(build_unet(TINY, seed=0), preset="content_style")
    network.save_weights(str(tmp_path / "t.safetensors"), torch.bfloat16, {})
    saved = load_file(str(tmp_path / "t.safetensors"))
    state = {k: v.to(torch.bfloat16) for k, v in network.state_dict().items()}
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


def test_inspect_does_not_flag_the_one_alpha_of_a_mixed_rank_file(tmp_path, sources):
    """content rank 8 / alpha 8 + style rank 4 / alpha 4 stores alpha 8 for both: no 'alpha differs from rank'."""
    from blora_network.tools.inspection import inspect

    per_role = sources["per_role"]
    out = tmp_path / "cs.safetensors"
    transforms.combine([transforms.BlockSource("content", str(per_role["content"])),
                        transforms.BlockSource("style", str(per_role["style"]))], out)
    assert {float(v) for k, v in load_file(str(out)).items() if k.endswith(".alpha")} == {8.0}
    warned = inspect(out, norms=False).warnings
    assert not [w for w in warned if "differs from rank" in w] and any("mixed ranks" in w for w in warned)
    lone = tmp_path / "alpha1.safetensors"  # the largest rank's alpha still tells: alpha 1 at rank 8 is flagged
    write_blocks(lone, {"content": (8, 1.0), "style": (4, 1.0)})
    assert any("alpha 1 differs from rank 8 in content" in w for w in inspect(lone, norms=False).warnings)
