"""How the one-pass top-n kernel's tiles and precision were chosen (issue 12), on an H200.

Run on a CUDA machine from the repository root:

    OUT=benchmarks python benchmarks/top_blocks_tuning_gpu.py

writes $OUT/top_blocks_tuning_gpu.json. The committed JSON came from the same
measurements run as a scratch script (hence no "command" and device fields): the H200
of the issue 12 runs, torch 2.11, triton 3.6.

Issue 12's layer shape at 64k tokens: q (1, 64, n, 128) and compressed keys
(1, 4, n / 16, 128) in bfloat16, 16 picks shared by each GQA group. For queries per program
16, 32, 64 x blocks per step 32, 64 x 4 or 8 warps x ieee or tf32x3 products: the
do_bench median and the share of the 262,144 (kv head, query) rows whose selected blocks
equal `top_blocks_from_keys`'s. Also the group mean alone, which every variant includes.
"""

import itertools
import json
import os
import sys

sys.path[:0] = ["."]
import torch  # noqa: E402
from top_blocks_gpu import agreement  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from nsa_tutorial.kernels import top_blocks as T  # noqa: E402
from nsa_tutorial.kernels.importance import top_blocks_from_keys  # noqa: E402

SETTINGS = dict(num_selected=16, stride=16, selection_block=64, group_size=16,
                interpolate=False, causal=True, scale=128**-0.5)  # fmt: skip
N = 65536


@torch.no_grad()
def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, 64, N, 128, device="cuda", generator=g).bfloat16()
    ck = torch.randn(1, 4, N // 16, 128, device="cuda", generator=g).bfloat16()
    reference = top_blocks_from_keys(q, ck, **SETTINGS)
    group_mean_ms = do_bench(lambda: q.view(1, 4, 16, N, 128).mean(2, dtype=torch.float32),
                             return_mode="median")  # fmt: skip
    print("group mean ms", group_mean_ms)
    precision, rows = T._precision, []
    for block_m, block_n, warps, chosen in itertools.product(
        (16, 32, 64), (32, 64), (4, 8), ("ieee", "tf32x3")
    ):
        T.BLOCK_M, T.BLOCK_N, T.NUM_WARPS = block_m, block_n, warps
        T._precision = lambda dtype, p=chosen: p
        row = dict(block_m=block_m, block_n=block_n, warps=warps, precision=chosen)
        try:
            found = T.top_blocks_kernel(q, ck, **SETTINGS)
            row["same"] = agreement(found, reference)["same_blocks_share"]
            row["ms"] = do_bench(lambda: T.top_blocks_kernel(q, ck, **SETTINGS), warmup=10,
                                 rep=60, return_mode="median")  # fmt: skip
        except Exception as error:  # a tile that does not fit is recorded, not fatal
            row["error"] = str(error)[:150]
        print(row, flush=True)
        rows.append(row)
    T._precision = precision
    out = os.path.join(os.environ.get("OUT", "/tmp"), "top_blocks_tuning_gpu.json")
    with open(out, "w") as f:
        json.dump(dict(group_mean_ms=group_mean_ms, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
