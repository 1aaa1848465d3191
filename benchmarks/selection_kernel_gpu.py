"""The Triton selection kernel on a GPU, against SDPA full causal attention and fla-core.

Run on a CUDA machine from the repository root, with fla-core 0.6.0 importable:

    python benchmarks/selection_kernel_gpu.py --out benchmarks/selection_kernel_gpu.json

The committed JSON came from `--out $OUT/selection_kernel_gpu.json --sweep 16384` on the
lent H200 (its "command" field), copied back here; fla-core travelled as a wheel.

Shape (issue 7): batch 1, 64 query heads, 4 kv heads, head dim 128, bfloat16, blocks of
64, 16 selected blocks per token: its own block and 15 drawn at random among the blocks
before it (all of them while there are fewer). nsa_tutorial and fla's `parallel_nsa`
get the same blocks, so they compute the same attention (checked below); SDPA is full
causal attention with enable_gqa. Each is timed in the same run with
triton.testing.do_bench (median), forward alone and forward + backward; ours skips the
range check of the indices (check_indices=False: it waits for the GPU), as SparseAttention
does with its top-k indices. `--sweep T`
also times variants of the kernels' settings and a breakdown of the passes at length T.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_run import run_record  # noqa: E402

from nsa_tutorial.fine_attention import fine_attention_gathered  # noqa: E402
from nsa_tutorial.kernels import selection as kernel  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK, SELECTED = 64, 4, 128, 64, 16
LENGTHS = [8192, 16384, 32768, 65536]
DTYPE = torch.bfloat16


def random_selection(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Block indices (1, KV_HEADS, n, SELECTED) and whether each is selected: the own
    block, then 15 distinct random earlier blocks (unselected slots where a token has
    fewer than 15 before it)."""
    num_blocks = n // BLOCK
    own = torch.arange(n, device="cuda") // BLOCK
    chunks_idx, chunks_selected = [], []
    for start in range(0, n, 4096):
        rows = own[start : start + 4096]
        scores = torch.rand(KV_HEADS, len(rows), num_blocks, device="cuda", generator=generator)
        earlier = torch.arange(num_blocks, device="cuda") < rows[:, None]
        values, picked = torch.where(earlier, scores, -1.0).topk(SELECTED - 1, dim=-1)
        own_slot = rows[None, :, None].expand(KV_HEADS, -1, 1)
        chunks_idx.append(torch.cat((own_slot, picked), dim=-1))
        always = torch.ones_like(own_slot, dtype=torch.bool)
        chunks_selected.append(torch.cat((always, values >= 0), dim=-1))
    return torch.cat(chunks_idx, 1)[None], torch.cat(chunks_selected, 1)[None]


def make_inputs(n: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HEADS, n, DIM, device="cuda", generator=g).to(DTYPE)
    k, v = (torch.randn(1, KV_HEADS, n, DIM, device="cuda", generator=g).to(DTYPE) for _ in "kv")
    indices, selected = random_selection(n, g)
    grad_out = torch.randn_like(q)
    return q, k, v, indices, selected, grad_out


def ours(q, k, v, indices, selected):
    return kernel.selection_attention(
        q, k, v, indices, selected, block_size=BLOCK, check_indices=False
    )


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def fla_inputs(q, k, v, indices, selected):
    """fla's layout: (b, t, h, d) tensors and (b, t, h, s) indices with -1 for no block."""
    from einops import rearrange

    q, k, v = (rearrange(t, "b h n d -> b n h d").contiguous() for t in (q, k, v))
    blocks = rearrange(torch.where(selected, indices, -1), "b h n s -> b n h s").contiguous()
    return q, k, v, blocks


def fla(q, k, v, blocks, block_counts=SELECTED, block_size=BLOCK):
    from fla.ops.nsa import parallel_nsa

    return parallel_nsa(
        q, k, v, block_indices=blocks, block_counts=block_counts, block_size=block_size
    )


def relative_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def time_ms(fn, grads=None) -> float:
    return do_bench(fn, warmup=50, rep=300, grad_to_none=grads, return_mode="median")


def forward_and_backward(fn, inputs, grad_out):
    def step():
        fn(*inputs).backward(grad_out)

    return step


def check_against_pytorch(n: int = 1024) -> dict:
    """Kernel vs the PyTorch gathering path (float32 from the same bf16 inputs)."""
    q, k, v, indices, selected, grad_out = make_inputs(n, seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ours(*leaves, indices, selected)
    grads = torch.autograd.grad(out, leaves, grad_out)
    wide = [t.float().requires_grad_() for t in (q, k, v)]
    expected = fine_attention_gathered(*wide, indices, selected, block_size=BLOCK, causal=True)
    expected_grads = torch.autograd.grad(expected, wide, grad_out.float())
    names = ["out", "dq", "dk", "dv"]
    pairs = zip([out, *grads], [expected, *expected_grads], strict=True)
    return dict(zip(names, [relative_error(a, b) for a, b in pairs], strict=True))


def check_against_fla(q, k, v, indices, selected, grad_out, with_grads: bool) -> dict:
    """Our kernel vs fla on the same blocks: both bf16, so errors near 1e-2 are rounding."""
    fq, fk, fv, blocks = fla_inputs(q, k, v, indices, selected)
    if not with_grads:
        with torch.no_grad():
            out, reference = ours(q, k, v, indices, selected), fla(fq, fk, fv, blocks)
        return {"out": relative_error(out, reference.transpose(1, 2))}
    ours_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fla_leaves = [t.clone().requires_grad_() for t in (fq, fk, fv)]
    out = ours(*ours_leaves, indices, selected)
    reference = fla(*fla_leaves, blocks)
    ours_grads = torch.autograd.grad(out, ours_leaves, grad_out)
    fla_grads = torch.autograd.grad(reference, fla_leaves, grad_out.transpose(1, 2))
    errors = {"out": relative_error(out, reference.transpose(1, 2))}
    for name, a, b in zip(["dq", "dk", "dv"], ours_grads, fla_grads, strict=True):
        errors[name] = relative_error(a, b.transpose(1, 2))
    return errors


def flops(n: int) -> float:
    """Matrix FLOPs of the forward: per token and query head, 16 blocks of 64 keys, two
    products of 2 * 64 * 128 (the own block counted whole, as the kernel computes it)."""
    return n * HEADS * SELECTED * 2 * (2 * BLOCK * DIM)


def benchmark(n: int) -> dict:
    q, k, v, indices, selected, grad_out = make_inputs(n)
    row = {"seq_len": n}
    row["ours_fwd_ms"] = time_ms(lambda: ours(q, k, v, indices, selected))
    row["sdpa_fwd_ms"] = time_ms(lambda: sdpa(q, k, v))
    fq, fk, fv, blocks = fla_inputs(q, k, v, indices, selected)
    with torch.no_grad():
        row["fla_fwd_ms"] = time_ms(lambda: fla(fq, fk, fv, blocks))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    row["ours_fwd_bwd_ms"] = time_ms(
        forward_and_backward(lambda *a: ours(*a, indices, selected), leaves, grad_out), leaves
    )
    row["sdpa_fwd_bwd_ms"] = time_ms(forward_and_backward(sdpa, leaves, grad_out), leaves)
    fla_leaves = [t.clone().requires_grad_() for t in (fq, fk, fv)]
    row["fla_fwd_bwd_ms"] = time_ms(
        forward_and_backward(lambda *a: fla(*a, blocks), fla_leaves, grad_out.transpose(1, 2)),
        fla_leaves,
    )
    row["ours_fwd_tflops"] = flops(n) / row["ours_fwd_ms"] / 1e9
    row["agreement_with_fla"] = check_against_fla(
        q, k, v, indices, selected, grad_out, with_grads=n == LENGTHS[0]
    )
    return row


def passes(n: int) -> dict:
    """Each pass of our forward and backward at length n, as a callable to time."""
    q, k, v, indices, selected, grad_out = make_inputs(n)
    scale = DIM**-0.5
    num_blocks = math.ceil(n / BLOCK)
    group = HEADS // KV_HEADS

    def plan():
        return kernel.make_plan(indices, selected, group, BLOCK, DIM, True)

    tiles = plan()
    out, lse = kernel._forward(q, k, v, tiles, None, BLOCK, True, scale)
    _, _, delta = kernel._backward_dq(q, k, v, out, grad_out, lse, tiles, None, BLOCK, True,
                                      scale)  # fmt: skip
    blocks = torch.where(tiles.codes >= 0, tiles.codes % num_blocks, kernel.NO_BLOCK)
    index = kernel.invert_selection(blocks, num_blocks)
    return {
        "tile_plan": plan,
        "forward_kernel": lambda: kernel._forward(q, k, v, tiles, None, BLOCK, True, scale),
        "dq_kernel": lambda: kernel._backward_dq(q, k, v, out, grad_out, lse, tiles, None, BLOCK,
                                                 True, scale),
        "inverted_index": lambda: kernel.invert_selection(blocks, num_blocks),
        "dkv_kernel": lambda: kernel._backward_dkv(q, k, v, grad_out, lse, delta, SELECTED, None,
                                                   BLOCK, True, scale, index),
    }  # fmt: skip


# (num_warps, num_stages) of the forward and dq kernels; (num_warps, num_stages, rows) of dkv
TOKEN_VARIANTS = [(2, 2), (2, 1), (2, 3), (4, 2), (8, 2)]
DKV_VARIANTS = [(4, 2, 64), (4, 1, 64), (4, 2, 16), (4, 2, 32), (4, 2, 128), (8, 2, 64),
                (8, 2, 128)]


def sweep(n: int) -> dict:
    """Each kernel under other settings, and end to end head-centric: one program per
    query head, so a loaded block serves one head instead of the group's 16."""
    timers = passes(n)
    chosen = dict(kernel.LAUNCH)
    results = {"forward_kernel": {}, "dq_kernel": {}, "dkv_kernel": {}}
    for warps, stages in TOKEN_VARIANTS:
        for kind in ("forward", "dq"):
            kernel.LAUNCH[kind] = kernel.Launch(num_warps=warps, num_stages=stages)
            ms = time_ms(timers[f"{kind}_kernel"])
            results[f"{kind}_kernel"][f"num_warps={warps} num_stages={stages}"] = ms
            print(f"  {kind:8s} warps {warps} stages {stages}: {ms:.2f} ms", flush=True)
    for warps, stages, rows in DKV_VARIANTS:
        kernel.LAUNCH["dkv"] = dataclasses.replace(
            chosen["dkv"], num_warps=warps, num_stages=stages, rows=rows
        )
        ms = time_ms(timers["dkv_kernel"])
        results["dkv_kernel"][f"num_warps={warps} num_stages={stages} rows={rows}"] = ms
        print(f"  dkv      warps {warps} stages {stages} rows {rows}: {ms:.2f} ms", flush=True)
    kernel.LAUNCH.update(chosen)
    q, k, v, indices, selected, grad_out = make_inputs(n)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    per_head = [t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (indices, selected)]
    results["head_centric"] = {
        "fwd_ms": time_ms(lambda: ours(q, k, v, *per_head)),
        "fwd_bwd_ms": time_ms(
            forward_and_backward(lambda *a: ours(*a, *per_head), leaves, grad_out), leaves
        ),
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    parser.add_argument("--sweep", type=int, default=None, help="also sweep settings at this T")
    args = parser.parse_args()
    import fla

    report = run_record(
        fla=getattr(fla, "__version__", "unknown"),
        shape=dict(batch=1, heads=HEADS, kv_heads=KV_HEADS, dim_head=DIM, block=BLOCK,
                   selected=SELECTED, dtype=str(DTYPE)),
        launch={name: dataclasses.asdict(s) for name, s in kernel.LAUNCH.items()},
        timing="triton.testing.do_bench median, warmup 50 ms, rep 300 ms",
    )  # fmt: skip
    report["check_against_pytorch_T1024"] = check_against_pytorch()
    print("vs PyTorch path (relative error):", report["check_against_pytorch_T1024"], flush=True)
    report["results"] = []
    for n in args.lengths:
        row = benchmark(n)
        report["results"].append(row)
        print(row, flush=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.sweep:
        breakdown = {name: time_ms(fn) for name, fn in passes(args.sweep).items()}
        report["breakdown"] = {"seq_len": args.sweep, "ms": breakdown}
        print("breakdown", report["breakdown"], flush=True)
        report["sweep"] = {"seq_len": args.sweep, "ms": sweep(args.sweep)}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'T':>6} {'ours fwd':>9} {'fla fwd':>8} {'sdpa fwd':>9} "
          f"{'ours f+b':>9} {'fla f+b':>8} {'sdpa f+b':>9}")
    for r in report["results"]:
        print(f"{r['seq_len']:>6} {r['ours_fwd_ms']:9.2f} {r['fla_fwd_ms']:8.2f} "
              f"{r['sdpa_fwd_ms']:9.2f} {r['ours_fwd_bwd_ms']:9.2f} {r['fla_fwd_bwd_ms']:8.2f} "
              f"{r['sdpa_fwd_bwd_ms']:9.2f}")


if __name__ == "__main__":
    main()
