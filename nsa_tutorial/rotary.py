"""Stage 01: rotary position embeddings (RoPE, Su et al. 2021), interleaved-pair convention.

Rotary embeddings turn every consecutive pair of features (x[2i], x[2i+1]) of a
query or key at position p by the angle p * freq[i]. A rotation by a and one by b
leave a dot product that depends only on b - a, so attention scores see relative
positions. The convention follows rotary-embedding-torch, which
native-sparse-attention-pytorch uses: pairs are neighbours (not the two halves of
the vector), freq[i] = theta ** (-2i / dim) with theta = 10000, and the module
stores them as a parameter `freqs` of shape (dim // 2,).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from nsa_tutorial.validation import require_positive_int


def rotary_frequencies(dim_head: int, theta: float = 10000.0) -> Tensor:
    """Angle per position, in radians, of each feature pair: theta ** (-2i / dim_head).

    Returns (dim_head // 2,) float32; pair 0 turns fastest (1 rad per position).
    """
    exponents = torch.arange(0, dim_head, 2)[: dim_head // 2].float() / dim_head
    return 1.0 / theta**exponents


def rotate_pairs(x: Tensor) -> Tensor:
    """Turn every feature pair (a, b) into (-b, a): a quarter turn of each pair.

    x: (..., d) with d even. Used as cos(angle) * x + sin(angle) * rotate_pairs(x).
    """
    pairs = rearrange(x, "... (d r) -> ... d r", r=2)
    first, second = pairs.unbind(dim=-1)
    return rearrange(torch.stack((-second, first), dim=-1), "... d r -> ... (d r)")


def rotary_angles(seq_len: int, freqs: Tensor, offset: int = 0) -> Tensor:
    """Angle of every feature at positions offset .. offset + seq_len - 1.

    Returns (seq_len, 2 * len(freqs)): each pair's angle repeated for both its features.
    """
    positions = torch.arange(seq_len, device=freqs.device, dtype=torch.float32) + offset
    angles = torch.einsum("n, f -> n f", positions, freqs.float())  # (n, d/2)
    return repeat(angles, "n f -> n (f r)", r=2)  # (n, d)


def apply_rotary(x: Tensor, freqs: Tensor, offset: int = 0) -> Tensor:
    """Rotate queries or keys x (..., n, d) placed at positions offset .. offset + n - 1.

    The first 2 * len(freqs) features are rotated, any others pass through. The
    rotation is computed in float32 and cast back to x's dtype.
    """
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., n, d), got x of shape {tuple(x.shape)}")
    rot_dim = 2 * freqs.shape[-1]
    if x.shape[-1] < rot_dim:
        raise ValueError(
            f"x's last axis ({x.shape[-1]}) must hold at least 2 * len(freqs) = {rot_dim} features"
        )
    angles = rotary_angles(x.shape[-2], freqs, offset)  # (n, rot_dim)
    x_rot, x_pass = x[..., :rot_dim].float(), x[..., rot_dim:]
    rotated = x_rot * angles.cos() + rotate_pairs(x_rot) * angles.sin()
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary embedding with fixed frequencies stored as the parameter `freqs` (dim // 2,).

    `freqs` does not train (requires_grad=False) but sits in the state_dict, exactly
    as in rotary-embedding-torch, so saved weights load with strict=True.
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        require_positive_int("dim", dim)
        if not theta > 0:
            raise ValueError(f"theta must be positive, got theta={theta!r}")
        self.freqs = nn.Parameter(rotary_frequencies(dim, theta), requires_grad=False)

    def rotate_queries_or_keys(self, t: Tensor, offset: int = 0) -> Tensor:
        """Rotate t (..., n, d) as tokens at positions offset .. offset + n - 1."""
        return apply_rotary(t, self.freqs, offset)

    def forward(self, t: Tensor, offset: int = 0) -> Tensor:
        return self.rotate_queries_or_keys(t, offset)
