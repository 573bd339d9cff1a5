"""SAELens's own runner as one rank of a torchrun job: data parallel, or with the experts split over the ranks.

``train_batch_size_tokens`` is each rank's batch, so the global batch is ``world_size`` times it, and
``training_tokens`` counts all ranks together. Every rank scales its activations by one factor, from the mean of the
ranks' activation-norm estimates, and the final folder's firing statistics (its sparsity, L0 and dead count) pool
every rank's tokens. Rank 0 alone logs to wandb; a failed rank ends the job, and every collective has a timeout.

Data parallel (``sae_lens_scale.parallel.data``): rank 0 writes the checkpoints and the final folder; a resumed run
restores rank 0's checkpoint on every rank, firing statistics included, so for one dead-feature window after the
resume AuxK may count as dead a latent that only another rank saw fire. Expert parallel
(``sae_lens_scale.parallel.experts``): checkpoints are written per rank, and the final folder holds the whole SAE,
gathered into rank 0's CPU memory.
"""

import warnings
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.config import HfDataset
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens.hook_points import HookedRootModule

from sae_lens_scale.optimizers import OptimizerName, check_optimizer_choice
from sae_lens_scale.parallel.checkpoints import gathered_state_dict, rank_checkpoint
from sae_lens_scale.parallel.data import replicate_training_pass, shard_activation_store
from sae_lens_scale.parallel.experts import ShardedExperts
from sae_lens_scale.parallel.process_group import DEFAULT_TIMEOUT, join_process_group, rank_device
from sae_lens_scale.parallel.shards import expert_parallel_sae
from sae_lens_scale.training_runner import OptimizedSAETrainingRunner


def rank_config(
    cfg: LanguageModelSAERunnerConfig[Any], rank: int, world_size: int, *, expert_parallel: bool
) -> LanguageModelSAERunnerConfig[Any]:
    """This rank's share of the run: its device and its part of ``training_tokens``. Logging on rank 0 only; with
    data parallelism outputs on rank 0 only, with expert parallelism checkpoints per rank."""
    global_batch = world_size * cfg.train_batch_size_tokens
    if cfg.training_tokens % global_batch:
        raise ValueError(
            f"LanguageModelSAERunnerConfig.training_tokens={cfg.training_tokens} is not a whole number of global "
            f"batches of {world_size} ranks x train_batch_size_tokens={cfg.train_batch_size_tokens}; use a multiple "
            f"of {global_batch}."
        )
    n_steps = cfg.training_tokens // global_batch
    if cfg.lr_warm_up_steps + cfg.lr_decay_steps > n_steps:
        raise ValueError(
            f"LanguageModelSAERunnerConfig.lr_warm_up_steps={cfg.lr_warm_up_steps} + lr_decay_steps="
            f"{cfg.lr_decay_steps} exceed the run's {n_steps} steps: each of the {world_size} ranks steps once per "
            f"global batch of {global_batch} tokens. Count them in those steps, e.g. lr_decay_steps={n_steps // 5}."
        )
    device = rank_device(cfg.device)
    # The SAE is built on its config's device, and an expert-parallel SAE talks to the other ranks while it is
    # built (NCCL only moves CUDA tensors): build it on this rank's device, where the runner would move it anyway.
    changes: dict[str, Any] = {
        "training_tokens": cfg.training_tokens // world_size,
        "sae": replace(cfg.sae, device=device),
    }
    for field in ("device", "llm_device", "act_store_device"):
        if getattr(cfg, field) == cfg.device:
            changes[field] = device
    if rank != 0:
        changes["logger"] = replace(cfg.logger, log_to_wandb=False)
    checkpoint_path = cfg.checkpoint_path
    if expert_parallel:
        # Every rank saves its own experts: checkpoints in rank-<r> folders, resumed from rank 0's sibling folder.
        if checkpoint_path is not None:
            checkpoint_path = f"{checkpoint_path}/rank-{rank}"
        if cfg.resume_from_checkpoint is not None:
            changes["resume_from_checkpoint"] = str(rank_checkpoint(Path(cfg.resume_from_checkpoint), rank, world_size))
    elif rank != 0:
        checkpoint_path = None
        changes |= {"n_checkpoints": 0, "save_final_checkpoint": False, "output_path": None}
    share = replace(cfg, **changes)
    share.checkpoint_path = checkpoint_path  # set after: the config's __post_init__ appends a fresh run id to it
    return share


class DataParallelRankError(RuntimeError):
    """One rank of a torchrun job (data or expert parallel) failed; the message names the rank and its error, which
    is chained."""


class DistributedSAETrainingRunner(OptimizedSAETrainingRunner):
    """SAELens's ``LanguageModelSAETrainingRunner`` as one rank of a torchrun job; start one per device (module
    docstring). Same arguments and ``optimizer`` choice as ``OptimizedSAETrainingRunner``, plus ``timeout`` for every
    collective and ``expert_parallel``: split the routed SAE's experts over the ranks, each holding
    ``n_experts / world_size`` of them and their optimizer state, so the SAE can be wider than one device holds. The
    runner then builds the SAE itself (``expert_parallel_sae``)."""

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_sae: TrainingSAE[Any] | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
        expert_parallel: bool = False,
        optimizer: OptimizerName = "adam",
    ) -> None:
        if expert_parallel and (override_sae is not None or cfg.from_pretrained_path is not None):
            given = "override_sae" if override_sae is not None else "LanguageModelSAERunnerConfig.from_pretrained_path"
            raise ValueError(
                f"expert_parallel=True builds each rank's share of a fresh SAE, so it cannot also take {given}: "
                "resume an expert-parallel run with resume_from_checkpoint, or train that SAE without expert_parallel."
            )
        check_optimizer_choice(optimizer, cfg.sae)
        if expert_parallel and optimizer == "adam_row_sparse":
            raise ValueError(
                "optimizer='adam_row_sparse' with expert_parallel=True is not supported: the experts' rows are "
                "exchanged between ranks in the decode. Use optimizer='adam_fused' with expert_parallel."
            )
        self.expert_parallel = expert_parallel
        self.rank, self.world_size = join_process_group(cfg.device, timeout)
        rank_device(cfg.device)  # before the first collective: NCCL runs it on the current GPU
        if cfg.sae.normalize_activations == "covariance_whitening":
            raise ValueError(
                "LanguageModelSAERunnerConfig.sae.normalize_activations='covariance_whitening' is estimated per "
                "process, so the ranks would whiten differently; use 'expected_average_only_in' or 'none'."
            )
        if cfg.checkpoint_path is not None:  # each process drew its own run id; use rank 0's everywhere
            shared = [cfg.checkpoint_path]
            dist.broadcast_object_list(shared, src=0)
            cfg.checkpoint_path = shared[0]
        cfg = rank_config(cfg, self.rank, self.world_size, expert_parallel=expert_parallel)
        if expert_parallel:
            override_sae = expert_parallel_sae(TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()))
        super().__init__(
            cfg,
            override_dataset=override_dataset,
            override_model=override_model,
            override_sae=override_sae,
            optimizer=optimizer,
        )
        shard_activation_store(self.activations_store, self.rank, self.world_size)

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
        replicated with DDP; an expert-parallel SAE synchronises its own gradients. After: the final firing
        statistics over every rank's tokens."""
        if self.sae.cfg.normalize_activations == "expected_average_only_in":
            share_activation_scale(trainer)
        if self.expert_parallel:
            if trainer.evaluator is not None and self.cfg.logger.log_to_wandb:
                warnings.warn(
                    "expert_parallel: SAELens evaluates the SAE during training on rank 0 alone, and an "
                    "expert-parallel SAE encodes only with every rank taking part, so those evaluations are off. "
                    "Evaluate the saved SAE with sae_lens.evals.run_evals.",
                    stacklevel=2,
                )
            trainer.evaluator = None
        else:
            replicate_training_pass(self.sae, self.optimizer_name)
        sae = super().run_trainer_with_interruption_handling(trainer)
        pool_firing_statistics(trainer)
        trainer.set_final_sae_metadata()
        return sae

    def save_final_sae(
        self, sae: TrainingSAE[Any], output_path: str, log_feature_sparsity: torch.Tensor | None = None
    ) -> None:
        """SAELens's final save, on rank 0; an expert-parallel SAE's experts are gathered there first (every rank
        takes part), so the folder holds one ordinary SAE."""
        experts = getattr(sae, "experts", None)
        if isinstance(experts, ShardedExperts):
            full = gathered_state_dict(sae.state_dict(), experts.shard)
            if full is None:
                return
            whole = type(sae)(replace(sae.cfg, device="cpu"))
            whole.load_state_dict(full)
            whole.cfg.metadata = sae.cfg.metadata
            sae = whole
        super().save_final_sae(sae, output_path, log_feature_sparsity)


@torch.no_grad()
def pool_firing_statistics(trainer: SAETrainer[Any, Any]) -> None:
    """Every rank's firing statistics over all ranks' tokens: firing counts and samples add up, and a latent has
    gone as long without firing as on the rank where it fired last. The final SAE's sparsity, L0 and dead count are
    then the whole run's, not rank 0's."""
    samples = torch.tensor(float(trainer.n_frac_active_samples), device=trainer.act_freq_scores.device)
    for statistic in (trainer.act_freq_scores, samples):
        dist.all_reduce(statistic)
    dist.all_reduce(trainer.n_forward_passes_since_fired, op=dist.ReduceOp.MIN)
    trainer.n_frac_active_samples = int(samples.item())


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
