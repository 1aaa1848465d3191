"""The sliding-window kernels, causal and not, against `sliding_window_attention`.

Without a GPU the kernels run in Triton's interpreter, so the shapes are small; each case
runs with the launch's tiles and with 16 x 16 tiles, so that short sequences too walk
several key and row tiles. The reference runs in float64 on the same inputs.
"""

import pytest
import torch
from kernel_checks import DEVICE, assert_close_in_half_precision

from nsa_tutorial.sliding import sliding_window_attention

kernels = pytest.importorskip("nsa_tutorial.kernels.window")
window_attention = kernels.window_attention


SMALL_TILES = {"small": kernels.Launch(16, 16, 2, 1), "oblong": kernels.Launch(32, 16, 2, 1)}


@pytest.fixture(params=["launch", "small", "oblong"], ids=lambda name: f"{name}-tiles")
def tiles(request, monkeypatch):
    """The module's launch, 16 x 16 tiles, or 32 rows x 16 keys, in one stage."""
    if request.param in SMALL_TILES:
        monkeypatch.setattr(kernels, "LAUNCH", SMALL_TILES[request.param])
    return request.param


def problem(b, hk, group, n, d, dtype, seed=0):
    """q (b, hk * group, n, d), k and v (b, hk, n, d)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, hk * group, n, d), (b, hk, n, d), (b, hk, n, d)]
    return [torch.randn(*shape, generator=g).to(dtype).to(DEVICE) for shape in shapes]


def reference(q, k, v, window, causal=True, scale=None):
    q, k, v = (t.double() for t in (q, k, v))
    return sliding_window_attention(q, k, v, window, causal, scale)


# (b, hk, group, n, d, window): GQA groups 1-16, windows inside, across and past the
# sequence, lengths that are not multiples of the tiles or (not causal: zero keys seen at
# the end) of the window, a head that is not a power of 2
CASES = [
    (1, 1, 1, 20, 16, 4),
    (2, 2, 4, 45, 32, 8),
    (1, 1, 16, 30, 16, 100),
    (1, 2, 2, 70, 24, 5),
    (1, 1, 3, 33, 16, 1),
    (1, 1, 8, 64, 16, 31),
    (1, 1, 2, 40, 160, 9),  # over 256 bytes a row in float32: launch_settings' small tiles
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_gradients_match_pytorch(case, causal, tiles):
    b, hk, group, n, d, window = case
    q, k, v = problem(b, hk, group, n, d, torch.float32, seed=n)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = window_attention(*leaves, window=window, causal=causal, scale=0.3)
    expected = reference(*leaves, window, causal, scale=0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, leaves, grad_out.float())
    for actual, wanted in zip(grads, torch.autograd.grad(expected, leaves, grad_out), strict=True):
        torch.testing.assert_close(actual.double(), wanted.double(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("dtype", "causal"), [(torch.float16, True), (torch.bfloat16, False)],
                         ids=str)  # fmt: skip
def test_half_precision(dtype, causal):
    q, k, v = problem(1, 2, 4, 90, 64, dtype, seed=2)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = window_attention(*leaves, window=20, causal=causal)
    assert_close_in_half_precision(out, reference(*leaves, 20, causal), leaves)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(window=0), ValueError, "window must be positive"),
        (dict(window=2.5), TypeError, "window must be an int"),
        (dict(scale="big"), TypeError, "scale must be a number or None"),
        (dict(scale=True), TypeError, "scale must be a number or None, got scale=True"),
        (dict(causal=None), TypeError, "causal must be a bool, got causal=None"),
        (dict(k=torch.zeros(1, 3, 8, 16), v=torch.zeros(1, 3, 8, 16)), ValueError,
         "multiple of the kv heads"),
        (dict(v=torch.zeros(1, 2, 8, 16, dtype=torch.float64)), TypeError, "v must be float32"),
    ],
)
def test_bad_input_is_named(change, error, message):
    arguments = dict(q=torch.zeros(1, 4, 8, 16), k=torch.zeros(1, 2, 8, 16),
                     v=torch.zeros(1, 2, 8, 16), window=4)  # fmt: skip
    arguments.update(change)
    arguments.update({name: t.to(DEVICE) for name, t in arguments.items() if torch.is_tensor(t)})
    with pytest.raises(error, match=message):
        window_attention(**arguments)


def test_wide_rows_get_small_tiles():
    """Rows over 256 bytes (bfloat16 past d = 128, float32 past 64) would not fit the
    launch's tiles in shared memory on a GPU: they get 32 x 32 tiles in one stage."""
    assert kernels.launch_settings(128, torch.bfloat16) == kernels.LAUNCH
    assert kernels.launch_settings(64, torch.float32) == kernels.LAUNCH
    for dim, dtype in [(256, torch.bfloat16), (192, torch.float16), (128, torch.float32)]:
        launch = kernels.launch_settings(dim, dtype)
        assert (launch.block_m, launch.block_n, launch.num_stages) == (32, 32, 1)
