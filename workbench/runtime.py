"""Where training runs: torch threads, device, and the ranks of a multi-process launch."""

from __future__ import annotations

import os

from workbench.errors import WorkbenchError


def configure_torch_threads() -> int:
    """One intra-op thread per core this process may run on (cgroup/affinity aware), shared among local ranks."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # Processes launched together on one machine share its cores (LOCAL_WORLD_SIZE is set by torchrun/accelerate).
    threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def resolve_device(requested: str) -> str:
    """`auto` picks CUDA when present; asking for CUDA on a machine without it is a config error."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError("device: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    if requested == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per process of a multi-process launch
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return requested


# --- multi-process training (`accelerate launch`, torchrun) --------------------------------------------------
# Processes launched together see WORLD_SIZE/RANK; every rank runs the same stage code, rank 0 alone writes to
# the tracking store (`workbench.tracking.Tracker.start` hands the other ranks a `ReplicaTracker`).


def join_process_group(device: str) -> None:
    """Join the process group of a multi-process launch (gloo on CPU, NCCL on GPUs); nothing for one process.

    accelerate's `PartialState` reads the launcher's environment; `cpu=True` is what makes several CPU processes
    one gloo group rather than independent runs (accelerate.state.PartialState._prepare_backend).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState(cpu=device == "cpu")


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) for a single process."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def _collective_device() -> str:
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL only moves GPU tensors


def broadcast_flags(*flags: bool) -> list[bool]:
    """Rank 0's flags on every rank (the flags unchanged for a single process)."""
    if not distributed():
        return list(flags)
    import torch
    import torch.distributed as dist

    shared = torch.tensor(flags, dtype=torch.uint8, device=_collective_device())
    dist.broadcast(shared, src=0)
    return [bool(v) for v in shared.tolist()]


def broadcast_text(text: str, length: int = 64) -> str:
    """Rank 0's short ASCII string (a run id) on every rank, as bytes in a tensor: no pickled objects."""
    if not distributed():
        return text
    import torch
    import torch.distributed as dist

    data = text.encode("ascii")[:length].ljust(length, b"\0")
    shared = torch.tensor(list(data), dtype=torch.uint8, device=_collective_device())
    dist.broadcast(shared, src=0)
    return bytes(shared.tolist()).rstrip(b"\0").decode("ascii")


def all_reduce_sum(*values: float) -> list[float]:
    """Sums over ranks (float64), for metrics each rank measured on its shard."""
    if not distributed():
        return list(values)
    import torch
    import torch.distributed as dist

    shared = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(shared)
    return shared.tolist()


def wait_for_everyone() -> None:
    if distributed():
        import torch.distributed as dist

        dist.barrier()
