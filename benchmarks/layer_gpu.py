"""The whole NSA layer on a GPU against the full-attention layer of the same dims.

Run on a CUDA machine from the repository root:

    python benchmarks/layer_gpu.py --out benchmarks/layer_gpu.json

Shape (issue 12): SparseAttention(dim=2048, dim_head=128, heads=64, kv_heads=4,
sliding_window_size=512, compress_block_size=32, compress_block_sliding_stride=16,
selection_block_size=64, num_selected_blocks=16, causal=True), bfloat16, batch 1,
with its kernels (use_triton_kernel=True) and, where it fits, without them (the
PyTorch path). The full-attention layer is qkv linear -> SDPA causal GQA -> out linear.
Each is timed in the same run with triton.testing.do_bench (median), forward alone and
forward + backward, with the peak memory of forward + backward; a per-stage breakdown of
the kernel path's forward follows at each length.
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

from gpu_run import peak_gib, run_record  # noqa: E402

from nsa_tutorial import SparseAttention  # noqa: E402

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


def timings(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> dict:
    """Forward and forward + backward medians (ms) and the fwd+bwd peak (GiB) beyond x."""
    grad = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            layer(x)

    def forward_backward():
        layer(x).backward(grad)

    fwd = do_bench(forward, warmup=50, rep=300, return_mode="median")
    both = do_bench(forward_backward, warmup=50, rep=300, return_mode="median")
    return {"forward_ms": fwd, "forward_backward_ms": both, "peak_gib": peak_gib(forward_backward)}


@torch.no_grad()
def breakdown(model: SparseAttention, x: torch.Tensor, compile_glue: bool) -> dict[str, float]:
    """Forward time (ms) of each stage of the kernel path, on the previous stage's outputs;
    with compile_glue, also the glue stages through torch.compile."""
    steps: dict[str, Callable[[], object]] = {}
    h = model.norm(x)
    q, k, v = model.project_heads(h)
    steps["norm + qkv"] = lambda: model.project_heads(model.norm(x))
    ck, cv = model.compressed_tokens(k, v)
    steps["compression MLP"] = lambda: model.compressed_tokens(k, v)
    compressed, top = model.compressed_branch(q, ck, cv, use_kernels=True)
    steps["compressed attention + top-n"] = lambda: model.compressed_branch(
        q, ck, cv, use_kernels=True
    )
    rotate = model.rotary_emb.rotate_queries_or_keys
    rq, rk = rotate(q), rotate(k)
    steps["rotary"] = lambda: (rotate(q), rotate(k))
    selected = model.selected_branch(rq, rk, v, top, use_triton=True)
    steps["selection"] = lambda: model.selected_branch(rq, rk, v, top, use_triton=True)
    sliding = model.sliding_branch(rq, rk, v, use_kernels=True)
    steps["sliding window"] = lambda: model.sliding_branch(rq, rk, v, use_kernels=True)
    steps["gates + combine + out"] = lambda: model.combine(h, compressed, selected, sliding)
    if not compile_glue:
        return _median_ms(steps)
    # What torch.compile would buy the glue (issue 12, item 3): measured, not yet used.
    glue = {
        "norm + qkv": lambda t: model.project_heads(model.norm(t)),
        "rotary": lambda a, b: (rotate(a), rotate(b)),
        "gates + combine + out": model.combine,
    }
    compiled = {name: torch.compile(fn, dynamic=False) for name, fn in glue.items()}
    steps["norm + qkv, compiled"] = lambda: compiled["norm + qkv"](x)
    steps["rotary, compiled"] = lambda: compiled["rotary"](q, k)
    steps["gates + combine + out, compiled"] = lambda: compiled["gates + combine + out"](
        h, compressed, selected, sliding
    )
    return _median_ms(steps)


def _median_ms(steps: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median forward time (ms) of each step."""
    return {
        name: do_bench(step, warmup=25, rep=100, return_mode="median")
        for name, step in steps.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    args = parser.parse_args()
    torch.manual_seed(0)
    nsa = SparseAttention(**CONFIG, use_triton_kernel=True).cuda().to(DTYPE)
    full = FullAttentionLayer(2048, 128, 64, 4).cuda().to(DTYPE)
    results = []
    for n in args.lengths:
        x = torch.randn(1, n, CONFIG["dim"], device="cuda", dtype=DTYPE, requires_grad=True)
        row = {"seq_len": n, "nsa": timings(nsa, x), "full": timings(full, x)}
        if n <= PYTORCH_PATH_UP_TO:
            row["nsa_pytorch_path"] = timings(lambda t: nsa(t, disable_triton_kernel=True), x)
        row["breakdown_forward_ms"] = breakdown(nsa, x.detach(), compile_glue=n == 65536)
        results.append(row)
        print(json.dumps(row), flush=True)
        write(args.out, results)
        del x
        torch.cuda.empty_cache()
    print(f"\n{'tokens':>7} | {'NSA fwd':>8} {'full fwd':>8} | {'NSA f+b':>8} {'full f+b':>8} | "
          f"{'NSA GiB':>7} {'full GiB':>8}")  # fmt: skip
    for row in results:
        a, b = row["nsa"], row["full"]
        print(f"{row['seq_len']:>7} | {a['forward_ms']:8.2f} {b['forward_ms']:8.2f} | "
              f"{a['forward_backward_ms']:8.2f} {b['forward_backward_ms']:8.2f} | "
              f"{a['peak_gib']:7.2f} {b['peak_gib']:8.2f}")  # fmt: skip
    for row in results:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in row["breakdown_forward_ms"].items())
        print(f"{row['seq_len']:>7} forward by stage (ms): {stages}")


def write(path: Path, results: list[dict]) -> None:
    """The JSON record so far (rewritten after each length, so a cut run keeps its rows)."""
    record = run_record(config=CONFIG, dtype=str(DTYPE), results=results)
    path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
