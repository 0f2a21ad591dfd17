"""``blora-network``: the command line for B-LoRA files (also ``python -m blora_network``).

Argument parsing and printing only; the work is in the library modules. Every subcommand is
one :class:`Subcommand`: a parser builder (``add_arguments``) beside its handler (``run``), which
returns ``(data, lines)``: the JSON document for ``--json``, and the lines to print otherwise.
:func:`main` owns the rest, once for all of them:

- every problem the user can fix ends as one line on stderr and exit status 1 (2 for a wrong
  command line, with that subcommand's usage and the closest option), never a traceback;
- with ``--json``, stdout holds exactly one JSON document: anything else written while the
  work runs (a library's log lines) goes to stderr;
- a closed pipe (``| head``) ends the command quietly.

Nothing here imports torch, so ``--help`` and usage errors are instant.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import sys
from dataclasses import asdict, dataclass, is_dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence

from blora_network import __version__
from blora_network.errors import BLoraError
from blora_network.sdscripts import check as runcheck
from blora_network.sdscripts import recipe
from blora_network.sdxl.blocks import BLOCKS, ROLES, lookup_block
from blora_network.sdxl.names import WRITE_SPELLINGS
from blora_network.tools import demo

from .args import positive_int, roles, weight

__all__ = ["main", "build_parser", "Subcommand", "SUBCOMMANDS"]

PROG = "blora-network"
_ROLE_HELP = ", ".join(f"{b.role} ({b.ldm}, {b.lbw})" for b in BLOCKS)
Output = tuple[Any, list[str]]
"""What a handler returns: the ``--json`` document (a dataclass or plain data) and the text lines."""


@dataclass(frozen=True)
class Subcommand:
    """One ``blora-network NAME``: its help texts, its arguments and its handler."""

    name: str
    help: str
    description: str
    example: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Output]
    json: bool = True
    """Whether it offers ``--json``."""


# -- shared argument types and formatting --------------------------------------------------

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


class _Once(argparse.Action):
    """An option that may be given once: ``combine --content A --content B`` is a mistake to name,
    not a choice to make silently (argparse keeps the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        if before is not None and before != self.default:
            raise argparse.ArgumentError(self, f"given twice ({before} and {values}); give it once")
        setattr(namespace, self.dest, values)


def _out_args(p) -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUT", action=_Once, help="file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never an input file)")


def _printable(text: str) -> str:
    """Text from a file (metadata, key names) with control characters shown as escapes.

    Metadata is anybody's text: an ESC or BEL printed raw could clear the screen, retitle the
    terminal or hide lines. ``--json`` escapes them by itself.
    """
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)


# -- presets ----------------------------------------------------------------------------------

def _add_presets(p) -> None:
    pass


def _run_presets(args) -> Output:
    from blora_network.network.presets import DEFAULT_PRESET
    from blora_network.tools.plan import presets_summary

    items = presets_summary()
    lines = ["Built-in presets (Linear layers trained on sd-scripts' full-size SDXL UNet):"]
    width = max(len(p.name) for p in items) + 10
    for p in items:
        name = p.name + (" (default)" if p.name == DEFAULT_PRESET else "")
        blocks = ", ".join(f"{b.role} {b.ldm}: {p.blocks.get(b.ldm, 0)}" for b in map(lookup_block, p.roles))
        lines.append(f"  {name:<{width}} {p.modules:>4} layers   {blocks}")
    lines.append("Use one with: --network_module blora_network --network_args \"preset=NAME\"; "
                 "see a custom TOML with: blora-network plan --preset my.toml --dim 64")
    return [asdict(p) for p in items], lines


# -- plan -------------------------------------------------------------------------------------

def _add_plan(p) -> None:
    p.add_argument("--preset", required=True, help="built-in preset name or path of a TOML preset")
    p.add_argument("--dim", required=True, type=positive_int, help="LoRA rank (network_dim)")
    p.add_argument("--list", action="store_true", help="list every layer, not a summary per block")


def _layer_kinds(layers: Sequence[str]) -> str:
    from blora_network.sdxl.names import layer_kind_detail

    kinds: dict[str, int] = {}
    for name in layers:
        kind = layer_kind_detail(name)
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in kinds.items())


def _run_plan(args) -> Output:
    from blora_network.tools.plan import plan

    result = plan(args.preset, args.dim)
    lines = [f"preset {result.preset} ({result.source}) at rank {result.dim} on sd-scripts' full-size SDXL UNet",
             f"  {'block':<20} {'role':<8} {'layers':>6} {'parameters':>13}"]
    for b in result.blocks:
        lines.append(f"  {b.block:<20} {b.role or '-':<8} {b.modules:>6} {b.params:>13,}")
        lines += [f"      {layer}" for layer in b.layers] if args.list else [f"      {_layer_kinds(b.layers)}"]
    lines.append(f"  {'total':<20} {'':<8} {result.modules:>6} {result.params:>13,}")
    fb, ob = result.file_bytes, result.optimizer_bytes
    lines.append(f"file size: fp16 {_size(fb['fp16'])}, bf16 {_size(fb['bf16'])}, fp32 {_size(fb['fp32'])} "
                 "(plus training metadata, usually a few KiB)")
    lines.append(f"training memory for the adapter: fp32 weights {_size(ob['weights_fp32'])} + grads "
                 f"{_size(ob['grads_fp32'])} + AdamW states {_size(ob['adamw_states'])} = {_size(ob['total_adamw'])} "
                 f"(AdamW8bit states: {_size(ob['adamw8bit_states'])}); the UNet and activations come on top")
    lines += [f"note: {note}" for note in result.notes]
    return result, lines


# -- inspect ----------------------------------------------------------------------------------

def _add_inspect(p) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--no-norms", action="store_true",
                   help="skip the ||dW|| column (only matters for big high-rank files: costs about params x rank)")


def _run_inspect(args) -> Output:
    from blora_network.tools.inspection import inspect

    rep = inspect(args.file, norms=not args.no_norms, progress=_progress(args))
    dtypes = ", ".join(f"{d} x{n}" if len(rep.dtypes) > 1 else d for d, n in rep.dtypes.items())
    lines = [f"{rep.file}: {_size(rep.file_bytes)}, {rep.modules} layers, {dtypes}, "
             f"{'/'.join(rep.spellings)} names, model {rep.model}",
             f"  {'block':<8} {'where':<22} {'layers':>6} {'rank':>9} {'alpha':>9} {'algo':<10} {'||dW||':>10}"]
    for b in rep.blocks.values():
        where = f"{b.ldm} {b.lbw}" if b.ldm else f"{len(b.blocks)} blocks"
        ranks = "/".join(map(str, b.ranks)) or "-"
        alphas = "/".join(f"{a:g}" for a in b.alphas) or "-"
        norm = _norm(b.norm) if b.norm is not None else "-"
        lines.append(f"  {b.role:<8} {where:<22} {b.modules:>6} {ranks:>9} {alphas:>9} {','.join(b.algos):<10} {norm:>10}")
    if rep.training:
        lines.append(_printable("training: " + "; ".join(f"{k} {v}" for k, v in rep.training.items() if k != "network args")))
    lines += [_printable(f"warning: {w}") for w in rep.warnings]
    lines += [f"block weights, {v.name}: A1111/Forge lbw={v.lbw}  ComfyUI Inspire {v.inspire}" for v in rep.block_weights]
    return rep, lines


# -- analyze ----------------------------------------------------------------------------------

def _add_analyze(p) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--plot", metavar="OUT.png", help="also draw the chart as a PNG (.svg and .pdf work too)")
    p.add_argument("--top", type=positive_int, metavar="N",
                   help="list only the N blocks with the largest change (default: every block, in UNet order)")
    p.add_argument("--force", action="store_true", help="replace OUT.png if it exists")


def _norm(x: float) -> str:
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
    rep = analyze(args.file, progress=_progress(args))
    chart = None
    if args.plot:
        from blora_network.tools.plot import render

        chart = str(render(rep, args.plot, overwrite=args.force, inputs=[args.file]))
    te = (f"; text encoders: {sum(t.modules for t in rep.text_encoders)} layers, ||dW||_F "
          f"{rep.text_encoder_norm:.4g} (not in the shares)" if rep.text_encoders else "")
    lines = [f"{rep.file}: model {rep.model}, {rep.unet_modules} UNet layers ({'/'.join(rep.spellings)} names), "
             f"UNet ||dW||_F {rep.unet_norm:.4g}{te}"]
    kinds = [k for k in KINDS if rep.kinds[k].modules]
    total_sq = rep.unet_norm ** 2 or 1.0
    head = "".join(f" {KIND_LABELS[k]:>10}" for k in kinds)
    lines.append(f"  {'block':<18} {'role':<12} {'layers':>6} {'||dW||_F':>10} {'share':>7}{head}")
    rows = rep.blocks if args.top is None else sorted(rep.blocks, key=lambda r: -r.share)[: args.top]
    for r in rows:
        role = f"{r.role} {r.lbw}" if r.role else "-"
        cells = "".join(f" {_share(r.kinds[k] ** 2 / total_sq) if k in r.kinds else '-':>10}" for k in kinds)
        lines.append(f"  {r.block:<18} {role:<12} {r.modules:>6} {_norm(r.norm):>10} {_share(r.share):>7}{cells}")
    shown = {r.block for r in rows}
    hidden = [r for r in rep.blocks if r.block not in shown]
    if hidden:
        lines.append(f"  ... and {len(hidden)} more blocks ({_share(sum(r.share for r in hidden))} together)")
    cells = "".join(f" {_share(rep.kinds[k].share):>10}" for k in kinds)
    lines.append(f"  {'UNet':<18} {'':<12} {sum(r.modules for r in rep.blocks):>6} {_norm(rep.unet_norm):>10} "
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
    text = f"wrote {f.path}: {blocks} ({f.modules} layers, {_size(f.bytes)})"
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
    p.add_argument("--blocks", type=roles, help=f"only these blocks, comma-separated: {_ROLE_HELP}")
    p.add_argument("--out-dir", metavar="DIR", help="folder for the files (default: FILE's folder)")
    p.add_argument("--force", action="store_true", help="replace existing files")


def _run_split(args) -> Output:
    from blora_network.tools.transforms import split

    result = split(args.file, out_dir=args.out_dir, roles=args.blocks, force=args.force, progress=_progress(args))
    lines = [_describe_written(f) for f in result.files]
    if result.skipped_modules:
        lines.append(f"note: {result.skipped_modules} layers outside the B-LoRA blocks were not written")
    return result, lines


def _add_combine(p) -> None:
    for role in ROLES:
        p.add_argument(f"--{role}", metavar="FILE", action=_Once, help=f"take the {role} block from FILE")
        p.add_argument(f"--{role}-weight", type=weight, metavar="W", action=_Once,
                       help=f"weight of the {role} block (default 1)")
    _out_args(p)


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
    if not sources:
        raise BLoraError("nothing to combine: give --content FILE, --style FILE and/or --layout FILE")
    return _written(combine(sources, args.output, force=args.force, progress=_progress(args)))


def _add_scale(p) -> None:
    p.add_argument("file", metavar="FILE")
    for role in ROLES:
        p.add_argument(f"--{role}", type=weight, metavar="W", action=_Once, help=f"weight of the {role} block")
    _out_args(p)


def _run_scale(args) -> Output:
    from blora_network.tools.transforms import scale

    weights = {r: getattr(args, r) for r in ROLES if getattr(args, r) is not None}
    if not weights:
        raise BLoraError("no weight given: pass --content W, --style W and/or --layout W")
    return _written(scale(args.file, weights, args.output, force=args.force, progress=_progress(args)))


def _add_extract(p) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--blocks", type=roles, required=True, help=f"comma-separated: {_ROLE_HELP}")
    _out_args(p)


def _run_extract(args) -> Output:
    from blora_network.tools.transforms import extract

    return _written(extract(args.file, args.blocks, args.output, force=args.force, progress=_progress(args)))


def _add_convert(p) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--to", choices=WRITE_SPELLINGS, default="kohya",
                   help="target names: kohya (default), diffusers (lora.down/lora.up) or peft (lora_A/lora_B)")
    _out_args(p)


def _run_convert(args) -> Output:
    from blora_network.tools.transforms import convert

    return _written(convert(args.file, args.output, to=args.to, force=args.force, progress=_progress(args)))


# -- the table of subcommands -----------------------------------------------------------------

SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "presets", "list the built-in presets and the layers each trains",
        "The built-in presets, with the B-LoRA blocks and the number of Linear layers each selects on "
        "sd-scripts' full-size SDXL UNet.", "  blora-network presets --json", _add_presets, _run_presets),
    Subcommand(
        "plan", "dry run: what a preset trains at a rank, file size, optimizer memory",
        "Without any model file: the layers a preset (built-in name or TOML path) trains on sd-scripts' "
        "full-size SDXL UNet, per block; the parameter count (220,160 x dim per B-LoRA block); the file size "
        "at fp16/bf16/fp32; and the adapter's AdamW memory. A preset that selects nothing is refused, as "
        "training would refuse it.",
        "  blora-network plan --preset content_style --dim 64\n"
        "  blora-network plan --preset my_preset.toml --dim 32 --list", _add_plan, _run_plan),
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
    Subcommand("demo", demo.HELP, demo.DESCRIPTION, demo.EXAMPLE, demo.add_arguments, demo.run),
    Subcommand(
        "recipe", "a folder of images -> the paper's sd-scripts run (training + dataset config, command)",
        "Check IMAGES as sd-scripts will read them (images, sizes below 1024 px, caption files and the trigger "
        "token, files it would stop on), then write OUT_DIR/NAME.toml (--config_file: the B-LoRA recipe: "
        "blora_network, rank 64 = alpha, UNet only, AdamW 5e-5 constant, 1000 steps, batch 1, 1024 px, bf16, "
        "gradient checkpointing, cached latents) and OUT_DIR/NAME_dataset.toml (--dataset_config), and print "
        "the accelerate launch line. --lowvram adds sd-scripts' memory savers for a 12 GB card.",
        "  blora-network recipe photos/ --model sd_xl_base_1.0.safetensors -o runs/dog --token \"A [v]\"\n"
        "  blora-network recipe photos/ --model sd_xl_base_1.0.safetensors -o runs/dog --preset style --lowvram",
        recipe.add_arguments, recipe.run),
    Subcommand(
        "check", "name every B-LoRA mistake in an sd-scripts config or command line, before the run",
        "Read an sd-scripts training config (--config_file TOML) or, after --, its command line, and report "
        "every B-LoRA mistake: network_module, alpha= different from dim, text-encoder training, a learning "
        "rate far from the recipe, a resolution that is not SDXL's, a preset that does not resolve, "
        "network_args the network would reject at step 0 (it runs the network's own validation on SDXL's "
        "layer names), values sd-scripts would stop on. Exit 1 when the run would fail, 0 otherwise.",
        "  blora-network check runs/dog/dog.toml\n"
        "  blora-network check -- --config_file runs/dog/dog.toml --learning_rate 1e-4\n"
        "  blora-network check --json -- accelerate launch sdxl_train_network.py --network_module blora_network ...",
        runcheck.add_arguments, runcheck.run),
)


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
    for command in SUBCOMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description,
                           epilog="example:\n" + command.example, formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(p)
        if command.json:
            p.add_argument("--json", action="store_true", help="print one JSON document for scripts (logs go to stderr)")
        p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
        p.set_defaults(_command=command, _parser=p)
    return parser


def _closest_options(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """``; did you mean --style?`` for an option that is not the subcommand's."""
    options = [s for action in parser._actions for s in action.option_strings if action.help != argparse.SUPPRESS]
    hints = []
    for word in unknown:
        if not word.startswith("-"):
            continue
        flag = word.split("=", 1)[0]
        close = difflib.get_close_matches(flag.replace("_", "-"), options, n=1, cutoff=0.6)
        if close and close[0] not in hints:
            hints.append(close[0])
    return f"; did you mean {' or '.join(hints)}?" if hints else ""


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While the work runs, fd 1 is fd 2: a library printing or logging to stdout (LyCORIS logs
    there, in colour) cannot get in front of the JSON document."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _to_json(data: Any) -> str:
    return json.dumps(asdict(data) if is_dataclass(data) else data, indent=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 a problem with the input, 2 a wrong command line)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command: Optional[Subcommand] = getattr(args, "_command", None)
    if command is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 2
    if unknown:
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}{_closest_options(args._parser, unknown)}")
    prefix = f"{PROG} {command.name}: error:"
    as_json = bool(getattr(args, "json", False))
    try:
        try:
            with _stdout_to_stderr() if as_json else contextlib.nullcontext():
                data, lines = command.run(args)
        except (BLoraError, OSError) as e:  # OSError: disk full, permission denied while writing...
            print(f"{prefix} {_one_line(e)}", file=sys.stderr)
            return 1
        except MemoryError:
            print(f"{prefix} out of memory; close other programs or use a machine with more memory", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; no partial file was left behind", file=sys.stderr)
            return 130
        except Exception as e:  # a bug of ours: still one line, and an exit status of its own
            print(f"{prefix} unexpected {type(e).__name__}: {_one_line(e)} (this is a bug in blora-network "
                  f"{__version__}; please report it with the command line)", file=sys.stderr)
            return 3
        print(_to_json(data) if as_json else "\n".join(lines))
        sys.stdout.flush()
        return int(getattr(data, "exit_status", 0))  # check: 1 when the run it read would fail
    except BrokenPipeError:  # `blora-network ... | head`: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _one_line(e: BaseException) -> str:
    return _printable(" ".join(str(e).split()))
