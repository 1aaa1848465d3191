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
    for case in stage08.selection_cases():
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
    assert f"case 1 of {len(stage08.selection_cases())}" in message
    assert "arange's range must be a power of 2" in message
    assert "tl.arange(0, 3)" in message  # the learner's line, interpreted or compiled
    assert "InterpreterError" not in message and "Traceback" not in message


# ---- adversarial cases and generic diagnoses ----------------------------------------------


def test_selection_blocks_that_are_no_multiple_of_the_stride_are_checked():
    settings = {case.args[1:] for case in EXERCISES["selection_block_scores"].make_cases()}
    assert {(16, 8), (4, 6)} <= settings  # notebook 03's demo setting among them


SOFTMAX_EXERCISES = [
    "causal_attention",
    "compressed_attention",
    "fine_attention",
    "sliding_window_attention",
    "single_token_selection",
    "selection_kernel",
]


@pytest.mark.parametrize("name", SOFTMAX_EXERCISES)
def test_a_softmax_without_the_maximum_fails_on_large_scores(name):
    overflow = [m for m in EXERCISES[name].mistakes if "overflow" in m.hint]
    assert len(overflow) == 1
    message = verdict_of(name, overflow[0].compute)
    assert "contains NaN" in message and "scores in the hundreds" in message


def spec_of(name):
    return EXERCISES[name].spec


def test_a_transposed_answer_is_recognised():
    message = verdict_of(
        "sliding_window_mask", lambda n, w, c: spec_of("sliding_window_mask")(n, w, c).T
    )
    assert "Where to look: your output equals the reference transposed" in message


@pytest.mark.parametrize(
    ("back", "pattern"),
    [
        (-1, "your mask differs only where the reference is False: it is True at 6 positions"),
        (2, "your mask differs only where the reference is True: it hides 15 positions"),
    ],
)
def test_a_mask_that_shows_too_much_or_too_little_says_so(back, pattern):
    def window(n, w, causal):
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        return (j >= i - w + back) & (j <= i)

    assert f"Where to look: {pattern}" in verdict_of("sliding_window_mask", window)


def test_a_constant_factor_is_recognised():
    message = verdict_of("rms_norm", lambda x, w, eps: 2 * spec_of("rms_norm")(x, w, eps))
    assert "Where to look: your output is the reference times 2, everywhere" in message


def test_a_shift_by_one_block_is_recognised():
    def late(seq_len, num_blocks, stride, num_memory):
        mask = spec_of("compressed_causal_mask")(seq_len + stride, num_blocks, stride, num_memory)
        return mask[stride:]  # row i holds query i + stride: a block too early

    message = verdict_of("compressed_causal_mask", late)
    # rows a block of 4 queries early are columns one compressed block late: the smaller shift
    assert "Where to look: your output is the reference shifted by one position along axis 1" in (
        message
    )
    assert "sits at index i + 1 (later)" in message


def test_one_wrong_head_is_named():
    def head_one_wrong(q, k, v, window, causal):
        out = spec_of("sliding_window_attention")(q, k, v, window, causal)
        out[:, 1] = out[:, 0]
        return out

    message = verdict_of("sliding_window_attention", head_one_wrong)
    assert "Where to look: only head 1 differs (axis 1); the other heads match" in message


def test_importance_heads_grouped_wrong_at_decode_time_are_caught():
    from nsa_tutorial.course.stage07_kv_cache import _single_token

    def modulo_importance_head(q, k, v, importance, num_selected, block):
        # importance head h % h_imp, key/value head right: visible only in a GQA case
        # where each kv head's importance picks other blocks
        heads = iter([lambda head, hq, h: head % h, lambda head, hq, h: head // (hq // h)] * 99)
        return _single_token(
            q, k, v, importance, num_selected, block, head_of=lambda *a: next(heads)(*a)
        )

    message = verdict_of("single_token_selection", modulo_importance_head)
    assert "case 4 of 5" in message and "only heads [1, 2] differ" in message


@pytest.mark.parametrize(
    ("got", "pattern"),
    [
        (torch.arange(10.0) + 1, "shifted by one position along axis 0"),
        (torch.arange(16.0) + 4, "shifted by 4 positions (one block?) along axis 0"),
        (torch.tensor([0.0, 1, 2, 30, 4, 5]), None),  # one value: the positions say it all
        (torch.arange(12.0).reshape(3, 4) * torch.tensor([[1.0], [1], [5]]), "only index 2"),
    ],
)
def test_generic_diagnoses_on_plain_tensors(got, pattern):
    from nsa_tutorial.course.verdict import diagnose_difference

    expected = torch.arange(float(got.numel())).reshape(got.shape)
    found = diagnose_difference(got, expected)
    assert (found is None) if pattern is None else (pattern in found)


# ---- the exercises that tie NSA together (02, 03, 06, 07) ---------------------------------


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("compress_with_memory", "intra-block positions are missing"),
        ("compress_with_memory", "broadcast their heads against the blocks"),
        ("compress_with_memory", "memory tokens go in front"),
        ("importance_scores", "memory columns are still there"),
        ("importance_scores", "heads are grouped the wrong way"),
        ("importance_scores", "starts from probabilities"),
        ("importance_scores", "neither maps nor hides the own block"),
        ("importance_scores", "hidden_after=causal"),
        ("sparse_attention_forward", "rotary is applied before compression"),
        ("sparse_attention_forward", "gates read the raw input"),
        ("sparse_attention_forward", "heads are merged the wrong way"),
        ("decode_step", "rotated at position 0"),
        ("decode_step", "compress it with stride=block_size"),
        ("decode_step", "window is one key short"),
        ("decode_step", "compressed cache does not grow"),
    ],
)
def test_the_assembly_exercises_name_their_mistakes(name, cause):
    assert any(cause in mistake.hint for mistake in EXERCISES[name].mistakes)


def test_importance_cases_cover_both_mappings_grouping_and_the_equal_sizes_quirk():
    cases = [case.args for case in EXERCISES["importance_scores"].make_cases()]
    settings = {args[2:] for args in cases}  # (stride, block, group, interpolate, causal)
    assert {(4, 4, None, False, True), (2, 2, 2, False, False)} <= settings  # stride == block
    assert {(4, 6, 2, True, True), (16, 8, None, True, False)} <= settings  # interpolated
    grouped = [logits.shape[1] // group for logits, _, _, _, group, _, _ in cases if group]
    assert any(kv_heads > 1 for kv_heads in grouped)  # a wrong grouping shows
    tokens = [(logits.shape[-1] - memory) * stride for logits, memory, stride, *_ in cases]
    assert any(n % args[3] for n, args in zip(tokens, cases, strict=True))  # a partial block


@pytest.mark.parametrize("name", ["sparse_attention_forward", "decode_step"])
def test_module_cases_use_gqa_and_lengths_off_the_blocks(name):
    cases = EXERCISES[name].make_cases()
    modules = [case.args[0] for case in cases]
    assert any(m.heads > m.kv_heads > 1 for m in modules)  # a wrong grouping shows
    assert any(m.compress_block_sliding_stride < m.compress_block_size for m in modules)
    lengths = [sum(t.shape[1] for t in case.args[1:]) for case in cases]
    assert all(n % m.selection_block_size for n, m in zip(lengths, modules, strict=True))


def test_a_module_case_is_described_by_its_configuration_not_its_layers():
    def late(attn, inp):
        return 2 * attn(inp)

    message = verdict_of("sparse_attention_forward", late)
    assert "attn=SparseAttention, inp (2, 19, 16) float32; causal, heads=2, kv_heads=2" in message
    assert "Sequential" not in message and "Linear" not in message


def test_the_decode_check_feeds_each_step_the_cache_the_last_one_returned():
    from nsa_tutorial.cache import decode_step

    def forgetful(attn, inp, cache):
        out, new_cache = decode_step(attn, inp, cache)
        return out, cache  # hands the old cache on: the next step decodes at the same position

    message = verdict_of("decode_step", forgetful)
    assert "case 1 of 4" in message and "values differ" in message


def test_decode_all_leaves_a_function_of_the_specs_signature_alone():
    from nsa_tutorial.course.stage07_kv_cache import decode_all

    mistake = EXERCISES["decode_step"].mistakes[0].compute
    assert decode_all(mistake) is mistake
    assert decode_all(decode_all(print)).decodes_all_tokens
    assert decode_all("not a function") == "not a function"


def test_a_wrong_mask_is_shown_beside_the_expected_one():
    """A mask (or index) answer that differs carries both; a notebook shows them as a
    picture under the message. Other answers, and right ones, have no picture."""
    import base64

    def one_key_too_many(seq_len, window, causal):
        i, j = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
        return (j >= i - window - 1) & (j <= i)

    verdict = check("sliding_window_mask", one_key_too_many)
    expected, yours = verdict.picture
    assert torch.equal(yours, one_key_too_many(10, 3, True)) and not torch.equal(expected, yours)
    page = verdict._repr_html_()
    assert page.startswith("<pre>❌ sliding_window_mask: case 1 of 4")
    png = base64.b64decode(page.split("base64,")[1].removesuffix('">'))
    assert png.startswith(b"\x89PNG")
    assert check("rms_norm", lambda x, weight, eps: x * weight)._repr_html_() is None
