"""SAELens plugin: Scale SAE and Switch SAE as first-class SAELens architectures.

``import sae_lens_scale`` registers ``"scale"`` and ``"switch"`` with SAELens, so its runner, loaders, evals and
HookedSAETransformer handle them like the built-in architectures. The import loads only the plugin itself; the
command-line tools live in ``sae_lens_scale.tools`` (``pip install "sae-lens-scale[demo]"``).
"""

from typing import Any

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from sae_lens_scale.routed_sae import RoutedSAE, RoutedSAEConfig, RoutedTrainingSAE, RoutedTrainingSAEConfig
from sae_lens_scale.scale_sae import ScaleSAE, ScaleSAEConfig, ScaleTrainingSAE, ScaleTrainingSAEConfig
from sae_lens_scale.switch_sae import SwitchSAE, SwitchSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig
from sae_lens_scale.training_runner import OptimizedSAETrainingRunner

__version__ = "0.4.0"

ARCHITECTURES: dict[
    str, tuple[type[RoutedSAE[Any]], type[RoutedSAEConfig], type[RoutedTrainingSAE[Any]], type[RoutedTrainingSAEConfig]]
] = {
    "scale": (ScaleSAE, ScaleSAEConfig, ScaleTrainingSAE, ScaleTrainingSAEConfig),
    "switch": (SwitchSAE, SwitchSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig),
}


class ArchitectureConflictError(ValueError):
    """Another package already registered different classes under the name "scale" or "switch"."""


def register() -> None:
    """Register both architectures with SAELens. Registering the same classes again is a no-op; a name that another
    package already holds raises :class:`ArchitectureConflictError` naming both classes.

    The inference class goes first because SAELens's training config looks it up while it is constructed.
    """
    for name, (sae_class, config_class, training_class, training_config_class) in ARCHITECTURES.items():
        if _unregistered(SAE_CLASS_REGISTRY, name, (sae_class, config_class)):
            register_sae_class(name, sae_class, config_class)
        if _unregistered(SAE_TRAINING_CLASS_REGISTRY, name, (training_class, training_config_class)):
            register_sae_training_class(name, training_class, training_config_class)


def _unregistered(registry: dict[str, tuple[type, type]], name: str, classes: tuple[type, type]) -> bool:
    """Whether ``name`` is free; False if it already holds ``classes``; an error if it holds anything else."""
    held = registry.get(name)
    if held is None:
        return True
    if held != classes:
        raise ArchitectureConflictError(
            f"SAELens already has architecture {name!r} registered as {_qualified(held[0])} "
            f"(config {_qualified(held[1])}), so sae_lens_scale cannot register {_qualified(classes[0])} under that "
            f"name. Two packages claim {name!r}: import only one of them in this process."
        )
    return False


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


register()

__all__ = [
    "ARCHITECTURES",
    "ArchitectureConflictError",
    "OptimizedSAETrainingRunner",
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
