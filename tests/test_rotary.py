"""nsa_tutorial's rotary embedding against rotary-embedding-torch (the reference's)."""

import pytest
import torch
from rotary_embedding_torch import RotaryEmbedding as ReferenceRotary

from nsa_tutorial import RotaryEmbedding, apply_rotary, rotary_frequencies, rotate_pairs


@pytest.mark.parametrize("dim", [4, 8, 16, 64, 128])
@pytest.mark.parametrize("offset", [0, 1, 37, 5000])
def test_matches_rotary_embedding_torch(dim, offset):
    torch.manual_seed(dim + offset)
    reference, ours = ReferenceRotary(dim), RotaryEmbedding(dim)
    t = torch.randn(2, 3, 19, dim)
    expected = reference.rotate_queries_or_keys(t, offset=offset)
    torch.testing.assert_close(
        ours.rotate_queries_or_keys(t, offset=offset), expected, atol=1e-5, rtol=1e-5
    )


def test_state_dict_is_the_reference_one():
    reference, ours = ReferenceRotary(64), RotaryEmbedding(64)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {"freqs": (32,)}
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert not ours.freqs.requires_grad


def test_loaded_frequencies_are_used():
    ours = RotaryEmbedding(8)
    ours.load_state_dict({"freqs": torch.zeros(4)})
    t = torch.randn(1, 5, 8)
    torch.testing.assert_close(ours(t), t)


def test_frequencies_follow_theta():
    torch.testing.assert_close(rotary_frequencies(4, 100.0), torch.tensor([1.0, 0.1]))
    torch.testing.assert_close(
        ReferenceRotary(16, theta=500000).freqs.data, rotary_frequencies(16, 500000.0)
    )


def test_rotate_pairs_is_a_quarter_turn_of_neighbours():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(rotate_pairs(x), torch.tensor([-2.0, 1.0, -4.0, 3.0]))
    torch.testing.assert_close(rotate_pairs(rotate_pairs(x)), -x)


def test_scores_depend_only_on_distance():
    torch.manual_seed(0)
    freqs = rotary_frequencies(32)
    q, k = torch.randn(1, 32), torch.randn(1, 32)

    def score(m, n):
        return (apply_rotary(q, freqs, m) * apply_rotary(k, freqs, n)).sum()

    torch.testing.assert_close(score(7, 3), score(107, 103), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score(0, 0), (q * k).sum())


def test_extra_features_pass_through_and_dtype_is_kept():
    x = torch.randn(3, 10, dtype=torch.bfloat16)
    out = apply_rotary(x, rotary_frequencies(8), offset=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[..., 8:], x[..., 8:])


def test_bad_input_is_named():
    with pytest.raises(
        ValueError, match=r"x must have shape \(\.\.\., n, d\), got x of shape \(8,\)"
    ):
        apply_rotary(torch.randn(8), rotary_frequencies(8))
    with pytest.raises(
        ValueError, match=r"last axis \(6\) must hold at least 2 \* len\(freqs\) = 8"
    ):
        apply_rotary(torch.randn(2, 6), rotary_frequencies(8))
    with pytest.raises(ValueError, match="dim must be positive, got dim=-2"):
        RotaryEmbedding(-2)
    with pytest.raises(ValueError, match="theta must be positive, got theta=0"):
        RotaryEmbedding(8, theta=0)


def test_loads_the_norm_and_rotary_weights_of_the_reference_sparse_attention():
    from native_sparse_attention_pytorch import SparseAttention

    from nsa_tutorial import RMSNorm

    reference = SparseAttention(
        dim=32,
        dim_head=16,
        heads=2,
        sliding_window_size=4,
        compress_block_size=4,
        compress_block_sliding_stride=4,
        selection_block_size=4,
        num_selected_blocks=2,
    )
    rotary, norm = RotaryEmbedding(16), RMSNorm(32)
    rotary.load_state_dict(reference.rotary_emb.state_dict(), strict=True)
    norm.load_state_dict(reference.norm.state_dict(), strict=True)
    x, t = torch.randn(2, 9, 32), torch.randn(2, 2, 9, 16)
    torch.testing.assert_close(norm(x), reference.norm(x))
    torch.testing.assert_close(rotary(t), reference.rotary_emb.rotate_queries_or_keys(t))
