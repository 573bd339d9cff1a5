"""Data-parallel training on the CPU: two gloo ranks on 127.0.0.1, started as torchrun would start them, against one
process fed the whole batch."""

import time
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from sae_lens import SAE
from safetensors.torch import load_file
from torch.multiprocessing.spawn import ProcessRaisedException

from sae_lens_scale import ScaleSAE
from sae_lens_scale.optimizers import OPTIMIZERS, OptimizerName
from sae_lens_scale.parallel.checkpoints import rank_checkpoint
from sae_lens_scale.parallel.data import shard_activation_store, shard_dataset
from sae_lens_scale.parallel.runner import rank_config
from tests.support.builders import tiny_runner_config, tiny_sae_config
from tests.support.distributed import (
    CONFIGS,
    STEPS,
    launch,
    non_finite_on_one_rank,
    run_runner,
    train_steps,
    train_with_trainer,
)
from tests.support.models import build_token_dataset


@pytest.mark.parametrize(
    ("architecture", "optimizer"),
    [
        (architecture, optimizer)
        for architecture in CONFIGS
        for optimizer in OPTIMIZERS
        if not (architecture == "topk" and optimizer == "adam_row_sparse")  # routed SAEs only
    ],
)
def test_two_ranks_with_half_batches_train_the_sae_of_one_process_with_whole_batches(
    architecture: str, optimizer: OptimizerName, tmp_path: Path
) -> None:
    """float64, 5 steps: first-batch biases, AuxK with the trainer's dead latents (window 1), load balancing,
    clipping and each optimizer all see the whole batch."""
    config = CONFIGS[architecture].to_dict()
    generator = torch.Generator().manual_seed(0)
    batches = torch.randn(STEPS, 64, 16, dtype=torch.float64, generator=generator) + torch.linspace(-2, 2, 16)
    torch.save(batches, tmp_path / "batches.pt")
    whole = train_steps(config, batches, rank=0, world_size=1, optimizer=optimizer)

    out = str(tmp_path / "rank0.safetensors")
    launch(train_with_trainer, 2, config, str(tmp_path / "batches.pt"), out, optimizer)
    replicated = load_file(tmp_path / "rank0.safetensors")
    assert replicated.keys() == whole.state_dict().keys()
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(replicated[name], tensor, rtol=1e-8, atol=1e-10, msg=name)
    torch.manual_seed(0)
    untrained = type(whole)(whole.cfg).state_dict()  # the same seeded initialisation, before training
    assert not torch.allclose(untrained["W_dec"], whole.state_dict()["W_dec"])


def test_every_rank_names_the_rank_whose_activations_were_not_finite(tmp_path: Path) -> None:
    launch(non_finite_on_one_rank, 2, CONFIGS["scale"].to_dict(), str(tmp_path / "error"))
    for rank in range(2):
        message = (tmp_path / f"error.rank{rank}").read_text()
        assert "the input activations contain 1 NaN and 0 inf values, in 1 of rank 1's 32 rows" in message, message
        assert "rank 0's" not in message and "although the input activations are finite" not in message


def test_the_runner_on_two_ranks_writes_one_sae_lens_folder(tmp_path: Path) -> None:
    launch(run_runner, 2, "scale", str(tmp_path), -1)
    sae = SAE.load_from_disk(tmp_path / "final")
    assert isinstance(sae, ScaleSAE) and sae.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1  # rank 0's; rank 1 writes nothing
    x = torch.randn(64, 32)
    assert torch.isfinite(sae(x)).all()


def test_a_resumed_run_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    """Every rank resumes from rank 0's halfway checkpoint (the weights, optimizer and firing statistics are the same
    on every rank) with its own shard's position, and the run finishes where the uninterrupted one did."""
    launch(run_runner, 2, "scale", str(tmp_path / "first"), -1, False, None, True)
    (halfway,) = next((tmp_path / "first" / "checkpoints").iterdir()).iterdir()
    launch(run_runner, 2, "scale", str(tmp_path / "second"), -1, False, str(halfway), True)
    first = load_file(tmp_path / "first" / "final" / "sae_weights.safetensors")
    resumed = load_file(tmp_path / "second" / "final" / "sae_weights.safetensors")
    assert set(resumed) == set(first)
    for name, tensor in first.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path: Path) -> None:
    """Rank 1 fails; rank 0, waiting in a collective, fails after it (or is stopped). The first failure, which
    torchrun reports as the root cause, is rank 1's own error, and the job ends well within the timeout."""
    started = time.monotonic()
    with pytest.raises(ProcessRaisedException, match=r"rank [01] of 2 failed"):
        launch(run_runner, 2, "switch", str(tmp_path), 1)
    assert time.monotonic() - started < 120
    failures = [path.read_text().split("\n", 1) for path in tmp_path.glob("failure-rank-*.txt")]
    first = min(failures, key=lambda failure: float(failure[0]))
    assert first[1] == "rank 1 of 2 failed: ValueError: activations on rank 1 are broken"


def test_each_rank_gets_its_own_share_of_tokens_and_rank_0_alone_writes() -> None:
    cfg = tiny_runner_config(tiny_sae_config("scale"), Path("out"), training_tokens=4 * 256 * 3)
    shares = [rank_config(cfg, rank, 3, expert_parallel=False) for rank in range(3)]
    assert [share.training_tokens for share in shares] == [1024, 1024, 1024]
    assert shares[0].output_path == cfg.output_path and shares[0].checkpoint_path == cfg.checkpoint_path
    assert all(share.output_path is None and share.checkpoint_path is None for share in shares[1:])
    with pytest.raises(ValueError, match=r"training_tokens=1000 is not a whole number of global batches"):
        rank_config(
            tiny_runner_config(tiny_sae_config("scale"), Path("out"), training_tokens=1000), 0, 2, expert_parallel=False
        )

    rows: list[Any] = []
    for rank in range(3):
        rows += shard_dataset(build_token_dataset(30), rank, 3)["input_ids"]
    assert sorted(map(tuple, rows)) == sorted(map(tuple, build_token_dataset(30)["input_ids"]))  # disjoint, complete


def test_each_rank_builds_its_sae_on_its_own_device() -> None:
    """The SAE is built on ``cfg.sae.device``; an expert-parallel SAE exchanges its initial state while it is built,
    so each rank's share must build it on that rank's device, not on the SAE config's default."""
    cfg = tiny_runner_config(tiny_sae_config("scale", device="meta"), Path("out"), training_tokens=4 * 256 * 2)
    assert cfg.sae.device == "meta" and cfg.device == "cpu"
    assert [rank_config(cfg, rank, 2, expert_parallel=False).sae.device for rank in range(2)] == ["cpu", "cpu"]


def test_a_stream_of_one_file_is_split_between_the_ranks_by_example() -> None:
    """A streamed dataset with fewer files than ranks cannot be split by file; each rank then takes every other
    example, and together they read each example once."""
    stream = build_token_dataset(30).to_iterable_dataset(num_shards=1)
    rows_of = [cast(Iterable[dict[str, Any]], shard_dataset(stream, rank, 2)) for rank in range(2)]
    parts = [[tuple(row["input_ids"]) for row in rows] for rows in rows_of]
    assert [len(part) for part in parts] == [15, 15]
    assert sorted(parts[0] + parts[1]) == sorted(map(tuple, build_token_dataset(30)["input_ids"]))


def test_the_learning_rate_schedule_must_fit_the_steps_each_rank_takes() -> None:
    """3 ranks x 256 tokens x 4 steps: a schedule counted in one device's 12 steps is refused, with the fix."""
    sae_cfg = tiny_sae_config("scale")
    fitting = tiny_runner_config(sae_cfg, Path("out"), training_tokens=3 * 256 * 4, lr_decay_steps=3)
    assert rank_config(fitting, 0, 3, expert_parallel=False).lr_decay_steps == 3
    too_long = tiny_runner_config(sae_cfg, Path("out"), training_tokens=3 * 256 * 4, lr_decay_steps=10)
    with pytest.raises(ValueError, match=r"lr_warm_up_steps=0 \+ lr_decay_steps=10 exceed the run's 4 steps"):
        rank_config(too_long, 0, 3, expert_parallel=False)


def test_cached_activations_are_sharded_like_tokens() -> None:
    tokens, cached = build_token_dataset(30), build_token_dataset(20)
    rows: list[Any] = []
    for rank in range(2):
        store = SimpleNamespace(dataset=tokens, cached_activation_dataset=cached)
        shard_activation_store(store, rank, 2)  # type: ignore[arg-type]
        assert len(store.dataset) == 15
        rows += store.cached_activation_dataset["input_ids"]
    assert sorted(map(tuple, rows)) == sorted(map(tuple, cached["input_ids"]))  # disjoint, complete


def test_an_expert_parallel_resume_finds_each_rank_s_checkpoint_and_counts_the_ranks(tmp_path: Path) -> None:
    for rank in range(2):
        (tmp_path / "run" / f"rank-{rank}" / "step_64").mkdir(parents=True)
    rank_0 = tmp_path / "run" / "rank-0" / "step_64"
    assert rank_checkpoint(rank_0, 1, 2) == tmp_path / "run" / "rank-1" / "step_64"
    with pytest.raises(ValueError, match=r"was not written by 4 ranks \(.*rank-3/step_64 is missing\)"):
        rank_checkpoint(rank_0, 3, 4)
    with pytest.raises(ValueError, match=r"was not written by 1 ranks \(.*rank-1/step_64 exists\)"):
        rank_checkpoint(rank_0, 0, 1)
    with pytest.raises(ValueError, match=r"resumes from rank 0's checkpoint folder"):
        rank_checkpoint(tmp_path / "run" / "rank-1" / "step_64", 0, 2)
