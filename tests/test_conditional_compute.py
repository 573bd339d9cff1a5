"""The property that makes routed SAEs fast: matrix work scales with the routed experts, not with d_sae.

Counted with torch's FlopCounterMode, so the test fails if any code path ever multiplies an unrouted expert
(for example a dense [batch, d_sae] encoder product), whatever the machine's speed.
"""

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput
from torch.utils.flop_counter import FlopCounterMode

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig
from sae_lens_scale.flops import routed_flops

D_IN, D_SAE, N_EXPERTS, K, BATCH = 64, 4096, 32, 16, 256


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("n_active", [1, 2, 8])
def test_training_step_matmul_flops_are_those_of_the_routed_experts(n_active: int) -> None:
    torch.manual_seed(0)
    sae = ScaleTrainingSAE(
        ScaleTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_experts=N_EXPERTS, n_active_experts=n_active, k=K)
    )
    x = torch.randn(BATCH, D_IN)
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    outputs = []
    forward = counted_flops(lambda: outputs.append(sae.training_forward_pass(step)))
    backward = counted_flops(lambda: outputs[0].loss.backward())

    expected = routed_flops(D_IN, D_SAE, N_EXPERTS, n_active, K)
    assert forward == BATCH * (expected.encoder)  # router + routed expert blocks; the decode is a gather
    assert backward == 2 * forward  # gradients of the same products, nothing more
    dense_encoder = 2 * BATCH * D_IN * D_SAE
    assert forward <= dense_encoder * (n_active / N_EXPERTS + 1 / (D_SAE / N_EXPERTS))


def test_encode_for_inference_multiplies_only_routed_experts() -> None:
    torch.manual_seed(0)
    sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_experts=N_EXPERTS, n_active_experts=2, k=K))
    x = torch.randn(BATCH, D_IN)
    with torch.no_grad():
        flops = counted_flops(lambda: sae.encode(x))
    assert flops == BATCH * routed_flops(D_IN, D_SAE, N_EXPERTS, 2, K).encoder
