"""The causal window on a GPU: our Triton kernels against compiled flex attention.

Run on a CUDA machine from the repository root:

    python benchmarks/window_gpu.py --out benchmarks/window_gpu.json

Issue 12 asks for the window through flex attention or a kernel, whichever measures
faster. Shape: batch 1, 64 query heads, 4 kv heads, head dim 128, window 512, causal,
bfloat16. In one run, at each length: do_bench medians of `sliding_window_attention_gpu`
(compiled flex attention, cached BlockMask) and `window_attention` (the kernels of
`nsa_tutorial.kernels.window`), forward and forward + backward, their agreement (relative
error of out, dq, dk, dv against each other), and at 64k the kernels' launch settings.

Flex attention runs as the layer ran it, one compiled function for every length: a
kernel specialised to the first length (8k), then, from the second length on, the one
compiled for dynamic shapes (`nsa_tutorial.sliding.compiled_flex_attention`).
`sliding_window_gpu.py` times flex compiled for each length on its own as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_run import run_record  # noqa: E402

from nsa_tutorial.kernels import window as kernels  # noqa: E402
from nsa_tutorial.sliding import sliding_window_attention_gpu  # noqa: E402

LENGTHS = [8192, 16384, 32768, 65536, 131072]
WINDOW = 512
PROVIDERS: dict[str, Callable] = {
    "flex": lambda q, k, v: sliding_window_attention_gpu(q, k, v, WINDOW, True),
    "ours": lambda q, k, v: kernels.window_attention(q, k, v, window=WINDOW),
}
SWEEP = [kernels.Launch(m, n, w, s) for m, n, w, s in [
    (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 8, 2),
    (128, 128, 8, 2), (64, 32, 4, 2), (128, 32, 4, 2),
]]  # fmt: skip


def inputs(n: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(n)
    shapes = [(1, 64, n, 128), (1, 4, n, 128), (1, 4, n, 128)]
    return [torch.randn(*s, device="cuda", generator=g).bfloat16().requires_grad_() for s in shapes]


def timings(run: Callable, leaves: list[torch.Tensor]) -> dict:
    grad = torch.randn_like(leaves[0])

    def forward():
        with torch.no_grad():
            run(*leaves)

    def forward_backward():
        torch.autograd.backward(run(*leaves), grad)

    forward_backward()  # compiles
    return {
        "forward_ms": do_bench(forward, warmup=25, rep=200, return_mode="median"),
        "forward_backward_ms": do_bench(forward_backward, warmup=25, rep=200,
                                        grad_to_none=leaves, return_mode="median"),
    }  # fmt: skip


def agreement(leaves: list[torch.Tensor]) -> dict:
    """Relative errors of our out, dq, dk, dv against flex attention's."""
    grad = torch.randn_like(leaves[0])
    results = {}
    for name, run in PROVIDERS.items():
        out = run(*leaves)
        results[name] = [out, *torch.autograd.grad(out, leaves, grad)]
    return {
        part: ((a.double() - b.double()).norm() / b.double().norm()).item()
        for part, a, b in zip(("out", "dq", "dk", "dv"), results["ours"], results["flex"],
                              strict=True)
    }  # fmt: skip


def sweep(n: int) -> list[dict]:
    chosen, rows = kernels.LAUNCH, []
    leaves = inputs(n)
    for launch in SWEEP:
        kernels.LAUNCH = launch
        try:
            row = {**dataclasses.asdict(launch), **timings(PROVIDERS["ours"], leaves)}
        except Exception as error:  # a launch that does not fit is recorded, not fatal
            row = {**dataclasses.asdict(launch), "error": f"{type(error).__name__}: {error}"[:200]}
        print(row, flush=True)
        rows.append(row)
    kernels.LAUNCH = chosen
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    parser.add_argument("--sweep", type=int, default=65536, help="length of the launch sweep")
    args = parser.parse_args()
    rows, record = [], {}

    def save():
        record.update(run_record(window=WINDOW, launch=dataclasses.asdict(kernels.LAUNCH),
                                 results=rows))  # fmt: skip
        args.out.write_text(json.dumps(record, indent=1) + "\n")

    for n in args.lengths:
        leaves = inputs(n)
        row = {"seq_len": n, **{name: timings(run, leaves) for name, run in PROVIDERS.items()}}
        row["agreement"] = agreement(leaves)
        print(json.dumps(row), flush=True)
        rows.append(row)
        save()
        torch.cuda.empty_cache()
    if args.sweep:
        record["sweep"] = sweep(args.sweep)
        save()
    print(f"\n{'tokens':>7} | {'flex fwd':>8} {'ours fwd':>8} | {'flex f+b':>8} {'ours f+b':>8}")
    for row in rows:
        f, o = row["flex"], row["ours"]
        print(f"{row['seq_len']:>7} | {f['forward_ms']:8.2f} {o['forward_ms']:8.2f} | "
              f"{f['forward_backward_ms']:8.2f} {o['forward_backward_ms']:8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
