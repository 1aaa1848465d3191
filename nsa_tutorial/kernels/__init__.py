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


def __getattr__(name: str):
    """`nsa_tutorial.kernels.selection_attention`, imported on first use so that the rest
    of the package works without Triton."""
    if name != "selection_attention":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not TRITON_AVAILABLE:
        raise ImportError(
            "nsa_tutorial.kernels.selection_attention needs Triton, which is not installed "
            "here; SparseAttention's default PyTorch path computes the same numbers"
        )
    from nsa_tutorial.kernels.selection import selection_attention

    return selection_attention
