"""Nothing lost when things go wrong: resume, non-finite batches, bf16, broken weight files, router collapse."""

import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig
from sae_lens_scale.hub import load_sae
from sae_lens_scale.routed_sae import RoutedTrainingSAE
from tests.conftest import CONTEXT, D_MODEL

HOOK = "blocks.1.hook_resid_pre"
D_SAE = 128
BATCH = 256  # tokens per training step: 16 prompts of CONTEXT = 16 tokens
STEPS = 20
WEIGHTS = "sae_weights.safetensors"
SHAPE = {"d_in": D_MODEL, "d_sae": D_SAE, "k": 8}

SAE_CONFIGS: dict[str, Callable[..., Any]] = {
    "scale": lambda **kw: ScaleTrainingSAEConfig(**({"n_experts": 8, "n_active_experts": 2} | SHAPE | kw)),
    "switch": lambda **kw: SwitchTrainingSAEConfig(**({"n_experts": 4} | SHAPE | kw)),
}
ARCHITECTURES = list(SAE_CONFIGS)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are tiny, so a second thread only adds synchronisation; when another job shares the 2 cores,
    its spin-waits made these runs 10x slower (75 s instead of 7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def runner_config(architecture: str, output: Path, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    """A short run whose activation stream is exactly resumable.

    SAELens checkpoints only the dataset position (``n_dataset_processed``), not the mixing buffer or the RNG that
    shuffles it. With no mixing and one store batch per training batch, the buffer is empty at every step boundary,
    so a resumed run sees exactly the batches the uninterrupted run saw.
    """
    settings: dict[str, Any] = {
        "sae": SAE_CONFIGS[architecture](),
        "model_name": "tiny",
        "hook_name": HOOK,
        "dataset_path": "in-memory",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": CONTEXT,
        "prepend_bos": False,
        "sequence_separator_token": None,
        "training_tokens": STEPS * BATCH,
        "train_batch_size_tokens": BATCH,
        "store_batch_size_prompts": BATCH // CONTEXT,
        "n_batches_in_buffer": BATCH // CONTEXT,
        "activations_mixing_fraction": 0.0,
        "lr": 3e-3,
        "lr_scheduler_name": "cosineannealing",
        "lr_warm_up_steps": 3,
        "dead_feature_window": 3,
        "device": "cpu",
        "seed": 0,
        "checkpoint_path": str(output / "checkpoints"),
        "output_path": str(output / "final"),
        "logger": LoggingConfig(log_to_wandb=False),
        "verbose": False,
    }
    return LanguageModelSAERunnerConfig(**(settings | overrides))


def make_runner(cfg: LanguageModelSAERunnerConfig[Any], model: HookedTransformer, dataset: Any) -> Any:
    torch.manual_seed(0)  # SAELens does not seed the SAE's initialisation from cfg.seed
    return LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)


def watch_steps(runner: Any, crash_at_call: int | None = None) -> list[int]:
    """Record each step's dead-latent count; optionally crash (like a killed job) on the given forward call."""
    dead_counts: list[int] = []
    forward = runner.sae.training_forward_pass

    def watched(step_input: TrainStepInput) -> Any:
        if crash_at_call is not None and len(dead_counts) + 1 == crash_at_call:
            raise RuntimeError("simulated crash")
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
    uninterrupted = make_runner(
        runner_config(architecture, tmp_path / "a", save_final_checkpoint=True), tiny_model, token_dataset
    )
    dead_counts_a = watch_steps(uninterrupted)
    sae_a = uninterrupted.run()

    interrupted_cfg = runner_config(architecture, tmp_path / "b", n_checkpoints=1)
    interrupted = make_runner(interrupted_cfg, tiny_model, token_dataset)
    watch_steps(interrupted, crash_at_call=14)
    with pytest.raises(RuntimeError, match="simulated crash"):
        interrupted.run()
    (checkpoint,) = Path(interrupted_cfg.checkpoint_path).iterdir()  # type: ignore[arg-type]
    assert checkpoint.name == str(11 * BATCH)  # saved after 11 of 20 steps; the crash in step 14 lost 12-13

    resumed = make_runner(
        runner_config(architecture, tmp_path / "c", save_final_checkpoint=True, resume_from_checkpoint=str(checkpoint)),
        tiny_model,
        token_dataset,
    )
    dead_counts_c = watch_steps(resumed)
    sae_c = resumed.run()

    assert len(dead_counts_c) == STEPS - 11
    assert dead_counts_c == dead_counts_a[11:]  # firing statistics were restored, so AuxK saw the same dead latents
    assert max(dead_counts_a) > 0
    state_a, state_c = sae_a.state_dict(), sae_c.state_dict()
    expected_names = {"W_enc", "b_enc", "W_dec", "b_dec", "W_router", "b_router"} | (
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


def make_training_sae(architecture: str, **overrides: Any) -> RoutedTrainingSAE[Any]:
    torch.manual_seed(0)
    training_class = {"scale": ScaleTrainingSAE, "switch": SwitchTrainingSAE}[architecture]
    return training_class(SAE_CONFIGS[architecture](**overrides))


def make_trainer(sae: RoutedTrainingSAE[Any]) -> SAETrainer[Any, Any]:
    cfg = SAETrainerConfig(total_training_samples=10 * BATCH, train_batch_size_samples=BATCH, lr=1e-3, lr_end=1e-3)
    return SAETrainer(cfg, sae, data_provider=iter([]))


def snapshot(trainer: SAETrainer[Any, Any]) -> dict[str, Any]:
    return {
        "weights": {name: tensor.clone() for name, tensor in trainer.sae.state_dict().items()},
        "optimizer": {index: {k: v.clone() for k, v in s.items()} for index, s in trainer.optimizer.state.items()},
    }


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize(
    ("bad_value", "counts"), [(float("nan"), "3 NaN and 0 inf"), (float("inf"), "0 NaN and 3 inf")]
)
def test_non_finite_batch_fails_its_step_and_leaves_the_weights_alone(
    architecture: str, bad_value: float, counts: str
) -> None:
    trainer = make_trainer(make_training_sae(architecture))
    generator = torch.Generator().manual_seed(1)
    trainer.step(torch.randn(BATCH, D_MODEL, generator=generator))
    trainer.n_training_steps = 1
    before = snapshot(trainer)

    batch = torch.randn(BATCH, D_MODEL, generator=generator)
    batch[7, 0] = batch[7, 5] = batch[200, 3] = bad_value
    with pytest.raises(
        FloatingPointError, match=rf"Training step 1 .*: .* {counts} values, in 2 of the batch's 256 rows"
    ):
        trainer.step(batch)

    after = snapshot(trainer)
    for name, tensor in before["weights"].items():
        assert torch.equal(after["weights"][name], tensor), name
    for index, moments in before["optimizer"].items():
        for key, value in moments.items():
            assert torch.equal(after["optimizer"][index][key], value)
    trainer.step(torch.randn(BATCH, D_MODEL, generator=generator))  # training goes on with the next batch
    assert all(torch.isfinite(p).all() for p in trainer.sae.parameters())
    assert not torch.equal(trainer.sae.W_enc, before["weights"]["W_enc"])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_overflowing_batch_names_the_loss_not_the_data(architecture: str) -> None:
    trainer = make_trainer(make_training_sae(architecture))
    batch = torch.randn(BATCH, D_MODEL)
    batch[3] = 1e30  # finite, but its squared error overflows float32
    before = trainer.sae.W_dec.clone()
    with pytest.raises(FloatingPointError, match=r"Training step 0 .*: the loss is not finite \(mse_loss=inf.*1e\+30"):
        trainer.step(batch)
    assert torch.equal(trainer.sae.W_dec, before)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_runner_stops_on_a_nan_batch_before_it_reaches_the_weights(
    architecture: str, tiny_model: HookedTransformer, token_dataset: Any, tmp_path: Path
) -> None:
    model = HookedTransformer(tiny_model.cfg)
    model.load_state_dict(tiny_model.state_dict())
    calls = {"n": 0}

    def poison_fifth_batch(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 5:
            acts[2, 3, 0] = float("nan")
        return acts

    model.add_perma_hook(HOOK, poison_fifth_batch)
    runner = make_runner(runner_config(architecture, tmp_path), model, token_dataset)
    with pytest.raises(FloatingPointError, match=r"Training step 4 .* 1 NaN and 0 inf values, in 1 of the batch"):
        runner.run()
    assert all(torch.isfinite(p).all() for p in runner.sae.parameters())


def heldout_mse(sae: Any, acts: torch.Tensor) -> float:
    with torch.no_grad():
        return (sae(acts).float() - acts).pow(2).sum(-1).mean().item()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bf16_autocast_training_and_bf16_loading(
    architecture: str, tiny_model: HookedTransformer, token_dataset: Any, tmp_path: Path
) -> None:
    _, cache = tiny_model.run_with_cache(torch.as_tensor(token_dataset[-40:]["input_ids"]), names_filter=HOOK)
    heldout = cache[HOOK].reshape(-1, D_MODEL)
    fp32 = make_runner(runner_config(architecture, tmp_path / "fp32"), tiny_model, token_dataset)
    untrained_mse = heldout_mse(fp32.sae, heldout)
    fp32_mse = heldout_mse(fp32.run(), heldout)
    autocast = make_runner(runner_config(architecture, tmp_path / "bf16", autocast=True), tiny_model, token_dataset)
    trained = autocast.run()

    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trained.parameters())
    autocast_mse = heldout_mse(trained, heldout)
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


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_autocast_runs_the_experts_in_bf16_and_the_router_in_fp32(architecture: str) -> None:
    sae = make_training_sae(architecture)
    x = torch.randn(BATCH, D_MODEL, generator=torch.Generator().manual_seed(2))
    full = sae.encode_routed(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = sae.encode_routed(x)
    assert mixed.routing.probs.dtype == torch.float32
    torch.testing.assert_close(mixed.routing.probs, full.routing.probs, rtol=0, atol=0)
    assert torch.equal(mixed.routing.experts, full.routing.experts)
    relative_error = ((mixed.candidates - full.candidates).norm() / full.candidates.norm()).item()
    assert 1e-4 < relative_error < 1e-2  # bf16 rounding (2^-9 per input), nothing worse


@pytest.fixture
def exported(tmp_path: Path) -> Callable[[str], Path]:
    """An exported SAE folder per architecture, for breaking in different ways."""

    def export(architecture: str) -> Path:
        folder = tmp_path / architecture / "good"
        if not folder.exists():
            make_training_sae(architecture).save_inference_model(folder)
        return folder

    return export


def broken_copy(folder: Path, name: str, edit: Callable[[Path], None]) -> Path:
    broken = folder.parent / name
    shutil.copytree(folder, broken)
    edit(broken)
    return broken


def edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps(cfg | changes))

    return edit


def edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        state_dict = load_file(folder / WEIGHTS)
        change(state_dict)
        save_file(state_dict, folder / WEIGHTS)

    return edit


def truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def poison(state_dict: dict[str, torch.Tensor]) -> None:
    state_dict["W_enc"][0, :2] = float("nan")


def add_omega(state_dict: dict[str, torch.Tensor]) -> None:
    state_dict["omega"] = torch.zeros(4)


N_EXPERTS = {"scale": 8, "switch": 4}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_mismatched_weights_name_the_file_the_tensor_and_the_field(
    architecture: str, exported: Callable[[str], Path]
) -> None:
    folder = exported(architecture)
    n_experts = N_EXPERTS[architecture]
    cases: list[tuple[str, Callable[[Path], None], str]] = [
        (
            "wrong_d_sae",
            edit_config(d_sae=256),
            (
                r"W_enc has shape \(32, 128\), but d_in=32, d_sae=256 need \(32, 256\).*"
                r"saved with d_sae=128, but .*wrong_d_sae/cfg.json says d_sae=256"
            ),
        ),
        (
            "wrong_n_experts",
            edit_config(n_experts=2 * n_experts),
            (
                rf"W_router has shape \(32, {n_experts}\), but d_in=32, n_experts={2 * n_experts} need "
                rf"\(32, {2 * n_experts}\).*saved with n_experts={n_experts}, but .*cfg.json says n_experts={2 * n_experts}"
            ),
        ),
        (
            "missing_router",
            edit_weights(lambda sd: sd.pop("W_router")),
            rf"W_router is missing \(needs shape \(32, {n_experts}\)\)",
        ),
        ("nan_weights", edit_weights(poison), r"W_enc has 2 NaN/inf values"),
        (
            "training_checkpoint",
            edit_weights(add_omega),
            r"omega is a training-only tensor.*TrainingSAE.load_from_disk",
        ),
    ]
    for name, edit, message in cases:
        broken = broken_copy(folder, name, edit)
        with pytest.raises(
            ValueError, match=rf"(?s)Cannot load .*{name}/{WEIGHTS} into a '{architecture}' SAE.*{message}"
        ):
            SAE.load_from_disk(broken)


def test_config_errors_while_loading_name_the_config_file(exported: Callable[[str], Path]) -> None:
    broken = broken_copy(exported("scale"), "indivisible", edit_config(n_experts=5))
    with pytest.raises(
        ValueError, match=r"ScaleSAEConfig.d_sae=128 is not divisible by n_experts=5.*indivisible/cfg.json"
    ):
        SAE.load_from_disk(broken)


def test_missing_and_truncated_files_are_refused(exported: Callable[[str], Path]) -> None:
    """SAELens reads these before our code runs: a missing file is named; a truncated one is refused, unnamed by
    SAELens and named by ``sae_lens_scale.hub.load_sae``."""
    folder = exported("switch")
    missing = broken_copy(folder, "missing", lambda f: (f / WEIGHTS).unlink())
    with pytest.raises(FileNotFoundError, match=rf"missing/{WEIGHTS}"):
        SAE.load_from_disk(missing)
    truncated = broken_copy(folder, "truncated", truncate)
    with pytest.raises(SafetensorError, match="incomplete metadata, file not fully covered"):
        SAE.load_from_disk(truncated)
    with pytest.raises(ValueError, match=rf"truncated/{WEIGHTS} is truncated or corrupt \(.*incomplete metadata"):
        load_sae(truncated)  # the plugin's loader names the file


def test_resuming_into_a_different_config_names_the_checkpoint(tmp_path: Path) -> None:
    make_training_sae("scale").save_model(tmp_path / "checkpoint")
    other = TrainingSAE.from_dict(SAE_CONFIGS["scale"](n_experts=4).to_dict())
    with pytest.raises(
        ValueError,
        match=r"(?s)checkpoint/sae_weights.safetensors.*W_router has shape \(32, 8\).*"
        r"n_experts=8, but the SAE config of the resumed run",
    ):
        other.load_weights_from_checkpoint(tmp_path / "checkpoint")


def forced_to_expert_zero(sae: RoutedTrainingSAE[Any]) -> None:
    """Route every token to expert 0: its router logit is x_0 + 1000, every other logit 0."""
    with torch.no_grad():
        sae.W_router.zero_()
        sae.W_router[0, 0] = 1.0
        sae.b_router.zero_()
        sae.b_router[0] = -1000.0


def forward_steps(sae: RoutedTrainingSAE[Any], n_steps: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for step in range(n_steps):
        step_input = TrainStepInput(
            sae_in=torch.randn(BATCH, D_MODEL),
            coefficients={},
            dead_neuron_mask=None,
            n_training_steps=step,
            is_logging_step=True,
        )
        metrics = sae.training_forward_pass(step_input).metrics
    return metrics


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_router_collapse_is_counted_logged_and_warned_once(architecture: str) -> None:
    sae = make_training_sae(architecture, router_collapse_window=5)
    forced_to_expert_zero(sae)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = forward_steps(sae, 4)
        assert metrics["routing/max_expert_token_share"] == pytest.approx(1.0)
        assert metrics["routing/collapse_streak"] == 4 and metrics["routing/collapse_warning"] == 0
        assert not caught
        metrics = forward_steps(sae, 3)
    assert metrics["routing/collapse_streak"] == 7 and metrics["routing/collapse_warning"] == 1
    (warning,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert "Router collapse: for 5 consecutive training steps" in str(warning.message)
    assert "last step: 100.0%" in str(warning.message)

    torch.manual_seed(1)
    with torch.no_grad():
        sae.W_router.normal_()
        sae.b_router.zero_()
    metrics = forward_steps(sae, 1)
    assert metrics["routing/max_expert_token_share"] < 0.9
    assert metrics["routing/collapse_streak"] == 0 and metrics["routing/collapse_warning"] == 0


def test_collapse_is_not_checked_when_a_balanced_router_would_trip_it() -> None:
    """With 8 of 8 experts active every expert sees every token; that is not a collapse."""
    sae = make_training_sae("scale", n_active_experts=8, router_collapse_window=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        metrics = forward_steps(sae, 2)
    assert metrics["routing/max_expert_token_share"] == pytest.approx(1.0)
    assert metrics["routing/collapse_streak"] == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"router_collapse_fraction": 1.5}, r"router_collapse_fraction=1.5 must be in \(0, 1\]"),
        ({"router_collapse_fraction": 0.0}, r"router_collapse_fraction=0.0 must be in \(0, 1\]"),
        ({"router_collapse_window": 0}, r"router_collapse_window=0 must be >= 1"),
    ],
)
def test_bad_collapse_settings_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SAE_CONFIGS["switch"](**fields)
