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
from copy import deepcopy

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from nsa_tutorial.cache import Cache, CompressionState, KeysValues, decode_step, running_buffer
from nsa_tutorial.compress import (
    compress,
    compressed_attention,
    default_compress_mlp,
    prepend_memory,
)
from nsa_tutorial.fine_attention import FlexMaskBuilder
from nsa_tutorial.importance import importance_scores
from nsa_tutorial.kernels import TRITON_AVAILABLE
from nsa_tutorial.kernels.importance import top_blocks_from_keys
from nsa_tutorial.norm import RMSNorm
from nsa_tutorial.rotary import RotaryEmbedding
from nsa_tutorial.selection import selection_branch, top_blocks
from nsa_tutorial.sliding import sliding_window_attention, sliding_window_attention_flex
from nsa_tutorial.validation import require_positive_int

STRATEGIES = ("compressed", "selected", "sliding")
COMPRESSED_CHUNK = 256  # queries at a time on the PyTorch path: (chunk, n) scores per head at most


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
    return nn.Sequential(mlp, nn.Sigmoid(), Rearrange("b n (h branch) -> b h n branch", h=heads))


def combine_branches(
    gates: Tensor, compressed: Tensor, selected: Tensor, sliding: Tensor
) -> Tensor:
    """Eq. 5: gates (b, h, n, 3) weigh the branch outputs (b, h, n, d) -> (b, h, n, d)."""
    branches = torch.stack((compressed, selected, sliding))  # (3, b, h, n, d)
    # elementwise, not einsum: as a matrix product that is b * h * n tiny products,
    # more than cuBLAS takes in one batch at 128k tokens
    return (rearrange(gates, "b h n branch -> branch b h n 1") * branches).sum(dim=0)


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
            dim=dim, dim_head=dim_head, heads=heads, kv_heads=kv_heads,
            sliding_window_size=sliding_window_size, compress_block_size=compress_block_size,
            compress_block_sliding_stride=stride, selection_block_size=selection_block_size,
            num_selected_blocks=num_selected_blocks, num_compressed_mem_kv=num_compressed_mem_kv,
            interpolated_importance_score=interpolated_importance_score,
            use_triton_kernel=use_triton_kernel,
        )  # fmt: skip
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
        cache: Cache | None = None,
        disable_triton_kernel: bool = False,
        sliding_window_flex_mask: BlockMask | None = None,
        fine_selection_flex_mask: FlexMaskBuilder | None = None,
        return_cache: bool = False,
    ) -> Tensor | tuple[Tensor, Cache]:
        """inp (b, n, dim) -> (b, n, dim); with return_cache=True, also the cache.

        The arguments are the reference's, in its order. With a `cache` (from an earlier
        call with return_cache=True), inp is the one next token (b, 1, dim) and the
        output equals the last row of a full forward over the whole sequence
        (`nsa_tutorial.cache`, notebook 07). The flex-attention masks, from
        `nsa_tutorial.sliding.sliding_window_flex_mask` and
        `nsa_tutorial.fine_attention.fine_selection_flex_mask` built for this length,
        compute the sliding and selected branches with flex attention; the numbers are
        the same. With use_triton_kernel=True, unless `disable_triton_kernel`, the
        compressed and selected branches run Triton kernels (notebooks 08-10; they win over
        the flex masks), importance comes from `nsa_tutorial.kernels.importance`, and the
        window from `nsa_tutorial.kernels.window`.
        """
        self._check_input(inp, sliding_window_flex_mask, return_cache)
        if cache is not None:
            out, cache = decode_step(self, inp, cache)
            return (out, cache) if return_cache else out
        use_kernels = self.use_triton_kernel and not disable_triton_kernel
        x = self.normalize(inp, use_kernels)
        q, k, v = self.project_heads(x)
        ck, cv = self.compressed_tokens(k, v)
        compressed, top = self.compressed_branch(q, ck, cv, use_kernels=use_kernels)
        rotated_q, rotated_k = self.rotate(q, use_kernels), self.rotate(k, use_kernels)
        selected = self.selected_branch(
            rotated_q, rotated_k, v, top, flex_mask=fine_selection_flex_mask, use_triton=use_kernels
        )
        sliding = self.sliding_branch(
            rotated_q, rotated_k, v, sliding_window_flex_mask, use_kernels=use_kernels
        )
        out = self.combine(x, compressed, selected, sliding, use_kernels=use_kernels)  # Eq. 5
        if not return_cache:
            return out
        running = running_buffer(k, v, self.compress_block_size, self.compress_block_sliding_stride)
        compression = CompressionState(KeysValues(ck, cv), running)
        return out, Cache(KeysValues(rotated_k, v), compression)

    def normalize(self, inp: Tensor, use_kernels: bool = False) -> Tensor:
        """The pre-norm of inp (b, n, dim); with use_kernels and an RMSNorm, one Triton pass
        each way (`nsa_tutorial.kernels.glue`), same numbers, no float32 copies kept."""
        if use_kernels and isinstance(self.norm, RMSNorm):
            from nsa_tutorial.kernels.glue import rms_norm_triton

            return rms_norm_triton(inp, self.norm.weight, self.norm.eps_for(inp.dtype))
        return self.norm(inp)

    def project_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normed input (b, n, dim) -> q (b, h, n, d), k and v (b, kv_heads, n, d)."""
        q, k, v = self.to_qkv(x).split(self.qkv_split, dim=-1)
        return tuple(rearrange(t, "b n (h d) -> b h n d", d=self.dim_head) for t in (q, k, v))

    def compressed_tokens(
        self, k: Tensor, v: Tensor, stride: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Compressed keys and values (b, kv_heads, w, d) of unrotated k, v (no memory).

        stride defaults to compress_block_sliding_stride; a decoding step compresses the
        one block it closes with stride = block size.
        """
        block = self.compress_block_size
        stride = self.compress_block_sliding_stride if stride is None else stride
        ck = compress(k, self.k_intrablock_positions, self.k_compress, block, stride)
        cv = compress(v, self.v_intrablock_positions, self.v_compress, block, stride)
        return ck, cv

    def compressed_branch(
        self, q: Tensor, ck: Tensor, cv: Tensor, *, first_query: int = 0, use_kernels: bool = False
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attention over memory + compressed keys/values (Eq. 7), and each query's top-n
        selection blocks by the importance that attention gives them (Eq. 8-11).

        Returns the output (b, h, i, d) and (values, indices) (b, h_sel, i, s). Never an
        (n, w) tensor: the PyTorch path goes COMPRESSED_CHUNK queries at a time; the
        kernel path (use_kernels, whole sequences) runs the Triton kernel and scores the
        selection blocks as in `nsa_tutorial.kernels.importance`.
        """
        if use_kernels and first_query == 0:
            return self.kernel_compressed_attention(q, ck, cv), self.kernel_top_blocks(q, ck)
        memory_k, memory_v = self.compress_mem_kv
        with_memory = prepend_memory(ck, memory_k), prepend_memory(cv, memory_v)
        chunks = [
            self._compressed_rows(q[..., start : start + COMPRESSED_CHUNK, :], *with_memory,
                                  first_query + start)
            for start in range(0, q.shape[-2], COMPRESSED_CHUNK)
        ]  # fmt: skip
        out, values, indices = (torch.cat(parts, dim=-2) for parts in zip(*chunks, strict=True))
        return out, (values, indices)

    def kernel_compressed_attention(self, q: Tensor, ck: Tensor, cv: Tensor) -> Tensor:
        """The kernel path's compressed attention: the Triton kernel over memory + ck, cv
        (b, kv_heads, w, d) for the whole sequence q (b, h, n, d) -> (b, h, n, d)."""
        from nsa_tutorial.kernels.compressed import compressed_attention as attention_kernel

        memory_k, memory_v = self.compress_mem_kv
        return attention_kernel(
            q, prepend_memory(ck, memory_k), prepend_memory(cv, memory_v),
            num_memory=self.num_mem_compress_kv, stride=self.compress_block_sliding_stride,
            causal=self.causal, scale=self.scale,
        )  # fmt: skip

    def kernel_top_blocks(self, q: Tensor, ck: Tensor) -> tuple[Tensor, Tensor]:
        """The kernel path's top-n (values, indices) (b, h_sel, n, s): importance from
        block keys (`nsa_tutorial.kernels.importance`), no (n, w) tensor; in one Triton
        pass (`nsa_tutorial.kernels.top_blocks`) unless diff-topk needs its gradient or
        more blocks are selected than that kernel keeps."""
        from nsa_tutorial.kernels import top_blocks

        with self._importance_grad():
            find = top_blocks.top_blocks_kernel
            if torch.is_grad_enabled() or self.num_selected_blocks > top_blocks.MAX_SELECTED:
                find = top_blocks_from_keys
            return find(
                q, ck, num_selected=self.num_selected_blocks,
                stride=self.compress_block_sliding_stride,
                selection_block=self.selection_block_size, group_size=self._selection_group,
                interpolate=self.interpolated_importance_score, causal=self.causal,
                scale=self.scale,
            )  # fmt: skip

    @property
    def _selection_group(self) -> int | None:
        """Query heads that share one selection (the GQA group), or None: one per head."""
        return self.num_grouped_queries if self.query_heads_share_selected_kv else None

    def _compressed_rows(
        self, q: Tensor, ck: Tensor, cv: Tensor, first_query: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One chunk of the PyTorch path: the queries first_query, ... (q's rows) over
        memory + compressed ck, cv -> output, top-n values and indices."""
        out, logits = compressed_attention(
            q, ck, cv, self.num_mem_compress_kv, self.compress_block_sliding_stride,
            self.causal, self.scale, first_query,
        )  # fmt: skip
        with self._importance_grad():
            importance = importance_scores(
                logits, self.num_mem_compress_kv, self.compress_block_sliding_stride,
                self.selection_block_size, self._selection_group,
                self.interpolated_importance_score, self.causal, first_query,
            )  # fmt: skip
            values, indices = top_blocks(importance, self.num_selected_blocks)
        return out, values, indices

    def _importance_grad(self) -> torch.autograd.grad_mode.set_grad_enabled:
        """Importance needs gradients only as diff-topk gates: otherwise autograd keeps
        none of its tensors (top-n indices have no gradient anyway)."""
        return torch.set_grad_enabled(self.use_diff_topk and torch.is_grad_enabled())

    def rotate(self, t: Tensor, use_kernels: bool = False) -> Tensor:
        """Rotary embedding of queries or keys t (b, h, n, d) at positions 0 .. n - 1; with
        use_kernels, one Triton pass (`nsa_tutorial.kernels.glue`), same numbers."""
        if use_kernels:
            from nsa_tutorial.kernels.glue import rotary_triton

            return rotary_triton(t, self.rotary_emb.freqs)
        return self.rotary_emb.rotate_queries_or_keys(t)

    def selected_branch(
        self, q: Tensor, k: Tensor, v: Tensor, top: tuple[Tensor, Tensor], *,
        first_query: int = 0, flex_mask: FlexMaskBuilder | None = None, use_triton: bool = False,
    ) -> Tensor:  # fmt: skip
        """Fine attention over each query's top blocks, top = (values, indices).

        q holds the queries from first_query on (a decoding step: one), k and v the
        rotated keys and values so far.
        """
        return selection_branch(
            q, k, v, *top, block_size=self.selection_block_size, causal=self.causal,
            diff_topk=self.use_diff_topk, scale=self.scale, first_query=first_query,
            flex_mask=flex_mask, use_triton=use_triton,
        )  # fmt: skip

    def sliding_branch(
        self, q: Tensor, k: Tensor, v: Tensor, flex_mask: BlockMask | None = None,
        use_kernels: bool = False,
    ) -> Tensor:  # fmt: skip
        """The sliding window over rotated q, k and v: through flex attention with a given
        mask; with use_kernels, the Triton kernels (faster than compiled flex attention on
        an H200, notebook 10); else the exact chunks."""
        if flex_mask is not None:
            return sliding_window_attention_flex(q, k, v, flex_mask, self.scale)
        if use_kernels:
            from nsa_tutorial.kernels.window import window_attention

            return window_attention(
                q, k, v, window=self.sliding_window_size, causal=self.causal, scale=self.scale
            )
        return sliding_window_attention(q, k, v, self.sliding_window_size, self.causal, self.scale)

    def combine(
        self, x: Tensor, compressed: Tensor, selected: Tensor, sliding: Tensor,
        use_kernels: bool = False,
    ) -> Tensor:  # fmt: skip
        """Eq. 5: the gated sum of the three branches (b, h, n, d), projected -> (b, n, dim);
        with use_kernels the sum and the move of heads last are one Triton pass."""
        gates = self.to_strategy_combine(x)  # (b, h, n, 3)
        if use_kernels:
            from nsa_tutorial.kernels.glue import gated_sum_triton

            return self.combine_heads(gated_sum_triton(gates, compressed, selected, sliding))
        out = combine_branches(gates, compressed, selected, sliding)
        return self.combine_heads(rearrange(out, "b h n d -> b n (h d)"))

    def _check_input(
        self, inp: Tensor, sliding_window_flex_mask: BlockMask | None, return_cache: bool
    ) -> None:
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
        if return_cache and not self.causal:
            raise ValueError(
                "return_cache=True needs causal=True: a cache serves decoding token by token"
            )
        if sliding_window_flex_mask is not None:
            built_for = tuple(sliding_window_flex_mask.seq_lengths)[0]
            if built_for != inp.shape[1]:
                raise ValueError(
                    f"sliding_window_flex_mask was built for {built_for} queries, "
                    f"but inp has seq_len={inp.shape[1]}"
                )


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
    if args["use_triton_kernel"] and not TRITON_AVAILABLE:
        raise ValueError(
            "use_triton_kernel=True needs Triton, which is not installed here (it has no "
            "macOS wheels); use the default (False), the PyTorch path with the same numbers"
        )
