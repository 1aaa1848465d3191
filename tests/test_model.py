"""The tiny Transformer: greedy sampling with and without the cache, and its errors."""

import pytest
import torch

from nsa_tutorial.model import TinyTransformer

ATTENTION = dict(
    dim_head=8,
    heads=4,
    kv_heads=2,
    sliding_window_size=4,
    compress_block_size=4,
    compress_block_sliding_stride=2,
    selection_block_size=4,
    num_selected_blocks=2,
)


def tiny(seed=0, **change):
    torch.manual_seed(seed)
    return TinyTransformer(num_tokens=32, dim=32, depth=2, **(ATTENTION | change))


@pytest.mark.filterwarnings("ignore:num_selected_blocks=0")
@pytest.mark.parametrize(
    "change",
    [
        {},
        {"num_selected_blocks": 0},
        {"interpolated_importance_score": True, "selection_block_size": 3},
    ],
)
def test_greedy_sampling_is_the_same_with_and_without_cache(change):
    model = tiny(**change)
    prompt = torch.randint(0, 32, (2, 5))
    with_cache = model.sample(prompt, 25, temperature=0.0, use_cache=True)
    without = model.sample(prompt, 25, temperature=0.0, use_cache=False)
    assert with_cache.shape == (2, 25)
    assert torch.equal(with_cache, without)


def test_cached_logits_equal_the_full_forward():
    model = tiny()
    tokens = torch.randint(0, 32, (1, 19))
    with torch.no_grad():
        full = model(tokens)
        logits, caches = model(tokens[:, :11], return_caches=True)
        rows = [logits]
        for t in range(11, 19):
            logits, caches = model(tokens[:, t : t + 1], caches, return_caches=True)
            rows.append(logits)
    torch.testing.assert_close(torch.cat(rows, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sampling_at_a_temperature_is_seeded():
    model = tiny()
    prompt = torch.randint(0, 32, (1, 4))
    torch.manual_seed(1)
    first = model.sample(prompt, 10, temperature=1.0)
    torch.manual_seed(1)
    assert torch.equal(first, model.sample(prompt, 10, temperature=1.0))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m(torch.zeros(1, 3)), TypeError, "token ids"),
        (lambda m: m(torch.tensor([[0, 32]])), ValueError, r"0 \.\. 31 \(num_tokens\)"),
        (
            lambda m: m.sample(torch.zeros(1, 2, dtype=torch.long), 0),
            ValueError,
            "length must be positive",
        ),
        (
            lambda m: m.sample(torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1),
            ValueError,
            "temperature must be >= 0",
        ),
        (lambda m: m.sample(torch.zeros(1, 0, dtype=torch.long), 3), ValueError, "n >= 1"),
    ],
)
def test_bad_use(call, error, message):
    with pytest.raises(error, match=message):
        call(tiny())
