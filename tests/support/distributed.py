"""What each rank runs in the data-parallel tests, and the launcher that starts the ranks like torchrun would.

The functions live in a module of their own because the ranks are fresh processes (the ``spawn`` start method):
they import what they run by name.
"""

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens import LoggingConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig, TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file, save_file
from torch.multiprocessing.spawn import start_processes

from sae_lens_scale import RoutedTrainingSAE, ScaleTrainingSAEConfig, SwitchTrainingSAEConfig
from sae_lens_scale.optimizers import OptimizerName, use_optimizer
from sae_lens_scale.parallel import DistributedSAETrainingRunner, expert_parallel_sae, replicate_training_pass
from sae_lens_scale.parallel.checkpoints import gathered_state_dict
from sae_lens_scale.parallel.experts import ExpertShard, ShardedExperts
from sae_lens_scale.parallel.process_group import join_process_group
from sae_lens_scale.parallel.shards import SHARDED_DIMS
from tests.support.builders import tiny_runner_config, tiny_sae_config
from tests.support.models import CONTEXT, build_tiny_model, build_token_dataset

STEPS = 5
# The SAEs the multi-process tests compare with one process, in float64.
SHAPE = {"d_in": 16, "d_sae": 64, "k": 6, "dtype": "float64"}
CONFIGS = {
    "scale": ScaleTrainingSAEConfig(n_experts=8, n_active_experts=2, **SHAPE),
    "switch": SwitchTrainingSAEConfig(n_experts=8, **SHAPE),
    # SAELens's own TopK: DDP averages its gradients too; its AuxK's dead statistics would stay per rank, so off here.
    "topk": TopKTrainingSAEConfig(aux_loss_coefficient=0.0, **SHAPE),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(worker: Callable[..., None], world_size: int, *args: Any, timeout_s: float = 240) -> None:
    """Start ``worker(rank, world_size, port, *args)`` in ``world_size`` processes and wait at most ``timeout_s``.

    A rank that raises ends the launch: the others are terminated and its error is raised here (torch's
    ``ProcessRaisedException`` names the process, which is the rank). Ranks still running at the deadline are
    killed, and the launch raises TimeoutError.
    """
    port = free_port()
    context = start_processes(worker, args=(world_size, port, *args), nprocs=world_size, join=False)
    assert context is not None  # join=False returns the processes' context
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world_size} ranks did not finish within {timeout_s} s")
    finally:
        for process in filter(None, context.processes):
            if process.is_alive():
                process.kill()


def torchrun_environment(rank: int, world_size: int, port: int) -> None:
    """What torchrun would set up for this rank: the rendezvous in the environment, one thread per process."""
    os.environ |= {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
    }
    torch.set_num_threads(1)


@contextmanager
def process_group(rank: int, world_size: int, port: int) -> Iterator[None]:
    """This rank in the gloo group, destroyed when the rank's work ends, however it ends."""
    torchrun_environment(rank, world_size, port)
    join_process_group("cpu")
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_with_trainer(
    rank: int,
    world_size: int,
    port: int,
    config: dict[str, Any],
    batches_path: str,
    out_path: str,
    optimizer: OptimizerName = "adam",
) -> None:
    """STEPS of SAELens's trainer on this rank's contiguous part of each global batch, with the pass replicated."""
    with process_group(rank, world_size, port):
        sae = train_steps(config, torch.load(batches_path), rank, world_size, optimizer=optimizer)
        if rank == 0:
            save_file({name: tensor.contiguous() for name, tensor in sae.state_dict().items()}, out_path)


def train_steps(
    config: dict[str, Any],
    batches: torch.Tensor,
    rank: int,
    world_size: int,
    initial_state: dict[str, torch.Tensor] | None = None,
    optimizer: OptimizerName = "adam",
) -> TrainingSAE[Any]:
    """The training the parallel tests compare: one process (world_size 1) or one data-parallel rank of several."""
    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(config).to_dict())
    if initial_state is not None:
        sae.load_state_dict(initial_state)
    per_rank = batches.shape[1] // world_size
    stream = iter(batches[:, rank * per_rank : (rank + 1) * per_rank])
    trainer = SAETrainer(cfg=trainer_config(per_rank), sae=sae, data_provider=stream)
    if world_size > 1:
        replicate_training_pass(sae, optimizer)
    use_optimizer(trainer, optimizer)
    return trainer.fit()


def non_finite_on_one_rank(rank: int, world_size: int, port: int, config: dict[str, Any], out_path: str) -> None:
    """One data-parallel step where only rank 1's batch holds a NaN: every rank's step fails; each writes why."""
    with process_group(rank, world_size, port):
        torch.manual_seed(0)
        sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(config).to_dict())
        replicate_training_pass(sae)
        x = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        if rank == 1:
            x[3, 2] = float("nan")
        try:
            sae.training_forward_pass(TrainStepInput(x, {}, None, n_training_steps=1, is_logging_step=False))
        except FloatingPointError as error:
            Path(f"{out_path}.rank{rank}").write_text(str(error))


def run_runner(
    rank: int,
    world_size: int,
    port: int,
    architecture: str,
    output: str,
    fail_on_rank: int,
    expert_parallel: bool = False,
    resume_from_checkpoint: str | None = None,
    resumable: bool = False,
) -> None:
    """SAELens's runner on several ranks (data or expert parallel) on the tiny model and the in-memory tokens;
    optionally one rank fails. A ``resumable`` run keeps no mixing buffer across steps (SAELens checkpoints the
    dataset position, not the buffer), so a run resumed from its checkpoint sees the same batches."""
    stream = (
        {
            "store_batch_size_prompts": 256 // CONTEXT,
            "n_batches_in_buffer": 256 // CONTEXT,
            "activations_mixing_fraction": 0.0,
        }
        if resumable
        else {}
    )
    torchrun_environment(rank, world_size, port)  # the runner joins the group itself, as under torchrun
    model = build_tiny_model()
    if rank == fail_on_rank:

        def fail(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            raise ValueError(f"activations on rank {rank} are broken")

        model.add_perma_hook("blocks.1.hook_resid_pre", fail)
    cfg = tiny_runner_config(
        tiny_sae_config(architecture, normalize_activations="expected_average_only_in"),
        Path(output),
        training_tokens=20 * 256 * world_size,
        n_batches_for_norm_estimate=2,
        n_checkpoints=1,
        save_final_checkpoint=expert_parallel,
        resume_from_checkpoint=resume_from_checkpoint,
        **stream,
    )
    runner = DistributedSAETrainingRunner(
        cfg, override_dataset=build_token_dataset(), override_model=model, expert_parallel=expert_parallel
    )
    try:
        runner.run()
    except Exception as error:  # when and why, so a test can find the first failure (torchrun's "root cause")
        (Path(output) / f"failure-rank-{rank}.txt").write_text(f"{time.time()}\n{error}")
        raise
    finally:
        dist.destroy_process_group()


def expert_parallel_pass(
    rank: int, world_size: int, port: int, config: dict[str, Any], inputs_path: str, out_path: str
) -> None:
    """One training pass (forward, backward, gradient sync) of this rank's experts on its half of the batch."""
    with process_group(rank, world_size, port):
        inputs = load_file(inputs_path)
        sae = sharded_copy(config, inputs)
        per_rank = inputs["x"].shape[0] // world_size
        x = inputs["x"][rank * per_rank : (rank + 1) * per_rank]
        step = TrainStepInput(x, {}, inputs["dead"].bool(), n_training_steps=1, is_logging_step=False)
        out = sae.training_forward_pass(step)
        out.loss.backward()
        results = {f"loss/{name}": value.detach().view(1) for name, value in out.losses.items()}
        results["sae_out"] = out.sae_out.detach()
        grads = {name: param.grad for name, param in sae.named_parameters() if param.grad is not None}
        results |= {f"grad/{name}": grad.contiguous() for name, grad in grads.items()}
        results |= {f"param/{name}": param.detach().contiguous() for name, param in sae.named_parameters()}
        save_file(results, f"{out_path}.rank{rank}")


def expert_parallel_training(
    rank: int,
    world_size: int,
    port: int,
    config: dict[str, Any],
    inputs_path: str,
    out_path: str,
    optimizer: OptimizerName = "adam",
) -> None:
    """STEPS of SAELens's trainer with this rank's experts, then the whole SAE gathered on rank 0."""
    with process_group(rank, world_size, port):
        inputs = load_file(inputs_path)
        sae = sharded_copy(config, inputs)
        batches = inputs["batches"]
        per_rank = batches.shape[1] // world_size
        trainer = SAETrainer(
            cfg=trainer_config(per_rank),
            sae=sae,
            data_provider=iter(batches[:, rank * per_rank : (rank + 1) * per_rank]),
        )
        use_optimizer(trainer, optimizer)
        trainer.fit()
        full = gathered_state_dict(sae.state_dict(), shard_held(sae))
        if full is not None:
            save_file(full, out_path)


def expert_parallel_init(rank: int, world_size: int, port: int, config: dict[str, Any], out_path: str) -> None:
    """A fresh expert-parallel SAE from seed 0, gathered on rank 0."""
    with process_group(rank, world_size, port):
        torch.manual_seed(0)
        sae = expert_parallel_sae(TrainingSAEConfig.from_dict(config))
        full = gathered_state_dict(sae.state_dict(), shard_held(sae))
        if full is not None:
            save_file(full, out_path)


def shard_of(full_state_dict: dict[str, torch.Tensor], shard: ExpertShard, n_experts: int) -> dict[str, torch.Tensor]:
    """This rank's part of a whole SAE's state: the experts it owns, and every replicated tensor."""
    local = {}
    for name, tensor in full_state_dict.items():
        if name not in SHARDED_DIMS:
            local[name] = tensor
            continue
        dim = SHARDED_DIMS[name]
        rank_width = tensor.shape[dim] // n_experts * shard.n_local_experts
        local[name] = tensor.narrow(dim, shard.rank * rank_width, rank_width).contiguous()
    return local


def shard_held(sae: RoutedTrainingSAE[Any]) -> ExpertShard:
    assert isinstance(sae.experts, ShardedExperts)
    return sae.experts.shard


def sharded_copy(config: dict[str, Any], inputs: dict[str, torch.Tensor]) -> RoutedTrainingSAE[Any]:
    """This rank's share of the SAE whose whole state is in ``inputs`` (prefix ``state/``)."""
    sae = expert_parallel_sae(TrainingSAEConfig.from_dict(config))
    full = {name.removeprefix("state/"): tensor for name, tensor in inputs.items() if name.startswith("state/")}
    sae.load_state_dict(shard_of(full, shard_held(sae), sae.cfg.n_experts))
    return sae


def trainer_config(batch: int) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=STEPS * batch,
        train_batch_size_samples=batch,
        lr=1e-2,
        lr_end=1e-2,
        dead_feature_window=1,
        logger=LoggingConfig(log_to_wandb=False),
    )
