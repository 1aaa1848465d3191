"""The Triton selection kernel (notebooks 08-09) against the PyTorch selection path.

On a machine without a GPU the kernels run in Triton's interpreter, so the shapes are
small; on a GPU the same tests run compiled. The reference is `fine_attention_gathered`
in float64 on the same (rounded) inputs.
"""

from dataclasses import replace

import pytest
import torch
from kernel_checks import DEVICE, assert_close_in_half_precision

from nsa_tutorial.fine_attention import fine_attention_gathered

# nsa_tutorial.kernels decides on the interpreter before Triton is imported (macOS: skip)
kernels = pytest.importorskip("nsa_tutorial.kernels.selection")
invert_selection, selection_attention = kernels.invert_selection, kernels.selection_attention
# how the forward and dq kernels take each query tile: all by the shared-tile kernels
# (with the private pass, SPLIT_PRIVATE, where G > 8), or all by the per-token walk; with
# "tiles", the dk, dv kernel also cuts each key block's readers into chunks of 4 (so most
# blocks are split and summed afterwards)
PATHS = {"tiles": float("inf"), "walk": -1.0}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    """Run the test with every tile on one path (see PATHS)."""
    monkeypatch.setattr(kernels, "TILE_COST_LIMIT", PATHS[request.param])
    if request.param == "tiles":
        monkeypatch.setattr(kernels, "SPLIT_PRIVATE", True)
        for table in (kernels.LAUNCH, kernels.WIDE_LAUNCH):
            monkeypatch.setitem(table, "dkv", replace(table["dkv"], chunk=4))
    return request.param


def random_problem(b, hk, group, n, d, block, s, shared, dtype, seed, drop=0.3):
    """q, k, v and a random selection: distinct blocks per query, ~`drop` of them dropped."""
    g = torch.Generator().manual_seed(seed)
    hq = hk * group
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for h in (hq, hk, hk))
    heads = hk if shared else hq
    num_blocks = -(-n // block)
    s = min(s, num_blocks)
    scores = torch.rand(b, heads, n, num_blocks, generator=g)
    indices = scores.topk(s, dim=-1).indices
    selected = torch.rand(b, heads, n, s, generator=g) >= drop
    gates = 0.5 + torch.rand(b, heads, n, s, generator=g)
    return [t.to(DEVICE) for t in (q, k, v, indices, selected, gates)]


def reference(q, k, v, indices, selected, block, causal, gates, scale=None):
    """The PyTorch path in float64; a query that sees nothing gets zeros, as in the kernel."""
    out = fine_attention_gathered(
        q.double(), k.double(), v.double(), indices, selected, block_size=block, causal=causal,
        gates=None if gates is None else gates.double(), scale=scale,
    )
    if causal:
        return out
    sees_something = selected.any(-1).repeat_interleave(q.shape[1] // selected.shape[1], dim=1)
    return torch.where(sees_something[..., None], out, 0.0)


CASES = [
    # hk, group, n, d, block, s, shared
    (2, 1, 37, 16, 8, 3, True),  # no GQA, n not a multiple of the block
    (2, 2, 29, 24, 5, 2, True),  # head dim and block not powers of two
    (1, 4, 40, 32, 16, 2, True),
    (1, 16, 50, 16, 16, 3, True),  # the paper's group of 16
    (2, 2, 21, 16, 4, 3, False),  # one selection per query head
    (1, 2, 6, 16, 8, 2, True),  # shorter than one block
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"hk{c[0]}-g{c[1]}-n{c[2]}-d{c[3]}-l{c[4]}")
def test_forward_and_gradients_match_pytorch(case, causal, gated, path):
    hk, group, n, d, block, s, shared = case
    q, k, v, indices, selected, gates = random_problem(
        2, hk, group, n, d, block, s, shared, torch.float32, seed=n * 7 + d
    )
    inputs = [t.requires_grad_() for t in (q, k, v)] + ([gates.requires_grad_()] if gated else [])
    gates = gates if gated else None
    out = selection_attention(
        q, k, v, indices, selected, block_size=block, causal=causal, gates=gates
    )
    expected = reference(q, k, v, indices, selected, block, causal, gates)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out.double())
    for name, actual, wanted in zip("q k v gates".split(), grads, expected_grads, strict=False):
        torch.testing.assert_close(
            actual, wanted, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
def test_half_precision(dtype, causal):
    q, k, v, indices, selected, gates = random_problem(
        1, 2, 2, 45, 32, 16, 2, True, dtype, seed=3
    )
    inputs = [t.requires_grad_() for t in (q, k, v, gates)]
    out = selection_attention(q, k, v, indices, selected, block_size=16, causal=causal, gates=gates)
    expected = reference(q, k, v, indices, selected, 16, causal, gates)
    assert_close_in_half_precision(out, expected, inputs)


@pytest.mark.parametrize("d", [64, 192, 256])
def test_wide_heads(path, d):
    """Heads of every width up to 256 (over 128: WIDE_LAUNCH's settings), both paths."""
    q, k, v, indices, selected, gates = random_problem(1, 1, 2, 20, d, 8, 2, True, torch.float32, 5)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = selection_attention(q, k, v, indices, selected, block_size=8, scale=0.3)
    expected = reference(q, k, v, indices, selected, 8, True, None, scale=0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), inputs)
    for actual, wanted in zip(grads, torch.autograd.grad(expected.sum(), inputs), strict=True):
        torch.testing.assert_close(actual, wanted, atol=2e-5, rtol=1e-4)


def test_every_slot_dropped(path):
    """Causal: each query still sees its own block. Not causal: it sees nothing, gets 0,
    and passes no gradient."""
    q, k, v, indices, _, _ = random_problem(1, 1, 2, 24, 16, 8, 2, True, torch.float32, 9)
    selected = torch.zeros_like(indices, dtype=torch.bool)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = selection_attention(q, k, v, indices, selected, block_size=8)
    expected = reference(q, k, v, indices, selected, 8, True, None)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    out = selection_attention(q, k, v, indices, selected, block_size=8, causal=False)
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(out.sum(), inputs))


def test_int32_indices_and_a_block_selected_twice(path):
    """int32 indices work; a block listed in two slots counts twice, as in the PyTorch path."""
    q, k, v, indices, selected, gates = random_problem(
        1, 1, 2, 40, 16, 8, 3, True, torch.float32, 11
    )
    indices[..., 1] = indices[..., 0]
    inputs = [t.requires_grad_() for t in (q, k, v, gates)]
    out = selection_attention(q, k, v, indices.int(), selected, block_size=8, gates=gates)
    expected = reference(q, k, v, indices, selected, 8, True, gates)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), inputs)
    expected_grads = torch.autograd.grad(expected.sum(), inputs)
    for actual, wanted in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, wanted, atol=2e-5, rtol=1e-4)


def test_invert_selection_lists_each_blocks_readers():
    g = torch.Generator().manual_seed(4)
    blocks = torch.randint(-1, 5, (2, 3, 7, 3), generator=g, dtype=torch.int32)
    entries, offsets = invert_selection(blocks, 5)
    for bh, per_head in enumerate(blocks.reshape(6, 7 * 3)):
        for j in range(5):
            start, end = offsets[bh * 5 + j], offsets[bh * 5 + j + 1]
            readers = [p for p in range(21) if per_head[p] == j]  # t * s + slot, in order
            assert entries[start:end].tolist() == readers


def test_plan_tiles_codes_a_repeated_block_apart():
    """Each read slot's code is its block + num_blocks * the earlier slots with that block;
    unread slots (not selected, or not before the own block when causal) are -1."""
    # 1 batch-head, 5 tokens of 4 slots, blocks of 1 token: 5 blocks, token t owns block t
    indices = torch.tensor([[[[3, 1, 3, 0], [4, 0, 0, 0], [0, 2, 1, 0], [3, 3, 3, 1],
                              [2, 4, 2, 2]]]])  # fmt: skip
    selected = torch.ones_like(indices, dtype=torch.bool)
    selected[0, 0, 0, 3] = selected[0, 0, 4, 2] = False
    indices, selected = indices.to(DEVICE), selected.to(DEVICE)
    settings = dict(block_size=1, tokens=2, rows=2, block_g=1, limit=1.0)
    plan = kernels.plan_tiles(indices, selected, causal=False, **settings)
    assert plan.codes.tolist() == [[[[3, 1, 8, -1], [4, 0, 5, 10], [0, 2, 1, 5],
                                     [3, 8, 13, 1], [2, 4, -1, 7]]]]  # fmt: skip
    causal = kernels.plan_tiles(indices, selected, causal=True, **settings)
    assert causal.codes.tolist() == [[[[-1, -1, -1, -1], [-1, 0, 5, 10], [0, -1, 1, 5],
                                       [-1, -1, -1, 1], [2, -1, -1, 7]]]]  # fmt: skip


def test_plan_tiles_merges_each_tiles_blocks_and_picks_its_kernel():
    # 1 batch-head, 5 tokens of 2 slots, tiles of 2 tokens (the last one partial)
    indices = torch.tensor([[[[4, 1], [1, 4], [0, 2], [3, 5], [0, 6]]]])
    selected = indices >= 0
    selected[0, 0, 4, 0] = False
    indices, selected = indices.to(DEVICE), selected.to(DEVICE)
    plan = kernels.plan_tiles(indices, selected, block_size=1, causal=False, tokens=2,
                              rows=2, block_g=1, limit=1.0)  # fmt: skip
    assert plan.counts.tolist() == [[2, 4, 1]]
    assert [sorted(u[:c].tolist()) for u, c in zip(plan.union[0], plan.counts[0], strict=True)] == [
        [1, 4], [0, 2, 3, 5], [6]
    ]
    # shared where distinct blocks x rows <= limit x read slots x block_g: 4 <= 4, 8 > 4, 2 > 1
    assert plan.shared.tolist() == [[1, 0, 0]]


def test_plan_tiles_keeps_each_tokens_private_blocks_apart():
    """With split, a block only one token of its tile reads leaves the tile's list and is
    marked private; the work counts each at one token's rows (rows / tokens)."""
    indices = torch.tensor([[[[4, 1], [1, 4], [0, 2], [3, 5], [0, 6]]]])
    selected = indices >= 0
    selected[0, 0, 4, 0] = False
    indices, selected = indices.to(DEVICE), selected.to(DEVICE)
    plan = kernels.plan_tiles(indices, selected, block_size=1, causal=False, tokens=2,
                              rows=2, block_g=1, limit=1.0, split=True)  # fmt: skip
    assert plan.counts.tolist() == [[2, 0, 0]]
    assert sorted(plan.union[0, 0, :2].tolist()) == [1, 4]
    # tile 1's tokens read 0, 2 and 3, 5; tile 2's one token reads 6 (slot 0 not selected)
    assert plan.private.tolist() == [[[[0, 0], [0, 0], [1, 1], [1, 1], [0, 1]]]]
    # shared where (distinct + private / tokens) x rows <= limit x read slots x block_g:
    # 4 <= 4, (0 + 4 / 2) x 2 <= 4, (0 + 1 / 2) x 2 <= 1 (at all the tile's rows, 2 > 1)
    assert plan.shared.tolist() == [[1, 1, 1]]


def test_private_pass_with_groups_not_a_power_of_two(path):
    """G = 12: each token's rows are padded to 16 in the private pass (tl.dot's least)."""
    q, k, v, indices, selected, gates = random_problem(
        1, 1, 12, 40, 16, 8, 3, True, torch.float32, seed=13
    )
    inputs = [t.requires_grad_() for t in (q, k, v, gates)]
    out = selection_attention(q, k, v, indices, selected, block_size=8, gates=gates)
    expected = reference(q, k, v, indices, selected, 8, True, gates)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out.double())
    for actual, wanted in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, wanted, atol=2e-5, rtol=1e-4)


def test_chunk_readers_splits_only_heavy_blocks():
    offsets = torch.tensor([0, 9, 9, 12, 20], dtype=torch.int32, device=DEVICE)  # read 9, 0, 3, 8
    chunks = kernels.chunk_readers(offsets, chunk=4)
    assert chunks.owners.tolist() == [0, 0, 0, 1, 2, 3, 3]
    assert chunks.parts.tolist() == [0, 1, 2, 0, 0, 0, 1]
    assert chunks.slots.tolist() == [0, 1, 2, -1, -1, 3, 4]
    assert chunks.chunks.tolist() == [3, 1, 1, 2]
    assert chunks.first.tolist() == [0, 3, 3, 3]
    assert chunks.num_partials == 5


def test_split_key_blocks_give_the_same_gradients_every_time(monkeypatch):
    """Block 0, read by every token, is split into chunks; their sum is taken in a fixed
    order, so two runs agree to the bit, and with the unsplit run to rounding."""
    q, k, v, indices, selected, gates = random_problem(
        1, 1, 4, 48, 16, 8, 3, True, torch.float32, seed=21, drop=0.0
    )
    indices[..., 0] = 0
    leaves = [t.requires_grad_() for t in (q, k, v, gates)]

    def gradients():
        out = selection_attention(q, k, v, indices, selected, block_size=8, gates=gates)
        return torch.autograd.grad(out.sum(), leaves)

    whole = gradients()
    monkeypatch.setitem(kernels.LAUNCH, "dkv", replace(kernels.LAUNCH["dkv"], chunk=5))
    first, second = gradients(), gradients()
    for a, b, c in zip(first, second, whole, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-head"])
@pytest.mark.parametrize("diff_topk", [True, False], ids=["diff-topk", "plain-topk"])
def test_module_uses_the_kernel_and_agrees(monkeypatch, causal, shared, diff_topk):
    """Every kernel the layer has is called (the one-pass top-n where diff-topk does not
    need the importance's gradient), and output and gradients equal the PyTorch path's."""
    from nsa_tutorial import SparseAttention
    from nsa_tutorial.kernels import compressed, glue, top_blocks, window
    from nsa_tutorial.kernels import selection as kernel_module

    torch.manual_seed(0)
    config = dict(
        dim=32, dim_head=16, heads=4, kv_heads=2, sliding_window_size=4,
        compress_block_size=4, compress_block_sliding_stride=2, selection_block_size=4,
        num_selected_blocks=2, use_diff_topk=diff_topk, causal=causal,
        query_heads_share_selected_kv=shared,
    )
    plain = SparseAttention(**config)
    with torch.no_grad():  # make the gates and the compression matter
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = SparseAttention(**config, use_triton_kernel=True)
    fast.load_state_dict(plain.state_dict())
    plain, fast = plain.to(DEVICE), fast.to(DEVICE)
    x = torch.randn(2, 23, 32, device=DEVICE)
    calls = []
    kernels = (
        (kernel_module, "selection_attention"), (compressed, "compressed_attention"),
        (glue, "rotary_triton"), (glue, "gated_sum_triton"), (glue, "rms_norm_triton"),
        (top_blocks, "top_blocks_kernel"), (window, "window_attention"),
    )  # fmt: skip
    for module, name in kernels:
        original = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw)
        )
    expected = plain(x)
    expected.mean().backward()
    out = fast(x)
    out.mean().backward()
    expected_calls = [
        "compressed_attention", "gated_sum_triton", "rms_norm_triton", "rotary_triton",
        "rotary_triton", "selection_attention", *([] if diff_topk else ["top_blocks_kernel"]),
        "window_attention",
    ]  # fmt: skip
    assert sorted(calls) == expected_calls
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    fast(x, disable_triton_kernel=True)
    assert len(calls) == len(expected_calls)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"q": torch.randn(2, 8, 16)}, ValueError, r"q must be \(b, h, n, d\)"),
        ({"k": torch.randn(1, 2, 9, 16)}, ValueError, "k must be"),
        ({"q": torch.randn(1, 4, 10, 16).double()}, TypeError, "q must be float32"),
        ({"q": torch.randn(1, 3, 10, 16)}, ValueError, "multiple of the kv heads"),
        ({"block_size": 0}, ValueError, "block_size must be a positive int"),
        ({"indices": torch.zeros(1, 3, 10, 2, dtype=torch.long)}, ValueError, "indices must be"),
        ({"indices": torch.zeros(1, 2, 10, 2)}, TypeError, "indices must be int64"),
        ({"selected": torch.ones(1, 2, 10, 2)}, ValueError,
         r"selected must be a bool tensor of indices' shape \(1, 2, 10, 2\)"),
        ({"gates": torch.ones(1, 2, 10, 3)}, ValueError, "gates must be a float tensor"),
        ({"indices": torch.full((1, 2, 10, 2), 3)}, ValueError,
         r"selected indices must lie in \[0, 3\) .* got 3"),
    ],
)
def test_bad_input_is_named(change, error, message):
    args = {
        "q": torch.randn(1, 4, 10, 16),
        "k": torch.randn(1, 2, 10, 16),
        "v": torch.randn(1, 2, 10, 16),
        "indices": torch.zeros(1, 2, 10, 2, dtype=torch.long),
        "selected": torch.ones(1, 2, 10, 2, dtype=torch.bool),
        "block_size": 4,
        "gates": None,
    }
    args.update(change)
    if "k" in change:
        args["v"] = args["k"]
    args = {name: t.to(DEVICE) if torch.is_tensor(t) else t for name, t in args.items()}
    with pytest.raises(error, match=message):
        selection_attention(**args)


def test_head_dim_bounds():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="between 16 and 256, got d=8"):
        selection_attention(q, q, q, torch.zeros(1, 1, 4, 1, dtype=torch.long),
                            torch.ones(1, 1, 4, 1, dtype=torch.bool), block_size=4)


def test_exported_from_kernels():
    import nsa_tutorial.kernels

    assert nsa_tutorial.kernels.selection_attention is selection_attention
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        nsa_tutorial.kernels.missing  # noqa: B018


def test_cpu_tensors_with_a_compiling_triton(monkeypatch):
    import nsa_tutorial.kernels

    monkeypatch.setattr(nsa_tutorial.kernels, "triton_mode", lambda: "compiled")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="move the tensors to the GPU"):
        selection_attention(q, q, q, torch.zeros(1, 1, 4, 1, dtype=torch.long),
                            torch.ones(1, 1, 4, 1, dtype=torch.bool), block_size=4)


TRITON_FIRST = """
import triton  # before nsa_tutorial, as a package that uses Triton itself might
import torch
from nsa_tutorial.kernels import selection_attention
q = torch.randn(1, 1, 4, 16)
try:
    selection_attention(q, q, q, torch.zeros(1, 1, 4, 1, dtype=torch.long),
                        torch.ones(1, 1, 4, 1, dtype=torch.bool), block_size=4)
except RuntimeError as error:
    print(error)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter serves CPU-only machines")
def test_triton_imported_too_early_is_explained():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", TRITON_FIRST], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "Triton was imported before nsa_tutorial could switch on its interpreter" in (
        result.stdout
    )
