"""Stage 07: a tiny decoder-only Transformer built on SparseAttention, with sampling.

Token embedding, `depth` pre-norm blocks (SparseAttention, which norms its own input,
then RMSNorm + feed-forward, each added to the residual stream), a final RMSNorm and
an output head. `sample` generates with or without the KV cache; greedy sampling
gives the same tokens either way.

Stage 11 (the capstone) trains it against two baselines that differ only in attention:
`attention="full"` (causal softmax over every earlier token) and `attention="window"`
(the sliding window alone, NSA's third branch). Both are `DenseAttention`, which
shares SparseAttention's norm, projections, rotary embedding and GQA layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from nsa_tutorial.attention import SparseAttention
from nsa_tutorial.cache import Cache
from nsa_tutorial.norm import RMSNorm
from nsa_tutorial.rotary import RotaryEmbedding
from nsa_tutorial.sliding import sliding_window_attention
from nsa_tutorial.validation import require_positive_int

ATTENTION_KINDS = ("nsa", "full", "window")


class FeedForward(nn.Sequential):
    """RMSNorm -> Linear(dim, 4 dim) -> GELU -> Linear(4 dim, dim)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__(
            RMSNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim)
        )


class DenseAttention(nn.Module):
    """Causal softmax attention with SparseAttention's norm, q/k/v projection (one
    `to_qkv`, GQA heads), interleaved rotary embedding and output projection: over every
    earlier token (window None) or over the last `window` tokens and itself, the keys
    NSA's sliding branch sees. A baseline that differs from NSA only in which keys a
    query reads."""

    def __init__(
        self,
        dim: int,
        dim_head: int,
        heads: int,
        kv_heads: int | None = None,
        window: int | None = None,
        norm: bool = True,
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        for name, value in (("dim", dim), ("dim_head", dim_head), ("heads", heads),
                            ("kv_heads", kv_heads)):  # fmt: skip
            require_positive_int(name, value)
        if window is not None:
            require_positive_int("window", window)
        if heads % kv_heads:
            raise ValueError(
                f"heads must be a multiple of kv_heads, got heads={heads}, kv_heads={kv_heads}"
            )
        self.dim, self.dim_head, self.window = dim, dim_head, window
        self.scale = dim_head**-0.5
        self.norm = RMSNorm(dim) if norm else nn.Identity()
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.qkv_split = (dim_head * heads, dim_head * kv_heads, dim_head * kv_heads)
        self.to_qkv = nn.Linear(dim, sum(self.qkv_split), bias=False)
        self.combine_heads = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(
        self, inp: Tensor, cache: tuple[Tensor, Tensor] | None = None, return_cache: bool = False
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        """inp (b, n, dim) -> (b, n, dim); the cache is the rotated keys and the values
        so far (b, kv_heads, t, d), and with it inp is the one next token (b, 1, dim)."""
        q, k, v = self.to_qkv(self.norm(inp)).split(self.qkv_split, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", d=self.dim_head) for t in (q, k, v))
        offset = 0 if cache is None else cache[0].shape[-2]
        q, k = (self.rotary_emb.rotate_queries_or_keys(t, offset) for t in (q, k))
        if cache is None:
            out = self._attend_sequence(q, k, v)
        else:
            k, v = (torch.cat(pair, dim=-2) for pair in zip(cache, (k, v), strict=True))
            seen = k.shape[-2] if self.window is None else self.window + 1  # keys i - w .. i
            out = F.scaled_dot_product_attention(
                q, k[..., -seen:, :], v[..., -seen:, :], scale=self.scale, enable_gqa=True
            )
        out = self.combine_heads(rearrange(out, "b h n d -> b n (h d)"))
        return (out, (k, v)) if return_cache else out

    def _attend_sequence(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (b, h, n, d) over k, v (b, kv_heads, n, d), causal -> (b, h, n, d)."""
        if self.window is None:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=True
            )
        return sliding_window_attention(q, k, v, self.window, causal=True, scale=self.scale)


def attention_layer(kind: str, dim: int, options: dict) -> nn.Module:
    """One layer's attention of `kind` ("nsa", "full" or "window") from SparseAttention's
    keyword arguments: the baselines take the head sizes (and the window) from them and
    leave the rest, so one set of options builds all three."""
    if kind == "nsa":
        return SparseAttention(dim=dim, causal=True, **options)
    heads = {name: options[name] for name in ("dim_head", "heads", "kv_heads") if name in options}
    window = options.get("sliding_window_size") if kind == "window" else None
    if kind == "window" and window is None:
        raise TypeError('attention="window" needs sliding_window_size, the window it keeps')
    return DenseAttention(dim, window=window, norm=options.get("norm", True), **heads)


class TinyTransformer(nn.Module):
    """A causal language model over `num_tokens` symbols; attention kwargs go to
    every layer's SparseAttention (causal is always on).

    attention="full" or "window" swaps each layer's SparseAttention for DenseAttention
    built from the same kwargs (the window is sliding_window_size): the three models
    differ only in attention.
    """

    def __init__(
        self, num_tokens: int, dim: int, depth: int, *, attention: str = "nsa", **options: object
    ) -> None:
        super().__init__()
        for name, value in (("num_tokens", num_tokens), ("dim", dim), ("depth", depth)):
            require_positive_int(name, value)
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.num_tokens = num_tokens
        self.attention = attention
        self.embed = nn.Embedding(num_tokens, dim)
        # New: the attention of each layer is SparseAttention or one of the baselines.
        self.layers = nn.ModuleList(
            nn.ModuleList([attention_layer(attention, dim, options), FeedForward(dim)])
            for _ in range(depth)
        )
        self.norm = RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)

    def forward(
        self,
        tokens: Tensor,
        caches: list[Cache | tuple[Tensor, Tensor]] | None = None,
        return_caches: bool = False,
    ) -> Tensor | tuple[Tensor, list[Cache | tuple[Tensor, Tensor]]]:
        """tokens (b, n) long -> logits (b, n, num_tokens); with caches, n must be 1."""
        if tokens.dtype != torch.long or tokens.ndim != 2:
            raise TypeError(
                f"tokens must be a (batch, seq_len) tensor of token ids (torch.long), "
                f"got {tuple(tokens.shape)} {tokens.dtype}"
            )
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.num_tokens:
            raise ValueError(f"token ids must lie in 0 .. {self.num_tokens - 1} (num_tokens)")
        x = self.embed(tokens)
        new_caches = []
        for index, (attention, feed_forward) in enumerate(self.layers):
            cache = None if caches is None else caches[index]
            if return_caches:
                out, cache = attention(x, cache, return_cache=True)
                new_caches.append(cache)
            else:
                out = attention(x, cache)
            x = x + out
            x = x + feed_forward(x)
        logits = self.to_logits(self.norm(x))
        return (logits, new_caches) if return_caches else logits

    @torch.no_grad()
    def sample(
        self, prompt: Tensor, length: int, temperature: float = 1.0, use_cache: bool = True
    ) -> Tensor:
        """Continue prompt (b, n) by `length` tokens -> (b, length).

        temperature 0 is greedy decoding. With use_cache, the prompt is read once and
        each new token costs one decoding step; without, every step re-reads the whole
        sequence so far.
        """
        require_positive_int("length", length)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got temperature={temperature}")
        if prompt.ndim != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be (batch, n) with n >= 1, got {tuple(prompt.shape)}")
        sequence, caches = prompt, None
        if use_cache:
            logits, caches = self(prompt, return_caches=True)
        for _ in range(length):
            if not use_cache:
                logits = self(sequence)
            token = _pick(logits[:, -1], temperature)  # (b, 1)
            sequence = torch.cat((sequence, token), dim=-1)
            if use_cache and sequence.shape[1] < prompt.shape[1] + length:
                logits, caches = self(token, caches, return_caches=True)
        return sequence[:, prompt.shape[1] :]


def _pick(logits: Tensor, temperature: float) -> Tensor:
    """The next token from logits (b, num_tokens): argmax, or a draw at `temperature`."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial((logits / temperature).softmax(dim=-1), 1)
