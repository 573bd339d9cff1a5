"""sae-dashboard and SAEBench on trained routed SAEs, with the bundled SmolLM2 (cut to its first two blocks).

Both tools cap transformers, transformer-lens and datasets below the newest, so they live in the second environment
``scripts/install.sh`` builds (``.venv-interp``), where ``scripts/test.sh`` runs this module; elsewhere it skips.
"""

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import (
    SAE,
    ActivationsStore,
    HookedSAETransformer,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)

from sae_lens_scale import ScaleSAE, ScaleTrainingSAEConfig, SwitchSAE, SwitchTrainingSAEConfig
from sae_lens_scale.tools.offline import load_smollm2_hooked
from sae_lens_scale.tools.sources import token_splits

pytest.importorskip("sae_dashboard", reason="sae-dashboard lives in .venv-interp: bash scripts/test.sh runs this there")
pytest.importorskip("sae_bench", reason="SAEBench lives in .venv-interp: bash scripts/test.sh runs this there")

from sae_bench.evals.core.eval_config import CoreEvalConfig
from sae_bench.evals.core.main import run_evals as saebench_core_evals
from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
from sae_dashboard.data_writing_fns import save_feature_centric_vis
from sae_dashboard.sae_vis_data import SaeVisConfig
from sae_dashboard.sae_vis_runner import SaeVisRunner

pytestmark = pytest.mark.slow

HOOK = "blocks.1.hook_resid_post"
CONTEXT = 64
K = 16
EVAL_PROMPTS = 8
SAE_CONFIGS = {
    "scale": ScaleTrainingSAEConfig(d_in=576, d_sae=1152, n_experts=8, n_active_experts=2, k=K),
    "switch": SwitchTrainingSAEConfig(d_in=576, d_sae=1152, n_experts=8, k=K),
}


@pytest.fixture(scope="module")
def smollm2() -> HookedSAETransformer:
    return load_smollm2_hooked(n_layers=2)[0]


@pytest.fixture(scope="module")
def heldout_rows(smollm2: HookedSAETransformer) -> tuple[Dataset, Dataset]:
    assert smollm2.tokenizer is not None
    return token_splits(smollm2.tokenizer, "shakespeare", CONTEXT, 0.1, seed=0, max_tokens=40 * 512 + 8192)


@pytest.fixture(scope="module", params=sorted(SAE_CONFIGS))
def trained_sae(
    request: pytest.FixtureRequest,
    smollm2: HookedSAETransformer,
    heldout_rows: tuple[Dataset, Dataset],
    tmp_path_factory: pytest.TempPathFactory,
) -> SAE[Any]:
    """40 steps of SAELens's runner, saved and opened with ``SAE.load_from_disk``, as a researcher would."""
    output = tmp_path_factory.mktemp(request.param)
    cfg = LanguageModelSAERunnerConfig(
        sae=SAE_CONFIGS[request.param],
        model_name="SmolLM2-135M-Instruct",
        hook_name=HOOK,
        dataset_path="in-memory",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=CONTEXT,
        prepend_bos=False,
        sequence_separator_token=None,
        training_tokens=40 * 512,
        train_batch_size_tokens=512,
        store_batch_size_prompts=16,
        n_batches_in_buffer=8,
        lr=1e-3,
        device="cpu",
        seed=0,
        checkpoint_path=str(output / "checkpoints"),
        output_path=str(output / "sae"),
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )
    torch.manual_seed(0)
    LanguageModelSAETrainingRunner(cfg, override_dataset=heldout_rows[0], override_model=smollm2).run()
    sae = SAE.load_from_disk(output / "sae")
    assert type(sae) is {"scale": ScaleSAE, "switch": SwitchSAE}[request.param]
    return sae


def state(sae: SAE[Any]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in sae.state_dict().items()}


def assert_unchanged(sae: SAE[Any], before: dict[str, torch.Tensor]) -> None:
    after = sae.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed"


def test_dashboards_show_the_activations_encode_gives_and_leave_the_sae_unchanged(
    trained_sae: SAE[Any], smollm2: HookedSAETransformer, heldout_rows: tuple[Dataset, Dataset], tmp_path: Path
) -> None:
    tokens = torch.as_tensor(heldout_rows[1]["input_ids"][:32])
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(tokens, names_filter=HOOK)
        acts = trained_sae.encode(cache[HOOK])  # [prompts, context, d_sae]
    features = acts.gt(0).sum(dim=(0, 1)).topk(4).indices.tolist()  # the four most often active
    before = state(trained_sae)

    cfg = SaeVisConfig(hook_point=HOOK, features=features, minibatch_size_features=4, minibatch_size_tokens=16)
    data = SaeVisRunner(cfg).run(encoder=trained_sae, model=smollm2, tokens=tokens)

    assert_unchanged(trained_sae, before)
    direct = acts[..., features]
    torch.testing.assert_close(torch.tensor(data.feature_stats.max), direct.amax(dim=(0, 1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor(data.feature_stats.frac_nonzero), direct.gt(0).float().mean(dim=(0, 1)), rtol=1e-5, atol=1e-6
    )
    for feature, top in zip(features, direct.amax(dim=(0, 1)).tolist(), strict=True):
        top_sequences = data.feature_data_dict[feature].sequence_data.seq_group_data[0].seq_data
        assert max(max(sequence.feat_acts) for sequence in top_sequences) == pytest.approx(top, rel=1e-4)
    save_feature_centric_vis(sae_vis_data=data, filename=tmp_path / "dashboards.html")
    assert f"{direct.amax().item():.3f}" in (tmp_path / "dashboards.html").read_text()


def test_saebench_core_eval_matches_the_direct_computation_and_leaves_the_sae_unchanged(
    trained_sae: SAE[Any], smollm2: HookedSAETransformer, heldout_rows: tuple[Dataset, Dataset]
) -> None:
    heldout = heldout_rows[1]
    formatted = load_and_format_sae("sae-lens-scale", trained_sae, "cpu")  # SAEBench's entry for an SAE object
    assert formatted is not None
    sae = formatted[1]
    before = state(sae)
    store = ActivationsStore.from_sae(
        smollm2,
        sae,
        heldout,
        context_size=CONTEXT,
        streaming=False,
        store_batch_size_prompts=EVAL_PROMPTS,
        n_batches_in_buffer=4,
        sequence_separator_token=None,
    )
    eval_cfg = CoreEvalConfig(
        batch_size_prompts=EVAL_PROMPTS,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        context_size=CONTEXT,
        compute_kl=True,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
    )
    metrics, feature_metrics = saebench_core_evals(sae, store, smollm2, eval_cfg)
    assert_unchanged(sae, before)

    tokens = torch.as_tensor(heldout["input_ids"][: 2 * EVAL_PROMPTS]).split(EVAL_PROMPTS)
    with torch.no_grad():
        clean = torch.stack([smollm2(batch, return_type="loss") for batch in tokens]).mean()
        spliced = torch.stack(
            [
                smollm2.run_with_hooks(batch, return_type="loss", fwd_hooks=[(HOOK, lambda act, hook: sae(act))])
                for batch in tokens
            ]
        ).mean()
    performance = metrics["model_performance_preservation"]
    assert performance["ce_loss_without_sae"] == pytest.approx(clean.item(), rel=1e-5)
    assert performance["ce_loss_with_sae"] == pytest.approx(spliced.item(), rel=1e-5)
    assert metrics["sparsity"]["l0"] == pytest.approx(K, abs=1e-6)
    assert 0.3 < metrics["reconstruction_quality"]["explained_variance"] <= 1
    assert len(feature_metrics["feature_density"]) == sae.cfg.d_sae
