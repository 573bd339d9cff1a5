"""Switch SAE is the Scale engine with one active expert and no Feature Scaling."""

import pytest
import torch

from sae_lens_scale import SwitchSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig
from sae_lens_scale.validation import ConfigError
from tests.support.builders import scale_training_sae


def test_switch_equals_scale_with_one_expert_and_no_feature_scaling() -> None:
    scale = scale_training_sae(seed=2, n_active_experts=1, feature_scaling="none")
    switch = SwitchTrainingSAE(SwitchTrainingSAEConfig(d_in=16, d_sae=64, n_experts=8, k=6, dtype="float64"))
    switch.load_state_dict(scale.state_dict())
    x = torch.randn(30, 16, dtype=torch.float64)
    torch.testing.assert_close(switch(x), scale(x), rtol=0, atol=0)
    assert ((switch.encode(x) != 0).view(30, 8, -1).any(-1).sum(-1) <= 1).all()


@pytest.mark.parametrize("config_class", [SwitchSAEConfig, SwitchTrainingSAEConfig])
def test_more_than_one_active_expert_is_refused(config_class: type) -> None:
    with pytest.raises(ConfigError, match=rf"{config_class.__name__}.n_active_experts=2 must be 1: .* Scale SAE"):
        config_class(d_in=16, d_sae=64, n_experts=8, n_active_experts=2, k=4)
