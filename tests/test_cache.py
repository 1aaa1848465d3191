"""KV-cache decoding: prefill, then one token at a time, equals the full forward."""

import warnings

import pytest
import torch
from grids import DECODING, config_id

from nsa_tutorial import SparseAttention


def model_for(config, dtype, seed):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SparseAttention(**config).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def decode(model, x, prefill):
    """Prefill `prefill` tokens, then feed the rest one at a time; all outputs."""
    out, cache = model(x[:, :prefill], return_cache=True)
    outputs = [out]
    for t in range(prefill, x.shape[1]):
        out, cache = model(x[:, t : t + 1], cache, return_cache=True)
        outputs.append(out)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("config", DECODING, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoding_equals_the_full_forward(config, dtype):
    tolerance = (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    )
    model = model_for(config, dtype, seed=len(str(config)))
    x = torch.randn(2, 21, 16, dtype=dtype)
    with torch.no_grad():
        full = model(x)
        for prefill in (1, 4, 5, 8, 13):  # on and off block boundaries
            torch.testing.assert_close(decode(model, x, prefill), full, **tolerance)


def test_prefill_cache_holds_rotated_keys_blocks_and_running_buffer():
    config = DECODING[0] | {"compress_block_size": 8, "compress_block_sliding_stride": 4}
    model = model_for(config, torch.float32, 0)
    (k, v), ((ck, cv), (run_k, run_v)) = model(torch.randn(1, 10, 16), return_cache=True)[1]
    assert k.shape == v.shape == (1, 2, 10, 8)
    assert ck.shape == cv.shape == (1, 2, 2, 8)  # blocks end at tokens 3 and 7
    assert run_k.shape == run_v.shape == (1, 2, 2 + 4, 8)  # tokens 8, 9 and the 4 before


BASE = dict(
    dim=16,
    dim_head=8,
    heads=4,
    kv_heads=2,
    sliding_window_size=4,
    compress_block_size=8,
    compress_block_sliding_stride=4,
    selection_block_size=8,
    num_selected_blocks=2,
    causal=True,
)


def cache_of(batch=1, **change):
    model = SparseAttention(**(BASE | change))
    return model(torch.randn(batch, 9, 16), return_cache=True)[1]


@pytest.mark.parametrize(
    ("cache", "inp", "message"),
    [
        (lambda: cache_of(), torch.randn(1, 2, 16), "one new token .* got seq_len=2"),
        (
            lambda: cache_of(batch=2),
            torch.randn(1, 1, 16),
            r"cached keys should have shape \(1, 2, 9, 8\)",
        ),
        (
            lambda: cache_of(kv_heads=4),
            torch.randn(1, 1, 16),
            r"should have shape \(1, 2, 9, 8\).*got \(1, 4, 9, 8\)",
        ),
        (
            lambda: cache_of(compress_block_sliding_stride=8),
            torch.randn(1, 1, 16),
            "compressed keys should have shape",
        ),
        (lambda: ((1, 2), 3), torch.randn(1, 1, 16), "cache must be what forward"),
    ],
)
def test_bad_cache_or_input(cache, inp, message):
    with pytest.raises(ValueError, match=message):
        SparseAttention(**BASE)(inp, cache())


def test_decoding_and_return_cache_need_causal():
    model = SparseAttention(**(BASE | {"causal": False}))
    with pytest.raises(ValueError, match="return_cache=True needs causal=True"):
        model(torch.randn(1, 5, 16), return_cache=True)
    with pytest.raises(ValueError, match="decoding with a cache needs causal=True"):
        model(torch.randn(1, 1, 16), cache_of())
