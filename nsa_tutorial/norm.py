"""Stage 01: RMSNorm, the pre-norm that `SparseAttention` applies to its input.

RMSNorm (Zhang & Sennrich, 2019) rescales each feature vector to unit root mean
square and multiplies by a learned gain. Unlike LayerNorm it does not subtract the
mean, which makes it cheaper and, in practice, just as good. It matches
`torch.nn.RMSNorm`, so the module built in this course loads weights saved by
native-sparse-attention-pytorch (`norm.weight`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nsa_tutorial.validation import require_positive_int


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Normalise the last axis of `x` to unit root mean square, then scale by `weight`.

    x: (..., d), weight: (d,). eps sits inside the square root, as in torch.nn.RMSNorm.
    """
    mean_square = x.pow(2).mean(dim=-1, keepdim=True)  # (..., 1)
    return x * torch.rsqrt(mean_square + eps) * weight


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned gain `weight` of shape (dim,).

    `eps=None` uses the machine epsilon of the input's dtype, as torch.nn.RMSNorm does.
    Half-precision inputs are normalised in float32 and cast back.
    """

    def __init__(self, dim: int, eps: float | None = None) -> None:
        super().__init__()
        require_positive_int("dim", dim)
        if eps is not None and not eps > 0:
            raise ValueError(f"eps must be a positive number or None, got eps={eps!r}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1:] != (self.dim,):
            raise ValueError(
                f"RMSNorm(dim={self.dim}) needs inputs whose last axis has size {self.dim}, "
                f"got x of shape {tuple(x.shape)}"
            )
        normed = rms_norm(x.float(), self.weight.float(), self.eps_for(x.dtype))
        return normed.to(x.dtype)

    def eps_for(self, dtype: torch.dtype) -> float:
        """The eps used for inputs of `dtype`: the one given, else that dtype's machine
        epsilon (as torch.nn.RMSNorm). SparseAttention's kernel path uses it as well."""
        return self.eps if self.eps is not None else torch.finfo(dtype).eps

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
