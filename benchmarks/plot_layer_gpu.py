"""Plot `layer_gpu.json` into `layer_gpu.png` (runs anywhere, no GPU):

    python benchmarks/plot_layer_gpu.py

Left: the NSA layer against the full-attention layer, forward and forward + backward, by
length. Right: the three branches with gates, ours against the peers' stacks, forward +
backward. Both axes are logarithmic, so equal ratios are equal gaps.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    record = json.loads((HERE / "layer_gpu.json").read_text())
    rows = record["results"]
    lengths = [row["seq_len"] for row in rows]
    fig, (layers, stacks) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("forward_ms", "--"), ("forward_backward_ms", "-")):
        label = "forward" if key == "forward_ms" else "fwd + bwd"
        for name, title, color in (("nsa", "NSA", "#5b8fc7"), ("full", "full", "#c9a27e")):
            times = [row[name][key] for row in rows]
            layers.plot(lengths, times, style, marker="o", color=color, label=f"{title}, {label}")
    layers.set_title("the whole layer (H200, bfloat16)")
    providers = list(rows[0]["branches_with_gates"])
    for name, color in zip(providers, ("#5b8fc7", "#7cc08b", "#b07cc0"), strict=False):
        times = [row["branches_with_gates"][name].get("forward_backward_ms") for row in rows]
        stacks.plot(lengths, times, marker="o", color=color, label=name)
    stacks.set_title("three branches with gates, fwd + bwd")
    for ax in (layers, stacks):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "layer_gpu.png", dpi=110)


if __name__ == "__main__":
    main()
