"""torch.distributed under ``torchrun``: data-parallel evaluation and sharded sweeps.

Nothing here does anything in a plain process (``WORLD_SIZE`` unset or 1). Under torchrun the process
group is gloo on the CPU and nccl on CUDA. Evaluation shards the dataset by whole batches of the
single-process partition (batch ``b`` goes to rank ``b % world``), so every batch is computed exactly as
one process would compute it, and the logits are gathered back into the original order: accuracy and
agreement are counted over the same logits, not averaged over ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch

TIMEOUT = datetime.timedelta(hours=12)  # sweep ranks wait for each other at the end
_LOCAL = [False]


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def session(device: torch.device | str = "cpu") -> Iterator[tuple[int, int]]:
    """Initialise the process group when launched by torchrun (and tear it down); yields (rank, world)."""
    rank, size = world()
    if size <= 1 or active():
        yield (torch.distributed.get_rank(), torch.distributed.get_world_size()) if active() else (0, 1)
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield rank, size
    finally:
        torch.distributed.destroy_process_group()


def shard() -> tuple[int, int]:
    """(rank, world size) that evaluation shards over: the active process group's, or (0, 1) without one or
    inside :func:`local`."""
    if _LOCAL[0] or not active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Evaluate on this rank alone (sweep ranks each run their own points)."""
    old, _LOCAL[0] = _LOCAL[0], True
    try:
        yield
    finally:
        _LOCAL[0] = old


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def is_main() -> bool:
    """True on rank 0 of the process group, and in a plain process."""
    return not active() or torch.distributed.get_rank() == 0


def batch_indices(n: int, batch_size: int, rank: int, size: int) -> tuple[list[int], list[int]]:
    """This rank's batches of the single-process partition of ``n`` items, and their item indices."""
    batches = list(range(rank, (n + batch_size - 1) // batch_size, size))
    items = [i for b in batches for i in range(b * batch_size, min((b + 1) * batch_size, n))]
    return batches, items


def reassemble(parts: list[tuple[list[int], list[torch.Tensor]]]) -> list[torch.Tensor]:
    """Concatenate per-batch tensors gathered from every rank back into batch order.

    parts: per rank, (batch ids, per-batch tensors).
    """
    by_batch = {b: t for ids, tensors in parts for b, t in zip(ids, tensors)}
    return [by_batch[b] for b in sorted(by_batch)]
