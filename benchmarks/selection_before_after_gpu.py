"""The selection kernel before and after issue 13, side by side in one run on a GPU.

Run from the repository root with the earlier kernel saved as a file:

    git show f7848b3:nsa_tutorial/kernels/selection.py > /tmp/selection_before.py
    python benchmarks/selection_before_after_gpu.py --before /tmp/selection_before.py \\
        --out benchmarks/selection_before_after_gpu.json

f7848b3's kernel walks each token's blocks and gives each key block one dk, dv program;
today's splits the forward and dq into shared tiles and per-token walks and cuts heavy
key blocks into chunks. Both time the same inputs (issue 7's shape, 64k tokens, GQA
groups 1, 4 and 16 with 4 kv heads) on every pattern of `nsa_tutorial.kernels.patterns`,
local_shared twice: as drawn by default (a quarter of each token's tile picks redrawn)
and with one pick redrawn per token (about issue 13's 67 distinct blocks per tile).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from functools import partial
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from gpu_run import run_record  # noqa: E402

from nsa_tutorial.kernels import patterns, selection  # noqa: E402

KV_HEADS, DIM, BLOCK, SELECTED, TOKENS = 4, 128, 64, 16, 65536
PATTERNS = {
    "uniform_random": patterns.uniform_random,
    "hot_block": patterns.hot_block,
    "local_shared": patterns.local_shared,
    "local_shared (1 of 12 redrawn)": partial(patterns.local_shared, varying=1 / 12),
}


def load_kernel(path: Path):
    """The module in `path` (a copy of an earlier selection.py)."""
    spec = importlib.util.spec_from_file_location("selection_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def problem(group: int, pattern: str, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, KV_HEADS * group, TOKENS, DIM, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(1, KV_HEADS, TOKENS, DIM, device="cuda", generator=g).bfloat16()
            for _ in "kv")  # fmt: skip
    indices, selected = PATTERNS[pattern](1, KV_HEADS, TOKENS, block_size=BLOCK,
                                          num_selected=SELECTED, generator=g, device="cuda")
    return q, k, v, indices, selected, torch.randn_like(q)


def times(kernel, q, k, v, indices, selected, grad_out) -> dict[str, float]:
    """Forward and forward + backward medians (ms) of `kernel.selection_attention`."""
    def run(*qkv):
        return kernel.selection_attention(*qkv, indices, selected, block_size=BLOCK,
                                          check_indices=False)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    return {
        "fwd_ms": do_bench(lambda: run(q, k, v), warmup=25, rep=200, return_mode="median"),
        "fwd_bwd_ms": do_bench(lambda: run(*leaves).backward(grad_out), warmup=25, rep=200,
                               grad_to_none=leaves, return_mode="median"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    before = load_kernel(args.before)
    report = run_record(tokens=TOKENS, kv_heads=KV_HEADS, dim_head=DIM, block=BLOCK,
                        selected=SELECTED, timing="do_bench median, warmup 25, rep 200 ms",
                        results=[])  # fmt: skip
    for group in (16, 4, 1):
        for pattern in PATTERNS:
            inputs = problem(group, pattern)
            row = {"group": group, "pattern": pattern,
                   "before": times(before, *inputs), "after": times(selection, *inputs)}
            report["results"].append(row)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            del inputs
            torch.cuda.empty_cache()
    print(f"{'group':>5} {'pattern':>31} | {'fwd before':>10} {'after':>7} | "
          f"{'f+b before':>10} {'after':>7}")
    for r in report["results"]:
        b, a = r["before"], r["after"]
        print(f"{r['group']:>5} {r['pattern']:>31} | {b['fwd_ms']:10.2f} {a['fwd_ms']:7.2f} | "
              f"{b['fwd_bwd_ms']:10.2f} {a['fwd_bwd_ms']:7.2f}")


if __name__ == "__main__":
    main()
