"""Notebook 10's exercises: the specs agree with the package (each known mistake of every
stage is named in tests/test_checks.py; test_course_notebooks checks that the notebook
shows the launcher its check uses)."""

import pytest
import torch
from test_exercises import tiles_from_the_mask

from nsa_tutorial.compress import compressed_attention
from nsa_tutorial.course import check
from nsa_tutorial.course import stage10_whole_layer as stage10
from nsa_tutorial.course.verdict import TODO
from nsa_tutorial.importance import selection_block_scores
from nsa_tutorial.kernels import TRITON_AVAILABLE


@pytest.mark.parametrize(("w", "stride", "block"), [(6, 4, 8), (7, 4, 8), (5, 3, 8), (9, 16, 64)])
def test_block_weights_spec_is_notebook_03s_map(w, stride, block):
    scores = torch.randn(3, w, generator=torch.Generator().manual_seed(w))
    weights = stage10.selection_block_weights_spec(w, stride, block)
    assert torch.allclose(scores @ weights, selection_block_scores(scores, stride, block))


def test_compressed_kernel_spec_is_notebook_02s_attention():
    for case in stage10.COMPRESSED_KERNEL.make_cases():
        q, ck, cv, m, stride = case.args
        expected = compressed_attention(q, ck, cv, m, stride, True)[0]
        assert torch.allclose(stage10.compressed_kernel_spec(*case.args), expected, atol=1e-6)


def test_window_key_tiles_spec_is_notebook_05s_mask():
    """Over many row tiles, the spec's tiles are those that hold a key the window mask
    shows one of the tile's tokens: no tile missed, none walked for nothing."""
    generator = torch.Generator().manual_seed(10)
    for _ in range(300):
        n, window, block = (int(torch.randint(lo, hi, (), generator=generator))
                            for lo, hi in ((1, 90), (1, 40), (1, 20)))  # fmt: skip
        first = int(torch.randint(0, n, (), generator=generator))
        last = int(torch.randint(first, n, (), generator=generator))
        for causal in (True, False):
            args = (first, last, window, n, causal, block)
            assert stage10.window_key_tiles_spec(*args) == tiles_from_the_mask(*args), args


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton is not installed")
def test_untouched_kernel_is_not_implemented_yet():
    import triton

    @triton.jit
    def compressed_kernel(Q, CK, CV, OUT, n, num_heads, num_kv_heads, num_keys, num_memory,
                          stride, scale, BLOCK_N: triton.language.constexpr,
                          D: triton.language.constexpr):  # fmt: skip
        raise NotImplementedError("Exercise compressed_kernel: write this part")

    verdict = check("compressed_kernel", compressed_kernel)
    assert verdict.status == TODO and "not implemented yet" in str(verdict)
