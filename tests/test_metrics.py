"""The analysis metrics against known answers: planted decoders, hand-built active sets, forced routing."""

import itertools
import json
import math

import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.util import cosine_similarities

from sae_lens_scale import (
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchSAE,
    SwitchSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)
from sae_lens_scale.metrics import (
    activation_similarity,
    expert_redundancy,
    expert_usage,
    feature_redundancy,
    max_cosine_to_others,
    omega_per_expert,
)

D_IN, D_SAE, N_EXPERTS, K = 96, 64, 8, 4


def scale_sae(n_active: int = 2, d_in: int = D_IN, d_sae: int = D_SAE, n_experts: int = N_EXPERTS) -> ScaleSAE:
    torch.manual_seed(0)
    return ScaleSAE(ScaleSAEConfig(d_in=d_in, d_sae=d_sae, n_experts=n_experts, n_active_experts=n_active, k=K))


def switch_sae() -> SwitchSAE:
    torch.manual_seed(0)
    return SwitchSAE(SwitchSAEConfig(d_in=D_IN, d_sae=D_SAE, n_experts=N_EXPERTS, k=K))


def topk_sae() -> TopKSAE:
    torch.manual_seed(0)
    return TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))


def with_decoder(sae, W_dec: torch.Tensor):
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
    return sae


# 3 exact-duplicate pairs, 4 pairs at cosine 0.95, 5 pairs at 0.75, 39 orthogonal latents and one zero row.
PLANTED = {1.0: 3, 0.95: 4, 0.75: 5}
N_ORTHOGONAL = D_SAE - 2 * sum(PLANTED.values()) - 1


def planted_decoder() -> torch.Tensor:
    """Pairs at exact cosines built from an orthonormal basis, rows shuffled and rescaled (cosine ignores norms)."""
    generator = torch.Generator().manual_seed(0)
    basis = iter(torch.linalg.qr(torch.randn(D_IN, D_IN, dtype=torch.float64, generator=generator))[0].T)
    rows = []
    for cosine, n_pairs in PLANTED.items():
        for _ in range(n_pairs):
            anchor = next(basis)
            partner = anchor if cosine == 1.0 else cosine * anchor + math.sqrt(1 - cosine**2) * next(basis)
            rows += [anchor, partner]
    rows += [next(basis) for _ in range(N_ORTHOGONAL)] + [torch.zeros(D_IN, dtype=torch.float64)]
    decoder = torch.stack(rows) * torch.empty(D_SAE, 1, dtype=torch.float64).uniform_(0.5, 2.0, generator=generator)
    return decoder[torch.randperm(D_SAE, generator=generator)].float()


@pytest.mark.parametrize("make_sae, chunk_size", [(scale_sae, 5), (switch_sae, 16), (topk_sae, 1), (topk_sae, 1000)])
def test_feature_redundancy_counts_planted_duplicates_exactly(make_sae, chunk_size: int) -> None:
    result = feature_redundancy(with_decoder(make_sae(), planted_decoder()), chunk_size=chunk_size)
    above_09 = 2 * (PLANTED[1.0] + PLANTED[0.95])
    assert result.fraction_above == {
        0.7: (above_09 + 2 * PLANTED[0.75]) / D_SAE,
        0.8: above_09 / D_SAE,
        0.9: above_09 / D_SAE,
    }
    expected_mean = 2 * sum(cosine * n_pairs for cosine, n_pairs in PLANTED.items()) / D_SAE
    assert result.mean_max_cosine == pytest.approx(expected_mean, abs=1e-6)
    assert sorted(result.max_cosine.tolist())[: N_ORTHOGONAL + 1] == pytest.approx([0.0] * (N_ORTHOGONAL + 1), abs=1e-6)
    assert result.n_latents == D_SAE


def brute_force_max_cosine(vectors: torch.Tensor) -> torch.Tensor:
    sims = cosine_similarities(vectors.double())
    return sims.fill_diagonal_(-torch.inf).amax(dim=1)


def test_max_cosine_matches_brute_force_at_every_chunk_size() -> None:
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(50, 8, generator=generator)
    vectors[10] = 3 * vectors[40]  # a duplicate direction across chunks
    vectors[20] = 0  # a zero row: cosine 0 to everything, no NaN
    expected = brute_force_max_cosine(vectors)
    unchunked = max_cosine_to_others(vectors, chunk_size=50)
    assert not unchunked.isnan().any()
    assert unchunked[20] == 0
    assert unchunked[10] == pytest.approx(1.0, abs=1e-6) and unchunked[40] == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(unchunked.double(), expected, atol=1e-6, rtol=0)
    for chunk_size in (1, 3, 7, 49, 200):
        torch.testing.assert_close(max_cosine_to_others(vectors, chunk_size), unchunked, atol=1e-6, rtol=0)
    exact = max_cosine_to_others(vectors.double(), chunk_size=7)  # float64 in, float64 math
    torch.testing.assert_close(exact, expected, atol=1e-12, rtol=0)


def test_max_cosine_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        max_cosine_to_others(torch.randn(1, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        max_cosine_to_others(torch.randn(4, 4), chunk_size=0)


def brute_force_similarity(active_sets: list[set[int]], k: float) -> float:
    pairs = list(itertools.permutations(range(len(active_sets)), 2))
    return sum(len(active_sets[i] & active_sets[j]) / k for i, j in pairs) / len(pairs)


def acts_from_sets(active_sets: list[set[int]], d_sae: int) -> torch.Tensor:
    acts = torch.zeros(len(active_sets), d_sae)
    for token, latents in enumerate(active_sets):
        acts[token, sorted(latents)] = torch.rand(len(latents)) + 0.1
    return acts


def test_activation_similarity_on_hand_built_sets() -> None:
    sets = [{0, 1, 2}, {0, 1, 3}, {4, 5, 6}, {0, 5, 7}]  # ordered pairs share 2 * (2 + 1 + 1 + 1) = 10 latents
    result = activation_similarity(acts_from_sets(sets, 8))
    assert result.similarity == pytest.approx(10 / (4 * 3 * 3))
    assert (result.n_tokens, result.k, result.mean_l0) == (4, 3.0, 3.0)
    assert activation_similarity(acts_from_sets([{1, 2}] * 5, 8)).similarity == pytest.approx(1.0)
    assert activation_similarity(acts_from_sets([{0, 1}, {2, 3}, {4, 5}], 8)).similarity == 0.0


def test_activation_similarity_matches_pair_loop_on_random_sets() -> None:
    generator = torch.Generator().manual_seed(2)
    sets = [set(torch.randperm(20, generator=generator)[: int(size)].tolist()) for size in torch.randint(1, 7, (30,))]
    acts = acts_from_sets(sets, 20).view(5, 6, 20)  # leading dims are flattened
    result = activation_similarity(acts, k=4)
    assert result.similarity == pytest.approx(brute_force_similarity(sets, k=4), rel=1e-12)
    assert result.mean_l0 == pytest.approx(sum(map(len, sets)) / 30)


@pytest.mark.parametrize("make_sae", [topk_sae, scale_sae, switch_sae])
def test_activation_similarity_from_sae_matches_its_encoding(make_sae) -> None:
    sae = make_sae()
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(3))
    feature_acts = sae.encode(x)
    sets = [set(row.nonzero().flatten().tolist()) for row in feature_acts]
    result = activation_similarity(sae, x, batch_size=7)
    assert result.k == K
    assert result.similarity == pytest.approx(brute_force_similarity(sets, K), rel=1e-12)
    assert result.similarity == pytest.approx(activation_similarity(feature_acts, k=K).similarity, rel=1e-12)


def test_activation_similarity_rejects_ambiguous_input() -> None:
    sae, x = topk_sae(), torch.randn(4, D_IN)
    with pytest.raises(ValueError, match="needs the SAE's input activations"):
        activation_similarity(sae)
    with pytest.raises(ValueError, match="AND input activations"):
        activation_similarity(sae.encode(x), x)
    with pytest.raises(ValueError, match="d_in"):
        activation_similarity(sae, torch.randn(4, D_IN + 1))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        activation_similarity(sae, x[:1])


FORCED_EXPERT = 3


def force_routing(sae):
    """Expert 3's router column reads only input dim 0, which b_router shifts by 50: every token's top choice.

    The other columns ignore dim 0, so each token's second choice is its ordinary argmax over the other experts.
    (A shift much above 80 would underflow the other experts' float32 softmax probabilities to ties at 0.)
    """
    with torch.no_grad():
        sae.W_router[0] = 0
        sae.W_router[:, FORCED_EXPERT] = 0
        sae.W_router[0, FORCED_EXPERT] = 1
        sae.b_router.zero_()[0] = -50
    return sae


def normalized_entropy(fractions: list[float]) -> float:
    return -sum(p * math.log(p) for p in fractions if p > 0) / math.log(len(fractions))


def test_expert_usage_switch_all_tokens_to_forced_expert() -> None:
    x = torch.randn(300, D_IN, generator=torch.Generator().manual_seed(4))
    usage = expert_usage(force_routing(switch_sae()), x, batch_size=64)
    expected = torch.zeros(N_EXPERTS, dtype=torch.int64)
    expected[FORCED_EXPERT] = 300
    assert torch.equal(usage.counts, expected)
    assert usage.fractions.tolist() == (expected / 300).tolist()
    assert usage.normalized_entropy == 0.0
    assert usage.cdf.tolist() == [1.0] * N_EXPERTS
    assert usage.dead_fraction == (N_EXPERTS - 1) / N_EXPERTS
    assert (usage.n_tokens, usage.n_active_experts) == (300, 1)


def test_expert_usage_scale_counts_forced_expert_and_second_choices() -> None:
    sae = force_routing(scale_sae(n_active=2))
    x = torch.randn(300, D_IN, generator=torch.Generator().manual_seed(5))
    usage = expert_usage(sae, x.view(3, 100, D_IN), batch_size=64)
    other_logits = (x @ sae.W_router).index_fill(1, torch.tensor([FORCED_EXPERT]), -torch.inf)
    expected = torch.bincount(other_logits.argmax(dim=1), minlength=N_EXPERTS)
    expected[FORCED_EXPERT] = 300
    assert torch.equal(usage.counts, expected)
    fractions = (expected / 600).tolist()
    assert usage.fractions.tolist() == pytest.approx(fractions)
    assert usage.normalized_entropy == pytest.approx(normalized_entropy(fractions))
    assert usage.cdf.tolist() == pytest.approx(list(itertools.accumulate(sorted(fractions, reverse=True))))
    assert usage.cdf[0] == 0.5 and usage.cdf[-1] == pytest.approx(1.0)
    assert usage.dead_fraction == (expected == 0).sum().item() / N_EXPERTS
    assert usage.n_active_experts == 2


def specialised_decoder(n_experts: int, width: int, d_in: int) -> torch.Tensor:
    """Each expert's block holds noisy copies of its own direction; different experts' directions are orthogonal."""
    generator = torch.Generator().manual_seed(6)
    prototypes = torch.linalg.qr(torch.randn(d_in, n_experts, generator=generator))[0].T
    noise = 0.02 * torch.randn(n_experts, width, d_in, generator=generator)
    return (prototypes.unsqueeze(1) + noise).reshape(n_experts * width, d_in)


def test_expert_redundancy_intra_far_above_inter_for_specialised_experts() -> None:
    sae = with_decoder(scale_sae(d_in=64, d_sae=64, n_experts=16), specialised_decoder(16, 4, 64))
    result = expert_redundancy(sae, threshold=0.9, n_random=20)
    assert result.intra_fraction_above == 1.0 and result.intra_mean_max_cosine > 0.95
    assert result.per_expert_fraction_above.tolist() == [1.0] * 16
    assert (result.per_expert_mean_max_cosine > 0.95).all()
    # a random block of 4 holds another latent of the same expert with probability 1 - C(60,3)/C(63,3) = 0.14
    assert 0.03 < result.inter_fraction_above < 0.3
    assert result.inter_mean_max_cosine < 0.3


def test_expert_redundancy_intra_matches_brute_force_per_block_and_is_seeded() -> None:
    sae = scale_sae()
    blocks = sae.W_dec.detach().view(N_EXPERTS, D_SAE // N_EXPERTS, D_IN)
    expected = torch.stack([brute_force_max_cosine(block) for block in blocks])
    result = expert_redundancy(sae, threshold=0.2, n_random=3, seed=7, chunk_size=3)
    torch.testing.assert_close(result.per_expert_mean_max_cosine, expected.mean(dim=1), atol=1e-6, rtol=0)
    assert result.per_expert_fraction_above.tolist() == (expected > 0.2).double().mean(dim=1).tolist()
    assert result.intra_mean_max_cosine == pytest.approx(expected.mean().item(), abs=1e-6)
    assert result.to_dict() == expert_redundancy(sae, threshold=0.2, n_random=3, seed=7).to_dict()


def test_expert_metrics_reject_dense_saes() -> None:
    sae = topk_sae()
    for call in (
        lambda: expert_redundancy(sae),
        lambda: expert_usage(sae, torch.randn(4, D_IN)),
        lambda: omega_per_expert(sae),
    ):
        with pytest.raises(ValueError, match="n_experts"):
            call()
    with pytest.raises(ValueError, match="at least 2 latents per expert"):
        expert_redundancy(scale_sae(n_experts=D_SAE, n_active=K))


def test_omega_per_expert() -> None:
    training = ScaleTrainingSAE(ScaleTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_experts=N_EXPERTS, k=K))
    with torch.no_grad():
        training.omega.copy_(torch.arange(N_EXPERTS) / 10)
    assert omega_per_expert(training).tolist() == pytest.approx([i / 10 for i in range(N_EXPERTS)])
    with pytest.raises(ValueError, match="folds omega into W_enc"):
        omega_per_expert(scale_sae())
    switch = SwitchTrainingSAE(SwitchTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_experts=N_EXPERTS, k=K))
    with pytest.raises(ValueError, match="SwitchTrainingSAE trains no omega"):
        omega_per_expert(switch)


def test_results_serialise_to_json() -> None:
    sae, x = scale_sae(), torch.randn(20, D_IN)
    redundancy = feature_redundancy(sae).to_dict()
    assert "max_cosine" not in redundancy and set(redundancy["fraction_above"]) == {0.7, 0.8, 0.9}
    for result in (expert_redundancy(sae), activation_similarity(sae, x), expert_usage(sae, x)):
        json.dumps(result.to_dict())
    assert json.loads(json.dumps(expert_usage(sae, x).to_dict()))["counts"].__len__() == N_EXPERTS
