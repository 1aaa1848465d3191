"""Checks for notebook 06: the strategy gates (Eq. 5), and the forward pass of
`SparseAttention` assembled from the module's pieces."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from nsa_tutorial.attention import SparseAttention
from nsa_tutorial.course.verdict import Case, Exercise, Mistake


def strategy_gates_spec(x: Tensor, weight: Tensor, bias: Tensor, heads: int) -> Tensor:
    """x (b, n, dim) -> (b, heads, n, 3): sigmoid(x @ weight.T + bias), output features
    ordered head by head, (compressed, selected, sliding) within each head."""
    b, n, _ = x.shape
    out = torch.empty(b, heads, n, 3)
    logits = x @ weight.T + bias  # (b, n, 3 * heads)
    for h in range(heads):
        for s in range(3):
            out[:, h, :, s] = torch.sigmoid(logits[..., h * 3 + s])
    return out


def _gates(x, weight, bias, heads, *, order="(h s)", activation=torch.sigmoid, with_bias=True):
    logits = x @ weight.T + (bias if with_bias else 0)
    return rearrange(activation(logits), f"b n {order} -> b h n s", h=heads)


def _gate_cases() -> list[Case]:
    g = torch.Generator().manual_seed(60)
    return [
        Case(
            (
                torch.randn(1, 5, 4, generator=g),
                torch.randn(6, 4, generator=g),
                torch.randn(6, generator=g),
                2,
            )
        ),
        Case(
            (
                torch.randn(2, 3, 8, generator=g),
                torch.randn(12, 8, generator=g),
                torch.randn(12, generator=g),
                4,
            )
        ),
    ]


STRATEGY_GATES = Exercise(
    name="strategy_gates",
    stage="06",
    hints=(
        (
            "x is (b, n, dim); weight (3 * heads, dim) and bias (3 * heads,) form a linear layer "
            "with three outputs per head. The output is (b, heads, n, 3): for each head and "
            "token, the gates of (compressed, selected, sliding)."
        ),
        (
            "the rule (Eq. 5): gates = sigmoid(x @ weight.T + bias), each gate on its own (no "
            "softmax); output feature 3 * h + c is head h's gate for branch c."
        ),
        (
            "a skeleton:\n"
            "    logits = x @ weight.T + bias  # (b, n, 3 * heads)\n"
            '    return rearrange(torch.sigmoid(logits), "b n (h s) -> ...", h=heads)'
        ),
    ),
    spec=strategy_gates_spec,
    make_cases=_gate_cases,
    mistakes=(
        Mistake(
            "the gates are a sigmoid each, not a softmax over the three branches (Eq. 5 does "
            "not make them sum to 1).",
            lambda *a: _gates(
                *a,
                activation=lambda t: rearrange(
                    rearrange(t, "b n (h s) -> b n h s", s=3).softmax(-1), "b n h s -> b n (h s)"
                ),
            ),
        ),
        Mistake(
            "the output features are ordered head by head: 'b n (h s) -> b h n s', not '(s h)'.",
            lambda *a: _gates(*a, order="(s h)"),
        ),
        Mistake("the bias is missing.", lambda *a: _gates(*a, with_bias=False)),
    ),
)


# ---- the forward pass, assembled from the module's pieces ------------------------------------


def sparse_attention_forward_spec(attn: SparseAttention, inp: Tensor) -> Tensor:
    """The module's own forward: inp (b, n, dim) -> (b, n, dim)."""
    with torch.no_grad():
        return attn(inp)


def _forward_with(
    attn, inp, *, norm_input=True, gates_from_input=False, rotate_compressed=False,
    rotate_fine=True, branch_order=(0, 1, 2), gated=True, head_merge="(h d)",
):  # fmt: skip
    """The forward pass with the keyword's step done wrong."""
    with torch.no_grad():
        x = attn.norm(inp) if norm_input else inp
        q, k, v = attn.project_heads(x)
        if rotate_compressed:
            q, k = attn.rotate(q), attn.rotate(k)
        ck, cv = attn.compressed_tokens(k, v)
        compressed, top = attn.compressed_branch(q, ck, cv)
        if rotate_fine and not rotate_compressed:
            q, k = attn.rotate(q), attn.rotate(k)
        branches = (compressed, attn.selected_branch(q, k, v, top), attn.sliding_branch(q, k, v))
        branches = [branches[c] for c in branch_order]
        if gated:
            gates = attn.to_strategy_combine(inp if gates_from_input else x)  # (b, h, n, 3)
            out = sum(gates[..., c : c + 1] * branch for c, branch in enumerate(branches))
        else:
            out = sum(branches) / 3
        return attn.combine_heads(rearrange(out, f"b h n d -> b n {head_merge}"))


def random_sparse_attention(seed: int, **config: Any) -> SparseAttention:
    """A SparseAttention (dim 16, dim_head 8 unless `config` says otherwise) whose parameters,
    rotary frequencies apart, are its initial values plus seeded noise: memory tokens,
    intra-block positions and gates that are all different, so that a step done wrong
    shows. The notebook's own random draws are left alone."""
    config = {"dim": 16, "dim_head": 8, **config}
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attn = SparseAttention(**config)
    with torch.no_grad():
        for name, parameter in attn.named_parameters():
            if name != "rotary_emb.freqs":
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=g))
    return attn.requires_grad_(False)


def _config_note(config: dict[str, Any]) -> str:
    """A case's module configuration in a few words."""
    heads, kv_heads = config["heads"], config.get("kv_heads", config["heads"])
    block = config["compress_block_size"]
    stride = config.get("compress_block_sliding_stride", block)
    words = [
        "causal" if config.get("causal") else "not causal",
        f"heads={heads}, kv_heads={kv_heads}",
        f"compression {block}/{stride}, selection {config['selection_block_size']}",
        f"window {config['sliding_window_size']}",
    ]
    if config.get("query_heads_share_selected_kv") is False:
        words.append("a selection per query head")
    if config.get("interpolated_importance_score"):
        words.append("interpolated importance")
    return ", ".join(words)


FORWARD_CONFIGS = [
    dict(heads=2, sliding_window_size=4, compress_block_size=4, selection_block_size=4,
         num_selected_blocks=2, causal=True),
    dict(heads=4, kv_heads=2, sliding_window_size=5, compress_block_size=8,
         compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=2,
         num_compressed_mem_kv=2, causal=True),
    dict(heads=4, kv_heads=2, sliding_window_size=3, compress_block_size=4,
         selection_block_size=4, num_selected_blocks=1, causal=False,
         query_heads_share_selected_kv=False),
    dict(heads=6, kv_heads=3, sliding_window_size=6, compress_block_size=4,
         selection_block_size=6, num_selected_blocks=2, causal=True,
         interpolated_importance_score=True),
]  # fmt: skip


def _forward_cases() -> list[Case]:
    g = torch.Generator().manual_seed(62)
    lengths = [19, 30, 21, 26]  # none a multiple of its blocks
    return [
        Case(
            (random_sparse_attention(60 + number, **config), torch.randn(2, n, 16, generator=g)),
            note=_config_note(config),
        )
        for number, (config, n) in enumerate(zip(FORWARD_CONFIGS, lengths, strict=True))
    ]


SPARSE_ATTENTION_FORWARD = Exercise(
    name="sparse_attention_forward",
    stage="06",
    hints=(
        (
            "inp is (b, n, dim); the output too. attn is a SparseAttention whose methods do "
            "each stage: attn.norm, attn.project_heads (q (b, h, n, dh), k and v (b, kv_heads, "
            "n, dh)), attn.compressed_tokens (k, v -> ck, cv (b, kv_heads, w, dh)), "
            "attn.compressed_branch (q, ck, cv -> output (b, h, n, dh) and the top blocks), "
            "attn.rotate, attn.selected_branch, attn.sliding_branch, attn.to_strategy_combine "
            "(gates (b, h, n, 3)) and attn.combine_heads ((b, n, h * dh) -> (b, n, dim))."
        ),
        (
            "the rule: normalise the input once, and use the normed x for the projection and "
            "the gates. Compression and its attention see *unrotated* q and k (a compressed "
            "token has no single position); the selected and sliding branches see q and k "
            "rotated. Eq. 5: the gates weigh (compressed, selected, sliding) in that order; "
            "move the heads last, (h d), before the output projection."
        ),
        (
            "a skeleton:\n"
            "    x = ...\n"
            "    q, k, v = attn.project_heads(x)\n"
            "    compressed, top = attn.compressed_branch(q, *attn.compressed_tokens(...))\n"
            "    q, k = ...  # rotated, from here on\n"
            "    selected = attn.selected_branch(q, k, v, ...)\n"
            "    sliding = ...\n"
            "    gates = ...  # (b, h, n, 3)\n"
            "    out = gates[..., 0:1] * compressed + ...\n"
            '    return attn.combine_heads(rearrange(out, "b h n d -> ..."))'
        ),
    ),
    spec=sparse_attention_forward_spec,
    make_cases=_forward_cases,
    mistakes=(
        Mistake(
            "the input is not normalised: x = attn.norm(inp) comes first, and the "
            "projection and the gates both read x.",
            lambda *a: _forward_with(*a, norm_input=False),
        ),
        Mistake(
            "the gates read the raw input; they read the normed x, like the projection.",
            lambda *a: _forward_with(*a, gates_from_input=True),
        ),
        Mistake(
            "rotary is applied before compression: compressed tokens and the compressed "
            "branch's queries are unrotated (a compressed token stands for a whole block); "
            "rotate q and k only for the selected and sliding branches.",
            lambda *a: _forward_with(*a, rotate_compressed=True),
        ),
        Mistake(
            "the selected and sliding branches need rotated queries and keys: attn.rotate(q), "
            "attn.rotate(k) after the compressed branch.",
            lambda *a: _forward_with(*a, rotate_fine=False),
        ),
        Mistake(
            "the gates are in the order (compressed, selected, sliding); yours are the other "
            "way round.",
            lambda *a: _forward_with(*a, branch_order=(2, 1, 0)),
        ),
        Mistake(
            "this averages the branches; Eq. 5 weighs each by its gate, "
            "attn.to_strategy_combine(x).",
            lambda *a: _forward_with(*a, gated=False),
        ),
        Mistake(
            "the heads are merged the wrong way: 'b h n d -> b n (h d)', head by head, as "
            "combine_heads expects; not '(d h)'.",
            lambda *a: _forward_with(*a, head_merge="(d h)"),
        ),
    ),
)

EXERCISES = [STRATEGY_GATES, SPARSE_ATTENTION_FORWARD]
