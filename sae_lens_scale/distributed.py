"""Data-parallel training across processes: SAELens's unchanged runner and trainer, one process per device under
``torchrun``, with torch's DistributedDataParallel averaging the gradients.

Every rank holds the whole SAE and reads a disjoint shard of the token dataset. ``train_batch_size_tokens`` is each
rank's batch, so the global batch is ``world_size`` times it, and ``training_tokens`` counts all ranks together: N
ranks with batch B / N train as one process with batch B. What makes them the same SAE:

- DistributedDataParallel broadcasts rank 0's initial weights and averages every gradient during backward, so every
  rank clips the same (global) gradient norm and takes the same Adam step;
- the routed SAEs reduce what their losses need from the whole batch (expert fractions, dead latents, the loss
  guard) and set their biases from every rank's first batch (``RoutedTrainingSAE.data_parallel_group``);
- every rank scales its activations by one factor, computed from the mean of the ranks' activation-norm estimates;
- the final folder's firing statistics (its sparsity, L0 and dead count) pool every rank's tokens.

A resumed run restores rank 0's checkpoint on every rank, firing statistics included: for one dead-feature window
after the resume, AuxK may count as dead a latent that only another rank saw fire.

Rank 0 alone logs to wandb, writes checkpoints and writes the final SAELens folder. A failed rank ends the job:
torchrun stops the others, and every collective has a timeout, so no rank waits forever.

With ``expert_parallel=True`` in the routed SAE's config the same runner splits the experts over the ranks instead
of replicating them (``sae_lens_scale.expert_parallel``): checkpoints are then written per rank, and the final folder
holds the whole SAE, gathered into rank 0's CPU memory.

    torchrun --nproc-per-node 8 examples/train_gpt2_scale.py ...   # a script that runs, on every rank:
    DistributedSAETrainingRunner(cfg).run()
"""

import os
import warnings
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from datasets.distributed import split_dataset_by_node
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformer_lens.hook_points import HookedRootModule

from sae_lens_scale.expert_parallel import gathered_state_dict
from sae_lens_scale.routed_sae import RoutedTrainingSAE

DEFAULT_TIMEOUT = timedelta(minutes=10)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_data_parallel(device: str, timeout: timedelta = DEFAULT_TIMEOUT) -> tuple[int, int]:
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


class _TrainingPass(nn.Module):
    """The SAE's training pass as a module's forward: DistributedDataParallel only syncs gradients of a backward that
    follows its own forward."""

    def __init__(self, sae: TrainingSAE[Any]) -> None:
        super().__init__()
        self.sae = sae
        self.training_forward_pass = sae.training_forward_pass

    def forward(self, step_input: TrainStepInput) -> TrainStepOutput:
        return self.training_forward_pass(step_input)


def replicate_training_pass(sae: TrainingSAE[Any]) -> None:
    """Make ``sae`` one data-parallel replica: its training pass goes through DistributedDataParallel.

    SAELens's trainer calls ``sae.training_forward_pass`` and then ``loss.backward()``; the pass is rerouted exactly as
    SAELens's own ``compile_sae`` reroutes it through ``torch.compile``, and DDP averages the gradients over all ranks
    during that backward. Works for any SAELens architecture; the routed ones also reduce their batch statistics.
    """
    device = next(sae.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    replica = DistributedDataParallel(_TrainingPass(sae), device_ids=device_ids)
    sae.training_forward_pass = replica.__call__  # type: ignore[method-assign]
    if isinstance(sae, RoutedTrainingSAE):
        sae.data_parallel_group = dist.group.WORLD


def shard(dataset: HfDataset, rank: int, world_size: int) -> Dataset | IterableDataset:
    """This rank's disjoint part of a Hugging Face ``Dataset`` or ``IterableDataset``.

    ``split_dataset_by_node`` gives a ``Dataset`` a contiguous block and a streamed dataset whole files when their
    number divides by the ranks, else every ``world_size``-th example, so a stream of one file splits too.
    """
    if isinstance(dataset, DatasetDict | IterableDatasetDict):
        raise ValueError(
            f"The training dataset is a {type(dataset).__name__} with splits {list(dataset)}: pass one split, "
            "e.g. dataset['train']."
        )
    if isinstance(dataset, Dataset):  # one call per type: the function's type variable is constrained
        return split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


def shard_activation_store(store: ActivationsStore, rank: int, world_size: int) -> None:
    """Give the store only this rank's part of its token dataset and of its cached activations, if it has them.

    Called before the store reads its first batch (its readers open the dataset lazily).
    """
    if store.dataset is not None:
        store.dataset = shard(store.dataset, rank, world_size)
    if store.cached_activation_dataset is not None:
        store.cached_activation_dataset = split_dataset_by_node(
            store.cached_activation_dataset, rank=rank, world_size=world_size
        )


def rank_config(
    cfg: LanguageModelSAERunnerConfig[Any], rank: int, world_size: int
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
    if getattr(cfg.sae, "expert_parallel", False):
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


class DataParallelRankError(RuntimeError):
    """One rank of a data-parallel run failed; the message names the rank and its error, which is chained."""


class DistributedSAETrainingRunner(LanguageModelSAETrainingRunner):
    """SAELens's ``LanguageModelSAETrainingRunner`` as one rank of a data-parallel run; start one per device with
    ``torchrun`` (module docstring). Same arguments, plus ``timeout`` for every collective."""

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_sae: TrainingSAE[Any] | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        self.rank, self.world_size = init_data_parallel(cfg.device, timeout)
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
        cfg = rank_config(cfg, self.rank, self.world_size)
        super().__init__(
            cfg, override_dataset=override_dataset, override_model=override_model, override_sae=override_sae
        )
        shard_activation_store(self.activations_store, self.rank, self.world_size)
        if self.expert_parallel != getattr(cfg.sae, "expert_parallel", False):
            raise ValueError(
                f"LanguageModelSAERunnerConfig.sae.expert_parallel={getattr(cfg.sae, 'expert_parallel', False)}, but "
                f"the SAE to train {'holds' if self.expert_parallel else 'does not hold'} a share of the experts "
                "(override_sae or from_pretrained_path): set the config's expert_parallel to match the SAE."
            )

    def run(self) -> TrainingSAE[Any]:
        """SAELens's run on this rank; an error on it ends the job as :class:`DataParallelRankError`."""
        try:
            return super().run()
        except Exception as error:
            raise DataParallelRankError(
                f"rank {self.rank} of {self.world_size} failed: {type(error).__name__}: {error}"
            ) from error

    @property
    def expert_parallel(self) -> bool:
        return isinstance(self.sae, RoutedTrainingSAE) and self.sae.expert_shard is not None

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
            replicate_training_pass(self.sae)
        sae = super().run_trainer_with_interruption_handling(trainer)
        pool_firing_statistics(trainer)
        trainer.set_final_sae_metadata()
        return sae

    def save_final_sae(
        self, sae: TrainingSAE[Any], output_path: str, log_feature_sparsity: torch.Tensor | None = None
    ) -> None:
        """SAELens's final save, on rank 0; an expert-parallel SAE's experts are gathered there first (every rank
        takes part), so the folder holds one ordinary SAE."""
        if isinstance(sae, RoutedTrainingSAE) and sae.expert_shard is not None:
            full = gathered_state_dict(sae.state_dict(), sae.expert_shard)
            if full is None:
                return
            whole = type(sae)(replace(sae.cfg, expert_parallel=False, device="cpu"))
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
