"""An expert-parallel run's folders: per-rank checkpoints, the whole SAE gathered on rank 0, and a checkpoint's ranks
merged for one process."""

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_lens_scale.parallel.experts import ExpertShard
from sae_lens_scale.parallel.shards import SHARDED_DIMS


def rank_checkpoint(rank_0_checkpoint: Path, rank: int, world_size: int) -> Path:
    """The expert-parallel checkpoint of ``rank`` beside rank 0's, checked to come from ``world_size`` ranks."""
    run_folder = rank_0_checkpoint.parent.parent
    if rank_0_checkpoint.parent.name != "rank-0":
        raise ValueError(
            f"LanguageModelSAERunnerConfig.resume_from_checkpoint={str(rank_0_checkpoint)!r}: an expert-parallel "
            "run resumes from rank 0's checkpoint folder, <checkpoint_path>/<run id>/rank-0/<checkpoint>."
        )
    own = run_folder / f"rank-{rank}" / rank_0_checkpoint.name
    beyond = run_folder / f"rank-{world_size}" / rank_0_checkpoint.name
    if not own.is_dir() or beyond.is_dir():
        found = f"{beyond} exists" if beyond.is_dir() else f"{own} is missing"
        raise ValueError(
            f"LanguageModelSAERunnerConfig.resume_from_checkpoint={str(rank_0_checkpoint)!r} was not written by "
            f"{world_size} ranks ({found}). Each rank resumes its own experts: start as many ranks as wrote the "
            "checkpoint (its rank-<r> folders)."
        )
    return own


def gathered_state_dict(state_dict: dict[str, Tensor], shard: ExpertShard) -> dict[str, Tensor] | None:
    """The whole SAE's state in rank 0's CPU memory, None on the other ranks (a collective: every rank calls it).

    The shards travel to rank 0 one at a time, so no device ever holds more than its own shard and one received
    shard: the gathered SAE may be wider than a device holds.
    """
    full: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().contiguous()
        if name in SHARDED_DIMS:
            parts = [tensor.cpu()] if shard.rank == 0 else []
            for source in range(1, shard.world_size):
                if shard.rank == source:
                    dist.send(tensor, dst=0, group=shard.group)
                elif shard.rank == 0:
                    received = torch.empty_like(tensor)
                    dist.recv(received, src=source, group=shard.group)
                    parts.append(received.cpu())
            tensor = torch.cat(parts, dim=SHARDED_DIMS[name]) if parts else tensor
        if shard.rank == 0:
            full[name] = tensor.cpu()
    return full if shard.rank == 0 else None


def merge_checkpoint(rank_0_checkpoint: Path | str, output: Path | str) -> Path:
    """The whole training SAE of an expert-parallel checkpoint, merged from its per-rank folders for one process.

    ``rank_0_checkpoint`` is ``<checkpoint_path>/<run id>/rank-0/<checkpoint>``; every ``rank-<r>`` folder beside it
    holds that rank's experts under the same name. ``output`` gets the SAE's weights and config, which
    ``TrainingSAE.load_from_disk`` and ``sae_lens_scale.hub.load_sae`` open. The optimizer and trainer state stay per
    rank, so a run resumes from the per-rank checkpoint, not from the merge; the weights are in the training
    parametrisation (omega and unit-norm decoder rows not folded), and a mid-run checkpoint's activation scale stays
    in its ``activation_scaler.json``. The final folder of a run needs no merging: the runner gathers it.
    """
    rank_0 = Path(rank_0_checkpoint)
    rank_folders = [folder / rank_0.name for folder in rank_0.parent.parent.glob("rank-*")]
    ranked = sorted(
        (int(folder.parent.name.removeprefix("rank-")), folder) for folder in rank_folders if folder.is_dir()
    )
    if [rank for rank, _ in ranked] != list(range(len(ranked))) or rank_0.parent.name != "rank-0":
        raise FileNotFoundError(
            f"{rank_0} is not rank 0's checkpoint of a complete expert-parallel run: found the ranks "
            f"{[rank for rank, _ in ranked]} beside it, and the checkpoint must be <run>/rank-0/<name> with "
            "rank-0 ... rank-<N-1> folders holding <name>."
        )
    shards = [load_file(folder / SAE_WEIGHTS_FILENAME) for _, folder in ranked]
    merged = {
        name: torch.cat([shard[name] for shard in shards], dim=SHARDED_DIMS[name]) if name in SHARDED_DIMS else tensor
        for name, tensor in shards[0].items()
    }
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / SAE_WEIGHTS_FILENAME)
    shutil.copyfile(rank_0 / SAE_CFG_FILENAME, out / SAE_CFG_FILENAME)
    return out
