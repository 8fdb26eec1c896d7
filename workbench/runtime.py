"""Where training runs: torch threads and device."""

from __future__ import annotations

import os

from workbench.errors import WorkbenchError


def configure_torch_threads() -> int:
    """Use one intra-op thread per core this process may run on (cgroup/affinity aware)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def resolve_device(requested: str) -> str:
    """`auto` picks CUDA when present; asking for CUDA on a machine without it is a config error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError("device: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    return requested
