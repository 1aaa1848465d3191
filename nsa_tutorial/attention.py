"""Stage 06: the assembled `SparseAttention` (paper §3, Eq. 5, Fig. 2).

Three branches over the same queries, mixed by learned sigmoid gates:

    o_t = g_cmp * Attn(q_t, compressed kv) + g_slc * Attn(q_t, selected kv)
          + g_win * Attn(q_t, window kv)

Constructor arguments, parameter names and numbers follow `SparseAttention` of
native-sparse-attention-pytorch 0.2.3, plus `interpolated_importance_score` from
the version of the class this course grew from.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from copy import deepcopy

import torch
from einops import einsum, rearrange
from einops.layers.torch import Rearrange
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from nsa_tutorial.compress import (
    compress,
    compressed_attention,
    default_compress_mlp,
    prepend_memory,
)
from nsa_tutorial.importance import importance_scores
from nsa_tutorial.norm import RMSNorm
from nsa_tutorial.rotary import RotaryEmbedding
from nsa_tutorial.selection import selection_attention
from nsa_tutorial.sliding import sliding_window_attention, sliding_window_attention_flex
from nsa_tutorial.validation import require_positive_int

STRATEGIES = ("compressed", "selected", "sliding")


def default_strategy_gates(dim: int, heads: int) -> nn.Linear:
    """Linear(dim, 3 * heads), weight 0 and bias (-2, -2, 2) per head: at first every
    token leans on the sliding window (sigmoid(2) = 0.88) over the other two (0.12)."""
    linear = nn.Linear(dim, 3 * heads)
    nn.init.zeros_(linear.weight)
    with torch.no_grad():
        linear.bias.copy_(torch.tensor([-2.0, -2.0, 2.0] * heads))
    return linear


def strategy_gate_network(mlp: nn.Module, heads: int) -> nn.Sequential:
    """mlp (dim -> 3 * heads) -> sigmoid -> gates (b, heads, n, 3), one per branch (Eq. 5).

    Each gate is its own sigmoid, so the branches are not forced to share a total of 1.
    """
    return nn.Sequential(mlp, nn.Sigmoid(), Rearrange("b n (h s) -> b h n s", h=heads))


def combine_branches(
    gates: Tensor, compressed: Tensor, selected: Tensor, sliding: Tensor
) -> Tensor:
    """Eq. 5: gates (b, h, n, 3) weigh the branch outputs (b, h, n, d) -> (b, h, n, d)."""
    branches = torch.stack((compressed, selected, sliding))  # (3, b, h, n, d)
    return einsum(gates, branches, "b h n s, s b h n d -> b h n d")


class SparseAttention(nn.Module):
    """Native Sparse Attention over inputs (batch, seq_len, dim)."""

    def __init__(
        self,
        dim: int,
        dim_head: int,
        heads: int,
        sliding_window_size: int,
        compress_block_size: int,
        compress_block_sliding_stride: int | None = None,
        selection_block_size: int | None = None,
        num_selected_blocks: int | None = None,
        kv_heads: int | None = None,
        num_compressed_mem_kv: int = 1,
        causal: bool = False,
        norm: bool = True,
        use_diff_topk: bool = False,
        use_triton_kernel: bool = False,
        query_heads_share_selected_kv: bool = True,
        compress_mlp: nn.Module | None = None,
        compress_mlp_expand_factor: float = 1.0,
        strategy_combine_mlp: nn.Module | None = None,
        interpolated_importance_score: bool = False,
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        stride = (
            compress_block_size
            if compress_block_sliding_stride is None
            else compress_block_sliding_stride
        )
        _validate(
            dim=dim,
            dim_head=dim_head,
            heads=heads,
            kv_heads=kv_heads,
            sliding_window_size=sliding_window_size,
            compress_block_size=compress_block_size,
            compress_block_sliding_stride=stride,
            selection_block_size=selection_block_size,
            num_selected_blocks=num_selected_blocks,
            num_compressed_mem_kv=num_compressed_mem_kv,
            interpolated_importance_score=interpolated_importance_score,
            use_triton_kernel=use_triton_kernel,
        )
        if num_selected_blocks == 0:
            warnings.warn(
                "num_selected_blocks=0 turns the selection branch into attention within each "
                "query's own block only; set it > 0 unless you are ablating selection",
                stacklevel=2,
            )
        self.dim, self.dim_head, self.heads, self.kv_heads = dim, dim_head, heads, kv_heads
        self.num_grouped_queries = heads // kv_heads
        self.scale = dim_head**-0.5
        self.causal = causal
        self.sliding_window_size = sliding_window_size
        self.compress_block_size = compress_block_size
        self.compress_block_sliding_stride = stride
        self.selection_block_size = selection_block_size
        self.num_selected_blocks = num_selected_blocks
        self.num_mem_compress_kv = num_compressed_mem_kv
        self.use_diff_topk = use_diff_topk
        self.use_triton_kernel = use_triton_kernel
        self.query_heads_share_selected_kv = query_heads_share_selected_kv
        self.interpolated_importance_score = interpolated_importance_score

        self.norm = RMSNorm(dim) if norm else nn.Identity()
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.qkv_split = (dim_head * heads, dim_head * kv_heads, dim_head * kv_heads)
        self.to_qkv = nn.Linear(dim, sum(self.qkv_split), bias=False)

        self.compress_mem_kv = nn.Parameter(
            torch.zeros(2, kv_heads, num_compressed_mem_kv, dim_head)
        )
        self.k_intrablock_positions = nn.Parameter(
            torch.zeros(kv_heads, compress_block_size, dim_head)
        )
        self.v_intrablock_positions = nn.Parameter(
            torch.zeros(kv_heads, compress_block_size, dim_head)
        )
        if compress_mlp is None:
            compress_mlp = default_compress_mlp(
                compress_block_size, dim_head, compress_mlp_expand_factor
            )
        self.k_compress = deepcopy(compress_mlp)
        self.v_compress = deepcopy(compress_mlp)

        if strategy_combine_mlp is None:
            strategy_combine_mlp = default_strategy_gates(dim, heads)
        self.to_strategy_combine = strategy_gate_network(strategy_combine_mlp, heads)
        self.combine_heads = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(
        self,
        inp: Tensor,
        *,
        sliding_window_flex_mask: BlockMask | None = None,
        fine_selection_flex_mask: Callable[[Tensor, Tensor, int], BlockMask] | None = None,
    ) -> Tensor:
        """inp (b, n, dim) -> (b, n, dim).

        The flex-attention masks, from `nsa_tutorial.sliding.sliding_window_flex_mask`
        and `nsa_tutorial.selection.fine_selection_flex_mask` built for this length,
        compute the sliding and selected branches with flex attention instead; the
        numbers are the same.
        """
        self._check_input(inp)
        if sliding_window_flex_mask is not None:
            lengths = tuple(sliding_window_flex_mask.seq_lengths)
            if lengths[0] != inp.shape[1]:
                raise ValueError(
                    f"sliding_window_flex_mask was built for {lengths[0]} queries, "
                    f"but inp has seq_len={inp.shape[1]}"
                )
        inp = self.norm(inp)
        q, k, v = self.to_qkv(inp).split(self.qkv_split, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", d=self.dim_head) for t in (q, k, v))

        compressed, logits = self.compressed_branch(q, k, v)
        rotated_q = self.rotary_emb.rotate_queries_or_keys(q)
        rotated_k = self.rotary_emb.rotate_queries_or_keys(k)
        selected = self.selected_branch(rotated_q, rotated_k, v, logits, fine_selection_flex_mask)
        if sliding_window_flex_mask is None:
            sliding = sliding_window_attention(
                rotated_q, rotated_k, v, self.sliding_window_size, self.causal, self.scale
            )
        else:
            sliding = sliding_window_attention_flex(
                rotated_q, rotated_k, v, sliding_window_flex_mask, self.scale
            )

        gates = self.to_strategy_combine(inp)  # (b, h, n, 3)
        out = combine_branches(gates, compressed, selected, sliding)
        return self.combine_heads(rearrange(out, "b h n d -> b n (h d)"))

    def compressed_branch(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Attention over memory + compressed keys/values (unrotated); also the logits."""
        block, stride = self.compress_block_size, self.compress_block_sliding_stride
        ck = compress(k, self.k_intrablock_positions, self.k_compress, block, stride)
        cv = compress(v, self.v_intrablock_positions, self.v_compress, block, stride)
        ck, cv = (
            prepend_memory(ck, self.compress_mem_kv[0]),
            prepend_memory(cv, self.compress_mem_kv[1]),
        )
        return compressed_attention(
            q, ck, cv, self.num_mem_compress_kv, stride, self.causal, self.scale
        )

    def selected_branch(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        logits: Tensor,
        flex_mask: Callable[[Tensor, Tensor, int], BlockMask] | None = None,
    ) -> Tensor:
        """Fine attention over the top blocks chosen from the compressed logits."""
        group = self.num_grouped_queries if self.query_heads_share_selected_kv else None
        importance = importance_scores(
            logits,
            self.num_mem_compress_kv,
            self.compress_block_sliding_stride,
            self.selection_block_size,
            group,
            self.interpolated_importance_score,
        )
        return selection_attention(
            q,
            k,
            v,
            importance,
            self.num_selected_blocks,
            self.selection_block_size,
            self.causal,
            self.use_diff_topk,
            self.scale,
            flex_mask,
        )

    def _check_input(self, inp: Tensor) -> None:
        if not isinstance(inp, Tensor):
            raise TypeError(f"inp must be a torch.Tensor, got {type(inp).__name__}")
        if inp.ndim != 3:
            raise ValueError(
                f"inp must have shape (batch, seq_len, dim), got inp of shape {tuple(inp.shape)}"
            )
        if inp.shape[-1] != self.dim:
            raise ValueError(
                f"inp's last dimension must equal dim={self.dim}, "
                f"got inp of shape {tuple(inp.shape)}"
            )
        if not inp.is_floating_point():
            raise TypeError(f"inp must be a floating-point tensor, got dtype {inp.dtype}")
        if inp.shape[1] == 0:
            raise ValueError("inp must hold at least one token, got seq_len=0")


def _validate(**args) -> None:
    """Check the configuration; each error names the argument, its value and the rule."""
    for name in (
        "dim",
        "dim_head",
        "heads",
        "kv_heads",
        "sliding_window_size",
        "compress_block_size",
        "compress_block_sliding_stride",
        "num_compressed_mem_kv",
    ):
        require_positive_int(name, args[name])
    for name in ("selection_block_size", "num_selected_blocks"):
        if args[name] is None:
            raise TypeError(f"SparseAttention needs {name}; got none")
    require_positive_int("selection_block_size", args["selection_block_size"])
    selected = args["num_selected_blocks"]
    if isinstance(selected, bool) or not isinstance(selected, int) or selected < 0:
        raise ValueError(
            f"num_selected_blocks must be an int >= 0, got num_selected_blocks={selected!r}"
        )
    heads, kv_heads = args["heads"], args["kv_heads"]
    if kv_heads > heads or heads % kv_heads:
        raise ValueError(
            f"heads must be a multiple of kv_heads (and kv_heads <= heads), "
            f"got heads={heads}, kv_heads={kv_heads}"
        )
    block, stride = args["compress_block_size"], args["compress_block_sliding_stride"]
    if stride > block:
        raise ValueError(
            f"compress_block_sliding_stride must be <= compress_block_size, "
            f"got compress_block_sliding_stride={stride}, compress_block_size={block}"
        )
    selection = args["selection_block_size"]
    if selection % stride and not args["interpolated_importance_score"]:
        raise ValueError(
            f"selection_block_size must be a multiple of compress_block_sliding_stride unless "
            f"interpolated_importance_score=True, got selection_block_size={selection}, "
            f"compress_block_sliding_stride={stride}"
        )
    if args["use_triton_kernel"]:
        raise ValueError(
            "use_triton_kernel=True needs the Triton selection kernel of notebook 08, which is "
            "not in this version yet; use the default (False)"
        )
