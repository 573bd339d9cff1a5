"""Switch SAE (Mudide et al., arXiv 2410.08201): each token uses ONE expert, top-k inside it, output scaled by the
router probability. The Scale engine with one active expert and no Feature Scaling."""

from dataclasses import dataclass

from typing_extensions import override

from sae_lens_scale.routed_sae import RoutedSAE, RoutedSAEConfig, RoutedTrainingSAE, RoutedTrainingSAEConfig


@dataclass
class SwitchSAEConfig(RoutedSAEConfig):
    """Inference config of a Switch SAE: ``n_experts`` experts, one per token, ``k`` latents inside it."""

    @property
    def n_active_experts(self) -> int:
        return 1

    @override
    @classmethod
    def architecture(cls) -> str:
        return "switch"


class SwitchSAE(RoutedSAE[SwitchSAEConfig]):
    """Inference Switch SAE."""


@dataclass(kw_only=True)
class SwitchTrainingSAEConfig(RoutedTrainingSAEConfig):
    """Training config of a Switch SAE: ``n_experts`` experts, one per token, ``k`` latents inside it."""

    @property
    def n_active_experts(self) -> int:
        return 1

    @property
    def feature_scaling(self) -> str:
        return "none"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "switch"


class SwitchTrainingSAE(RoutedTrainingSAE[SwitchTrainingSAEConfig]):
    """Training Switch SAE; exports to SwitchSAE."""
