"""Notebook 11's character-level language model, longer and at long context, on a GPU.

Run on a CUDA machine from the repository root:

    python benchmarks/capstone_lm_gpu.py --out benchmarks/capstone_lm_gpu.json

Three TinyTransformers that differ only in attention (NSA with its Triton kernels,
full causal attention through SDPA, the sliding window alone) train on the Python
standard library's own source, character by character, with the same seeds, batches and
schedule as nsa_tutorial.training.train (float32, TF32 matmuls). Each variant runs
`--steps` steps or `--max-seconds` seconds after the first WARMUP_STEPS (which compile),
whichever comes first. The record holds, per
variant, the loss every 25 steps, the median time per step (after the first steps, which
compile), the validation loss and a greedy sample. It is written after each variant, so a
run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_run import run_record  # noqa: E402

from nsa_tutorial.model import TinyTransformer  # noqa: E402
from nsa_tutorial.training import (  # noqa: E402
    CHARACTERS,
    cosine_schedule,
    decode,
    encode,
    python_source_text,
    text_batch,
    token_loss,
)

MODEL = dict(dim=256, depth=4)
ATTENTION = dict(
    dim_head=64, heads=8, kv_heads=2, sliding_window_size=128, compress_block_size=32,
    compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=8,
    compress_mlp_expand_factor=0.25,  # at 1.0 the two compression MLPs hold 8M weights a layer
)  # fmt: skip
TRAINING = dict(seq_len=4096, batch_size=8, lr=1e-3, warmup=50, clip=1.0, weight_decay=0.01)
CORPUS_CHARS = 4_000_000
WARMUP_STEPS = 5  # steps left out of the time per step: the first ones compile kernels


def make_model(kind: str, device: torch.device) -> TinyTransformer:
    """The same seed and sizes for every kind; NSA runs its Triton kernels."""
    torch.manual_seed(0)
    options = ATTENTION | ({"use_triton_kernel": True} if kind == "nsa" else {})
    return TinyTransformer(len(CHARACTERS), attention=kind, **MODEL, **options).to(device)


def train_variant(
    kind: str, data: tuple[torch.Tensor, torch.Tensor], steps: int, max_seconds: float
) -> dict:
    """Train one variant; its losses, time per step, validation loss and a sample."""
    train_data, val_data = data
    device = train_data.device
    model = make_model(kind, device)
    config = TRAINING
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(cosine_schedule, total_steps=steps, warmup=config["warmup"])
    )
    draw = partial(text_batch, train_data, config["batch_size"], config["seq_len"])
    losses, step_seconds = [], []
    began = time.perf_counter()
    for step in range(steps):
        tick = time.perf_counter()
        inputs, targets = draw(torch.Generator().manual_seed(step))
        loss = token_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["clip"])
        optimizer.step()
        scheduler.step()
        torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - tick)
        if (step + 1) % 25 == 0 or step == 0:
            losses.append({"step": step + 1, "loss": loss.item()})
            print(kind, losses[-1], f"{time.perf_counter() - began:.0f} s", flush=True)
        if step + 1 == WARMUP_STEPS:  # the time limit counts training, not compiling
            began = time.perf_counter()
        if step + 1 >= WARMUP_STEPS and time.perf_counter() - began > max_seconds:
            break
    trained = time.perf_counter() - began
    model.eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        batches = [text_batch(val_data, 4, config["seq_len"], generator) for _ in range(4)]
        val = [token_loss(model(x), y).item() for x, y in batches]
        prompt = val_data[None, : config["seq_len"] // 4]
        sample = model.sample(prompt, 200, temperature=0.0, use_cache=False)
    return {
        "steps": len(step_seconds),
        "seconds_after_warmup": trained,
        "ms_per_step": 1e3 * statistics.median(step_seconds[WARMUP_STEPS:] or step_seconds),
        "first_steps_s": sum(step_seconds[:WARMUP_STEPS]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "losses": losses,
        "val_loss": sum(val) / len(val),
        "prompt_tail": decode(prompt[0, -200:].cpu()),
        "sample": decode(sample[0].cpu()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--max-seconds", type=float, default=45.0, help="per variant")
    parser.add_argument("--kinds", nargs="*", default=["nsa", "full", "window"])
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    data = encode(python_source_text(CORPUS_CHARS)).to(device)
    split = int(0.95 * data.numel())
    record = run_record(
        model=MODEL, attention=ATTENTION, training=TRAINING, corpus_chars=CORPUS_CHARS,
        steps_asked=args.steps, max_seconds=args.max_seconds, results={},
    )  # fmt: skip
    for kind in args.kinds:
        try:
            record["results"][kind] = train_variant(
                kind, (data[:split], data[split:]), args.steps, args.max_seconds
            )
        except Exception as error:  # keep the other variants' results
            record["results"][kind] = {"error": f"{type(error).__name__}: {error}"}
            print(kind, "failed:", record["results"][kind]["error"], flush=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
