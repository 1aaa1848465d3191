"""Checks for notebook 08: a first selection kernel in Triton, one query row per program.

The learner writes the @triton.jit kernel `selection_kernel`; `launch_selection_kernel`
runs it with one program per (token, batch * query head). The notebook shows the same
launcher (a test keeps the two identical). The check accepts the kernel itself, or any
Python function with the spec's signature (a PyTorch version, a known mistake).

Importing this module imports `nsa_tutorial.kernels`, which settles TRITON_INTERPRET
before any learner's kernel is decorated (`make check` runs no notebook cell but imports
and definitions); Triton itself is imported only to launch a kernel, so the course's
checks still load where Triton cannot be installed.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
from einops import repeat
from torch import Tensor

from nsa_tutorial.course.verdict import Case, Exercise, Mistake
from nsa_tutorial.kernels import triton_mode


def selection_kernel_spec(
    q: Tensor, k: Tensor, v: Tensor, blocks: Tensor, block_size: int, causal: bool
) -> Tensor:
    """Query i attends to the keys of its listed blocks and, when causal, to keys
    j <= i of its own block. A query that sees no key gets zeros.

    q (b, hq, n, d); k, v (b, hk, n, d); blocks (b, hk, n, s) int32, -1 = empty slot
    (when causal, every listed block lies before the query's own) -> (b, hq, n, d).
    """
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for head in range(hq):
            kv = head // group  # the key/value head of this query head's GQA group
            for i in range(n):
                keys = []
                for block in blocks[bi, kv, i].tolist():
                    if block >= 0:
                        keys += range(block * block_size, min((block + 1) * block_size, n))
                if causal:
                    keys += range(i // block_size * block_size, i + 1)
                scores = k[bi, kv, keys] @ q[bi, head, i] * d**-0.5
                out[bi, head, i] = scores.softmax(-1) @ v[bi, kv, keys]
    return out


def launch_selection_kernel(kernel, q, k, v, blocks, block_size: int, causal: bool = True):
    """Run `kernel` with one program per (token, batch * query head) -> out (b, hq, n, d)."""
    b, hq, n, d = q.shape
    hk, num_slots = k.shape[1], blocks.shape[-1]
    q, k, v, blocks = (t.contiguous() for t in (q, k, v, blocks))  # plain row-major memory
    out = torch.empty_like(q)
    grid = (n, b * hq)  # program (i, bh) computes out[b, h, i, :] with bh = b * hq + h
    kernel[grid](
        q, k, v, blocks, out,
        n, hq, hk, num_slots, d**-0.5,
        BLOCK_SIZE=block_size, D=d, CAUSAL=causal,
    )  # fmt: skip
    return out


# ---- how the check calls the learner's kernel ---------------------------------------------

_STUB = re.compile(r"""raise NotImplementedError\((["'])(.*?)\1\)""")


def kernel_as_function(candidate: Any, launcher: Callable[..., Tensor], num_tensors: int) -> Any:
    """A Triton kernel becomes a function with the spec's signature that launches it:
    its first `num_tensors` arguments go to the device Triton runs on, then
    `launcher(kernel, *arguments)`. Anything else (a PyTorch version, a known mistake)
    is checked as it is. Stage 10's kernel exercise uses it too."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:  # no Triton here: the learner cannot have written a kernel
        return candidate
    if not isinstance(candidate, KernelInterface):
        return candidate
    kernel = candidate

    def launch(*arguments):
        stub = _STUB.search(_kernel_source(kernel))
        if stub:  # the untouched exercise: a compiled kernel cannot raise, so say it here
            raise NotImplementedError(stub.group(2))
        home = arguments[0].device  # the cases are on the CPU
        device = "cuda" if triton_mode() == "compiled" else home
        tensors = [t.to(device) for t in arguments[:num_tensors]]
        try:
            out = launcher(kernel, *tensors, *arguments[num_tensors:])
        except Exception as error:
            raise _plain_error(error) from None
        return out.to(home)

    return launch


def _kernel_source(kernel) -> str:
    src = getattr(kernel, "src", None)  # a compiled kernel keeps its source
    return inspect.getsource(kernel.fn) if src is None else src  # the interpreter: its function


def _plain_error(error: Exception) -> Exception:
    """The learner's own error out of Triton's wrappers: the interpreter wraps what the
    kernel raised; the compiler reports a line of the kernel and what it cannot do."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.interpreter import InterpreterError

    if isinstance(error, InterpreterError) and error.__cause__ is not None:
        return error.__cause__
    if isinstance(error, CompilationError):
        line = getattr(getattr(error, "node", None), "lineno", None)  # 1 is the `def` line
        lines = (getattr(error, "src", None) or "").splitlines()
        where = f" at `{lines[line - 1].strip()}`" if line and line <= len(lines) else ""
        reason = error.error_message or "see the kernel's source"
        return RuntimeError(f"Triton could not compile your kernel{where}: {reason}")
    return error


# ---- cases --------------------------------------------------------------------------------


def _cases() -> list[Case]:
    g = torch.Generator().manual_seed(80)

    def case(b, hq, hk, n, s, causal, block=16, d=16, empty_every=0):
        q, k, v = (torch.randn(b, heads, n, d, generator=g) for heads in (hq, hk, hk))
        num_blocks = -(-n // block)
        blocks = torch.full((b, hk, n, s), -1, dtype=torch.int32)
        for bi in range(b):
            for h in range(hk):
                for i in range(n):
                    allowed = i // block if causal else num_blocks  # causal: blocks before own
                    chosen = torch.randperm(allowed, generator=g)[:s]
                    if causal:  # drop some, so that empty slots come anywhere
                        chosen = chosen[torch.rand(len(chosen), generator=g) > 0.25]
                    slots = torch.randperm(s, generator=g)[: len(chosen)]
                    blocks[bi, h, i, slots] = chosen.int()
        if empty_every:  # tokens that read nothing at all (possible only when not causal)
            blocks[:, :, ::empty_every] = -1
        return Case((q, k, v, blocks, block, causal))

    return [
        case(1, 2, 2, 40, 2, True),  # 3 blocks, the last one partial
        case(2, 4, 2, 20, 1, True),  # GQA: query heads 0, 1 read kv head 0; two batches
        case(1, 2, 1, 40, 2, False),  # not causal: any block, the partial last one too
        case(1, 2, 1, 24, 1, False, empty_every=5),  # tokens 0, 5, ... see no key: zeros
    ]


# ---- the mistakes, as the kernel would make them --------------------------------------------

# Hints for the mistakes of any online-softmax kernel (stage 10's exercise shares them).
HINT_GQA_HEADS = (
    "query head h reads key/value head h // (num_heads // num_kv_heads): the heads "
    "of a GQA group are neighbours, not h % num_kv_heads."
)
HINT_UNSCALED = "the scores are not scaled: multiply q·k by `scale` (dim_head ** -0.5)."
HINT_NOT_RESCALED = (
    "the accumulator is not rescaled: when the running max grows from m to m_new, "
    "multiply acc (as well as ell) by exp(m - m_new)."
)


def _kernel_like(
    q,
    k,
    v,
    blocks,
    block_size,
    causal,
    *,
    diagonal="causal",
    mask_past_n=True,
    kv_of=None,
    scale=None,
    rescale=True,
    empty_slot=None,
):
    """The kernel's walk in PyTorch: slots in order, then the own block, online softmax.
    Each keyword reproduces one mistake; the defaults give the spec's answer."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    kv_of = kv_of or (lambda head, hq, hk: head // (hq // hk))
    scale = d**-0.5 if scale is None else scale
    positions = torch.arange(block_size)
    pad = -n % block_size  # keys past n read as zeros when they are not masked
    k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (k, v))
    out = torch.zeros_like(q)
    for bi in range(b):
        for head in range(hq):
            kv = kv_of(head, hq, hk)
            for i in range(n):
                walk = []  # (the keys of a block, which of them are visible)
                for block in blocks[bi, kv, i].tolist():
                    if block < 0 and empty_slot is not None:
                        block = empty_slot
                    if block >= 0:
                        keys = block * block_size + positions
                        walk.append((keys, keys < n if mask_past_n else keys >= 0))
                if causal and diagonal != "none":
                    keys = i // block_size * block_size + positions
                    visible = {"causal": keys <= i, "strict": keys < i, "whole": keys < n}
                    walk.append((keys, visible[diagonal]))
                m, ell, acc = torch.tensor(float("-inf")), torch.tensor(0.0), torch.zeros(d)
                for keys, visible in walk:
                    s = (k[bi, kv, keys] @ q[bi, head, i] * scale).masked_fill(
                        ~visible, float("-inf")
                    )
                    m_new = torch.maximum(m, s.max())
                    if m_new == float("-inf"):
                        continue  # nothing visible yet
                    p, alpha = (s - m_new).exp(), (m - m_new).exp()
                    ell = ell * alpha + p.sum()
                    acc = (acc * alpha if rescale else acc) + p @ v[bi, kv, keys]
                    m = m_new
                out[bi, head, i] = acc / ell if ell > 0 else acc
    return out


def _with(**mistake) -> Callable[..., Tensor]:
    return lambda *args: _kernel_like(*args, **mistake)


def _diagnose(got: Any, expected: Tensor, case: Case) -> str | None:
    """A kernel that reads memory it should not gives garbage, not a known mistake's
    numbers; which rows are wrong still says where it went astray."""
    if not isinstance(got, Tensor) or got.shape != expected.shape:
        return None
    q, k, _, blocks, block_size, _ = case.args
    n = q.shape[-2]
    wrong = ~torch.isclose(got, expected, rtol=1e-5, atol=1e-5).all(-1)  # (b, hq, n), NaN too
    rows = repeat(blocks, "b h i s -> b (h g) i s", g=q.shape[1] // k.shape[1])  # per query head
    suspects = []  # (the rows a slip could spoil, the slip)
    if n % block_size:
        suspects.append(
            (
                (rows == n // block_size).any(-1),
                "only queries that list the last, partial block are wrong: keys j >= n must "
                "be masked in the loads (mask=...) and in the scores (-inf).",
            )
        )
    suspects.append(
        (
            (rows < 0).any(-1),
            "only queries with an empty slot (-1) are wrong: skip those slots, their keys "
            "would sit before the start of k and v.",
        )
    )
    for rows_that_could, hint in suspects:
        if wrong.any() and not (wrong & ~rows_that_could).any():
            return hint
    return None


SELECTION_KERNEL = Exercise(
    name="selection_kernel",
    stage="08",
    spec=selection_kernel_spec,
    make_cases=_cases,
    prepare=lambda candidate: kernel_as_function(candidate, launch_selection_kernel, 4),
    diagnose=_diagnose,
    mistakes=(
        Mistake(
            "the own block is missing: when CAUSAL, query i also reads keys "
            "i // BLOCK_SIZE * BLOCK_SIZE .. i of its own block, after the listed ones.",
            _with(diagonal="none"),
        ),
        Mistake(
            "the own block sees the future: mask its keys to j <= i.",
            _with(diagonal="whole"),
        ),
        Mistake(
            "query i must see its own key: mask the own block to j <= i, not j < i.",
            _with(diagonal="strict"),
        ),
        Mistake(
            "keys past the end of the sequence (j >= n, in a partial last block) are "
            "attended as zeros: set their scores to -inf (loading them with other=0 is not "
            "enough).",
            _with(mask_past_n=False),
        ),
        Mistake(HINT_GQA_HEADS, _with(kv_of=lambda head, hq, hk: head % hk)),
        Mistake(HINT_UNSCALED, _with(scale=1.0)),
        Mistake(HINT_NOT_RESCALED, _with(rescale=False)),
        Mistake(
            "an empty slot (-1) is read as block 0: skip slots whose block is negative.",
            _with(empty_slot=0),
        ),
    ),
)

EXERCISES = [SELECTION_KERNEL]
