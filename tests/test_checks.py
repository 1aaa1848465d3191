"""The exercise checks catch typical mistakes and say what is wrong, in words."""

import pytest
import torch
from einops import rearrange

from nsa_tutorial.course import EXERCISES, check
from nsa_tutorial.course import stage08_triton_forward as stage08
from nsa_tutorial.course.verdict import FAIL, PASS, TODO, compare
from nsa_tutorial.kernels import TRITON_AVAILABLE


def verdict_of(name, fn, status=FAIL):
    verdict = check(name, fn)
    assert verdict.status == status, str(verdict)
    return str(verdict)


# ---- RMSNorm ---------------------------------------------------------------------------


def rms_without_eps(x, weight, eps):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt() * weight


def rms_with_plain_mean(x, weight, eps):
    return x / (x.mean(-1, keepdim=True) + eps).sqrt() * weight


def rms_over_first_axis(x, weight, eps):
    return x / (x.pow(2).mean(0, keepdim=True) + eps).sqrt() * weight


def rms_eps_outside(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


def layer_norm_instead(x, weight, eps):
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight


def rms_without_weight(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


@pytest.mark.parametrize(
    ("wrong", "cause"),
    [
        (rms_without_eps, "eps is missing"),
        (rms_with_plain_mean, "divides by the mean of x"),
        (rms_over_first_axis, "wrong axis"),
        (rms_eps_outside, "eps is added after the square root"),
        (layer_norm_instead, "that is LayerNorm"),
        (rms_without_weight, "gain is missing"),
    ],
)
def test_rms_norm_mistakes_are_named(wrong, cause):
    message = verdict_of("rms_norm", wrong)
    assert cause in message.split("Likely cause:")[1]
    assert "values differ" in message


def test_rms_norm_shape_error_says_shapes():
    message = verdict_of("rms_norm", lambda x, w, eps: x.mean(-1))
    assert "output has shape (2, 3), expected (2, 3, 16)" in message


# ---- rotary ------------------------------------------------------------------------------


def halves_rotate(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def test_halves_instead_of_interleaved_pairs_is_named():
    message = verdict_of("rotate_pairs", halves_rotate)
    assert "pairs the two halves of the vector" in message


def test_rotation_the_wrong_way_is_named():
    def backwards(x):
        pairs = rearrange(x, "... (d r) -> ... d r", r=2)
        return rearrange(torch.stack((pairs[..., 1], -pairs[..., 0]), -1), "... d r -> ... (d r)")

    assert "the wrong way" in verdict_of("rotate_pairs", backwards)


def test_wrong_theta_is_named_with_the_base_it_used():
    message = verdict_of(
        "rotary_frequencies", lambda d, theta: 1 / 1000 ** (torch.arange(0, d, 2) / d)
    )
    assert "as if theta were 1000, but theta is 10000" in message


def test_hard_coded_theta_is_named():
    message = verdict_of(
        "rotary_frequencies", lambda d, theta: 1 / 10000 ** (torch.arange(0, d, 2) / d)
    )
    assert "case 3 of 4" in message and "theta is fixed at 10000" in message


def test_exponent_without_step_two_is_named():
    message = verdict_of(
        "rotary_frequencies", lambda d, theta: 1 / theta ** (torch.arange(d // 2) / d)
    )
    assert "the exponent is i / dim_head" in message


def test_one_frequency_per_feature_is_named():
    def per_feature(d, theta):
        return (1 / theta ** (torch.arange(0, d, 2) / d)).repeat_interleave(2)

    message = verdict_of("rotary_frequencies", per_feature)
    assert "output has shape (8,), expected (4,)" in message
    assert "one frequency per pair" in message


def rotary_halves(x, freqs, offset=0):
    angles = (torch.arange(x.shape[-2]) + offset)[:, None] * freqs
    angles = torch.cat((angles, angles), dim=-1)
    return x * angles.cos() + halves_rotate(x) * angles.sin()


def rotary_ignoring_offset(x, freqs, offset=0):
    angles = (torch.arange(x.shape[-2]).float()[:, None] * freqs).repeat_interleave(2, -1)
    pairs = rearrange(x, "... (d r) -> ... d r", r=2)
    turned = rearrange(torch.stack((-pairs[..., 1], pairs[..., 0]), -1), "... d r -> ... (d r)")
    return x * angles.cos() + turned * angles.sin()


@pytest.mark.parametrize(
    ("wrong", "cause"),
    [(rotary_halves, "pairs the two halves"), (rotary_ignoring_offset, "offset is ignored")],
)
def test_apply_rotary_mistakes_are_named(wrong, cause):
    assert cause in verdict_of("apply_rotary", wrong)


# ---- warm-up: causal attention ------------------------------------------------------------


def attention(q, k, v, *, scale=None, diagonal=0, dim=-1):
    n = q.shape[-2]
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    mask = torch.ones(n, n, dtype=torch.bool).tril(diagonal)
    return scores.masked_fill(~mask, float("-inf")).softmax(dim) @ v


@pytest.mark.parametrize(
    ("kwargs", "cause"),
    [
        ({"scale": 1.0}, "not scaled"),
        ({"diagonal": -1}, "hides the diagonal"),
        ({"diagonal": 100}, "no causal mask"),
        ({"dim": -2}, "softmax runs over queries"),
    ],
)
def test_causal_attention_mistakes_are_named(kwargs, cause):
    assert cause in verdict_of("causal_attention", lambda q, k, v: attention(q, k, v, **kwargs))


def test_correct_attention_passes():
    assert verdict_of("causal_attention", attention, PASS).startswith("✅")


# ---- the machinery ------------------------------------------------------------------------


def test_not_implemented_is_a_friendly_todo():
    def stub(x, weight, eps):
        raise NotImplementedError("Exercise rms_norm: write this part")

    message = verdict_of("rms_norm", stub, TODO)
    assert message.startswith("⏳ rms_norm: not implemented yet (Exercise rms_norm")


def test_a_crash_points_at_the_learners_line_not_into_torch():
    def crashes(x, weight, eps):
        squares = x.pow(2)
        return squares @ weight.reshape(3, -1)

    message = verdict_of("rms_norm", crashes)
    assert "raised RuntimeError" in message
    assert "In your code: line" in message and "squares @ weight.reshape(3, -1)" in message
    assert "torch/" not in message and "Traceback" not in message


def test_changing_inputs_in_place_is_caught():
    def in_place(x, weight, eps):
        x *= torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * weight

    assert "changed its inputs in place" in verdict_of("rms_norm", in_place)


def test_wrong_dtype_and_non_tensor_are_reported():
    float64 = verdict_of(
        "rotary_frequencies",
        lambda d, theta: 1 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d),
    )
    assert "dtype torch.float64, expected torch.float32" in float64
    assert "as if theta were" not in float64  # the right base: no theta diagnosis
    assert "returned list, expected a tensor of shape (4,)" in verdict_of(
        "rotary_frequencies", lambda d, theta: [1.0] * (d // 2)
    )


def test_nan_output_is_pointed_out():
    assert "contains NaN" in verdict_of("rms_norm", lambda x, w, eps: x * float("nan"))


def test_unknown_exercise_and_non_function():
    with pytest.raises(ValueError, match="no exercise named 'rmsnorm'; the exercises are: "):
        check("rmsnorm", print)
    assert "expected a function, got int" in verdict_of("rms_norm", 3)


def test_compare_lists_positions_and_largest_difference():
    expected = torch.zeros(2, 3)
    got = expected.clone()
    got[1, 2] = 0.5
    assert compare(got, expected) == (
        "1 of 6 values differ: at [1, 2] got 0.5, expected 0.\n   Largest difference: 0.5."
    )
    assert compare(expected, expected) is None


# ---- every known mistake is caught and named -----------------------------------------------

KNOWN_MISTAKES = [
    pytest.param(exercise, number, id=f"{exercise.name}-{number}")
    for exercise in EXERCISES.values()
    for number in range(len(exercise.mistakes))
]


@pytest.mark.parametrize(("exercise", "number"), KNOWN_MISTAKES)
def test_each_known_mistake_fails_with_its_hint(exercise, number):
    mistake = exercise.mistakes[number]
    message = verdict_of(exercise.name, mistake.compute)
    assert f"Likely cause: {mistake.hint}" in message


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("compressed_causal_mask", "off by one"),
        ("compressed_causal_mask", "memory tokens are missing"),
        ("compressed_attention", "memory tokens are treated as blocks"),
        ("block_probabilities", "softmax runs over queries"),
        ("block_probabilities", "own block is not masked"),
        ("top_blocks", "top-n is not clipped"),
    ],
)
def test_stage_02_to_04_mistakes_named_in_the_issue_are_known(name, cause):
    assert any(cause in mistake.hint for mistake in EXERCISES[name].mistakes)


# ---- stage 08: a Triton kernel as the learner's answer -------------------------------------


def test_the_kernel_walk_without_a_mistake_is_the_spec():
    for case in stage08._cases():
        assert (
            compare(stage08._kernel_like(*case.args), stage08.selection_kernel_spec(*case.args))
            is None
        )


@pytest.mark.parametrize(
    "cause",
    [
        "own block is missing",
        "own block sees the future",
        "must see its own key",
        "keys past the end of the sequence",
        "not h % num_kv_heads",
        "not scaled",
        "accumulator is not rescaled",
        "read as block 0",
    ],
)
def test_stage_08_mistakes_named_in_the_brief_are_known(cause):
    assert any(cause in mistake.hint for mistake in EXERCISES["selection_kernel"].mistakes)


def garbage_in_rows(reads_garbage):
    """The spec's answer with NaN in the rows (b, h, i) of a kernel that read past a tensor."""

    def answer(q, k, v, blocks, block_size, causal):
        out = stage08.selection_kernel_spec(q, k, v, blocks, block_size, causal)
        rows = reads_garbage(blocks, block_size, q.shape[-2])  # (b, hk, n)
        rows = rows.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return out.masked_fill(rows[..., None], float("nan"))

    return answer


@pytest.mark.parametrize(
    ("reads_garbage", "cause"),
    [
        (lambda blocks, size, n: (blocks == (n - 1) // size).any(-1), "last, partial block"),
        (lambda blocks, size, n: (blocks < 0).any(-1), "with an empty slot (-1)"),
    ],
)
def test_garbage_is_traced_to_the_rows_that_read_it(reads_garbage, cause):
    message = verdict_of("selection_kernel", garbage_in_rows(reads_garbage))
    assert "contains NaN" in message and cause in message.split("Likely cause:")[1]


if TRITON_AVAILABLE:  # nsa_tutorial.kernels, imported above, chose the interpreter or the GPU
    import triton
    import triton.language as tl

    @triton.jit
    def untouched_kernel(
        Q, K, V, BLOCKS, OUT, n, num_heads, num_kv_heads, num_slots, scale,
        BLOCK_SIZE: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
    ):  # fmt: skip
        raise NotImplementedError("Exercise selection_kernel: write this part")

    @triton.jit
    def ragged_arange_kernel(
        Q, K, V, BLOCKS, OUT, n, num_heads, num_kv_heads, num_slots, scale,
        BLOCK_SIZE: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
    ):  # fmt: skip
        q = tl.load(Q + tl.arange(0, 3))
        tl.store(OUT + tl.arange(0, 4), q)


needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton is not installed")


@needs_triton
def test_an_untouched_kernel_is_a_friendly_todo():
    message = verdict_of("selection_kernel", untouched_kernel, TODO)
    assert message.startswith("⏳ selection_kernel: not implemented yet (Exercise selection_kernel")


@needs_triton
def test_a_kernel_that_fails_names_its_line_not_tritons_internals():
    message = verdict_of("selection_kernel", ragged_arange_kernel)
    assert "case 1 of 4" in message and "arange's range must be a power of 2" in message
    assert "tl.arange(0, 3)" in message  # the learner's line, interpreted or compiled
    assert "InterpreterError" not in message and "Traceback" not in message
