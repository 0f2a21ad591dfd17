"""Fuzzing the preset loader and the file readers: only our documented errors, never a crash.

``load_preset`` raises :class:`PresetError` or returns a Preset, whatever the file holds
(random TOML documents, random key names, random text and bytes). The safetensors readers and
``read_weights`` raise :class:`LoraFileError` or return tensors, whatever the bytes (random,
truncated, bit-flipped, a lying header length, a hand-made header). ``inspect`` exits 0 or 1.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import pytest
import toml
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from blora_network.cli.main import main as cli_main
from blora_network.errors import LoraFileError, PresetError
from blora_network.files.safefile import load_weights_file as read_weights
from blora_network.network.presets import BLOCK_SETTING_KEYS, Preset, load_preset
from blora_network.files.safefile import load_tensors, open_safetensors, read_header_layout, read_metadata, write_safetensors_hashed

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch.load on random bytes

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

PRESET_KEYS = ["enable_conv", "unet_target_module", "unet_target_name", "text_encoder_target_module",
               "text_encoder_target_name", "module_algo_map", "name_algo_map", "use_fnmatch", "exclude_name"]


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="blora-fuzz-") as d:
        yield Path(d)


# -- the preset loader ----------------------------------------------------------------------------

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from([r"^(?!.*(ff\.net|proj)).*output_blocks\.0\.1\..*$", "output_blocks.0.1.", "(", "[a-", "*", "?", "\\", ""]),
)
ALGO_KEYS = ["algo", "dim", "alpha", "conv_dim", "factor", "dropout"]
key_names = st.one_of(st.sampled_from(PRESET_KEYS + ["blora", "description", *BLOCK_SETTING_KEYS, *ALGO_KEYS]),
                      st.text(min_size=1, max_size=20))
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(key_names, children, max_size=4)),
    max_leaves=12,
)
documents = st.dictionaries(key_names, values, max_size=6)


def _load(path: Path) -> None:
    try:
        preset = load_preset(str(path))
    except PresetError as e:
        assert str(e)  # a message, not an empty error
        return
    assert isinstance(preset, Preset)
    preset.roles  # matching its patterns must not crash either
    preset.lycoris_dict()


@FUZZ
@given(doc=documents)
@example(doc={"unet_target_name": ["("]})
@example(doc={"blora": {"content_dim": -1}})
@example(doc={"blora": [1, 2]})
@example(doc={"unet_target_name": "x"})
@example(doc={"use_fnmatch": True, "unet_target_name": ["[a-"]})
@example(doc={"name_algo_map": {"^output": {"algo": 1, "dim": "x"}}})
@example(doc={"module_algo_map": {"CrossAttention": {"dim": float("nan")}}})
def test_random_toml_documents(workdir, doc):
    try:
        text = toml.dumps(doc)
    except Exception:  # the toml writer's own limits, not what we test
        assume(False)
    path = workdir / "doc.toml"
    path.write_text(text, encoding="utf-8")
    _load(path)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("[]{}=\"'.,#\n \t" + string.ascii_letters[:8] + "0123456789tfrue-")), max_size=200))
@example(text="[blora\n")
@example(text="a = [1, 'x']\n")
@example(text="a = 1979-05-27T07:32:00Z\n")
@example(text="[[blora]]\ncontent_dim = 1\n")
@example(text="a = {b = 1\n")
def test_random_toml_like_text(workdir, text):
    path = workdir / "text.toml"
    path.write_text(text, encoding="utf-8")
    _load(path)


@FUZZ
@given(data=st.binary(max_size=300))
@example(data=b"\xff\xfe\x00")
@example(data=b"unet_target_name = ['\xc3\x28']")
def test_random_bytes_as_preset(workdir, data):
    path = workdir / "bytes.toml"
    path.write_bytes(data)
    _load(path)


@FEW
@given(name=st.text(max_size=40))
def test_random_preset_names(name):
    try:
        load_preset(name)
    except PresetError:
        pass


# -- the file readers -----------------------------------------------------------------------------

READERS = {
    "read_metadata": read_metadata,
    "read_header_layout": read_header_layout,
    "load_tensors": load_tensors,
    "read_weights": read_weights,
}


def _open_and_read(path):
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


READERS["open_safetensors"] = _open_and_read


def _read_all(path: Path) -> None:
    for name, reader in READERS.items():
        try:
            reader(path)
        except LoraFileError as e:
            assert str(path) in str(e), (name, str(e))


@pytest.fixture(scope="module")
def real_file(workdir) -> bytes:
    """A small but real kohya LoRA file with metadata, as bytes to mutate."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(3):
        name = f"lora_unet_output_blocks_0_1_transformer_blocks_{i}_attn1_to_q"
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, 8, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(8, 2, generator=g).half()
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    path = workdir / "real.safetensors"
    write_safetensors_hashed(path, tensors, {"ss_network_module": "blora_network", "ss_network_dim": "2"})
    return path.read_bytes()


@FUZZ
@given(data=st.binary(max_size=400))
@example(data=b"")
@example(data=b"\x00" * 8)
@example(data=(2).to_bytes(8, "little") + b"{}")
@example(data=(2).to_bytes(8, "little") + b"[]")
@example(data=(4).to_bytes(8, "little") + b"null")
@example(data=(2**64 - 1).to_bytes(8, "little") + b"{}")
def test_random_bytes(workdir, data):
    for suffix in (".safetensors", ".pt"):
        path = workdir / f"random{suffix}"
        path.write_bytes(data)
        _read_all(path)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
       length=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)))
def test_mutated_real_files(workdir, real_file, cut, flips, length):
    data = bytearray(real_file)
    n = int.from_bytes(data[:8], "little")
    for at, value in flips:  # flip bytes, mostly inside the header where the structure is
        data[8 + at % max(1, n)] = value
    if length is not None:  # a header length that lies
        data[:8] = length.to_bytes(8, "little")
    data = data[: cut % (len(data) + 1)] if cut % 3 == 0 else data  # and sometimes truncated
    path = workdir / "mutated.safetensors"
    path.write_bytes(bytes(data))
    _read_all(path)


dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "XX", "", 3, None])
shapes = st.one_of(st.lists(st.integers(min_value=-2, max_value=9), max_size=3), st.text(max_size=3), st.none())
offsets = st.one_of(
    st.lists(st.integers(min_value=-5, max_value=300), min_size=2, max_size=2),
    st.lists(st.one_of(st.integers(0, 300), st.text(max_size=2), st.none(), st.floats(0, 300)), max_size=3),
    st.text(max_size=3),
)
entries = st.fixed_dictionaries({"dtype": dtypes, "shape": shapes, "data_offsets": offsets})
metadata = st.one_of(
    st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2)), max_size=2),
    st.text(max_size=4),
)
headers = st.dictionaries(st.one_of(st.text(max_size=10), st.just("__metadata__")), st.one_of(entries, metadata, st.integers()), max_size=4)


@FUZZ
@given(header=headers, payload=st.binary(max_size=300), pad=st.integers(0, 7))
@example(header={"a": {"dtype": "F32", "shape": [2], "data_offsets": ["x", "y"]}}, payload=b"\x00" * 8, pad=0)
@example(header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, None]}}, payload=b"\x00" * 8, pad=0)
@example(header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"k": 1}}, payload=b"\x00" * 8, pad=0)
@example(header={"a.lora_up.weight": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, payload=b"\x7f\x00", pad=0)
@example(header={"a.lora_up.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, payload=b"\x00\x00\xc0\x7f", pad=0)
def test_hand_made_headers(workdir, header, payload, pad):
    raw = json.dumps(header).encode("utf-8") + b" " * pad
    path = workdir / "header.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)
    _read_all(path)


@FEW
@given(obj=st.recursive(
    st.one_of(st.integers(), st.text(max_size=5), st.none(), st.builds(lambda n: torch.zeros(n), st.integers(0, 3))),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), c, max_size=3)),
    max_leaves=6,
))
def test_weights_only_pickles_of_any_shape(workdir, obj):
    """``.pt`` files whose content torch.load(weights_only=True) accepts, but that are no LoRA."""
    path = workdir / "any.pt"
    torch.save(obj, path)
    try:
        weights = read_weights(path)
    except LoraFileError:
        return
    assert all(isinstance(k, str) for k in weights) and all(isinstance(v, torch.Tensor) for v in weights.values())


@FEW
@given(cut=st.integers(min_value=0, max_value=10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_inspect_never_crashes(workdir, real_file, cut, flips, capsys):
    data = bytearray(real_file)
    n = int.from_bytes(data[:8], "little")
    for at, value in flips:
        data[8 + at % max(1, n)] = value
    if cut % 2:
        data = data[: cut % (len(data) + 1)]
    path = workdir / "inspect.safetensors"
    path.write_bytes(bytes(data))
    code = cli_main(["inspect", str(path), "--json"])
    err = capsys.readouterr().err
    assert code in (0, 1), err
    assert "Traceback" not in err
