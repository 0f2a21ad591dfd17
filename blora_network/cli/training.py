"""The subcommands around a training run: presets, plan, demo, recipe, check.

As in :mod:`blora_network.cli.files`, each handler calls one library function (:mod:`blora_network.tools`,
:mod:`blora_network.sdscripts`) and turns the dataclass it returns into lines.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from blora_network.errors import BLoraError, count
from blora_network.sdscripts.check import check_arguments
from blora_network.sdscripts.recipe import PAPER, write_recipe
from blora_network.sdxl.blocks import lookup_block, sdxl_block_of
from blora_network.tools import demo

from .args import output_path, positive_int, positive_number
from .subcommand import Output, Subcommand, human_size

__all__ = ["TRAINING_COMMANDS"]


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
        lines.append(f"  {name:<{width}} {p.modules:>4} {'layer ' if p.modules == 1 else 'layers'}  {blocks}")
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
             f"  {'block':<20} {'role':<8} {'rank':>5} {'layers':>6} {'parameters':>13}"]
    for b in result.blocks:
        lbw = getattr(sdxl_block_of(b.block), "name", None)
        lines.append(f"  {b.block:<20} {b.role or lbw or '-':<8} {b.rank:>5} {b.modules:>6} {b.params:>13,}")
        lines += [f"      {layer}" for layer in b.layers] if args.list else [f"      {_layer_kinds(b.layers)}"]
    lines.append(f"  {'total':<20} {'':<8} {'':>5} {result.modules:>6} {result.params:>13,}")
    fb, ob = result.file_bytes, result.optimizer_bytes
    lines.append(f"file size: fp16 {human_size(fb['fp16'])}, bf16 {human_size(fb['bf16'])}, fp32 {human_size(fb['fp32'])} "
                 "(plus training metadata, usually a few KiB)")
    lines.append(f"training memory for the adapter: fp32 weights {human_size(ob['weights_fp32'])} + grads "
                 f"{human_size(ob['grads_fp32'])} + AdamW states {human_size(ob['adamw_states'])} = {human_size(ob['total_adamw'])} "
                 f"(AdamW8bit states: {human_size(ob['adamw8bit_states'])}); the UNet and activations come on top")
    lines += [f"note: {note}" for note in result.notes]
    return result, lines


# -- demo ---------------------------------------------------------------------------------------

_DEMO_HELP = "train a content_style B-LoRA for a few steps on a tiny built-in SDXL-shaped UNet"
_DEMO_DESCRIPTION = (
    "Train a B-LoRA end to end with the calls sd-scripts makes, on a small UNet with sd-scripts' "
    "SDXL module names and synthetic data (no download), then save it and report what was trained."
)
_DEMO_EXAMPLE = "  blora-network demo --steps 30 -o demo.safetensors"


def _add_demo(p) -> None:
    p.add_argument("--preset", default="content_style", help="built-in preset name or TOML path (default: content_style)")
    p.add_argument("--dim", type=positive_int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--steps", type=positive_int, default=30, help="training steps (default: 30)")
    p.add_argument("--lr", type=positive_number, default=1e-3, help="learning rate (default: 1e-3)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: 1, the fastest for this tiny model, on a busy machine too)")
    p.add_argument("-o", "--output", type=output_path, default="blora_demo.safetensors", help="file to write (default: blora_demo.safetensors)")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")


def _run_demo(args) -> Output:
    """Train, save, and report."""
    import logging

    from blora_network.network import kohya  # noqa: F401  imports LyCORIS, whose import sets its logger to INFO

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # the summary below says what it would log
    result = demo.train(preset=args.preset, dim=args.dim, steps=args.steps, lr=args.lr, device=args.device,
                   output=args.output, force=args.force, threads=args.threads,
                   progress=not (args.json or args.no_progress))
    where = result.device + (f", {result.threads} torch thread{'s' if result.threads != 1 else ''}"
                             f"{' (the fastest for this tiny model; --threads N to change)' if args.threads is None else ''}"
                             if result.threads else "")
    lines = [f"blora-network demo: preset {result.preset}, rank {result.dim}, {result.steps} AdamW steps on {where}; "
             f"torch {result.torch}"]
    for role, s in result.blocks.items():
        lines.append(f"  {role:<8} {s['modules']:>4} {'module ' if s['modules'] == 1 else 'modules'}  {s['parameters']:>9,} parameters  rank {s['rank']}  alpha {s['alpha']:g}")
    lines.append(f"  trainable parameters: {result.trainable_parameters:,}")
    lines.append(f"  loss: {result.loss_before:.6f} -> {result.loss_after:.6f} "
                 f"({(1 - result.loss_after / result.loss_before) * 100:.1f}% lower)")
    if result.file:
        lines.append(f"  wrote {result.file} ({result.file_bytes:,} bytes, bf16, kohya LoRA format) for the demo's tiny "
                     "UNet, not for SDXL: try the tools on it (blora-network inspect/split/combine)")
    lines.append(f"  took {result.seconds:.1f} s")
    if result.note:
        lines.append(f"note: {result.note}")
    return result, lines


# -- recipe -------------------------------------------------------------------------------------

def _add_recipe(p) -> None:
    p.add_argument("images", metavar="IMAGES", help="folder of training images (one is enough for B-LoRA), with "
                                                    "optional caption files NAME.txt; or the kohya layout "
                                                    "IMAGES/N_class tokens/ (N repeats)")
    p.add_argument("--model", required=True, metavar="SDXL.safetensors", help="the SDXL base checkpoint to train on")
    p.add_argument("-o", "--out-dir", required=True, metavar="OUT_DIR", type=output_path,
                   help="folder for NAME.toml, NAME_dataset.toml and NAME_kohya_gui.json (created if missing); the LoRA "
                        "is saved there too")
    p.add_argument("--name", help="name of the run and of the files (default: the image folder's name)")
    p.add_argument("--preset", default="content_style", help="built-in preset or a preset TOML (default content_style)")
    p.add_argument("--token", default=PAPER.token, help=f"trigger token, the caption of an image without a caption "
                                                         f"file (default {PAPER.token!r}, the paper's)")
    p.add_argument("--steps", type=int, default=PAPER.steps, help=f"training steps (default {PAPER.steps})")
    p.add_argument("--rank", type=int, default=PAPER.dim, help=f"LoRA rank; alpha = rank (default {PAPER.dim})")
    p.add_argument("--caption-extension", metavar="EXT", help="caption file extension (default: .txt, or .caption "
                                                              "if the folder uses it)")
    p.add_argument("--lowvram", action="store_true", help="add sd-scripts' memory savers for a 12 GB card")
    p.add_argument("--force", action="store_true", help="replace existing config files")


def _scan_lines(result) -> list[str]:
    scan = result.scan
    images = scan.usable
    captions = sum(1 for i in images if i.caption_file)
    sizes = sorted({f"{i.width}x{i.height}" for i in images})
    shown = ", ".join(sizes[:6]) + (f" and {count(len(sizes) - 6, 'more size')}" if len(sizes) > 6 else "")
    token = (f"{len(scan.subsets)} kohya folder(s) N_class tokens" if scan.kohya_layout else
             f"trigger token {scan.token!r}")
    lines = [f"{scan.folder}: {len(images)} image(s) ({shown}), {captions} with a caption file "
             f"({scan.caption_extension}), {token}"]
    lines += [f"  {Path(s.image_dir).name}/: {s.images} image(s), {s.num_repeats} repeats, class tokens {s.class_tokens!r}"
              for s in scan.subsets if scan.kohya_layout]
    for i in images:
        token = "with" if i.has_token else "WITHOUT"
        cap = (f"caption {i.caption!r} ({token} the token)" if i.caption_file else
               f"no caption file (caption {i.class_tokens!r} from class_tokens)")
        lines.append(f"  {Path(i.file).name}: {i.width}x{i.height}, {cap}")
    return lines


def _run_recipe(args) -> Output:
    if args.steps < 1 or args.rank < 1:
        raise BLoraError(f"--steps and --rank must be at least 1 (got --steps {args.steps}, --rank {args.rank})")
    result = write_recipe(args.images, model=args.model, out_dir=args.out_dir, name=args.name, preset=args.preset,
                          token=args.token, steps=args.steps, rank=args.rank, lowvram=args.lowvram,
                          caption_extension=args.caption_extension, force=args.force)
    lines = _scan_lines(result) + [f"note: {n}" for n in result.notes]
    lines.append(f"wrote {result.training_config} (training config: preset {result.preset}, rank {result.rank}, alpha "
                 f"{result.rank}, AdamW lr {PAPER.learning_rate:g} constant, {result.steps} steps, batch 1, 1024 px, bf16)")
    if result.num_repeats is not None:
        lines.append(f"wrote {result.dataset_config} (dataset config: {result.num_repeats} repeats per image, so one "
                     "epoch covers the run)")
    else:
        epochs = result.steps / result.epoch_steps
        lines.append(f"wrote {result.dataset_config} (dataset config: one subset per kohya folder, with its repeats and "
                     f"class tokens; an epoch is images x repeats = {result.epoch_steps} steps at batch 1, and the run "
                     f"stops at max_train_steps {result.steps}, {epochs:.3g} epoch(s))")
    for o in result.lowvram:
        lines.append(f"--lowvram: {o.key} = {str(o.value).lower()}: {o.why} (sd-scripts {o.source})")
    lines += [f"--lowvram leaves out {k}: {why}" for k, why in result.lowvram_left_out.items()]
    lines += ["run it from your sd-scripts folder:", f"  {result.command}",
              "options given after it override the file, e.g. --max_train_steps 1500 --learning_rate 4e-5"]
    lines += [f"wrote {result.gui_preset} (the same run for the kohya_ss GUI: copy it into the GUI's "
              "presets/lora/user_presets/ folder and pick it in the LoRA tab's Parameters > Presets, or open it with "
              "Configuration > Open; it reads the images through the dataset config, so the GUI's "
              "'N_token class' subfolder layout is not needed)"]
    return result, lines


# -- check --------------------------------------------------------------------------------------

def _add_check(p) -> None:
    p.add_argument("words", nargs="*", metavar="CONFIG.toml | CONFIG.json | -- ARGS",
                   help="an sd-scripts training config (--config_file) or a kohya_ss GUI config or preset (.json); "
                        "after -- the sd-scripts command line (accelerate launch sdxl_train_network.py ... or just "
                        "its options); CONFIG.toml -- ARGS reads as --config_file CONFIG.toml ARGS")


def _run_check(args) -> Output:
    report = check_arguments(args.words)
    lines = [f"{f.severity}: {f.key}: {f.message}" for f in report.findings]
    verdict = ("would fail: fix the errors above before training" if report.errors else
               "ok to train" + (" (see the warnings)" if report.warnings else ": every value follows the B-LoRA recipe"))
    lines.append(f"{report.source}: {report.errors} error(s), {report.warnings} warning(s); {verdict}")
    return report, lines


TRAINING_COMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "presets", "list the built-in presets and the layers each trains",
        "The built-in presets, with the B-LoRA blocks and the number of Linear layers each selects on "
        "sd-scripts' full-size SDXL UNet.", "  blora-network presets --json", _add_presets, _run_presets),
    Subcommand(
        "plan", "dry run: what a preset trains at a rank, file size, optimizer memory",
        "Without any model file: the layers a preset (built-in name or TOML path) trains on sd-scripts' "
        "full-size SDXL UNet, per block, built as training builds it (a preset's [blora] dims, 0 turning a "
        "block off); the parameter count (220,160 x rank per B-LoRA block); the file size "
        "at fp16/bf16/fp32; and the adapter's AdamW memory. A preset that selects nothing is refused, as "
        "training would refuse it.",
        "  blora-network plan --preset content_style --dim 64\n"
        "  blora-network plan --preset my_preset.toml --dim 32 --list", _add_plan, _run_plan),
    Subcommand("demo", _DEMO_HELP, _DEMO_DESCRIPTION, _DEMO_EXAMPLE, _add_demo, _run_demo),
    Subcommand(
        "recipe", "a folder of images -> the paper's sd-scripts run (training + dataset config, command)",
        "Check IMAGES as sd-scripts will read them (images, sizes its bucketing enlarges, caption files and the "
        "trigger token, files it would stop on, truncated images included; a kohya folder layout IMAGES/10_sks dog/ "
        "is read as sd-scripts reads it: 10 repeats, class tokens 'sks dog'), then write OUT_DIR/NAME.toml "
        "(--config_file: the B-LoRA recipe: "
        "blora_network, rank 64 = alpha, UNet only, AdamW 5e-5 constant, 1000 steps, batch 1, 1024 px, bf16, "
        "gradient checkpointing, cached latents) and OUT_DIR/NAME_dataset.toml (--dataset_config), and print "
        "the accelerate launch line. --lowvram adds sd-scripts' memory savers for a 12 GB card.",
        "  blora-network recipe photos/ --model sd_xl_base_1.0.safetensors -o runs/dog --token \"A [v]\"\n"
        "  blora-network recipe photos/ --model sd_xl_base_1.0.safetensors -o runs/dog --preset style --lowvram",
        _add_recipe, _run_recipe),
    Subcommand(
        "check", "name every B-LoRA mistake in an sd-scripts config or command line, before the run",
        "Read an sd-scripts training config (--config_file TOML), a kohya_ss GUI config or preset (JSON: the GUI's "
        "traps first, then the run it would start) or, after --, its command line, and report "
        "every B-LoRA mistake: network_module, alpha= different from dim, text-encoder training, a learning "
        "rate far from the recipe, a resolution that is not SDXL's, a preset that does not resolve, "
        "network_args the network would reject at step 0 (it runs the network's own validation on SDXL's "
        "layer names), values sd-scripts would stop on. A command line is read as sd-scripts' parser reads it "
        "(every option, abbreviations, --config_file first and the options over it; any other word is "
        "'unrecognized arguments'). Exit 1 when the run would fail, 0 otherwise.",
        "  blora-network check runs/dog/dog.toml\n"
        "  blora-network check runs/dog/dog.toml -- --learning_rate 1e-4\n"
        "  blora-network check runs/dog/dog_kohya_gui.json\n"
        "  blora-network check --json -- accelerate launch sdxl_train_network.py --network_module blora_network ...",
        _add_check, _run_check),
)
