"""Decoding cost on the CPU: one token with the KV cache against a full forward.

Run from the repository root:

    .venv/bin/python benchmarks/decode_cpu.py

One causal SparseAttention layer: dim 256, 4 heads of 64, 2 kv heads, window 64,
compression 32 with stride 16, selection 64, 16 blocks, batch 1, float32, 2 threads.
For each context length L: the mean time of 8 cached decoding steps after a prefill
of L tokens, and the time of one full forward over L + 1 tokens (what each new token
costs without a cache). Writes benchmarks/decode_cpu.json and prints a table.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from nsa_tutorial import SparseAttention

CONFIG = dict(
    dim=256,
    dim_head=64,
    heads=4,
    kv_heads=2,
    sliding_window_size=64,
    compress_block_size=32,
    compress_block_sliding_stride=16,
    selection_block_size=64,
    num_selected_blocks=16,
    causal=True,
)
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
STEPS = 8
RESULTS = Path(__file__).with_suffix(".json")


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = SparseAttention(**CONFIG)
    rows = []
    for length in LENGTHS:
        x = torch.randn(1, length + STEPS, CONFIG["dim"])
        _, cache = model(x[:, :length], return_cache=True)
        start = time.perf_counter()
        for t in range(length, length + STEPS):
            _, cache = model(x[:, t : t + 1], cache, return_cache=True)
        cached = (time.perf_counter() - start) / STEPS
        start = time.perf_counter()
        model(x[:, : length + 1])
        uncached = time.perf_counter() - start
        rows.append({"context": length, "cached_step_s": cached, "full_forward_s": uncached})
        print(
            f"{length:>6}: cached step {cached * 1e3:7.2f} ms, "
            f"full forward {uncached * 1e3:9.1f} ms",
            flush=True,
        )
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python benchmarks/decode_cpu.py",
                "machine": f"{platform.machine()}, 2 threads",
                "config": CONFIG,
                "results": rows,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
