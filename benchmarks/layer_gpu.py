"""The whole NSA layer on a GPU against the full-attention layer, and its branches against peers.

Run on a CUDA machine from the repository root, with fla-core 0.6.0 and XunhaoLai's
native-sparse-attention-triton importable (carried; `peer_stacks.py` skips a missing one):

    python benchmarks/layer_gpu.py --out benchmarks/layer_gpu.json --profile 65536

Shape (issue 12): SparseAttention(dim=2048, dim_head=128, heads=64, kv_heads=4,
sliding_window_size=512, compress_block_size=32, compress_block_sliding_stride=16,
selection_block_size=64, num_selected_blocks=16, causal=True), bfloat16, batch 1.
At each length, in the same run (triton.testing.do_bench medians, forward alone and
forward + backward, with the peak memory of forward + backward):

(a) the layer with its kernels (use_triton_kernel=True) and, where it fits, without them
    (the PyTorch path), against the full-attention layer: qkv linear -> SDPA causal GQA
    -> out linear; then the kernel path's forward stage by stage, the glue both as eager
    PyTorch and as the Triton kernels the layer uses;
(b) the three branches with their gates, no projections, ours against the peers' stacks
    on the same q, k, v (`peer_stacks.py`).

--profile T ends with the GPU kernels of one forward + backward of the layer at T tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peer_stacks  # noqa: E402
from gpu_run import peak_gib, run_record  # noqa: E402

from nsa_tutorial import SparseAttention  # noqa: E402
from nsa_tutorial.kernels.importance import top_blocks_from_keys  # noqa: E402

CONFIG = dict(
    dim=2048, dim_head=128, heads=64, kv_heads=4, sliding_window_size=512,
    compress_block_size=32, compress_block_sliding_stride=16, selection_block_size=64,
    num_selected_blocks=16, causal=True,
)  # fmt: skip
LENGTHS = [8192, 16384, 32768, 65536, 131072]
PYTORCH_PATH_UP_TO = 16384  # its (n, w) tensors: 32k needs ~34 GiB, 64k does not fit
DTYPE = torch.bfloat16


class FullAttentionLayer(nn.Module):
    """qkv linear -> causal SDPA with GQA -> output linear: the baseline layer."""

    def __init__(self, dim: int, dim_head: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.dim_head, self.heads, self.kv_heads = dim_head, heads, kv_heads
        self.split = (dim_head * heads, dim_head * kv_heads, dim_head * kv_heads)
        self.to_qkv = nn.Linear(dim, sum(self.split), bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(x).split(self.split, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", d=self.dim_head) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def timings(step: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...]) -> dict:
    """Forward and forward + backward medians (ms) of step() and the fwd+bwd peak (GiB
    above what was allocated before); the backward reaches `leaves`."""
    grad = torch.randn_like(step())

    def forward():
        with torch.no_grad():
            step()

    def forward_backward():
        torch.autograd.backward(step(), grad)
        for leaf in leaves:
            leaf.grad = None

    fwd = do_bench(forward, warmup=25, rep=200, return_mode="median")
    both = do_bench(forward_backward, warmup=25, rep=200, return_mode="median")
    return {"forward_ms": fwd, "forward_backward_ms": both, "peak_gib": peak_gib(forward_backward)}


@torch.no_grad()
def breakdown(model: SparseAttention, x: torch.Tensor) -> dict[str, float]:
    """Forward time (ms) of each stage of the kernel path, on the previous stage's outputs;
    the glue and the top-n both ways: eager PyTorch (the path before notebook 10's glue
    kernels, the chunks before the one-pass top-n) and the Triton kernels the layer uses."""
    steps: dict[str, Callable[[], object]] = {}
    h = model.normalize(x, use_kernels=True)
    q, k, v = model.project_heads(h)
    steps["norm + qkv, eager"] = lambda: model.project_heads(model.normalize(x))
    steps["norm + qkv, kernel"] = lambda: model.project_heads(model.normalize(x, True))
    ck, cv = model.compressed_tokens(k, v)
    steps["compression MLP"] = lambda: model.compressed_tokens(k, v)
    steps["compressed attention"] = lambda: model.kernel_compressed_attention(q, ck, cv)
    compressed, top = model.compressed_branch(q, ck, cv, use_kernels=True)
    steps["importance + top-n, eager"] = lambda: top_blocks_from_keys(
        q, ck, num_selected=model.num_selected_blocks, stride=model.compress_block_sliding_stride,
        selection_block=model.selection_block_size, group_size=model._selection_group,
        interpolate=model.interpolated_importance_score, causal=model.causal, scale=model.scale,
    )  # fmt: skip
    steps["importance + top-n, kernel"] = lambda: model.kernel_top_blocks(q, ck)
    rq, rk = model.rotate(q, use_kernels=True), model.rotate(k, use_kernels=True)
    steps["rotary, eager"] = lambda: (model.rotate(q), model.rotate(k))
    steps["rotary, kernel"] = lambda: (model.rotate(q, True), model.rotate(k, True))
    selected = model.selected_branch(rq, rk, v, top, use_triton=True)
    steps["selection"] = lambda: model.selected_branch(rq, rk, v, top, use_triton=True)
    sliding = model.sliding_branch(rq, rk, v, use_kernels=True)
    steps["sliding window"] = lambda: model.sliding_branch(rq, rk, v, use_kernels=True)
    branches = (compressed, selected, sliding)
    steps["gates + combine + out, eager"] = lambda: model.combine(h, *branches)
    steps["gates + combine + out, kernel"] = lambda: model.combine(h, *branches, use_kernels=True)
    return {
        name: do_bench(step, warmup=10, rep=100, return_mode="median")
        for name, step in steps.items()
    }


def branch_stacks(model: SparseAttention, n: int) -> dict[str, dict]:
    """Comparison (b): the three branches with gates, ours and the peers' stacks, on the
    same random q, k, v (b, h, n, d) and gates."""
    shape = dict(device="cuda", dtype=DTYPE)
    q = torch.randn(1, model.heads, n, model.dim_head, **shape, requires_grad=True)
    k, v = (torch.randn(1, model.kv_heads, n, model.dim_head, **shape) for _ in range(2))
    k, v = k.requires_grad_(), v.requires_grad_()
    gates = torch.rand(1, model.heads, n, 3, **shape).requires_grad_()
    params = tuple(p for p in model.parameters() if p.requires_grad)
    stacks = {"ours": (lambda: peer_stacks.ours(model, q, k, v, gates), params)}
    peers = {"fla-core": ("fla", peer_stacks.fla_stack),
             "XunhaoLai": ("native_sparse_attention", peer_stacks.xunhao_stack)}  # fmt: skip
    for name, (package, make) in peers.items():
        if peer_stacks.peer_available(package):
            run, leaves = make(model, q, k, v, gates)
            stacks[name] = (run, leaves)
    out = {}
    for name, (run, leaves) in stacks.items():
        try:
            out[name] = timings(run, (q, k, v, gates, *leaves))
        except Exception as error:  # a peer that fails at a length is recorded, not fatal
            out[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        torch.cuda.empty_cache()
    return out


def profile(model: SparseAttention, n: int) -> list[dict]:
    """The GPU kernels of one forward + backward of the layer at n tokens, longest first."""
    x = torch.randn(1, n, model.dim, device="cuda", dtype=DTYPE, requires_grad=True)
    for _ in range(2):
        model(x).sum().backward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(x).sum().backward()
        torch.cuda.synchronize()
    rows = [
        {"kernel": e.key[:90], "calls": e.count, "ms": e.device_time_total / 1e3}
        for e in prof.key_averages()
    ]
    model.zero_grad(set_to_none=True)
    return sorted(rows, key=lambda r: -r["ms"])[:25]


def layer_row(nsa: SparseAttention, full: nn.Module, n: int) -> dict:
    """Comparison (a) at n tokens: the two layers, the PyTorch path where it fits, and the
    kernel path's forward by stage."""
    x = torch.randn(1, n, CONFIG["dim"], device="cuda", dtype=DTYPE, requires_grad=True)
    leaves = (x, *nsa.parameters(), *full.parameters())
    row = {"seq_len": n, "nsa": timings(lambda: nsa(x), leaves),
           "full": timings(lambda: full(x), leaves)}  # fmt: skip
    if n <= PYTORCH_PATH_UP_TO:
        row["nsa_pytorch_path"] = timings(lambda: nsa(x, disable_triton_kernel=True), leaves)
    row["breakdown_forward_ms"] = breakdown(nsa, x.detach())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    parser.add_argument("--profile", type=int, default=65536, help="length to profile; 0: none")
    args = parser.parse_args()
    torch.manual_seed(0)
    nsa = SparseAttention(**CONFIG, use_triton_kernel=True).cuda().to(DTYPE)
    full = FullAttentionLayer(2048, 128, 64, 4).cuda().to(DTYPE)
    results, record = [], {}
    for n in args.lengths:
        row = layer_row(nsa, full, n)
        torch.cuda.empty_cache()
        row["branches_with_gates"] = branch_stacks(nsa, n)
        results.append(row)
        print(json.dumps(row), flush=True)
        write(args.out, results, record)
        torch.cuda.empty_cache()
    if args.profile:
        record["profile_forward_backward"] = {"seq_len": args.profile,
                                              "kernels": profile(nsa, args.profile)}  # fmt: skip
        write(args.out, results, record)
    summary(results, record)


def summary(results: list[dict], record: dict) -> None:
    """The short tables: layers, branch stacks, breakdown, profile."""
    print(f"\n{'tokens':>7} | {'NSA fwd':>8} {'full fwd':>8} | {'NSA f+b':>8} {'full f+b':>8} | "
          f"{'NSA GiB':>7} {'full GiB':>8}")  # fmt: skip
    for row in results:
        a, b = row["nsa"], row["full"]
        print(f"{row['seq_len']:>7} | {a['forward_ms']:8.2f} {b['forward_ms']:8.2f} | "
              f"{a['forward_backward_ms']:8.2f} {b['forward_backward_ms']:8.2f} | "
              f"{a['peak_gib']:7.2f} {b['peak_gib']:8.2f}")  # fmt: skip
    for row in results:
        cells = [
            f"{name} " + (f"{t['forward_ms']:.2f}/{t['forward_backward_ms']:.2f}/"
                          f"{t['peak_gib']:.1f}GiB" if "error" not in t else "error")
            for name, t in row["branches_with_gates"].items()
        ]  # fmt: skip
        print(f"{row['seq_len']:>7} branches fwd/f+b ms: " + ", ".join(cells))
    for row in results:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in row["breakdown_forward_ms"].items())
        print(f"{row['seq_len']:>7} forward by stage (ms): {stages}")
    for kernel in record.get("profile_forward_backward", {}).get("kernels", [])[:12]:
        print(f"{kernel['ms']:8.2f} ms {kernel['calls']:4d}x {kernel['kernel']}")


def write(path: Path, results: list[dict], extra: dict) -> None:
    """The JSON record so far (rewritten after each length, so a cut run keeps its rows)."""
    record = run_record(config=CONFIG, dtype=str(DTYPE), results=results, **extra)
    path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
