"""The optimizer SAELens's trainer steps with, chosen by name.

SAELens's ``SAETrainer`` builds ``torch.optim.Adam(sae.parameters(), lr, betas)``, which on a CPU runs torch's
one-tensor-at-a-time loop. At wide dictionaries that pass over every parameter and both moments costs more than a
routed SAE's forward and backward. ``"adam_fused"`` is the same Adam update in torch's fused implementation, one
pass over the memory, for any SAE architecture. ``"adam_row_sparse"`` (``RowSparseAdam``, routed SAEs only) steps
only the rows of the latents a step selected, and its gradients never exist at the dictionary's size.
"""

from typing import Any, Literal, get_args

from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAEConfig
from sae_lens.training.optim import get_lr_scheduler
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import LRScheduler

from sae_lens_scale.routed_sae import RoutedTrainingSAE, RoutedTrainingSAEConfig
from sae_lens_scale.routing import LocalExperts
from sae_lens_scale.row_sparse_adam import RowGradients, RowSparseAdam

OptimizerName = Literal["adam", "adam_fused", "adam_row_sparse"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)


def check_optimizer_name(optimizer: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer={optimizer!r} is not an optimizer of sae_lens_scale: use one of {OPTIMIZERS} ('adam' is "
            "SAELens's own)."
        )


def use_optimizer(trainer: SAETrainer[Any, Any], optimizer: OptimizerName) -> None:
    """Give ``trainer`` the named optimizer in place of its Adam, with the same hyperparameters, moments and learning
    rate schedule, so a trainer that resumed from a checkpoint goes on from where it was.

    ``"adam"`` leaves SAELens's trainer exactly as it is. A combination the optimizer cannot train raises
    ``ValueError`` here, before any step.
    """
    check_optimizer_name(optimizer)
    state = trainer.optimizer.state_dict()
    if optimizer != "adam_row_sparse" and any("row_steps" in moments for moments in state["state"].values()):
        raise ValueError(
            f"optimizer={optimizer!r} resumes a run trained with 'adam_row_sparse', whose rows have their own step "
            "counts that Adam's single count cannot hold: resume it with optimizer='adam_row_sparse'."
        )
    if optimizer == "adam":
        return
    cfg = trainer.cfg
    replacement = row_sparse_adam(trainer) if optimizer == "adam_row_sparse" else fused_adam(trainer)
    schedule = lr_schedule(cfg, replacement)
    # The state dict carries the moments, the step counts and each group's current lr, and also the implementation
    # flags of the Adam it came from: those are this one's.
    implementation = {key: replacement.defaults[key] for key in ("foreach", "fused") if key in replacement.defaults}
    replacement.load_state_dict(state)
    for group in replacement.param_groups:
        group.update(implementation)
    schedule.load_state_dict(trainer.lr_scheduler.state_dict())
    # SAELens annotates its trainer's optimizer as Adam, and uses only torch's Optimizer interface of it.
    trainer.optimizer = replacement  # pyright: ignore[reportAttributeAccessIssue]
    trainer.lr_scheduler = schedule


def lr_schedule(cfg: SAETrainerConfig, optimizer: Optimizer) -> LRScheduler:
    """The learning-rate schedule SAELens's trainer builds for its optimizer, for ``optimizer``."""
    assert cfg.lr_end is not None  # set by the trainer config's __post_init__
    return get_lr_scheduler(
        cfg.lr_scheduler_name,
        lr=cfg.lr,
        optimizer=optimizer,
        warm_up_steps=cfg.lr_warm_up_steps,
        decay_steps=cfg.lr_decay_steps,
        training_steps=cfg.total_training_steps,
        lr_end=cfg.lr_end,
        num_cycles=cfg.n_restart_cycles,
    )


def fused_adam(trainer: SAETrainer[Any, Any]) -> Optimizer:
    cfg = trainer.cfg
    try:
        return Adam(trainer.sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
    except RuntimeError as error:
        raise ValueError(
            f"optimizer='adam_fused' cannot step this SAE's parameters ({error}); use optimizer='adam'."
        ) from error


def check_optimizer_choice(optimizer: str, sae_cfg: TrainingSAEConfig) -> None:
    """Refuse, before anything is built, an optimizer that cannot train this SAE config."""
    check_optimizer_name(optimizer)
    if optimizer == "adam_row_sparse" and not isinstance(sae_cfg, RoutedTrainingSAEConfig):
        raise ValueError(
            f"optimizer='adam_row_sparse' steps the rows of a routed SAE's selected latents, and the SAE config is "
            f"{type(sae_cfg).__name__} ({sae_cfg.architecture()!r}): use optimizer='adam_fused', or a 'scale' or "
            "'switch' SAE."
        )


def row_sparse_adam(trainer: SAETrainer[Any, Any]) -> Optimizer:
    """``RowSparseAdam`` over a routed SAE whose experts are all on this device, its gradients reduced over the SAE's
    ``batch_parts``; the SAE's backward then leaves its row-sparse gradients for it."""
    sae, cfg = trainer.sae, trainer.cfg
    check_optimizer_choice("adam_row_sparse", sae.cfg)
    assert isinstance(sae, RoutedTrainingSAE)
    if not isinstance(sae.experts, LocalExperts):
        raise ValueError(
            f"optimizer='adam_row_sparse' needs every expert on this device, and this SAE computes them with "
            f"{type(sae.experts).__name__}: the row-sparse decode gathers the experts' rows here. Use "
            "optimizer='adam_fused'."
        )
    if "training_forward_pass" in vars(sae):
        raise ValueError(
            "optimizer='adam_row_sparse' needs the SAE's own training pass, and sae.training_forward_pass was "
            f"rerouted ({sae.training_forward_pass!r}: torch.compile with compile_sae=True, or a wrapper such as "
            "DistributedDataParallel, which would average gradients this optimizer averages itself). Turn "
            "compile_sae off; for data parallelism use DistributedSAETrainingRunner(cfg, optimizer='adam_row_sparse')."
        )
    named = dict(sae.named_parameters())
    row_dims: dict[Tensor, int] = {named[name]: dim for name, dim in sae.row_sparse_dims().items()}
    if sae.row_gradients is None:  # once per SAE: it holds the hooks
        sae.row_gradients = RowGradients(param for param in named.values() if param not in row_dims)
    return RowSparseAdam(
        sae.parameters(),
        row_dims,
        sae.row_gradients,
        sae.batch_parts,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
    )
