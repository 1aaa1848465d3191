"""Every exercise's check, run against three sources of the function:

- the package (nsa_tutorial), which must pass every case;
- the solution notebooks, whose definitions are extracted as `make check` does;
- with --learner-notebook NN: the learner's notebooks/NN_*.ipynb (`make check NB=NN`).
"""

from __future__ import annotations

import functools

import pytest
import torch

import nsa_tutorial
from nsa_tutorial import (
    attention,
    cache,
    compress,
    fine_attention,
    importance,
    selection,
    sliding,
    training,
)
from nsa_tutorial.course import EXERCISES, STAGES, check
from nsa_tutorial.course.notebooks import (
    NOTEBOOKS,
    SOLUTIONS,
    NotebookError,
    learner_definitions,
    stage_notebook,
)
from nsa_tutorial.course.stage00_welcome import causal_attention_spec
from nsa_tutorial.kernels import importance as kernel_importance


def gathered_selection(q, k, v, blocks, block_size, causal):
    """Notebook 04's gathered PyTorch path, called with the exercise's -1 slots."""
    indices, selected = blocks.clamp(min=0).long(), blocks >= 0
    out = fine_attention.fine_attention_gathered(
        q, k, v, indices, selected, block_size=block_size, causal=causal
    )
    if not causal:  # a token that reads no block sees no key: the kernel gives it zeros
        nothing = (~selected.any(dim=-1)).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        out = out.masked_fill(nothing[..., None], 0.0)
    return out


def compressed_with_memory(x, positions, mlp, memory, block_size, stride):
    """The package's compression (windows, positions, MLP) with the memory in front."""
    return compress.prepend_memory(compress.compress(x, positions, mlp, block_size, stride), memory)


def single_token_selection(q, k, v, importance, num_selected, block):
    """The package's selection branch for the newest token alone: one decoding row."""
    values, indices = selection.top_blocks(importance, num_selected)
    return selection.selection_branch(
        q, k, v, values, indices, block_size=block, causal=True, first_query=k.shape[-2] - 1
    )


def triton_selection_attention(q, k, v, blocks, block_size, causal):
    """The package's group-centric Triton kernel, called with the exercise's -1 slots."""
    from nsa_tutorial.kernels.selection import selection_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, indices, selected = (
        t.to(device) for t in (q, k, v, blocks.clamp(min=0).long(), blocks >= 0)
    )
    out = selection_attention(q, k, v, indices, selected, block_size=block_size, causal=causal)
    return out.cpu()


# The package's implementations of each exercise (00's warm-ups: torch's softmax and the spec).
PACKAGE = {
    "stable_softmax": [lambda scores: scores.softmax(dim=-1)],
    "causal_attention": [causal_attention_spec],
    "rms_norm": [nsa_tutorial.rms_norm],
    "rotary_frequencies": [nsa_tutorial.rotary_frequencies],
    "rotate_pairs": [nsa_tutorial.rotate_pairs],
    "apply_rotary": [nsa_tutorial.apply_rotary],
    "compression_windows": [compress.compression_windows],
    "compress_with_memory": [compressed_with_memory],
    "compressed_causal_mask": [compress.compressed_causal_mask],
    "compressed_attention": [lambda *args: compress.compressed_attention(*args)[0]],
    "selection_block_scores": [importance.selection_block_scores],
    "block_probabilities": [importance.block_probabilities],
    "importance_scores": [importance.importance_scores],
    "top_blocks": [selection.top_blocks],
    "gather_blocks": [fine_attention.gather_blocks],
    "fine_attention": [
        fine_attention.fine_attention,
        fine_attention.fine_attention_dense,
        fine_attention.fine_attention_gathered,
    ],
    "sliding_window_mask": [sliding.sliding_window_mask],
    "sliding_window_attention": [sliding.sliding_window_attention],
    "strategy_gates": [
        lambda x, weight, bias, heads: attention.strategy_gate_network(
            linear_with(weight, bias), heads
        )(x)
    ],
    "sparse_attention_forward": [lambda attn, inp: attn(inp)],
    "update_running_buffer": [cache.update_running_buffer],
    "single_token_selection": [single_token_selection],
    "decode_step": [cache.decode_step],
    "softmax_mean_kernel": [lambda scores, values: scores.softmax(dim=-1) @ values],
    "selection_kernel": [gathered_selection, triton_selection_attention],
    "dq_kernel": [lambda *args: autograd_dq(*args)],
    "invert_selection": [lambda blocks, num_blocks: kernel_index(blocks, num_blocks)],
    "selection_block_weights": [
        lambda w, stride, block: kernel_importance.selection_block_weights(
            w, stride, block, interpolate=False, hidden_after=False
        )[:w]  # without the hidden row that interpolation leans towards
    ],
    "compressed_kernel": [
        lambda q, ck, cv, m, stride: compress.compressed_attention(q, ck, cv, m, stride, True)[0],
        lambda *args: triton_compressed_attention(*args),
    ],
    "window_key_tiles": [lambda *args: tiles_from_the_mask(*args)],
    "needle_targets": [training.needle_targets],
    "answer_accuracy": [training.answer_accuracy],
    "top_selected_block": [training.top_selected_block],
}


def tiles_from_the_mask(first, last, window, n, causal, block):
    """The tiles of `block` keys holding a key that notebook 05's window mask shows one of
    the tokens first .. last (not causal, over n padded to a multiple of the window)."""
    num_keys = n if causal else n + (-n % window)
    seen = sliding.sliding_window_mask(num_keys, window, causal)[first : last + 1].any(dim=0)
    return sorted({key // block * block for key in seen.nonzero().flatten().tolist()})


def triton_compressed_attention(q, ck, cv, num_memory, stride):
    """The package's compressed-attention kernel (row tiles of a GQA group), causal."""
    from nsa_tutorial.kernels.compressed import compressed_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, ck, cv = (t.to(device) for t in (q, ck, cv))
    out = compressed_attention(q, ck, cv, num_memory=num_memory, stride=stride, causal=True)
    return out.cpu()


def autograd_dq(q, k, v, blocks, do, lse, delta, block_size, causal):
    """dq by autograd through notebook 04's gathered path (lse and delta unused: autograd
    recomputes the forward)."""
    q = q.clone().requires_grad_()
    out = gathered_selection(q, k, v, blocks, block_size, causal)
    return torch.autograd.grad(out, q, do)[0]


def kernel_index(blocks, num_blocks):
    """The package's inverted index, the one the dk, dv kernel walks."""
    from nsa_tutorial.kernels.selection import invert_selection

    return invert_selection(blocks, num_blocks)


def linear_with(weight, bias):
    """An nn.Linear holding the given weight (out, in) and bias (out,)."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
    linear.load_state_dict({"weight": weight, "bias": bias})
    return linear


@functools.cache
def definitions(folder, stage):
    return learner_definitions(stage_notebook(stage, folder))


def pytest_generate_tests(metafunc):
    if "exercise" not in metafunc.fixturenames:
        return
    stage = metafunc.config.getoption("--learner-notebook")
    if stage is not None:
        stage = f"{int(stage):02d}"
        if stage not in STAGES:
            raise pytest.UsageError(f"no stage {stage}; stages: {', '.join(STAGES)}")
        params = [(e.name, NOTEBOOKS) for e in STAGES[stage]]
    else:
        params = [
            (name, source)
            for name in EXERCISES
            for source in [*(f"package:{i}" for i in range(len(PACKAGE[name]))), SOLUTIONS]
        ]
    ids = [f"{name}-{getattr(source, 'name', source)}" for name, source in params]
    metafunc.parametrize(("exercise", "source"), params, ids=ids)


def test_exercise(exercise, source):
    if isinstance(source, str):
        fn = PACKAGE[exercise][int(source.removeprefix("package:"))]
    else:
        stage = EXERCISES[exercise].stage
        try:
            namespace = definitions(source, stage)
        except NotebookError as error:
            pytest.fail(str(error), pytrace=False)
        if exercise not in namespace:
            pytest.fail(
                f"{stage_notebook(stage, source).name} defines no function `{exercise}`",
                pytrace=False,
            )
        fn = namespace[exercise]
    verdict = check(exercise, fn)
    if not verdict.passed:
        pytest.fail(str(verdict), pytrace=False)


def test_every_exercise_has_a_package_implementation():
    assert set(PACKAGE) == set(EXERCISES)
