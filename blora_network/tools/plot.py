"""The ``analyze --plot`` chart: the UNet's blocks in order, the B-LoRA blocks marked.

matplotlib is an optional extra (``pip install "blora-network[plot]"``); it is imported only
here and only when a chart is drawn. The figure is drawn with the Agg canvas directly
(no pyplot, no global backend switch), so it works headless and leaves a caller's matplotlib
settings alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from blora_network.errors import BLoraError, LoraFileError, count
from blora_network.files.safefile import atomic_target, check_output_path
from blora_network.sdxl.blocks import block_at
from blora_network.sdxl.names import SDXL_TRANSFORMER_BLOCKS, block_order

from .analyze import KIND_LABELS, KINDS, AnalyzeReport

__all__ = ["MatplotlibMissing", "INSTALL_HINT", "FORMATS", "FIGSIZE", "require_matplotlib", "check_plot_path",
           "build_figure", "render"]

INSTALL_HINT = 'pip install "blora-network[plot]" (or: pip install matplotlib)'
FORMATS = ("png", "svg", "pdf")
FIGSIZE = (14.0, 9.0)
"""Inches; at the default 100 dpi a PNG is 1400 x 900 pixels."""

KIND_COLORS = {"self_attn": "#2f5f9e", "cross_attn": "#7fb0e0", "ff": "#e59a3a", "proj": "#a775a8", "other": "#a3a3a3"}
ROLE_COLORS = {"content": ("#fde0dd", "#c0392b"), "style": ("#fff1b8", "#9a6a00"), "layout": ("#dff3df", "#2e7d32")}
"""role -> (background of its slot, text colour)."""


class MatplotlibMissing(BLoraError, ImportError):
    """``--plot`` without matplotlib installed."""


def require_matplotlib() -> None:
    """Fail early, in one line that says how to install it, when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise MatplotlibMissing(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None


def check_plot_path(path, *, inputs: Sequence = (), overwrite: bool = False) -> Path:
    """Refuse a chart path we must not or cannot write, before any work is done."""
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in FORMATS and not p.is_dir():  # a folder is named as one by check_output_path
        raise LoraFileError(f"{p}: the chart is written as PNG (or SVG/PDF); give a name ending in .png")
    return check_output_path(p, overwrite=overwrite, inputs=inputs, option="--plot", suffix=".png")


def _slots(report: AnalyzeReport) -> list[str]:
    """The blocks to draw: every SDXL transformer block (so the B-LoRA ones always show) and
    every other block the file changes, in UNet order."""
    return sorted({*SDXL_TRANSFORMER_BLOCKS, *(r.block for r in report.blocks)}, key=block_order)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.005 or x == 0 else "<1%"


def build_figure(report: AnalyzeReport):
    """The matplotlib Figure (Agg canvas attached), for callers that want to tweak or show it."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE)
    FigureCanvasAgg(fig)
    # fixed positions (figure fractions), so the PNG's size and layout never depend on the data
    ax = fig.add_axes((0.06, 0.40, 0.925, 0.46))
    axk = fig.add_axes((0.06, 0.115, 0.36, 0.11))
    axb = fig.add_axes((0.62, 0.115, 0.365, 0.11))
    slots = _slots(report)
    rows = {r.block: r for r in report.blocks}
    total_sq = report.unet_norm ** 2
    x = list(range(len(slots)))
    # the B-LoRA slots, shaded behind the bars
    for i, block in enumerate(slots):
        b = block_at(block)
        if b is not None:
            ax.axvspan(i - 0.5, i + 0.5, color=ROLE_COLORS[b.role][0], zorder=0)

    bottoms = [0.0] * len(slots)
    for kind in KINDS:
        heights = []
        for block in slots:
            r = rows.get(block)
            n = r.kinds.get(kind, 0.0) if r else 0.0
            heights.append(100 * n * n / total_sq if total_sq > 0 else 0.0)
        if any(h > 0 for h in heights) or report.kinds[kind].modules:
            ax.bar(x, heights, 0.72, bottom=bottoms, color=KIND_COLORS[kind], label=KIND_LABELS[kind], zorder=2,
                   edgecolor="white", linewidth=0.4)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
    top = max(bottoms) if max(bottoms) > 0 else 1.0
    ax.set_ylim(0, top * 1.32)  # headroom for the block labels, but no tick past 100%: no share is larger
    ticks = [t for t in ax.get_yticks() if 0 <= t <= min(100.0, top * 1.32)]
    ax.set_yticks(ticks)
    ax.spines["left"].set_bounds(0, ticks[-1])
    ax.set_xlim(-0.6, len(slots) - 0.4)
    ax.set_ylabel("share of the UNet's $\\|dW\\|_F^2$ (%)")
    ax.grid(axis="y", color="#dddddd", zorder=1)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    # labels: the block names; B-LoRA blocks bold and coloured, blocks the file lacks grey
    ax.set_xticks(x)
    ax.set_xticklabels(slots, rotation=60, ha="right", rotation_mode="anchor", fontsize=8.5)
    for tick, block in zip(ax.get_xticklabels(), slots):
        b = block_at(block)
        if b is not None:
            tick.set_color(ROLE_COLORS[b.role][1])
            tick.set_fontweight("bold")
        elif block not in rows:
            tick.set_color("#9a9a9a")
    for i, block in enumerate(slots):
        r = rows.get(block)
        b = block_at(block)
        if b is not None:
            share = next(s for s in report.blora if s.role == b.role)
            text = f"{b.role.upper()}\n{b.lbw}"
            if share.modules:
                text += f"\nattn {_pct(share.share)}"
            ax.text(i, top * 1.3, text, ha="center", va="top", fontsize=8.5, fontweight="bold",
                    color=ROLE_COLORS[b.role][1], zorder=3)
        if r is not None and (r.share >= 0.02 or b is not None):
            ax.text(i, bottoms[i] + top * 0.012, _pct(r.share), ha="center", va="bottom", fontsize=7.5, zorder=3)

    # where the down path, the middle and the up path are
    for head, label in (("input_blocks", "input (down)"), ("middle_block", "middle"), ("output_blocks", "output (up)")):
        idx = [i for i, s in enumerate(slots) if s.startswith(head)]
        if idx:
            ax.annotate("", xy=(idx[0] - 0.4, 1.012), xytext=(idx[-1] + 0.4, 1.012), xycoords=("data", "axes fraction"),
                        arrowprops=dict(arrowstyle="-", color="#777777", lw=1.2))
            ax.text((idx[0] + idx[-1]) / 2, 1.03, label, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=9, color="#555555")
    fig.legend(*ax.get_legend_handles_labels(), loc="upper right", bbox_to_anchor=(0.985, 0.992), ncol=5,
               fontsize=8.5, frameon=False, title=None, handlelength=1.2, columnspacing=1.2)
    name = _shorten(Path(report.file).name, 64)
    fig.text(0.06, 0.985, f"{name}: where the change is, per UNet block", fontsize=12.5, ha="left", va="top")
    measured = sum(r.modules for r in report.blocks)
    sub = f"UNet $\\|dW\\|_F$ {report.unet_norm:.4g} over {count(measured, 'layer')} (model {report.model})"
    if report.text_encoder_norm is not None:
        sub += f";  text encoders $\\|dW\\|_F$ {report.text_encoder_norm:.4g} (not in the shares)"
    fig.text(0.06, 0.948, sub, fontsize=9.5, ha="left", va="top", color="#444444")

    # by layer kind, whole UNet
    present = [k for k in KINDS if report.kinds[k].modules]
    vals = [100 * report.kinds[k].share for k in present]
    axk.barh(range(len(present)), vals, color=[KIND_COLORS[k] for k in present], height=0.65)
    axk.set_yticks(range(len(present)))
    axk.set_yticklabels([KIND_LABELS[k] for k in present], fontsize=8.5)
    axk.invert_yaxis()
    axk.set_xlim(0, 100)
    axk.set_title("whole UNet by layer kind\n% of the UNet's $\\|dW\\|_F^2$", fontsize=9.5, loc="left")
    for i, v in enumerate(vals):
        _bar_label(axk, i, v, f"{v:.1f}%")
    _tidy(axk)

    # the B-LoRA blocks' attention, what the suggestion reads
    labels = [f"{s.role} ({s.block})" for s in report.blora]
    vals = [100 * s.share for s in report.blora]
    axb.barh(range(3), vals, color=[ROLE_COLORS[s.role][1] for s in report.blora], height=0.65)
    axb.set_yticks(range(3))
    axb.set_yticklabels(labels, fontsize=8.5)
    for tick, s in zip(axb.get_yticklabels(), report.blora):
        tick.set_color(ROLE_COLORS[s.role][1])
    axb.invert_yaxis()
    axb.set_xlim(0, 100)
    axb.set_title(f"B-LoRA blocks: split of their attention change (attn1+attn2), %\n"
                  f"together they hold {_pct(report.blora_attention_share)} of the UNet's attention change",
                  fontsize=9.5, loc="left")
    for i, (v, s) in enumerate(zip(vals, report.blora)):
        _bar_label(axb, i, v, f"{v:.1f}%" if s.modules else "not in file")
    _tidy(axb)

    fig.text(0.06, 0.034, "suggestion: " + _wrap(report.suggestion.text, 165), fontsize=9.5, ha="left",
             va="bottom", color="#111111", fontweight="bold")
    if report.suggestion.command:
        fig.text(0.06, 0.008, report.suggestion.command, fontsize=8.5, ha="left", va="bottom", family="monospace",
                 color="#333333")
    return fig


def _bar_label(ax, i: int, v: float, text: str) -> None:
    """The value at the end of a bar on a 0-100 axis; inside a bar that nearly fills the axis (it
    would be clipped at the figure's edge beside it)."""
    if v > 85:
        ax.text(v - 1, i, text, va="center", ha="right", fontsize=8, color="white", fontweight="bold")
    else:
        ax.text(v + 1, i, text, va="center", fontsize=8)


def _tidy(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="x", labelsize=8)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width // 2 - 1] + "..." + text[-(width // 2 - 2):]


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:2])


def render(report: AnalyzeReport, path, *, dpi: int = 100, overwrite: bool = False, inputs: Sequence = ()) -> Path:
    """Draw the chart and write it to ``path`` atomically (PNG; SVG or PDF by the suffix)."""
    p = check_plot_path(path, inputs=inputs, overwrite=overwrite)
    fig = build_figure(report)
    fmt = p.suffix.lower().lstrip(".")
    with atomic_target(p) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return p
