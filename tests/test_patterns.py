"""The selection patterns of stage 09 (nsa_tutorial.kernels.patterns): the rules every
pattern keeps, what makes each one what it is, and clear errors for bad arguments.

CPU only and small: the generators draw for all tokens at once, so these take seconds.
"""

import pytest
import torch

from nsa_tutorial.kernels.patterns import (
    PATTERNS,
    distinct_blocks_per_tile,
    hot_block,
    local_shared,
    uniform_random,
)

# (batch, kv_heads, n, block_size, num_selected, tile): blocks of a tile, partial last
# block, tiles over several blocks, tiles inside one block, few blocks for many slots
SHAPES = [
    (1, 2, 1024, 16, 8, 64),
    (2, 1, 1000, 32, 6, 16),
    (1, 3, 777, 8, 16, 64),
    (1, 1, 130, 64, 16, 64),
]


def draw(pattern, shape, seed=0, **kwargs):
    batch, kv_heads, n, block, s, tile = shape
    if pattern == "local_shared":
        kwargs.setdefault("tile", tile)
    g = torch.Generator().manual_seed(seed)
    return PATTERNS[pattern](batch, kv_heads, n, block_size=block, num_selected=s, generator=g,
                             **kwargs)  # fmt: skip


def own_blocks(n, block):
    return torch.arange(n) // block  # (n,)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_every_pattern_keeps_the_rules(pattern, shape):
    """Shape and dtype; slot 0 the own block; selected blocks distinct, never after the
    own block; unselected slots last with index 0."""
    batch, kv_heads, n, block, s, _ = shape
    indices, selected = draw(pattern, shape)
    assert indices.shape == selected.shape == (batch, kv_heads, n, s)
    assert indices.dtype == torch.int64 and selected.dtype == torch.bool
    own = own_blocks(n, block)
    assert (indices[..., 0] == own).all() and selected[..., 0].all()
    assert ((indices >= 0) & (indices <= own[:, None])).all()
    later = torch.where(selected, indices, -1).sort(dim=-1).values
    repeats = (later[..., 1:] == later[..., :-1]) & (later[..., 1:] >= 0)
    assert not repeats.any(), "a token reads a block twice"
    assert (selected[..., :-1] >= selected[..., 1:]).all(), "an unselected slot before a selected"
    assert (indices[~selected] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", ["uniform_random", "hot_block"])
def test_tokens_fill_every_slot_they_can(pattern, shape):
    """A token reads min(s, own + 1) blocks: every slot once enough blocks are behind it."""
    _, _, n, block, s, _ = shape
    _, selected = draw(pattern, shape)
    expected = torch.clamp(own_blocks(n, block) + 1, max=s)
    assert (selected.sum(dim=-1) == expected).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_local_shared_fills_every_slot_past_the_first_tiles(shape):
    _, _, n, block, s, tile = shape
    _, selected = draw("local_shared", shape)
    first_own = (torch.arange(n) // tile * tile) // block  # the tile's first token's block
    full = first_own >= s - 1  # s - 4 tile picks below first_own - 2, above block 0
    assert selected[..., full, :].all()
    assert (selected.sum(dim=-1) >= torch.clamp(own_blocks(n, block) + 1, max=4)).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_every_token_after_the_first_block_reads_block_0_in_hot_block(shape):
    _, _, n, block, _, _ = shape
    indices, selected = draw("hot_block", shape)
    later = own_blocks(n, block) > 0
    reads_0 = ((indices == 0) & selected).any(dim=-1)
    assert reads_0[..., later].all()
    assert (indices[..., later, 1] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_local_shared_reads_own_first_and_two_previous_blocks(shape):
    _, _, n, block, _, _ = shape
    indices, selected = draw("local_shared", shape)
    own = own_blocks(n, block)
    for block_needed in (own, torch.zeros_like(own), own - 1, own - 2):
        exists = block_needed >= 0
        read = ((indices == block_needed[:, None]) & selected).any(dim=-1)
        assert read[..., exists].all()
    past = own >= 3  # all four distinct: they sit in slots 0-3
    expected = torch.stack((own, torch.zeros_like(own), own - 1, own - 2), dim=-1)[past]
    assert (indices[..., past, :4] == expected).all()


@pytest.mark.parametrize("varying", [0.0, 0.25, 0.5])
def test_local_shared_tokens_vary_a_share_of_the_tiles_picks(varying):
    """Per tile, the picks most of its tokens share are the tile's s - 4; each token
    reads round(varying * (s - 4)) blocks outside them, once the tile has room."""
    n, block, s, tile = 8192, 16, 16, 64
    g = torch.Generator().manual_seed(3)
    indices, selected = local_shared(1, 2, n, block_size=block, num_selected=s, generator=g,
                                     tile=tile, varying=varying)  # fmt: skip
    picks = indices[..., 4:].reshape(2, n // tile, tile * (s - 4))  # (h, tiles, tile * c)
    swapped = round(varying * (s - 4))
    late = slice(n // tile // 2, None)  # tiles past half the sequence: hundreds of blocks
    for h in range(2):
        for t in range(n // tile)[late]:
            values, counts = picks[h, t].unique(return_counts=True)
            shared = values[counts >= tile // 4]  # a fresh pick sits in a token or two
            assert len(shared) == s - 4
            rows = indices[0, h, t * tile : (t + 1) * tile, 4:]
            outside = ~torch.isin(rows, shared)
            assert (outside.sum(dim=-1) == swapped).all()
    assert selected[..., n // 2 :, :].all()


def test_same_seed_same_blocks_other_seed_other_blocks():
    shape = SHAPES[0]
    for pattern in PATTERNS:
        first, again, other = (
            draw(pattern, shape, 5),
            draw(pattern, shape, 5),
            draw(pattern, shape, 6),
        )
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        assert not torch.equal(first[0], other[0])


def test_heads_and_batches_draw_their_own_blocks():
    indices, _ = draw("uniform_random", (2, 2, 2048, 16, 8, 64))
    assert not torch.equal(indices[0, 0], indices[0, 1])
    assert not torch.equal(indices[0, 0], indices[1, 0])


def test_uniform_random_picks_every_earlier_block_about_equally():
    g = torch.Generator().manual_seed(0)
    indices, selected = uniform_random(1, 8, 4096, block_size=64, num_selected=16, generator=g)
    last = indices[0, :, -64:, 1:][selected[0, :, -64:, 1:]]  # tokens of block 63: 0..62
    counts = torch.bincount(last, minlength=63).double()
    assert len(counts) == 63 and counts.min() > 0.6 * counts.mean()


def test_local_shared_tiles_read_far_fewer_distinct_blocks_than_random():
    """Issue 13's shape at 64k tokens (one kv head): a 64-token tile of random picks reads
    ~390 distinct blocks, of local_shared ones ~160 (16 shared, ~3 fresh per token)."""
    args = dict(block_size=64, num_selected=16)
    random = uniform_random(1, 1, 65536, generator=torch.Generator().manual_seed(0), **args)
    local = local_shared(1, 1, 65536, generator=torch.Generator().manual_seed(0), **args)
    random_count = distinct_blocks_per_tile(*random, 64).double().mean()
    local_count = distinct_blocks_per_tile(*local, 64).double().mean()
    assert 350 < random_count < 430
    assert 16 < local_count < 0.5 * random_count


def test_distinct_blocks_per_tile_counts_like_a_loop():
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 9, (2, 3, 37, 5), generator=g)
    selected = torch.rand(2, 3, 37, 5, generator=g) < 0.7
    tile = 8
    counts = distinct_blocks_per_tile(indices, selected, tile)
    assert counts.shape == (2, 3, 5)
    for b in range(2):
        for h in range(3):
            for t in range(5):
                rows = slice(t * tile, (t + 1) * tile)
                expected = set(indices[b, h, rows][selected[b, h, rows]].tolist())
                assert counts[b, h, t] == len(expected)


def test_a_sequence_shorter_than_a_block():
    for pattern in PATTERNS:
        indices, selected = draw(pattern, (1, 1, 5, 64, 16, 64))
        assert (indices[..., 0] == 0).all() and selected.sum() == 5


@pytest.mark.parametrize(
    ("pattern", "kwargs", "error", "words"),
    [
        ("local_shared", dict(num_selected=3), ValueError, ["num_selected", "3", "at least 4"]),
        ("hot_block", dict(num_selected=1), ValueError, ["num_selected", "1", "at least 2"]),
        ("uniform_random", dict(num_selected=0), ValueError, ["num_selected", "0", "positive"]),
        ("uniform_random", dict(block_size=0), ValueError, ["block_size", "0", "positive"]),
        ("hot_block", dict(block_size=-4), ValueError, ["block_size", "-4", "positive"]),
        ("local_shared", dict(block_size=1.5), TypeError, ["block_size", "1.5", "int"]),
        ("uniform_random", dict(n=0), ValueError, ["n", "0", "positive"]),
        ("local_shared", dict(tile=0), ValueError, ["tile", "0", "positive"]),
        ("local_shared", dict(varying=1.5), ValueError, ["varying", "1.5", "[0, 1]"]),
        ("uniform_random", dict(generator=0), TypeError, ["generator", "torch.Generator"]),
        ("hot_block", dict(device="meta"), ValueError, ["generator", "device", "meta"]),
    ],
)
def test_bad_arguments_raise_clear_errors(pattern, kwargs, error, words):
    args = dict(batch=1, kv_heads=1, n=256, block_size=16, num_selected=8,
                generator=torch.Generator().manual_seed(0), device="cpu")  # fmt: skip
    args.update(kwargs)
    with pytest.raises(error) as caught:
        PATTERNS[pattern](args.pop("batch"), args.pop("kv_heads"), args.pop("n"), **args)
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_distinct_blocks_per_tile_rejects_bad_input():
    indices = torch.zeros(1, 1, 8, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="tile must be positive"):
        distinct_blocks_per_tile(indices, indices > 0, 0)
    with pytest.raises(ValueError, match=r"\(b, h, n, s\)"):
        distinct_blocks_per_tile(indices, torch.ones(1, 8, 2, dtype=torch.bool))


def test_hot_block_and_local_shared_take_a_cpu_generator_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    for fn in (hot_block, local_shared):
        indices, _ = fn(1, 1, 300, block_size=16, num_selected=6, generator=g, device="cpu")
        assert indices.device.type == "cpu"
