"""The optimizer SAELens's trainer steps with, chosen by name.

SAELens's ``SAETrainer`` builds ``torch.optim.Adam(sae.parameters(), lr, betas)``, which on a CPU runs torch's
one-tensor-at-a-time loop. At wide dictionaries that pass over every parameter and both moments costs more than a
routed SAE's forward and backward. ``"adam_fused"`` is the same Adam update in torch's fused implementation, one
pass over the memory, for any SAE architecture.
"""

from typing import Any, Literal, get_args

from sae_lens.training.optim import get_lr_scheduler
from sae_lens.training.sae_trainer import SAETrainer
from torch.optim import Adam

OptimizerName = Literal["adam", "adam_fused"]
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

    ``"adam"`` leaves SAELens's trainer exactly as it is.
    """
    check_optimizer_name(optimizer)
    if optimizer == "adam":
        return
    cfg = trainer.cfg
    try:
        fused = Adam(trainer.sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
    except RuntimeError as error:
        raise ValueError(
            f"optimizer='adam_fused' cannot step this SAE's parameters ({error}); use optimizer='adam'."
        ) from error
    assert cfg.lr_end is not None  # set by the trainer config's __post_init__
    schedule = get_lr_scheduler(
        cfg.lr_scheduler_name,
        lr=cfg.lr,
        optimizer=fused,
        warm_up_steps=cfg.lr_warm_up_steps,
        decay_steps=cfg.lr_decay_steps,
        training_steps=cfg.total_training_steps,
        lr_end=cfg.lr_end,
        num_cycles=cfg.n_restart_cycles,
    )
    # The state dict carries the moments, the step counts and each group's current lr, and also the implementation
    # flags of the Adam it came from: those are this one's.
    implementation = {key: fused.defaults[key] for key in ("foreach", "fused")}
    fused.load_state_dict(trainer.optimizer.state_dict())
    for group in fused.param_groups:
        group.update(implementation)
    schedule.load_state_dict(trainer.lr_scheduler.state_dict())
    trainer.optimizer, trainer.lr_scheduler = fused, schedule
