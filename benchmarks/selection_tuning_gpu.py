"""How the selection kernel's new settings were chosen (issue 13): four rounds on an H200.

Run from the repository root with the kernel before issue 13 saved as a file:

    git show f7848b3:nsa_tutorial/kernels/selection.py > .bench/selection_today.py
    OUT=benchmarks python benchmarks/selection_tuning_gpu.py --round 1   # or --round 2

writes $OUT/tune.json (committed as selection_tuning_round1_gpu.json,
selection_tuning_round2_gpu.json, selection_tuning_round3_gpu.json and
selection_tuning_round4_gpu.json; rounds 3 and 4 need no earlier kernel). Issue 7's
shape (64 query heads, 4 kv heads, d 128, blocks of 64, 16 selected), bfloat16, do_bench
medians; "today" is the earlier kernel.

- Round 1 ran on a work-in-progress of the new kernel (its tile plan built by PyTorch
  sorts, each distinct block's number loaded from memory inside the loop): the tile
  kernels' rows, warps and stages (rows 64, 4 warps, 2 stages chosen), TILE_COST_LIMIT,
  and the dk, dv chunk (2048 chosen; `1 << 30` is the unsplit backward).
- Round 2 ran on the committed kernel (the plan in one Triton pass, the distinct blocks
  held in registers): today against new on every pattern at 16k and 64k, the cost of
  the plan, the inverted index and the chunking, TILE_COST_LIMIT again (2.5 chosen), and
  GQA groups 1, 2, 4, 16 with SDPA beside them.
- Round 3: WIDE_LAUNCH, the settings for heads 192 and 256 wide, at 32k on pattern (c).
  Its JSON's "launch" is the table the variants started from (the settings before
  WIDE_LAUNCH took the winners); run now, "table" is WIDE_LAUNCH itself.
- Round 4: the private pass (SPLIT_PRIVATE) on and off, the tile kernels at 4 and 8
  warps, at TILE_COST_LIMIT and with every tile shared, and every tile walked, on each
  pattern at 64k (G = 16); first, out and gradients with the pass against without it
  (relative errors, every tile shared).
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import sys

sys.path[:0] = [".", "tests", "benchmarks"]
import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from nsa_tutorial.kernels import patterns as P  # noqa: E402
from nsa_tutorial.kernels import selection as K  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")


def load_today():
    spec = importlib.util.spec_from_file_location("old", ".bench/selection_today.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["old"] = module
    spec.loader.exec_module(module)
    return module


def inputs(n, pattern, hq=64, hk=4, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, hq, n, d, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(1, hk, n, d, device="cuda", generator=g).bfloat16() for _ in "kv")
    idx, sel = P.PATTERNS[pattern](1, hk, n, block_size=64, num_selected=16, generator=g,
                                   device="cuda")
    return q, k, v, idx, sel, torch.randn_like(q)


def t(fn, grads=None):
    return do_bench(fn, warmup=25, rep=150, grad_to_none=grads, return_mode="median")


def fwd_bwd(mod, q, k, v, idx, sel, go):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def step():
        out = mod.selection_attention(*leaves, idx, sel, block_size=64, check_indices=False)
        out.backward(go)

    return t(step, leaves)


def fwd(mod, q, k, v, idx, sel):
    return t(lambda: mod.selection_attention(q, k, v, idx, sel, block_size=64,
                                             check_indices=False))


def check(old, n=2048, pattern="local_shared"):
    """New against today at each TILE_COST_LIMIT: relative errors of out, dq, dk, dv."""
    q, k, v, idx, sel, go = inputs(n, pattern, seed=3)
    out = {}

    def rel(x, y):
        return ((x.double() - y.double()).norm() / y.double().norm()).item()

    chosen = K.TILE_COST_LIMIT
    for limit in (-1.0, float("inf"), chosen):
        K.TILE_COST_LIMIT = limit
        a = [x.clone().requires_grad_() for x in (q, k, v)]
        b = [x.clone().requires_grad_() for x in (q, k, v)]
        oa = K.selection_attention(*a, idx, sel, block_size=64)
        ob = old.selection_attention(*b, idx, sel, block_size=64)
        ga, gb = torch.autograd.grad(oa, a, go), torch.autograd.grad(ob, b, go)
        out[str(limit)] = [rel(oa, ob)] + [rel(x, y) for x, y in zip(ga, gb, strict=True)]
    K.TILE_COST_LIMIT = chosen
    return out


def today_against_new(old, res, lengths, extras):
    rows = []
    for n in lengths:
        for pattern in P.PATTERNS:
            q, k, v, idx, sel, go = inputs(n, pattern)
            r = dict(n=n, pattern=pattern, today_fwd=fwd(old, q, k, v, idx, sel),
                     new_fwd=fwd(K, q, k, v, idx, sel),
                     today_fb=fwd_bwd(old, q, k, v, idx, sel, go),
                     new_fb=fwd_bwd(K, q, k, v, idx, sel, go))  # fmt: skip
            if extras and n == 65536:
                plan = K.make_plan(idx, sel, 16, 64, 128, True)
                r["plan_ms"] = t(lambda: K.make_plan(idx, sel, 16, 64, 128, True))  # noqa: B023
                r["shared_tiles"] = plan.shared.float().mean().item()
                blocks = torch.where(plan.codes >= 0, plan.codes % 1024, -1)
                r["invert_ms"] = t(lambda: K.invert_selection(blocks, 1024))  # noqa: B023
                _, offsets = K.invert_selection(blocks, 1024)
                r["chunks_ms"] = t(lambda: K.chunk_readers(offsets, 2048))  # noqa: B023
            print(r, flush=True)
            rows.append(r)
    res["today_vs_new"] = rows


def limits(res, sweep, values, with_backward):
    for pattern in ("local_shared", "uniform_random"):
        q, k, v, idx, sel, go = inputs(65536, pattern)
        chosen = K.TILE_COST_LIMIT
        for limit in values:
            K.TILE_COST_LIMIT = limit
            sweep[f"{pattern} limit={limit} fwd"] = fwd(K, q, k, v, idx, sel)
            if with_backward:
                sweep[f"{pattern} limit={limit} fb"] = fwd_bwd(K, q, k, v, idx, sel, go)
        K.TILE_COST_LIMIT = chosen


def tile_launches(sweep):
    q, k, v, idx, sel, go = inputs(65536, "local_shared")
    chosen, base_f, base_q = K.TILE_COST_LIMIT, K.LAUNCH["tile_forward"], K.LAUNCH["tile_dq"]
    K.TILE_COST_LIMIT = float("inf")
    for rows, warps, stages in [(32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 4, 2), (128, 8, 2),
                                (64, 4, 3), (64, 4, 1)]:  # fmt: skip
        K.LAUNCH["tile_forward"] = K.Launch(warps, stages, rows=rows)
        K.LAUNCH["tile_dq"] = K.Launch(warps, stages)
        name = f"local_shared tiles rows={rows} warps={warps} stages={stages}"
        sweep[f"{name} fwd"] = fwd(K, q, k, v, idx, sel)
        sweep[f"{name} fb"] = fwd_bwd(K, q, k, v, idx, sel, go)
    K.LAUNCH["tile_forward"], K.LAUNCH["tile_dq"], K.TILE_COST_LIMIT = base_f, base_q, chosen


def chunks(sweep):
    for pattern in ("hot_block", "uniform_random", "local_shared"):
        q, k, v, idx, sel, go = inputs(65536, pattern)
        base = K.LAUNCH["dkv"]
        for chunk in (256, 512, 1024, 2048, 4096, 1 << 30):
            K.LAUNCH["dkv"] = dataclasses.replace(base, chunk=chunk)
            sweep[f"{pattern} chunk={chunk} fb"] = fwd_bwd(K, q, k, v, idx, sel, go)
        K.LAUNCH["dkv"] = base


def groups(old, res, shapes, patterns):
    rows = []
    for hq, hk in shapes:
        for pattern in patterns:
            q, k, v, idx, sel, go = inputs(65536, pattern, hq=hq, hk=hk)
            r = dict(group=hq // hk, pattern=pattern, today_fwd=fwd(old, q, k, v, idx, sel),
                     new_fwd=fwd(K, q, k, v, idx, sel),
                     today_fb=fwd_bwd(old, q, k, v, idx, sel, go),
                     new_fb=fwd_bwd(K, q, k, v, idx, sel, go))  # fmt: skip
            r["sdpa_fwd"] = t(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True))  # noqa: B023
            print(r, flush=True)
            rows.append(r)
    res["groups"] = rows


def wide_heads(res, n=32768):
    """Round 3: WIDE_LAUNCH for heads 192 and 256 wide, one kernel at a time from the
    table's settings (pattern c, G = 16): the walk with every tile walked, the tile kernels
    with every tile shared, the dk, dv kernel; d = 128 beside them for the work per unit."""
    rows = []
    for d in (128, 192, 256):
        q, k, v, idx, sel, go = inputs(n, "local_shared", d=d)
        table = K.WIDE_LAUNCH if d > 128 else K.LAUNCH
        base, chosen = dict(table), K.TILE_COST_LIMIT
        variants = [("table", {}, chosen)]
        variants += [(f"walk warps={w}", {"forward": K.Launch(w, 1), "dq": K.Launch(w, 1)}, -1.0)
                     for w in (2, 4, 8)]  # fmt: skip
        variants += [(f"tiles rows={r} warps={w}", {"tile_forward": K.Launch(w, 1, rows=r),
                                                     "tile_dq": K.Launch(w, 1)}, float("inf"))
                     for r in (32, 64) for w in (4, 8)]  # fmt: skip
        variants += [(f"dkv rows={r} warps={w}", {"dkv": K.Launch(w, 1, rows=r, chunk=2048)},
                      chosen) for r in (32, 64) for w in (4, 8)]  # fmt: skip
        for name, change, limit in variants:
            if d == 128 and name != "table":
                continue
            table.update(change)
            K.TILE_COST_LIMIT = limit
            try:
                r = dict(d=d, variant=name, fwd=fwd(K, q, k, v, idx, sel),
                         fb=fwd_bwd(K, q, k, v, idx, sel, go))  # fmt: skip
            except Exception as error:  # out of shared memory or registers: recorded
                r = dict(d=d, variant=name, error=f"{type(error).__name__}: {str(error)[:200]}")
            table.clear()
            table.update(base)
            K.TILE_COST_LIMIT = chosen
            print(r, flush=True)
            rows.append(r)
    res["wide_heads"] = rows


def private_pass(res, n=65536):
    """Round 4: SPLIT_PRIVATE x tile warps x TILE_COST_LIMIT on each pattern, G = 16, and
    every tile walked (limit -1) as the baseline; each row with its share of shared tiles."""
    q, k, v, idx, sel, go = inputs(2048, "local_shared", seed=3)
    chosen, split_chosen = K.TILE_COST_LIMIT, K.SPLIT_PRIVATE
    K.TILE_COST_LIMIT, results = float("inf"), {}  # every tile shared: the private pass runs
    for split in (False, True):
        K.SPLIT_PRIVATE = split
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = K.selection_attention(*leaves, idx, sel, block_size=64)
        results[split] = [out, *torch.autograd.grad(out, leaves, go)]
    res["private_against_without"] = [
        ((a.double() - b.double()).norm() / b.double().norm()).item()
        for a, b in zip(results[True], results[False], strict=True)
    ]  # out, dq, dk, dv
    print(res, flush=True)
    rows = []
    base_f, base_q = K.LAUNCH["tile_forward"], K.LAUNCH["tile_dq"]
    variants = [(False, base_f.num_warps, -1.0)] + [
        (split, warps, limit) for split in (False, True) for warps in (4, 8)
        for limit in (chosen, float("inf"))
    ]  # fmt: skip
    for pattern in P.PATTERNS:
        q, k, v, idx, sel, go = inputs(n, pattern)
        for split, warps, limit in variants:
            K.SPLIT_PRIVATE, K.TILE_COST_LIMIT = split, limit
            K.LAUNCH["tile_forward"] = dataclasses.replace(base_f, num_warps=warps)
            K.LAUNCH["tile_dq"] = dataclasses.replace(base_q, num_warps=warps)
            shared = K.make_plan(idx, sel, 16, 64, 128, True).shared.float().mean().item()
            r = dict(pattern=pattern, split=split, warps=warps, limit=limit, shared_tiles=shared,
                     fwd=fwd(K, q, k, v, idx, sel), fb=fwd_bwd(K, q, k, v, idx, sel, go))
            print(r, flush=True)
            rows.append(r)
    K.LAUNCH["tile_forward"], K.LAUNCH["tile_dq"] = base_f, base_q
    K.TILE_COST_LIMIT, K.SPLIT_PRIVATE = chosen, split_chosen
    res["private_pass"] = rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--round", type=int, choices=(1, 2, 3, 4), required=True)
    args = parser.parse_args()
    if args.round >= 3:
        table = K.WIDE_LAUNCH if args.round == 3 else K.LAUNCH
        res = {"launch": {name: dataclasses.asdict(launch) for name, launch in table.items()}}
        (wide_heads if args.round == 3 else private_pass)(res)
        with open(f"{OUT}/tune.json", "w") as f:
            json.dump(res, f, indent=1)
        return
    old, res, sweep = load_today(), {}, {}
    res["check_vs_today"] = check(old)
    if args.round == 1:
        today_against_new(old, res, (16384, 65536), extras=False)
        limits(res, sweep, (-1.0, 1.0, 1.5, 2.5, float("inf")), with_backward=False)
        tile_launches(sweep)
        chunks(sweep)
        res["sweep"] = sweep
        groups(old, res, ((4, 4), (16, 4), (64, 4)), ("local_shared", "uniform_random"))
    else:
        today_against_new(old, res, (16384, 65536), extras=True)
        limits(res, sweep, (-1.0, 2.5, 4.0, float("inf")), with_backward=True)
        res["sweep"] = sweep
        groups(old, res, ((4, 4), (8, 4), (16, 4), (64, 4)),
               ("local_shared", "uniform_random", "hot_block"))
    with open(f"{OUT}/tune.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
