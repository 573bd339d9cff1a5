"""The routed SAE classes: the fast path against a plain dense computation of the same math
(``tests.support.builders.dense_reference``), conditional compute, host reads and allocations of a step, export and
SAELens's folds, zero-norm decoder rows, and a training step that goes wrong."""

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from sae_lens_scale import RoutedTrainingSAE, ScaleSAE, ScaleTrainingSAE, ScaleTrainingSAEConfig, SwitchSAE
from sae_lens_scale.flops import routed_flops
from sae_lens_scale.routing import uses_grouped_mm
from sae_lens_scale.training_guards import geometric_median
from tests.support.builders import StepAudit, dense_reference, scale_training_sae, step_input, switch_training_sae
from tests.support.models import D_MODEL

D_IN, D_SAE, N_EXPERTS, K = 12, 48, 6, 5
BUILDERS = [scale_training_sae, switch_training_sae]


SHAPE = {"d_in": D_IN, "d_sae": D_SAE, "n_experts": N_EXPERTS, "k": K}


def reference_sae(
    n_active_experts: int, feature_scaling: str, seed: int = 0, dtype: str = "float64"
) -> ScaleTrainingSAE:
    fields = {"n_active_experts": n_active_experts, "feature_scaling": feature_scaling, "dtype": dtype}
    return scale_training_sae(seed, **fields, **SHAPE)


def grads_of(sae: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    return {name: param.grad.clone() for name, param in sae.named_parameters() if param.grad is not None}


CASES = [(1, "none"), (1, "mean"), (2, "none"), (2, "mean"), (N_EXPERTS, "none"), (N_EXPERTS, "mean")]


# float64 runs the experts one matmul at a time (exact to rounding); float32 runs them as torch's grouped GEMM.
PRECISIONS = {  # (rtol, atol) of the outputs, then of the gradients
    "float64": ((1e-10, 1e-10), (1e-8, 1e-10)),
    "float32": ((1e-5, 1e-5), (1e-4, 1e-4)),
}


@pytest.mark.parametrize("dtype", list(PRECISIONS))
@pytest.mark.parametrize(("n_active_experts", "feature_scaling"), CASES)
def test_training_pass_equals_dense_reference(n_active_experts: int, feature_scaling: str, dtype: str) -> None:
    sae = reference_sae(n_active_experts, feature_scaling, dtype=dtype)
    assert uses_grouped_mm(sae.W_enc.dtype, D_IN, D_SAE // N_EXPERTS) is (dtype == "float32")
    (rtol, atol), (grad_rtol, grad_atol) = PRECISIONS[dtype]
    x = torch.randn(40, D_IN, dtype=sae.W_enc.dtype, generator=torch.Generator().manual_seed(7)) * 2
    dead = torch.rand(D_SAE, generator=torch.Generator().manual_seed(8)) < 0.5

    out = sae.training_forward_pass(step_input(x, dead))
    ref = dense_reference(sae, x, dead)

    torch.testing.assert_close(out.sae_out, ref["x_hat"], rtol=rtol, atol=atol)
    torch.testing.assert_close(out.feature_acts.to_dense(), ref["acts"], rtol=rtol, atol=atol)
    assert torch.equal(out.feature_acts.to_dense() != 0, ref["acts"] != 0)
    torch.testing.assert_close(out.losses["mse_loss"], ref["mse"], rtol=rtol, atol=atol)
    torch.testing.assert_close(out.losses["auxiliary_reconstruction_loss"], ref["aux"], rtol=rtol, atol=atol)
    assert ref["aux"] > 0
    fast_grads = grads_of(sae, out.loss)
    ref_grads = grads_of(sae, ref["loss"])
    assert fast_grads.keys() == ref_grads.keys() == dict(sae.named_parameters()).keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=grad_rtol, atol=grad_atol, msg=name)


@pytest.mark.parametrize(("n_active_experts", "feature_scaling"), CASES)
def test_dense_encode_decode_equal_reference_with_seq_dims(n_active_experts: int, feature_scaling: str) -> None:
    sae = reference_sae(n_active_experts, feature_scaling, seed=1)
    x = torch.randn(3, 7, D_IN, dtype=torch.float64)
    ref = dense_reference(sae, x.reshape(-1, D_IN), torch.zeros(D_SAE, dtype=torch.bool))

    acts = sae.encode(x)
    torch.testing.assert_close(acts.reshape(-1, D_SAE), ref["acts"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sae(x).reshape(-1, D_IN), ref["x_hat"], rtol=1e-10, atol=1e-10)
    assert (acts != 0).sum(-1).max() <= K


@pytest.mark.parametrize("n_active_experts", [1, 2])
def test_unrouted_experts_get_exactly_zero_gradient(n_active_experts: int) -> None:
    sae = reference_sae(n_active_experts, "mean", seed=3)
    x = torch.randn(1, D_IN, dtype=torch.float64)
    dead = torch.ones(D_SAE, dtype=torch.bool)  # AuxK on too, so every loss term is exercised
    grads = grads_of(sae, sae.training_forward_pass(step_input(x, dead)).loss)

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


@pytest.fixture
def grouped_mm_flops() -> Iterator[None]:
    """torch's FLOP counter has no formula for its grouped GEMM; this one counts 2 * M * K * N per product.

    ``[n, K] x [E, K, N]`` (forward and input gradient) and ``[K, n] x [n, N] -> [E, K, N]`` (weight gradient) both
    multiply every one of the n sorted rows once, so the ragged offsets do not change the count.
    """
    target = torch.ops.aten._grouped_mm
    if target in flop_registry:  # a later torch counts it itself
        yield
        return

    def formula(a_shape: torch.Size, b_shape: torch.Size, *args: object, **kwargs: object) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]

    register_flop_formula(target)(formula)
    yield
    del flop_registry[target]


def counted_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.usefixtures("grouped_mm_flops")
@pytest.mark.parametrize("n_active_experts", [1, 2, 8])
def test_training_step_matmul_flops_are_those_of_the_routed_experts(n_active_experts: int) -> None:
    """Counted with torch's FlopCounterMode, so it fails if any code path ever multiplies an unrouted expert."""
    d_in, d_sae, n_experts, k, batch = 64, 4096, 32, 16, 256
    torch.manual_seed(0)
    cfg = ScaleTrainingSAEConfig(d_in=d_in, d_sae=d_sae, n_experts=n_experts, n_active_experts=n_active_experts, k=k)
    sae = ScaleTrainingSAE(cfg)
    x = torch.randn(batch, d_in)
    outputs = []
    forward = counted_flops(lambda: outputs.append(sae.training_forward_pass(step_input(x, None))))
    backward = counted_flops(lambda: outputs[0].loss.backward())

    expected = routed_flops(d_in, d_sae, n_experts, n_active_experts, k)
    assert forward == batch * expected.encoder  # router + routed expert blocks; the decode is a gather
    assert backward == 2 * forward  # gradients of the same products, nothing more
    with torch.no_grad():
        assert counted_flops(lambda: sae.encode(x)) == forward


@pytest.mark.parametrize("make", BUILDERS)
def test_export_reproduces_training_outputs(make: Callable[..., RoutedTrainingSAE[Any]], tmp_path: Path) -> None:
    sae = make()
    assert (sae.W_dec.norm(dim=-1) - 1).abs().max() > 0.01  # the fold below has something to do
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is {"scale": ScaleSAE, "switch": SwitchSAE}[sae.cfg.architecture()]
    assert set(loaded.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_router", "b_router"}
    torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(64, dtype=torch.float64))
    x = torch.randn(4, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loaded(x), sae(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", BUILDERS)
def test_training_checkpoint_loaded_for_inference_decodes_as_trained(
    make: Callable[..., RoutedTrainingSAE[Any]], tmp_path: Path
) -> None:
    sae = make(feature_scaling="none") if make is scale_training_sae else make()
    sae.save_model(tmp_path)  # a checkpoint: W_dec rows are not unit norm
    loaded = SAE.load_from_disk(tmp_path)
    assert not isinstance(loaded, TrainingSAE)
    x = torch.randn(12, 16, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), sae(x), rtol=1e-12, atol=1e-12)


def exported(sae: RoutedTrainingSAE[Any], folder: Path) -> SAE[Any]:
    sae.save_inference_model(folder)
    return SAE.load_from_disk(folder)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("inference", [False, True])
def test_norm_scaling_fold_is_exact(apply_b_dec_to_input: bool, inference: bool, tmp_path: Path) -> None:
    sae: SAE[Any] = scale_training_sae(
        apply_b_dec_to_input=apply_b_dec_to_input, normalize_activations="expected_average_only_in"
    )
    if inference:
        sae = exported(sae, tmp_path)
    x = 40 * torch.randn(30, 16, dtype=torch.float64)
    s = 0.037
    before_acts, before_out, before_W_dec = sae.encode(x * s), sae(x * s), sae.W_dec.detach().clone()
    sae.fold_activation_norm_scaling_factor(s)
    assert sae.cfg.normalize_activations == "none"
    torch.testing.assert_close(before_out, s * sae(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(before_acts, s * sae.encode(x), rtol=1e-10, atol=1e-10)
    assert torch.equal(sae.W_dec, before_W_dec)  # exported decoders keep their unit-norm rows


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("inference", [False, True])
def test_whitening_fold_is_exact(apply_b_dec_to_input: bool, inference: bool, tmp_path: Path) -> None:
    training = scale_training_sae(apply_b_dec_to_input=apply_b_dec_to_input)
    sae: SAE[Any] = exported(training, tmp_path) if inference else training
    torch.manual_seed(5)
    mean = torch.randn(16, dtype=torch.float64)
    whitening = torch.randn(16, 16, dtype=torch.float64) / 4 + torch.eye(16, dtype=torch.float64)
    unwhitening = torch.linalg.inv(whitening)
    x = torch.randn(30, 16, dtype=torch.float64) + mean
    z = (x - mean) @ whitening
    expected_out = sae(z) @ unwhitening + mean
    expected_acts = sae.encode(z)
    sae.fold_activation_whitening(mean, whitening, unwhitening)
    torch.testing.assert_close(sae(x), expected_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sae.encode(x), expected_acts, rtol=1e-9, atol=1e-9)
    if not inference:
        assert training.cfg.normalize_decoder_rows is False
        torch.testing.assert_close(exported(training, tmp_path / "after")(x), expected_out, rtol=1e-9, atol=1e-9)


def test_w_dec_norm_fold_is_exact_or_refused(tmp_path: Path) -> None:
    sae = scale_training_sae()
    x = torch.randn(30, 16, dtype=torch.float64)
    expected = sae(x)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(sae(x), expected, rtol=1e-12, atol=1e-12)

    inference = exported(sae, tmp_path)
    folded = SAE.load_from_disk(tmp_path, fold_W_dec_norm=True)
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        inference.W_dec[3] *= 2  # normalised decoding ignores the row norm, so the fold stays exact
    torch.testing.assert_close(inference(x), expected, rtol=1e-12, atol=1e-12)
    inference.fold_W_dec_norm()
    torch.testing.assert_close(inference(x), expected, rtol=1e-12, atol=1e-12)
    inference.cfg.normalize_decoder_rows = False
    with torch.no_grad():
        inference.W_dec[3] *= 2
    with pytest.raises(NotImplementedError, match="needs unit-norm W_dec rows"):
        inference.fold_W_dec_norm()


@pytest.mark.parametrize("make", BUILDERS)
def test_folding_an_exported_sae_changes_none_of_its_tensors(
    make: Callable[..., RoutedTrainingSAE[Any]], tmp_path: Path
) -> None:
    loaded = exported(make(), tmp_path)
    before = {name: tensor.clone() for name, tensor in loaded.state_dict().items()}
    assert (loaded.W_dec.norm(dim=-1) - 1).abs().max() > 0  # unit rows only up to rounding, so a divide would move
    loaded.fold_W_dec_norm()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("make", BUILDERS)
def test_activation_fn_is_the_top_k_over_the_routed_candidates(make: Callable[..., RoutedTrainingSAE[Any]]) -> None:
    """Applied to the routed candidates, SAELens's TopK picks the latents encode activates, with their ungated
    activations, so a tool that reads ``activation_fn`` learns the truth."""
    sae = make()
    x = torch.randn(40, 16, dtype=torch.float64)
    encoding = sae.encode_routed(x)
    winners = sae.activation_fn(encoding.candidates)
    expert_width = sae.cfg.d_sae // sae.cfg.n_experts
    reference = torch.zeros(40, sae.cfg.d_sae, dtype=torch.float64)
    for token, position in winners.nonzero().tolist():
        slot, local = divmod(position, expert_width)
        latent = encoding.routing.experts[token, slot].item() * expert_width + local
        reference[token, latent] = encoding.routing.gates[token, slot] * winners[token, position]
    torch.testing.assert_close(sae.encode(x), reference, rtol=1e-12, atol=0)


ZEROED_ROWS = [0, 9, 33]


def with_zero_rows(sae: RoutedTrainingSAE[Any]) -> RoutedTrainingSAE[Any]:
    with torch.no_grad():
        sae.W_dec[ZEROED_ROWS] = 0
    return sae


def zero_row_reference(sae: RoutedTrainingSAE[Any], x: torch.Tensor) -> torch.Tensor:
    """The decode of the same activations with the zero rows left out: what a zero row must contribute (nothing)."""
    acts = sae.encode(x)
    kept = torch.ones(64, dtype=torch.bool)
    kept[ZEROED_ROWS] = False
    W_dec = sae.W_dec[kept]
    return acts[:, kept] @ (W_dec / W_dec.norm(dim=1, keepdim=True)) + sae.b_dec


@pytest.mark.parametrize("make", BUILDERS)
def test_zero_norm_decoder_rows_stay_finite_in_training_and_decode(make: Callable[..., RoutedTrainingSAE[Any]]) -> None:
    sae = with_zero_rows(make())
    x = torch.randn(50, 16, dtype=torch.float64)
    out = sae.training_forward_pass(step_input(x, torch.ones(64, dtype=torch.bool)))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.sae_out, zero_row_reference(sae, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sae(x), out.sae_out, rtol=1e-10, atol=1e-10)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters() if p.grad is not None)


@pytest.mark.parametrize("make", BUILDERS)
def test_zero_norm_decoder_rows_survive_export_load_and_folds(
    make: Callable[..., RoutedTrainingSAE[Any]], tmp_path: Path
) -> None:
    sae = with_zero_rows(make())
    x = torch.randn(50, 16, dtype=torch.float64)
    expected = zero_row_reference(sae, x)

    sae.save_inference_model(tmp_path / "export")
    saved = load_file(tmp_path / "export" / "sae_weights.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())
    assert torch.count_nonzero(saved["W_dec"][ZEROED_ROWS]) == 0
    loaded = SAE.load_from_disk(tmp_path / "export")  # refused as "diverged" if the export had written NaN
    torch.testing.assert_close(loaded(x), expected, rtol=1e-10, atol=1e-10)

    loaded.fold_W_dec_norm()
    torch.testing.assert_close(loaded(x), expected, rtol=1e-10, atol=1e-10)
    loaded.cfg.normalize_decoder_rows = False  # unit and zero rows decode the same either way
    loaded.fold_W_dec_norm()  # so this fold is exact and accepted
    torch.testing.assert_close(loaded(x), expected, rtol=1e-10, atol=1e-10)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae(x), expected, rtol=1e-10, atol=1e-10)
    mean, whitening = torch.zeros(16, dtype=torch.float64), 2 * torch.eye(16, dtype=torch.float64)
    sae.fold_activation_whitening(mean, whitening, torch.linalg.inv(whitening))
    torch.testing.assert_close(sae(x / 2), expected / 2, rtol=1e-10, atol=1e-10)  # x -> 2x in, halved out


BATCH = 256


def tiny_training_sae(architecture: str, **fields: Any) -> RoutedTrainingSAE[Any]:
    make = scale_training_sae if architecture == "scale" else switch_training_sae
    return make(d_in=D_MODEL, d_sae=128, k=8, dtype="float32", **fields)


def make_trainer(sae: RoutedTrainingSAE[Any]) -> SAETrainer[Any, Any]:
    cfg = SAETrainerConfig(total_training_samples=10 * BATCH, train_batch_size_samples=BATCH, lr=1e-3, lr_end=1e-3)
    return SAETrainer(cfg, sae, data_provider=iter([]))


def snapshot(trainer: SAETrainer[Any, Any]) -> dict[str, Any]:
    return {
        "weights": {name: tensor.clone() for name, tensor in trainer.sae.state_dict().items()},
        "optimizer": {index: {k: v.clone() for k, v in s.items()} for index, s in trainer.optimizer.state.items()},
    }


@pytest.mark.parametrize("architecture", ["scale", "switch"])
@pytest.mark.parametrize(
    ("bad_value", "counts"), [(float("nan"), "3 NaN and 0 inf"), (float("inf"), "0 NaN and 3 inf")]
)
def test_non_finite_batch_fails_its_step_and_leaves_the_weights_alone(
    architecture: str, bad_value: float, counts: str
) -> None:
    trainer = make_trainer(tiny_training_sae(architecture))
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


@pytest.mark.parametrize("architecture", ["scale", "switch"])
def test_overflowing_batch_names_the_loss_not_the_data(architecture: str) -> None:
    trainer = make_trainer(tiny_training_sae(architecture))
    batch = torch.randn(BATCH, D_MODEL)
    batch[3] = 1e30  # finite, but its squared error overflows float32
    before = trainer.sae.W_dec.clone()
    with pytest.raises(FloatingPointError, match=r"Training step 0 .*: the loss is not finite \(mse_loss=inf.*1e\+30"):
        trainer.step(batch)
    assert torch.equal(trainer.sae.W_dec, before)


@pytest.mark.parametrize("architecture", ["scale", "switch"])
def test_autocast_runs_the_experts_in_bf16_and_the_router_in_fp32(architecture: str) -> None:
    sae = tiny_training_sae(architecture)
    x = torch.randn(BATCH, D_MODEL, generator=torch.Generator().manual_seed(2))
    full = sae.encode_routed(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = sae.encode_routed(x)
    assert mixed.routing.probs.dtype == torch.float32
    torch.testing.assert_close(mixed.routing.probs, full.routing.probs, rtol=0, atol=0)
    assert torch.equal(mixed.routing.experts, full.routing.experts)
    relative_error = ((mixed.candidates - full.candidates).norm() / full.candidates.norm()).item()
    assert 1e-4 < relative_error < 1e-2  # bf16 rounding (2^-9 per input), nothing worse


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
        batch = torch.randn(BATCH, D_MODEL)
        metrics = sae.training_forward_pass(step_input(batch, None, step + 1, logging=True)).metrics
    return metrics


@pytest.mark.parametrize("architecture", ["scale", "switch"])
def test_router_collapse_is_counted_logged_and_warned_once(architecture: str) -> None:
    sae = tiny_training_sae(architecture, router_collapse_window=5)
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
    sae = tiny_training_sae("scale", n_active_experts=8, router_collapse_window=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        metrics = forward_steps(sae, 2)
    assert metrics["routing/max_expert_token_share"] == pytest.approx(1.0)
    assert metrics["routing/collapse_streak"] == 0


def summed_distance(points: torch.Tensor, centre: torch.Tensor) -> float:
    return (points - centre).norm(dim=1).sum().item()


def test_geometric_median_known_answer_and_optimality() -> None:
    direction = torch.tensor([3.0, 4.0], dtype=torch.float64) / 5
    on_a_line = torch.stack([-1 * direction, 0 * direction, 5 * direction])
    torch.testing.assert_close(geometric_median(on_a_line), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-6)

    generator = torch.Generator().manual_seed(0)
    cloud = torch.randn(500, 6, dtype=torch.float64, generator=generator)
    cloud[:20] += 100  # a few far outliers pull the mean, not the median
    median = geometric_median(cloud)
    best = summed_distance(cloud, median)
    assert best < summed_distance(cloud, cloud.mean(0)) - 1.0
    for _ in range(20):
        nudge = 1e-3 * torch.randn(6, dtype=torch.float64, generator=generator)
        assert best <= summed_distance(cloud, median + nudge) + 1e-9


@pytest.mark.parametrize("bias_init", ["geometric_median", "mean", "none"])
def test_first_step_sets_the_biases_from_its_batch_once(bias_init: str) -> None:
    sae = tiny_training_sae("scale", bias_init=bias_init)
    before = {name: getattr(sae, name).detach().clone() for name in ("b_dec", "b_router")}
    batch = torch.randn(BATCH, D_MODEL) + 3.0
    sae.training_forward_pass(step_input(batch, None, step=0))
    expected = {"geometric_median": geometric_median(batch), "mean": batch.mean(0), "none": before["b_dec"]}
    torch.testing.assert_close(sae.b_dec.detach(), expected[bias_init])
    torch.testing.assert_close(
        sae.b_router.detach(), expected[bias_init] if bias_init != "none" else before["b_router"]
    )

    later = sae.b_dec.detach().clone()
    sae.training_forward_pass(step_input(batch - 10.0, None, step=1))  # a later (or resumed) step leaves them alone
    assert torch.equal(sae.b_dec.detach(), later)


def biases(sae: RoutedTrainingSAE[Any]) -> dict[str, torch.Tensor]:
    return {name: getattr(sae, name).detach().clone() for name in ("b_dec", "b_router")}


def test_a_trained_saved_or_loaded_sae_never_sets_its_biases_from_data_again(tmp_path: Path) -> None:
    """Biases come from data once in an SAE's life: a later first step, on the SAE, on its checkpoint loaded into a
    fresh SAE, or on its export loaded for training, leaves the trained biases as they are."""
    trainer = make_trainer(tiny_training_sae("scale"))
    generator = torch.Generator().manual_seed(4)
    for step in range(3):
        trainer.n_training_steps = step
        trainer.step(torch.randn(BATCH, D_MODEL, generator=generator) + 3.0)
    sae = trainer.sae
    trained = biases(sae)
    assert sae.bias_init_done.item() == 1
    other_batch = torch.randn(BATCH, D_MODEL, generator=generator) - 5.0
    first_step = step_input(other_batch, None, step=0)

    sae.training_forward_pass(first_step)
    sae.save_model(tmp_path / "checkpoint")
    sae.save_inference_model(tmp_path / "export")
    fresh = tiny_training_sae("scale")
    fresh.load_weights_from_checkpoint(tmp_path / "checkpoint")
    from_disk = TrainingSAE.load_from_disk(tmp_path / "checkpoint")
    from_export = TrainingSAE.load_from_disk(tmp_path / "export")
    assert isinstance(from_disk, RoutedTrainingSAE) and isinstance(from_export, RoutedTrainingSAE)
    for loaded in (sae, fresh, from_disk, from_export):
        loaded.training_forward_pass(first_step)
        for name, tensor in biases(loaded).items():
            assert torch.equal(tensor, trained[name]), name
    assert "bias_init_done" not in load_file(tmp_path / "export" / "sae_weights.safetensors")
    x = torch.randn(64, D_MODEL, generator=generator) + 3.0
    torch.testing.assert_close(from_export(x), sae(x), rtol=1e-5, atol=1e-5)  # omega = 0 on the folded encoder


def test_a_fresh_sae_sets_its_biases_on_the_first_finite_batch_only() -> None:
    sae = tiny_training_sae("switch")
    before = biases(sae)
    broken = torch.randn(BATCH, D_MODEL)
    broken[5, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="1 NaN and 0 inf values"):
        sae.training_forward_pass(step_input(broken, None, step=0))
    assert sae.bias_init_done.item() == 0 and all(torch.equal(t, before[n]) for n, t in biases(sae).items())
    batch = torch.randn(BATCH, D_MODEL) + 2.0
    sae.training_forward_pass(step_input(batch, None, step=0))
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(batch.double()).float())
    assert sae.bias_init_done.item() == 1


def test_a_training_step_reads_the_device_once_and_never_builds_batch_by_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward of a non-logging step with AuxK on: one host read (the step's checks), no value-dependent
    shapes, and no dense tensor as large as [batch, d_sae] (the largest are the [d_in, d_sae] parameter gradients)."""
    batch, d_in, d_sae = 512, 64, 4096
    cfg = ScaleTrainingSAEConfig(d_in=d_in, d_sae=d_sae, n_experts=32, n_active_experts=2, k=16)
    sae = ScaleTrainingSAE(cfg)
    assert uses_grouped_mm(torch.float32, d_in, d_sae // 32)
    x = torch.randn(batch, d_in)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::3] = True  # AuxK runs
    host_copies: list[int] = []
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor: torch.Tensor) -> Any:
        host_copies.append(tensor.numel())
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with StepAudit() as audit:
        out = sae.training_forward_pass(step_input(x, dead, step=5))
        out.loss.backward()
    assert out.losses["auxiliary_reconstruction_loss"] > 0
    assert audit.host_reads == [] and audit.data_dependent == []
    assert host_copies == [3]  # the loss guard, the dead count and the largest expert share, in one copy
    assert audit.largest[0] == d_in * d_sae, audit.largest
