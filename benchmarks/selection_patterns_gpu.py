"""Selection patterns on a GPU: our selection kernel against fla-core, XunhaoLai's kernel
and SDPA full attention, on uniform, hot-block and local-shared picks (issue 13).

Run on a CUDA machine from the repository root, with fla-core 0.6.0 and XunhaoLai's
native-sparse-attention-triton importable (a peer that is missing, or that refuses a
shape, is recorded as null with the reason):

    PYTHONPATH=/tmp/site:.peers python benchmarks/selection_patterns_gpu.py \\
        --out benchmarks/selection_patterns_gpu.json

and `python benchmarks/plot_selection_patterns.py` draws selection_patterns_gpu.png.

Shape (issue 7's): batch 1, 64 query heads, 4 kv heads, head dim 128, bfloat16, blocks
of 64, 16 selected per token, the own block among them. In one run, the JSON rewritten
after every row:

1. checks: ours against the PyTorch path (float32 from the same inputs, 2048 tokens) on
   each pattern; at the first length, ours against fla and XunhaoLai on the same blocks
   (relative errors of out, dq, dk, dv; all bfloat16, so ~1e-2 is rounding);
2. each pattern of `nsa_tutorial.kernels.patterns` at each length: forward and forward
   + backward, triton.testing.do_bench medians, of ours (check_indices=False, as
   SparseAttention calls it), fla's parallel_nsa, XunhaoLai's topk_sparse_attention and
   SDPA full causal attention with enable_gqa (it reads every block whatever the
   pattern, so it is timed once per length); the distinct blocks a tile of queries
   reads; ours' share of the compute floor;
3. coverage at --coverage T on local_shared, ours against SDPA of the same shape: GQA
   groups 1, 2, 3, 4, 8, 16 at head dim 128 and head dims 64, 96, 128, 192, 256 at group
   16 (--cross: every pair), with ours' time per unit of work against group 16 and an
   exactness check on the last tokens; then ours alone on one batch-2 row (at T) and
   one long row (--long, 262144 tokens), checked the same way.

The coverage keeps 4 kv heads and takes 4 x group query heads: the selection (one per kv
head) and the key/value traffic stay fixed while the group changes, group 3 fits (64
query heads do not split into groups of 3), and the rows compare with issue 13's (SDPA
7.5 / 27.7 ms at group 1 is 4 query heads). Work per row then grows with the group, so
the rows are compared per unit of work: ms per query head x token.

--smoke runs every step on tiny shapes, on the CPU too (Triton's interpreter, wall-clock
times of one call): it checks the script, it measures nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # nsa_tutorial, and the scripts beside this one
# First, before anything imports triton: on a CPU it switches Triton to its interpreter.
from nsa_tutorial.kernels import triton_mode  # noqa: E402

MODE = triton_mode()

import selection_kernel_gpu as single  # noqa: E402
from gpu_run import run_record  # noqa: E402

from nsa_tutorial.fine_attention import fine_attention_gathered  # noqa: E402
from nsa_tutorial.kernels import patterns  # noqa: E402
from nsa_tutorial.kernels import selection as kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16
# NVIDIA's H200 datasheet: BF16 tensor cores 1,979 TFLOP/s with 2:4 sparsity, so ~989 dense.
PEAK_TFLOPS = 989.0
PEAK_SOURCE = "H200 SXM bf16 dense tensor core, NVIDIA datasheet (1979 with sparsity / 2)"
BACKWARD_FLOPS = 2.5  # backward matmuls per forward matmul (5 against 2), recompute not counted
TILES = (64, 16, 4)  # query tiles (tokens) whose distinct blocks are counted
PEERS = ("fla", "xunhao")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One problem's sizes: batch, query heads, kv heads, head dim, tokens per block,
    selected blocks per token (the own block included)."""

    batch: int = 1
    heads: int = 64
    kv_heads: int = 4
    dim: int = 128
    block: int = 64
    selected: int = 16

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures; FULL on the GPU, SMOKE to try every step on tiny shapes."""

    shape: Shape
    lengths: tuple[int, ...]
    coverage: int  # tokens of the coverage rows (0: none)
    groups: tuple[int, ...]  # query heads per kv head, at the shape's head dim
    dims: tuple[int, ...]  # head dims, at the shape's group
    long: int  # tokens of the long row (0: none)
    check_tokens: int = 2048  # tokens of the check against the PyTorch path (32 blocks of
    # 64: enough that the patterns differ; at 1024 every token reads all its blocks)
    tail: int = 128  # last tokens checked exactly in the coverage and long rows


FULL = Plan(Shape(), (8192, 16384, 32768, 65536, 131072), 65536, (1, 2, 3, 4, 8, 16),
            (64, 96, 128, 192, 256), 262144)  # fmt: skip
SMOKE = Plan(Shape(heads=16, kv_heads=1, dim=32, block=32, selected=8), (256,), 256,
             (1, 3, 16), (48,), 320, check_tokens=256, tail=32)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Problem:
    """The inputs of one timing: q (b, h, n, d), k, v (b, hk, n, d) and dO like q, in
    bfloat16, and a selection (b, hk, n, s) of blocks of `block` tokens."""

    q: Tensor
    k: Tensor
    v: Tensor
    grad_out: Tensor
    indices: Tensor
    selected: Tensor
    block: int


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One provider on one problem, in its own layout: out = run(*leaves); to_ours maps
    its output, and the gradients of its leaves, back to (b, h, n, d)."""

    run: Callable[..., Tensor]
    leaves: tuple[Tensor, ...]  # q, k, v in its layout, taking gradients
    grad_out: Tensor  # dO in its layout
    to_ours: Callable[[Tensor], Tensor]


def make_problem(shape: Shape, n: int, pattern: str, seed: int, varying: float) -> Problem:
    """Random bfloat16 q, k, v, dO and the selection `pattern` draws, all from `seed`."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    b, h, hk, d = shape.batch, shape.heads, shape.kv_heads, shape.dim

    def normal(heads: int) -> Tensor:
        return torch.randn(b, heads, n, d, device=DEVICE, generator=g).to(DTYPE)

    q, k, v, grad_out = normal(h), normal(hk), normal(hk), normal(h)
    extra = {"varying": varying} if pattern == "local_shared" else {}
    indices, selected = patterns.PATTERNS[pattern](
        b, hk, n, block_size=shape.block, num_selected=shape.selected, generator=g,
        device=DEVICE, **extra,
    )  # fmt: skip
    return Problem(q, k, v, grad_out, indices, selected, shape.block)


def as_leaf(t: Tensor) -> Tensor:
    """A contiguous copy of t that takes gradients of its own (copies are not timed)."""
    return t.detach().contiguous().requires_grad_()


def prepare_ours(p: Problem) -> Prepared:
    """nsa_tutorial's selection kernel, in our layout."""

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return kernel.selection_attention(
            q, k, v, p.indices, p.selected, block_size=p.block, check_indices=False
        )

    return Prepared(run, tuple(as_leaf(t) for t in (p.q, p.k, p.v)), p.grad_out, lambda t: t)


def prepare_fla(p: Problem) -> Prepared:
    """fla-core's parallel_nsa: (b, n, h, d) tensors, (b, n, hk, s) blocks with -1 for none."""
    import fla.ops.nsa  # noqa: F401  (fails here, not inside the timing, when fla is missing)

    q, k, v, blocks = single.fla_inputs(p.q, p.k, p.v, p.indices, p.selected)
    count, size = p.indices.shape[-1], p.block

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return single.fla(q, k, v, blocks, block_counts=count, block_size=size)

    return Prepared(run, tuple(as_leaf(t) for t in (q, k, v)),
                    rearrange(p.grad_out, "b h n d -> b n h d").contiguous(),
                    lambda t: rearrange(t, "b n h d -> b h n d"))  # fmt: skip


def prepare_xunhao(p: Problem) -> Prepared:
    """XunhaoLai's topk_sparse_attention: varlen (b * n, h, d) tensors with cu_seqlens,
    (hk, b * n, s) int32 blocks counted from each sequence's start, the -1 of unselected
    slots last (its forward walks a token's slots until the first one past its block)."""
    from native_sparse_attention.ops import topk_sparse_attention

    b, n = p.q.shape[0], p.q.shape[2]
    flat = [rearrange(t, "b h n d -> (b n) h d") for t in (p.q, p.k, p.v, p.grad_out)]
    blocks = torch.where(p.selected, p.indices, -1).sort(dim=-1, descending=True).values
    blocks = rearrange(blocks, "b h n s -> h (b n) s").to(torch.int32).contiguous()
    cu_seqlens = torch.arange(0, (b + 1) * n, n, device=p.q.device, dtype=torch.int32)

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return topk_sparse_attention(q, k, v, blocks, p.block, cu_seqlens)

    return Prepared(run, tuple(as_leaf(t) for t in flat[:3]), flat[3].contiguous(),
                    lambda t: rearrange(t, "(b n) h d -> b h n d", b=b))  # fmt: skip


def prepare_sdpa(p: Problem) -> Prepared:
    """Full causal attention with GQA (PyTorch's SDPA, flash on a GPU): every block."""

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return Prepared(run, tuple(as_leaf(t) for t in (p.q, p.k, p.v)), p.grad_out, lambda t: t)


PROVIDERS: dict[str, Callable[[Problem], Prepared]] = {
    "ours": prepare_ours, "fla": prepare_fla, "xunhao": prepare_xunhao, "sdpa": prepare_sdpa,
}  # fmt: skip


def time_ms(fn: Callable[[], object], grads: tuple[Tensor, ...] | None = None) -> float:
    """Median ms of fn on a GPU (selection_kernel_gpu's do_bench settings); on a CPU the
    wall clock of one call (--smoke: the path is tried, not measured)."""
    if DEVICE == "cuda":
        return single.time_ms(fn, grads)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def timings(prepared: Prepared) -> dict:
    """Forward alone (no autograd graph) and forward + backward, ms."""
    with torch.no_grad():
        fwd = time_ms(lambda: prepared.run(*prepared.leaves))
    step = single.forward_and_backward(prepared.run, prepared.leaves, prepared.grad_out)
    return {"fwd_ms": fwd, "fwd_bwd_ms": time_ms(step, prepared.leaves)}


def skipped(error: BaseException, fields: tuple[str, ...]) -> dict:
    """`fields` as null and why: a peer missing or refusing the shape, memory, a failure."""
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    reason = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
    return {**dict.fromkeys(fields), "skipped": reason}


def measure(provider: str, problem: Problem) -> dict:
    """`provider`'s timings on `problem`, or nulls with the reason it did not run."""
    try:
        return timings(PROVIDERS[provider](problem))
    except Exception as error:  # recorded, not fatal: the other providers still run
        return skipped(error, ("fwd_ms", "fwd_bwd_ms"))


def outputs_and_grads(prepared: Prepared) -> list[Tensor]:
    """out, dq, dk, dv of one forward + backward, in our layout (b, h, n, d)."""
    out = prepared.run(*prepared.leaves)
    grads = torch.autograd.grad(out, prepared.leaves, prepared.grad_out)
    return [prepared.to_ours(t) for t in (out, *grads)]


def errors(actual: list[Tensor], expected: list[Tensor]) -> dict[str, float]:
    """Relative errors (Frobenius) of out, dq, dk, dv."""
    pairs = zip(actual, expected, strict=True)
    return {name: single.relative_error(a, e) for name, (a, e) in zip(GRADS, pairs, strict=True)}


GRADS = ("out", "dq", "dk", "dv")


def agreement(peer: str, problem: Problem) -> dict:
    """Ours against `peer` on the same blocks: relative errors of out and gradients."""
    try:
        expected = outputs_and_grads(PROVIDERS[peer](problem))
        return errors(outputs_and_grads(prepare_ours(problem)), expected)
    except Exception as error:
        return skipped(error, GRADS)


def check_against_pytorch(problem: Problem) -> dict:
    """Ours against fine_attention_gathered in float32 on the same (rounded) inputs."""
    try:
        actual = outputs_and_grads(prepare_ours(problem))
        wide = [as_leaf(t.float()) for t in (problem.q, problem.k, problem.v)]
        out = fine_attention_gathered(*wide, problem.indices, problem.selected,
                                      block_size=problem.block, causal=True)  # fmt: skip
        grads = torch.autograd.grad(out, wide, problem.grad_out.float())
        return errors(actual, [out, *grads])
    except Exception as error:
        return skipped(error, GRADS)


def tail_check(problem: Problem, tokens: int) -> dict:
    """Ours' out and dq of the last `tokens` queries against fine_attention_gathered
    (float32) for those queries alone: catches offsets that overflow late in a long
    sequence at the cost of a few hundred tokens of reference."""
    try:
        prepared = prepare_ours(problem)
        out = prepared.run(*prepared.leaves)
        (dq,) = torch.autograd.grad(out, prepared.leaves[:1], problem.grad_out)
        n = problem.q.shape[2]
        first = max(0, n - tokens)
        q = as_leaf(problem.q[:, :, first:].float())
        expected = fine_attention_gathered(
            q, problem.k.float(), problem.v.float(), problem.indices[:, :, first:],
            problem.selected[:, :, first:], block_size=problem.block, causal=True,
            first_query=first,
        )  # fmt: skip
        (expected_dq,) = torch.autograd.grad(expected, q, problem.grad_out[:, :, first:].float())
        return {"tokens": n - first,
                "out": single.relative_error(out[:, :, first:], expected),
                "dq": single.relative_error(dq[:, :, first:], expected_dq)}  # fmt: skip
    except Exception as error:
        return skipped(error, ("tokens", "out", "dq"))


def matmul_flops(shape: Shape, n: int) -> float:
    """Matrix FLOPs of the selection forward: per token and query head, s blocks of
    `block` keys, two products (q k^T, p v) of 2 * block * dim each; the own block counts
    whole, as a block-causal kernel computes it (selection_kernel_gpu.flops in general)."""
    per_token_head = shape.selected * 2 * (2 * shape.block * shape.dim)
    return float(shape.batch * n * shape.heads * per_token_head)


def floor_shares(timing: dict, flops: float, measured_tflops: float | None) -> dict:
    """Ours' TFLOP/s and its share of the compute floor (flops at PEAK_TFLOPS, and at
    the measured matmul rate), forward and forward + backward (model FLOPs)."""
    shares = {"fwd_floor_ms": flops / PEAK_TFLOPS / 1e9}
    for key, work in (("fwd", flops), ("fwd_bwd", flops * (1 + BACKWARD_FLOPS))):
        ms = timing.get(f"{key}_ms")
        tflops = None if ms is None else work / ms / 1e9
        shares[f"{key}_tflops"] = tflops
        shares[f"{key}_floor_share"] = None if ms is None else tflops / PEAK_TFLOPS
        if measured_tflops:
            shares[f"{key}_measured_peak_share"] = None if ms is None else tflops / measured_tflops
    return shares


def measured_matmul_tflops(size: int) -> float:
    """TFLOP/s of one bfloat16 (size x size) @ (size x size): the rate a dense kernel
    reaches here, a second, attainable, floor beside the datasheet's."""
    a, b = (torch.randn(size, size, device=DEVICE, dtype=DTYPE) for _ in "ab")
    return 2 * size**3 / time_ms(lambda: a @ b) / 1e9


def distinct_summary(problem: Problem) -> dict:
    """Distinct blocks read per query tile (mean over tiles and heads, and over the last
    quarter of the sequence, where most blocks are eligible), for each tile in TILES."""
    summary = {}
    for tile in TILES:
        counts = patterns.distinct_blocks_per_tile(problem.indices, problem.selected, tile)
        counts = counts.double()
        last = counts[..., -max(1, counts.shape[-1] // 4) :]
        summary[str(tile)] = {"mean": counts.mean().item(), "last_quarter": last.mean().item()}
    return summary


def pattern_rows(plan: Plan, args: argparse.Namespace, report: dict, save: Callable) -> None:
    """Part 2 (with part 1's peer agreement at the first length): every pattern at every
    length, every provider, one row each."""
    report["agreement"], report["results"] = {}, []
    for n in args.lengths if args.patterns else []:
        sdpa = measure("sdpa", make_problem(plan.shape, n, "uniform_random", args.seed, 0))
        print(f"{n:>7} sdpa {fmt_timing(sdpa)}", flush=True)
        for pattern in args.patterns:
            start = time.perf_counter()
            problem = make_problem(plan.shape, n, pattern, args.seed, args.varying)
            if n == args.lengths[0]:
                report["agreement"][pattern] = {
                    "seq_len": n,
                    **{peer: agreement(peer, problem) for peer in PEERS},
                }
            providers = {name: measure(name, problem) for name in ("ours", *PEERS)}
            row = {"pattern": pattern, "seq_len": n, "providers": {**providers, "sdpa": sdpa},
                   "distinct_blocks_per_tile": distinct_summary(problem)}  # fmt: skip
            flops = matmul_flops(plan.shape, n)
            peak = report["measured_matmul_tflops"]
            row["ours_compute_floor"] = floor_shares(providers["ours"], flops, peak)
            row["elapsed_s"] = time.perf_counter() - start
            report["results"].append(row)
            save()
            times = "".join(f" {name} {fmt_timing(t)}" for name, t in providers.items())
            print(f"{n:>7} {pattern:15s}{times}", flush=True)
            del problem
            free_memory()


def coverage_shapes(plan: Plan, cross: bool) -> list[Shape]:
    """The coverage rows' shapes: every group at the shape's head dim, every head dim at
    its group (cross: every pair), 4 x group query heads on the shape's kv heads."""
    base = plan.shape
    pairs = [(g, base.dim) for g in plan.groups]
    pairs += [(base.group, d) for d in plan.dims if (base.group, d) not in pairs]
    if cross:
        pairs += [(g, d) for g in plan.groups for d in plan.dims if (g, d) not in pairs]
    return [dataclasses.replace(base, heads=base.kv_heads * g, dim=d) for g, d in pairs]


def coverage_rows(plan: Plan, args: argparse.Namespace, report: dict, save: Callable) -> None:
    """Part 3: ours against SDPA across GQA groups and head dims on local_shared."""
    n = args.coverage
    rows = report["coverage"] = []
    for shape in coverage_shapes(plan, args.cross):
        start = time.perf_counter()
        problem = make_problem(shape, n, "local_shared", args.seed, args.varying)
        row = {"seq_len": n, "group": shape.group, "heads": shape.heads,
               "kv_heads": shape.kv_heads, "dim": shape.dim, "batch": shape.batch,
               "ours": measure("ours", problem), "sdpa": measure("sdpa", problem),
               "ours_tail_check": tail_check(problem, plan.tail)}  # fmt: skip
        peak = report["measured_matmul_tflops"]
        row["ours"].update(floor_shares(row["ours"], matmul_flops(shape, n), peak))
        row["elapsed_s"] = time.perf_counter() - start
        rows.append(row)
        relate_to_group(rows, plan.shape.group)
        save()
        print(f"coverage group {shape.group:>2} dim {shape.dim:>3}: ours "
              f"{fmt_timing(row['ours'])} sdpa {fmt_timing(row['sdpa'])}", flush=True)  # fmt: skip
        del problem
        free_memory()


def long_rows(plan: Plan, args: argparse.Namespace, report: dict, save: Callable) -> None:
    """Part 3's end: ours alone on local_shared at batch 2 (--coverage tokens) and on
    one long sequence (--long tokens), each with the exactness check of its last tokens."""
    report["long"] = []
    rows = [(dataclasses.replace(plan.shape, batch=2), args.coverage), (plan.shape, args.long)]
    for shape, n in rows:
        if not n:
            continue
        start = time.perf_counter()
        problem = make_problem(shape, n, "local_shared", args.seed, args.varying)
        row = {"seq_len": n, "batch": shape.batch, "ours": measure("ours", problem),
               "ours_tail_check": tail_check(problem, plan.tail)}  # fmt: skip
        peak = report["measured_matmul_tflops"]
        row["ours"].update(floor_shares(row["ours"], matmul_flops(shape, n), peak))
        row["elapsed_s"] = time.perf_counter() - start
        report["long"].append(row)
        save()
        print(f"batch {shape.batch} tokens {n}: ours {fmt_timing(row['ours'])}", flush=True)
        del problem
        free_memory()


def per_unit_ms(timing: dict, key: str, heads: int, n: int, batch: int) -> float | None:
    """ms per million (query head x token) of one timing, None where it did not run."""
    ms = timing.get(key)
    return None if ms is None else ms / (heads * n * batch) * 1e6


def relate_to_group(rows: list[dict], reference_group: int) -> None:
    """Each coverage row's time per unit of work, ours and SDPA, and ours' per unit of
    work against the reference group's row of the same head dim (1.0 = as efficient)."""
    for row in rows:
        for provider in ("ours", "sdpa"):
            for key in ("fwd_ms", "fwd_bwd_ms"):
                unit = per_unit_ms(row[provider], key, row["heads"], row["seq_len"], row["batch"])
                row[provider][key.replace("_ms", "_ms_per_m_units")] = unit
    reference = {row["dim"]: row for row in rows if row["group"] == reference_group}
    for row in rows:
        ref = reference.get(row["dim"])
        for key in ("fwd", "fwd_bwd"):
            mine = row["ours"][f"{key}_ms_per_m_units"]
            theirs = None if ref is None else ref["ours"][f"{key}_ms_per_m_units"]
            ratio = None if mine is None or not theirs else mine / theirs
            row[f"ours_{key}_per_unit_vs_group{reference_group}"] = ratio
            sdpa = row["sdpa"].get(f"{key}_ms")
            ours = row["ours"].get(f"{key}_ms")
            row[f"ours_over_sdpa_{key}"] = None if not sdpa or ours is None else ours / sdpa


def free_memory() -> None:
    """Give cached blocks back between rows, so that long rows find room."""
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def fmt_timing(timing: dict) -> str:
    """'fwd / fwd+bwd' ms, '-' where a provider did not run."""
    return f"{fmt(timing.get('fwd_ms'))} / {fmt(timing.get('fwd_bwd_ms'))}"


def fmt(value: float | None, width: int = 0, digits: int = 2) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def tables(report: dict) -> str:
    """The pattern x length x provider table (fwd, then fwd + bwd, ms), and the coverage."""
    names = ("ours", *PEERS, "sdpa")
    head = " ".join(f"{name:>7}" for name in names)
    lines = [f"{'pattern':15s} {'tokens':>7} | fwd ms: {head} | fwd+bwd ms: {head} | "
             f"{'blocks/64':>9} {'floor':>6}"]  # fmt: skip
    for row in report.get("results", []):
        timing = row["providers"]
        fwd = " ".join(fmt(timing[name]["fwd_ms"], 7) for name in names)
        both = " ".join(fmt(timing[name]["fwd_bwd_ms"], 7) for name in names)
        blocks = row["distinct_blocks_per_tile"]["64"]["mean"]
        share = row["ours_compute_floor"]["fwd_floor_share"]
        lines.append(f"{row['pattern']:15s} {row['seq_len']:>7} |         {fwd} |"
                     f"             {both} | {blocks:9.1f} {fmt(share, 6, 3)}")  # fmt: skip
    group = report["shape"]["heads"] // report["shape"]["kv_heads"]
    if report.get("coverage"):
        lines.append(f"\n{'group':>5} {'heads':>5} {'dim':>4} | ours fwd  f+b | sdpa fwd  f+b "
                     f"| ours/sdpa f+b | ours per unit vs g{group} fwd f+b | tail err")  # fmt: skip
        for row in report["coverage"]:
            ours, sdpa, tail = row["ours"], row["sdpa"], row["ours_tail_check"]
            lines.append(
                f"{row['group']:>5} {row['heads']:>5} {row['dim']:>4} | "
                f"{fmt(ours['fwd_ms'], 8)} {fmt(ours['fwd_bwd_ms'], 7)} | "
                f"{fmt(sdpa['fwd_ms'], 8)} {fmt(sdpa['fwd_bwd_ms'], 7)} | "
                f"{fmt(row['ours_over_sdpa_fwd_bwd'], 13)} | "
                f"{fmt(row[f'ours_fwd_per_unit_vs_group{group}'], 24)} "
                f"{fmt(row[f'ours_fwd_bwd_per_unit_vs_group{group}'], 6)} | "
                f"{fmt(tail.get('out'), 8, 4)}"
            )
    for row in report.get("long", []):
        lines.append(f"batch {row['batch']} tokens {row['seq_len']}: ours "
                     f"{fmt_timing(row['ours'])} ms, tail error "
                     f"{fmt(row['ours_tail_check'].get('out'), 0, 4)}")  # fmt: skip
    return "\n".join(lines)


def peer_versions() -> dict:
    """Each peer's version (or where it was imported from), or why it is missing."""
    versions = {}
    for peer, module in (("fla", "fla"), ("xunhao", "native_sparse_attention")):
        try:
            imported = __import__(module)
            versions[peer] = getattr(imported, "__version__", None) or str(
                Path(imported.__file__).parent
            )
        except Exception as error:
            versions[peer] = skipped(error, ())["skipped"]
    return versions


def git_commit() -> str | None:
    """The repository's commit, with '+changes' when the tree differs (None without git)."""
    try:
        changed = bool(git("status", "--porcelain"))
        return git("rev-parse", "HEAD") + ("+changes" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def git(*arguments: str) -> str:
    """What a git command prints in this repository."""
    done = subprocess.run(["git", *arguments], cwd=HERE, capture_output=True, text=True,
                          check=True)  # fmt: skip
    return done.stdout.strip()


def launch_settings() -> dict:
    """The selection kernel's launch settings, whatever form they take."""
    settings = getattr(kernel, "LAUNCH", {})
    return {name: dataclasses.asdict(s) if dataclasses.is_dataclass(s) else repr(s)
            for name, s in settings.items()}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--patterns", nargs="*", default=list(patterns.PATTERNS),
                        choices=list(patterns.PATTERNS))  # fmt: skip
    parser.add_argument(
        "--coverage",
        type=int,
        default=None,
        help="tokens of the coverage rows and the batch-2 row (0: skip)",
    )
    parser.add_argument("--long", type=int, default=None, help="tokens of the long row (0: skip)")
    parser.add_argument("--cross", action="store_true", help="coverage: every (group, dim)")
    parser.add_argument(
        "--varying",
        type=float,
        default=patterns.VARYING,
        help="local_shared: share of a tile's picks each token redraws (1/12: ~72 "
        "distinct blocks per 64-token tile at 64k, near issue 13's 67; 0.25: ~160)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    args.lengths = args.lengths or list(plan.lengths)
    args.coverage = plan.coverage if args.coverage is None else args.coverage
    args.long = plan.long if args.long is None else args.long
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    report = run_record(
        commit=git_commit(), triton_mode=MODE, peers=peer_versions(),
        shape=dataclasses.asdict(plan.shape),
        dtype=str(DTYPE), patterns=args.patterns, varying=args.varying, seed=args.seed,
        coverage_groups=plan.groups, coverage_dims=plan.dims, launch=launch_settings(),
        timing="triton.testing.do_bench median, warmup 50 ms, rep 300 ms" if DEVICE == "cuda"
        else "wall clock of one call (smoke run on the CPU: not a measurement)",
        peak_tflops=PEAK_TFLOPS, peak_source=PEAK_SOURCE, backward_flops=BACKWARD_FLOPS,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    started = time.perf_counter()
    report["measured_matmul_tflops"] = measured_matmul_tflops(8192 if DEVICE == "cuda" else 256)
    report["check_against_pytorch"] = {
        pattern: check_against_pytorch(
            make_problem(plan.shape, plan.check_tokens, pattern, args.seed + 1, args.varying))
        for pattern in args.patterns
    }  # fmt: skip
    print("vs PyTorch path:", json.dumps(report["check_against_pytorch"]), flush=True)
    save()
    pattern_rows(plan, args, report, save)
    if args.coverage:
        coverage_rows(plan, args, report, save)
    long_rows(plan, args, report, save)
    report["elapsed_s"] = time.perf_counter() - started
    save()
    print("\nagreement:", json.dumps(report["agreement"]))
    print(tables(report))
    return report


if __name__ == "__main__":
    main()
