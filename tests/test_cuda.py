"""The engine on a CUDA GPU: the dense reference in float32 and under bf16 autocast, one host read per step, and no
[batch, d_sae] tensor. Skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them where one is lent."""

import warnings

import pytest
import torch

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig
from sae_lens_scale.routing import uses_grouped_mm
from sae_lens_scale.scale_sae import FeatureScaling
from tests.support.builders import StepAudit, dense_reference, perturbed, step_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

D_IN, D_SAE, N_EXPERTS, K, BATCH = 64, 4096, 32, 16, 512


def cuda_sae(n_active_experts: int, feature_scaling: FeatureScaling) -> ScaleTrainingSAE:
    torch.manual_seed(0)
    cfg = ScaleTrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        n_experts=N_EXPERTS,
        n_active_experts=n_active_experts,
        k=K,
        feature_scaling=feature_scaling,
        device="cuda",
    )
    return perturbed(ScaleTrainingSAE(cfg))


@pytest.mark.parametrize(("n_active_experts", "feature_scaling"), [(1, "none"), (2, "mean"), (8, "mean")])
def test_float32_training_pass_equals_dense_reference(n_active_experts: int, feature_scaling: FeatureScaling) -> None:
    sae = cuda_sae(n_active_experts, feature_scaling)
    x = 2 * torch.randn(BATCH, D_IN, device="cuda")
    dead = torch.rand(D_SAE, device="cuda") < 0.3
    out = sae.training_forward_pass(step_input(x, dead))
    ref = dense_reference(sae, x, dead)
    torch.testing.assert_close(out.sae_out, ref["x_hat"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.losses["mse_loss"], ref["mse"], rtol=1e-4, atol=1e-4)
    out.loss.backward()
    fast = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    ref["loss"].backward()
    for name, parameter in sae.named_parameters():
        torch.testing.assert_close(fast[name], parameter.grad, rtol=1e-3, atol=1e-3, msg=name)


def test_bf16_autocast_training_pass_is_close_to_float32() -> None:
    """Under autocast the experts run in bf16 (a single CUTLASS grouped GEMM on SM90+), the router in float32."""
    sae = cuda_sae(2, "mean")
    x = 2 * torch.randn(BATCH, D_IN, device="cuda")
    dead = torch.zeros(D_SAE, dtype=torch.bool, device="cuda")
    full = sae.training_forward_pass(step_input(x, dead))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = sae.training_forward_pass(step_input(x, dead))
    assert uses_grouped_mm(torch.bfloat16, D_IN, D_SAE // N_EXPERTS)
    relative = ((mixed.sae_out.float() - full.sae_out).norm() / full.sae_out.norm()).item()
    assert relative < 2e-2
    assert mixed.loss.isfinite()


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0), reason="bf16 grouped GEMM needs SM80+"
)
def test_a_bf16_step_synchronises_once_and_never_builds_batch_by_width() -> None:
    """CUDA's own sync detector, in warning mode, over forward and backward of a non-logging step with AuxK on."""
    sae = cuda_sae(2, "mean")
    x = torch.randn(BATCH, D_IN, device="cuda")
    dead = torch.zeros(D_SAE, dtype=torch.bool, device="cuda")
    dead[::3] = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sae.training_forward_pass(step_input(x, dead)).loss.backward()  # warm-up: lazy CUDA initialisation syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as syncs, StepAudit() as audit:
            warnings.simplefilter("always")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = sae.training_forward_pass(step_input(x, dead))
            out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    messages = [str(w.message) for w in syncs if "synchroniz" in str(w.message)]
    assert len(messages) == 1, messages  # the step's checks, copied to the host together
    assert audit.host_reads == [] and audit.data_dependent == []
    assert audit.largest[0] == D_IN * D_SAE, audit.largest
