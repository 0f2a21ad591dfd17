"""Issue 5, part 3: how long ``create_network`` takes on the full-size SDXL structure.

The UNet is sd-scripts' full-size tree from ``blora_network.sdxl.unet`` on the meta device, and the
two text encoders are transformers' CLIPTextModel (768 wide, 12 layers) and
CLIPTextModelWithProjection (1280 wide, 32 layers) at SDXL's config, also on meta; they are
passed to ``create_network`` as sd-scripts passes them. Every row is compared against a
bare ``named_modules()`` walk of the same three trees. The adapters themselves are real CPU
tensors (LyCORIS creates them on the default device), so the rank matters: rows run at
dim 64 and at dim 1, where adapter allocation is negligible and what is left is the walk,
the matching and the module objects.

Presets (rows):

- ``content_style``: the default; two anchored regexes with a negative lookahead.
- ``class, same 160 layers``: the same 160 layers by class name (``CrossAttention``), kept to
  the two blocks by one ``exclude_name`` pattern: equal output, the fair pairing for
  "regex vs class".
- ``class CrossAttention``: every attention projection of the UNet by class name, no regex.
- ``class Transformer2DModel``: sd-scripts' default whole-UNet targets by class name.
- ``content_style + text encoders``: ``train_text_encoder=true`` (CLIP attention layers too).
- ``plain LyCORIS``: ``LycorisNetworkKohya`` with the content_style preset and no blora_network
  code around it: our own overhead is the difference to the first row.

    python benchmarks/bench_build.py                # table
    python benchmarks/bench_build.py --profile      # cProfile of the default preset
    python benchmarks/bench_build.py --record       # ... and append the table to RESULTS.md
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import logging
import pstats
import statistics
import sys
import os
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_step.py: CPU time without spinning threads

import common  # noqa: E402
import torch  # noqa: E402

SAME_160 = r"""# the two B-LoRA blocks' attention projections, chosen by class name
unet_target_module = ["CrossAttention"]
unet_target_name = []
exclude_name = ['^(?!output_blocks\.[01]\.1\.)']
text_encoder_target_module = []
text_encoder_target_name = []
"""
CLASS_ATTN = """unet_target_module = ["CrossAttention"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""
CLASS_TRANSFORMER = """unet_target_module = ["Transformer2DModel"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""


def text_encoders():
    """SDXL's two CLIP text encoders at full size, on the meta device (None without transformers)."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError:
        return None
    common_cfg = dict(vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu", **common_cfg))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                         num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
                                                         **common_cfg))
    return [te1, te2]


def walk(trees) -> int:
    n = 0
    for tree in trees:
        for _name, _module in tree.named_modules():
            n += 1
    return n


def median_time(fn, reps: int) -> tuple[float, float, object]:
    """Median wall time and median process CPU time of ``reps`` calls, and the last result."""
    times, cpu, out = [], [], None
    for _ in range(reps):
        out = None
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu), out


def plain_lycoris(unet, dim: int):
    from lycoris.kohya import LycorisNetworkKohya

    from blora_network.network.kohya import _lycoris_preset
    from blora_network.network.presets import load_preset

    preset = load_preset("content_style").lycoris_dict()
    with _lycoris_preset(preset):
        return LycorisNetworkKohya(None, unet, multiplier=1.0, lora_dim=dim, alpha=dim, bypass_mode=True,
                                   warn_on_unmatched=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="64,1", help="comma list of ranks (default 64,1)")
    p.add_argument("--reps", type=int, default=5, help="create_network calls per row; the median counts (default 5)")
    p.add_argument("--profile", action="store_true", help="cProfile one create_network with the default preset")
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    import lycoris.logging  # noqa: F401  sets its logger to INFO on import; quiet it afterwards

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # its INFO lines would bury the table
    from blora_network import create_network
    from blora_network.sdxl.unet import FULL, build_unet

    info = common.machine("cpu")
    t0 = time.perf_counter()
    unet = build_unet(FULL, device="meta")
    unet_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    tes = text_encoders()
    te_build = time.perf_counter() - t0
    trees = [unet] + (tes or [])
    counts = [sum(1 for _ in t.named_modules()) for t in trees]
    walk_s, walk_cpu, _ = median_time(lambda: walk(trees), 21)
    walk_unet_s, _, _ = median_time(lambda: walk([unet]), 21)

    tmp = Path(tempfile.mkdtemp(prefix="blora_bench_"))
    presets = {}
    for name, text in (("same160", SAME_160), ("attn", CLASS_ATTN), ("transformer", CLASS_TRANSFORMER)):
        path = tmp / f"{name}.toml"
        path.write_text(text, encoding="utf-8")
        presets[name] = str(path)

    rows_spec = [
        ("`content_style` (regex, default)", "regex", lambda d: create_network(1.0, d, d, None, tes, unet, preset="content_style")),
        ("class `CrossAttention` + exclude_name: same 160 layers", "class", lambda d: create_network(1.0, d, d, None, tes, unet, preset=presets["same160"])),
        ("class `CrossAttention` (all attention projections)", "class", lambda d: create_network(1.0, d, d, None, tes, unet, preset=presets["attn"])),
        ("class `Transformer2DModel` (sd-scripts' whole-UNet targets)", "class", lambda d: create_network(1.0, d, d, None, tes, unet, preset=presets["transformer"])),
        ("`content_style` + `train_text_encoder=true`", "regex", lambda d: create_network(1.0, d, d, None, tes, unet, preset="content_style", train_text_encoder="true")),
        ("plain LyCORIS `LycorisNetworkKohya`, content_style preset", "regex", lambda d: plain_lycoris(unet, d)),
    ]
    if tes is None:
        rows_spec = [r for r in rows_spec if "text_encoder" not in r[0]]
    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    rows, by = [], {}
    for dim in dims:
        for label, kind, make in rows_spec:
            make(dim)  # warm: imports, regex cache, preset cache
            secs, cpu, net = median_time(lambda: make(dim), args.reps)
            n = len(net.unet_loras) + len(net.text_encoder_loras)
            params = sum(p.numel() for lora in net.unet_loras + net.text_encoder_loras for p in lora.parameters())
            by[(label, dim)] = (secs, n, cpu)
            rows.append([dim, label, n, f"{params:,}", f"{secs * 1e3:.0f}", f"{cpu * 1e3:.0f}", f"{secs / walk_s:.0f}x",
                         f"{secs / n * 1e3:.2f}"])
            del net
            gc.collect()
            print(f"  dim {dim}: {label}: {secs * 1e3:.0f} ms, {n} modules", flush=True)
    header = ["dim", "preset", "modules", "adapter params", "create_network ms (median wall)", "CPU ms", "vs walk (wall)",
              "ms per module"]
    lines = [
        f"Trees: UNet {counts[0]} modules" + (f", text encoders {counts[1]} + {counts[2]}" if tes else " (no transformers: no text encoders)")
        + f"; {sum(counts)} in all. Built on meta in {unet_build * 1e3:.0f} ms (UNet) and {te_build * 1e3:.0f} ms (text encoders).",
        f"Bare `named_modules()` walk of all of them: {walk_s * 1e3:.2f} ms wall, {walk_cpu * 1e3:.2f} ms CPU "
        f"(UNet alone {walk_unet_s * 1e3:.2f} ms); "
        f"median of 21. `create_network`: median of {args.reps} after one warm-up call.",
        "",
        common.table(header, rows),
        "",
    ]
    default = "`content_style` (regex, default)"
    same = "class `CrossAttention` + exclude_name: same 160 layers"
    for dim in dims:
        d_s, d_n, d_c = by[(default, dim)]
        s_s, s_n, s_c = by[(same, dim)]
        a_s, a_n, a_c = by[(rows_spec[2][0], dim)]
        lines.append(
            f"- dim {dim}: default preset {d_s:.3f} s wall, {d_c:.3f} s CPU (target < 1 s: {'met' if max(d_s, d_c) < 1 else 'MISSED'}); "
            f"regex / class for the same {d_n} layers = **{d_s / s_s:.2f}** wall, {d_c / s_c:.2f} CPU "
            f"(target <= 2: {'met' if d_s / s_s <= 2 else 'MISSED'}); "
            f"per module against class `CrossAttention` ({a_n} modules): {(d_s / d_n) / (a_s / a_n):.2f}"
        )
    body = "\n".join(lines)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        create_network(1.0, dims[0], dims[0], None, tes, unet, preset="content_style")
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
        body += f"\n\ncProfile, `content_style`, dim {dims[0]}:\n\n```\n" + buf.getvalue().strip() + "\n```"
    print()
    print(body)
    if args.record:
        common.record("Network build (issue 5, part 3)", info, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
