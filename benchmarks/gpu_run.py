"""What the GPU benchmark scripts share: the peak memory of one call, and the facts of
the run that every JSON record starts with."""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable

import torch
import triton


def peak_gib(fn: Callable[[], object]) -> float:
    """GiB that one call of fn allocates above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def run_record(**fields: object) -> dict:
    """The command that ran, the device and the versions, then `fields`."""
    return {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        **fields,
    }
