"""Importance and top-n on a GPU: the one-pass Triton kernel against the PyTorch chunks.

Run on a CUDA machine from the repository root:

    python benchmarks/top_blocks_gpu.py --out benchmarks/top_blocks_gpu.json

Issue 12's layer shape: q (1, 64, n, 128) and compressed keys ck (1, 4, n / 16, 128) in
bfloat16, stride 16, selection blocks of 64, 16 picks shared by each GQA group of 16,
causal. At each length, in the same run: do_bench medians and peak memory of
`top_blocks_from_keys` (chunks of queries in PyTorch) and `top_blocks_kernel`, and how
far they agree (share of queries whose selected blocks are the same set, largest
difference of a probability).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_run import peak_gib, run_record  # noqa: E402

from nsa_tutorial.kernels.importance import top_blocks_from_keys  # noqa: E402
from nsa_tutorial.kernels.top_blocks import top_blocks_kernel  # noqa: E402

LENGTHS = [8192, 16384, 32768, 65536, 131072]
SETTINGS = dict(num_selected=16, stride=16, selection_block=64, group_size=16,
                interpolate=False, causal=True, scale=128**-0.5)  # fmt: skip
PATHS = {"pytorch_chunks": top_blocks_from_keys, "kernel": top_blocks_kernel}


def agreement(kernel: tuple, pytorch: tuple) -> dict:
    """Share of queries with the same set of selected blocks, and the largest probability
    difference (blocks past the 1e-10 threshold are the selected ones)."""
    (values, indices), (want_values, want_indices) = kernel, pytorch
    picked = torch.where(values > 1e-10, indices, -1).sort(dim=-1).values
    wanted = torch.where(want_values > 1e-10, want_indices, -1).sort(dim=-1).values
    same = (picked == wanted).all(dim=-1).float().mean().item()
    largest = (values - want_values).abs().max().item()
    return {"same_blocks_share": same, "max_value_difference": largest}


@torch.no_grad()
def row(n: int) -> dict:
    """Both paths at n tokens: their times, peaks and agreement."""
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, 64, n, 128, device="cuda", generator=g).bfloat16()
    ck = torch.randn(1, 4, n // 16, 128, device="cuda", generator=g).bfloat16()
    result: dict = {"seq_len": n}
    outputs = {}
    for name, find in PATHS.items():
        outputs[name] = find(q, ck, **SETTINGS)
        result[name] = {
            "ms": do_bench(lambda f=find: f(q, ck, **SETTINGS), warmup=25, rep=200,
                           return_mode="median"),
            "peak_gib": peak_gib(lambda f=find: f(q, ck, **SETTINGS)),
        }  # fmt: skip
    result["speedup"] = result["pytorch_chunks"]["ms"] / result["kernel"]["ms"]
    result["agreement"] = agreement(outputs["kernel"], outputs["pytorch_chunks"])
    return result


def main() -> None:
    """Every length, the JSON rewritten after each, then the short table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    args = parser.parse_args()
    rows = []
    for n in args.lengths:
        rows.append(row(n))
        print(json.dumps(rows[-1]), flush=True)
        record = run_record(settings=SETTINGS, results=rows)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        torch.cuda.empty_cache()
    print(f"\n{'tokens':>7} | {'PyTorch ms':>10} {'kernel ms':>9} {'speedup':>7} | same blocks")
    for r in rows:
        print(f"{r['seq_len']:>7} | {r['pytorch_chunks']['ms']:10.2f} {r['kernel']['ms']:9.2f} "
              f"{r['speedup']:7.1f} | {r['agreement']['same_blocks_share']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
