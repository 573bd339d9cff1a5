"""Joining torchrun's process group, each rank's device, and a training batch split over the ranks."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT = timedelta(minutes=10)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def join_process_group(device: str, timeout: timedelta = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) unless already in one; (rank, world).

    A process group the caller created keeps its own timeout.
    """
    if not dist.is_initialized():
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"DistributedSAETrainingRunner runs as one rank of several, and the environment lacks {missing}: "
                "start the script with `torchrun --nproc-per-node N script.py`, or call "
                "torch.distributed.init_process_group yourself first. On one device use "
                "LanguageModelSAETrainingRunner."
            )
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def rank_device(device: str) -> str:
    """CUDA ranks each take their own GPU (torchrun's LOCAL_RANK) and make it current; CPU ranks share the CPU."""
    if torch.device(device).type != "cuda":
        return device
    n_gpus = torch.cuda.device_count()
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else dist.get_rank() % max(n_gpus, 1)
    if local_rank >= n_gpus:
        raise RuntimeError(
            f"LanguageModelSAERunnerConfig.device={device!r}, but this rank's GPU (local rank {local_rank}) is not "
            f"among the {n_gpus} visible GPUs: start at most {n_gpus} ranks per machine, or set device='cpu'."
        )
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


class ReplicaParts:
    """A training batch split over the ranks of a process group, one part per rank (``BatchParts``)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def sum(self, values: Tensor) -> Tensor:
        dist.all_reduce(values, group=self.group)
        return values

    def concat(self, rows: Tensor) -> Tensor:
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, rows.contiguous(), group=self.group)
        return torch.cat(parts)

    def owner(self, part: int) -> str:
        return f"rank {part}'s"


def world_group() -> dist.ProcessGroup:
    group = dist.group.WORLD
    if group is None:
        raise RuntimeError("No torch.distributed process group is initialised: start the run with torchrun.")
    return group
