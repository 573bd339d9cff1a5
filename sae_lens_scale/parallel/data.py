"""Data parallelism: every rank a whole replica of the SAE, reading its own part of the tokens.

DistributedDataParallel broadcasts rank 0's initial weights and averages every gradient during backward, so every
rank clips the same global gradient norm and takes the same Adam step. ``RowSparseAdam`` averages the gradients
itself, its row lists over the union of the ranks' rows, so its replicas only start from rank 0's weights. A routed
SAE also sums its batch statistics over the ranks (``ReplicaParts``), so N ranks with batch B / N train the SAE one
process trains with batch B.
"""

from typing import Any

import torch.distributed as dist
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from datasets.distributed import split_dataset_by_node
from sae_lens.config import HfDataset
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.training.activations_store import ActivationsStore
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sae_lens_scale.optimizers import OptimizerName, check_optimizer_name
from sae_lens_scale.parallel.experts import ShardedExperts
from sae_lens_scale.parallel.process_group import ReplicaParts, world_group
from sae_lens_scale.routed_sae import RoutedTrainingSAE


class _TrainingPass(nn.Module):
    """The SAE's training pass as a module's forward: DistributedDataParallel only syncs gradients of a backward that
    follows its own forward."""

    def __init__(self, sae: TrainingSAE[Any]) -> None:
        super().__init__()
        self.sae = sae
        self.training_forward_pass = sae.training_forward_pass

    def forward(self, step_input: TrainStepInput) -> TrainStepOutput:
        return self.training_forward_pass(step_input)


def replicate_training_pass(sae: TrainingSAE[Any], optimizer: OptimizerName = "adam") -> None:
    """Make ``sae`` one data-parallel replica over torchrun's process group, for the trainer's ``optimizer``: its
    training pass goes through DistributedDataParallel, which averages the gradients over all ranks during the
    trainer's backward. With ``"adam_row_sparse"``, which averages them itself, the replicas take rank 0's weights.

    SAELens's trainer calls ``sae.training_forward_pass`` and then ``loss.backward()``; the pass is rerouted exactly as
    SAELens's own ``compile_sae`` reroutes it through ``torch.compile``. Works for any SAELens architecture; the routed
    ones also sum their batch statistics over the ranks. ``DistributedSAETrainingRunner`` calls it; call it yourself,
    before the optimizer is chosen (``use_optimizer``), only to drive SAELens's ``SAETrainer`` under torchrun without
    the runner.
    """
    check_optimizer_name(optimizer)
    if isinstance(getattr(sae, "experts", None), ShardedExperts):
        raise ValueError(
            "replicate_training_pass got an SAE that holds only this rank's experts: replicas would all take rank "
            "0's experts. Train it with DistributedSAETrainingRunner(cfg, expert_parallel=True), which keeps each "
            "rank's experts its own."
        )
    routed = isinstance(sae, RoutedTrainingSAE)
    if routed:
        sae.batch_parts = ReplicaParts(world_group())
    if optimizer == "adam_row_sparse":
        for tensor in [*sae.parameters(), *sae.buffers()]:
            dist.broadcast(tensor.data, src=0)
        return
    device = next(sae.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    # A routed SAE's one buffer (bias_init_done) is set alike on every rank, so it needs no broadcast each step.
    replica = DistributedDataParallel(_TrainingPass(sae), device_ids=device_ids, broadcast_buffers=not routed)
    sae.training_forward_pass = replica.__call__  # type: ignore[method-assign]


def shard_dataset(dataset: HfDataset, rank: int, world_size: int) -> Dataset | IterableDataset:
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
        store.dataset = shard_dataset(store.dataset, rank, world_size)
    if store.cached_activation_dataset is not None:
        store.cached_activation_dataset = split_dataset_by_node(
            store.cached_activation_dataset, rank=rank, world_size=world_size
        )
