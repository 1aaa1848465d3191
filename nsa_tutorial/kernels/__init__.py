"""Triton kernels (notebooks 08-09) and the runtime set-up they need.

Without a CUDA GPU, Triton runs kernels in its interpreter, on the CPU, when
TRITON_INTERPRET=1 is set before Triton is imported: this package sets it, so the
same kernels run everywhere (slowly without a GPU). Where Triton is not installed
(macOS), `TRITON_AVAILABLE` is False; the rest of nsa_tutorial does not need Triton.
"""

from __future__ import annotations

import os
import sys

import torch

# Triton's own helpers (those behind tl.sum, tl.max, ...) are made when Triton is
# imported; imported before TRITON_INTERPRET=1 is set, they cannot run in the interpreter.
INTERPRETER_TOO_LATE = (
    not torch.cuda.is_available()
    and "triton" in sys.modules
    and os.environ.get("TRITON_INTERPRET") != "1"
)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401  (imported here, after TRITON_INTERPRET is settled)

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False


def triton_mode() -> str:
    """ "compiled" (CUDA GPU), "interpreter" (CPU) or "missing" (Triton not installed)."""
    if not TRITON_AVAILABLE:
        return "missing"
    return "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled"


def require_runnable_kernels() -> None:
    """Raise a clear error where Triton kernels cannot run (see INTERPRETER_TOO_LATE)."""
    if INTERPRETER_TOO_LATE:
        raise RuntimeError(
            "Triton was imported before nsa_tutorial could switch on its interpreter "
            "(TRITON_INTERPRET=1), so Triton kernels cannot run on this CPU: import "
            "nsa_tutorial before any package that imports triton, or set TRITON_INTERPRET=1 "
            "before starting Python"
        )


def require_kernel_device(**tensors: torch.Tensor | None) -> None:
    """The named tensors a kernel reads (None: an absent optional one) must share a device,
    and where Triton compiles, that device is the GPU (CPU tensors run in the interpreter)."""
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        *first, last = given
        raise ValueError(
            f"{', '.join(first)} and {last} must be on one device, got {sorted(map(str, devices))}"
        )
    (device,) = devices
    if triton_mode() == "compiled" and device.type != "cuda":
        raise ValueError(
            f"with a GPU, Triton compiles the kernels for it: move the tensors to the GPU "
            f"(they are on {device})"
        )


def require_kernel_dtype(name: str, t: torch.Tensor) -> None:
    """Tensor `name` must be float32, float16 or bfloat16, the dtypes the kernels compute in."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_attention_tensors(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str],
    k_shape: tuple[str, ...],
) -> None:  # fmt: skip
    """The rules every kernel here relies on, checked before anything launches: q
    (b, hq, n, d) and keys, values named `names` of shape `k_shape` (letters b, n, d must
    match q's; "n" only when the keys are the tokens themselves), all 4-D, non-empty,
    float32, float16 or bfloat16 of one dtype, hq a multiple of hk, 16 <= d <= 256."""
    k_name, v_name = names
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (b, h, n, d), got shape {tuple(t.shape)}")
        require_kernel_dtype(name, t)
        if 0 in t.shape:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"{k_name} and {v_name} must have the same shape, got {tuple(k.shape)} and "
            f"{tuple(v.shape)}"
        )
    b, hq, n, d = q.shape
    sizes = {"b": b, "n": n, "d": d}
    expected = [str(sizes.get(letter, letter)) for letter in k_shape]
    fixed = [(str(size), want) for size, want in zip(k.shape, expected, strict=True)]
    if any(size != want for size, want in fixed if want.isdigit()):
        raise ValueError(
            f"{k_name} must be ({', '.join(k_shape)}) = ({', '.join(expected)}) like q, "
            f"got {tuple(k.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, {k_name} and {v_name} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if hq % k.shape[1]:
        raise ValueError(
            f"the query heads must be a multiple of the kv heads, got hq={hq}, hk={k.shape[1]}"
        )
    if not 16 <= d <= 256:
        raise ValueError(f"the head dimension must be between 16 and 256, got d={d}")


def __getattr__(name: str):
    """`nsa_tutorial.kernels.selection_attention`, imported on first use so that the rest
    of the package works without Triton."""
    if name == "compressed_attention" and TRITON_AVAILABLE:  # the compressed branch (notebook 10)
        from nsa_tutorial.kernels.compressed import compressed_attention
        return compressed_attention
    if name != "selection_attention":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not TRITON_AVAILABLE:
        raise ImportError(
            "nsa_tutorial.kernels.selection_attention needs Triton, which is not installed "
            "here; SparseAttention's default PyTorch path computes the same numbers"
        )
    from nsa_tutorial.kernels.selection import selection_attention

    return selection_attention
