"""`sae-lens-scale analyze` on saved SAEs, with activations from the real bundled model."""

import json
from pathlib import Path

import pytest
import torch
from sae_lens.saes.sae import SAEMetadata

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig, metrics
from sae_lens_scale.hub import load_sae
from sae_lens_scale.tools.analyze import AnalyzeConfig, run_analysis

pytestmark = pytest.mark.slow

HOOK = "blocks.1.hook_resid_post"


def saved_scale_sae(folder: Path, training_checkpoint: bool) -> ScaleTrainingSAE:
    torch.manual_seed(0)
    cfg = ScaleTrainingSAEConfig(d_in=576, d_sae=1152, n_experts=8, n_active_experts=2, k=16)
    cfg.metadata = SAEMetadata(hook_name=HOOK, model_name="smollm2-135m")
    sae = ScaleTrainingSAE(cfg)
    with torch.no_grad():
        sae.omega.copy_(torch.linspace(-0.2, 0.5, 8))
        sae.W_dec[1] = sae.W_dec[0] * 3  # one exact duplicate pair: redundancy must see it
    if training_checkpoint:
        sae.save_model(folder)
    else:
        sae.save_inference_model(folder)
    return sae


@pytest.mark.parametrize("training_checkpoint", [False, True])
def test_analyze_writes_json_and_plots_that_match_the_metrics(tmp_path: Path, training_checkpoint: bool) -> None:
    sae = saved_scale_sae(tmp_path / "sae", training_checkpoint)
    result = run_analysis(AnalyzeConfig(path=str(tmp_path / "sae"), tokens=1024, output=str(tmp_path / "out")))

    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (result["hook"], result["model"], result["tokens"]) == (HOOK, "smollm2-135m", 1024)
    expected = metrics.feature_redundancy(load_sae(tmp_path / "sae"))
    assert saved["redundancy"]["fraction_above"]["0.9"] == expected.fraction_above[0.9]
    assert saved["redundancy"]["fraction_above"]["0.9"] >= 2 / 1152
    assert sum(result["expert_usage"]["counts"]) == 1024 * 2
    assert len(result["plots"]) == 3 and all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in result["plots"])
    if training_checkpoint:
        assert result["omega"] == pytest.approx(sae.omega.tolist())
    else:
        assert "omega" not in result  # folded into W_enc by the export
