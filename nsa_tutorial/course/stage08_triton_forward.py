"""Checks for notebook 08: two Triton kernels, one row per program.

- `softmax_mean_kernel`, the stepping stone: the online softmax over one row of scores
  with one scalar value per key, tile by tile (`launch_softmax_mean_kernel`);
- `selection_kernel`: the selection forward, one program per (token, batch * query
  head) (`launch_selection_kernel`).

The notebook shows the same launchers (a test keeps them identical). The check accepts
the kernel itself, or any Python function with the spec's signature (a PyTorch
version, a known mistake).

Importing this module imports `nsa_tutorial.kernels`, which settles TRITON_INTERPRET
before any learner's kernel is decorated (`make check` runs no notebook cell but imports
and definitions); Triton itself is imported only to launch a kernel, so the course's
checks still load where Triton cannot be installed.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor

from nsa_tutorial.course.language import say
from nsa_tutorial.course.verdict import Case, Exercise, Mistake
from nsa_tutorial.kernels import triton_mode

# ---- the stepping stone: the online softmax over one row -----------------------------------

SOFTMAX_BLOCK = 16  # columns per tile in the launcher


def softmax_mean_spec(scores: Tensor, values: Tensor) -> Tensor:
    """scores (rows, L), values (L,) -> (rows,): row r's softmax-weighted mean of the
    values, sum_j exp(s_j - m) * y_j / sum_j exp(s_j - m) with m the row's maximum."""
    out = torch.empty(scores.shape[0])
    for r, row in enumerate(scores):
        weights = (row - row.max()).exp()
        out[r] = (weights * values).sum() / weights.sum()
    return out


def launch_softmax_mean_kernel(kernel, scores, values):
    """Run `kernel` with one program per row of scores -> out (rows,)."""
    rows, length = scores.shape
    scores, values = scores.contiguous(), values.contiguous()  # plain row-major memory
    out = torch.empty(rows, device=scores.device)
    kernel[(rows,)](scores, values, out, length, BLOCK=16)
    return out


def _softmax_mean_cases() -> list[Case]:
    g = torch.Generator().manual_seed(81)

    def case(rows, length, scores=None):
        if scores is None:
            scores = 3 * torch.randn(rows, length, generator=g)
        return Case((scores, torch.randn(length, generator=g)))

    rising = torch.linspace(-60, 60, 40).repeat(2, 1)  # every tile raises the maximum
    return [
        case(4, 50),  # three full tiles and a partial one
        case(3, 16),  # exactly one tile
        case(2, 5),  # shorter than a tile
        case(2, 40, rising),
        case(3, 40, 100 * torch.randn(3, 40, generator=g)),  # scores in the hundreds
        case(3, 24, torch.randn(3, 24, generator=g) - 1000),  # every score far below zero
    ]


def _softmax_walk(
    scores, values, *, rescale_acc=True, rescale_ell=True, running_max=True, pad=-math.inf,
    normalise=True,
):  # fmt: skip
    """The kernel's walk over tiles of SOFTMAX_BLOCK columns, in PyTorch. Each keyword
    reproduces one mistake; the defaults give the spec's answer."""
    rows, length = scores.shape
    padding = -length % SOFTMAX_BLOCK
    scores = F.pad(scores, (0, padding), value=pad)
    values = F.pad(values, (0, padding))
    out = torch.empty(rows)
    for r in range(rows):
        m, ell, acc = torch.tensor(-math.inf), torch.tensor(0.0), torch.tensor(0.0)
        for start in range(0, length, SOFTMAX_BLOCK):
            s = scores[r, start : start + SOFTMAX_BLOCK]
            y = values[start : start + SOFTMAX_BLOCK]
            m_new = torch.maximum(m, s.max()) if running_max else torch.tensor(0.0)
            alpha, p = (m - m_new).exp(), (s - m_new).exp()
            ell = (ell * alpha if rescale_ell else ell) + p.sum()
            acc = (acc * alpha if rescale_acc else acc) + p @ y
            m = m_new
        out[r] = acc / ell if normalise else acc
    return out


SOFTMAX_MEAN_KERNEL = Exercise(
    name="softmax_mean_kernel",
    stage="08",
    hints=(
        (
            "program `row` computes out[row] = softmax(S[row]) @ Y for one row of the "
            "(rows, L) score matrix S, with Y (L,) and OUT (rows,). Row r of S starts at "
            "S + r * L; the program walks its columns in tiles of BLOCK, cols = start + "
            "tl.arange(0, BLOCK), and L need not be a multiple of BLOCK."
        ),
        (
            "the rule, the PyTorch loop above: keep m (the largest score so far), ell (the "
            "sum of exp(s - m)) and acc (the sum of exp(s - m) * y), 0-d tensors. Per tile: "
            "m_new = max(m, the tile's max), alpha = exp(m - m_new), p = exp(s - m_new), "
            "ell = alpha * ell + sum(p), acc = alpha * acc + sum(p * y). Lanes past L "
            "must add nothing: load their scores as -inf, their values as 0."
        ),
        (
            "a skeleton:\n"
            "    row = tl.program_id(0)\n"
            '    m = tl.full((), float("-inf"), tl.float32); ell = ...; acc = ...\n'
            "    for start in range(0, L, BLOCK):\n"
            "        cols = start + tl.arange(0, BLOCK); inside = cols < L\n"
            "        s = tl.load(S + row * L + cols, mask=inside, other=...)\n"
            "        y = tl.load(Y + cols, mask=inside, other=0.0)\n"
            "        ...  # m_new, alpha, p; then ell, acc and m\n"
            "    tl.store(OUT + row, ...)"
        ),
    ),
    spec=softmax_mean_spec,
    make_cases=_softmax_mean_cases,
    prepare=lambda candidate: kernel_as_function(candidate, launch_softmax_mean_kernel, 2),
    mistakes=(
        Mistake(
            "the accumulator is not rescaled: when the maximum grows from m to m_new, "
            "multiply acc by alpha = exp(m - m_new), as ell.",
            lambda s, y: _softmax_walk(s, y, rescale_acc=False),
        ),
        Mistake(
            "ell is not rescaled: when the maximum grows from m to m_new, multiply ell by "
            "alpha = exp(m - m_new), as acc.",
            lambda s, y: _softmax_walk(s, y, rescale_ell=False),
        ),
        Mistake(
            "the scores are exponentiated without the running max: exp(s) overflows above "
            "about 88 and is 0 for every score far below zero. Keep m, the largest score so "
            "far, and use exp(s - m_new).",
            lambda s, y: _softmax_walk(s, y, running_max=False),
        ),
        Mistake(
            "lanes past L load a score of 0, which counts as a real key: load them with "
            'other=float("-inf") (exp(-inf) = 0).',
            lambda s, y: _softmax_walk(s, y, pad=0.0),
        ),
        Mistake(
            "the result is not normalised: store acc / ell, not acc.",
            lambda s, y: _softmax_walk(s, y, normalise=False),
        ),
    ),
)

# ---- the selection kernel -----------------------------------------------------------------


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
        where = ""
        if line and line <= len(lines):
            where = say(" at `{line}`", line=lines[line - 1].strip())
        reason = error.error_message or say("see the kernel's source")
        return RuntimeError(
            say("Triton could not compile your kernel{where}: {reason}", where=where, reason=reason)
        )
    return error


# ---- cases --------------------------------------------------------------------------------


def selection_cases() -> list[Case]:
    """(q, k, v, blocks, block_size, causal) for the selection kernel; notebook 09's dq
    kernel is checked on the same inputs."""
    g = torch.Generator().manual_seed(80)

    def case(b, hq, hk, n, s, causal, block=16, d=16, empty_every=0, loud=1.0):
        q, k, v = (torch.randn(b, heads, n, d, generator=g) for heads in (hq, hk, hk))
        q = loud * q
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
        case(1, 2, 1, 36, 2, True, loud=100.0),  # scores in the hundreds: exp() overflows
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
HINT_NO_RUNNING_MAX = (
    "the scores are exponentiated without the running max: exp(s) overflows once a "
    "score passes about 88 (this case has scores in the hundreds). Keep m, the largest "
    "score so far, and use p = exp(s - m_new), rescaling ell and acc by exp(m - m_new)."
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
    running_max=True,
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
                    m_new = torch.maximum(m, s.max()) if running_max else torch.tensor(0.0)
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
    hints=(
        (
            "program (i, bh) writes out[b, h, i, :] for one query, with bh = b * num_heads + h. "
            "The tensors are flat and row-major: the query starts at Q + (bh * n + i) * D; key "
            "or value j of the (batch, kv head) row kv = b * num_kv_heads + h // (num_heads // "
            "num_kv_heads) starts at (kv * n + j) * D; the query's slots sit at BLOCKS + (kv * n "
            "+ i) * num_slots."
        ),
        (
            "the rule: walk the slots and skip -1; a block's keys are block * BLOCK_SIZE + "
            "tl.arange(0, BLOCK_SIZE), masked where >= n (in the loads, and -inf in the scores). "
            "Then, if CAUSAL, the own block with keys <= i. Keep an online softmax: running max "
            "m, sum ell, accumulator acc, and rescale ell and acc by exp(m - m_new) whenever the "
            "max grows. Store acc / ell, or zeros when no key was seen."
        ),
        (
            "a skeleton:\n"
            "    q = tl.load(Q + ... + tl.arange(0, D))\n"
            '    m = tl.full((), float("-inf"), tl.float32); ell = ...; acc = tl.zeros((D,), '
            "tl.float32)\n"
            "    for slot in range(num_slots):\n"
            "        block = tl.load(BLOCKS + ...)\n"
            "        if block >= 0:\n"
            "            keys = ...; visible = keys < n\n"
            "            k = tl.load(K + rows, mask=visible[:, None], other=0.0)  # v the same\n"
            "            s = tl.where(visible, tl.sum(k * q[None, :], 1) * scale, "
            'float("-inf"))\n'
            "            m_new = tl.maximum(m, tl.max(s, 0)); update ell, acc, m\n"
            "    # then the own block the same way, and tl.store(OUT + ..., acc / ...)"
        ),
    ),
    spec=selection_kernel_spec,
    make_cases=selection_cases,
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
        Mistake(HINT_NO_RUNNING_MAX, _with(running_max=False)),
        Mistake(
            "an empty slot (-1) is read as block 0: skip slots whose block is negative.",
            _with(empty_slot=0),
        ),
    ),
)

EXERCISES = [SOFTMAX_MEAN_KERNEL, SELECTION_KERNEL]
