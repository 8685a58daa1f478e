"""torchrun / DistributedDataParallel plumbing, shared by every stage that runs a backbone.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything is one process (``Dist()``). nccl on a
GPU, gloo on a CPU. Only rank 0 writes files, takes the experiment lock and logs progress; inference shards the
images over the ranks and gathers the parts once (``shard`` / ``gather``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..store.errors import env_number

log = logging.getLogger("pawpular")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            import torch

            torch.distributed.barrier()

    def shard(self, n: int) -> np.ndarray:
        """The item positions this rank handles: every world-th from its rank."""
        return np.arange(self.rank, n, self.world)

    def gather(self, idx: np.ndarray, part: np.ndarray | None, n: int) -> np.ndarray | None:
        """Every rank's (positions, rows) put back in order; every rank gets the whole array.

        A rank with no positions (more ranks than items) sends None for its rows; None from every rank: None.
        """
        if not self.enabled:
            return part
        import torch

        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, (idx, part))
        rows = [p for i, p in parts if len(i) and p is not None]
        if not rows:
            return None
        whole = np.empty((n, *rows[0].shape[1:]), dtype=rows[0].dtype)
        for i, p in parts:
            if len(i):
                whole[i] = p
        return whole

    def mean(self, value: float, device: Any) -> float:
        """The mean of a scalar over ranks (every rank logs and records the same number)."""
        if not self.enabled:
            return value
        import torch

        t = torch.tensor([value], device=device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world


def is_lead_process() -> bool:
    """False in the non-zero ranks of a torchrun launch."""
    return env_number("RANK", 0) == 0


def current() -> Dist:
    """The launch's Dist (a started process group, or one process)."""
    world = int(env_number("WORLD_SIZE", 1))
    if world <= 1:
        return Dist()
    return Dist(int(env_number("RANK", 0)), world, int(env_number("LOCAL_RANK", 0)))


def _join(dist: Dist, device: str) -> None:
    """This rank in the launch's process group. The first distributed stage of the process starts it, and it stays up
    for the process's later stages (ended at exit): a group started again in a process that ended one can hang in
    its rendezvous (seen with gloo). Starting it ends at a barrier, and a later stage joins it at one:
    no rank reads a stage's upstream before rank 0 has finished what came before (``torchrun ... all``: rank 0 runs
    folds before train, and svr and ensemble after embed, alone)."""
    import torch

    if device == "cuda":
        torch.cuda.set_device(dist.local_rank)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        return
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    atexit.register(_end)
    torch.distributed.barrier()  # the meeting itself: nccl's init returns at once (gloo's waits for every rank)


def _end() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str, distributed: bool = True) -> Iterator[Dist]:
    """This rank in the process group for the block when launched by torchrun (see ``_join``).

    ``distributed`` False: a stage that rank 0 runs alone (folds, svr, ensemble, ...) gets ``Dist()`` and no group.
    """
    dist, level = current(), log.level  # the launch's variables checked for any stage
    if not distributed:
        yield Dist()
        return
    if dist.enabled:
        import torch

        _join(dist, device)
        log.info(
            "DDP: rank %d of %d (local rank %d, %s)",
            dist.rank,
            dist.world,
            dist.local_rank,
            torch.distributed.get_backend(),
        )
        if not dist.main:  # one voice: progress and summaries come from rank 0
            log.setLevel(logging.WARNING)
    try:
        yield dist
    finally:
        log.setLevel(level)  # each stage's group starts with every rank saying it joined


def torch_device(device: str, dist: Dist) -> Any:
    """This rank's torch.device for the resolved device name."""
    import torch

    return torch.device(f"cuda:{dist.local_rank}" if device == "cuda" else "cpu")
