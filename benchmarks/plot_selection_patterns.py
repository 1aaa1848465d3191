"""Plot `selection_patterns_gpu.json` into `selection_patterns_gpu.png` (runs anywhere, no GPU):

    python benchmarks/plot_selection_patterns.py [--json J] [--out PNG]

Top row, one panel per selection pattern: every provider's forward (dashed) and forward
+ backward (solid) by length. Bottom row: the distinct blocks a 64-token tile reads per
pattern (the reuse a tile-sharing kernel has on offer, against 64 x s block reads one
token at a time); ours against SDPA by GQA group (fwd + bwd per unit of work, so equal
heights are equal efficiency); ours against SDPA by head dim. Logarithmic axes: equal
ratios are equal gaps. A provider that did not run (null) leaves a gap.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
COLORS = {"ours": "#5b8fc7", "fla": "#7cc08b", "xunhao": "#b07cc0", "sdpa": "#c9a27e"}
PATTERN_COLORS = {"uniform_random": "#5b8fc7", "hot_block": "#d0704f", "local_shared": "#7cc08b"}
TITLES = {
    "uniform_random": "(a) uniform random",
    "hot_block": "(b) hot block: own + block 0 + random",
    "local_shared": "(c) local and shared per tile",
}


def number(value: float | None) -> float:
    """A plottable value: NaN (a gap) for a provider that did not run."""
    return math.nan if value is None else value


def plot_patterns(axes: list, rows: list[dict]) -> None:
    """One panel per pattern: ms by length, every provider, fwd dashed, fwd + bwd solid."""
    names = list(dict.fromkeys(row["pattern"] for row in rows))
    for ax, pattern in zip(axes, names, strict=False):
        mine = [row for row in rows if row["pattern"] == pattern]
        lengths = [row["seq_len"] for row in mine]
        for provider, color in COLORS.items():
            for key, style in (("fwd_ms", "--"), ("fwd_bwd_ms", "-")):
                times = [number(row["providers"][provider][key]) for row in mine]
                label = provider if key == "fwd_bwd_ms" else None
                ax.plot(lengths, times, style, marker="o", ms=3, color=color, label=label)
        ax.set_title(TITLES.get(pattern, pattern), fontsize=10)
        tokens_axis(ax, lengths)
        ax.set_ylabel("ms (solid fwd + bwd, dashed fwd)")
        ax.legend(fontsize=7)


def plot_distinct(ax, rows: list[dict]) -> None:
    """Distinct blocks per 64-token tile by length, one line per pattern."""
    for pattern, color in PATTERN_COLORS.items():
        mine = [row for row in rows if row["pattern"] == pattern]
        if not mine:
            continue
        lengths = [row["seq_len"] for row in mine]
        counts = [row["distinct_blocks_per_tile"]["64"]["mean"] for row in mine]
        ax.plot(lengths, counts, marker="o", ms=3, color=color, label=pattern)
    ax.set_title("distinct blocks read per 64-token tile", fontsize=10)
    tokens_axis(ax, sorted({row["seq_len"] for row in rows}))
    ax.set_yscale("linear")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("blocks (mean over tiles)")
    ax.legend(fontsize=7)


def plot_coverage(ax, rows: list[dict], by: str, fixed: dict) -> None:
    """Ours and SDPA fwd + bwd per million (query head x token) against `by` (group or
    dim), over the coverage rows whose other axis is `fixed`."""
    mine = sorted(
        (r for r in rows if all(r[k] == v for k, v in fixed.items())), key=lambda r: r[by]
    )
    xs = [row[by] for row in mine]
    for provider in ("ours", "sdpa"):
        for key, style in (("fwd_ms_per_m_units", "--"), ("fwd_bwd_ms_per_m_units", "-")):
            values = [number(row[provider].get(key)) for row in mine]
            label = provider if style == "-" else None
            ax.plot(xs, values, style, marker="o", ms=3, color=COLORS[provider], label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    what = "query heads per kv head" if by == "group" else "head dim"
    where = ", ".join(f"{k} {v}" for k, v in fixed.items())
    ax.set_title(f"by {what} ({where}, {tokens_label(mine[0]['seq_len'])})" if mine else what,
                 fontsize=10)  # fmt: skip
    ax.set_xlabel(what)
    ax.set_ylabel("ms per M (head x token)")
    ax.legend(fontsize=7)


def tokens_axis(ax, lengths: list[int]) -> None:
    """Logarithmic tokens on x (labels in k), logarithmic y."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [tokens_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("tokens")


def tokens_label(n: int) -> str:
    """8192 -> '8k' (a count under 1024 as it is)."""
    return f"{n // 1024}k" if n >= 1024 else str(n)


def plot(record: dict, out: Path) -> None:
    """The figure of one benchmark record."""
    rows, coverage = record["results"], record.get("coverage", [])
    shape = record["shape"]
    group, dim = shape["heads"] // shape["kv_heads"], shape["dim"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    plot_patterns(list(axes[0]), rows)
    plot_distinct(axes[1][0], rows)
    if coverage:
        plot_coverage(axes[1][1], coverage, "group", {"dim": dim})
        plot_coverage(axes[1][2], coverage, "dim", {"group": group})
    else:
        for ax in axes[1][1:]:
            ax.set_axis_off()
    fig.suptitle(f"selection kernel on three selection patterns ({record['device']}, "
                 f"{shape['heads']} q / {shape['kv_heads']} kv heads, d {dim}, "
                 f"{shape['selected']} blocks of {shape['block']})", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=HERE / "selection_patterns_gpu.json")
    parser.add_argument("--out", type=Path, default=HERE / "selection_patterns_gpu.png")
    args = parser.parse_args()
    plot(json.loads(args.json.read_text()), args.out)


if __name__ == "__main__":
    main()
