"""``blora-network``: the command line for B-LoRA files (also ``python -m blora_network``).

Argument parsing and printing only; the work is in :mod:`blora_network.tools`. Every problem
the user can fix ends as one line on stderr and exit status 1 (2 for a wrong command line),
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from functools import partial
from typing import Optional, Sequence

from . import __version__
from .blocks import BLOCKS, ROLES, block_for_role, parse_roles
from .errors import BLoraError

__all__ = ["main", "build_parser"]

PROG = "blora-network"
_ROLE_HELP = ", ".join(f"{b.role} ({b.ldm}, {b.lbw})" for b in BLOCKS)


def _size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _progress(args) -> Optional[object]:
    if getattr(args, "json", False) or getattr(args, "no_progress", False):
        return None
    from tqdm import tqdm

    # bars appear only for work over a second, and only on a terminal (disable=None)
    return partial(tqdm, delay=1.0, leave=False, file=sys.stderr, dynamic_ncols=True, disable=None)


def _roles(value: str) -> list[str]:
    try:
        return parse_roles(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _weight(value: str) -> float:
    try:
        w = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if w != w or w in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"a weight must be a finite number, not {value!r}")
    return w


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# -- presets ----------------------------------------------------------------------------------

def _cmd_presets(args) -> int:
    from .presets import DEFAULT_PRESET
    from .tools import presets_summary

    items = presets_summary()
    if args.json:
        _print_json([asdict(p) for p in items])
        return 0
    print("Built-in presets (Linear layers trained on sd-scripts' full-size SDXL UNet):")
    width = max(len(p.name) for p in items) + 10
    for p in items:
        name = p.name + (" (default)" if p.name == DEFAULT_PRESET else "")
        blocks = ", ".join(f"{b.role} {b.ldm}: {p.blocks.get(b.ldm, 0)}" for b in map(block_for_role, p.roles))
        print(f"  {name:<{width}} {p.modules:>4} layers   {blocks}")
    print("Use one with: --network_module blora_network --network_args \"preset=NAME\"; "
          "see a custom TOML with: blora-network plan --preset my.toml --dim 64")
    return 0


# -- plan -------------------------------------------------------------------------------------

def _layer_kinds(layers: Sequence[str]) -> str:
    kinds: dict[str, int] = {}
    for name in layers:
        parts = name.split(".")
        if "transformer_blocks" in parts:
            i = parts.index("transformer_blocks")
            kind = ".".join(parts[i + 2:])
        else:
            kind = parts[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in kinds.items())


def _cmd_plan(args) -> int:
    from .tools import plan

    result = plan(args.preset, args.dim)
    if args.json:
        _print_json(asdict(result))
        return 0
    print(f"preset {result.preset} ({result.source}) at rank {result.dim} on sd-scripts' full-size SDXL UNet")
    print(f"  {'block':<20} {'role':<8} {'layers':>6} {'parameters':>13}")
    for b in result.blocks:
        print(f"  {b.block:<20} {b.role or '-':<8} {b.modules:>6} {b.params:>13,}")
        if args.list:
            for layer in b.layers:
                print(f"      {layer}")
        else:
            print(f"      {_layer_kinds(b.layers)}")
    print(f"  {'total':<20} {'':<8} {result.modules:>6} {result.params:>13,}")
    fb = result.file_bytes
    print(f"file size: fp16 {_size(fb['fp16'])}, bf16 {_size(fb['bf16'])}, fp32 {_size(fb['fp32'])} "
          "(plus training metadata, usually a few KiB)")
    ob = result.optimizer_bytes
    print(f"training memory for the adapter: fp32 weights {_size(ob['weights_fp32'])} + grads "
          f"{_size(ob['grads_fp32'])} + AdamW states {_size(ob['adamw_states'])} = {_size(ob['total_adamw'])} "
          f"(AdamW8bit states: {_size(ob['adamw8bit_states'])}); the UNet and activations come on top")
    for note in result.notes:
        print(f"note: {note}")
    return 0


# -- inspect ----------------------------------------------------------------------------------

def _cmd_inspect(args) -> int:
    from .tools import inspect

    rep = inspect(args.file, norms=not args.no_norms, progress=_progress(args))
    if args.json:
        _print_json(asdict(rep))
        return 0
    dtypes = ", ".join(f"{d} x{n}" if len(rep.dtypes) > 1 else d for d, n in rep.dtypes.items())
    print(f"{rep.file}: {_size(rep.file_bytes)}, {rep.modules} layers, {dtypes}, "
          f"{'/'.join(rep.spellings)} names, model {rep.model}")
    print(f"  {'block':<8} {'where':<22} {'layers':>6} {'rank':>9} {'alpha':>9} {'algo':<10} {'||dW||':>10}")
    for b in rep.blocks.values():
        where = f"{b.ldm} {b.lbw}" if b.ldm else f"{len(b.blocks)} blocks"
        ranks = "/".join(map(str, b.ranks)) or "-"
        alphas = "/".join(f"{a:g}" for a in b.alphas) or "-"
        norm = f"{b.norm:.4g}" if b.norm is not None else "-"
        print(f"  {b.role:<8} {where:<22} {b.modules:>6} {ranks:>9} {alphas:>9} {','.join(b.algos):<10} {norm:>10}")
    if rep.training:
        print(_printable("training: " + "; ".join(f"{k} {v}" for k, v in rep.training.items() if k != "network args")))
    for w in rep.warnings:
        print(_printable(f"warning: {w}"))
    return 0


# -- analyze ----------------------------------------------------------------------------------

def _share(x: float) -> str:
    return "<0.1%" if 0 < x < 0.0005 else f"{100 * x:.1f}%"


def _cmd_analyze(args) -> int:
    from .analyze import KIND_LABELS, KINDS, analyze

    if args.plot:  # before the work: no matplotlib, or a path we may not write, is one line now
        from .plot import check_plot_path, require_matplotlib

        require_matplotlib()
        check_plot_path(args.plot, inputs=[args.file], overwrite=args.force)
    rep = analyze(args.file, progress=_progress(args))
    chart = None
    if args.plot:
        from .plot import render

        chart = str(render(rep, args.plot, overwrite=args.force, inputs=[args.file]))
    if args.json:
        _print_json({**asdict(rep), "plot": chart})
        return 0
    te = (f"; text encoders: {sum(t.modules for t in rep.text_encoders)} layers, ||dW||_F "
          f"{rep.text_encoder_norm:.4g} (not in the shares)" if rep.text_encoders else "")
    print(f"{rep.file}: model {rep.model}, {rep.unet_modules} UNet layers ({'/'.join(rep.spellings)} names), "
          f"UNet ||dW||_F {rep.unet_norm:.4g}{te}")
    kinds = [k for k in KINDS if rep.kinds[k].modules]
    total_sq = rep.unet_norm ** 2 or 1.0
    head = "".join(f" {KIND_LABELS[k]:>10}" for k in kinds)
    print(f"  {'block':<18} {'role':<12} {'layers':>6} {'||dW||_F':>10} {'share':>7}{head}")
    rows = rep.blocks if args.top is None else sorted(rep.blocks, key=lambda r: -r.share)[: args.top]
    for r in rows:
        role = f"{r.role} {r.lbw}" if r.role else "-"
        cells = "".join(f" {_share(r.kinds[k] ** 2 / total_sq) if k in r.kinds else '-':>10}" for k in kinds)
        print(f"  {r.block:<18} {role:<12} {r.modules:>6} {r.norm:>10.4g} {_share(r.share):>7}{cells}")
    shown = {r.block for r in rows}
    hidden = [r for r in rep.blocks if r.block not in shown]
    if hidden:
        print(f"  ... and {len(hidden)} more blocks ({_share(sum(r.share for r in hidden))} together)")
    cells = "".join(f" {_share(rep.kinds[k].share):>10}" for k in kinds)
    print(f"  {'UNet':<18} {'':<12} {sum(r.modules for r in rep.blocks):>6} {rep.unet_norm:>10.4g} "
          f"{_share(1.0 if rep.unet_norm else 0.0):>7}{cells}")
    blora = ", ".join(f"{b.role} {b.block} {_share(b.share) if b.modules else 'not in file'}" for b in rep.blora)
    print(f"B-LoRA blocks, attention change (attn1+attn2): {blora}; together {_share(rep.blora_attention_share)} "
          "of the UNet's attention change")
    print(f"suggestion: {rep.suggestion.text}")
    if rep.suggestion.command:
        print(f"  {rep.suggestion.command}")
        print(f"  (keeps {_share(rep.suggestion.kept_share)} of the UNet's ||dW||_F^2: the attention layers of "
              f"{', '.join(rep.suggestion.roles)})")
    if chart:
        print(f"wrote {chart}")
    for w in rep.warnings:
        print(f"warning: {w}")
    return 0


# -- writers ----------------------------------------------------------------------------------

def _describe_written(f) -> str:
    weights = ", ".join(f"{r} x{w:g}" for r, w in f.weights.items() if w != 1.0)
    blocks = ", ".join(f.blocks) or "no B-LoRA block"
    extra = f"; weights {weights}" if weights else ""
    return f"wrote {f.path}: {blocks} ({f.modules} layers, {_size(f.bytes)}){extra}"


def _report_written(f) -> int:
    print(_describe_written(f))
    for w in f.warnings:
        print(f"note: {w}")
    return 0


def _cmd_split(args) -> int:
    from .tools import split

    result = split(args.file, out_dir=args.out_dir, roles=args.blocks, force=args.force, progress=_progress(args))
    for f in result.files:
        print(_describe_written(f))
    if result.skipped_modules:
        print(f"note: {result.skipped_modules} layers outside the B-LoRA blocks were not written")
    return 0


def _cmd_combine(args) -> int:
    from .tools import BlockSource, combine

    sources = []
    for role in ROLES:
        path = getattr(args, role)
        weight = getattr(args, f"{role}_weight")
        if path is None:
            if weight is not None:
                raise BLoraError(f"--{role}-weight given without --{role} FILE")
            continue
        sources.append(BlockSource(role, path, 1.0 if weight is None else weight))
    if not sources:
        raise BLoraError("nothing to combine: give --content FILE, --style FILE and/or --layout FILE")
    return _report_written(combine(sources, args.output, force=args.force, progress=_progress(args)))


def _cmd_scale(args) -> int:
    from .tools import scale

    weights = {r: getattr(args, r) for r in ROLES if getattr(args, r) is not None}
    if not weights:
        raise BLoraError("no weight given: pass --content W, --style W and/or --layout W")
    return _report_written(scale(args.file, weights, args.output, force=args.force, progress=_progress(args)))


def _cmd_extract(args) -> int:
    from .tools import extract

    return _report_written(extract(args.file, args.blocks, args.output, force=args.force, progress=_progress(args)))


def _cmd_convert(args) -> int:
    from .tools import convert

    return _report_written(convert(args.file, args.output, to=args.to, force=args.force, progress=_progress(args)))


# -- the parser -------------------------------------------------------------------------------

def _sub(sub, name: str, help: str, description: str, example: str):
    p = sub.add_parser(
        name, help=help, description=description, epilog="example:\n" + example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    return p


def _out_args(p) -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never an input file)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="B-LoRA tools for kohya-format SDXL LoRA files: see what a file holds and where its change "
                    "is, split it into content/style/layout, combine the content of one with the style of "
                    "another, scale blocks, extract B-LoRA blocks from a whole-UNet LoRA, convert diffusers names.",
        epilog="examples:\n"
               "  blora-network inspect me.safetensors\n"
               "  blora-network analyze whole_unet.safetensors --plot whole_unet.png\n"
               "  blora-network combine --content dog.safetensors --style ink.safetensors --style-weight 0.8 -o dog_ink.safetensors\n"
               "run 'blora-network COMMAND --help' for each command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _sub(sub, "presets", "list the built-in presets and the layers each trains",
             "The built-in presets, with the B-LoRA blocks and the number of Linear layers each selects on "
             "sd-scripts' full-size SDXL UNet.", "  blora-network presets --json")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=_cmd_presets)

    p = _sub(sub, "plan", "dry run: what a preset trains at a rank, file size, optimizer memory",
             "Without any model file: the layers a preset (built-in name or TOML path) trains on sd-scripts' "
             "full-size SDXL UNet, per block; the parameter count (220,160 x dim per B-LoRA block); the file size "
             "at fp16/bf16/fp32; and the adapter's AdamW memory.",
             "  blora-network plan --preset content_style --dim 64\n"
             "  blora-network plan --preset my_preset.toml --dim 32 --list")
    p.add_argument("--preset", required=True, help="built-in preset name or path of a TOML preset")
    p.add_argument("--dim", required=True, type=_positive_int, help="LoRA rank (network_dim)")
    p.add_argument("--list", action="store_true", help="list every layer, not a summary per block")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=_cmd_plan)

    p = _sub(sub, "inspect", "what a LoRA file holds, block by block",
             "Which B-LoRA blocks (content, style, layout, other) FILE holds, layer counts, rank and alpha, the "
             "Frobenius norm of each block's change dW, dtype, size, the training metadata that matters, and "
             "warnings (NaN/Inf, alpha different from rank, layers outside the B-LoRA blocks).",
             "  blora-network inspect my_blora.safetensors\n  blora-network inspect my_blora.safetensors --json")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--no-norms", action="store_true",
                   help="skip the ||dW|| column (only matters for big high-rank files: costs about params x rank)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=_cmd_inspect)

    p = _sub(sub, "analyze", "where a LoRA's change is: per UNet block and layer kind, and what to extract",
             "For any SDXL LoRA (kohya, diffusers or PEFT names; LoRA, LoHa, LoKr): the size of the change "
             "||dW||_F per UNet block (LDM names) and per layer kind (self-attn attn1, cross-attn attn2, ff, "
             "proj_in/proj_out, other: resnet convs, embeddings), and each one's share. Shares are of the squared "
             "norm ||dW||_F^2, which adds up over layers (they are separate matrices), so they sum to 100%; a "
             "block's ||dW||_F is the square root of its layers' sum. Text-encoder layers are reported apart. "
             "Then a suggestion from the attention change in the three B-LoRA blocks: one block with 60% or more "
             "of it -> extract that block; otherwise every block with 20% or more; under 5% of the UNet's "
             "attention change in those blocks -> nothing worth extracting. --plot draws the UNet's blocks "
             "with the B-LoRA blocks marked (needs matplotlib: pip install \"blora-network[plot]\").",
             "  blora-network analyze whole_unet.safetensors\n"
             "  blora-network analyze whole_unet.safetensors --plot whole_unet.png --top 10")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--plot", metavar="OUT.png", help="also draw the chart as a PNG (.svg and .pdf work too)")
    p.add_argument("--top", type=_positive_int, metavar="N",
                   help="list only the N blocks with the largest change (default: every block, in UNet order)")
    p.add_argument("--force", action="store_true", help="replace OUT.png if it exists")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=_cmd_analyze)

    p = _sub(sub, "split", "write one file per B-LoRA block",
             "Write NAME_content.safetensors, NAME_style.safetensors and NAME_layout.safetensors (for the blocks "
             "FILE holds) beside FILE. Only the kept tensors are read.",
             "  blora-network split my_blora.safetensors\n"
             "  blora-network split my_blora.safetensors --blocks style --out-dir parts/")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--blocks", type=_roles, help=f"only these blocks, comma-separated: {_ROLE_HELP}")
    p.add_argument("--out-dir", metavar="DIR", help="folder for the files (default: FILE's folder)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=_cmd_split)

    p = _sub(sub, "combine", "content of one B-LoRA + style of another (+ layout), weighted",
             "Put the content block of A, the style block of B and optionally the layout block of C into one "
             "kohya LoRA file, each block's change multiplied by its weight (linearly: 0.5 halves dW). "
             "A weight of 0 leaves the block out. Negative weights are allowed.",
             "  blora-network combine --content dog.safetensors --style ink.safetensors --style-weight 0.8 "
             "-o dog_ink.safetensors")
    for role in ROLES:
        p.add_argument(f"--{role}", metavar="FILE", help=f"take the {role} block from FILE")
        p.add_argument(f"--{role}-weight", type=_weight, metavar="W", help=f"weight of the {role} block (default 1)")
    _out_args(p)
    p.set_defaults(func=_cmd_combine)

    p = _sub(sub, "scale", "bake per-block weights into a file",
             "Multiply each named block's change dW by its weight (exactly: LoRA scales lora_up, LoHa hada_w1_a, "
             "LoKr lokr_w1; alpha is kept). Blocks not named keep weight 1; a weight of 0 removes the block; "
             "negative weights are allowed. DoRA layers accept only weight 1.",
             "  blora-network scale my_blora.safetensors --content 1.0 --style 0.6 -o my_blora_s06.safetensors")
    p.add_argument("file", metavar="FILE")
    for role in ROLES:
        p.add_argument(f"--{role}", type=_weight, metavar="W", help=f"weight of the {role} block")
    _out_args(p)
    p.set_defaults(func=_cmd_scale)

    p = _sub(sub, "extract", "keep only B-LoRA blocks of a whole-UNet LoRA",
             "From a regular SDXL LoRA (trained on the whole UNet, e.g. with sd-scripts' networks.lora) keep only "
             "the attention layers (attn1/attn2 to_q, to_k, to_v, to_out.0) of the chosen blocks: the layers "
             "the B-LoRA presets train. ff, proj_in/proj_out and everything else is left out.",
             "  blora-network extract whole_unet.safetensors --blocks content,style -o blora.safetensors")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--blocks", type=_roles, required=True, help=f"comma-separated: {_ROLE_HELP}")
    _out_args(p)
    p.set_defaults(func=_cmd_extract)

    p = _sub(sub, "convert", "diffusers/PEFT names (original B-LoRA) <-> kohya names",
             "Convert the original B-LoRA repository's output (diffusers names such as "
             "unet.up_blocks.0.attentions.0..., lora.down/lora.up or PEFT lora_A/lora_B, alpha = rank) to "
             "kohya names sd-scripts, ComfyUI and A1111 read; --to diffusers or --to peft goes back (alpha/rank is "
             "folded into the up factor, since those formats have no alpha).",
             "  blora-network convert blora_diffusers.safetensors -o blora_kohya.safetensors\n"
             "  blora-network convert blora_kohya.safetensors --to diffusers -o blora_diffusers.safetensors")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--to", choices=("kohya", "diffusers", "peft"), default="kohya",
                   help="target names: kohya (default), diffusers (lora.down/lora.up) or peft (lora_A/lora_B)")
    _out_args(p)
    p.set_defaults(func=_cmd_convert)

    from . import demo

    demo.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 a problem with the input, 2 a wrong command line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prefix = f"{PROG} {args.command}: error:"
    try:
        return int(args.func(args) or 0)
    except (BLoraError, OSError) as e:  # OSError: disk full, permission denied while writing...
        print(f"{prefix} {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no partial file was left behind", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return _printable(" ".join(str(e).split()))


def _printable(text: str) -> str:
    """Text from a file (metadata, key names) with control characters shown as escapes.

    Metadata is anybody's text: an ESC or BEL printed raw could clear the screen, retitle the
    terminal or hide lines. ``--json`` escapes them by itself.
    """
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)
