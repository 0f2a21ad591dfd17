"""Files the tools must name rather than misread, and words that must agree with their numbers.

Pickles renamed ``.safetensors``, Flux and SD3 LoRAs, factors that do not fit the SDXL layer their
name gives, alphas that are not one number, integer tensors: each refused in one line naming the
file and the key. Then the wording: ``1 tensor`` (not ``1 tensors``), weights as typed, and a chart
whose labels fit and whose axis stops at 100%.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from blora_network.cli.main import main as cli_main
from blora_network.errors import count
from blora_network.files.lorafile import guess_model, open_lora, open_sdxl_lora
from blora_network.files.metadata import cumulative_weights
from blora_network.sdxl.names import other_architecture, sdxl_linear_shape
from blora_network.sdxl.unet import FULL, TINY, linear_layers
from lora_factories import assert_one_line_cli_error, full_attention_layers, kohya_name, layers_of, write_kohya

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*argv) -> int:
    return cli_main([str(a) for a in argv])


# -- pickles under the wrong suffix ------------------------------------------------------------------------------


@pytest.mark.parametrize("how, words", [
    ("zip", "a torch.save file (a zip archive holding a pickle)"),
    ("legacy", "a Python pickle (protocol 2)"),
    ("pickle4", "a Python pickle (protocol 4)"),
])
def test_a_pickle_renamed_safetensors_is_named_a_pickle(tmp_path, capsys, how, words):
    path = tmp_path / "renamed.safetensors"
    state = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}
    if how == "zip":
        torch.save(state, path)
    elif how == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    code = cli("inspect", path)
    out, err = capsys.readouterr()
    assert_one_line_cli_error(code, out, err, str(path), words, "renamed .safetensors", command="inspect")
    assert "header says" not in err


# -- models that are not SDXL -----------------------------------------------------------------------------------


def _flux_kohya(path):
    """sd-scripts' networks/lora_flux.py names: lora_unet_ + the Flux module path with '_'."""
    sd = {}
    for name, width in (("double_blocks_0_img_attn_qkv", 3072), ("single_blocks_3_linear1", 3072)):
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.zeros(4, width)
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.zeros(width, 4)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(path))


def _flux_diffusers(path):
    sd = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
          "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}
    save_file(sd, str(path))


def _sd3_kohya(path):
    sd = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 1536),
          "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(4608, 4)}
    save_file(sd, str(path))


@pytest.mark.parametrize("make, model", [(_flux_kohya, "a Flux LoRA"), (_flux_diffusers, "a Flux LoRA"),
                                         (_sd3_kohya, "an SD3 LoRA")])
@pytest.mark.parametrize("command", ["inspect", "analyze", "split"])
def test_flux_and_sd3_loras_are_refused_by_name(tmp_path, capsys, make, model, command):
    path = tmp_path / "other.safetensors"
    make(path)
    code = cli(command, path)
    out, err = capsys.readouterr()
    assert_one_line_cli_error(code, out, err, str(path), model, "B-LoRA blocks exist only in SDXL", command=command)


def test_no_sdxl_layer_looks_like_another_architecture():
    assert not [layer.name for layer in linear_layers(FULL) if other_architecture(kohya_name(layer.name))]
    assert not [layer.name for layer in linear_layers(FULL) if other_architecture(layer.name)]


# -- tensors no trainer writes ----------------------------------------------------------------------------------


def test_sdxl_linear_shapes_match_the_real_model():
    """The header-only width rule agrees with every Linear of sd-scripts' SDXL UNet it covers."""
    covered = 0
    for layer in linear_layers(FULL):
        expected = sdxl_linear_shape(layer.name)
        if expected is not None:
            covered += 1
            assert expected == (layer.out_features, layer.in_features), layer
    assert covered == sum(1 for layer in linear_layers(FULL) if ".transformer_blocks." in layer.name or "proj_" in layer.name)


def _sdxl_file(tmp_path, **change):
    """An SDXL content+style file; ``change`` replaces tensors by key."""
    path = tmp_path / "bad.safetensors"
    layers = full_attention_layers(["content", "style"])
    write_kohya(path, layers, rank=2)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd.update(change)
    save_file(sd, str(path))
    return path


Q = "lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("change, words", [
    ({f"{Q}.lora_up.weight": torch.zeros(640, 2)},
     [f"{Q}.lora_up.weight has output width 640", "SDXL's output_blocks.1.1.transformer_blocks.0.attn1.to_q is 1280x1280"]),
    ({f"{Q}.lora_down.weight": torch.zeros(2, 1024)}, [f"{Q}.lora_down.weight has input width 1024"]),
    ({f"{Q}.alpha": torch.ones(2)}, [f"{Q}.alpha holds 2 numbers [2]; an alpha is one number"]),
    ({f"{Q}.lora_up.weight": torch.zeros(1280, 2, dtype=torch.int8)}, [f"{Q}.lora_up.weight is I8, an integer tensor"]),
    ({f"{Q}.lora_down.weight": torch.zeros(2, 1280, dtype=torch.int32)}, [f"{Q}.lora_down.weight is I32"]),
])
@pytest.mark.parametrize("command", ["inspect", "scale"])
def test_malformed_tensors_are_refused_naming_the_key(tmp_path, capsys, change, words, command):
    path = _sdxl_file(tmp_path, **change)
    argv = [command, path] + (["--style", "0.5", "-o", tmp_path / "o.safetensors"] if command == "scale" else [])
    code = cli(*argv)
    out, err = capsys.readouterr()
    assert_one_line_cli_error(code, out, err, str(path), *words, command=command)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_tiny_test_model_file_is_not_held_to_sdxl_widths(tmp_path):
    """Widths are checked once the file is known to be SDXL's; the tiny test UNet's files are not."""
    path = write_kohya(tmp_path / "tiny.safetensors", layers_of(TINY, roles=["content", "style"]), rank=2)
    assert guess_model(open_lora(path)).model != "sdxl"
    assert open_sdxl_lora(path).roles() == ["content", "style"]


# -- wording ---------------------------------------------------------------------------------------------------


def test_count_agrees():
    assert (count(1, "tensor"), count(2, "tensor"), count(0, "layer"), count(1, "more block")) == \
           ("1 tensor", "2 tensors", "0 layers", "1 more block")


def test_one_unparsed_tensor_is_one_tensor(tmp_path, capsys):
    layers = full_attention_layers(["style"])
    path = write_kohya(tmp_path / "one.safetensors", layers, rank=2, extra={"something_else": torch.zeros(3)})
    assert cli("inspect", path) == 0
    out = capsys.readouterr().out
    assert "1 tensor is not" in out and "1 tensors" not in out


def test_weights_multiply_to_what_was_typed(tmp_path, capsys):
    """0.8 then 0.7 is 0.56 in the metadata, the JSON and the text, not 0.5599999999999999."""
    assert cumulative_weights({"blora_weights": json.dumps({"style": 0.8})}, {"style": 0.7}, ["style"]) == {"style": 0.56}
    src = write_kohya(tmp_path / "a.safetensors", full_attention_layers(["content", "style"]), rank=2)
    assert cli("scale", src, "--style", "0.8", "-o", tmp_path / "b.safetensors") == 0
    capsys.readouterr()
    assert cli("scale", tmp_path / "b.safetensors", "--style", "0.7", "-o", tmp_path / "c.safetensors", "--json") == 0
    out = capsys.readouterr().out
    assert "0.5599999999999999" not in out and json.loads(out)["weights"]["style"] == 0.56
    assert cli("inspect", tmp_path / "c.safetensors", "--json") == 0
    assert "0.5599999999999999" not in capsys.readouterr().out


def test_the_chart_has_no_tick_past_100_percent_and_no_clipped_label(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.text import Text

    from blora_network.tools.analyze import analyze
    from blora_network.tools.plot import build_figure

    path = write_kohya(tmp_path / "style.safetensors", full_attention_layers(["style"]), rank=2)
    fig = build_figure(analyze(path))
    fig.canvas.draw()  # places every label as the PNG has it
    renderer = fig.canvas.get_renderer()
    main_axes = fig.axes[0]
    assert max(main_axes.get_yticks()) <= 100
    width, height = fig.bbox.width, fig.bbox.height
    for text in fig.findobj(Text):
        if not text.get_visible() or not text.get_text().strip():
            continue
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= width and box.y0 >= 0 and box.y1 <= height, \
            f"label {text.get_text()!r} is clipped: {box}"


# -- fp8 files scaled by a weight fp8 cannot hold -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    return write_kohya(tmp_path_factory.mktemp("fp8") / "fp8.safetensors", full_attention_layers(["content", "style"]),
                       rank=8, dtype=torch.float8_e4m3fn)


def _measured_loss(src, out, weight: float) -> dict[str, float]:
    """Independently of the tool: ||dW(written) - w dW(source)|| / ||w dW(source)|| per scaled layer."""
    from safetensors.torch import load_file

    a, b = load_file(str(src)), load_file(str(out))
    losses = {}
    for key in a:
        if key.endswith(".lora_up.weight") and "output_blocks_1_1" in key:
            down = a[key.replace("lora_up", "lora_down")].float()
            want = weight * (a[key].float() @ down)
            got = b[key].float() @ b[key.replace("lora_up", "lora_down")].float()
            losses[key.split(".")[0]] = float((got - want).norm() / want.norm())
    return losses


@pytest.mark.parametrize("weight", [0.7, 0.5, 1.3])
def test_fp8_scaled_says_how_much_of_dw_rounding_lost(fp8_file, tmp_path, capsys, weight):
    """The worst layer's loss, as measured from the two files; 0.7 loses several percent, a power of two less
    (only elements pushed below fp8's normal range round)."""
    out = tmp_path / "s.safetensors"
    assert cli("scale", fp8_file, "--style", str(weight), "-o", out, "--json") == 0
    said = [w for w in json.loads(capsys.readouterr().out)["warnings"] if "fp8 rounding" in w]
    losses = _measured_loss(fp8_file, out, weight)
    worst = max(losses, key=losses.get)
    if losses[worst] >= 0.005:
        assert len(said) == 1 and f"up to {100 * losses[worst]:.1f}% ({worst})" in said[0] and "--dtype bf16" in said[0]
    else:
        assert said == []
    if weight == 0.7:
        assert losses[worst] > 0.02  # the case the issue met: a real loss, said


@pytest.mark.parametrize("dtype, torch_dtype, tolerance", [("bf16", torch.bfloat16, 0.01), ("fp32", torch.float32, 1e-6)])
def test_dtype_writes_a_wider_file_that_keeps_the_scaled_dw(fp8_file, tmp_path, capsys, dtype, torch_dtype, tolerance):
    from safetensors.torch import load_file

    out = tmp_path / "s.safetensors"
    assert cli("scale", fp8_file, "--style", "0.7", "-o", out, "--dtype", dtype, "--json") == 0
    assert not [w for w in json.loads(capsys.readouterr().out)["warnings"] if "fp8" in w]
    assert {t.dtype for k, t in load_file(str(out)).items() if not k.endswith(".alpha")} == {torch_dtype}
    assert max(_measured_loss(fp8_file, out, 0.7).values()) < tolerance
    assert cli("combine", "--content", fp8_file, "--style", fp8_file, "--style-weight", "0.7", "--dtype", dtype,
               "-o", tmp_path / "c.safetensors") == 0
    assert max(_measured_loss(fp8_file, tmp_path / "c.safetensors", 0.7).values()) < tolerance


@pytest.mark.parametrize("argv", [["extract", "{src}", "--blocks", "style", "-o", "{tmp}/e.safetensors"],
                                  ["split", "{src}", "--out-dir", "{tmp}/parts"]])
def test_dtype_on_the_other_writers(fp8_file, tmp_path, argv):
    from safetensors.torch import load_file

    assert cli(*[a.format(src=fp8_file, tmp=tmp_path) for a in argv], "--dtype", "fp16") == 0
    written = [p for p in tmp_path.rglob("*.safetensors")]
    assert written
    for path in written:
        assert {t.dtype for k, t in load_file(str(path)).items() if not k.endswith(".alpha")} == {torch.float16}
