"""SAELens's training runner with a choice of optimizer: one line to train faster, the runner config unchanged."""

from typing import Any

from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens.hook_points import HookedRootModule

from sae_lens_scale.optimizers import OptimizerName, check_optimizer_choice, use_optimizer


class OptimizedSAETrainingRunner(LanguageModelSAETrainingRunner):
    """``LanguageModelSAETrainingRunner`` with ``optimizer``: ``"adam"`` (SAELens's own, the default, exactly its
    behaviour), ``"adam_fused"`` (the same Adam in torch's fused implementation) or ``"adam_row_sparse"`` (routed
    SAEs: ``RowSparseAdam``, which steps only the selected latents' rows). Everything else is SAELens's: the trainer,
    checkpoints and resume (the optimizer state included), and the clip of the gradient norm to 1 (which
    ``RowSparseAdam`` applies in its step)."""

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_sae: TrainingSAE[Any] | None = None,
        optimizer: OptimizerName = "adam",
    ) -> None:
        check_optimizer_choice(optimizer, cfg.sae)
        self.optimizer_name: OptimizerName = optimizer
        super().__init__(
            cfg, override_dataset=override_dataset, override_model=override_model, override_sae=override_sae
        )

    def run_trainer_with_interruption_handling(self, trainer: SAETrainer[Any, Any]) -> TrainingSAE[Any]:
        """SAELens's training, after the trainer (and a resumed trainer's state) moved to the chosen optimizer."""
        use_optimizer(trainer, self.optimizer_name)
        return super().run_trainer_with_interruption_handling(trainer)
