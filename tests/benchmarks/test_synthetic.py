"""The ground-truth benchmark: its structures are what they claim, its scores are SAELens's, and SAEs learn there."""

import json
from dataclasses import replace

import pytest
from sae_lens.synthetic import init_sae_to_match_feature_dict

from tests.support.benchmarks import BENCHMARKS, load_benchmark


def test_each_structure_has_the_strength_it_is_given() -> None:
    synthetic = load_benchmark("synthetic")
    cfg = replace(synthetic.SYNTHETIC_QUICK, num_features=1024)
    for strength in (0.25, 1.0):
        model = synthetic.synthetic_model(cfg, synthetic.Setting("hierarchy", strength), seed=0)
        in_trees = len(model.hierarchy.feature_indices_used)
        assert in_trees == round(strength * 1024 / 16) * 16
    model = synthetic.synthetic_model(cfg, synthetic.Setting("correlation", 0.3), seed=0)
    shared = model.correlation_matrix.correlation_factor.pow(2).sum(1)
    assert shared.mean().item() == pytest.approx(0.3, rel=0.05)  # rank x scale^2 of each feature's unit variance
    independent = synthetic.synthetic_model(cfg, synthetic.Setting("independent", 0.0), seed=0)
    assert independent.hierarchy is None and independent.correlation_matrix is None


def test_a_decoder_equal_to_the_true_features_scores_an_mcc_of_one() -> None:
    synthetic = load_benchmark("synthetic")
    cfg = replace(synthetic.SYNTHETIC_QUICK, eval_samples=2048)
    model = synthetic.synthetic_model(cfg, synthetic.Setting("independent", 0.0), seed=0)
    sae = synthetic.make_sae(synthetic.sae_configs(cfg)["TopK"])
    init_sae_to_match_feature_dict(sae, model.feature_dict)
    scores = synthetic.evaluate(sae, model, 1.0, cfg)
    assert scores["mcc"] == pytest.approx(1.0, abs=1e-6)
    assert scores["dead_fraction"] == scores["dead_latents"] / cfg.num_features

    random_start = synthetic.make_sae(synthetic.sae_configs(cfg)["TopK"])
    assert synthetic.evaluate(random_start, model, 1.0, cfg)["mcc"] < 0.5


def test_summary_averages_seeds_and_divides_by_topk() -> None:
    synthetic = load_benchmark("synthetic")
    rows = []
    for seed, (topk, switch) in enumerate(((0.8, 0.4), (0.6, 0.4))):
        for name, family, mcc in (("TopK", "topk", topk), ("Switch 8", "switch", switch)):
            metrics = {"mcc": mcc, "explained_variance": mcc / 2, "dead_fraction": 0.1, "sae_l0": 8, "true_l0": 7.5}
            rows.append({"structure": "hierarchy", "strength": 1.0, "seed": seed, "name": name, "family": family})
            rows[-1] |= metrics
    summary = {row["name"]: row for row in synthetic.summarize(rows)}
    assert summary["TopK"]["mcc"] == pytest.approx(0.7) and summary["TopK"]["mcc_spread"] == pytest.approx(0.2)
    assert summary["Switch 8"]["mcc_vs_topk"] == pytest.approx(0.4 / 0.7)
    assert summary["Switch 8"]["explained_variance_vs_topk"] == pytest.approx(0.2 / 0.35)


def test_every_sae_learns_the_true_features() -> None:
    synthetic = load_benchmark("synthetic")
    cfg = replace(
        synthetic.SYNTHETIC_QUICK,
        num_features=128,
        hidden_dim=32,
        k=4,
        n_experts=4,
        train_samples=131_072,
        eval_samples=4096,
        batch=512,
        hierarchy_strengths=(),
        correlation_strengths=(),
    )
    model = synthetic.synthetic_model(cfg, synthetic.Setting("independent", 0.0), seed=0)
    untrained = {
        name: synthetic.evaluate(synthetic.make_sae(config), model, 1.0, cfg)["mcc"]
        for name, config in synthetic.sae_configs(cfg).items()
    }
    result = synthetic.run(cfg)
    result["summary"] = synthetic.summarize(result["rows"])

    for row in result["summary"]:
        assert row["mcc"] > untrained[row["name"]] + 0.1, (row, untrained)
        assert 3.0 < row["sae_l0"] <= 4.0  # at most k latents per sample
    assert synthetic.markdown(result).count("\n| independent | 0 |") == 3
    json.loads(json.dumps(result))


def test_committed_results_hold_every_setting_and_sae() -> None:
    synthetic = load_benchmark("synthetic")
    result = json.loads((BENCHMARKS / "results" / "synthetic-cpu.json").read_text())
    cfg = synthetic.SyntheticConfig(
        **{key: tuple(v) if isinstance(v, list) else v for key, v in result["config"].items()}
    )
    assert cfg == synthetic.SYNTHETIC_FULL
    expected = {(s.structure, s.strength, name) for s in synthetic.settings(cfg) for name in synthetic.sae_configs(cfg)}
    assert {(row["structure"], row["strength"], row["name"]) for row in result["summary"]} == expected
    assert all(row["seeds"] == len(cfg.seeds) and 0 < row["mcc"] <= 1 for row in result["summary"])
    assert all(row["mcc_vs_topk"] == 1.0 for row in result["summary"] if row["name"] == "TopK")
