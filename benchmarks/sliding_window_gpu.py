"""The sliding window on a GPU: the chunked PyTorch path, compiled flex attention, SDPA.

Run on a CUDA machine from the repository root:

    python benchmarks/sliding_window_gpu.py --out benchmarks/sliding_window_gpu.json

The committed JSON came from `--out $OUT/sliding_window_gpu.json` on the lent H200 (its
"command" field), copied back here.

Shape (issue: sliding window on the GPU): batch 1, 64 query heads, 4 kv heads, head dim
128, window 512, causal, bfloat16. Timed in one run with triton.testing.do_bench
(median; calls over 100 ms: the median of three), forward alone (no autograd) and
forward + backward, with the peak memory each takes above its inputs:

- chunked: `sliding_window_attention`, the readable PyTorch path (chunks of the window);
- flex: `sliding_window_attention_gpu`, compiled flex attention with a cached BlockMask,
  compiled afresh at each length (as a run at one length gets it: a kernel for that
  length); its mask build and first calls (compiling) are reported apart, not timed;
- flex_dynamic: the same once a run has seen two lengths, when dynamo compiles one
  kernel for every length (automatic dynamic shapes);
- sdpa: full causal attention with enable_gqa, for scale.

Also: chunked and flex against a float32 reference; the not-causal window once at 16k;
and what padding the keys (the not-causal zero-key quirk) costs, at a length that is no
multiple of the window.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_run import peak_gib, run_record  # noqa: E402

from nsa_tutorial import sliding  # noqa: E402
from nsa_tutorial.sliding import (  # noqa: E402
    sliding_window_attention,
    sliding_window_attention_gpu,
    sliding_window_flex_mask,
)

HEADS, KV_HEADS, DIM, WINDOW = 64, 4, 128, 512
LENGTHS = [8192, 16384, 32768, 65536, 131072]
DTYPE = torch.bfloat16
DEVICE = "cuda"
FLOAT32_CHECK_UP_TO = 32768  # the float32 chunked reference needs ~3 x 34 GiB at 128k
# This script compiles more variants of flex attention (grad and no grad, causal and
# not, static and dynamic, padded and not) than one model does: lift dynamo's limit.
torch._dynamo.config.recompile_limit = 16


def make_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q (1, HEADS, n, DIM), k, v (1, KV_HEADS, n, DIM) and a gradient for the output."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shapes = [(1, HEADS, n, DIM), (1, KV_HEADS, n, DIM), (1, KV_HEADS, n, DIM)]
    q, k, v = (torch.randn(s, device=DEVICE, generator=g).to(DTYPE) for s in shapes)
    return q, k, v, torch.randn(q.shape, device=DEVICE, generator=g).to(DTYPE)


def chunked(causal: bool) -> Callable:
    return lambda q, k, v: sliding_window_attention(q, k, v, WINDOW, causal)


def flex(causal: bool) -> Callable:
    return lambda q, k, v: sliding_window_attention_gpu(q, k, v, WINDOW, causal)


def flex_unpadded(n: int) -> Callable:
    """Not causal, flex over the n real keys only: no zero keys past the end, so it
    differs from the chunked path near the end when n is no multiple of the window."""
    mask = sliding._window_block_mask(n, n, WINDOW, False, torch.device(DEVICE), 128)
    attend = sliding.compiled_flex_attention()
    return lambda q, k, v: sliding._flex_window(q, k, v, mask, None, attend)


PATHS = {"chunked": chunked, "flex": flex}


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def time_ms(fn: Callable) -> float:
    """Median milliseconds of fn: do_bench, or, for calls over 100 ms (SDPA at 128k),
    the median of three after one (do_bench's estimate alone would run it five times)."""
    if seconds(fn) > 0.1:
        return sorted(seconds(fn) * 1e3 for _ in range(3))[1]
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def seconds(fn: Callable) -> float:
    """Wall time of one call, GPU work included (first calls: compiling)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def guarded(measure: Callable):
    """measure(), or the error's name and first line (out of memory at long lengths)."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001  (recorded in the JSON, the run goes on)
        torch.cuda.empty_cache()
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def measure(name: str, fn: Callable, inputs, grad_out, first_calls: bool = False) -> dict:
    """Forward and forward + backward times and peak memory of fn(q, k, v)."""
    leaves = [t.clone().requires_grad_() for t in inputs]

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def clear_grads():
        for t in leaves:
            t.grad = None

    def step():
        clear_grads()
        fn(*leaves).backward(grad_out)

    row = {}
    if first_calls:  # compiling happens here, kept out of the timings below
        row[f"{name}_first_fwd_s"] = guarded(lambda: seconds(forward))
        row[f"{name}_first_fwd_bwd_s"] = guarded(lambda: seconds(step))
    row[f"{name}_fwd_ms"] = guarded(lambda: time_ms(forward))
    row[f"{name}_fwd_bwd_ms"] = guarded(lambda: time_ms(step))
    row[f"{name}_fwd_peak_gib"] = guarded(lambda: peak_gib(forward))
    clear_grads()  # else the last step's gradients count as allocated before the next
    row[f"{name}_fwd_bwd_peak_gib"] = guarded(lambda: peak_gib(step))
    print(f"  {name}: " + ", ".join(f"{k}={_short(v)}" for k, v in row.items()), flush=True)
    return row


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def agreement(n: int, causal: bool, with_grads: bool) -> dict:
    """Chunked and flex (bf16) against the chunked path in float32 on the same inputs;
    past FLOAT32_CHECK_UP_TO, flex against chunked, both bf16."""
    q, k, v, grad_out = make_inputs(n, seed=1)
    with torch.no_grad():
        ours = {"chunked": chunked(causal)(q, k, v), "flex": flex(causal)(q, k, v)}
        if n > FLOAT32_CHECK_UP_TO:
            return {"flex_vs_chunked_bf16": relative_error(ours["flex"], ours["chunked"])}
        expected = chunked(causal)(q.float(), k.float(), v.float())
    errors = {f"{name}_out": relative_error(out, expected) for name, out in ours.items()}
    del ours, expected
    if with_grads:
        wide = [t.float().requires_grad_() for t in (q, k, v)]
        expected = torch.autograd.grad(chunked(causal)(*wide), wide, grad_out.float())
        for name in ("chunked", "flex"):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            grads = torch.autograd.grad(PATHS[name](causal)(*leaves), leaves, grad_out)
            for part, a, b in zip(("dq", "dk", "dv"), grads, expected, strict=True):
                errors[f"{name}_{part}"] = relative_error(a, b)
    return errors


def mask_build_ms(n: int, causal: bool) -> float:
    """Building the BlockMask on the GPU, uncached (median of three, after one)."""

    def build():
        return sliding_window_flex_mask(n, WINDOW, causal, DEVICE)

    build()
    return sorted(seconds(build) * 1e3 for _ in range(3))[1]


def window_flops(n: int) -> float:
    """Matrix FLOPs of the causal forward: two products over the keys each query sees."""
    keys = n + WINDOW * (WINDOW - 1) // 2 + (n - WINDOW) * WINDOW  # sum of min(i, w) + 1
    return 4 * HEADS * DIM * keys


def benchmark(n: int, causal: bool = True, with_sdpa: bool = True) -> dict:
    """All three paths at length n; flex as a run of this one length sees it: compiled
    afresh (dynamo reset), so its kernel is specialised to n."""
    torch._dynamo.reset()
    row = {"seq_len": n, "causal": causal, "mask_build_ms": mask_build_ms(n, causal)}
    q, k, v, grad_out = make_inputs(n)
    row |= measure("flex", flex(causal), (q, k, v), grad_out, first_calls=True)
    row |= measure("chunked", chunked(causal), (q, k, v), grad_out)
    if with_sdpa:
        row |= measure("sdpa", sdpa, (q, k, v), grad_out)
    if causal and isinstance(row["flex_fwd_ms"], float):
        row["flex_fwd_tflops"] = window_flops(n) / row["flex_fwd_ms"] / 1e9
    del q, k, v, grad_out
    torch.cuda.empty_cache()
    row["agreement"] = guarded(lambda: agreement(n, causal, with_grads=n == LENGTHS[0]))
    torch.cuda.empty_cache()
    return row


def dynamic_kernel(lengths: list[int]) -> list[dict]:
    """Flex once a run has seen two lengths: dynamo then compiles one kernel for every
    length (automatic dynamic shapes). Two lengths no row uses make it; the rows then
    time it at each length (their first calls show that nothing compiles again)."""
    torch._dynamo.reset()
    for n in (4096, 6144):
        q, k, v, grad_out = make_inputs(n)
        measure_first_calls(flex(True), (q, k, v), grad_out)
    rows = []
    for n in lengths:
        q, k, v, grad_out = make_inputs(n)
        row = measure("flex_dynamic", flex(True), (q, k, v), grad_out, first_calls=True)
        rows.append({"seq_len": n} | row)
    return rows


def measure_first_calls(fn: Callable, inputs, grad_out) -> None:
    """Call fn forward (no autograd) and forward + backward once: compile both graphs."""
    with torch.no_grad():
        fn(*inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    fn(*leaves).backward(grad_out)


def padding_cost(n: int) -> dict:
    """Not causal at a length that is no multiple of the window: flex with the keys padded
    (the chunked path's numbers) against flex over the real keys only."""
    q, k, v, grad_out = make_inputs(n, seed=2)
    with torch.no_grad():
        expected = chunked(False)(q.float(), k.float(), v.float())
        errors = {
            "padded_out": relative_error(flex(False)(q, k, v), expected),
            "unpadded_out": relative_error(flex_unpadded(n)(q, k, v), expected),
        }
    del expected
    row = {"seq_len": n, "pad": -n % WINDOW, "agreement": errors}
    row |= measure("padded", flex(False), (q, k, v), grad_out, first_calls=True)
    row |= measure("unpadded", flex_unpadded(n), (q, k, v), grad_out, first_calls=True)
    return row


def table(report: dict) -> str:
    """The short table printed last: ms and GiB per length, causal."""
    names = ["chunked", "flex", "flex_dynamic", "sdpa"]
    head = f"{'T':>7} " + " ".join(f"{n[:8] + ' fwd':>12} {n[:8] + ' f+b':>12}" for n in names)
    lines = [head + f" {'chunk GiB':>9} {'flex GiB':>9} {'mask ms':>7}"]
    rows = report.get("dynamic_kernel")
    dynamic = {r["seq_len"]: r for r in rows} if isinstance(rows, list) else {}
    for r in report["results"]:
        r = dynamic.get(r["seq_len"], {}) | r
        cells = [_cell(r.get(f"{n}_{k}_ms"), 12) for n in names for k in ("fwd", "fwd_bwd")]
        cells += [_cell(r.get(f"{n}_fwd_bwd_peak_gib"), 9) for n in ("chunked", "flex")]
        cells.append(_cell(r["mask_build_ms"], 7))
        lines.append(f"{r['seq_len']:>7} " + " ".join(cells))
    return "\n".join(lines)


def _cell(value, width: int = 11) -> str:
    return f"{value:{width}.2f}" if isinstance(value, float) else f"{'err':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    args = parser.parse_args()
    report = run_record(
        shape=dict(
            batch=1, heads=HEADS, kv_heads=KV_HEADS, dim_head=DIM, window=WINDOW, dtype=str(DTYPE)
        ),
        timing="triton.testing.do_bench median, warmup 25 ms, rep 100 ms (over 100 ms: "
        "median of 3 host-timed calls); peak memory above the inputs; flex first calls "
        "(compiling) and mask build apart",
        results=[],
    )

    def save():
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    for n in args.lengths:
        print(f"T={n} causal", flush=True)
        report["results"].append(benchmark(n))
        save()
    print("flex with the dynamic-shape kernel", flush=True)
    report["dynamic_kernel"] = guarded(lambda: dynamic_kernel(args.lengths))
    save()
    print("T=16384 not causal", flush=True)
    report["not_causal_16k"] = benchmark(16384, causal=False, with_sdpa=False)
    save()
    print("padding cost, not causal, T=16184 (dynamic kernel: a second length)", flush=True)
    report["padding_cost"] = padding_cost(16384 - 200)
    save()
    print("\n" + table(report))


if __name__ == "__main__":
    main()
