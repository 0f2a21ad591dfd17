"""``check``: an sd-scripts training config or command line, read for every B-LoRA mistake before the run.

The network's own validation decides what fails: :func:`blora_network.network.kohya.network_options`
(preset, ``--network_args`` types, dims, alphas, learning rates) and the
:class:`~blora_network.network.kohya.BLoRANetwork` constructor on sd-scripts' full-size SDXL UNet
built on the meta device (every preset pattern must match; LyCORIS's own checks), so what
``check`` rejects is what ``create_network`` would reject at step 0, without a GPU or a model
file. The rest are sd-scripts' own startup failures (:mod:`blora_network.sdscripts.args`) and the
recipe's values (:data:`blora_network.sdscripts.recipe.PAPER`): findings are errors (the run would stop)
or warnings (it runs, but not as B-LoRA trains best).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from blora_network.errors import BLoraError

from .args import (
    SDXL_SCRIPT,
    TrainingArgs,
    check_words,
    config_args,
    is_dataset_config,
    parse_command_line,
    read_config_toml,
    split_network_arg,
    type_problem,
    unknown_keys,
    unrecognized_message,
)
from .kohya_gui import gui_run
from .recipe import PAPER

__all__ = ["Finding", "CheckReport", "check_run", "check_config", "check_gui_config", "check_command_line",
           "check_arguments"]

MODULE = "blora_network"
LR_FACTOR = 2.0
"""A learning rate this many times above or below the recipe's is "far" from it."""
_ADAPTIVE = ("prodigy", "dadapt", "adafactor")
"""Optimizers whose learning rate means something else (the recipe's lr does not apply)."""


@dataclass
class Finding:
    severity: str
    """``error`` (sd-scripts or the network would stop) or ``warning``."""
    key: str
    message: str


@dataclass
class CheckReport:
    source: str
    findings: list[Finding] = field(default_factory=list)
    network_kwargs: dict[str, str] = field(default_factory=dict)
    """``--network_args`` as sd-scripts hands them to ``create_network``."""
    errors: int = 0
    warnings: int = 0
    exit_status: int = 0
    """1 when the run would fail; what ``blora-network check`` exits with."""

    def add(self, severity: str, key: str, message: str) -> None:
        self.findings.append(Finding(severity, key, message))


def _network_kwargs(values: dict, report: CheckReport) -> Optional[dict[str, str]]:
    from blora_network.network.options import refuse_repeated_keys

    items = values.get("network_args") or []
    kwargs: dict[str, str] = {}
    for item in items:
        try:
            key, value = split_network_arg(item)
        except BLoraError as e:
            report.add("error", "network_args", str(e))
            return None
        if "=" in value:
            report.add("warning", "network_args", f"{item!r}: the value holds '=': sd-scripts v0.9 and earlier split on "
                                                  "every '=' and stop at startup (main splits on the first)")
        kwargs[key] = value
    try:
        refuse_repeated_keys(items)  # the network refuses it too, in prepare_network
    except BLoraError as e:
        report.add("error", "network_args", str(e))
    report.network_kwargs = kwargs
    return kwargs


def _check_module(values: dict, kwargs: dict[str, str], report: CheckReport, bad: frozenset = frozenset()) -> str:
    """``blora`` when the run uses blora_network, ``meant`` when it is missing or misspelt (the B-LoRA
    checks still apply), ``other`` for another module (its alpha and rate are still checked)."""
    module = values.get("network_module")
    if module is None and "network_module" in bad:
        return "meant"  # its type error says it all
    if module is None:
        report.add("error", "network_module", "not set: sd-scripts cannot import a network module; "
                                              "add network_module = \"blora_network\" (--network_module blora_network)")
        return "meant"
    if module == MODULE:
        return "blora"
    if module == "lycoris.kohya" and "preset" in kwargs:
        return _check_lycoris_preset(values, kwargs["preset"], report)
    if difflib.SequenceMatcher(None, module, MODULE).ratio() > 0.8:
        report.add("error", "network_module", f"{module!r}: no such module (sd-scripts stops: No module named ...); "
                                              f"did you mean {MODULE}?")
        return "meant"
    report.add("warning", "network_module", f"{module!r} is not B-LoRA: it trains its own layer choice, with "
                                            "sd-scripts' alpha; use network_module = \"blora_network\"")
    return "other"


def _check_other_module(values: dict, report: CheckReport, bad: frozenset = frozenset(), *, alpha_named: bool) -> None:
    """Another module keeps sd-scripts' alpha and rates: name what B-LoRA's recipe would change."""
    dim, alpha = values.get("network_dim"), values.get("network_alpha", 1.0)
    if not alpha_named and isinstance(dim, int) and dim > 0 and isinstance(alpha, (int, float)) and alpha != dim:
        report.add("warning", "network_alpha", f"{alpha:g} with network_dim {dim}: scale {alpha / dim:.4g} (the paper "
                                               "trains with alpha = dim; blora_network keeps alpha = dim)")
    _check_lrs(values, {}, report, bad)


def _check_lycoris_preset(values: dict, spec: str, report: CheckReport) -> str:
    """``meant`` for a blora_network preset name, ``other-alpha`` when the alpha was named, else ``other``."""
    from blora_network.network.presets import builtin_names, load_preset

    if spec in builtin_names():
        report.add("error", "network_module", f"lycoris.kohya with preset={spec}: {spec!r} is a blora_network preset name, "
                                              "not a LyCORIS one (LyCORIS tries to open it as a file and stops); use "
                                              f"network_module = \"{MODULE}\"")
        return "meant"
    try:
        roles = load_preset(spec).roles
    except BLoraError:
        roles = ()
    if roles:
        dim = values.get("network_dim")
        alpha = values.get("network_alpha", 1.0)
        scale = f" = scale {alpha / dim:.4g}" if isinstance(dim, int) and dim and isinstance(alpha, (int, float)) else ""
        report.add("warning", "network_module", f"lycoris.kohya with the B-LoRA preset {spec}: alpha stays at "
                                                f"network_alpha {alpha:g}{scale} (the paper uses alpha = dim); use "
                                                f"network_module = \"{MODULE}\", which keeps alpha = dim")
        return "other-alpha"
    report.add("warning", "network_module", "lycoris.kohya is not B-LoRA: use network_module = \"blora_network\"")
    return "other"


def _validated(values: dict, kwargs: dict[str, str], report: CheckReport):
    """(preset, options) as create_network makes them, or None after adding its error. When the
    preset is what fails, the rest of network_args is checked with the default preset too, so
    one run of ``check`` names every mistake."""
    from blora_network.network.kohya import network_options

    dim, alpha = values.get("network_dim"), values.get("network_alpha", 1.0)
    dropout = values.get("network_dropout")  # sd-scripts passes it as neuron_dropout
    try:
        preset, options = network_options(dim, alpha, dropout, **kwargs)
        _build_on_sdxl(preset, options)
        return preset, options
    except BLoraError as e:
        report.add("error", "network_args", str(e))
        first = str(e)
    if "preset" not in kwargs:
        return None
    rest = {k: v for k, v in kwargs.items() if k != "preset"}
    try:
        preset, options = network_options(dim, alpha, dropout, **rest)
        _build_on_sdxl(preset, options)
        return preset, options
    except BLoraError as e:
        if str(e) != first:
            report.add("error", "network_args", str(e))
    return None


def _check_network(values: dict, kwargs: dict[str, str], report: CheckReport, bad: frozenset = frozenset()) -> None:
    """What create_network would reject, by running its own validation; then the recipe's values."""
    checked = _validated(values, kwargs, report)
    if checked is None:
        _check_lrs(values, {}, report, bad)
        return
    preset, options = checked
    if options.alpha_given and options.alpha != options.dim:
        report.add("warning", "network_args", f"alpha={options.alpha:g} with dim {options.dim}: scale "
                                              f"{options.alpha / options.dim:.4g}; B-LoRA trains with alpha = dim "
                                              "(drop alpha= from network_args)")
    for role, a in options.block_alphas.items():
        if a != options.dim_for(role):
            report.add("warning", "network_args", f"{role}_alpha={a:g} with {role} dim {options.dim_for(role)}: the "
                                                  "block's scale is not 1 (alpha = dim is the recipe)")
    if options.train_text_encoder or preset.trains_text_encoder:
        report.add("warning", "network_args", "text-encoder training is on (train_text_encoder=true or a preset with "
                                              "text-encoder targets): B-LoRA trains the UNet only")
    _check_lrs(values, options.block_lrs, report, bad)


def _build_on_sdxl(preset, options) -> None:
    """The network's constructor on sd-scripts' full-size SDXL UNet (meta device), as ``plan`` builds it."""
    from blora_network.tools.plan import build_on_sdxl

    build_on_sdxl(preset, options)


def _far(lr: float) -> bool:
    return lr >= PAPER.learning_rate * LR_FACTOR or lr <= PAPER.learning_rate / LR_FACTOR


def _check_lrs(values: dict, block_lrs: dict[str, float], report: CheckReport, bad: frozenset = frozenset()) -> None:
    optimizer = str(values.get("optimizer_type") or "").lower()
    if any(name in optimizer for name in _ADAPTIVE) or {"unet_lr", "learning_rate"} & bad:
        return
    unet_lr = values.get("unet_lr")
    lr = values.get("learning_rate")
    key, used = ("unet_lr", unet_lr) if unet_lr is not None else ("learning_rate", lr if lr is not None else 2e-6)
    default = " (not set: sd-scripts' default)" if unet_lr is None and lr is None else ""
    if used <= 0 and not block_lrs:
        report.add("error", key, f"{key} {used:g}: the UNet is not trained (the network has nothing to optimize)")
    elif _far(used):
        report.add("warning", key, f"{key} {used:g}{default} is far from the recipe's {PAPER.learning_rate:g} "
                                   f"(whole-UNet LoRA rates such as 1e-4 overshoot on two blocks)")
    for role, block_lr in block_lrs.items():
        if block_lr > 0 and _far(block_lr):
            report.add("warning", "network_args", f"{role}_lr={block_lr:g} is far from the recipe's "
                                                  f"{PAPER.learning_rate:g}")


def _resolution(values: dict, report: CheckReport) -> tuple[Optional[Any], str]:
    """The resolution sd-scripts will use: the dataset config's, else the training config's."""
    dataset = values.get("dataset_config")
    if isinstance(dataset, str):
        try:
            data = read_config_toml(dataset, "dataset config")
        except BLoraError as e:
            report.add("error", "dataset_config", str(e))
            return None, ""
        if not is_dataset_config(data):
            report.add("error", "dataset_config", f"{dataset}: not a dataset config (no [[datasets]] table): sd-scripts "
                                                  "reads [general] and [[datasets]] here; give the dataset config "
                                                  "(NAME_dataset.toml from recipe), the training config goes to --config_file")
            return None, ""
        for table in [*(d for d in data.get("datasets", []) if isinstance(d, dict)), data.get("general", {})]:
            if isinstance(table, dict) and "resolution" in table:
                return table["resolution"], f"resolution in {dataset}"
    return values.get("resolution"), "resolution"


def _sides(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[1]
    parts = [int(p) for p in str(value).split(",")]  # what prepare_dataset_args does; ValueError otherwise
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) != 2:
        raise ValueError
    return parts[0], parts[1]


def _check_resolution(values: dict, report: CheckReport, bad: frozenset = frozenset()) -> None:
    if "resolution" in bad:
        return  # a training config's resolution is read even with a dataset config: its type error says it all
    value, key = _resolution(values, report)
    if value is None:
        if key:
            report.add("warning", "resolution", "not set: give resolution = \"1024,1024\" (SDXL's size)")
        return
    try:
        w, h = _sides(value)
    except ValueError:
        report.add("error", key, f"{value!r}: sd-scripts reads a resolution as SIZE or WIDTH,HEIGHT (e.g. \"1024,1024\") "
                                 "and stops on anything else")
        return
    area = w * h / (PAPER.resolution ** 2)
    if not 0.8 <= area <= 1.3 or w % 32 or h % 32:
        report.add("warning", key, f"{w}x{h} is not SDXL-sized: SDXL and B-LoRA's blocks were trained at about "
                                   "1024x1024 px (e.g. 1024,1024, 1152,896, 1216,832), sides multiples of 32")


def _check_startup(values: dict, report: CheckReport, bad: frozenset = frozenset()) -> None:
    """sd-scripts' own startup asserts that a B-LoRA config runs into."""
    if values.get("cache_text_encoder_outputs") and not values.get("network_train_unet_only"):
        report.add("error", "cache_text_encoder_outputs", "needs network_train_unet_only: sdxl_train_network.py asserts "
                                                          "it at startup; add network_train_unet_only = true")
    elif values.get("cache_text_encoder_outputs") and values.get("shuffle_caption"):
        report.add("error", "shuffle_caption", "cannot be used with cache_text_encoder_outputs (sdxl_train_network.py "
                                               "asserts it at startup); drop shuffle_caption")
    if values.get("network_train_text_encoder_only"):
        report.add("error", "network_train_text_encoder_only", "B-LoRA trains only UNet layers: with this flag nothing "
                                                               "is trained (the optimizer gets no parameters)")
    elif not values.get("network_train_unet_only") and "network_train_unet_only" not in bad:
        report.add("warning", "network_train_unet_only", "not set: sd-scripts keeps the text encoders in training "
                                                         "(more memory, no text-encoder output cache); add it")
    if values.get("mixed_precision") in (None, "no") and "mixed_precision" not in bad:
        report.add("warning", "mixed_precision", "not set (fp32): the recipe trains in bf16 (mixed_precision = \"bf16\")")


def _reading_findings(args: TrainingArgs, report: CheckReport) -> set:
    """What sd-scripts' parser and config reader make of the input, before any value is judged;
    the keys whose values it could not use."""
    for severity, key, message in args.findings:
        report.add(severity, key, message)
    if args.unknown:
        report.add("error", "command line", unrecognized_message(args.unknown))
    values = args.values
    bad_types = set()
    for key, value in values.items():
        problem = type_problem(key, value)
        if problem:
            report.add("error", key, problem + "; sd-scripts uses config values as TOML typed them")
            bad_types.add(key)
    for key, option in unknown_keys(values):
        hint = f" (did you mean {option}?)" if option else ""
        report.add("warning", key, f"not an option of sd-scripts' {SDXL_SCRIPT}{hint}; it ignores the key")
    return bad_types


def check_run(args: TrainingArgs) -> CheckReport:
    """Every finding for one run's options."""
    report = CheckReport(source=args.source)
    values = args.values
    bad_types = _reading_findings(args, report)
    bad = frozenset(bad_types)
    usable = {k: v for k, v in values.items() if k not in bad_types}
    kwargs = _network_kwargs(usable, report) if "network_args" not in bad_types else None
    module = _check_module(usable, kwargs or {}, report, bad)
    if module in ("blora", "meant") and kwargs is not None and not ({"network_dim", "network_alpha"} & bad_types):
        _check_network(usable, kwargs, report, bad)
    elif module.startswith("other"):
        _check_other_module(usable, report, bad, alpha_named=module == "other-alpha" or bool(bad_types & {"network_dim",
                                                                                                          "network_alpha"}))
    else:
        _check_lrs(usable, {}, report, bad)
    _check_resolution(usable, report, bad)
    _check_startup(usable, report, bad)
    report.errors = sum(1 for f in report.findings if f.severity == "error")
    report.warnings = len(report.findings) - report.errors
    report.exit_status = 1 if report.errors else 0
    return report


def check_config(path) -> CheckReport:
    """A training config (TOML), or a kohya_ss GUI config or preset (``.json``)."""
    if str(path).lower().endswith(".json"):
        return check_gui_config(path)
    return check_run(config_args(path))


def check_gui_config(path) -> CheckReport:
    """``check CONFIG.json``: the kohya_ss GUI's traps, then every check on the sd-scripts run it starts."""
    run, traps = gui_run(path)
    report = check_run(run)
    report.findings[:0] = [Finding(severity, key, message) for severity, key, message in traps]
    report.errors = sum(1 for f in report.findings if f.severity == "error")
    report.warnings = len(report.findings) - report.errors
    report.exit_status = 1 if report.errors else 0
    return report


def check_command_line(argv) -> CheckReport:
    return check_run(parse_command_line(argv))


def check_arguments(words) -> CheckReport:
    """``blora-network check WORDS``: a config, a config and options, or a command line (:func:`.args.check_words`);
    or a kohya_ss GUI config (``.json``), alone: its Additional parameters are the run's command-line options."""
    given = [w for w in words if w != "--"]
    if given and not given[0].startswith("-") and given[0].lower().endswith(".json"):
        if len(given) > 1:
            raise BLoraError(f"{given[0]}: a kohya_ss GUI config is checked alone ({' '.join(given[1:])} given after "
                             "it); put extra options in its Advanced > Additional parameters, or check the TOML and "
                             "command the GUI prints: check CONFIG.toml -- ARGS")
        return check_config(given[0])
    return check_run(check_words(words))
