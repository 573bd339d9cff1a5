"""SAELens plugin: Scale SAE and Switch SAE as first-class SAELens architectures.

``import sae_lens_scale`` registers ``"scale"`` and ``"switch"`` with SAELens, so its runner, loaders, evals and
HookedSAETransformer handle them like the built-in architectures.
"""

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from sae_lens_scale.routed_sae import RoutedSAE, RoutedSAEConfig, RoutedTrainingSAE, RoutedTrainingSAEConfig
from sae_lens_scale.scale_sae import ScaleSAE, ScaleSAEConfig, ScaleTrainingSAE, ScaleTrainingSAEConfig
from sae_lens_scale.switch_sae import SwitchSAE, SwitchSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig

__version__ = "0.1.0"

ARCHITECTURES = {
    "scale": (ScaleSAE, ScaleSAEConfig, ScaleTrainingSAE, ScaleTrainingSAEConfig),
    "switch": (SwitchSAE, SwitchSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig),
}


def register() -> None:
    """Register both architectures with SAELens; safe to call any number of times.

    The inference class goes first because SAELens's training config looks it up while it is constructed.
    """
    for name, (sae_class, config_class, training_class, training_config_class) in ARCHITECTURES.items():
        if name not in SAE_CLASS_REGISTRY:
            register_sae_class(name, sae_class, config_class)
        if name not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(name, training_class, training_config_class)


register()

__all__ = [
    "RoutedSAE",
    "RoutedSAEConfig",
    "RoutedTrainingSAE",
    "RoutedTrainingSAEConfig",
    "ScaleSAE",
    "ScaleSAEConfig",
    "ScaleTrainingSAE",
    "ScaleTrainingSAEConfig",
    "SwitchSAE",
    "SwitchSAEConfig",
    "SwitchTrainingSAE",
    "SwitchTrainingSAEConfig",
    "register",
]
