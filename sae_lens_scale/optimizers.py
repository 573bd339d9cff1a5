"""The optimizer SAELens's trainer steps with, chosen by name.

SAELens's ``SAETrainer`` builds ``torch.optim.Adam(sae.parameters(), lr, betas)``, which on a CPU runs torch's
one-tensor-at-a-time loop. At wide dictionaries that pass over every parameter and both moments costs more than a
routed SAE's forward and backward. ``"adam_fused"`` is the same Adam update in torch's fused implementation, one
pass over the memory, for any SAE architecture. ``"adam_row_sparse"`` (``RowSparseAdam``, routed SAEs only) steps
only the rows of the latents a step selected, and its gradients never exist at the dictionary's size.
"""

from typing import Any, Literal, get_args

from sae_lens.saes.sae import TrainingSAEConfig
from sae_lens.training.optim import get_lr_scheduler
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Adam, Optimizer

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
    assert cfg.lr_end is not None  # set by the trainer config's __post_init__
    schedule = get_lr_scheduler(
        cfg.lr_scheduler_name,
        lr=cfg.lr,
        optimizer=replacement,
        warm_up_steps=cfg.lr_warm_up_steps,
        decay_steps=cfg.lr_decay_steps,
        training_steps=cfg.total_training_steps,
        lr_end=cfg.lr_end,
        num_cycles=cfg.n_restart_cycles,
    )
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


def fused_adam(trainer: SAETrainer[Any, Any]) -> Optimizer:
    cfg = trainer.cfg
    try:
        return Adam(trainer.sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
    except RuntimeError as error:
        raise ValueError(
            f"optimizer='adam_fused' cannot step this SAE's parameters ({error}); use optimizer='adam'."
        ) from error


def check_optimizer_choice(
    optimizer: str, sae_cfg: TrainingSAEConfig, autocast: bool, expert_parallel: bool = False
) -> None:
    """Refuse, before anything is built, an optimizer that cannot train this SAE config in this setting."""
    check_optimizer_name(optimizer)
    if optimizer != "adam_row_sparse":
        return
    if not isinstance(sae_cfg, RoutedTrainingSAEConfig):
        raise ValueError(
            f"optimizer='adam_row_sparse' steps the rows of a routed SAE's selected latents, and the SAE config is "
            f"{type(sae_cfg).__name__} ({sae_cfg.architecture()!r}): use optimizer='adam_fused', or a 'scale' or "
            "'switch' SAE."
        )
    if expert_parallel:
        raise ValueError(
            "optimizer='adam_row_sparse' with expert_parallel=True is not supported: the experts' rows are "
            "exchanged between ranks in the decode. Use optimizer='adam_fused' with expert_parallel."
        )
    if autocast:
        raise ValueError(
            "optimizer='adam_row_sparse' with autocast=True is not supported: its row gradients are computed in the "
            "parameters' dtype. Set LanguageModelSAERunnerConfig.autocast=False, or use optimizer='adam_fused'."
        )


def row_sparse_adam(trainer: SAETrainer[Any, Any]) -> Optimizer:
    """``RowSparseAdam`` over a routed SAE on one device or a data-parallel replica of one (its ``batch_parts``);
    the SAE's backward then leaves its row-sparse gradients for it."""
    sae, cfg = trainer.sae, trainer.cfg
    expert_parallel = not isinstance(getattr(sae, "experts", None), LocalExperts)
    check_optimizer_choice("adam_row_sparse", sae.cfg, cfg.autocast, expert_parallel)
    assert isinstance(sae, RoutedTrainingSAE)
    if isinstance(getattr(sae.training_forward_pass, "__self__", None), DistributedDataParallel):
        raise ValueError(
            "optimizer='adam_row_sparse' on an SAE whose training pass DistributedDataParallel replicates: DDP "
            "would average gradients that RowSparseAdam averages itself. Replicate the SAE with "
            "replicate_training_pass(sae, optimizer='adam_row_sparse')."
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
