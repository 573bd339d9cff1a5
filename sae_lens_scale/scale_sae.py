"""Scale SAE (Xu et al., arXiv 2511.05745): each token uses its top-e experts, one global top-k over their latents,
outputs weighted by router probability, and Feature Scaling of each expert's encoder during training."""

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from typing_extensions import override

from sae_lens_scale.routed_sae import RoutedSAE, RoutedSAEConfig, RoutedTrainingSAE, RoutedTrainingSAEConfig
from sae_lens_scale.validation import require_choice

FeatureScaling = Literal["mean", "none"]


@dataclass
class ScaleSAEConfig(RoutedSAEConfig):
    """Inference config of a Scale SAE; Feature Scaling is folded into W_enc, so it has no field here.

    Args:
        n_active_experts: experts each token is routed to (e); the global top-k runs over their e * m latents.
    """

    n_active_experts: int = 2

    @override
    @classmethod
    def architecture(cls) -> str:
        return "scale"


class ScaleSAE(RoutedSAE[ScaleSAEConfig]):
    """Inference Scale SAE."""


@dataclass(kw_only=True)
class ScaleTrainingSAEConfig(ScaleSAEConfig, RoutedTrainingSAEConfig):
    """Training config of a Scale SAE: the inference fields, the routed training losses and Feature Scaling.

    Args:
        feature_scaling: "mean" trains a per-expert omega that amplifies each encoder column's deviation from its
            expert's mean column (the paper's default); "none" trains a plain encoder.
    """

    feature_scaling: FeatureScaling = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice(self, "feature_scaling", get_args(FeatureScaling))


class ScaleTrainingSAE(RoutedTrainingSAE[ScaleTrainingSAEConfig]):
    """Training Scale SAE; exports to ScaleSAE with omega folded into W_enc."""

    omega: nn.Parameter

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        if self.cfg.feature_scaling == "mean":
            self.omega = nn.Parameter(torch.zeros(self.cfg.n_experts, dtype=self.dtype, device=self.device))

    @override
    def feature_scaling_omega(self) -> Tensor | None:
        return self.omega if self.cfg.feature_scaling == "mean" else None

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Weights without omega are an export, which folded it into W_enc: training continues from omega = 0,
        which encodes exactly as the export."""
        if self.cfg.feature_scaling == "mean":
            state_dict.setdefault("omega", torch.zeros(self.cfg.n_experts, dtype=self.dtype))
        super().process_state_dict_for_loading(state_dict)
