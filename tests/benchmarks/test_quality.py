"""The quality benchmark's pipeline on a tiny budget: real model, real text, SAELens's trainer, a well-formed JSON."""

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sae_lens_scale.training_guards import geometric_median
from tests.support.benchmarks import BENCHMARKS, load_benchmark

ROW_KEYS = {
    "name",
    "family",
    "seeds",
    "d_sae",
    "encoder_flops_per_token",
    "fvu",
    "fvu_spread",
    "sse",
    "cross_fvu",
    "ce_score",
    "cross_ce_score",
    "dead",
    "l0",
    "redundancy",
    "similarity",
    "train_seconds",
    "omega_mean",
}
ROW_KEYS_BEFORE_L0 = ROW_KEYS - {"l0"}  # results written before the summary carried the held-out L0


def check_summary(summary: list[dict], keys: set[str] = ROW_KEYS) -> None:
    for row in summary:
        assert set(row) == keys
        numbers = [value for key, value in row.items() if key not in {"name", "family", "omega_mean"}]
        assert all(isinstance(value, (int, float)) and math.isfinite(value) for value in numbers), row


@pytest.mark.slow
def test_tiny_run_writes_a_well_formed_result(tmp_path: Path) -> None:
    quality = load_benchmark("quality")
    cfg = quality.QualityConfig(
        train_tokens=8192, heldout_tokens=1024, d_sae=1152, k=16, seeds=(0, 1), ce_batches=1, ce_batch_prompts=2
    )
    names = {"Scale 32/e=2", "TopK (FLOPs-matched to Scale 32/e=2)"}
    result = quality.run(cfg, tmp_path / "activations.safetensors", names)
    summary = quality.mean_over_seeds(result["rows"])

    assert [row["name"] for row in result["rows"]] == 2 * ["TopK (FLOPs-matched to Scale 32/e=2)"] + 2 * [
        "Scale 32/e=2"
    ]  # headline rows run once per seed
    assert result["tokens"] == {"train": 8192, "heldout": 1024, "cross": 1024}
    check_summary(summary)
    rows = {row["name"]: row for row in summary}
    scale, topk = rows["Scale 32/e=2"], rows["TopK (FLOPs-matched to Scale 32/e=2)"]
    assert (topk["d_sae"], topk["encoder_flops_per_token"]) == (32 + 2 * 1152 // 32, scale["encoder_flops_per_token"])
    assert scale["omega_mean"] is not None and topk["omega_mean"] is None
    assert scale["fvu_spread"] > 0  # the two seeds trained different models
    json.loads(json.dumps(result))  # plain JSON types only
    assert quality.markdown(result, summary).count("\n| ") == 1 + len(summary)  # header and one row per SAE


def synthetic_summary(fvu: dict[str, float], **overrides: Mapping[str, float | None]) -> list[dict]:
    """Summary rows with chosen FVUs; everything else neutral unless overridden per row."""
    rows = []
    for name, value in fvu.items():
        row = dict.fromkeys(ROW_KEYS, 0.0) | {"name": name, "seeds": 1, "d_sae": 4608, "fvu": value}
        row |= {"redundancy": 0.01, "train_seconds": 10.0, "omega_mean": 0.1 if name.startswith("Scale") else None}
        rows.append(row | dict(overrides.get(name, {})))
    return rows


def test_verdict_reports_known_numbers() -> None:
    quality = load_benchmark("quality")
    fvu = {"TopK (width-matched)": 0.10, "Switch 16": 0.30, "Switch 32": 0.40}
    for e, ours in ((2, 0.20), (4, 0.18), (8, 0.16)):
        fvu |= {
            f"Scale 32/e={e}": ours,
            f"Scale 32/e={e} no FS": ours * 1.25,
            f"TopK (FLOPs-matched to Scale 32/e={e})": ours / 0.8,
        }
    overrides = {
        "TopK (width-matched)": {"train_seconds": 120.0},
        "Scale 32/e=2": {"omega_mean": 0.05, "fvu_spread": 0.01, "seeds": 2},
        "Switch 16": {"redundancy": 0.5},
        "Switch 32": {"redundancy": 0.3},
        "TopK (FLOPs-matched to Scale 32/e=2)": {"fvu_spread": 0.06, "seeds": 2},
    }
    lines = quality.verdict(synthetic_summary(fvu, **overrides), n_experts=32)

    assert lines[0].startswith("1. Scale beats FLOPs-matched TopK on FVU: holds.")
    assert "e=2: 0.2000 ± 0.0100 vs TopK 4608 0.2500 ± 0.0600, -20.0% (within the seed spread)" in lines[0]
    assert "e=8: 0.1600 vs TopK 4608 0.2000, -20.0% (paper: -37 % at L0 = 32)." in lines[0]
    assert "holds. Scale 32/e=2 0.2000 ± 0.0100 vs Switch 16 (the same 288 active latents) 0.3000, -33.3%" in lines[1]
    assert lines[2].startswith("3. Feature Scaling lowers FVU: holds. e=2: -20.0%")
    assert "0.050, 0.100, 0.100 for e = 2, 4, 8: positive holds, growing with e holds" in lines[2]
    assert lines[3].startswith("4. Scale's redundancy is below Switch's: holds.")
    assert lines[3].endswith("Scale e=2 against Switch 32 (the same experts): -96.7% (paper: -99 %).")
    assert "FVU 0.2000 ± 0.0100 against dense TopK's 0.1000 (+100.0%) and trains 12.0x faster" in lines[4]


def test_markdown_carries_the_verdict_only_for_a_complete_run() -> None:
    quality = load_benchmark("quality")
    cfg = quality.QualityConfig(train_tokens=8192, heldout_tokens=1024, d_sae=4608, k=32, seeds=(0,), ce_batches=1)
    names = [contender.name for contender in quality.contenders(cfg, 576)]
    summary = synthetic_summary(dict.fromkeys(names, 0.5))
    result = {"config": asdict(cfg), "d_in": 576, "tokens": {"train": 8192, "heldout": 1024, "cross": 1024}}

    claims = [line[:3] for line in quality.markdown(result, summary).splitlines() if line[:1].isdigit()]
    assert claims == ["1. ", "2. ", "3. ", "4. ", "5. "]
    assert "## The paper's claims" not in quality.markdown(result, summary[:-1])


def test_verdict_says_when_a_claim_fails() -> None:
    quality = load_benchmark("quality")
    fvu = {"TopK (width-matched)": 0.10, "Switch 16": 0.15, "Switch 32": 0.40}
    for e in (2, 4, 8):
        fvu |= {f"Scale 32/e={e}": 0.2, f"Scale 32/e={e} no FS": 0.19, f"TopK (FLOPs-matched to Scale 32/e={e})": 0.3}
    overrides = {"Scale 32/e=8": {"omega_mean": -0.01}, "Switch 32": {"redundancy": 0.015}}
    lines = quality.verdict(synthetic_summary(fvu, **overrides), n_experts=32)

    assert "FLOPs-matched TopK on FVU: holds" in lines[0]
    assert "equal active width: fails" in lines[1]
    assert "lowers FVU: fails. e=2: +5.3%" in lines[2] and "positive fails, growing with e fails" in lines[2]
    assert "below Switch's: fails" in lines[3]


def structured_activations(n_tokens: int, d_in: int, seed: int) -> torch.Tensor:
    """Sparse sums of 200 fixed directions plus a large shared offset: what an SAE can learn, quickly."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(200, d_in, generator=torch.Generator().manual_seed(0))
    codes = torch.rand(n_tokens, 200, generator=generator) * (torch.rand(n_tokens, 200, generator=generator) < 0.03)
    return (codes @ directions + 3.0).half()


TINY_CURVES = {"train_tokens": 4096, "heldout_tokens": 512, "d_sae": 512, "k": 8, "seeds": (0,), "ce_batches": 1}


def test_routed_and_topk_saes_start_from_the_same_biases() -> None:
    quality = load_benchmark("quality")
    cfg = quality.QualityConfig(**TINY_CURVES, batch=256, lr=0.0)  # lr 0: the weights stay where training starts
    train = structured_activations(256, 64, seed=1)
    first = next(quality.batches(train, 256, 1.0, seed=0))
    starts = {}
    for contender in quality.contenders(replace(cfg, train_tokens=256), 64):
        if contender.name in ("Scale 32/e=2", "TopK (FLOPs-matched to Scale 32/e=2)"):
            sae = contender.make()
            quality.train_sae(
                sae, quality.batches(train, 256, 1.0, seed=0), quality.trainer_config(replace(cfg, train_tokens=256))
            )
            starts[contender.name] = sae.b_dec.detach()
    median = geometric_median(first.double()).float()
    for b_dec in starts.values():
        torch.testing.assert_close(b_dec, median)


def test_learning_curves_record_held_out_fvu_along_the_run(tmp_path: Path) -> None:
    quality = load_benchmark("quality")
    cfg = quality.QualityConfig(**TINY_CURVES, batch=256, epochs=2)
    cache = tmp_path / "activations.safetensors"
    splits = {"train": (4096, 1), "heldout": (512, 2), "cross": (512, 3)}
    save_file({name: structured_activations(n, 64, seed) for name, (n, seed) in splits.items()}, str(cache))
    result = quality.run_curves(cfg, cache)

    assert set(result["curves"]) == set(quality.CURVE_NAMES)
    for curve in result["curves"].values():
        tokens = [point["tokens"] for point in curve["points"]]
        assert tokens == [2 * 256 * i for i in range(16)] + [2 * 4096]  # every 2 steps (1/8 pass), then the end
        assert curve["points"][-1]["fvu"] < 0.5 * curve["points"][0]["fvu"]
    json.loads(json.dumps(result))


def test_crossing_is_where_scale_gets_below_topk_for_good() -> None:
    quality = load_benchmark("quality")
    scale, topk = quality.CURVE_NAMES[0], quality.CURVE_NAMES[2]

    def curves(scale_fvu: list[float], topk_fvu: list[float]) -> dict[str, Any]:
        points = [[{"tokens": 100 * i, "fvu": fvu} for i, fvu in enumerate(fvus)] for fvus in (scale_fvu, topk_fvu)]
        return {scale: {"points": points[0]}, topk: {"points": points[1]}}

    assert quality.crossing(curves([0.5, 0.3, 0.25, 0.2], [0.4, 0.35, 0.3, 0.28]))["tokens"] == 100
    assert quality.crossing(curves([0.5, 0.3, 0.32, 0.2], [0.4, 0.35, 0.3, 0.28]))["tokens"] == 300  # not 100
    assert quality.crossing(curves([0.5, 0.4, 0.35, 0.3], [0.4, 0.35, 0.3, 0.28]))["tokens"] is None


def test_long_curves_report_the_flops_at_which_each_baseline_is_reached_for_good() -> None:
    quality = load_benchmark("quality")
    cfg = quality.QualityConfig(**TINY_CURVES, batch=256, epochs=4)

    def curve(fvus: list[float]) -> dict[str, Any]:
        return {"points": [{"tokens": 100 * i, "fvu": fvu} for i, fvu in enumerate(fvus)]}

    width_matched, matched = quality.LONG_CURVE_BASELINES[1], quality.LONG_CURVE_BASELINES[0]
    baselines = {
        "config": asdict(cfg),
        "d_in": 64,
        "curves": {matched: curve([0.5, 0.3]), width_matched: curve([0.4, 0.2, 0.1])},  # final FVU 0.3 and 0.1
    }
    result = {"curves": {"Scale 32/e=2": curve([0.6, 0.25, 0.35, 0.28, 0.2, 0.15])}}
    found = {row["baseline"]: row for row in quality.long_crossings(result, baselines)}

    flops = {c.name: c.flops.training_step for c in quality.contenders(cfg, 64)}
    assert found[matched]["tokens"] == 300  # below 0.3 at 100 tokens too, but not for good
    assert found[matched]["training_flops"] == 300 * flops["Scale 32/e=2"]
    assert found[matched]["baseline_training_flops"] == 100 * flops[matched]
    assert found[width_matched]["tokens"] is None and found[width_matched]["final_fvu"] == 0.15
    assert found[width_matched]["baseline_training_flops"] == 200 * flops[width_matched]


@pytest.mark.parametrize(
    ("stem", "n_saes", "keys"),
    [
        ("quality-cpu", 14, ROW_KEYS_BEFORE_L0),
        ("quality-cpu-paper-width", 16, ROW_KEYS),
        ("2026-11-recipe/quality-cpu", 14, ROW_KEYS_BEFORE_L0),  # the recipe before the liveness study
        ("2026-11-recipe/quality-cpu-quick", 14, ROW_KEYS_BEFORE_L0),
        ("2026-11-recipe/quality-cpu-longer", 4, ROW_KEYS_BEFORE_L0),
    ],
)
def test_committed_results_are_well_formed(stem: str, n_saes: int, keys: set[str]) -> None:
    result = json.loads((BENCHMARKS / "results" / f"{stem}.json").read_text())
    check_summary(result["summary"], keys)
    assert len(result["summary"]) == n_saes
    assert all(0 < row["fvu"] < 1 and 0 <= row["dead"] <= row["d_sae"] for row in result["summary"])


def test_committed_layer_results_cover_both_layers_on_the_same_tokens() -> None:
    quality = load_benchmark("quality")
    result = json.loads((BENCHMARKS / "results" / "quality-cpu-layers.json").read_text())
    assert tuple(result["layers"]) == quality.LAYER_HOOKS
    tokens = {json.dumps(layer["tokens"]) for layer in result["layers"].values()}
    assert len(tokens) == 1  # the same token counts, so the same rows of text, on both layers
    for layer in result["layers"].values():
        check_summary(layer["summary"], ROW_KEYS_BEFORE_L0)
        assert {row["name"] for row in layer["summary"]} == set(quality.LAYER_NAMES)
        assert all(0 < row["fvu"] < 1 and 0 <= row["dead"] <= row["d_sae"] for row in layer["summary"])


def test_the_paper_width_runs_the_papers_rows_and_their_flops_matched_baselines() -> None:
    quality = load_benchmark("quality")
    rows = {row.name: row for row in quality.contenders(quality.PAPER_WIDTH, 576)}
    scale = [f"Scale 64/e={e}" for e in (2, 4, 8, 16)] + ["Scale 64/e=2 no FS", "Scale 64/e=16 no FS"]
    assert set(rows) - {name for name in rows if name.startswith("TopK")} == {*scale, "Switch 32", "Switch 64"}
    # TopK with the router's and the active experts' encoder columns: n + e x 24,576 / n
    widths = {name: rows[f"TopK (FLOPs-matched to {name})"].config.d_sae for name in ("Switch 32", "Switch 64")}
    widths |= {e: rows[f"TopK (FLOPs-matched to Scale 64/e={e})"].config.d_sae for e in (2, 4, 8, 16)}
    assert widths == {"Switch 32": 800, "Switch 64": 448, 2: 832, 4: 1600, 8: 3136, 16: 6208}
    assert rows["TopK (width-matched)"].config.d_sae == 24_576
    for e in (2, 4, 8, 16):
        assert rows[f"Scale 64/e={e}"].flops.encoder == rows[f"TopK (FLOPs-matched to Scale 64/e={e})"].flops.encoder
    assert quality.headline(quality.PAPER_WIDTH) == (
        "Scale 64/e=2",
        "Scale 64/e=2 no FS",
        "Switch 64",
        "TopK (width-matched)",
        "TopK (FLOPs-matched to Scale 64/e=2)",
    )


def test_verdict_at_the_paper_width_compares_the_rows_it_has() -> None:
    quality = load_benchmark("quality")
    names = [row.name for row in quality.contenders(quality.PAPER_WIDTH, 576)]
    fvu = dict.fromkeys(names, 0.3) | {"Scale 64/e=2": 0.2, "Scale 64/e=16": 0.1, "Scale 64/e=16 no FS": 0.125}
    summary = [
        row | {"d_sae": 24_576} for row in synthetic_summary(fvu, **{"Scale 64/e=2 no FS": {"omega_mean": None}})
    ]
    lines = quality.verdict(summary, n_experts=64)

    assert "Switch 32 (the same 768 active latents) 0.3000, -33.3%; vs Switch 64 (the same experts)" in lines[1]
    assert lines[2].startswith("3. Feature Scaling lowers FVU: holds. e=2: -33.3%; e=16: -20.0% (paper")
    assert "for e = 2, 4, 8, 16: positive holds" in lines[2]


@pytest.mark.slow
def test_the_gated_sae_is_trained_to_its_l0_target() -> None:
    quality = load_benchmark("quality")
    cfg = quality.QualityConfig(**TINY_CURVES | {"train_tokens": 131_072}, batch=256, gated_l0_target=8.0)
    train, heldout = structured_activations(131_072, 64, seed=1).float(), structured_activations(2048, 64, seed=2)
    sae, _, calibration = quality.train_gated(cfg, train, heldout.float(), scale=1.0, attempts=3)

    l0 = quality.reconstruction(sae, heldout.float())["l0"]
    assert abs(l0 / 8.0 - 1) <= 0.1
    nearest = min(calibration["full_runs"], key=lambda run: abs(run["l0"] - 8.0))  # the SAE returned is the nearest
    assert nearest["l0"] == pytest.approx(l0) and nearest["l1_coefficient"] == calibration["l1_coefficient"]
    tried = calibration["short_tries"]
    for a, b in itertools.pairwise(tried):  # each short try moves the coefficient the way its L0 asked
        assert (b["l1_coefficient"] > a["l1_coefficient"]) == (a["l0"] > 8.0)


def test_read_off_is_linear_in_log_log_and_extrapolates_from_the_ends() -> None:
    quality = load_benchmark("quality")
    tried = [{"l1_coefficient": 1.0, "l0": 100.0}, {"l1_coefficient": 10.0, "l0": 10.0}]  # L0 = 100 / coefficient
    assert quality.read_off(tried, "l0", "l1_coefficient", 31.6227766) == pytest.approx(3.16227766)
    assert quality.read_off(tried, "l0", "l1_coefficient", 1.0) == pytest.approx(100.0)
    assert quality.read_off(tried, "l1_coefficient", "l0", 0.1) == pytest.approx(1000.0)
