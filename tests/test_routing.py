"""The engine's pieces against hand-worked answers, and its autograd Functions against finite differences."""

import pytest
import torch

from sae_lens_scale.routing import (
    MIN_ROW_NORM,
    LocalExperts,
    RoutedEncoding,
    Routing,
    SparseCode,
    _RoutedExpertMatmul,
    auxk_code,
    dense_acts,
    expert_blocks,
    expert_counts,
    feature_scaled_encoder,
    global_topk,
    group_by_expert,
    load_balance_loss,
    normalized_entropy,
    routed_preactivations,
    row_norms,
    sparse_decode,
    unit_rows,
    uses_grouped_mm,
)


def test_group_by_expert_sorts_assignments_stably_and_counts_them() -> None:
    experts = torch.tensor([[2, 0], [1, 2], [0, 1]])  # assignment ids 0..5, token-major
    groups = group_by_expert(experts, n_experts=4)
    assert groups.order.tolist() == [1, 4, 2, 5, 0, 3]  # expert 0: ids 1, 4; expert 1: 2, 5; expert 2: 0, 3
    assert groups.offsets.tolist() == [2, 4, 6, 6]  # ends of each expert's block; expert 3's is empty
    assert torch.equal(groups.order[groups.unsort], torch.arange(6))


def test_global_topk_picks_across_experts_gates_and_relus() -> None:
    # One token, routed to experts 3 (gate 0.6) and 1 (gate 0.3), m = 3 latents each.
    routing = Routing(probs=torch.zeros(1, 4), experts=torch.tensor([[3, 1]]), gates=torch.tensor([[0.6, 0.3]]))
    candidates = torch.tensor([[1.0, -2.0, 5.0, 4.0, 0.5, -1.0]])
    code = global_topk(candidates, routing, k=5)
    found = dict(zip(code.latents[0].tolist(), code.acts[0].tolist(), strict=True))
    # winners: 5.0 (expert 3, local 2), 4.0 (expert 1, local 0), 1.0 (expert 3, local 0), 0.5 (expert 1, local 1),
    # -1.0 (expert 1, local 2: ReLU gives 0)
    expected = {11: 0.6 * 5.0, 3: 0.3 * 4.0, 9: 0.6 * 1.0, 4: 0.3 * 0.5, 5: 0.0}
    assert found.keys() == expected.keys()
    for latent, act in expected.items():
        assert found[latent] == pytest.approx(act)


EXPERTS = torch.tensor([[0, 2], [2, 1], [0, 1], [2, 0], [1, 2]])  # 5 tokens, 2 slots each; expert 3 gets no token


def test_routed_expert_matmul_passes_gradcheck_with_an_empty_expert() -> None:
    """float64 runs the per-expert loop: torch's grouped GEMM has no float64 kernel."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    W_enc = torch.randn(4, 12, dtype=torch.float64, generator=generator, requires_grad=True)  # 4 experts of 3
    groups = group_by_expert(EXPERTS, n_experts=4)
    assert not uses_grouped_mm(torch.float64, 4, 3)
    assert torch.autograd.gradcheck(lambda x, W: _RoutedExpertMatmul.apply(x, expert_blocks(W, 4), groups), (x, W_enc))


@pytest.mark.parametrize(
    ("dtype", "d_in", "width", "grouped"),
    [(torch.float64, 4, 3, False), (torch.float32, 8, 4, True), (torch.float32, 8, 3, False)],
)
def test_routed_expert_matmul_equals_per_token_products(
    dtype: torch.dtype, d_in: int, width: int, grouped: bool
) -> None:
    """Both ways of running the experts (grouped GEMM, per-expert loop) against a plain per-token loop."""
    assert uses_grouped_mm(dtype, d_in, width) is (grouped and hasattr(torch.nn.functional, "grouped_mm"))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, d_in, dtype=dtype, generator=generator, requires_grad=True)
    W_enc = torch.randn(d_in, 4 * width, dtype=dtype, generator=generator, requires_grad=True)
    out = _RoutedExpertMatmul.apply(x, expert_blocks(W_enc, 4), group_by_expert(EXPERTS, n_experts=4))
    grad_out = torch.randn(out.shape, dtype=dtype, generator=generator)
    out.backward(grad_out)

    x_ref, W_ref = x.detach().clone().requires_grad_(), W_enc.detach().clone().requires_grad_()
    blocks = [W_ref[:, width * e : width * (e + 1)] for e in range(4)]
    plain = torch.stack([x_ref[t] @ blocks[e] for t in range(5) for e in EXPERTS[t].tolist()])  # [token*slot, width]
    plain.backward(grad_out)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, plain, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(W_enc.grad, W_ref.grad, rtol=tolerance, atol=tolerance)
    assert W_enc.grad is not None and torch.count_nonzero(W_enc.grad[:, 3 * width :]) == 0  # expert 3: no token


def test_row_norms_pass_gradcheck_and_stay_finite_on_a_zero_row() -> None:
    W = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(row_norms, (W,))

    with torch.no_grad():
        W[2] = 0
    norms = row_norms(W)
    assert norms[2] == MIN_ROW_NORM
    (W / norms.unsqueeze(1)).sum().backward()
    assert W.grad is not None and torch.isfinite(W.grad).all()
    assert torch.count_nonzero(W.grad[2]) > 0  # a dead row still learns through its own entries
    torch.testing.assert_close(unit_rows(W.detach())[2], torch.zeros(5, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("normalised", [False, True])
def test_sparse_decode_equals_dense_product(normalised: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    W_dec = torch.randn(20, 7, dtype=torch.float64, generator=generator)
    W_dec[4] = 0  # a zero row decodes to nothing, never to NaN
    code = SparseCode(
        latents=torch.tensor([[4, 0, 19], [3, 4, 5]]),
        acts=torch.rand(2, 3, dtype=torch.float64, generator=generator),
    )
    norms = row_norms(W_dec) if normalised else None
    decoder = unit_rows(W_dec) if normalised else W_dec
    expected = dense_acts(code, 20) @ decoder
    torch.testing.assert_close(sparse_decode(code, W_dec, norms), expected, rtol=1e-12, atol=1e-12)


def fractions(routing: Routing, n_experts: int) -> torch.Tensor:
    counts = expert_counts(routing.experts, n_experts)
    return counts / counts.sum()


def test_expert_counts_and_entropy_known_answers() -> None:
    experts = torch.tensor([[0, 2], [2, 3], [2, 0]])
    assert expert_counts(experts, 5).tolist() == [2, 0, 3, 1, 0]
    assert normalized_entropy(torch.full((4,), 0.25)).item() == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([0.0, 1.0, 0.0])).item() == pytest.approx(0.0)
    assert normalized_entropy(torch.tensor([0.5, 0.5, 0.0, 0.0])).item() == pytest.approx(0.5)


def test_load_balance_loss_is_one_when_balanced_and_n_when_collapsed() -> None:
    n_experts = 4
    uniform = torch.full((8, n_experts), 1 / n_experts)
    balanced = Routing(uniform, torch.arange(8).remainder(n_experts).unsqueeze(1), uniform[:, :1])
    assert load_balance_loss(balanced.probs, fractions(balanced, n_experts)).item() == pytest.approx(1.0)
    onehot = torch.zeros(8, n_experts)
    onehot[:, 2] = 1
    collapsed = Routing(onehot, torch.full((8, 1), 2), onehot[:, 2:3])
    assert load_balance_loss(collapsed.probs, fractions(collapsed, n_experts)).item() == pytest.approx(n_experts)


def test_auxk_code_takes_the_largest_dead_candidates_only() -> None:
    routing = Routing(torch.zeros(1, 3), torch.tensor([[2, 0]]), torch.tensor([[0.5, 0.25]]))
    candidates = torch.tensor([[9.0, 3.0, 2.0, 8.0]])  # expert 2: latents 4, 5; expert 0: latents 0, 1
    dead = torch.tensor([True, True, False, False, True, False])
    encoding = RoutedEncoding(routing, candidates, global_topk(candidates, routing, 1), LocalExperts(3))
    code = auxk_code(encoding, dead, k_aux=2)
    found = dict(zip(code.latents[0].tolist(), code.acts[0].tolist(), strict=True))
    assert found == {4: 0.5 * 9.0, 1: 0.25 * 8.0}  # latent 5 is alive; latent 0 is dead but smaller


def test_feature_scaling_on_candidates_equals_the_scaled_encoder() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    W_enc = torch.randn(5, 12, dtype=torch.float64, generator=generator)
    b_enc = torch.randn(12, dtype=torch.float64, generator=generator)
    omega = torch.tensor([0.5, -0.2, 1.5], dtype=torch.float64)
    experts = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0], [1, 2]])
    scaled = feature_scaled_encoder(W_enc, omega)
    for expert in range(3):
        block = W_enc[:, 4 * expert : 4 * expert + 4]
        mean = block.mean(dim=1, keepdim=True)
        torch.testing.assert_close(scaled[:, 4 * expert : 4 * expert + 4], mean + (1 + omega[expert]) * (block - mean))
    fast = routed_preactivations(x, W_enc, b_enc, experts, 3, omega).view(6, 2, 4)
    for token in range(6):
        for slot, expert in enumerate(experts[token].tolist()):
            block = slice(4 * expert, 4 * expert + 4)
            torch.testing.assert_close(fast[token, slot], x[token] @ scaled[:, block] + b_enc[block])
