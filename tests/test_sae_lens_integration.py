"""SAELens's own runner, loaders, evals, resume and HookedSAETransformer on the routed architectures, offline."""

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from sae_lens_scale import ScaleSAE, SwitchSAE
from tests.support.builders import (
    TINY_HOOK,
    make_runner,
    reconstruction_mse,
    tiny_activations,
    tiny_runner_config,
    tiny_sae_config,
)
from tests.support.models import CONTEXT

ARCHITECTURES = ["scale", "switch"]
BATCH = 256  # tokens per training step: 16 prompts of CONTEXT = 16 tokens
STEPS = 20


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_runner_trains_saves_reloads_evals_and_hooks(
    architecture: str, tiny_model: HookedTransformer, token_dataset: Any, tmp_path: Path
) -> None:
    runner = make_runner(tiny_runner_config(tiny_sae_config(architecture), tmp_path), tiny_model, token_dataset)
    heldout = tiny_activations(tiny_model, torch.as_tensor(token_dataset[-40:]["input_ids"]))
    mse_before = reconstruction_mse(runner.sae, heldout)
    trained = runner.run()
    assert reconstruction_mse(trained, heldout) < 0.5 * mse_before

    loaded = SAE.load_from_disk(tmp_path / "final")
    assert type(loaded) is {"scale": ScaleSAE, "switch": SwitchSAE}[architecture]
    torch.testing.assert_close(loaded(heldout), trained(heldout), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.encode(heldout), trained.encode(heldout), rtol=1e-5, atol=1e-5)
    assert loaded.cfg.metadata.hook_name == TINY_HOOK

    eval_config = EvalConfig(
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    metrics, _ = run_evals(
        loaded, runner.activations_store, tiny_model, ActivationScaler(), eval_config, exclude_special_tokens=False
    )
    assert metrics["sparsity"]["l0"] == pytest.approx(8, abs=0.5)
    assert metrics["reconstruction_quality"]["explained_variance"] > 0.45
    assert metrics["model_performance_preservation"]["ce_loss_score"] > 0

    hooked = HookedSAETransformer(tiny_model.cfg)
    hooked.load_state_dict(tiny_model.state_dict(), strict=False)
    tokens = torch.as_tensor(token_dataset[:4]["input_ids"])
    clean = hooked(tokens)
    with_sae, cache = hooked.run_with_cache_with_saes(tokens, saes=[loaded])
    assert cache[f"{TINY_HOOK}.hook_sae_acts_post"].shape == (4, CONTEXT, 128)
    assert (cache[f"{TINY_HOOK}.hook_sae_acts_post"] != 0).sum(-1).max() <= 8
    assert isinstance(with_sae, torch.Tensor) and not torch.allclose(with_sae, clean)
    sae_logits = hooked.run_with_saes(tokens, saes=[loaded])
    torch.testing.assert_close(sae_logits, with_sae)


def resumable_config(architecture: str, output: Path, **overrides: Any) -> Any:
    """A short run whose activation stream is exactly resumable.

    SAELens checkpoints only the dataset position (``n_dataset_processed``), not the mixing buffer or the RNG that
    shuffles it. With no mixing and one store batch per training batch, the buffer is empty at every step boundary,
    so a resumed run sees exactly the batches the uninterrupted run saw.
    """
    # SAELens's small decoder init (0.1) leaves latents dead within 20 steps, so the resume carries AuxK's statistics.
    return tiny_runner_config(
        tiny_sae_config(architecture, decoder_init_norm=0.1),
        output,
        training_tokens=STEPS * BATCH,
        train_batch_size_tokens=BATCH,
        store_batch_size_prompts=BATCH // CONTEXT,
        n_batches_in_buffer=BATCH // CONTEXT,
        activations_mixing_fraction=0.0,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=3,
        dead_feature_window=1,
        **overrides,
    )


def watch_steps(runner: Any, crash_at_call: int | None = None) -> list[int]:
    """Record each step's dead-latent count; optionally crash (like a killed job) on the given forward call."""
    dead_counts: list[int] = []
    forward = runner.sae.training_forward_pass

    def watched(step_input: TrainStepInput) -> Any:
        if crash_at_call is not None and len(dead_counts) + 1 == crash_at_call:
            raise RuntimeError("simulated crash")
        assert step_input.dead_neuron_mask is not None
        dead_counts.append(int(step_input.dead_neuron_mask.sum()))
        return forward(step_input=step_input)

    runner.sae.training_forward_pass = watched
    return dead_counts


def assert_same_optimizer_state(first: Path, second: Path) -> None:
    state_a = torch.load(first / "trainer_state.pt")["optimizer"]["state"]
    state_c = torch.load(second / "trainer_state.pt")["optimizer"]["state"]
    assert state_a.keys() == state_c.keys()
    for index, moments in state_a.items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[name], state_c[index][name])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_resumed_run_ends_with_the_uninterrupted_weights(
    architecture: str, tiny_model: HookedTransformer, token_dataset: Any, tmp_path: Path
) -> None:
    uninterrupted_cfg = resumable_config(architecture, tmp_path / "a", save_final_checkpoint=True)
    uninterrupted = make_runner(uninterrupted_cfg, tiny_model, token_dataset)
    dead_counts_a = watch_steps(uninterrupted)
    sae_a = uninterrupted.run()

    interrupted_cfg = resumable_config(architecture, tmp_path / "b", n_checkpoints=1)
    interrupted = make_runner(interrupted_cfg, tiny_model, token_dataset)
    watch_steps(interrupted, crash_at_call=14)
    with pytest.raises(RuntimeError, match="simulated crash"):
        interrupted.run()
    (checkpoint,) = Path(interrupted_cfg.checkpoint_path).iterdir()
    assert checkpoint.name == str(11 * BATCH)  # saved after 11 of 20 steps; the crash in step 14 lost 12-13

    resumed_cfg = resumable_config(
        architecture, tmp_path / "c", save_final_checkpoint=True, resume_from_checkpoint=str(checkpoint)
    )
    resumed = make_runner(resumed_cfg, tiny_model, token_dataset)
    dead_counts_c = watch_steps(resumed)
    sae_c = resumed.run()

    assert len(dead_counts_c) == STEPS - 11
    assert dead_counts_c == dead_counts_a[11:]  # firing statistics were restored, so AuxK saw the same dead latents
    assert max(dead_counts_a) > 0
    state_a, state_c = sae_a.state_dict(), sae_c.state_dict()
    expected_names = {"W_enc", "b_enc", "W_dec", "b_dec", "W_router", "b_router", "bias_init_done"} | (
        {"omega"} if architecture == "scale" else set()
    )
    assert set(state_a) == set(state_c) == expected_names
    for name in state_a:
        torch.testing.assert_close(state_c[name], state_a[name], rtol=1e-6, atol=1e-7)
    if architecture == "scale":
        assert state_a["omega"].abs().max() > 1e-3  # omega actually trained, so its match means something
    (final_a,) = (tmp_path / "a" / "checkpoints").glob("*/final_*")
    (final_c,) = (tmp_path / "c" / "checkpoints").glob("*/final_*")
    assert_same_optimizer_state(final_a, final_c)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_runner_stops_on_a_nan_batch_before_it_reaches_the_weights(
    architecture: str, tiny_model: HookedTransformer, token_dataset: Any, tmp_path: Path
) -> None:
    model = HookedTransformer(tiny_model.cfg)
    model.load_state_dict(tiny_model.state_dict())
    calls = {"n": 0}

    def poison_fifth_batch(tensor: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 5:
            tensor[2, 3, 0] = float("nan")
        return tensor

    model.add_perma_hook(TINY_HOOK, poison_fifth_batch)
    runner = make_runner(resumable_config(architecture, tmp_path), model, token_dataset)
    with pytest.raises(FloatingPointError, match=r"Training step 4 .* 1 NaN and 0 inf values, in 1 of the batch"):
        runner.run()
    assert all(torch.isfinite(p).all() for p in runner.sae.parameters())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bf16_autocast_training_and_bf16_loading(
    architecture: str, tiny_model: HookedTransformer, token_dataset: Any, tmp_path: Path
) -> None:
    heldout = tiny_activations(tiny_model, torch.as_tensor(token_dataset[-40:]["input_ids"]))
    fp32 = make_runner(resumable_config(architecture, tmp_path / "fp32"), tiny_model, token_dataset)
    untrained_mse = reconstruction_mse(fp32.sae, heldout)
    fp32_mse = reconstruction_mse(fp32.run(), heldout)
    autocast_cfg = resumable_config(architecture, tmp_path / "bf16", autocast=True)
    trained = make_runner(autocast_cfg, tiny_model, token_dataset).run()

    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trained.parameters())
    autocast_mse = reconstruction_mse(trained, heldout)
    assert autocast_mse < 0.8 * untrained_mse
    assert autocast_mse == pytest.approx(fp32_mse, rel=0.05)

    full = SAE.load_from_disk(tmp_path / "bf16" / "final")
    half = SAE.load_from_disk(tmp_path / "bf16" / "final", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    recons_full, recons_half = full(heldout), half(heldout)
    assert recons_half.dtype == torch.bfloat16 and torch.isfinite(recons_half).all()
    variance = (heldout - heldout.mean(0)).pow(2).sum(-1).mean()
    assert (recons_half.float() - recons_full).pow(2).sum(-1).mean() / variance < 0.01
    active_full, active_half = full.encode(heldout) != 0, half.encode(heldout) != 0
    assert (active_full & active_half).sum() / active_full.sum() > 0.95
