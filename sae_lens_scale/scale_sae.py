"""Scale SAE (Xu et al., arXiv 2511.05745): each token uses its top-e experts, one global top-k over their latents,
outputs weighted by router probability, and Feature Scaling of each expert's encoder during training."""

from dataclasses import dataclass

from typing_extensions import override

from sae_lens_scale.routed_sae import RoutedSAE, RoutedSAEConfig, RoutedTrainingSAE, RoutedTrainingSAEConfig


@dataclass
class ScaleSAEConfig(RoutedSAEConfig):
    """Inference config of a Scale SAE.

    Args:
        n_active_experts: experts each token is routed to (e); the global top-k runs over their e * m latents.
    """

    n_active_experts: int = 2

    @override
    @classmethod
    def architecture(cls) -> str:
        return "scale"


class ScaleSAE(RoutedSAE[ScaleSAEConfig]):
    """Inference Scale SAE. Feature Scaling is already folded into W_enc."""


@dataclass(kw_only=True)
class ScaleTrainingSAEConfig(RoutedTrainingSAEConfig):
    """Training config of a Scale SAE.

    Args:
        n_active_experts: experts each token is routed to (e); the global top-k runs over their e * m latents.
        feature_scaling: "mean" trains a per-expert omega that amplifies each encoder column's deviation from its
            expert's mean column (the paper's default); "none" trains a plain encoder.
    """

    n_active_experts: int = 2
    feature_scaling: str = "mean"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "scale"


class ScaleTrainingSAE(RoutedTrainingSAE[ScaleTrainingSAEConfig]):
    """Training Scale SAE; exports to ScaleSAE with omega folded into W_enc."""
