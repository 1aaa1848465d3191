"""Stage 02 functions against the loop specs and the reference's layout."""

import pytest
import torch
from native_sparse_attention_pytorch import SparseAttention as Reference

from nsa_tutorial.compress import (
    compressed_attention,
    compressed_causal_mask,
    compression_windows,
    default_compress_mlp,
)
from nsa_tutorial.course.stage02_compression import (
    compressed_attention_spec,
    compressed_causal_mask_spec,
    compression_windows_spec,
)
from nsa_tutorial.gqa import masked_logit


@pytest.mark.parametrize("n", [1, 3, 4, 7, 16, 33])
@pytest.mark.parametrize(("block", "stride"), [(4, 4), (8, 4), (4, 2), (6, 3), (4, 1)])
def test_windows_match_the_loop(n, block, stride):
    x = torch.randn(2, 3, n, 5)
    torch.testing.assert_close(
        compression_windows(x, block, stride), compression_windows_spec(x, block, stride)
    )


@pytest.mark.parametrize(
    ("n", "blocks", "stride", "memory"), [(1, 0, 4, 1), (13, 3, 4, 1), (20, 9, 2, 3)]
)
def test_causal_mask_matches_the_loop(n, blocks, stride, memory):
    assert torch.equal(
        compressed_causal_mask(n, blocks, stride, memory),
        compressed_causal_mask_spec(n, blocks, stride, memory),
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("hq", "hk"), [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize(("n", "blocks"), [(1, 0), (5, 1), (19, 4)])
def test_compressed_attention_matches_the_loop(causal, hq, hk, n, blocks):
    memory, stride = 2, 4
    q = torch.randn(2, hq, n, 8)
    ck, cv = torch.randn(2, 2, hk, memory + blocks, 8).unbind(0)
    out, logits = compressed_attention(q, ck, cv, memory, stride, causal)
    torch.testing.assert_close(out, compressed_attention_spec(q, ck, cv, memory, stride, causal))
    if causal:
        hidden = ~compressed_causal_mask(n, blocks, stride, memory)
        assert torch.all(logits[..., hidden] == masked_logit(torch.float32))
    else:
        assert torch.all(logits > masked_logit(torch.float32))


def test_compress_mlp_has_the_reference_layout():
    reference = Reference(
        dim=16,
        dim_head=8,
        heads=2,
        sliding_window_size=2,
        compress_block_size=4,
        compress_block_sliding_stride=2,
        selection_block_size=4,
        num_selected_blocks=1,
        compress_mlp_expand_factor=2.0,
    )
    ours = default_compress_mlp(4, 8, expand_factor=2.0)
    ours.load_state_dict(reference.k_compress.state_dict(), strict=True)
    windows = torch.randn(1, 2, 3, 4, 8)
    torch.testing.assert_close(ours(windows), reference.k_compress(windows))
