"""Stage 05: the sliding window against local-attention's exact window (the reference's),
and its GPU path (compiled flex attention) against the chunked path."""

import importlib.util

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from nsa_tutorial import sliding
from nsa_tutorial.sliding import (
    cached_sliding_window_flex_mask,
    sliding_window_attention,
    sliding_window_attention_flex,
    sliding_window_attention_gpu,
    sliding_window_flex_mask,
    sliding_window_mask,
    window_mask_mod,
)

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="compiled flex attention runs on a CUDA GPU"
)
# Uncompiled flex attention (the CPU path) warns that it materialises the scores.
EAGER_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 2, 4, 5])
@pytest.mark.parametrize("n", [1, 3, 4, 9, 17])
def test_matches_local_attention(causal, window, n):
    # Imported here, so that the GPU tests below also run where the test-only
    # references are not installed (the lent GPU machine).
    from local_attention import LocalAttention

    torch.manual_seed(n * 7 + window)
    reference = LocalAttention(
        dim=8,
        window_size=window,
        causal=causal,
        exact_windowsize=True,
        autopad=True,
        use_rotary_pos_emb=False,
    )
    q, k, v = torch.randn(3, 2, 2, n, 8).unbind(0)
    torch.testing.assert_close(
        sliding_window_attention(q, k, v, window, causal), reference(q, k, v)
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("hq", "hk"), [(2, 2), (4, 2), (4, 1)])
def test_equals_dense_attention_under_the_window_mask(causal, hq, hk):
    n, window = 16, 4  # a multiple of the window: no zero padding to see
    q, k, v = (torch.randn(2, h, n, 8) for h in (hq, hk, hk))
    k_full, v_full = (t.repeat_interleave(hq // hk, dim=1) for t in (k, v))
    scores = q @ k_full.transpose(-1, -2) * 8**-0.5
    mask = sliding_window_mask(n, window, causal)
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v_full
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, causal), expected)


def test_mask_rule():
    mask = sliding_window_mask(6, 2, causal=True)
    assert mask[4].tolist() == [False, False, True, True, True, False]
    assert sliding_window_mask(6, 2, causal=False)[2].tolist() == [True] * 5 + [False]


# The GPU path: sliding_window_attention_gpu, its BlockMask and the mask cache.

MASK_PARTS = ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"]
MASK_PARTS += [name.replace("kv", "q") for name in MASK_PARTS]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("n", "window", "block_size"), [(1, 1, 4), (17, 3, 4), (33, 8, 16), (100, 20, 8), (64, 5, 8)]
)
def test_flex_mask_equals_create_block_mask(causal, n, window, block_size):
    mask = sliding_window_flex_mask(n, window, causal, block_size=block_size)
    expected = create_block_mask(
        window_mask_mod(window, causal), None, None, *mask.seq_lengths, "cpu", block_size
    )
    assert mask.seq_lengths == (n, n if causal else n + (-n % window))
    for name in MASK_PARTS:
        torch.testing.assert_close(getattr(mask, name), getattr(expected, name), msg=name)


@EAGER_FLEX
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [7, 24, 41])
def test_flex_path_matches_chunked_path(causal, n):
    torch.manual_seed(n)
    q, k, v = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
    mask = sliding_window_flex_mask(n, 5, causal, block_size=8)
    with torch.no_grad():  # flex attention has no backward on the CPU (torch 2.13)
        torch.testing.assert_close(
            sliding_window_attention_flex(q, k, v, mask),
            sliding_window_attention(q, k, v, 5, causal),
        )


def test_gpu_path_on_the_cpu_is_the_chunked_path():
    q = torch.randn(1, 4, 11, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 11, 8, requires_grad=True) for _ in "kv")
    out = sliding_window_attention_gpu(q, k, v, 4, causal=False, scale=0.3)
    expected = sliding_window_attention(q, k, v, 4, causal=False, scale=0.3)
    assert torch.equal(out, expected)
    grads, expected_grads = (torch.autograd.grad(t.sum(), (q, k, v)) for t in (out, expected))
    assert all(map(torch.equal, grads, expected_grads))


@pytest.mark.parametrize(
    ("shapes", "window", "error", "message"),
    [
        ([(1, 4, 8, 8), (1, 2, 8, 8)], 0, ValueError, "window must be positive, got window=0"),
        ([(1, 4, 8, 8), (1, 2, 8, 8)], 2.0, TypeError, "window must be an int"),
        ([(4, 8, 8), (1, 2, 8, 8)], 2, ValueError, r"q must be \(b, h, n, d\), got q.shape"),
        ([(1, 4, 8, 8), (1, 3, 8, 8)], 2, ValueError, "hk dividing hq"),
        ([(1, 4, 8, 8), (1, 2, 9, 8)], 2, ValueError, r"k.shape=\(1, 2, 9, 8\)"),
    ],
)
def test_gpu_path_refuses_bad_input(shapes, window, error, message):
    q, k = (torch.zeros(shape) for shape in shapes)
    with pytest.raises(error, match=message):
        sliding_window_attention_gpu(q, k, k, window, causal=True)


def test_mask_cache_keeps_one_mask_per_length():
    cpu = torch.device("cpu")
    mask = cached_sliding_window_flex_mask(64, 8, True, cpu)
    assert cached_sliding_window_flex_mask(64, 8, True, cpu) is mask
    other = cached_sliding_window_flex_mask(65, 8, True, cpu)
    assert other is not mask and other.seq_lengths == (65, 65)
    assert cached_sliding_window_flex_mask(64, 8, False, cpu) is not mask
    assert cached_sliding_window_flex_mask.cache_info().maxsize <= 16


def test_nothing_compiles_at_import_or_on_the_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile was called")

    monkeypatch.setattr(torch, "compile", refuse)
    spec = importlib.util.spec_from_file_location("fresh_sliding", sliding.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # a second copy of the module, imported under the patch
    q = torch.randn(1, 2, 6, 8)
    fresh.sliding_window_attention_gpu(q, q, q, 2, causal=True)
    assert fresh.compiled_flex_attention.cache_info().currsize == 0


@CUDA
@pytest.mark.parametrize(("n", "causal"), [(300, True), (300, False), (515, True)])
def test_gpu_path_matches_chunked_path_forward_and_backward(n, causal):
    """bf16 through compiled flex attention against the float32 chunked path; 300 is no
    multiple of the window, so the not-causal zero keys count; a second length
    recompiles once, for every length."""
    torch.manual_seed(n)
    window, grad_out = 64, torch.randn(1, 8, n, 64, device="cuda")
    inputs = [torch.randn(1, h, n, 64, device="cuda") for h in (8, 2, 2)]
    narrow = [t.bfloat16().requires_grad_() for t in inputs]
    wide = [t.requires_grad_() for t in inputs]
    out = sliding_window_attention_gpu(*narrow, window, causal)
    expected = sliding_window_attention(*wide, window, causal)
    grads = torch.autograd.grad(out, narrow, grad_out.bfloat16())
    expected_grads = torch.autograd.grad(expected, wide, grad_out)
    names = ["out", "dq", "dk", "dv"]
    for name, a, b in zip(names, [out, *grads], [expected, *expected_grads], strict=True):
        error = ((a.float() - b).norm() / b.norm()).item()
        assert error < 1e-2, f"{name}: relative error {error:.2e}"
    misses = cached_sliding_window_flex_mask.cache_info().misses
    mask = cached_sliding_window_flex_mask(n, window, causal, out.device)
    assert cached_sliding_window_flex_mask.cache_info().misses == misses  # the call built it
    assert mask.kv_indices.is_cuda
