"""The Triton compressed-attention kernels on a GPU, against the PyTorch path and flex attention.

Run on a CUDA machine from the repository root:

    python benchmarks/compressed_kernel_gpu.py --out benchmarks/compressed_kernel_gpu.json

The committed JSON came from the command in its "command" field, run on the lent H200
with --out under the machine's output folder, and copied back here.

Shape (the compressed branch of SparseAttention at the paper's sizes): batch 1, 64 query
heads, 4 kv heads, head dim 128, bfloat16, compression stride 16, one memory token,
causal, so w = n / 16 compressed keys (the compression block size, 32, does not matter:
these kernels see compressed tokens). Three ways to compute the same output:
- ours: `nsa_tutorial.kernels.compressed.compressed_attention`;
- pytorch: `nsa_tutorial.compress.compressed_attention`, the reference path, which makes
  (n, m + w) logits for every head (timed while it fits in memory);
- flex: torch's flex_attention under torch.compile (dynamic shapes: one compile serves
  every length, as in a model), a mask_mod of the same mask, GQA through enable_gqa, its
  block mask built once per length.
Each is timed in one run with triton.testing.do_bench (median), forward alone and forward
+ backward, with its peak memory beyond what was allocated before (inputs). Agreement:
relative error against the PyTorch path in float32 on the same bfloat16 inputs, for the
last 1024 queries at every length, and for all outputs and gradients at the first length.

`--sweep T` first times variants of the launch table at length T (each kernel alone),
then the dk, dv kernel's split of rows (rows_per_program, chunks) at every length, and
runs the rest with the fastest; LAUNCH in nsa_tutorial/kernels/compressed.py holds what
it chose.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_run import peak_gib, run_record  # noqa: E402

from nsa_tutorial import compress  # noqa: E402
from nsa_tutorial.kernels import compressed as kernel  # noqa: E402

HEADS, KV_HEADS, DIM, STRIDE, MEMORY = 64, 4, 128, 16, 1
LENGTHS = [8192, 16384, 32768, 65536]
DTYPE = torch.bfloat16
TAIL = 1024  # queries checked against the float32 reference at every length
Launch = kernel.Launch

# (block_m, block_n, num_warps, num_stages[, rows_per_program, chunks]); the first of each
# is LAUNCH's, the second Triton's fused-attention tutorial's choice for Hopper
FORWARD_VARIANTS = [Launch(64, 64, 4, 3), Launch(128, 64, 8, 3), Launch(128, 128, 8, 3),
                    Launch(64, 128, 4, 3)]
DQ_VARIANTS = [Launch(128, 64, 8, 3), Launch(128, 32, 4, 5), Launch(64, 64, 4, 3),
               Launch(128, 128, 8, 3)]
DKV_VARIANTS = [Launch(64, 128, 8, 3, 4096, 64), Launch(32, 128, 4, 5, 4096, 64),
                Launch(64, 128, 8, 2, 4096, 64), Launch(128, 128, 8, 2, 4096, 64),
                Launch(64, 64, 4, 3, 4096, 64)]
# (rows_per_program, chunks) of the dk, dv kernel: LAUNCH's rule, 4096 or 16384 rows at
# every length here, and one program per key tile
SPLITS = [(4096, 64), (4096, 1024), (16384, 1024), (0, 1)]


def make_inputs(n: int, seed: int = 0):
    """q (1, 64, n, 128), memory + compressed keys and values (1, 4, 1 + n // 16, 128), dO."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    num_keys = MEMORY + n // STRIDE
    q = torch.randn(1, HEADS, n, DIM, device="cuda", generator=g).to(DTYPE)
    ck, cv = (torch.randn(1, KV_HEADS, num_keys, DIM, device="cuda", generator=g).to(DTYPE)
              for _ in "kv")
    return q, ck, cv, torch.randn_like(q)


def ours(q, ck, cv):
    return kernel.compressed_attention(q, ck, cv, num_memory=MEMORY, stride=STRIDE, causal=True)


def pytorch(q, ck, cv):
    return compress.compressed_attention(q, ck, cv, MEMORY, STRIDE, True)[0]


def compressed_mask_mod(b, h, q_idx, kv_idx):
    """compressed_causal_mask as a flex mask_mod: memory, or a block that ended before q."""
    return (kv_idx < MEMORY) | ((kv_idx - MEMORY + 1) * STRIDE - 1 < q_idx)


FLEX = torch.compile(flex_attention, dynamic=True)


def flex_for(n: int):
    """Flex attention at length n, with its block mask built once."""
    block_mask = create_block_mask(compressed_mask_mod, None, None, n, MEMORY + n // STRIDE,
                                   device="cuda")

    def flex(q, ck, cv):
        return FLEX(q, ck, cv, block_mask=block_mask, enable_gqa=True)

    return flex


def relative_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def time_ms(fn, grads=None) -> float:
    return do_bench(fn, warmup=50, rep=300, grad_to_none=grads, return_mode="median")


def out_of_memory(error: Exception) -> str:
    torch.cuda.empty_cache()
    return f"out of memory: {str(error).splitlines()[0][:120]}"


def measure(fn, q, ck, cv, grad_out) -> dict:
    """Forward and forward + backward: median ms and peak GiB (None where out of memory)."""
    row = {}

    def forward():
        with torch.no_grad():
            fn(q, ck, cv)

    leaves = [t.clone().requires_grad_() for t in (q, ck, cv)]

    def forward_backward():
        fn(*leaves).backward(grad_out)

    for name, step, grads in (("fwd", forward, None), ("fwd_bwd", forward_backward, leaves)):
        try:
            row[f"{name}_ms"] = time_ms(step, grads)
            for leaf in leaves:
                leaf.grad = None
            row[f"{name}_peak_gib"] = peak_gib(step)
        except torch.OutOfMemoryError as error:
            row[f"{name}_ms"] = row[f"{name}_peak_gib"] = None
            row[f"{name}_error"] = out_of_memory(error)
        for leaf in leaves:
            leaf.grad = None
    return row


def visible_pairs(n: int) -> int:
    """(query, key) pairs the causal mask keeps, per query head: sum over t of 1 + t // 16."""
    blocks, rest = divmod(n, STRIDE)
    return MEMORY * n + STRIDE * blocks * (blocks - 1) // 2 + rest * blocks


def forward_tflops(n: int, ms: float | None) -> float | None:
    """Two products of 2 * DIM FLOPs per visible pair and query head, per second."""
    return None if ms is None else 4 * DIM * HEADS * visible_pairs(n) / ms / 1e9


def tail_agreement(n: int, q, ck, cv, runners: dict) -> dict:
    """Relative error of the last TAIL outputs of each runner against float32 PyTorch."""
    expected = compress.compressed_attention(
        q[:, :, -TAIL:].float(), ck.float(), cv.float(), MEMORY, STRIDE, True,
        first_query=n - TAIL,
    )[0]
    errors = {}
    for name, fn in runners.items():
        try:
            with torch.no_grad():
                errors[name] = relative_error(fn(q, ck, cv)[:, :, -TAIL:], expected)
        except torch.OutOfMemoryError as error:
            errors[name] = out_of_memory(error)
        except Exception as error:  # noqa: BLE001
            errors[name] = f"{type(error).__name__}: {str(error)[:200]}"
    return errors


def gradient_agreement(n: int, runners: dict) -> dict:
    """Output and gradients of each runner against float32 PyTorch, all of them."""
    q, ck, cv, grad_out = make_inputs(n, seed=1)
    wide = [t.float().requires_grad_() for t in (q, ck, cv)]
    expected = pytorch(*wide)
    expected = [expected, *torch.autograd.grad(expected, wide, grad_out.float())]
    errors = {}
    for name, fn in runners.items():
        leaves = [t.clone().requires_grad_() for t in (q, ck, cv)]
        try:
            out = fn(*leaves)
            actual = [out, *torch.autograd.grad(out, leaves, grad_out)]
        except Exception as error:  # noqa: BLE001
            errors[name] = f"{type(error).__name__}: {str(error)[:200]}"
            continue
        errors[name] = {key: relative_error(a, b) for key, a, b in
                        zip(["out", "dq", "dck", "dcv"], actual, expected, strict=True)}
    return errors


def passes(n: int) -> dict:
    """Each kernel of ours at length n, as a callable to time."""
    q, ck, cv, grad_out = make_inputs(n)
    settings = (MEMORY, STRIDE, True, DIM**-0.5)
    out, lse = kernel._forward(q, ck, cv, *settings)
    _, delta = kernel._backward_dq(grad_out, q, ck, cv, out, lse, *settings)
    return {
        "forward": lambda: kernel._forward(q, ck, cv, *settings),
        "dq": lambda: kernel._backward_dq(grad_out, q, ck, cv, out, lse, *settings),
        "dkv": lambda: kernel._backward_dkv(grad_out, q, ck, cv, lse, delta, *settings),
    }


def describe(launch: Launch) -> str:
    return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(launch).items())


def try_time(fn) -> float | str:
    """Milliseconds, or why the variant did not run (too much shared memory, say)."""
    try:
        return time_ms(fn)
    except Exception as error:  # noqa: BLE001  (a variant that fails is a result too)
        return f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


def sweep(n: int, lengths: list[int]) -> dict:
    """Each kernel's variants at length n, then the dk, dv kernel's split of rows at every
    length; leaves the fastest in kernel.LAUNCH."""
    timers = passes(n)
    results = {}
    for kind, variants in (("forward", FORWARD_VARIANTS), ("dq", DQ_VARIANTS),
                           ("dkv", DKV_VARIANTS)):
        times = []
        for launch in variants:
            kernel.LAUNCH[kind] = launch
            times.append(try_time(timers[kind]))
            print(f"  {kind:8s} {describe(launch)}: {times[-1]}", flush=True)
        ran = [(ms, launch) for ms, launch in zip(times, variants, strict=True)
               if isinstance(ms, float)]
        kernel.LAUNCH[kind] = min(ran, key=lambda pair: pair[0])[1]
        results[kind] = {describe(launch): ms for launch, ms in zip(variants, times, strict=True)}
    dkv = kernel.LAUNCH["dkv"]
    split_times = {}
    for length in lengths:
        timer = passes(length)["dkv"]
        split_times[length] = {}
        for rows, chunks in SPLITS:
            kernel.LAUNCH["dkv"] = dataclasses.replace(dkv, rows_per_program=rows, chunks=chunks)
            split_times[length][f"rows_per_program={rows} chunks={chunks}"] = time_ms(timer)
        print(f"  dkv splits at {length}: {split_times[length]}", flush=True)
    # the fewest ms relative to each length's best, summed over the lengths
    slowdown = [sum(list(t.values())[i] / min(t.values()) for t in split_times.values())
                for i in range(len(SPLITS))]
    rows, chunks = SPLITS[slowdown.index(min(slowdown))]
    kernel.LAUNCH["dkv"] = dataclasses.replace(dkv, rows_per_program=rows, chunks=chunks)
    results["dkv_splits"] = {str(k): v for k, v in split_times.items()}
    return results


def benchmark(n: int, with_gradients: bool) -> dict:
    q, ck, cv, grad_out = make_inputs(n)
    runners = {"ours": ours, "flex": flex_for(n), "pytorch": pytorch}
    row = {"seq_len": n, "compressed_keys": MEMORY + n // STRIDE}
    for name, fn in runners.items():
        try:
            row[name] = measure(fn, q, ck, cv, grad_out)
            row[name]["fwd_tflops"] = forward_tflops(n, row[name]["fwd_ms"])
        except Exception as error:  # noqa: BLE001  (flex may fail to compile: report it)
            row[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        print(f"  {n} {name}: {row[name]}", flush=True)
    row["agreement_last_queries"] = tail_agreement(n, q, ck, cv, runners)
    if with_gradients:
        row["agreement_with_gradients"] = gradient_agreement(n, runners)
    print(f"  {n} agreement: {row['agreement_last_queries']}", flush=True)
    return row


def cell(row: dict, key: str, digits: int = 2) -> str:
    """One number of the table: "OOM" where it ran out of memory, "-" where it failed."""
    if "error" in row:
        return "-"
    return "OOM" if row[key] is None else f"{row[key]:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    parser.add_argument("--sweep", type=int, default=None,
                        help="first sweep the launch settings at this length")
    args = parser.parse_args()
    report = run_record(
        shape=dict(batch=1, heads=HEADS, kv_heads=KV_HEADS, dim_head=DIM, stride=STRIDE,
                   num_memory=MEMORY, causal=True, dtype=str(DTYPE)),
        timing="triton.testing.do_bench median, warmup 50 ms, rep 300 ms",
        memory="peak GiB allocated beyond what was allocated before the call",
        agreement=f"relative error vs the PyTorch path in float32 on the same inputs: the "
                  f"last {TAIL} queries at every length, all outputs and gradients at the "
                  f"first",
    )  # fmt: skip
    if args.sweep:
        report["sweep"] = {"seq_len": args.sweep, "ms": sweep(args.sweep, args.lengths)}
    report["launch"] = {name: dataclasses.asdict(s) for name, s in kernel.LAUNCH.items()}
    print("launch:", report["launch"], flush=True)
    breakdown_at = args.sweep or args.lengths[-1]
    report["breakdown"] = {"seq_len": breakdown_at,
                           "ms": {name: time_ms(fn) for name, fn in passes(breakdown_at).items()}}
    print("breakdown:", report["breakdown"], flush=True)
    report["results"] = []
    for i, n in enumerate(args.lengths):
        report["results"].append(benchmark(n, with_gradients=i == 0))
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{'n':>6} | {'fwd ms: ours':>12} {'flex':>7} {'pytorch':>8} | "
          f"{'fwd+bwd ms: ours':>16} {'flex':>7} {'pytorch':>8} | "
          f"{'peak GiB f+b: ours':>18} {'flex':>6} {'pytorch':>8} | {'ours TFLOP/s':>12}")
    for r in report["results"]:
        o, f, p = r["ours"], r["flex"], r["pytorch"]
        print(f"{r['seq_len']:>6} | {cell(o, 'fwd_ms'):>12} {cell(f, 'fwd_ms'):>7} "
              f"{cell(p, 'fwd_ms'):>8} | {cell(o, 'fwd_bwd_ms'):>16} {cell(f, 'fwd_bwd_ms'):>7} "
              f"{cell(p, 'fwd_bwd_ms'):>8} | {cell(o, 'fwd_bwd_peak_gib'):>18} "
              f"{cell(f, 'fwd_bwd_peak_gib'):>6} {cell(p, 'fwd_bwd_peak_gib'):>8} | "
              f"{cell(o, 'fwd_tflops', 0):>12}")
    print("agreement (relative error vs float32):")
    for r in report["results"]:
        print(f"  {r['seq_len']}: {r['agreement_last_queries']}")
    print("  gradients:", report["results"][0].get("agreement_with_gradients"))


if __name__ == "__main__":
    main()
