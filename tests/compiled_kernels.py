"""Every Triton kernel of the layer compiled for an H100 / H200 (sm_90), without a GPU.

On a CPU, `make test` runs the kernels in Triton's interpreter, which accepts code that
Triton's compiler rejects (an early `return` inside a compile-time `if`, say) and tells
nothing of registers or shared memory. This script closes that gap in two steps:

1. record (a child process, interpreter on): the kernel wrappers run forward and
   backward on small inputs at the layer's settings (issue 12's: G = 16, d = 128,
   blocks of 64, 16 selected, window 512, dim 2048; and the selection kernel at d = 256,
   G = 4 and 1, with gates and with SPLIT_PRIVATE), and every launch is noted: its
   arguments' types, its compile-time constants, warps and stages. Lengths are short;
   the constants are the ones a long run takes (only runtime arguments depend on it).
2. compile (this process, interpreter off): each distinct launch goes through Triton's
   own compiler and ptxas for sm_90, as on the GPU. A launch fails when it does not
   compile or needs more shared memory than one sm_90 block has; registers and spills
   are reported (spills are not failures: some kernels spill today).

    python tests/compiled_kernels.py [--json report.json]

The bfloat16 dots that the interpreter runs as "upcast" (see selection._dot) are
compiled as on the GPU ("tf32", which bfloat16 ignores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SM90_SHARED_MEMORY = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
SHOWN = ("G", "D", "DIM", "SPLIT", "HAS_GATES", "SIGN")  # constants the summary prints
TYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
         "torch.int32": "i32", "torch.int64": "i64", "torch.uint8": "u8", "torch.bool": "i1"}


def record(out: Path) -> None:
    """Run the workloads in the interpreter and write every launch to `out` (JSON)."""
    import inspect

    import torch
    import triton.runtime.interpreter as interpreter

    launches = []
    run = interpreter.InterpretedFunction.run

    def noting(self, *args, grid, warmup, **kwargs):
        bound = inspect.signature(self.fn).bind(*args, **{
            k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
        launches.append({
            "module": self.fn.__module__, "kernel": self.fn.__name__,
            "args": {name: describe(value) for name, value in bound.arguments.items()},
            "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
        })
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def describe(value):
        if isinstance(value, torch.Tensor):
            return {"pointer": TYPES[str(value.dtype)]}
        if isinstance(value, bool) or not isinstance(value, int | float):
            return {"constant": value}
        if isinstance(value, float):
            return {"float": value}
        return {"int": value}

    interpreter.InterpretedFunction.run = noting
    workloads(torch)
    out.write_text(json.dumps(launches))


def workloads(torch) -> None:
    """The wrappers forward and backward, in bfloat16 on the CPU, at the layer's settings."""
    from dataclasses import replace

    from nsa_tutorial.kernels import compressed, glue, selection, smoke, top_blocks, window

    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).bfloat16().requires_grad_()

    def backward(out):
        out.float().square().sum().backward()

    n, block, slots = 96, 64, 16
    # the dk, dv kernel cuts readers into chunks of 4, so that the partial sums run too
    selection.LAUNCH["dkv"] = replace(selection.LAUNCH["dkv"], chunk=4)
    selection.WIDE_LAUNCH["dkv"] = replace(selection.WIDE_LAUNCH["dkv"], chunk=4)
    selection.TILE_COST_LIMIT = float("inf")  # tiles shared (their kernels run either way)
    for group, dim, gated, split in ((16, 128, False, False), (16, 128, False, True),
                                     (16, 128, True, False), (16, 256, False, False),
                                     (4, 128, False, False), (1, 128, False, False)):  # fmt: skip
        selection.SPLIT_PRIVATE = split
        q, k, v = randn(1, group, n, dim), randn(1, 1, n, dim), randn(1, 1, n, dim)
        indices = torch.randint(0, 2, (1, 1, n, slots), generator=g)
        gates = randn(1, 1, n, slots) if gated else None
        backward(selection.selection_attention(q, k, v, indices, indices >= 0,
                                               block_size=block, gates=gates))
    heads, dim, stride = 16, 128, 16
    q, kv = randn(1, heads, n, dim), randn(1, 1, n, dim)
    ck, cv = randn(1, 1, 1 + n // stride, dim), randn(1, 1, 1 + n // stride, dim)
    backward(compressed.compressed_attention(q, ck, cv, num_memory=1, stride=stride,
                                             causal=True))
    backward(window.window_attention(q, kv, kv.detach().clone().requires_grad_(), window=512))
    freqs = torch.rand(dim // 2, generator=g)
    backward(glue.rotary_triton(q, freqs))
    backward(glue.gated_sum_triton(randn(1, heads, n, 3), q, q, q))
    backward(glue.rms_norm_triton(randn(1, n, 2048), randn(2048), eps=1e-6))
    smoke.triton_add(torch.ones(10), torch.ones(10))
    with torch.no_grad():  # 16 of 16 selection blocks: 1024 tokens
        top_blocks.top_blocks_kernel(
            randn(1, heads, 1024, dim), randn(1, 1, 1 + 1024 // stride, dim), num_selected=16,
            stride=stride, selection_block=block, group_size=heads, interpolate=False,
            causal=True, scale=dim**-0.5,
        )  # fmt: skip


def signature(launch: dict, params) -> tuple[dict, dict]:
    """Triton's signature and constants of one recorded launch."""
    types, constants = {}, {}
    for param in params:
        name = param.name
        value = launch["args"][name]
        if param.is_constexpr or "constant" in value:
            types[name] = "constexpr"
            constant = value.get("constant", value.get("int", value.get("float")))
            constants[name] = "tf32" if constant == "upcast" else constant
        elif "pointer" in value:
            types[name] = "*" + value["pointer"]
        elif "float" in value:
            types[name] = "fp32"
        else:
            types[name] = "i32" if -(2**31) <= value["int"] < 2**31 else "i64"
    return types, constants


def compile_all(launches: list[dict], workers: int) -> list[dict]:
    """Each distinct launch compiled for sm_90 (see `compile_one`), `workers` at a time."""
    distinct = {}
    for launch in launches:
        key = json.dumps([launch["module"], launch["kernel"], launch["args"],
                          launch["num_warps"], launch["num_stages"]], sort_keys=True)
        distinct.setdefault(key, launch)
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, distinct.values()))


def compile_one(launch: dict) -> dict:
    """One launch through Triton's compiler and ptxas for sm_90: its kernel, constants,
    registers, spills and shared memory, or the error the GPU run would have raised."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    types, constants = signature(launch, kernel.params)
    row = {"kernel": launch["kernel"], "constants": constants,
           "num_warps": launch["num_warps"], "num_stages": launch["num_stages"]}
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=types, constexprs=constants),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]},
        )
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {error}"[-2000:]
        return row
    row["shared_memory"] = compiled.metadata.shared
    row.update(ptxas_usage(get_ptxas(90).path, compiled.asm["ptx"]))
    if row["shared_memory"] > SM90_SHARED_MEMORY:
        row["error"] = (f"needs {row['shared_memory']} bytes of shared memory, sm_90 has "
                        f"{SM90_SHARED_MEMORY}")  # fmt: skip
    return row


def ptxas_usage(ptxas: str, ptx: str) -> dict:
    """Registers per thread and bytes spilled, as ptxas -v reports them."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        report = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", source.name, "-o",
                                 os.devnull], capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(spills.group(1)) if spills else 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="compiles at once")
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)  # the child's step
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.record:
        record(args.record)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        launches_file = Path(folder) / "launches.json"
        env = dict(os.environ, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, __file__, "--record", str(launches_file)], env=env,
                       check=True)  # fmt: skip
        launches = json.loads(launches_file.read_text())
    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile, not interpret
    rows = compile_all(launches, args.workers)
    for row in rows:
        shape = " ".join(f"{k}={row['constants'][k]}" for k in SHOWN if k in row["constants"])
        usage = row.get("error") or (f"{row['registers']} registers, {row['spill_bytes']} B "
                                     f"spilled, {row['shared_memory']} B shared")  # fmt: skip
        print(f"{row['kernel']:32} {shape:30} warps {row['num_warps']} stages "
              f"{row['num_stages']}: {usage}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
