"""The file tools' subcommands: inspect, analyze, split, combine, scale, extract, convert.

Each handler parses nothing and computes nothing: it calls one function of :mod:`blora_network.tools`
and turns the dataclass it returns into lines (``--json`` prints the dataclass itself).
"""

from __future__ import annotations

from dataclasses import asdict

from blora_network.errors import BLoraError, count
from blora_network.sdxl.blocks import BLOCKS, LAYER_CHOICES, ROLES, SDXL_BLOCKS, lookup_sdxl_block
from blora_network.sdxl.names import WRITE_SPELLINGS

from .args import (
    add_dtype_arg,
    add_output_args,
    block_file,
    block_names,
    block_weight,
    output_path,
    positive_int,
    weight,
)
from .subcommand import Output, Subcommand, human_size, printable, progress_bar

__all__ = ["FILE_COMMANDS", "format_norm"]

_ROLE_HELP = ", ".join(f"{b.role} ({b.ldm}, {b.lbw})" for b in BLOCKS)
_BLOCK_HELP = (f"{_ROLE_HELP}, or any SDXL block by its LoRA Block Weight name ({SDXL_BLOCKS[1].name}-IN08, M00 or MID, "
               "OUT00-OUT08, BASE: the text encoders), LDM or diffusers name")
_LAYERS_HELP = ("which layers of each block: attention (attn1/attn2 to_q, to_k, to_v, to_out.0: what B-LoRA "
                "trains), transformer (with ff and proj_in/proj_out) or all (every layer of the block, resnets too)")


def _add_layers(p, default: str) -> None:
    p.add_argument("--layers", choices=LAYER_CHOICES, default=default, help=f"{_LAYERS_HELP}; default {default}")


def _no_dups(pairs, option: str) -> None:
    seen: dict[str, str] = {}
    for name, _ in pairs:
        block = lookup_sdxl_block(name).name
        if block in seen:
            raise BLoraError(f"{option}: block {block} is given twice ({seen[block]} and {name}); give it once")
        seen[block] = name


# -- inspect ----------------------------------------------------------------------------------

def _add_inspect(p) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--no-norms", action="store_true",
                   help="skip the ||dW|| column (only matters for big high-rank files: costs about params x rank)")


def _run_inspect(args) -> Output:
    from blora_network.tools.inspection import inspect

    rep = inspect(args.file, norms=not args.no_norms, progress=progress_bar(args))
    dtypes = ", ".join(f"{d} x{n}" if len(rep.dtypes) > 1 else d for d, n in rep.dtypes.items())
    lines = [f"{rep.file}: {human_size(rep.file_bytes)}, {count(rep.modules, 'layer')}, {dtypes}, "
             f"{'/'.join(rep.spellings)} names, model {rep.model}",
             f"  {'block':<8} {'where':<22} {'layers':>6} {'rank':>9} {'alpha':>9} {'algo':<10} {'||dW||':>10}"]
    for b in rep.blocks.values():
        where = f"{b.ldm} {b.lbw}" if b.ldm else f"{len(b.blocks)} blocks"
        ranks = "/".join(map(str, b.ranks)) or "-"
        alphas = "/".join(f"{a:g}" for a in b.alphas) or "-"
        norm = format_norm(b.norm) if b.norm is not None else "-"
        lines.append(f"  {b.role:<8} {where:<22} {b.modules:>6} {ranks:>9} {alphas:>9} {','.join(b.algos):<10} {norm:>10}")
    other = rep.blocks.get("other")
    if other is not None:
        lines.append("  other: " + ", ".join(f"{b}{' ' + other.block_names[b] if b in other.block_names else ''} ({n})"
                                            for b, n in other.blocks.items()))
    if rep.training:
        lines.append(printable("training: " + "; ".join(f"{k} {v}" for k, v in rep.training.items() if k != "network args")))
    lines += [printable(f"warning: {w}") for w in rep.warnings]
    lines += [f"block weights, {v.name}: A1111/Forge lbw={v.lbw}  ComfyUI Inspire {v.inspire}" for v in rep.block_weights]
    return rep, lines


# -- analyze ----------------------------------------------------------------------------------

def _add_analyze(p) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--plot", metavar="OUT.png", type=output_path, help="also draw the chart as a PNG (.svg and .pdf work too)")
    p.add_argument("--top", type=positive_int, metavar="N",
                   help="list only the N blocks with the largest change (default: every block, in UNet order)")
    p.add_argument("--force", action="store_true", help="replace OUT.png if it exists")


def format_norm(x: float) -> str:
    """||dW||_F with the same number of decimals in every row (scientific only when very large or small)."""
    return f"{x:.4f}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.3e}"


def _share(x: float) -> str:
    return "<0.1%" if 0 < x < 0.0005 else f"{100 * x:.1f}%"


def _run_analyze(args) -> Output:
    from blora_network.tools.analyze import KIND_LABELS, KINDS, analyze

    if args.plot:  # before the work: no matplotlib, or a path we may not write, is one line now
        from blora_network.tools.plot import check_plot_path, require_matplotlib

        require_matplotlib()
        check_plot_path(args.plot, inputs=[args.file], overwrite=args.force)
    rep = analyze(args.file, progress=progress_bar(args))
    chart = None
    if args.plot:
        from blora_network.tools.plot import render

        chart = str(render(rep, args.plot, overwrite=args.force, inputs=[args.file]))
    te = (f"; text encoders: {count(sum(t.modules for t in rep.text_encoders), 'layer')}, ||dW||_F "
          f"{rep.text_encoder_norm:.4g} (not in the shares)" if rep.text_encoders else "")
    lines = [f"{rep.file}: model {rep.model}, {rep.unet_modules} UNet layers ({'/'.join(rep.spellings)} names), "
             f"UNet ||dW||_F {rep.unet_norm:.4g}{te}"]
    kinds = [k for k in KINDS if rep.kinds[k].modules]
    total_sq = rep.unet_norm ** 2 or 1.0
    head = "".join(f" {KIND_LABELS[k]:>10}" for k in kinds)
    lines.append(f"  {'block':<18} {'role':<12} {'layers':>6} {'||dW||_F':>10} {'share':>7}{head}")
    rows = rep.blocks if args.top is None else sorted(rep.blocks, key=lambda r: -r.share)[: args.top]
    for r in rows:
        role = f"{r.role} {r.lbw}" if r.role else (r.lbw or "-")
        cells = "".join(f" {_share(r.kinds[k] ** 2 / total_sq) if k in r.kinds else '-':>10}" for k in kinds)
        lines.append(f"  {r.block:<18} {role:<12} {r.modules:>6} {format_norm(r.norm):>10} {_share(r.share):>7}{cells}")
    shown = {r.block for r in rows}
    hidden = [r for r in rep.blocks if r.block not in shown]
    if hidden:
        lines.append(f"  ... and {count(len(hidden), 'more block')} ({_share(sum(r.share for r in hidden))} together)")
    cells = "".join(f" {_share(rep.kinds[k].share):>10}" for k in kinds)
    lines.append(f"  {'UNet':<18} {'':<12} {sum(r.modules for r in rep.blocks):>6} {format_norm(rep.unet_norm):>10} "
                 f"{_share(1.0 if rep.unet_norm else 0.0):>7}{cells}")
    blora = ", ".join(f"{b.role} {b.block} {_share(b.share) if b.modules else 'not in file'}" for b in rep.blora)
    lines.append(f"B-LoRA blocks, attention change (attn1+attn2): {blora}; together {_share(rep.blora_attention_share)} "
                 "of the UNet's attention change")
    lines.append(f"suggestion: {rep.suggestion.text}")
    if rep.suggestion.command:
        lines.append(f"  {rep.suggestion.command}")
        lines.append(f"  (keeps {_share(rep.suggestion.kept_share)} of the UNet's ||dW||_F^2: the attention layers of "
                     f"{', '.join(rep.suggestion.roles)})")
    if chart:
        lines.append(f"wrote {chart}")
    lines += [f"warning: {w}" for w in rep.warnings]
    return {**asdict(rep), "plot": chart}, lines


# -- writers ----------------------------------------------------------------------------------

def _describe_written(f) -> str:
    """``wrote OUT: content, style (160 layers, 1.2 MiB); applied style x0.7; since training style x0.56``."""
    blocks = ", ".join(f.blocks) or "no B-LoRA block"
    text = f"wrote {f.path}: {blocks} ({count(f.modules, 'layer')}, {human_size(f.bytes)})"
    applied = {r: w for r, w in f.applied.items() if w != 1.0}
    if applied:
        text += "; applied " + ", ".join(f"{r} x{w:g}" for r, w in applied.items())
    baked = {r: w for r, w in f.weights.items() if w != 1.0}
    if baked and baked != applied:
        text += "; since training " + ", ".join(f"{r} x{w:g}" for r, w in baked.items())
    return text


def _written(f) -> Output:
    return f, [_describe_written(f)] + [f"note: {w}" for w in f.warnings]


def _add_split(p) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--blocks", type=block_names, help=f"only these blocks, comma-separated: {_BLOCK_HELP}")
    _add_layers(p, "attention")
    p.add_argument("--out-dir", metavar="DIR", type=output_path, help="folder for the files (default: FILE's folder)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    add_dtype_arg(p)


def _run_split(args) -> Output:
    from blora_network.tools.transforms import split

    result = split(args.file, out_dir=args.out_dir, roles=args.blocks, layers=args.layers, force=args.force,
                   progress=progress_bar(args), dtype=args.dtype)
    lines = [_describe_written(f) for f in result.files]
    if result.skipped_modules:
        lines.append(f"note: {count(result.skipped_modules, 'layer')} outside the chosen blocks' {args.layers} layers "
                     "were not written")
    return result, lines


def _add_combine(p) -> None:
    for role in ROLES:
        p.add_argument(f"--{role}", metavar="FILE", help=f"take the {role} block from FILE")
        p.add_argument(f"--{role}-weight", type=weight, metavar="W",
                       help=f"weight of the {role} block (default 1)")
    p.add_argument("--block", type=block_file, action="append", default=[], metavar="NAME=FILE",
                   help=f"take block NAME from FILE (repeat for more blocks): {_BLOCK_HELP}")
    p.add_argument("--weight", type=block_weight, action="append", default=[], metavar="NAME=W",
                   help="weight of a block given with --block (default 1)")
    _add_layers(p, "transformer")
    add_output_args(p)
    add_dtype_arg(p)


def _run_combine(args) -> Output:
    from blora_network.tools.transforms import BlockSource, combine

    sources = []
    for role in ROLES:
        path = getattr(args, role)
        w = getattr(args, f"{role}_weight")
        if path is None:
            if w is not None:
                raise BLoraError(f"--{role}-weight given without --{role} FILE")
            continue
        sources.append(BlockSource(role, path, 1.0 if w is None else w))
    _no_dups(args.block, "combine --block")
    _no_dups(args.weight, "combine --weight")
    weights = {lookup_sdxl_block(n).name: w for n, w in args.weight}
    named = {lookup_sdxl_block(n).name for n, _ in args.block}
    stray = [n for n in weights if n not in named]
    if stray:
        raise BLoraError(f"combine --weight {stray[0]}=...: no --block {stray[0]}=FILE to weigh")
    sources += [BlockSource(n, f, weights.get(lookup_sdxl_block(n).name, 1.0)) for n, f in args.block]
    if not sources:
        raise BLoraError("nothing to combine: give --content FILE, --style FILE, --layout FILE and/or --block NAME=FILE")
    return _written(combine(sources, args.output, layers=args.layers, force=args.force, progress=progress_bar(args),
                            dtype=args.dtype))


def _add_scale(p) -> None:
    p.add_argument("file", metavar="FILE")
    for role in ROLES:
        p.add_argument(f"--{role}", type=weight, metavar="W", help=f"weight of the {role} block")
    p.add_argument("--block", type=block_weight, action="append", default=[], metavar="NAME=W",
                   help=f"weight of any block, every layer of it (repeat for more): {_BLOCK_HELP}")
    p.add_argument("--lbw", metavar="VECTOR",
                   help="bake an A1111/Forge LoRA Block Weight SDXL vector (12 values: BASE,IN04,IN05,IN07,IN08,M00,"
                        "OUT00-OUT05; or 20: BASE,IN00-IN08,M00,OUT00-OUT08) as that extension applies it")
    p.add_argument("--inspire", metavar="VECTOR",
                   help="bake a ComfyUI Inspire Pack block_vector (BASE, then one value per UNet block the file "
                        "holds; 12 values or more) as LoraLoaderBlockWeight applies it")
    add_output_args(p)
    add_dtype_arg(p)


def _run_scale(args) -> Output:
    from blora_network.tools.transforms import scale

    weights = {r: getattr(args, r) for r in ROLES if getattr(args, r) is not None}
    _no_dups([*weights.items(), *args.block], "scale")
    weights.update(dict(args.block))
    if not weights and not (args.lbw or args.inspire):
        raise BLoraError("no weight given: pass --content W, --style W, --layout W, --block NAME=W, --lbw or --inspire")
    return _written(scale(args.file, weights, args.output, lbw=args.lbw, inspire=args.inspire, force=args.force,
                          progress=progress_bar(args), dtype=args.dtype))


def _add_extract(p) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--blocks", type=block_names, required=True, help=f"comma-separated: {_BLOCK_HELP}")
    _add_layers(p, "attention")
    add_output_args(p)
    add_dtype_arg(p)


def _run_extract(args) -> Output:
    from blora_network.tools.transforms import extract

    return _written(extract(args.file, args.blocks, args.output, layers=args.layers, force=args.force,
                            progress=progress_bar(args), dtype=args.dtype))


def _add_convert(p) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--to", choices=WRITE_SPELLINGS, default="kohya",
                   help="target names: kohya (default), diffusers (lora.down/lora.up) or peft (lora_A/lora_B)")
    add_output_args(p)


def _run_convert(args) -> Output:
    from blora_network.tools.transforms import convert

    return _written(convert(args.file, args.output, to=args.to, force=args.force, progress=progress_bar(args)))


FILE_COMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "inspect", "what a LoRA file holds, block by block",
        "Which B-LoRA blocks (content, style, layout, other) FILE holds, layer counts, rank and alpha, the "
        "Frobenius norm of each block's change dW, dtype, size, the training metadata that matters, and "
        "warnings (NaN/Inf, alpha different from rank, layers outside the B-LoRA blocks).",
        "  blora-network inspect my_blora.safetensors\n  blora-network inspect my_blora.safetensors --json",
        _add_inspect, _run_inspect),
    Subcommand(
        "analyze", "where a LoRA's change is: per UNet block and layer kind, and what to extract",
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
        "  blora-network analyze whole_unet.safetensors --plot whole_unet.png --top 10", _add_analyze, _run_analyze),
    Subcommand(
        "split", "write one file per B-LoRA block",
        "Write NAME_content.safetensors, NAME_style.safetensors and NAME_layout.safetensors (for the blocks "
        "FILE holds) beside FILE. Only the kept tensors are read.",
        "  blora-network split my_blora.safetensors\n"
        "  blora-network split my_blora.safetensors --blocks style --out-dir parts/", _add_split, _run_split),
    Subcommand(
        "combine", "content of one B-LoRA + style of another (+ layout), weighted",
        "Put the content block of A, the style block of B and optionally the layout block of C into one "
        "kohya LoRA file, each block's change multiplied by its weight (linearly: 0.5 halves dW). "
        "A weight of 0 leaves the block out. Negative weights are allowed.",
        "  blora-network combine --content dog.safetensors --style ink.safetensors --style-weight 0.8 "
        "-o dog_ink.safetensors", _add_combine, _run_combine),
    Subcommand(
        "scale", "bake per-block weights into a file",
        "Multiply each named block's change dW by its weight (exactly: LoRA scales lora_up, LoHa hada_w1_a, "
        "LoKr lokr_w1, never alpha; like every output, the file stores one alpha for its LoRA layers). Blocks "
        "not named keep weight 1; a weight of 0 removes the block; negative weights are allowed. DoRA layers "
        "accept only weight 1.",
        "  blora-network scale my_blora.safetensors --content 1.0 --style 0.6 -o my_blora_s06.safetensors",
        _add_scale, _run_scale),
    Subcommand(
        "extract", "keep only B-LoRA blocks of a whole-UNet LoRA",
        "From a regular SDXL LoRA (trained on the whole UNet, e.g. with sd-scripts' networks.lora) keep only "
        "the attention layers (attn1/attn2 to_q, to_k, to_v, to_out.0) of the chosen blocks: the layers "
        "the B-LoRA presets train. ff, proj_in/proj_out and everything else is left out.",
        "  blora-network extract whole_unet.safetensors --blocks content,style -o blora.safetensors",
        _add_extract, _run_extract),
    Subcommand(
        "convert", "diffusers/PEFT names (original B-LoRA) <-> kohya names",
        "Convert the original B-LoRA repository's output (diffusers names such as "
        "unet.up_blocks.0.attentions.0..., lora.down/lora.up or PEFT lora_A/lora_B, alpha = rank) to "
        "kohya names sd-scripts, ComfyUI and A1111 read; --to diffusers or --to peft goes back (alpha/rank is "
        "folded into the up factor, since those formats have no alpha).",
        "  blora-network convert blora_diffusers.safetensors -o blora_kohya.safetensors\n"
        "  blora-network convert blora_kohya.safetensors --to diffusers -o blora_diffusers.safetensors",
        _add_convert, _run_convert),
)
