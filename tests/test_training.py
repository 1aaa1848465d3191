"""Stage 11: the needle task, the training loop and its checkpoints, the baselines of
TinyTransformer, and a reduced capstone: NSA and full attention learn the task, a
sliding window alone cannot."""

from functools import partial

import pytest
import torch

from nsa_tutorial.model import DenseAttention, TinyTransformer
from nsa_tutorial.training import (
    IGNORE,
    NeedleTask,
    answer_accuracy,
    block_importance,
    branch_gates,
    cosine_schedule,
    decode,
    encode,
    evaluate,
    layer_inputs,
    load_checkpoint,
    needle_batch,
    needle_sample,
    python_source_text,
    seeded_batches,
    selected_blocks,
    text_batch,
    train,
)

SMALL_TASK = NeedleTask(seq_len=128, window=16, num_queries=8)
ATTENTION = dict(
    dim_head=16, heads=2, kv_heads=1, sliding_window_size=16, compress_block_size=8,
    compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=2,
)  # fmt: skip


def small_model(kind, seed=0, depth=1):
    torch.manual_seed(seed)
    return TinyTransformer(SMALL_TASK.num_tokens, 32, depth, attention=kind, **ATTENTION)


def test_needle_sample_puts_queries_beyond_the_window():
    task = NeedleTask()
    sample = needle_sample(task, 16, torch.Generator().manual_seed(3))
    rows = torch.arange(16)[:, None]
    needle = sample.tokens[rows, sample.needle_start[:, None] + torch.arange(task.needle_len)]
    assert torch.equal(needle, sample.values[:, None].expand_as(needle))
    assert bool((sample.needle_start < task.seq_len // 4).all())
    last_needle = sample.needle_start + task.needle_len - 1
    assert bool((sample.query_positions[:, 0] - last_needle > task.window).all())
    assert bool((sample.tokens[rows, sample.query_positions] == task.query_token).all())
    assert int((sample.tokens == task.query_token).sum()) == 16 * task.num_queries
    values = sample.values - task.num_filler - 1
    assert bool(((values >= 0) & (values < task.num_values)).all())


def test_needle_batches_are_seeded():
    first = needle_batch(SMALL_TASK, 4, torch.Generator().manual_seed(5))
    again = needle_batch(SMALL_TASK, 4, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    tokens, targets = first
    assert int((targets != IGNORE).sum()) == 4 * SMALL_TASK.num_queries


def test_reduced_capstone_nsa_and_full_learn_what_a_window_cannot():
    """Seeded, 200 steps each: the answer is beyond the window, so window-only stays
    near chance (1/16) while NSA and full attention find the needle."""
    batches = seeded_batches(partial(needle_batch, SMALL_TASK, 8), seed=0)
    test = [needle_batch(SMALL_TASK, 64, torch.Generator().manual_seed(99))]
    accuracy = {}
    for kind in ("nsa", "full", "window"):
        model = small_model(kind)
        train(model, batches, 200, log_every=200, label=kind)
        accuracy[kind] = evaluate(model, test)[1]
    assert accuracy["window"] < 0.2, accuracy
    assert accuracy["nsa"] > accuracy["window"] + 0.5, accuracy
    assert accuracy["full"] > accuracy["window"] + 0.5, accuracy


def test_checkpoint_holds_state_dicts_that_load_with_weights_only(tmp_path):
    batches = seeded_batches(partial(needle_batch, SMALL_TASK, 2), seed=1)
    path = tmp_path / "run.pt"
    trained = small_model("nsa")
    train(trained, batches, 6, log_every=3, checkpoint=path)
    state = torch.load(path, weights_only=True)
    assert set(state) == {"model", "optimizer", "scheduler", "step", "history"}
    assert state["step"] == 6 and state["history"]["steps"] == [3, 6]
    loaded = small_model("nsa", seed=7)  # other weights: all must come from the file
    step, history = load_checkpoint(path, loaded)
    assert step == 6 and len(history.losses) == 2
    for a, b in zip(trained.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_resumes_from_its_checkpoint(tmp_path):
    """A run of 6 steps stopped after 3 (its checkpoint says step 3, the schedule of 6)
    and resumed gives the weights of a run that was never stopped."""
    batches = seeded_batches(partial(needle_batch, SMALL_TASK, 2), seed=2)
    path = tmp_path / "run.pt"
    whole = small_model("full")
    train(whole, batches, 6, log_every=3)
    stopped = small_model("full")
    calls = []

    def stop_after_three(step):
        if step == 3:
            raise KeyboardInterrupt
        calls.append(step)
        return batches(step)

    with pytest.raises(KeyboardInterrupt):
        train(stopped, stop_after_three, 6, log_every=3, checkpoint=path)
    resumed = small_model("full", seed=9)
    history = train(resumed, batches, 6, log_every=3, checkpoint=path)
    assert history.steps == [3, 6]
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factors = [cosine_schedule(step, 100, 10) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[100] == pytest.approx(0.0)
    assert factors[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def test_answer_accuracy_counts_answers_only():
    targets = torch.tensor([[IGNORE, 2, IGNORE], [1, IGNORE, IGNORE]])
    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 2] = 1.0  # right
    logits[1, 0, 3] = 1.0  # wrong
    assert answer_accuracy(logits, targets).item() == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["full", "window"])
def test_baselines_decode_with_a_cache_as_without(kind):
    model = small_model(kind, depth=2)
    prompt = torch.randint(0, SMALL_TASK.num_tokens, (2, 5), generator=torch.Generator())
    with_cache = model.sample(prompt, 30, temperature=0.0, use_cache=True)
    without = model.sample(prompt, 30, temperature=0.0, use_cache=False)
    assert torch.equal(with_cache, without)


def test_window_attention_ignores_keys_beyond_the_window():
    torch.manual_seed(0)
    layer = DenseAttention(dim=16, dim_head=8, heads=2, kv_heads=1, window=4)
    x = torch.randn(1, 20, 16)
    changed = x.clone()
    changed[:, :10] = torch.randn(1, 10, 16)
    # query 14 sees keys 10 .. 14, none changed; query 13 sees key 9, which changed
    assert torch.allclose(layer(x)[:, 14:], layer(changed)[:, 14:], atol=1e-6)
    assert not torch.allclose(layer(x)[:, 13], layer(changed)[:, 13], atol=1e-4)
    full = DenseAttention(dim=16, dim_head=8, heads=2, kv_heads=1)
    full.load_state_dict(layer.state_dict())
    assert not torch.allclose(full(x)[:, 19], full(changed)[:, 19], atol=1e-4)


def test_the_three_models_share_everything_but_attention():
    names = {kind: set(small_model(kind).state_dict()) for kind in ("nsa", "full", "window")}
    assert names["full"] == names["window"]
    assert names["full"] <= names["nsa"]  # NSA adds compression, memory and gates


def test_inspection_shapes():
    model = small_model("nsa")
    tokens, _ = needle_batch(SMALL_TASK, 2, torch.Generator().manual_seed(0))
    (x,) = layer_inputs(model, tokens)
    assert x.shape == (2, 128, 32)
    values, indices = selected_blocks(model.layers[0][0], x)
    assert values.shape == indices.shape == (2, 1, 128, 2)
    gates = branch_gates(model.layers[0][0], x)
    assert gates.shape == (2, 2, 128, 3) and bool(((gates > 0) & (gates < 1)).all())
    with pytest.raises(TypeError, match="layer must be a SparseAttention"):
        selected_blocks(small_model("full").layers[0][0], x)


def test_text_round_trip_and_batches():
    text = python_source_text(5_000)
    assert len(text) == 5_000 and "def " in text
    data = encode(text)
    assert decode(data) == text.replace("\t", "    ")
    assert decode(encode("naïve")) == "na?ve"
    inputs, targets = text_batch(data, 3, 64, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (3, 64)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: NeedleTask(seq_len=64), ValueError, "seq_len=64 is too short"),
        (lambda: NeedleTask(window=0), ValueError, "window must be positive"),
        (lambda: needle_batch(SMALL_TASK, 0, torch.Generator()), ValueError, "batch_size"),
        (lambda: TinyTransformer(8, 16, 1, attention="sparse"), ValueError, "attention must"),
        (
            lambda: TinyTransformer(8, 16, 1, attention="window", dim_head=8, heads=2),
            TypeError,
            "sliding_window_size",
        ),
        (lambda: DenseAttention(16, 8, heads=3, kv_heads=2), ValueError, "multiple of kv_heads"),
        (lambda: text_batch(torch.zeros(10), 2, 10, None), ValueError, "seq_len=10"),
        (lambda: python_source_text(0), ValueError, "num_chars must be positive"),
    ],
)
def test_bad_use(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_block_importance_ranks_the_blocks_the_layer_selects():
    model = small_model("nsa")
    tokens, _ = needle_batch(SMALL_TASK, 2, torch.Generator().manual_seed(1))
    (x,) = layer_inputs(model, tokens)
    layer = model.layers[0][0]
    importance = block_importance(layer, x)  # (2, 1, 128, 16)
    assert importance.shape == (2, 1, 128, 16)
    values, indices = selected_blocks(layer, x)
    torch.testing.assert_close(importance.gather(-1, indices), values)
