"""Stage 09: the selection patterns the kernel is measured and tested on.

A selection kernel's speed depends on which blocks the tokens pick, not only on how
many. Uniformly random picks are the worst case for reuse (neighbouring tokens share
almost nothing) and the best case for load balance (every key block is read about
equally often). Real top-k picks are the opposite: a few blocks (the first one, the
local ones) are read by every token, and neighbouring tokens pick mostly the same
blocks. Three generators cover the range:

- `uniform_random`: the own block and s - 1 distinct random earlier blocks;
- `hot_block`: the own block, block 0 and s - 2 random earlier blocks (a block that
  every token reads, like the paper's forced initial block);
- `local_shared`: the own block, block 0, the two previous blocks, and s - 4 blocks
  drawn once per query tile and shared by its tokens, of which about a quarter are
  replaced, token by token, with random earlier blocks.

Every generator takes (batch, kv_heads, n, *, block_size, num_selected, generator,
device) and returns indices (b, hk, n, s) int64 and selected (b, hk, n, s) bool, with
s = num_selected. Slot 0 is the own block (the kernel reads it as the block-causal
diagonal); the selected blocks of a token are distinct and never after its own block;
the slots a token cannot fill (too few blocks before it) come last, selected=False,
index 0. Everything is drawn for all tokens at once: a Python loop runs over slots
(at most s), never over tokens.

How much a tile shares (issue 13's shape: 64k tokens, 16 blocks of 64 per token): the
64 tokens of a tile read ~390 distinct blocks between them with uniform_random picks
and ~160 with local_shared ones (16 shared, ~3 fresh per token); varying=1/12 (one
fresh pick per token) gives ~72. `distinct_blocks_per_tile` counts them.

Letters: b batch, h kv heads, n tokens, s slots, r rows (b * h * n, or b * h * tiles),
c picks drawn per row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange, repeat
from torch import Tensor

from nsa_tutorial.validation import require_positive_int

Selection = tuple[Tensor, Tensor]  # indices (b, h, n, s) int64, selected (b, h, n, s) bool
Pattern = Callable[..., Selection]
TILE = 64  # query tokens per tile of `local_shared` (issue 13 measures sharing on these)
VARYING = 0.25  # share of a tile's picks that each token of `local_shared` redraws


def uniform_random(
    batch: int, kv_heads: int, n: int, *, block_size: int, num_selected: int,
    generator: torch.Generator, device: torch.device | str = "cpu",
) -> Selection:  # fmt: skip
    """The own block, then num_selected - 1 distinct blocks drawn uniformly among the
    earlier ones (all of them while there are fewer): no reuse, even load."""
    _check_common(batch, kv_heads, n, block_size, num_selected, generator, device, minimum=1)
    own = _own_blocks(batch, kv_heads, n, block_size, device)  # (r,)
    picks, ok = _distinct_random(0, own, num_selected - 1, None, generator)
    return _assemble([own], [own >= 0], picks, ok, (batch, kv_heads, n))


def hot_block(
    batch: int, kv_heads: int, n: int, *, block_size: int, num_selected: int,
    generator: torch.Generator, device: torch.device | str = "cpu",
) -> Selection:  # fmt: skip
    """The own block, block 0 (read by every token after the first block) and
    num_selected - 2 distinct random blocks among those in between: one key block that
    every token needs, which a backward giving each key block one program serialises."""
    _check_common(batch, kv_heads, n, block_size, num_selected, generator, device, minimum=2)
    own = _own_blocks(batch, kv_heads, n, block_size, device)
    picks, ok = _distinct_random(1, own, num_selected - 2, None, generator)
    return _assemble([own, torch.zeros_like(own)], [own >= 0, own > 0], picks, ok,
                     (batch, kv_heads, n))  # fmt: skip


def local_shared(
    batch: int, kv_heads: int, n: int, *, block_size: int, num_selected: int,
    generator: torch.Generator, device: torch.device | str = "cpu", tile: int = TILE,
    varying: float = VARYING,
) -> Selection:  # fmt: skip
    """What real top-k picks tend to look like: the own block, block 0, the two previous
    blocks, and num_selected - 4 blocks drawn once per tile of `tile` query tokens and
    shared by them, of which round(varying * (num_selected - 4)) are replaced, token by
    token, with distinct random earlier blocks (at slots drawn per token).

    The tile's picks lie before every fixed slot of every token in the tile (below the
    tile's first own block minus 2), so they never repeat a fixed slot; the replacements
    avoid the tile's picks and the fixed slots, so each token's blocks stay distinct.
    """
    _check_common(batch, kv_heads, n, block_size, num_selected, generator, device, minimum=4)
    require_positive_int("tile", tile)
    if isinstance(varying, bool) or not isinstance(varying, int | float) or not 0 <= varying <= 1:
        raise ValueError(f"varying must lie in [0, 1] (a share of the tile's picks), got "
                         f"varying={varying!r}")  # fmt: skip
    shape = (batch, kv_heads, n)
    own = _own_blocks(batch, kv_heads, n, block_size, device)  # (r,)
    shared, shared_ok = _tile_picks(shape, own, num_selected - 4, tile, generator)  # (r, c)
    swapped = round(varying * (num_selected - 4))
    picks, ok = _redraw_some(shared, shared_ok, own, swapped, generator)
    fixed = [own, torch.zeros_like(own), own - 1, own - 2]
    fixed_ok = [own >= 0, own > 0, own - 1 > 0, own - 2 > 0]
    return _assemble(fixed, fixed_ok, picks, ok, shape)


PATTERNS: dict[str, Pattern] = {
    "uniform_random": uniform_random,
    "hot_block": hot_block,
    "local_shared": local_shared,
}


def distinct_blocks_per_tile(indices: Tensor, selected: Tensor, tile: int = TILE) -> Tensor:
    """How many distinct blocks the tokens of each tile of `tile` queries read together:
    indices, selected (b, h, n, s) -> (b, h, ceil(n / tile)) int64.

    A kernel that loads each block once per tile moves this many blocks, against
    tile * s for one that walks token by token; the ratio is the reuse on offer.
    """
    require_positive_int("tile", tile)
    if indices.shape != selected.shape or indices.dim() != 4:
        raise ValueError(f"indices and selected must both be (b, h, n, s), got "
                         f"{tuple(indices.shape)} and {tuple(selected.shape)}")  # fmt: skip
    n = indices.shape[2]
    padding = -n % tile
    blocks = torch.where(selected, indices, -1)
    blocks = torch.nn.functional.pad(blocks, (0, 0, 0, padding), value=-1)
    blocks = rearrange(blocks, "b h (t m) s -> b h t (m s)", m=tile).sort(dim=-1).values
    first = torch.ones_like(blocks[..., :1], dtype=torch.bool)
    new = torch.cat((first, blocks[..., 1:] != blocks[..., :-1]), dim=-1)
    return (new & (blocks >= 0)).sum(dim=-1)


def _own_blocks(batch: int, kv_heads: int, n: int, block_size: int, device) -> Tensor:
    """Each token's own block, flattened over (b, h, n) -> (r,) int64."""
    own = torch.arange(n, device=device) // block_size
    return repeat(own, "n -> (b h n)", b=batch, h=kv_heads)


def _tile_picks(
    shape: tuple[int, int, int], own: Tensor, count: int, tile: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """`count` distinct random blocks per (b, h, tile) among [1, own - 2) of the tile's
    first token, repeated for each token of the tile -> picks, ok (r, count)."""
    batch, kv_heads, n = shape
    first = rearrange(own, "(b h n) -> b h n", b=batch, h=kv_heads)[..., ::tile]  # (b, h, t)
    picks, ok = _distinct_random(1, first.flatten() - 2, count, None, generator)  # (bht, c)
    tiles = torch.arange(n, device=own.device) // tile

    def per_token(t: Tensor) -> Tensor:
        t = rearrange(t, "(b h t) c -> b h t c", b=batch, h=kv_heads)[:, :, tiles]
        return rearrange(t, "b h n c -> (b h n) c")

    return per_token(picks), per_token(ok)


def _redraw_some(
    shared: Tensor, shared_ok: Tensor, own: Tensor, swapped: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Each token's copy of its tile's picks (r, c) with `swapped` of them, at slots drawn
    per token, replaced by distinct random blocks among [1, own - 2) that are none of the
    tile's picks -> picks, ok (r, c). A slot keeps the tile's pick where no block is left
    to draw (early in the sequence)."""
    width = torch.full_like(own, shared.shape[1])
    slots, _ = _distinct_random(0, width, swapped, None, generator)  # (r, swapped)
    taken = torch.where(shared_ok, shared, -1)
    fresh, fresh_ok = _distinct_random(1, own - 2, swapped, taken, generator)  # (r, swapped)
    kept, kept_ok = shared.gather(1, slots), shared_ok.gather(1, slots)
    picks = shared.scatter(1, slots, torch.where(fresh_ok, fresh, kept))
    return picks, shared_ok.scatter(1, slots, fresh_ok | kept_ok)


def _distinct_random(
    low: int, high: Tensor, count: int, exclude: Tensor | None, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """For each row, `count` distinct values drawn uniformly among [low, high[row]) less
    the row's `exclude` values -> values (r, count) int64 and ok (r, count) bool.

    Floyd's algorithm, one step per pick for all rows at once: step i draws among the
    first m - count + i + 1 candidates (m of them in all) and takes the last of those
    where the draw repeats an earlier pick, which gives every subset the same chance.
    Where fewer than `count` candidates exist, the first steps have none (ok False).
    The i-th candidate becomes a value by skipping the excluded values below it.
    exclude: (r, e), distinct values in [low, high) or negative (nothing excluded).
    """
    rows = high.shape[0]
    skip = _sorted_exclusions(low, high, exclude)  # (r, e), past high where unused
    available = (high - low).clamp(min=0) - (skip < high[:, None]).sum(dim=-1)  # (r,)
    values = torch.zeros(rows, count, dtype=torch.int64, device=high.device)
    ok = torch.zeros(rows, count, dtype=torch.bool, device=high.device)
    for i in range(count):
        last = available - count + i  # (r,): draw among candidates 0 .. last
        u = torch.rand(rows, generator=generator, device=high.device, dtype=torch.float64)
        draw = torch.minimum((u * (last + 1)).long(), last)
        repeated = ((values[:, :i] == draw[:, None]) & ok[:, :i]).any(dim=-1)
        values[:, i] = torch.where(repeated, last, draw)
        ok[:, i] = last >= 0
    values = values + low
    for j in range(skip.shape[1]):  # ascending: the i-th candidate steps over each one below
        values = values + (values >= skip[:, j : j + 1]).long()
    return torch.where(ok, values, 0), ok


def _sorted_exclusions(low: int, high: Tensor, exclude: Tensor | None) -> Tensor:
    """The excluded values of each row in ascending order, unused ones moved past every
    candidate (r, e); an empty (r, 0) tensor without exclusions."""
    if exclude is None:
        return high.new_zeros(high.shape[0], 0)
    inside = (exclude >= low) & (exclude < high[:, None])
    return torch.where(inside, exclude, torch.iinfo(torch.int64).max).sort(dim=-1).values


def _assemble(
    fixed: list[Tensor], fixed_ok: list[Tensor], picks: Tensor, ok: Tensor,
    shape: tuple[int, int, int],
) -> Selection:  # fmt: skip
    """The fixed slots (each (r,)) then the picks (r, c), selected slots first in each
    token's list, unselected ones last with index 0 -> indices, selected (b, h, n, s)."""
    indices = torch.cat((torch.stack(fixed, dim=-1), picks), dim=-1)
    selected = torch.cat((torch.stack(fixed_ok, dim=-1), ok), dim=-1)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)
    indices, selected = indices.gather(-1, order), selected.gather(-1, order)
    indices = torch.where(selected, indices, 0)
    batch, kv_heads, _ = shape
    split = dict(b=batch, h=kv_heads)
    return (rearrange(indices, "(b h n) s -> b h n s", **split),
            rearrange(selected, "(b h n) s -> b h n s", **split))  # fmt: skip


def _check_common(
    batch: object, kv_heads: object, n: object, block_size: object, num_selected: object,
    generator: object, device: object, *, minimum: int,
) -> None:  # fmt: skip
    """Clear errors for the arguments every generator takes; `minimum` is the fewest
    slots the pattern's fixed blocks need."""
    for name, value in (("batch", batch), ("kv_heads", kv_heads), ("n", n),
                        ("block_size", block_size), ("num_selected", num_selected)):  # fmt: skip
        require_positive_int(name, value)
    if num_selected < minimum:
        raise ValueError(
            f"num_selected must be at least {minimum} for this pattern (its fixed slots), "
            f"got num_selected={num_selected}"
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got generator={generator!r}")
    if generator.device.type != torch.device(device).type:
        raise ValueError(
            f"generator must live on the device the blocks are drawn on, got a generator "
            f"on {generator.device} and device={device!r}"
        )
