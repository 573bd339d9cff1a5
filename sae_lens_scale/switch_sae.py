"""Switch SAE (Mudide et al., arXiv 2410.08201): each token uses ONE expert, top-k inside it, output scaled by the
router probability. The Scale engine with one active expert and no Feature Scaling."""

from dataclasses import dataclass

from typing_extensions import override

from sae_lens_scale.routed_sae import RoutedSAE, RoutedSAEConfig, RoutedTrainingSAE, RoutedTrainingSAEConfig
from sae_lens_scale.validation import fail


@dataclass
class SwitchSAEConfig(RoutedSAEConfig):
    """Inference config of a Switch SAE: ``n_experts`` experts, one per token, ``k`` latents inside it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_active_experts != 1:
            fail(
                self,
                "n_active_experts",
                "must be 1: a Switch SAE routes each token to one expert; for several, use a Scale SAE "
                "(ScaleSAEConfig / ScaleTrainingSAEConfig)",
            )

    @override
    @classmethod
    def architecture(cls) -> str:
        return "switch"


class SwitchSAE(RoutedSAE[SwitchSAEConfig]):
    """Inference Switch SAE."""


@dataclass(kw_only=True)
class SwitchTrainingSAEConfig(SwitchSAEConfig, RoutedTrainingSAEConfig):
    """Training config of a Switch SAE: the inference fields plus the routed training losses."""


class SwitchTrainingSAE(RoutedTrainingSAE[SwitchTrainingSAEConfig]):
    """Training Switch SAE; exports to SwitchSAE."""
