"""Expert parallelism on the CPU: two gloo ranks, each holding half of the experts, against one process holding them
all and fed the whole batch."""

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from safetensors.torch import load_file, save_file

from sae_lens_scale import ScaleSAE
from sae_lens_scale.hub import load_sae
from sae_lens_scale.optimizers import OptimizerName
from sae_lens_scale.parallel import merge_checkpoint
from sae_lens_scale.parallel.shards import SHARDED_DIMS
from sae_lens_scale.routed_sae import RoutedTrainingSAE
from tests.support.builders import perturbed
from tests.support.distributed import (
    CONFIGS,
    STEPS,
    expert_parallel_init,
    expert_parallel_pass,
    expert_parallel_training,
    launch,
    run_runner,
    train_steps,
)

ROUTED = {name: CONFIGS[name] for name in ("scale", "switch")}
BATCH = 48


def whole_sae(architecture: str) -> RoutedTrainingSAE[Any]:
    """Every expert on one process, moved off its init so every term matters."""
    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(CONFIGS[architecture].to_dict())
    assert isinstance(sae, RoutedTrainingSAE)
    return perturbed(sae, seed=1, scale=0.3)


@pytest.mark.parametrize("architecture", list(ROUTED))
def test_forward_losses_and_gradients_equal_one_process(architecture: str, tmp_path: Path) -> None:
    """float64: every rank's outputs for its tokens, the mean of the ranks' loss terms and every gradient (after
    the global clip to norm 1 that one process's trainer applies) match the SAE holding every expert."""
    sae = whole_sae(architecture)
    generator = torch.Generator().manual_seed(2)
    x = 2 * torch.randn(BATCH, 16, dtype=torch.float64, generator=generator) + 1
    dead = torch.rand(64, generator=generator) < 0.5
    out = sae.training_forward_pass(TrainStepInput(x, {}, dead, n_training_steps=1, is_logging_step=False))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    inputs = {"x": x, "dead": dead.to(torch.uint8), **{f"state/{k}": v for k, v in sae.state_dict().items()}}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))

    config = CONFIGS[architecture].to_dict()
    launch(expert_parallel_pass, 2, config, str(tmp_path / "inputs.safetensors"), str(tmp_path / "out"))
    ranks = [load_file(tmp_path / f"out.rank{rank}") for rank in range(2)]
    torch.testing.assert_close(torch.cat([r["sae_out"] for r in ranks]), out.sae_out, rtol=1e-10, atol=1e-10)
    for name, value in out.losses.items():
        mean = (ranks[0][f"loss/{name}"] + ranks[1][f"loss/{name}"]) / 2
        torch.testing.assert_close(mean[0], value.detach(), rtol=1e-10, atol=1e-10, msg=name)
    assert out.losses["auxiliary_reconstruction_loss"] > 0
    for name, param in sae.named_parameters():
        assert param.grad is not None
        if name in SHARDED_DIMS:
            gathered = torch.cat([r[f"grad/{name}"] for r in ranks], dim=SHARDED_DIMS[name])
            assert ranks[0][f"param/{name}"].numel() * 2 == param.numel()  # each rank holds half of the experts
        else:
            gathered = ranks[0][f"grad/{name}"]
            torch.testing.assert_close(ranks[1][f"grad/{name}"], gathered, rtol=0, atol=0)  # replicated: the same
        torch.testing.assert_close(gathered, param.grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize(
    ("architecture", "optimizer"), [("scale", "adam"), ("switch", "adam"), ("scale", "adam_fused")]
)
def test_two_ranks_of_experts_train_the_sae_of_one_process(
    architecture: str, optimizer: OptimizerName, tmp_path: Path
) -> None:
    """Each owner steps its own experts' rows and moments, with either optimizer."""
    sae = whole_sae(architecture)
    generator = torch.Generator().manual_seed(3)
    batches = torch.randn(STEPS, BATCH, 16, dtype=torch.float64, generator=generator) + torch.linspace(-2, 2, 16)
    inputs = {"batches": batches, **{f"state/{k}": v for k, v in sae.state_dict().items()}}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    config = CONFIGS[architecture].to_dict()

    inputs_path, out = str(tmp_path / "inputs.safetensors"), str(tmp_path / "trained")
    launch(expert_parallel_training, 2, config, inputs_path, out, optimizer)
    sharded = load_file(out)
    whole = train_steps(config, batches, rank=0, world_size=1, initial_state=sae.state_dict(), optimizer=optimizer)
    assert sharded.keys() == whole.state_dict().keys()
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-8, atol=1e-10, msg=name)
    assert not torch.allclose(whole.state_dict()["W_dec"], sae.state_dict()["W_dec"])


def test_every_expert_starts_different_and_the_start_does_not_depend_on_the_number_of_ranks(
    tmp_path: Path,
) -> None:
    config = CONFIGS["scale"].to_dict()
    launch(expert_parallel_init, 2, config, str(tmp_path / "two"))
    launch(expert_parallel_init, 1, config, str(tmp_path / "one"))
    two, one = load_file(tmp_path / "two"), load_file(tmp_path / "one")
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=0, msg=name)
    blocks = two["W_dec"].view(8, 8, 16)  # [expert, latent, d_in]
    distances = torch.cdist(blocks.flatten(1), blocks.flatten(1))
    assert distances[~torch.eye(8, dtype=torch.bool)].min() > 1  # unit-norm rows: equal experts would be at 0
    torch.testing.assert_close(two["W_enc"], two["W_dec"].T, rtol=0, atol=0)


def test_the_runner_with_expert_parallelism_writes_one_ordinary_folder(tmp_path: Path) -> None:
    launch(run_runner, 2, "scale", str(tmp_path), -1, True)
    sae = SAE.load_from_disk(tmp_path / "final")
    assert isinstance(sae, ScaleSAE) and sae.W_enc.shape == (32, 128)  # the whole SAE, gathered from both ranks
    (run,) = (tmp_path / "checkpoints").iterdir()  # one run id for all ranks, each rank's experts in its folder
    assert sorted(path.name for path in run.iterdir()) == ["rank-0", "rank-1"]
    x = torch.randn(64, 32)
    assert torch.isfinite(sae(x)).all()

    # The final per-rank checkpoints, merged, are the same SAE as the gathered folder (which folds omega and the
    # decoder norms in): same outputs.
    (final,) = (run / "rank-0").glob("final_*")
    merged = load_sae(merge_checkpoint(final, tmp_path / "merged"))
    assert merged.W_dec.shape == (128, 32)
    torch.testing.assert_close(merged(x), sae(x), rtol=1e-4, atol=1e-4)


def test_a_run_resumes_each_rank_from_its_own_experts(tmp_path: Path) -> None:
    """The first run saves a checkpoint per rank halfway; the second resumes from rank 0's, every rank reading its
    own sibling folder, and finishes with the uninterrupted run's SAE."""
    launch(run_runner, 2, "switch", str(tmp_path / "first"), -1, True, None, True)
    (run,) = (tmp_path / "first" / "checkpoints").iterdir()
    (halfway,) = (path for path in (run / "rank-0").iterdir() if not path.name.startswith("final_"))
    assert (run / "rank-1" / halfway.name / "sae_weights.safetensors").is_file()
    launch(run_runner, 2, "switch", str(tmp_path / "second"), -1, True, str(halfway), True)
    resumed = SAE.load_from_disk(tmp_path / "second" / "final")
    first = SAE.load_from_disk(tmp_path / "first" / "final")
    assert resumed.W_dec.shape == first.W_dec.shape == (128, 32)
    for name, tensor in first.state_dict().items():  # the same batches, weights and optimizer state on every rank
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
