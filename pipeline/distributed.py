"""Several processes under ``torchrun``: PyTorch's own distributed engine
(``torch.distributed``), no scheduler of our own.

``torchrun --nproc_per_node=N -m sfmpairs train ...`` starts N processes (ranks) and
sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment; :func:`join`
reads them and joins the process group (NCCL on CUDA, gloo on CPU). Without torchrun
there is one rank and nothing is set up: the stages run exactly as in one process.

What the stages do with the ranks:

- extraction: each rank describes its contiguous share of the images
  (:meth:`Ranks.share`) and the shares are gathered in order (:meth:`Ranks.gather`), so
  every rank holds every descriptor (training mines the same tuples on every rank) or
  rank 0 alone writes them (``extract``);
- training: DistributedDataParallel; each rank takes its share of every batch of tuples;
- files: rank 0 alone writes (:attr:`Ranks.main`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run (one rank without torchrun).
    ``launched``: started by torchrun, so in a process group (with DDP) even as its only
    rank; ``local_world_size``: the ranks on this machine, which share its cores."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.launched

    def share(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """``[start, stop)`` of this rank's (or ``rank``'s) contiguous share of ``n``
        items: the first ``n % world_size`` ranks take one more."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def gather(self, value):
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def all_sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of ``values`` over the ranks."""
        return [float(x) for x in np.sum(self.gather(list(values)), axis=0)]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


ONE = Ranks()


def environment_ranks() -> Ranks:
    """The ranks torchrun describes in the environment (one rank without it)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return ONE
    env = os.environ
    return Ranks(
        int(env["RANK"]),
        int(env["WORLD_SIZE"]),
        int(env.get("LOCAL_RANK", "0")),
        True,
        int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
    )


def join(device_type: str) -> tuple[Ranks, bool]:
    """Join torchrun's process group, if there is one and it is not joined yet: NCCL for
    CUDA devices, gloo otherwise. Returns the ranks and whether this call joined (and
    so should :func:`leave`)."""
    ranks = environment_ranks()
    if not ranks.distributed:
        return ranks, False
    import torch.distributed as dist

    if dist.is_initialized():
        return ranks, False
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if not ranks.main:  # one log and one set of progress bars: rank 0's
        logging.getLogger("sfmpairs").setLevel(logging.WARNING)
    return ranks, True


def leave(joined: bool) -> None:
    if joined:
        import torch.distributed as dist

        dist.destroy_process_group()


def rank_device(device, ranks: Ranks):
    """Under torchrun on CUDA, each rank its own GPU (``cuda:LOCAL_RANK``)."""
    import torch

    from sfmpairs.common import SfmpairsError

    device = torch.device(device)
    if ranks.distributed and device.type == "cuda":
        if device.index is not None and ranks.local_world_size > 1:
            raise SfmpairsError(
                f"--device {device}: under torchrun each rank takes its own GPU (cuda:LOCAL_RANK); "
                f"give --device cuda (or auto)"
            )
        device = torch.device("cuda", ranks.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def default_workers(ranks: Ranks | None = None) -> int:
    """DataLoader workers by default: the machine's cores, less one, shared among the
    ranks on it, at most 4."""
    per_rank = (os.cpu_count() or 1) // (ranks or environment_ranks()).local_world_size
    return max(0, min(4, per_rank - 1))
