"""Stage 11: does NSA learn? Tasks, a training loop and a look inside the trained layer.

- `NeedleTask`: a synthetic long-range task, drawn on the fly from a seeded generator.
  A short run of one value symbol (the needle) sits early in a haystack of filler;
  later, query markers ask for the value. Every query is more than `window` tokens
  after the needle, so a sliding window alone cannot answer it.
- `train`: plain PyTorch (AdamW, warm-up then cosine learning rate, gradient clipping),
  a printed progress bar, and checkpoints (state_dicts, loaded with weights_only=True)
  that a later call resumes from.
- A character-level corpus every machine has offline: the Python standard library's
  own source files.
- `layer_inputs`, `selected_blocks`, `branch_gates`: what a trained SparseAttention
  layer reads, and how its three gates split (Eq. 5); `top_selected_block`: the block a
  head ranks first at a query.
"""

from __future__ import annotations

import math
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from nsa_tutorial.attention import SparseAttention
from nsa_tutorial.compress import compressed_attention, prepend_memory
from nsa_tutorial.importance import importance_scores
from nsa_tutorial.selection import SELECTED_THRESHOLD, top_blocks
from nsa_tutorial.validation import require_positive_int

IGNORE = -100  # targets at positions that are not answers (cross_entropy's ignore_index)
Batch = tuple[Tensor, Tensor]  # inputs (b, n) long, targets (b, n) long


# ---- the needle task ---------------------------------------------------------------------


@dataclass(frozen=True)
class NeedleTask:
    """Needle retrieval over `seq_len` tokens; the vocabulary is, in order, `num_filler`
    filler symbols, one query marker and `num_values` value symbols."""

    seq_len: int = 512  # tokens per sequence
    num_filler: int = 16  # haystack symbols, drawn uniformly
    num_values: int = 16  # the needle is one of these: chance is 1 / num_values
    needle_len: int = 8  # the value is written this many times in a row
    num_queries: int = 16  # query markers per sequence, each an answer position
    window: int = 32  # every query is more than this many tokens after the needle

    def __post_init__(self) -> None:
        for name in ("seq_len", "num_filler", "num_values", "needle_len", "num_queries"):
            require_positive_int(name, getattr(self, name))
        require_positive_int("window", self.window)
        room = self.seq_len // 4 + self.needle_len + self.window + self.num_queries
        if room > self.seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} is too short: the needle (first quarter, "
                f"needle_len={self.needle_len}), the gap window={self.window} and "
                f"num_queries={self.num_queries} need {room} tokens"
            )

    @property
    def query_token(self) -> int:
        return self.num_filler

    @property
    def num_tokens(self) -> int:
        return self.num_filler + 1 + self.num_values

    def value_token(self, value: Tensor) -> Tensor:
        """Value index (0 .. num_values - 1) -> its token id."""
        return value + self.num_filler + 1


@dataclass(frozen=True)
class NeedleSample:
    """A batch of the needle task: tokens (b, n), value (b,) token ids, the needle's
    first position (b,) and the query positions (b, q), sorted."""

    tokens: Tensor
    values: Tensor
    needle_start: Tensor
    query_positions: Tensor


def needle_sample(task: NeedleTask, batch_size: int, generator: torch.Generator) -> NeedleSample:
    """Draw `batch_size` sequences of `task` from `generator`: filler, the needle at a
    random start in the first quarter, query markers at distinct random positions more
    than `window` tokens after the needle's last token."""
    require_positive_int("batch_size", batch_size)
    b, n, length = batch_size, task.seq_len, task.needle_len
    tokens = torch.randint(0, task.num_filler, (b, n), generator=generator)
    start = torch.randint(0, n // 4, (b,), generator=generator)
    values = task.value_token(torch.randint(0, task.num_values, (b,), generator=generator))
    rows = torch.arange(b)[:, None]
    tokens[rows, start[:, None] + torch.arange(length)] = values[:, None]
    first_query = start + length + task.window  # (b,): the first position a query may take
    # distinct positions first_query .. n - 1: rank random keys, keep the q smallest
    keys = torch.rand(b, n, generator=generator)
    keys = keys.masked_fill(torch.arange(n) < first_query[:, None], 2.0)
    positions = keys.argsort(dim=-1)[:, : task.num_queries].sort(dim=-1).values  # (b, q)
    tokens[rows, positions] = task.query_token
    return NeedleSample(tokens, values, start, positions)


def needle_targets(
    tokens: Tensor, values: Tensor, query_token: int, ignore_index: int = IGNORE
) -> Tensor:
    """Targets (b, n): at every query marker of tokens (b, n) the sequence's value
    (b,), elsewhere ignore_index. The answer is due *at* the marker, not after it."""
    is_query = tokens == query_token
    return torch.where(is_query, values[:, None], torch.full_like(tokens, ignore_index))


def needle_batch(task: NeedleTask, batch_size: int, generator: torch.Generator) -> Batch:
    """(tokens, targets) (b, n) for training: `needle_sample` and `needle_targets`."""
    sample = needle_sample(task, batch_size, generator)
    return sample.tokens, needle_targets(sample.tokens, sample.values, task.query_token)


def answer_accuracy(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE) -> Tensor:
    """Fraction of answer positions (targets != ignore_index) where the top logit is the
    target: logits (b, n, v), targets (b, n) -> 0-dim float32."""
    answers = targets != ignore_index
    correct = (logits.argmax(dim=-1) == targets) & answers
    return correct.sum().float() / answers.sum().clamp(min=1)


def seeded_batches(draw: Callable[[torch.Generator], Batch], seed: int) -> Callable[[int], Batch]:
    """A batch function for `train`: step -> draw(generator seeded by seed and step),
    so a resumed run sees exactly the batches an uninterrupted one would."""

    def batch(step: int) -> Batch:
        return draw(torch.Generator().manual_seed(seed * 1_000_003 + step))

    return batch


# ---- training ----------------------------------------------------------------------------


@dataclass
class History:
    """What `train` logged: step numbers and the loss and answer accuracy of the batch
    at each of them (plain lists, so a checkpoint loads with weights_only=True)."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    seconds: float = 0.0  # training time so far, resumed runs included


def cosine_schedule(step: int, total_steps: int, warmup: int) -> float:
    """Learning-rate factor at `step`: linear warm-up over `warmup` steps, then a cosine
    from 1 down to 0 at total_steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def progress_bar(step: int, total: int, width: int = 20) -> str:
    """A text bar: '[#####---------------]  25/100'."""
    done = width * step // total
    return f"[{'#' * done}{'-' * (width - done)}] {step:>{len(str(total))}}/{total}"


def token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the positions whose target is not IGNORE."""
    return F.cross_entropy(rearrange(logits, "b n v -> (b n) v"), targets.flatten(),
                           ignore_index=IGNORE)  # fmt: skip


def save_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, history: History,
) -> None:  # fmt: skip
    """Everything a resumed run needs, as state_dicts and plain numbers."""
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "history": vars(history),
        },
        path,
    )


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[int, History]:  # fmt: skip
    """Load a checkpoint of `save_checkpoint` into model (and optimizer, scheduler);
    return the step it stopped at and its history. weights_only=True: only tensors and
    plain containers are unpickled, never arbitrary code."""
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state["step"], History(**state["history"])


def train(
    model: nn.Module,
    batches: Callable[[int], Batch],
    steps: int,
    *,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    warmup: int = 20,
    clip: float = 1.0,
    log_every: int = 25,
    checkpoint: str | Path | None = None,
    label: str = "",
) -> History:
    """Train `model` on batches(step) -> (inputs, targets) for `steps` steps.

    AdamW, warm-up then cosine decay, gradients clipped to norm `clip`. Every
    `log_every` steps it logs the batch's loss and answer accuracy and prints a
    progress line; with `checkpoint`, it saves there at each log and at the end, and
    if that file exists it resumes from it (the same batches follow, as `batches`
    depends on the step only).
    """
    require_positive_int("steps", steps)
    require_positive_int("log_every", log_every)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_schedule(step, steps, warmup)
    )
    start, history = 0, History()
    if checkpoint is not None and Path(checkpoint).exists():
        start, history = load_checkpoint(checkpoint, model, optimizer, scheduler)
    model.train()
    began = time.perf_counter() - history.seconds
    for step in range(start, steps):
        inputs, targets = batches(step)
        logits = model(inputs)
        loss = token_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.steps.append(step + 1)
            history.losses.append(loss.item())
            history.accuracies.append(answer_accuracy(logits.detach(), targets).item())
            history.seconds = time.perf_counter() - began
            print(
                f"{label} {progress_bar(step + 1, steps)}  loss {history.losses[-1]:.3f}  "
                f"acc {history.accuracies[-1]:.2f}  {history.seconds:.0f} s",
                flush=True,
            )
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, optimizer, scheduler, step + 1, history)
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> tuple[float, float]:
    """Mean loss and answer accuracy of `model` over held-out batches."""
    model.eval()
    losses, accuracies = [], []
    for inputs, targets in batches:
        logits = model(inputs)
        losses.append(token_loss(logits, targets).item())
        accuracies.append(answer_accuracy(logits, targets).item())
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


# ---- real text: the standard library's source, character by character ---------------------

# Newline, then printable ASCII; any other character reads as "?".
CHARACTERS = "\n" + "".join(chr(code) for code in range(32, 127))
_INDEX = {char: index for index, char in enumerate(CHARACTERS)}


def python_source_text(num_chars: int, folder: str | Path | None = None) -> str:
    """The first `num_chars` characters of the .py files directly in `folder` (the
    standard library by default), in sorted file order: real text on every machine,
    offline. (It differs between Python versions.)"""
    require_positive_int("num_chars", num_chars)
    folder = Path(sysconfig.get_paths()["stdlib"] if folder is None else folder)
    parts, total = [], 0
    for path in sorted(folder.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= num_chars:
            break
    if total < num_chars:
        raise ValueError(
            f"{folder} holds {total} characters of .py files, asked num_chars={num_chars}"
        )
    return "".join(parts)[:num_chars]


def encode(text: str) -> Tensor:
    """Characters -> (len,) long ids in CHARACTERS; tabs become 4 spaces, others "?"."""
    text = text.replace("\t", "    ")
    unknown = _INDEX["?"]
    return torch.tensor([_INDEX.get(char, unknown) for char in text], dtype=torch.long)


def decode(ids: Tensor) -> str:
    """(len,) ids -> text."""
    return "".join(CHARACTERS[i] for i in ids.tolist())


def text_batch(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
    """Random windows of `data` (len,): inputs (b, seq_len) and, one character later, the
    targets (b, seq_len): next-character prediction at every position. `generator` is a
    CPU generator wherever data lies."""
    require_positive_int("batch_size", batch_size)
    require_positive_int("seq_len", seq_len)
    if data.numel() <= seq_len:
        raise ValueError(f"data has {data.numel()} tokens, needs more than seq_len={seq_len}")
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = data[(starts[:, None] + offsets).to(data.device)]  # (b, seq_len + 1)
    return windows[:, :-1], windows[:, 1:]


# ---- inside a trained model --------------------------------------------------------------


@torch.no_grad()
def layer_inputs(model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """The residual stream (b, n, dim) entering each layer's attention of a
    TinyTransformer, captured by forward pre-hooks during one forward pass."""
    captured: list[Tensor] = []
    hooks = [
        attention.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        for attention, _ in model.layers
    ]
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _require_sparse(layer: nn.Module) -> None:
    if not isinstance(layer, SparseAttention):
        raise TypeError(f"layer must be a SparseAttention, got {type(layer).__name__}")


@torch.no_grad()
def block_importance(layer: SparseAttention, x: Tensor) -> Tensor:
    """What the selection branch ranks for input x (b, n, dim): each query's importance
    of each selection block (Eq. 8-10), (b, h_sel, n, w); h_sel = kv_heads when query
    heads share their selection (the default). Rows sum to at most 1; a block a query
    may not select (its own, later ones) scores 0."""
    _require_sparse(layer)
    q, k, v = layer.project_heads(layer.norm(x))
    ck, cv = layer.compressed_tokens(k, v)
    memory_k, memory_v = layer.compress_mem_kv
    _, logits = compressed_attention(
        q, prepend_memory(ck, memory_k), prepend_memory(cv, memory_v),
        layer.num_mem_compress_kv, layer.compress_block_sliding_stride, True, layer.scale,
    )  # fmt: skip
    return importance_scores(
        logits, layer.num_mem_compress_kv, layer.compress_block_sliding_stride,
        layer.selection_block_size, layer._selection_group,
        layer.interpolated_importance_score, True,
    )  # fmt: skip


@torch.no_grad()
def selected_blocks(layer: SparseAttention, x: Tensor) -> tuple[Tensor, Tensor]:
    """The selection branch's picks for input x (b, n, dim): (values, indices), each
    (b, h_sel, n, s), best block first, as the layer's forward pass takes them."""
    _require_sparse(layer)
    q, k, v = layer.project_heads(layer.norm(x))
    _, top = layer.compressed_branch(q, *layer.compressed_tokens(k, v))
    return top


def top_selected_block(importance: Tensor, queries: Tensor, block_size: int) -> Tensor:
    """The block each head ranks first at one query per sequence: importance (b, h, n, w)
    from `block_importance`, queries (b,) positions -> (b, h) long, -1 where the head
    selects nothing. Candidates are the blocks before the query's own block whose
    importance is above SELECTED_THRESHOLD, ranked by the layer's own top-k (which leaves
    the order of exact ties open; real importances do not tie)."""
    rows = torch.arange(importance.shape[0], device=importance.device)
    scores = importance[rows, :, queries]  # (b, h, w): sequence r at its query queries[r]
    blocks = torch.arange(scores.shape[-1], device=importance.device)
    before_own = blocks < rearrange(queries // block_size, "b -> b 1 1")  # (b, 1, w)
    values, indices = top_blocks(scores.masked_fill(~before_own, 0.0), 1)  # (b, h, 1)
    picked = values[..., 0] > SELECTED_THRESHOLD
    return torch.where(picked, indices[..., 0], torch.full_like(indices[..., 0], -1))


@torch.no_grad()
def branch_gates(layer: SparseAttention, x: Tensor) -> Tensor:
    """Eq. 5's gates for input x (b, n, dim): (b, h, n, 3), compressed, selected, sliding."""
    _require_sparse(layer)
    return layer.to_strategy_combine(layer.norm(x))
