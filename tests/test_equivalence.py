"""The fast routed path against a plain dense computation of the same math (DESIGN.md section 2).

The reference below computes EVERY expert for every token, masks the unrouted ones, takes the global top-k and
decodes densely: the way the authors' code works. Run in float64 so agreement is exact up to rounding.
"""

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig

D_IN, D_SAE, N_EXPERTS, K = 12, 48, 6, 5


def make_sae(n_active: int, feature_scaling: str, seed: int = 0) -> ScaleTrainingSAE:
    torch.manual_seed(seed)
    cfg = ScaleTrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        n_experts=N_EXPERTS,
        n_active_experts=n_active,
        k=K,
        feature_scaling=feature_scaling,
        dtype="float64",
    )
    sae = ScaleTrainingSAE(cfg)
    with torch.no_grad():  # move every parameter off its special init so each term of the math matters
        for param in sae.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return sae


def dense_reference(sae: ScaleTrainingSAE, x: torch.Tensor, dead: torch.Tensor) -> dict[str, torch.Tensor]:
    cfg = sae.cfg
    m = cfg.d_sae // cfg.n_experts
    W_enc = sae.W_enc
    if cfg.feature_scaling == "mean":
        blocks = []
        for i in range(cfg.n_experts):
            W_i = W_enc[:, i * m : (i + 1) * m]
            mean_i = W_i.mean(dim=1, keepdim=True)
            blocks.append(mean_i + (1 + sae.omega[i]) * (W_i - mean_i))
        W_enc = torch.cat(blocks, dim=1)
    probs = torch.softmax((x - sae.b_router) @ sae.W_router, dim=-1)
    top_experts = probs.topk(cfg.n_active_experts, dim=-1).indices
    expert_of_latent = torch.arange(cfg.d_sae) // m
    routed = (expert_of_latent[None, :, None] == top_experts[:, None, :]).any(-1)
    pre = (x - sae.b_dec) @ W_enc + sae.b_enc
    values, latents = torch.where(routed, pre, -torch.inf).topk(cfg.k, dim=-1)
    z = torch.zeros_like(pre).scatter(1, latents, values.relu())
    acts = probs[:, expert_of_latent] * z
    W_dec_unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    x_hat = acts @ W_dec_unit + sae.b_dec
    mse = (x_hat - x).pow(2).sum(-1).mean()

    counts = torch.stack([(top_experts == i).sum() for i in range(cfg.n_experts)]).to(x.dtype)
    fractions = counts / top_experts.numel()
    balance = cfg.n_experts * (fractions * probs.mean(0)).sum()

    k_aux = min(cfg.d_in // 2, int(dead.sum()))
    aux_values, aux_latents = torch.where(routed & dead, pre, -torch.inf).topk(k_aux, dim=-1)
    aux_acts = probs[:, expert_of_latent] * torch.zeros_like(pre).scatter(1, aux_latents, aux_values.relu())
    aux = (aux_acts @ W_dec_unit - (x - x_hat).detach()).pow(2).sum(-1).mean()
    aux_loss = cfg.aux_loss_coefficient * min(int(dead.sum()) / (cfg.d_in // 2), 1.0) * aux

    loss = mse + cfg.load_balance_coefficient * cfg.d_in * balance + aux_loss
    return {"x_hat": x_hat, "acts": acts, "loss": loss, "mse": mse, "balance": balance, "aux": aux_loss}


def grads_of(sae: ScaleTrainingSAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    return {name: param.grad.clone() for name, param in sae.named_parameters()}


CASES = [(1, "none"), (1, "mean"), (2, "none"), (2, "mean"), (N_EXPERTS, "none"), (N_EXPERTS, "mean")]


@pytest.mark.parametrize(("n_active", "feature_scaling"), CASES)
def test_training_pass_equals_dense_reference(n_active: int, feature_scaling: str) -> None:
    sae = make_sae(n_active, feature_scaling)
    x = torch.randn(40, D_IN, dtype=torch.float64) * 2
    dead = torch.rand(D_SAE) < 0.5
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)

    out = sae.training_forward_pass(step)
    ref = dense_reference(sae, x, dead)

    torch.testing.assert_close(out.sae_out, ref["x_hat"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.feature_acts.to_dense(), ref["acts"], rtol=1e-10, atol=1e-10)
    assert torch.equal(out.feature_acts.to_dense() != 0, ref["acts"] != 0)
    torch.testing.assert_close(out.losses["mse_loss"], ref["mse"], rtol=1e-10, atol=0)
    torch.testing.assert_close(out.losses["auxiliary_reconstruction_loss"], ref["aux"], rtol=1e-10, atol=1e-12)
    assert ref["aux"] > 0
    fast_grads = grads_of(sae, out.loss)
    ref_grads = grads_of(sae, ref["loss"])
    assert fast_grads.keys() == ref_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize(("n_active", "feature_scaling"), CASES)
def test_dense_encode_decode_equal_reference_with_seq_dims(n_active: int, feature_scaling: str) -> None:
    sae = make_sae(n_active, feature_scaling, seed=1)
    x = torch.randn(3, 7, D_IN, dtype=torch.float64)
    ref = dense_reference(sae, x.reshape(-1, D_IN), torch.zeros(D_SAE, dtype=torch.bool))

    acts = sae.encode(x)
    assert acts.shape == (3, 7, D_SAE)
    torch.testing.assert_close(acts.reshape(-1, D_SAE), ref["acts"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sae(x).reshape(-1, D_IN), ref["x_hat"], rtol=1e-10, atol=1e-10)
    assert (acts != 0).sum(-1).max() <= K


def test_switch_equals_scale_with_one_expert_and_no_feature_scaling() -> None:
    scale = make_sae(1, "none", seed=2)
    switch = SwitchTrainingSAE(
        SwitchTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_experts=N_EXPERTS, k=K, dtype="float64")
    )
    switch.load_state_dict(scale.state_dict())
    x = torch.randn(30, D_IN, dtype=torch.float64)
    torch.testing.assert_close(switch(x), scale(x), rtol=0, atol=0)
    assert ((switch.encode(x) != 0).view(30, N_EXPERTS, -1).any(-1).sum(-1) <= 1).all()


@pytest.mark.parametrize("n_active", [1, 2])
def test_unrouted_experts_get_exactly_zero_gradient(n_active: int) -> None:
    sae = make_sae(n_active, "mean", seed=3)
    x = torch.randn(1, D_IN, dtype=torch.float64)
    dead = torch.ones(D_SAE, dtype=torch.bool)  # AuxK on too, so every loss term is exercised
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
    out = sae.training_forward_pass(step)
    grads = grads_of(sae, out.loss)

    routed = set(sae.encode_routed(x).routing.experts.flatten().tolist())
    m = D_SAE // N_EXPERTS
    for expert in range(N_EXPERTS):
        block = slice(expert * m, (expert + 1) * m)
        enc_block, bias_block = grads["W_enc"][:, block], grads["b_enc"][block]
        if expert in routed:
            assert enc_block.abs().sum() > 0
        else:
            assert torch.count_nonzero(enc_block) == 0
            assert torch.count_nonzero(bias_block) == 0
            assert grads["omega"][expert] == 0
