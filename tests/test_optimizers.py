"""The optimizer choice: ``adam_fused`` takes SAELens's Adam steps to float32 rounding, resumes bit-exactly, and the
runner trains with it."""

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import LoggingConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.constants import TRAINER_STATE_FILENAME
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer

from sae_lens_scale import OptimizedSAETrainingRunner, ScaleTrainingSAEConfig
from sae_lens_scale.optimizers import OPTIMIZERS, OptimizerName, use_optimizer
from tests.support.builders import tiny_runner_config, tiny_sae_config

D_IN, BATCH, STEPS = 32, 128, 20
CONFIGS = {
    "scale": ScaleTrainingSAEConfig(d_in=D_IN, d_sae=256, n_experts=8, n_active_experts=2, k=8),
    "topk": TopKTrainingSAEConfig(d_in=D_IN, d_sae=256, k=8),
}


def make_trainer(architecture: str, optimizer: OptimizerName, state: dict[str, Any] | None = None) -> SAETrainer:
    """A trainer with a warm-up and a decay, so the schedule matters too; a resumed one loads ``state`` as the runner
    does (weights, then SAELens's trainer state) before it moves to the optimizer."""
    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(CONFIGS[architecture].to_dict())
    cfg = SAETrainerConfig(
        total_training_samples=STEPS * BATCH,
        train_batch_size_samples=BATCH,
        lr=3e-3,
        lr_end=3e-4,
        lr_warm_up_steps=4,
        lr_decay_steps=6,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg, sae, data_provider=iter([]))
    if state is not None:
        sae.load_state_dict(state["weights"])
        trainer.load_trainer_state(state["folder"])
    use_optimizer(trainer, optimizer)
    return trainer


def batches() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, D_IN, generator=generator) + torch.linspace(-1, 3, D_IN)


def train(trainer: SAETrainer, steps: range) -> None:
    data = batches()
    for step in steps:
        trainer.n_training_steps = step
        trainer.step(data[step])


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_fused_adam_gives_sae_lens_adam_s_weights(architecture: str) -> None:
    reference, fused = make_trainer(architecture, "adam"), make_trainer(architecture, "adam_fused")
    assert fused.optimizer.param_groups[0]["fused"] and not reference.optimizer.param_groups[0]["fused"]
    train(reference, range(STEPS))
    train(fused, range(STEPS))
    start = make_trainer(architecture, "adam").sae.state_dict()
    for name, tensor in reference.sae.state_dict().items():
        torch.testing.assert_close(fused.sae.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.allclose(reference.sae.W_dec, start["W_dec"])
    assert fused.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"] < 3e-3  # decayed


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_resumed_trainer_continues_bit_exactly(optimizer: OptimizerName, tmp_path: Path) -> None:
    uninterrupted = make_trainer("scale", optimizer)
    train(uninterrupted, range(10))

    interrupted = make_trainer("scale", optimizer)
    train(interrupted, range(5))
    interrupted.save_trainer_state(tmp_path)
    weights = {name: tensor.clone() for name, tensor in interrupted.sae.state_dict().items()}
    resumed = make_trainer("scale", optimizer, {"weights": weights, "folder": tmp_path})
    train(resumed, range(5, 10))

    for name, tensor in uninterrupted.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], tensor), name
    moments = zip(uninterrupted.optimizer.state.values(), resumed.optimizer.state.values(), strict=True)
    for expected, got in moments:
        assert all(torch.equal(got[key], value) for key, value in expected.items())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_runner_trains_with_the_chosen_optimizer(
    optimizer: OptimizerName, tiny_model: HookedTransformer, token_dataset: Any, tmp_path: Path
) -> None:
    cfg = tiny_runner_config(tiny_sae_config("switch"), tmp_path, training_tokens=8 * 256, save_final_checkpoint=True)
    torch.manual_seed(0)
    runner = OptimizedSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model, optimizer=optimizer
    )
    runner.run()
    assert cfg.checkpoint_path is not None
    (final,) = Path(cfg.checkpoint_path).glob("final_*")
    saved = torch.load(final / TRAINER_STATE_FILENAME)["optimizer"]
    assert bool(saved["param_groups"][0]["fused"]) == (optimizer == "adam_fused")
    assert all(int(state["step"]) == 8 for state in saved["state"].values())


def test_an_unknown_optimizer_is_refused_with_the_choices(tiny_model: HookedTransformer, token_dataset: Any) -> None:
    cfg = tiny_runner_config(tiny_sae_config("switch"), Path("unused"))
    unknown: Any = "sgd"
    with pytest.raises(ValueError, match=r"optimizer='sgd' is not an optimizer of sae_lens_scale: use one of \('adam'"):
        OptimizedSAETrainingRunner(cfg, override_dataset=token_dataset, override_model=tiny_model, optimizer=unknown)
