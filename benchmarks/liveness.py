"""Why routed SAEs leave latents dead, measured on the quality benchmark's cached SmolLM2 activations.

Each variant trains with SAELens's ``SAETrainer`` on the same token stream as ``quality.py`` (its full budget unless
``--quick``), with a probe around ``training_forward_pass`` and a gradient hook on ``W_enc`` that record:

- when latents die: each latent's firing frequency over the last tenth of training at 10 %, 25 %, 50 % and 100 % of
  the steps (a histogram of log10 frequencies);
- whether AuxK reaches them: the AuxK loss's share of the loss, and the fraction of the trainer's dead latents whose
  encoder column receives a gradient in a step;
- dead latents per expert on held-out text, against that expert's share of the routing and its omega.

    python benchmarks/liveness.py --quick   # 4 variants on the quick budget
    python benchmarks/liveness.py           # the diagnosis on the full budget
"""

import argparse
import itertools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer
from tqdm import tqdm

from sae_lens_scale import (
    RoutedTrainingSAE,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)
from sae_lens_scale.metrics import expert_usage
from sae_lens_scale.routing import auxk_code

from common import (
    DEAD_WINDOW_FRACTION,
    QUALITY_FULL,
    QUALITY_QUICK,
    QualityConfig,
    activation_cache,
    activation_scale,
    batches,
    cached_activations,
    reconstruction,
    result_file,
    trainer_config,
    write_results,
)

SNAPSHOTS = (0.1, 0.25, 0.5, 1.0)
FREQUENCY_BINS = torch.linspace(-6, 0, 25)  # log10 firing frequency; never-firing latents are counted apart


@dataclass
class Variant:
    """An SAE config (``fields`` over the package defaults) and the trainer's dead-latent window, in steps/total."""

    name: str
    architecture: str
    fields: dict[str, Any] = field(default_factory=dict)
    dead_window_fraction: float = DEAD_WINDOW_FRACTION

    def make(self, d_in: int, d_sae: int, k: int) -> RoutedTrainingSAE[Any]:
        if self.architecture == "switch":
            return SwitchTrainingSAE(SwitchTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, **self.fields))
        return ScaleTrainingSAE(ScaleTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, **self.fields))


SCALE = {"n_experts": 32, "n_active_experts": 2}
NO_FS = {**SCALE, "feature_scaling": "none"}
SWITCH = {"n_experts": 16}
# The recipe before this study: zero biases, SAELens's 0.1 decoder init norm, AuxK after a quarter of the run.
OLD = {"bias_init": "none", "decoder_init_norm": 0.1}
MEDIAN = {"decoder_init_norm": 0.1}  # the old recipe with geometric-median biases, one lever at a time on top
VARIANTS = [
    Variant("Scale 32/e=2, old recipe", "scale", {**SCALE, **OLD}, 1 / 4),
    Variant("Scale 32/e=2 no FS, old recipe", "scale", {**NO_FS, **OLD}, 1 / 4),
    Variant("Switch 16, old recipe", "switch", {**SWITCH, **OLD}, 1 / 4),
    Variant("Scale 32/e=2, + median biases", "scale", {**SCALE, **MEDIAN}, 1 / 4),
    Variant("Scale 32/e=2 no FS, + median biases", "scale", {**NO_FS, **MEDIAN}, 1 / 4),
    Variant("Switch 16, + median biases", "switch", {**SWITCH, **MEDIAN}, 1 / 4),
    Variant("Scale 32/e=2, + mean biases", "scale", {**SCALE, **MEDIAN, "bias_init": "mean"}, 1 / 4),
    Variant("Scale 32/e=2, + median biases, AuxK x4", "scale", {**SCALE, **MEDIAN, "aux_loss_coefficient": 4.0}, 1 / 4),
    Variant("Scale 32/e=2, + median biases, window 1/16", "scale", {**SCALE, **MEDIAN}),
    *[
        Variant(
            f"Scale 32/e=2, + median biases, encoder norm {norm}", "scale", {**SCALE, "decoder_init_norm": norm}, 1 / 4
        )
        for norm in (0.5, 1.0, 2.0, 4.0)
    ],
    Variant("Scale 32/e=2, new recipe", "scale", SCALE),
    Variant("Scale 32/e=2 no FS, new recipe", "scale", NO_FS),
    Variant("Switch 16, new recipe", "switch", SWITCH),
    *[
        Variant(f"Scale 32/e=2, new recipe, encoder norm {norm}", "scale", {**SCALE, "decoder_init_norm": norm})
        for norm in (0.5, 2.0)
    ],
]


class Probe:
    """Records firing, AuxK's loss share and which dead latents get an encoder gradient, step by step."""

    def __init__(self, sae: RoutedTrainingSAE[Any], total_steps: int) -> None:
        self.sae, self.total_steps = sae, total_steps
        self.window = max(1, total_steps // 10)
        self.fired = torch.zeros(self.window, sae.cfg.d_sae, dtype=torch.bool)
        self.dead_mask: torch.Tensor | None = None
        self.steps: list[dict[str, float]] = []
        self.histograms: dict[str, list[float]] = {}
        self.forward = sae.training_forward_pass
        sae.training_forward_pass = self.training_forward_pass  # type: ignore[method-assign]
        sae.W_enc.register_hook(self.reach)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = self.forward(step_input)
        step = step_input.n_training_steps
        feature_acts = output.feature_acts  # the routed pass hands the trainer a coalesced COO tensor
        latents = feature_acts.indices()[1][feature_acts.values() > 0]
        self.fired[step % self.window] = False
        self.fired[step % self.window, latents] = True
        self.dead_mask = step_input.dead_neuron_mask
        losses = {name: value.item() for name, value in output.losses.items()}
        n_dead = int(self.dead_mask.sum()) if self.dead_mask is not None else 0
        self.steps.append({"step": step, "n_dead": n_dead, **losses})
        if n_dead and step % 10 == 0 and self.dead_mask is not None:
            self.steps[-1]["dead_in_auxk"] = self.auxk_reach(step_input.sae_in, self.dead_mask)
        for fraction in SNAPSHOTS:
            if step + 1 == round(fraction * self.total_steps):
                self.histograms[str(fraction)] = self.frequency_histogram(min(step + 1, self.window))
        return output

    @torch.no_grad()
    def auxk_reach(self, sae_in: torch.Tensor, dead: torch.Tensor) -> float:
        """Fraction of the dead latents that AuxK activates (positively) on at least one token of the batch."""
        encoding = self.sae.encode_routed(sae_in)
        n_dead = int(dead.sum())
        code = auxk_code(encoding, dead, min(self.sae.cfg.d_in // 2, n_dead))
        return code.latents[code.acts > 0].unique().numel() / n_dead

    def reach(self, grad: torch.Tensor) -> None:
        """Fraction of this step's dead latents whose encoder column got a non-zero gradient."""
        if self.dead_mask is not None and self.dead_mask.any():
            touched = grad.abs().sum(0) > 0
            self.steps[-1]["dead_reached"] = (touched & self.dead_mask).sum().item() / self.dead_mask.sum().item()

    def frequency_histogram(self, steps_seen: int) -> list[float]:
        """Counts of latents per log10 firing-frequency bin over the last window; the first entry: never fired."""
        frequency = self.fired[:steps_seen].float().mean(0)
        never = int((frequency == 0).sum())
        counts = torch.histc(frequency[frequency > 0].log10(), bins=len(FREQUENCY_BINS) - 1, min=-6, max=0)
        return [never, *counts.tolist()]


def diagnose(variant: Variant, cfg: QualityConfig, acts: dict[str, torch.Tensor], scale: float) -> dict:
    train, heldout = acts["train"], acts["heldout"].float() * scale
    torch.manual_seed(0)
    sae = variant.make(train.shape[1], cfg.d_sae, cfg.k)
    probe = Probe(sae, cfg.train_tokens * cfg.epochs // cfg.batch)
    trainer_cfg = trainer_config(cfg, variant.dead_window_fraction)
    started = time.perf_counter()
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches(train, cfg.batch, scale, seed=0)).fit()
    seconds = time.perf_counter() - started
    sae.eval()
    with torch.no_grad():
        fit = reconstruction(sae, heldout)
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
        for chunk in heldout.split(4096):
            code = sae.encode_routed(chunk).code
            fired[code.latents[code.acts > 0]] = True
    usage = expert_usage(sae, heldout)
    n_experts = sae.cfg.n_experts
    omega = sae.feature_scaling_omega()
    aux_steps = [s for s in probe.steps if s["n_dead"] > 0]
    return {
        "name": variant.name,
        "fields": variant.fields,
        "dead_window_fraction": variant.dead_window_fraction,
        "train_seconds": seconds,
        "fvu": fit["fvu"],
        "dead_heldout": int((~fired).sum()),
        "dead_per_expert": (~fired).view(n_experts, -1).sum(1).tolist(),
        "expert_share": usage.fractions.tolist(),
        "omega": omega.detach().tolist() if omega is not None else None,
        "histograms": probe.histograms,
        "aux_share": sum(s["auxiliary_reconstruction_loss"] / s["mse_loss"] for s in aux_steps)
        / max(1, len(aux_steps)),
        "dead_reached": sum(s.get("dead_reached", 0.0) for s in aux_steps) / max(1, len(aux_steps)),
        "dead_in_auxk": sum(s.get("dead_in_auxk", 0.0) for s in aux_steps if "dead_in_auxk" in s)
        / max(1, sum("dead_in_auxk" in s for s in aux_steps)),
        "steps": probe.steps,
    }


def plots(results: list[dict], stem: str) -> list[Path]:
    paths = []
    figure = Figure(figsize=(12, 4), layout="constrained")
    per_expert, death, reach = figure.subplots(1, 3)
    colours = [colormaps["tab20"](index) for index in range(20)]  # one colour per variant, up to 20
    for result, colour in zip(results, itertools.cycle(colours), strict=False):
        share = torch.tensor(result["expert_share"]) * len(result["expert_share"])
        per_expert.scatter(share, result["dead_per_expert"], s=10, color=colour, label=result["name"])
        steps = [s["step"] for s in result["steps"]]
        death.plot(steps, [s["n_dead"] for s in result["steps"]], color=colour, label=result["name"])
        reached = [(s["step"], s["dead_reached"]) for s in result["steps"] if "dead_reached" in s]
        if reached:
            reach.plot(*zip(*reached, strict=True), color=colour, label=result["name"])
    per_expert.set(xlabel="expert's routing share x n_experts (1 = balanced)", ylabel="dead latents on held-out text")
    death.set(xlabel="training step", ylabel="dead latents (trainer's window)")
    reach.set(xlabel="training step", ylabel="fraction of dead latents with an encoder gradient", ylim=(0, 1.05))
    death.legend(fontsize=7)
    paths.append(result_file(f"{stem}-experts.png"))
    figure.savefig(paths[-1], dpi=120)

    n_columns = min(len(results), 6)
    n_rows = -(-len(results) // n_columns)
    figure = Figure(figsize=(4 * n_columns, 3.5 * n_rows), layout="constrained")
    axes = figure.subplots(n_rows, n_columns, sharey=True, squeeze=False).flatten()
    for ax in axes[len(results) :]:
        ax.set_visible(False)
    centres = ((FREQUENCY_BINS[:-1] + FREQUENCY_BINS[1:]) / 2).tolist()
    for ax, result in zip(axes[: len(results)], results, strict=True):
        for fraction, counts in result["histograms"].items():
            ax.plot([-6.5, *centres], counts, marker=".", label=f"{float(fraction):.0%} of training")
        title = result["name"].replace(", ", ",\n", 1)
        ax.set(title=title, xlabel="log10 firing frequency (-6.5: never)", yscale="symlog")
    axes[0].set(ylabel="latents")
    axes[0].legend(fontsize=7)
    paths.append(result_file(f"{stem}-firing.png"))
    figure.savefig(paths[-1], dpi=120)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick budget (quality.py --quick's activations)")
    parser.add_argument("--only", nargs="*", help="run only these variant names")
    args = parser.parse_args()
    cfg = replace(QUALITY_QUICK if args.quick else QUALITY_FULL, seeds=(0,))
    acts = cached_activations(cfg, activation_cache(cfg))
    scale = activation_scale(acts["train"])
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only]
    results = [diagnose(variant, cfg, acts, scale) for variant in tqdm(chosen, desc="variants")]
    stem = "liveness-cpu-quick" if args.quick else "liveness-cpu"
    write_results(stem, {"config": cfg.__dict__, "results": results}, indent=1)
    plots(results, stem)
    for result in results:
        omega = "-" if result["omega"] is None else f"{sum(result['omega']) / len(result['omega']):.3f}"
        print(
            f"{result['name']:40s} FVU {result['fvu']:.4f}  dead {result['dead_heldout']:5d}  "
            f"AuxK/MSE {result['aux_share']:.3f}  dead with grad {result['dead_reached']:.3f}  "
            f"dead in AuxK {result['dead_in_auxk']:.3f}  mean omega {omega}"
        )
    print(f"{sum(r['train_seconds'] for r in results):.0f} s of training")


if __name__ == "__main__":
    main()
