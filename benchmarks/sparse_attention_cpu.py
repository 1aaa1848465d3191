"""SparseAttention on the CPU: nsa_tutorial against native-sparse-attention-pytorch 0.2.3.

Run from the repository root:

    .venv/bin/python benchmarks/sparse_attention_cpu.py

Shape (issue 4): dim 512, 8 heads of 64, 2 kv heads, window 64, compression 32
with stride 16, selection 64, 16 blocks, causal, T = 4096, batch 1, float32, 2
threads. Each (implementation, pass) runs in a fresh process, so its peak memory
(resident set growth after building the inputs) is its own. Writes
benchmarks/sparse_attention_cpu.json and prints a table.
"""

from __future__ import annotations

import contextlib
import io
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIG = dict(
    dim=512,
    dim_head=64,
    heads=8,
    kv_heads=2,
    sliding_window_size=64,
    compress_block_size=32,
    compress_block_sliding_stride=16,
    selection_block_size=64,
    num_selected_blocks=16,
    causal=True,
)
SEQ_LEN = 4096
RESULTS = Path(__file__).with_suffix(".json")


def build(implementation: str):
    import torch

    torch.manual_seed(0)
    if implementation == "reference":
        from native_sparse_attention_pytorch import SparseAttention
    else:
        from nsa_tutorial import SparseAttention
    with contextlib.redirect_stdout(io.StringIO()):
        return SparseAttention(**CONFIG)


def measure(implementation: str, backward: bool, repeats: int = 2) -> dict:
    import torch

    torch.set_num_threads(2)
    model = build(implementation)
    x = torch.randn(1, SEQ_LEN, CONFIG["dim"], requires_grad=backward)

    def step():
        if backward:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up, also the peak-memory measurement
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - start) / repeats
    return {
        "implementation": implementation,
        "pass": "forward+backward" if backward else "forward",
        "seconds": seconds,
        "peak_mb": peak_mb,
    }


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(measure(sys.argv[1], sys.argv[2] == "backward")))
        return
    rows = []
    for backward in (False, True):
        for implementation in ("reference", "nsa_tutorial"):
            args = [sys.executable, __file__, implementation, "backward" if backward else "forward"]
            done = subprocess.run(args, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python benchmarks/sparse_attention_cpu.py",
                "machine": f"{platform.machine()}, 2 threads",
                "config": CONFIG,
                "seq_len": SEQ_LEN,
                "results": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(
        f"{'pass':>17} {'reference s':>12} {'ours s':>8} {'time ratio':>11} "
        f"{'reference MB':>13} {'ours MB':>8} {'memory ratio':>13}"
    )
    for kind in ("forward", "forward+backward"):
        ref, ours = (
            next(r for r in rows if r["pass"] == kind and r["implementation"] == name)
            for name in ("reference", "nsa_tutorial")
        )
        print(
            f"{kind:>17} {ref['seconds']:>12.2f} {ours['seconds']:>8.2f} "
            f"{ours['seconds'] / ref['seconds']:>11.2f} {ref['peak_mb']:>13.0f} "
            f"{ours['peak_mb']:>8.0f} {ours['peak_mb'] / ref['peak_mb']:>13.2f}"
        )


if __name__ == "__main__":
    main()
