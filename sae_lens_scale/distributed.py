"""Data-parallel training across processes: SAELens's unchanged runner and trainer, one process per device under
``torchrun``, with torch's DistributedDataParallel averaging the gradients.

Every rank holds the whole SAE and reads a disjoint shard of the token dataset. ``train_batch_size_tokens`` is each
rank's batch, so the global batch is ``world_size`` times it, and ``training_tokens`` counts all ranks together: N
ranks with batch B / N train as one process with batch B. What makes them the same SAE:

- DistributedDataParallel broadcasts rank 0's initial weights and averages every gradient during backward, so every
  rank clips the same (global) gradient norm and takes the same Adam step;
- the routed SAEs reduce what their losses need from the whole batch (expert fractions, dead latents, the loss
  guard) and set their biases from every rank's first batch (``RoutedTrainingSAE.data_parallel_group``);
- the activation-norm scaling factor is the mean of the ranks' estimates.

Rank 0 alone logs to wandb, writes checkpoints and writes the final SAELens folder. A failed rank ends the job:
torchrun stops the others, and every collective has a timeout, so no rank waits forever.

With ``expert_parallel=True`` in the routed SAE's config the same runner splits the experts over the ranks instead
of replicating them (``sae_lens_scale.expert_parallel``): checkpoints are then written per rank, and the final folder
holds the whole SAE, gathered on rank 0.

    torchrun --nproc-per-node 8 examples/train_gpt2_scale.py ...   # a script that runs, on every rank:
    DistributedSAETrainingRunner(cfg).run()
"""

import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sae_lens_scale.expert_parallel import gathered_state_dict
from sae_lens_scale.routed_sae import RoutedTrainingSAE

DEFAULT_TIMEOUT = timedelta(minutes=10)


def init_data_parallel(device: str, timeout: timedelta = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) unless already in one; (rank, world)."""
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def rank_device(device: str) -> str:
    """CUDA ranks each take their own GPU (torchrun's LOCAL_RANK); CPU ranks share the CPU."""
    if torch.device(device).type != "cuda":
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


class _TrainingPass(nn.Module):
    """The SAE's training pass as a module's forward: DistributedDataParallel only syncs gradients of a backward that
    follows its own forward."""

    def __init__(self, sae: TrainingSAE[Any]) -> None:
        super().__init__()
        self.sae = sae
        self.training_forward_pass = sae.training_forward_pass

    def forward(self, step_input: TrainStepInput) -> TrainStepOutput:
        return self.training_forward_pass(step_input)


def replicate_training_pass(sae: TrainingSAE[Any], group: dist.ProcessGroup | None = None) -> None:
    """Make ``sae`` one data-parallel replica: its training pass goes through DistributedDataParallel.

    SAELens's trainer calls ``sae.training_forward_pass`` and then ``loss.backward()``; the pass is rerouted exactly as
    SAELens's own ``compile_sae`` reroutes it through ``torch.compile``, and DDP averages the gradients over ``group``
    during that backward. Works for any SAELens architecture; the routed ones also reduce their batch statistics.
    """
    device = next(sae.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    replica = DistributedDataParallel(_TrainingPass(sae), device_ids=device_ids, process_group=group)
    sae.training_forward_pass = replica.__call__  # type: ignore[method-assign]
    if isinstance(sae, RoutedTrainingSAE):
        sae.data_parallel_group = group or dist.group.WORLD


def shard(dataset: Any, rank: int, world_size: int) -> Any:
    """This rank's disjoint part of a Hugging Face ``Dataset`` or ``IterableDataset`` (``dataset.shard``)."""
    return dataset.shard(num_shards=world_size, index=rank)


def rank_config(
    cfg: LanguageModelSAERunnerConfig[Any], rank: int, world_size: int
) -> LanguageModelSAERunnerConfig[Any]:
    """This rank's share of the run: its device, its part of ``training_tokens``; outputs and logging on rank 0 only."""
    if cfg.training_tokens % (world_size * cfg.train_batch_size_tokens):
        raise ValueError(
            f"LanguageModelSAERunnerConfig.training_tokens={cfg.training_tokens} is not a whole number of global "
            f"batches of {world_size} ranks x train_batch_size_tokens={cfg.train_batch_size_tokens}; use a multiple "
            f"of {world_size * cfg.train_batch_size_tokens}."
        )
    device = rank_device(cfg.device)
    changes: dict[str, Any] = {"training_tokens": cfg.training_tokens // world_size}
    for field in ("device", "llm_device", "act_store_device"):
        if getattr(cfg, field) == cfg.device:
            changes[field] = device
    if rank != 0:
        changes["logger"] = replace(cfg.logger, log_to_wandb=False)
    checkpoint_path = cfg.checkpoint_path
    if getattr(cfg.sae, "expert_parallel", False):
        # Every rank saves its own experts: checkpoints in rank-<r> folders, resumed from rank 0's sibling folder.
        if checkpoint_path is not None:
            checkpoint_path = f"{checkpoint_path}/rank-{rank}"
        if cfg.resume_from_checkpoint is not None:
            resumed = Path(cfg.resume_from_checkpoint)
            changes["resume_from_checkpoint"] = str(resumed.parent.parent / f"rank-{rank}" / resumed.name)
    elif rank != 0:
        checkpoint_path = None
        changes |= {"n_checkpoints": 0, "save_final_checkpoint": False, "output_path": None}
    share = replace(cfg, **changes)
    share.checkpoint_path = checkpoint_path  # set after: the config's __post_init__ appends a fresh run id to it
    return share


class DataParallelRankError(RuntimeError):
    """One rank of a data-parallel run failed; the message names the rank and its error, which is chained."""


class DistributedSAETrainingRunner(LanguageModelSAETrainingRunner):
    """SAELens's ``LanguageModelSAETrainingRunner`` as one rank of a data-parallel run; start one per device with
    ``torchrun`` (module docstring). Same arguments, plus ``timeout`` for every collective."""

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        override_dataset: Any = None,
        override_model: Any = None,
        override_sae: TrainingSAE[Any] | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ):
        self.rank, self.world_size = init_data_parallel(cfg.device, timeout)
        if cfg.sae.normalize_activations == "covariance_whitening":
            raise ValueError(
                "LanguageModelSAERunnerConfig.sae.normalize_activations='covariance_whitening' is estimated per "
                "process, so the ranks would whiten differently; use 'expected_average_only_in' or 'none'."
            )
        if cfg.checkpoint_path is not None:  # each process drew its own run id; use rank 0's everywhere
            shared = [cfg.checkpoint_path]
            dist.broadcast_object_list(shared, src=0)
            cfg.checkpoint_path = shared[0]
        cfg = rank_config(cfg, self.rank, self.world_size)
        if override_dataset is not None:
            override_dataset = shard(override_dataset, self.rank, self.world_size)
        super().__init__(
            cfg, override_dataset=override_dataset, override_model=override_model, override_sae=override_sae
        )
        if override_dataset is None:
            self.activations_store.dataset = shard(self.activations_store.dataset, self.rank, self.world_size)

    def run(self) -> TrainingSAE[Any]:
        """SAELens's run on this rank; an error on it ends the job as :class:`DataParallelRankError`."""
        try:
            return super().run()
        except Exception as error:
            raise DataParallelRankError(
                f"rank {self.rank} of {self.world_size} failed: {type(error).__name__}: {error}"
            ) from error

    def run_trainer_with_interruption_handling(self, trainer: SAETrainer[Any, Any]) -> TrainingSAE[Any]:
        """Before training: one activation scale for all ranks, then (data parallel) the SAE's training pass
        replicated with DDP; an expert-parallel SAE synchronises its own gradients."""
        if self.sae.cfg.normalize_activations == "expected_average_only_in":
            share_activation_scale(trainer)
        if not (isinstance(self.sae, RoutedTrainingSAE) and self.sae.expert_shard is not None):
            replicate_training_pass(self.sae)
        return super().run_trainer_with_interruption_handling(trainer)

    def save_final_sae(
        self, sae: TrainingSAE[Any], output_path: str, log_feature_sparsity: torch.Tensor | None = None
    ) -> None:
        """SAELens's final save, on rank 0; an expert-parallel SAE's experts are gathered there first (every rank
        takes part), so the folder holds one ordinary SAE."""
        if isinstance(sae, RoutedTrainingSAE) and sae.expert_shard is not None:
            full = gathered_state_dict(sae.state_dict(), sae.expert_shard)
            if self.rank != 0:
                return
            whole = type(sae)(replace(sae.cfg, expert_parallel=False, device="cpu"))
            whole.load_state_dict({name: tensor.cpu() for name, tensor in full.items()})
            whole.cfg.metadata = sae.cfg.metadata
            sae = whole
        super().save_final_sae(sae, output_path, log_feature_sparsity)


def share_activation_scale(trainer: SAETrainer[Any, Any]) -> None:
    """Each rank estimates the mean activation norm on its own shard; every rank then scales by their mean.

    A checkpoint's scale is kept (SAELens's trainer keeps it too); every rank loaded the same one.
    """
    scaler = trainer.activation_scaler
    d_in = trainer.sae.cfg.d_in
    if scaler.scaling_factor is None:
        scaler.estimate_scaling_factor(d_in, trainer.data_provider, trainer.cfg.n_batches_for_norm_estimate)
    mean_norm = torch.tensor(d_in**0.5 / (scaler.scaling_factor or 1.0), dtype=torch.float64, device=trainer.sae.device)
    dist.all_reduce(mean_norm)
    scaler.scaling_factor = d_in**0.5 / (mean_norm.item() / dist.get_world_size())
