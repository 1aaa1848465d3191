"""Stage 07: a tiny decoder-only Transformer built on SparseAttention, with sampling.

Token embedding, `depth` pre-norm blocks (SparseAttention, which norms its own input,
then RMSNorm + feed-forward, each added to the residual stream), a final RMSNorm and
an output head. `sample` generates with or without the KV cache; greedy sampling
gives the same tokens either way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nsa_tutorial.attention import SparseAttention
from nsa_tutorial.cache import Cache
from nsa_tutorial.norm import RMSNorm
from nsa_tutorial.validation import require_positive_int


class FeedForward(nn.Sequential):
    """RMSNorm -> Linear(dim, 4 dim) -> GELU -> Linear(4 dim, dim)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__(
            RMSNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim)
        )


class TinyTransformer(nn.Module):
    """A causal language model over `num_tokens` symbols; attention kwargs go to
    every layer's SparseAttention (causal is always on)."""

    def __init__(self, num_tokens: int, dim: int, depth: int, **attention: object) -> None:
        super().__init__()
        for name, value in (("num_tokens", num_tokens), ("dim", dim), ("depth", depth)):
            require_positive_int(name, value)
        self.num_tokens = num_tokens
        self.embed = nn.Embedding(num_tokens, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([SparseAttention(dim=dim, causal=True, **attention), FeedForward(dim)])
            for _ in range(depth)
        )
        self.norm = RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)

    def forward(
        self, tokens: Tensor, caches: list[Cache] | None = None, return_caches: bool = False
    ) -> Tensor | tuple[Tensor, list[Cache]]:
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
