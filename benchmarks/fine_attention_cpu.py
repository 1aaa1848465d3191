"""Fine attention on the CPU: the gathered path against the dense-mask path.

Run from the repository root:

    .venv/bin/python benchmarks/fine_attention_cpu.py

Shape: batch 1, 8 query heads, 2 key/value heads, head dim 64, selection blocks of
64, 16 selected blocks per query (the paper's), causal, float32, 2 threads. Each
(path, length) runs in a fresh process so that its peak memory is its own. Writes
benchmarks/fine_attention_cpu.json and prints a table.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

LENGTHS = [256, 512, 1024, 2048, 4096, 8192]
PATHS = ["dense", "gathered"]
RESULTS = Path(__file__).with_suffix(".json")


def measure(path: str, n: int, repeats: int = 2) -> dict:
    import torch

    from nsa_tutorial.fine_attention import fine_attention_dense, fine_attention_gathered
    from nsa_tutorial.selection import top_blocks

    torch.manual_seed(0)
    torch.set_num_threads(2)
    attention = {"dense": fine_attention_dense, "gathered": fine_attention_gathered}[path]
    q, k, v = (torch.randn(1, heads, n, 64) for heads in (8, 2, 2))
    values, indices = top_blocks(torch.rand(1, 2, n, n // 64), 16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attention(q, k, v, indices, values > 0.5, block_size=64, causal=True)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        attention(q, k, v, indices, values > 0.5, block_size=64, causal=True)
    seconds = (time.perf_counter() - start) / repeats
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"path": path, "seq_len": n, "seconds": seconds, "extra_peak_mb": peak_mb}


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
        return
    rows = []
    for n in LENGTHS:
        for path in PATHS:
            out = subprocess.run(
                [sys.executable, __file__, path, str(n)], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(out.stdout))
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python benchmarks/fine_attention_cpu.py",
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 threads",
                "shape": "b=1, hq=8, hk=2, d=64, block=64, 16 selected, causal, float32",
                "results": rows,
            },
            indent=1,
        )
        + "\n"
    )
    header = ("T", "dense s", "gathered s", "gathered/dense", "dense MB", "gathered MB")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 9, 11, 15, 9, 12), strict=True)))
    for n in LENGTHS:
        dense, gathered = (
            next(r for r in rows if r["seq_len"] == n and r["path"] == p) for p in PATHS
        )
        print(
            f"{n:>6} {dense['seconds']:>9.3f} {gathered['seconds']:>11.3f} "
            f"{gathered['seconds'] / dense['seconds']:>15.1f} {dense['extra_peak_mb']:>9.0f} "
            f"{gathered['extra_peak_mb']:>12.0f}"
        )


if __name__ == "__main__":
    main()
