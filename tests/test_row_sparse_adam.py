"""``adam_row_sparse``: the SAE's row gradients are those of the dense backward, only for the step's latents, and the
step is a row-by-row Adam written out below; resume, the trainer's clip and the refusals."""

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import LoggingConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor
from torch.optim import Optimizer
from transformer_lens import HookedTransformer

from sae_lens_scale import OptimizedSAETrainingRunner, ScaleTrainingSAEConfig, SwitchTrainingSAEConfig
from sae_lens_scale.optimizers import OptimizerName, lr_schedule, use_optimizer
from sae_lens_scale.parallel import DistributedSAETrainingRunner
from sae_lens_scale.routed_sae import RoutedTrainingSAE
from sae_lens_scale.row_sparse_adam import RowGradients
from tests.support.builders import tiny_runner_config, tiny_sae_config

D_IN, D_SAE, BATCH, STEPS = 16, 128, 24, 8
CONFIGS = {
    "scale": ScaleTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_experts=8, n_active_experts=2, k=4),
    "scale_plain_encoder": ScaleTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, n_experts=8, n_active_experts=2, k=4, feature_scaling="none"
    ),
    "switch": SwitchTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_experts=8, k=4),
}


class RowByRowAdam(Optimizer):
    """The row-sparse step written plainly: every row of a row-sparse parameter whose (dense, clipped) gradient is
    nonzero takes Adam's update with that row's own step count; every other parameter takes Adam's update."""

    def __init__(self, sae: RoutedTrainingSAE[Any], lr: float, betas: tuple[float, float]) -> None:
        super().__init__(sae.parameters(), {"lr": lr, "betas": betas, "eps": 1e-8})
        named = dict(sae.named_parameters())
        self.row_dims = {named[name]: dim for name, dim in sae.row_sparse_dims().items()}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                dim = self.row_dims.get(param)
                rows = param.unsqueeze(0) if dim is None else param.movedim(dim, 0)
                grads = param.grad.unsqueeze(0) if dim is None else param.grad.movedim(dim, 0)
                if not state:
                    state["m"] = [torch.zeros_like(row) for row in rows]
                    state["v"] = [torch.zeros_like(row) for row in rows]
                    state["t"] = [0] * len(rows)
                for r in range(len(rows)):
                    g = grads[r]
                    if dim is not None and not bool(g.ne(0).any()):
                        continue
                    state["t"][r] += 1
                    t = state["t"][r]
                    state["m"][r] = beta1 * state["m"][r] + (1 - beta1) * g
                    state["v"][r] = beta2 * state["v"][r] + (1 - beta2) * g * g
                    m_hat = state["m"][r] / (1 - beta1**t)
                    v_hat = state["v"][r] / (1 - beta2**t)
                    rows[r] -= group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])


def trainer_for(
    architecture: str, optimizer: OptimizerName | None, state: dict[str, Any] | None = None, autocast: bool = False
) -> SAETrainer:
    """SAELens's trainer, a short dead-feature window so AuxK runs from the third step; ``optimizer=None`` gives it
    the reference above (with SAELens's dense backward and its own clip)."""
    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(CONFIGS[architecture].to_dict())
    cfg = SAETrainerConfig(
        total_training_samples=STEPS * BATCH,
        train_batch_size_samples=BATCH,
        lr=1e-2,
        lr_end=1e-3,
        lr_warm_up_steps=2,
        lr_decay_steps=3,
        dead_feature_window=1,
        autocast=autocast,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg, sae, data_provider=iter([]))
    if state is not None:
        sae.load_state_dict(state["weights"])
        trainer.load_trainer_state(state["folder"])
    if optimizer is None:
        assert isinstance(sae, RoutedTrainingSAE)
        reference = RowByRowAdam(sae, cfg.lr, (cfg.adam_beta1, cfg.adam_beta2))
        trainer.optimizer = reference  # type: ignore[assignment]
        trainer.lr_scheduler = lr_schedule(cfg, reference)
    else:
        use_optimizer(trainer, optimizer)
    return trainer


def batches() -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return 3 * torch.randn(STEPS, BATCH, D_IN, generator=generator) + torch.linspace(-1, 3, D_IN)


def train(trainer: SAETrainer, steps: range) -> None:
    data = batches()
    for step in steps:
        trainer.n_training_steps = step
        trainer.step(data[step])


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_the_row_sparse_step_is_the_row_by_row_reference(architecture: str) -> None:
    reference, row_sparse = trainer_for(architecture, None), trainer_for(architecture, "adam_row_sparse")
    start = row_sparse.sae.W_dec.detach().clone()
    train(reference, range(1))
    train(row_sparse, range(1))
    moved = (row_sparse.sae.W_dec != start).any(dim=1)
    assert 0 < int(moved.sum()) < D_SAE  # rows without a gradient kept their weights exactly
    train(reference, range(1, STEPS))
    train(row_sparse, range(1, STEPS))
    assert bool(reference.dead_neurons.any())  # AuxK ran on the later steps
    for name, tensor in reference.sae.state_dict().items():
        torch.testing.assert_close(row_sparse.sae.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("architecture", ["scale", "switch"])
def test_under_bf16_autocast_the_row_sparse_step_follows_the_reference(architecture: str) -> None:
    """SAELens's bf16 autocast: the candidates are 16-bit, the row gradients the parameters' float32. The two paths
    round the encoder's gradient differently (16-bit grouped product against float32 rows), so the weights agree to
    bf16 precision of the update, lr = 1e-2."""
    reference = trainer_for(architecture, None, autocast=True)
    row_sparse = trainer_for(architecture, "adam_row_sparse", autocast=True)
    start = row_sparse.sae.W_dec.detach().clone()
    train(reference, range(STEPS))
    train(row_sparse, range(STEPS))
    assert all(param.dtype == torch.float32 for param in row_sparse.sae.parameters())
    moved = (row_sparse.sae.W_dec - start).abs().max()
    for name, tensor in reference.sae.state_dict().items():
        torch.testing.assert_close(row_sparse.sae.state_dict()[name], tensor, rtol=0, atol=0.1 * float(moved), msg=name)


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_the_backward_leaves_only_the_step_s_rows(architecture: str) -> None:
    trainer = trainer_for(architecture, "adam_row_sparse")
    sae = trainer.sae
    assert isinstance(sae, RoutedTrainingSAE) and sae.row_gradients is not None
    x = batches()[0]
    output = sae.training_forward_pass(TrainStepInput(x, {}, None, n_training_steps=1, is_logging_step=False))
    output.loss.backward()
    assert all(param.grad is None for param in sae.parameters())  # nothing for another clip to see
    selected = output.feature_acts.coalesce().indices()[1].unique()
    expected_dims = {"W_dec": 0, "b_enc": 0} | ({"W_enc": 1} if architecture != "scale" else {})
    assert sae.row_sparse_dims() == expected_dims
    for name in expected_dims:
        gradient = sae.row_gradients.take_rows(getattr(sae, name))
        assert gradient is not None
        assert torch.equal(gradient.rows, selected), name  # the main code's latents (no AuxK: nothing dead yet)
        assert gradient.rows.numel() < D_SAE
    dense = set(sae.row_gradients.dense)
    assert (sae.W_enc in dense) == (architecture == "scale")  # Feature Scaling: dense over the routed experts


def test_the_clip_is_sae_lens_s_over_the_same_values() -> None:
    """One step with a learning rate so small that Adam's first update is lr * sign(g): the clipped gradient's
    norm is read back from the first moment, (1 - beta1) * g."""
    trainer = trainer_for("switch", "adam_row_sparse")
    reference = trainer_for("switch", "adam")
    x = batches()[0] * 100  # a large gradient, so the clip acts
    reference.step(x)
    trainer.step(x)
    beta1 = trainer.cfg.adam_beta1
    sparse_norm = math.sqrt(sum(float(state["exp_avg"].pow(2).sum()) for state in trainer.optimizer.state.values()))
    dense_norm = math.sqrt(sum(float(state["exp_avg"].pow(2).sum()) for state in reference.optimizer.state.values()))
    assert sparse_norm / (1 - beta1) == pytest.approx(1.0, rel=1e-4)
    assert sparse_norm == pytest.approx(dense_norm, rel=1e-4)


def test_a_resumed_row_sparse_run_continues_bit_exactly_and_adam_runs_convert(tmp_path: Path) -> None:
    uninterrupted = trainer_for("switch", "adam_row_sparse")
    train(uninterrupted, range(STEPS))
    interrupted = trainer_for("switch", "adam_row_sparse")
    train(interrupted, range(4))
    interrupted.save_trainer_state(tmp_path)
    weights = {name: tensor.clone() for name, tensor in interrupted.sae.state_dict().items()}
    resumed = trainer_for("switch", "adam_row_sparse", {"weights": weights, "folder": tmp_path})
    train(resumed, range(4, STEPS))
    for name, tensor in uninterrupted.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], tensor), name
    for expected, got in zip(uninterrupted.optimizer.state.values(), resumed.optimizer.state.values(), strict=True):
        assert all(torch.equal(got[key], value) for key, value in expected.items())

    with pytest.raises(ValueError, match=r"optimizer='adam_fused' resumes a run trained with 'adam_row_sparse'"):
        trainer_for("switch", "adam_fused", {"weights": weights, "folder": tmp_path})

    adam = trainer_for("switch", "adam")
    train(adam, range(4))
    adam.save_trainer_state(tmp_path / "adam")
    converted = trainer_for(
        "switch", "adam_row_sparse", {"weights": adam.sae.state_dict(), "folder": tmp_path / "adam"}
    )
    train(converted, range(4, 5))
    for name in ("W_dec", "W_enc"):  # W_enc's moments are stored transposed, rows (latents) first
        state, adam_state = (trainer.optimizer.state[getattr(trainer.sae, name)] for trainer in (converted, adam))
        assert set(state["row_steps"].tolist()) == {4, 5}  # every row had Adam's 4 steps; the fifth's rows have 5
        untouched = state["row_steps"] == 4
        expected = adam_state["exp_avg"] if name == "W_dec" else adam_state["exp_avg"].T
        assert torch.equal(state["exp_avg"][untouched], expected[untouched]), name


def test_unsupported_combinations_are_refused_before_any_step() -> None:
    topk = TrainingSAE.from_dict(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4).to_dict())
    cfg = SAETrainerConfig(
        total_training_samples=BATCH,
        train_batch_size_samples=BATCH,
        lr_end=1e-4,
        logger=LoggingConfig(log_to_wandb=False),
    )
    with pytest.raises(ValueError, match=r"the SAE config is TopKTrainingSAEConfig \('topk'\)"):
        use_optimizer(SAETrainer(cfg, topk, data_provider=iter([])), "adam_row_sparse")


def test_a_rerouted_training_pass_is_refused() -> None:
    """A wrapper of the pass (torch.compile, DDP) would not see the row gradients this optimizer reduces itself."""
    sae = TrainingSAE.from_dict(CONFIGS["switch"].to_dict())
    own_pass = sae.training_forward_pass
    sae.training_forward_pass = lambda step_input: own_pass(step_input)  # type: ignore[method-assign]
    cfg = SAETrainerConfig(
        total_training_samples=BATCH,
        train_batch_size_samples=BATCH,
        lr_end=1e-4,
        logger=LoggingConfig(log_to_wandb=False),
    )
    with pytest.raises(
        ValueError, match=r"needs the SAE's own training pass, and sae.training_forward_pass was rerouted"
    ):
        use_optimizer(SAETrainer(cfg, sae, data_provider=iter([])), "adam_row_sparse")


def test_the_runners_refuse_an_unsupported_combination_when_built(
    tiny_model: HookedTransformer, token_dataset: Any
) -> None:
    topk = tiny_runner_config(TopKTrainingSAEConfig(d_in=32, d_sae=64, k=4), Path("unused"))
    with pytest.raises(
        ValueError, match=r"the SAE config is TopKTrainingSAEConfig \('topk'\): use optimizer='adam_fused'"
    ):
        OptimizedSAETrainingRunner(
            topk, override_dataset=token_dataset, override_model=tiny_model, optimizer="adam_row_sparse"
        )
    switch = tiny_runner_config(tiny_sae_config("switch"), Path("unused"))
    with pytest.raises(ValueError, match=r"'adam_row_sparse' with expert_parallel=True is not supported"):
        DistributedSAETrainingRunner(switch, expert_parallel=True, optimizer="adam_row_sparse")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_the_row_gradients_are_the_dense_gradient_s_nonzero_rows(architecture: str, device: str) -> None:
    """One step with AuxK (a third of the latents dead): the row lists hold exactly the dense backward's rows, every
    other row of it is zero, and the other parameters' gradients are the dense backward's."""
    config = CONFIGS[architecture].to_dict() | {"device": device}
    saes = []
    for _ in range(2):
        torch.manual_seed(0)
        saes.append(TrainingSAE.from_dict(config))
    dense, row_sparse = saes
    assert isinstance(row_sparse, RoutedTrainingSAE)
    x = batches()[0].to(device)
    dead = torch.rand(D_SAE, generator=torch.Generator().manual_seed(2)).lt(1 / 3).to(device)
    step = TrainStepInput(x, {}, dead, n_training_steps=1, is_logging_step=False)
    dense.training_forward_pass(step).loss.backward()
    named = dict(row_sparse.named_parameters())
    dims = row_sparse.row_sparse_dims()
    row_sparse.row_gradients = RowGradients(param for name, param in named.items() if name not in dims)
    row_sparse.training_forward_pass(step).loss.backward()
    assert row_sparse.row_gradients is not None
    for name, param in dense.named_parameters():
        assert param.grad is not None
        if name not in dims:
            torch.testing.assert_close(row_sparse.row_gradients.dense[named[name]], param.grad, msg=name)
            continue
        gradient = row_sparse.row_gradients.take_rows(named[name])
        assert gradient is not None
        full = param.grad.movedim(dims[name], 0)
        torch.testing.assert_close(gradient.values, full[gradient.rows], rtol=1e-5, atol=1e-6, msg=name)
        others = torch.ones(full.shape[0], dtype=torch.bool, device=device)
        others[gradient.rows] = False
        assert float(full[others].abs().max()) == 0.0, name
        assert 0 < gradient.rows.numel() < D_SAE, name
