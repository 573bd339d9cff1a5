"""The quality benchmark's pipeline on a tiny budget: real model, real text, SAELens's trainer, a well-formed JSON."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
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
    "redundancy",
    "similarity",
    "train_seconds",
    "omega_mean",
}


def load_quality_module():
    spec = importlib.util.spec_from_file_location("quality", BENCHMARKS / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_summary(summary: list[dict]) -> None:
    for row in summary:
        assert set(row) == ROW_KEYS
        numbers = [value for key, value in row.items() if key not in {"name", "family", "omega_mean"}]
        assert all(isinstance(value, (int, float)) and math.isfinite(value) for value in numbers), row


def test_tiny_run_writes_a_well_formed_result(tmp_path: Path) -> None:
    quality = load_quality_module()
    cfg = quality.QualityConfig(train_tokens=8192, heldout_tokens=1024, d_sae=1152, k=16, seeds=(0,), ce_batches=1)
    names = {"TopK (width-matched)", "Scale 32/e=2"}
    result = quality.run(cfg, tmp_path / "activations.safetensors", names)
    summary = quality.mean_over_seeds(result["rows"])

    assert {row["name"] for row in summary} == names
    assert result["tokens"] == {"train": 8192, "heldout": 1024, "cross": 1024}
    check_summary(summary)
    scale = next(row for row in summary if row["name"] == "Scale 32/e=2")
    topk = next(row for row in summary if row["name"] == "TopK (width-matched)")
    assert scale["encoder_flops_per_token"] < topk["encoder_flops_per_token"] / 5
    assert scale["omega_mean"] is not None and topk["omega_mean"] is None
    json.loads(json.dumps(result))  # plain JSON types only
    assert quality.markdown(result, summary).count("\n| ") == 1 + len(summary)  # header and one row per SAE


@pytest.mark.parametrize("stem", ["quality-cpu-quick", "quality-cpu"])
def test_committed_results_are_well_formed(stem: str) -> None:
    path = BENCHMARKS / "results" / f"{stem}.json"
    if not path.exists():
        pytest.skip(f"{path.name} has not been produced yet")
    result = json.loads(path.read_text())
    check_summary(result["summary"])
    assert len(result["summary"]) == 14
