"""Branch outputs of the reference SparseAttention (native-sparse-attention-pytorch
0.2.3), and the same branches computed with nsa_tutorial's stage functions.

The reference only returns the gated sum of its three branches. Giving it a
strategy module that outputs +-100 (sigmoid: 1 or ~4e-44) and an identity output
projection turns its output into one branch's output, head by head.
"""

from __future__ import annotations

import torch
from einops import rearrange
from native_sparse_attention_pytorch import SparseAttention as Reference
from torch import nn

from nsa_tutorial.compress import compress, compressed_attention, prepend_memory
from nsa_tutorial.importance import importance_scores
from nsa_tutorial.rotary import apply_rotary
from nsa_tutorial.selection import selection_branch, top_blocks

BRANCHES = ("compressed", "selected", "sliding")


class OneBranch(nn.Module):
    """Strategy gates that keep one branch: logits +100 for it, -100 for the others."""

    def __init__(self, heads: int, branch: str):
        super().__init__()
        self.register_buffer(
            "logits", torch.tensor([100.0 if b == branch else -100.0 for b in BRANCHES] * heads)
        )

    def forward(self, x):
        return self.logits.expand(*x.shape[:-1], -1)


def reference_branch(config: dict, branch: str, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(b, h, n, d) output of one branch of a reference module built from `config`."""
    torch.manual_seed(seed)
    heads, dim_head = config["heads"], config["dim_head"]
    model = Reference(dim=heads * dim_head, strategy_combine_mlp=OneBranch(heads, branch), **config)
    randomise(model)
    with torch.no_grad():
        model.combine_heads.weight.copy_(torch.eye(heads * dim_head))
    return model, rearrange(model(x), "b n (h d) -> b h n d", h=heads)


def randomise(model: nn.Module) -> None:
    """Non-zero memory tokens and positions (they start at zero)."""
    with torch.no_grad():
        for name in ("compress_mem_kv", "k_intrablock_positions", "v_intrablock_positions"):
            getattr(model, name).normal_()


def our_branches(model, x, interpolate: bool = False) -> dict[str, torch.Tensor]:
    """The compressed and selected branch outputs from nsa_tutorial's stage functions."""
    heads, kv_heads, d = model.heads, model.kv_heads, model.dim_head
    block, stride = model.compress_block_size, model.compress_block_sliding_stride
    q, k, v = model.to_qkv(model.norm(x)).split(model.qkv_split, dim=-1)
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", d=d) for t in (q, k, v))
    ck = prepend_memory(
        compress(k, model.k_intrablock_positions, model.k_compress, block, stride),
        model.compress_mem_kv[0],
    )
    cv = prepend_memory(
        compress(v, model.v_intrablock_positions, model.v_compress, block, stride),
        model.compress_mem_kv[1],
    )
    num_memory = model.compress_mem_kv.shape[-2]
    compressed, logits = compressed_attention(q, ck, cv, num_memory, stride, model.causal)
    group = heads // kv_heads if model.query_heads_share_selected_kv else None
    importance = importance_scores(
        logits, num_memory, stride, model.selection_block_size, group, interpolate
    )
    freqs = model.rotary_emb.freqs
    rq, rk = apply_rotary(q, freqs), apply_rotary(k, freqs)
    values, indices = top_blocks(importance, model.num_selected_blocks)
    selected = selection_branch(
        rq,
        rk,
        v,
        values,
        indices,
        block_size=model.selection_block_size,
        causal=model.causal,
        diff_topk=model.use_diff_topk,
    )
    return {"compressed": compressed, "selected": selected}
