"""Quality at matched width and matched FLOPs, on real activations: do the Scale SAE paper's claims hold?

The paper compares its 24576-latent Scale SAE with 768-latent baselines, 32x narrower. Here every SAE sees the same
cached activations of the bundled SmolLM2-135M-Instruct, in the same order, for the same number of tokens, with
SAELens's own ``SAETrainer``, one lr schedule and the same data-driven start (``b_dec``, and the routed SAEs'
``b_router``, at the geometric median of the first batch):

- SAELens TopK at the same total width, and at each routed SAE's FLOPs-matched width (equal encoder FLOPs per token);
- Switch with 16 and 32 experts;
- Scale with 32 experts and e = 2, 4, 8, each with and without Feature Scaling.

Evaluated on held-out Shakespeare (in-domain) and the Python documentation (cross-domain): per-token SSE, FVU, SAELens
``run_evals`` CE loss score, dead latents, redundancy and activation similarity, plus training time and FLOPs.

Layer: ``blocks.6.hook_resid_post`` of SmolLM2's 30 blocks. Harvesting costs one forward through every block up to
the hook, so an early layer keeps the full benchmark inside its time budget on a 2-core CPU. ``--layers`` repeats the
headline rows at ``blocks.18.hook_resid_post`` as well, where this model carries massive-activation dimensions
(values in the thousands from block 11 on) that dominate any MSE.

    python benchmarks/quality.py --quick    # a smaller comparison (half the width, 18 % of the tokens, one seed)
    python benchmarks/quality.py            # the full comparison
    python benchmarks/quality.py --curves   # learning curves: 4 SAEs, 4 passes, held-out FVU every 1/8 pass
    python benchmarks/quality.py --long-curves   # Scale 32/e=2 and Switch 16 for 12 passes, against those curves
    python benchmarks/quality.py --paper-width   # 24,576 latents, 64 experts, e up to 16, Gated (and --quick)
    python benchmarks/quality.py --layers   # the headline SAEs on layer 6 and on layer 18, one seed (and --quick)
    python benchmarks/quality.py --optimizers adam adam_fused adam_row_sparse   # the headline SAEs per optimizer
    python benchmarks/quality.py --quick --optimizers adam adam_fused adam_row_sparse   # the same, 2 seeds
"""

import argparse
import bisect
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.gated_sae import GatedTrainingSAEConfig
from sae_lens.saes.sae import SAE, SAEMetadata, TrainingSAE, TrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from tqdm import tqdm

from sae_lens_scale import ScaleTrainingSAEConfig, SwitchTrainingSAEConfig, metrics
from sae_lens_scale.flops import SaeFlops, flops_matched_topk_width, routed_flops, topk_flops
from sae_lens_scale.optimizers import OPTIMIZERS, OptimizerName
from sae_lens_scale.routed_sae import RoutedTrainingSAE
from sae_lens_scale.scale_sae import FeatureScaling
from sae_lens_scale.tools.sources import BUNDLED_MODEL

from common import (
    PAPER_WIDTH,
    QUALITY_FULL,
    QUALITY_QUICK,
    RESULTS,
    QualityConfig,
    activation_cache,
    activation_scale,
    batches,
    cached_activations,
    model_and_rows,
    reconstruction,
    result_file,
    train_sae,
    trainer_config,
    write_results,
)

# Learning curves: at what budget does Scale cross FLOPs-matched TopK? One run per SAE, four passes.
CURVES = replace(QUALITY_FULL, seeds=(0,), epochs=4)
CURVE_NAMES = ("Scale 32/e=2", "Switch 16", "TopK (FLOPs-matched to Scale 32/e=2)", "TopK (width-matched)")
CURVE_POINTS_PER_PASS = 8
# Longer training: the routed curves over 12 passes, against the TopK curves of --curves.
LONG_CURVES = replace(CURVES, epochs=12)
LONG_CURVE_NAMES = ("Scale 32/e=2", "Switch 16")
LONG_CURVE_POINTS_PER_PASS = 2
LONG_CURVE_BASELINES = ("TopK (FLOPs-matched to Scale 32/e=2)", "TopK (width-matched)")
# The optimizer comparison: each SAE with every optimizer it can train with (TopK has no row-sparse step). The
# width-matched TopK, the slowest, runs one seed: its optimizers are exact Adam either way.
OPTIMIZER_NAMES = ("Scale 32/e=2", "Switch 16", "TopK (FLOPs-matched to Scale 32/e=2)", "TopK (width-matched)")
ONE_SEED = ("TopK (width-matched)",)
# A second setting: the rows every claim at e = 2 needs, on layer 6 and on a later layer, in one run.
LAYER_HOOKS = ("blocks.6.hook_resid_post", "blocks.18.hook_resid_post")
LAYER_NAMES = (
    "Scale 32/e=2",
    "Scale 32/e=2 no FS",
    "Switch 16",
    "Switch 32",
    "TopK (width-matched)",
    "TopK (FLOPs-matched to Scale 32/e=2)",
)


Family = Literal["topk", "switch", "scale", "gated"]


class Contender(NamedTuple):
    name: str
    family: Family
    config: TrainingSAEConfig
    flops: SaeFlops

    def make(self) -> TrainingSAE[Any]:
        return get_sae_training_class(self.config.architecture())[0](self.config)


def contenders(cfg: QualityConfig, d_in: int) -> list[Contender]:
    M, k = cfg.d_sae, cfg.k

    def topk(width: int) -> TopKTrainingSAEConfig:
        # The routed SAEs' encoder scale (decoder_init_norm=1), which helps TopK too (docs/dead-latents.md).
        return TopKTrainingSAEConfig(d_in=d_in, d_sae=width, k=k, decoder_init_norm=1.0)

    routed: list[tuple[str, Family, TrainingSAEConfig, int, int]] = []
    for n in cfg.switch_experts:
        routed.append((f"Switch {n}", "switch", SwitchTrainingSAEConfig(d_in=d_in, d_sae=M, n_experts=n, k=k), n, 1))
    n = cfg.n_experts_scale
    for e in cfg.active_experts:
        scalings: list[tuple[FeatureScaling, str]] = [("mean", "")]
        if e in cfg.without_feature_scaling:
            scalings.append(("none", " no FS"))
        for scaling, suffix in scalings:
            config = ScaleTrainingSAEConfig(
                d_in=d_in, d_sae=M, n_experts=n, n_active_experts=e, k=k, feature_scaling=scaling
            )
            routed.append((f"Scale {n}/e={e}{suffix}", "scale", config, n, e))
    rows = [Contender("TopK (width-matched)", "topk", topk(M), topk_flops(d_in, M, k))]
    matched_widths: dict[int, str] = {}
    for name, _, _, n_experts, n_active_experts in routed:
        width = flops_matched_topk_width(M, n_experts, n_active_experts)
        matched_widths.setdefault(width, name.removesuffix(" no FS"))
    rows += [
        Contender(f"TopK (FLOPs-matched to {name})", "topk", topk(width), topk_flops(d_in, width, k))
        for width, name in matched_widths.items()
    ]
    rows += [
        Contender(name, family, make, routed_flops(d_in, M, n_experts, n_active_experts, k))
        for name, family, make, n_experts, n_active_experts in routed
    ]
    return rows


def headline(cfg: QualityConfig) -> tuple[str, ...]:
    """The rows the claims rest on, trained with every seed: Scale e=2 with and without Feature Scaling, Switch with
    Scale's experts, and both TopK baselines."""
    n = cfg.n_experts_scale
    return (f"Scale {n}/e=2", f"Scale {n}/e=2 no FS", f"Switch {n}", "TopK (width-matched)", matched_name(n, 2))


def matched_name(n_experts: int, e: int) -> str:
    return f"TopK (FLOPs-matched to Scale {n_experts}/e={e})"


def gated(cfg: QualityConfig, d_in: int, l1_coefficient: float) -> Contender:
    """SAELens's Gated SAE at the total width: the paper's third baseline, whose L0 its L1 coefficient sets."""
    config = GatedTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, l1_coefficient=l1_coefficient)
    dense = 2 * d_in * cfg.d_sae  # one encoder product shared by the gate and the magnitude, a dense decode
    return Contender(f"Gated (L0 target {cfg.gated_l0_target:g})", "gated", config, SaeFlops(dense, dense))


def read_off(tried: list[dict[str, float]], known: str, wanted: str, value: float) -> float:
    """``wanted`` at ``known`` = ``value`` on the tries' curve, linear in log-log between the two neighbouring tries
    (or the two end ones, outside the tried range)."""
    points = sorted((math.log(entry[known]), math.log(entry[wanted])) for entry in tried)
    x = math.log(value)
    i = min(max(bisect.bisect(points, (x,)), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def brackets(tried: list[dict[str, float]], target: float) -> bool:
    l0s = [entry["l0"] for entry in tried]
    return min(l0s) <= target <= max(l0s)


def gated_l1_coefficient(
    cfg: QualityConfig, train: torch.Tensor, heldout: torch.Tensor, scale: float, tries: int = 6
) -> list[dict[str, float]]:
    """Short Gated runs, each with the full run's steps on an eighth of its batch, that bracket the L0 target (or an
    error saying they could not).

    L0 keeps falling as training goes on, so a try with fewer steps would overshoot. The search steps by 10x until
    the target is bracketed, then interpolates, and stops within 5 % (after two tries at least, so that the
    curve has a slope).
    """
    target = cfg.gated_l0_target
    assert target is not None
    short = replace(cfg, train_tokens=cfg.train_tokens // 8, batch=cfg.batch // 8)
    coefficient = 1.0
    tried: list[dict[str, float]] = []
    for _ in tqdm(range(tries), desc="Gated L1 coefficient"):
        torch.manual_seed(0)
        sae = gated(cfg, train.shape[1], coefficient).make()
        train_sae(sae, batches(train, short.batch, scale, seed=0), trainer_config(short))
        l0 = max(reconstruction(sae, heldout * scale)["l0"], 1e-3)  # above 0, for the log-log reading
        tried.append({"l1_coefficient": coefficient, "l0": l0})
        if abs(l0 / target - 1) <= 0.05 and len(tried) > 1:
            break
        if brackets(tried, target):
            coefficient = read_off(tried, "l0", "l1_coefficient", target)
        else:
            coefficient *= 10.0 if l0 > target else 0.1
    if not brackets(tried, target):
        raise RuntimeError(f"no Gated L1 coefficient tried brackets the L0 target {target:g}: {tried}")
    return tried


def train_gated(
    cfg: QualityConfig, train: torch.Tensor, heldout: torch.Tensor, scale: float, attempts: int = 2
) -> tuple[TrainingSAE[Any], float, dict[str, Any]]:
    """The Gated SAE trained in full, with the coefficient whose held-out L0 came nearest the target.

    A full run's L0 differs from the short tries' at the same coefficient. The first full run measures by how much
    and aims the short tries' curve that much off; later ones interpolate between the full runs themselves. It stops
    within 10 % of the target.
    """
    target = cfg.gated_l0_target
    assert target is not None
    tried = gated_l1_coefficient(cfg, train, heldout, scale)
    coefficient = read_off(tried, "l0", "l1_coefficient", target)
    full_runs: list[dict[str, float]] = []
    saes: list[TrainingSAE[Any]] = []
    for _ in range(attempts):
        torch.manual_seed(0)
        sae = gated(cfg, train.shape[1], coefficient).make()
        seconds = train_sae(sae, batches(train, cfg.batch, scale, seed=0), trainer_config(cfg))
        l0 = reconstruction(sae, heldout * scale)["l0"]
        full_runs.append({"l1_coefficient": coefficient, "l0": l0, "train_seconds": seconds})
        saes.append(sae)
        if abs(l0 / target - 1) <= 0.1:
            break
        if len(full_runs) == 1:
            short_l0 = read_off(tried, "l1_coefficient", "l0", coefficient)
            coefficient = read_off(tried, "l0", "l1_coefficient", target * short_l0 / l0)
        else:
            coefficient = read_off(full_runs, "l0", "l1_coefficient", target)
    nearest = min(range(len(full_runs)), key=lambda i: abs(math.log(full_runs[i]["l0"] / target)))
    chosen = full_runs[nearest]
    calibration = {"l1_coefficient": chosen["l1_coefficient"], "short_tries": tried, "full_runs": full_runs}
    return saes[nearest], chosen["train_seconds"], calibration


def ce_loss_score(sae: SAE[Any], model: Any, rows: Any, cfg: QualityConfig) -> float:
    """SAELens ``run_evals``'s CE loss score (loss recovered against zero ablation) on the given token rows."""
    store = ActivationsStore.from_sae(
        model, sae, rows, context_size=cfg.context_size, streaming=False, sequence_separator_token=None
    )
    eval_cfg = EvalConfig(
        batch_size_prompts=cfg.ce_batch_prompts, n_eval_reconstruction_batches=cfg.ce_batches, compute_ce_loss=True
    )
    scalars, _ = run_evals(sae, store, model, ActivationScaler(), eval_cfg, exclude_special_tokens=False)
    return scalars["model_performance_preservation"]["ce_loss_score"]


def evaluate(
    sae: TrainingSAE[Any], scale: float, acts: dict[str, torch.Tensor], model: Any, datasets: Any, cfg: QualityConfig
) -> dict[str, Any]:
    omega = sae.feature_scaling_omega() if isinstance(sae, RoutedTrainingSAE) else None
    omega = omega.detach().tolist() if omega is not None else None
    sae.fold_activation_norm_scaling_factor(scale)
    sae.cfg.metadata = SAEMetadata(
        model_name=BUNDLED_MODEL, hook_name=cfg.hook, context_size=cfg.context_size, prepend_bos=False
    )
    sae.eval()
    heldout = acts["heldout"].float()
    row: dict[str, Any] = {
        "in_domain": reconstruction(sae, heldout),
        "cross_domain": reconstruction(sae, acts["cross"]),
        "redundancy_0_9": metrics.feature_redundancy(sae).fraction_above[0.9],
        "activation_similarity": metrics.activation_similarity(sae, heldout[:4096]).similarity,
        "omega": omega,
    }
    row["in_domain"]["ce_loss_score"] = ce_loss_score(sae, model, datasets["heldout"], cfg)
    row["cross_domain"]["ce_loss_score"] = ce_loss_score(sae, model, datasets["cross"], cfg)
    return row


def run(cfg: QualityConfig, cache: Path, names: set[str] | None = None) -> dict[str, Any]:
    """Train and evaluate every contender (or those in ``names``) and return the JSON-ready result."""
    acts = cached_activations(cfg, cache)
    model, datasets = model_and_rows(cfg)
    train = acts["train"]
    d_in = train.shape[1]
    scale = activation_scale(train)
    rows = []

    def record(contender: Contender, seed: int, sae: TrainingSAE[Any], seconds: float) -> None:
        rows.append(
            {
                "name": contender.name,
                "family": contender.family,
                "seed": seed,
                "d_sae": sae.cfg.d_sae,
                "encoder_flops_per_token": contender.flops.encoder,
                "train_seconds": seconds,
                **evaluate(sae, scale, acts, model, datasets, cfg),
            }
        )

    calibration = None
    if cfg.gated_l0_target is not None and names is None:  # first: its calibration is the step that can fail
        sae, seconds, calibration = train_gated(cfg, train, acts["heldout"].float(), scale)
        record(gated(cfg, d_in, calibration["l1_coefficient"]), 0, sae, seconds)
    for contender in tqdm([c for c in contenders(cfg, d_in) if names is None or c.name in names], desc="SAEs"):
        for seed in cfg.seeds if contender.name in headline(cfg) else cfg.seeds[:1]:
            torch.manual_seed(seed)
            sae = contender.make()
            record(contender, seed, sae, train_sae(sae, batches(train, cfg.batch, scale, seed=0), trainer_config(cfg)))
    return {
        "config": asdict(cfg),
        "d_in": d_in,
        "activation_scale": scale,
        "activation_max": train.abs().max().item(),
        "tokens": {split: tensor.shape[0] for split, tensor in acts.items()},
        "gated_calibration": calibration,
        "rows": rows,
    }


def run_optimizers(cfg: QualityConfig, cache: Path, optimizers: list[OptimizerName]) -> dict[str, Any]:
    """The optimizer comparison: ``OPTIMIZER_NAMES`` with each optimizer, on the same tokens in the same order."""
    acts = cached_activations(cfg, cache)
    model, datasets = model_and_rows(cfg)
    train = acts["train"]
    d_in = train.shape[1]
    scale = activation_scale(train)
    chosen = [c for c in contenders(cfg, d_in) if c.name in OPTIMIZER_NAMES]
    runs: list[tuple[Contender, OptimizerName]] = [
        (contender, optimizer)
        for contender in chosen
        for optimizer in optimizers
        if not (contender.family == "topk" and optimizer == "adam_row_sparse")
    ]
    rows = []
    for contender, optimizer in tqdm(runs, desc="SAE x optimizer"):
        for seed in cfg.seeds[:1] if contender.name in ONE_SEED else cfg.seeds:
            torch.manual_seed(seed)
            sae = contender.make()
            seconds = train_sae(sae, batches(train, cfg.batch, scale, seed=0), trainer_config(cfg), optimizer)
            rows.append(
                {
                    "name": contender.name,
                    "family": contender.family,
                    "optimizer": optimizer,
                    "seed": seed,
                    "d_sae": sae.cfg.d_sae,
                    "encoder_flops_per_token": contender.flops.encoder,
                    "train_seconds": seconds,
                    **evaluate(sae, scale, acts, model, datasets, cfg),
                }
            )
    return {"config": asdict(cfg), "d_in": d_in, "activation_scale": scale, "optimizers": optimizers, "rows": rows}


def run_layers(cfg: QualityConfig) -> dict[str, Any]:
    """``LAYER_NAMES`` trained on the same tokens at each of ``LAYER_HOOKS``, one result per layer."""
    layers = {}
    for hook in LAYER_HOOKS:
        layer_cfg = replace(cfg, hook=hook)
        layers[hook] = run(layer_cfg, activation_cache(layer_cfg), set(LAYER_NAMES))
        layers[hook]["summary"] = mean_over_seeds(layers[hook]["rows"])
    return {"config": asdict(cfg), "layers": layers}


def layers_report(result: dict[str, Any], stem: str) -> None:
    """Each SAE's numbers on both layers side by side, then the paper's claims at e = 2 on each layer."""
    cfg = result["config"]
    layers = result["layers"]
    short = {hook: hook.split(".")[1] for hook in layers}
    summaries = {hook: {row["name"]: row for row in layer["summary"]} for hook, layer in layers.items()}
    columns = (("fvu", "FVU", ".4f"), ("cross_fvu", "cross FVU", ".4f"), ("ce_score", "CE", ".3f"))
    columns += (("dead", "dead", ".0f"),)
    header = " | ".join(f"{label} L{short[hook]}" for _, label, _ in columns for hook in layers)
    lines = [
        "# The headline SAEs on two layers (CPU)",
        "",
        f"SmolLM2-135M-Instruct, the same {cfg['train_tokens']} training tokens (Shakespeare) in the same order at "
        + " and ".join(f"`{hook}`" for hook in layers)
        + f"; k={cfg['k']}, total width {cfg['d_sae']}, seeds {list(cfg['seeds'])}. Columns as in the quality "
        "table: FVU and dead latents on held-out plays, cross = the Python docs, CE = SAELens CE loss score.",
        "",
        f"| SAE | width | {header} |",
        "|---|---:|" + "---:|" * (len(columns) * len(layers)),
    ]
    for name in LAYER_NAMES:
        rows = [summaries[hook][name] for hook in layers]
        cells = " | ".join(f"{row[key]:{spec}}" for key, _, spec in columns for row in rows)
        lines.append(f"| {name} | {rows[0]['d_sae']} | {cells} |")
    for hook, layer in layers.items():
        activation_max = layer["activation_max"]
        lines += ["", f"## The paper's claims at e = 2, `{hook}` (largest activation {activation_max:,.0f})", ""]
        lines += verdict(layer["summary"], cfg["n_experts_scale"])
    table = "\n".join(lines) + "\n"
    write_results(stem, result, table)
    print(table)


def optimizers_report(result: dict[str, Any], stem: str) -> None:
    """Mean over seeds per (SAE, optimizer), each faster optimizer against Adam, and the recommendation's test:
    FVU within 1 % of Adam's and no more dead latents."""
    cfg = result["config"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in result["rows"]:
        groups.setdefault((row["name"], row["optimizer"]), []).append(row)
    summary = {}
    for (name, optimizer), group in groups.items():
        fvus = [row["in_domain"]["fvu"] for row in group]
        summary[name, optimizer] = {
            "name": name,
            "optimizer": optimizer,
            "seeds": len(group),
            "fvu": sum(fvus) / len(fvus),
            "fvu_spread": max(fvus) - min(fvus),
            "dead": _mean(group, lambda r: r["in_domain"]["dead_latents"]),
            "ce_score": _mean(group, lambda r: r["in_domain"]["ce_loss_score"]),
            "cross_fvu": _mean(group, lambda r: r["cross_domain"]["fvu"]),
            "train_seconds": _mean(group, lambda r: r["train_seconds"]),
        }
    lines = [
        "# SAE quality per optimizer (CPU)",
        "",
        f"SmolLM2-135M-Instruct `{cfg['hook']}`, {cfg['train_tokens']} training tokens (Shakespeare), the same order "
        f"for every run; k={cfg['k']}, total width {cfg['d_sae']}; seeds {list(cfg['seeds'])} (the width-matched TopK: "
        f"seed {cfg['seeds'][0]} only). FVU and dead latents on the in-domain held-out tokens, CE = SAELens "
        "`run_evals` CE loss score. vs Adam: the same SAE and seeds with SAELens's Adam. ± = max - min over seeds.",
        "",
        "| SAE | optimizer | seeds | FVU | vs Adam | dead | vs Adam | CE | cross FVU | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for (name, optimizer), row in summary.items():
        adam = summary.get((name, "adam"))
        fvu_change = row["fvu"] / adam["fvu"] - 1 if adam else float("nan")
        dead_change = row["dead"] - adam["dead"] if adam else float("nan")
        row["fvu_vs_adam"], row["dead_vs_adam"] = fvu_change, dead_change
        lines.append(
            f"| {name} | {optimizer} | {row['seeds']} | {row['fvu']:.4f} ± {row['fvu_spread']:.4f} "
            f"| {fvu_change:+.2%} | {row['dead']:.0f} | {dead_change:+.0f} | {row['ce_score']:.3f} "
            f"| {row['cross_fvu']:.4f} | {row['train_seconds']:.0f} |"
        )
        if optimizer != "adam" and adam:
            passes = fvu_change <= 0.01 and dead_change <= 0
            verdicts.append(
                f"- {name}, {optimizer}: FVU {fvu_change:+.2%} and {dead_change:+.0f} dead latents against Adam: "
                + ("within 1 % and no more dead." if passes else "outside the bar (FVU within 1 %, no more dead).")
            )
    result["summary"] = list(summary.values())
    table = "\n".join([*lines, "", "## Against Adam", "", *verdicts]) + "\n"
    write_results(stem, result, table)
    print(table)


def _mean(group: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> float:
    return sum(value(row) for row in group) / len(group)


def mean_over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per SAE: the mean over seeds, with the spread (max - min) of the in-domain FVU."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row)
    summary = []
    for name, group in groups.items():
        fvus = [row["in_domain"]["fvu"] for row in group]
        first = group[0]
        summary.append(
            {
                "name": name,
                "family": first["family"],
                "seeds": len(group),
                "d_sae": first["d_sae"],
                "encoder_flops_per_token": first["encoder_flops_per_token"],
                "fvu": _mean(group, lambda r: r["in_domain"]["fvu"]),
                "fvu_spread": max(fvus) - min(fvus),
                "sse": _mean(group, lambda r: r["in_domain"]["sse_per_token"]),
                "cross_fvu": _mean(group, lambda r: r["cross_domain"]["fvu"]),
                "ce_score": _mean(group, lambda r: r["in_domain"]["ce_loss_score"]),
                "cross_ce_score": _mean(group, lambda r: r["cross_domain"]["ce_loss_score"]),
                "dead": _mean(group, lambda r: r["in_domain"]["dead_latents"]),
                "l0": _mean(group, lambda r: r["in_domain"]["l0"]),
                "redundancy": _mean(group, lambda r: r["redundancy_0_9"]),
                "similarity": _mean(group, lambda r: r["activation_similarity"]),
                "train_seconds": _mean(group, lambda r: r["train_seconds"]),
                "omega_mean": _mean(group, lambda r: sum(r["omega"]) / len(r["omega"])) if first["omega"] else None,
            }
        )
    return summary


def markdown(result: dict[str, Any], summary: list[dict[str, Any]]) -> str:
    cfg = result["config"]
    passes = cfg.get("epochs", 1)
    lines = [
        "# SAE quality at matched width and matched FLOPs (CPU)",
        "",
        (
            f"SmolLM2-135M-Instruct `{cfg['hook']}` (d_in={result['d_in']}), {result['tokens']['train']} "
            "training tokens"
            f"{f' x {passes} passes' if passes > 1 else ''} "
            f"(Shakespeare), the same order for every SAE; k={cfg['k']}, total width {cfg['d_sae']}. Held-out: "
            f"{result['tokens']['heldout']} tokens of unseen plays (in-domain) and {result['tokens']['cross']} of the "
            "Python docs (cross-domain). FVU = 1 - explained variance. CE = SAELens `run_evals` CE loss score (loss "
            "recovered). Dead = latents never active on the in-domain held-out tokens. Redundancy = fraction of "
            "latents with max decoder cosine > 0.9. ± = max - min over seeds."
        ),
        "",
        (
            "| SAE | width | enc. MFLOP/tok | L0 | FVU | cross FVU | SSE/tok | CE | cross CE | dead | redundancy "
            "| act. sim. | mean ω | train s |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary:
        spread = f" ± {row['fvu_spread']:.4f}" if row["seeds"] > 1 else ""
        omega = f"{row['omega_mean']:.3f}" if row["omega_mean"] is not None else ""
        lines.append(
            f"| {row['name']} | {row['d_sae']} | {row['encoder_flops_per_token'] / 1e6:.2f} | {row['l0']:.1f} "
            f"| {row['fvu']:.4f}{spread} "
            f"| {row['cross_fvu']:.4f} | {row['sse']:.1f} | {row['ce_score']:.3f} | {row['cross_ce_score']:.3f} "
            f"| {row['dead']:.0f} | {row['redundancy']:.4f} | {row['similarity']:.4f} | {omega} "
            f"| {row['train_seconds']:.0f} |"
        )
    if len(summary) >= len(contenders(QualityConfig(**cfg), result["d_in"])):
        lines += ["", "## The paper's claims", "", *verdict(summary, cfg["n_experts_scale"], cfg["gated_l0_target"])]
    return "\n".join(lines) + "\n"


def _relative(a: dict[str, Any], b: dict[str, Any], key: str = "fvu") -> str:
    """``a`` against ``b`` as a signed percentage, flagged when the gap is inside the seed spread of either row."""
    change = f"{(a[key] - b[key]) / b[key]:+.1%}"
    spread = max(a["fvu_spread"], b["fvu_spread"]) if key == "fvu" else 0.0
    return change + (" (within the seed spread)" if abs(a[key] - b[key]) <= spread else "")


def verdict(summary: list[dict[str, Any]], n_experts: int, gated_l0_target: float | None = None) -> list[str]:
    """One line per paper claim, each with the measured numbers; 'holds' compares seed means."""
    rows = {row["name"]: row for row in summary}
    present = [e for e in (2, 4, 8, 16) if f"Scale {n_experts}/e={e}" in rows]
    scale = {e: rows[f"Scale {n_experts}/e={e}"] for e in present}
    plain = {e: rows[f"Scale {n_experts}/e={e} no FS"] for e in present if f"Scale {n_experts}/e={e} no FS" in rows}
    matched = {e: rows[matched_name(n_experts, e)] for e in present}
    half = n_experts // 2  # Switch with Scale e=2's active width
    switches = [rows[f"Switch {half}"], rows[f"Switch {n_experts}"]]
    dense = rows["TopK (width-matched)"]

    def holds(condition: bool) -> str:
        return "holds" if condition else "fails"

    def fvu(row: dict[str, Any]) -> str:
        return f"{row['fvu']:.4f}" + (f" ± {row['fvu_spread']:.4f}" if row["seeds"] > 1 else "")

    gated_line = [
        f"6. Scale {n_experts}/e=2 beats the Gated SAE at the same width: {holds(scale[2]['fvu'] < row['fvu'])}. "
        f"{fvu(scale[2])} vs {fvu(row)} ({_relative(scale[2], row)}); the Gated SAE's held-out L0 is {row['l0']:.1f} "
        f"against its target {gated_l0_target:g}, "
        f"{'within' if abs(row['l0'] / gated_l0_target - 1) <= 0.1 else 'outside'} 10 %."
        for row in summary
        if row["family"] == "gated" and gated_l0_target is not None
    ]
    omegas = [scale[e]["omega_mean"] for e in present]
    scale_redundancy = max(row["redundancy"] for row in scale.values())
    switch_redundancy = min(row["redundancy"] for row in switches)
    return [
        f"1. Scale beats FLOPs-matched TopK on FVU: {holds(all(scale[e]['fvu'] < matched[e]['fvu'] for e in scale))}. "
        + "; ".join(
            f"e={e}: {fvu(scale[e])} vs TopK {matched[e]['d_sae']} {fvu(matched[e])}, {_relative(scale[e], matched[e])}"
            for e in scale
        )
        + " (paper: -37 % at L0 = 32).",
        (
            f"2. Scale e=2 beats Switch at equal total and equal active width: "
            f"{holds(all(scale[2]['fvu'] < row['fvu'] for row in switches))}. Scale {n_experts}/e=2 {fvu(scale[2])} vs "
            f"Switch {half} (the same {switches[0]['d_sae'] // half} active latents) {fvu(switches[0])}, "
            f"{_relative(scale[2], switches[0])}; vs Switch {n_experts} (the same experts) {fvu(switches[1])}, "
            f"{_relative(scale[2], switches[1])}."
        ),
        f"3. Feature Scaling lowers FVU: {holds(all(scale[e]['fvu'] < plain[e]['fvu'] for e in plain))}. "
        + "; ".join(f"e={e}: {_relative(scale[e], plain[e])}" for e in plain)
        + " (paper: -10.9 % at e = 16). Mean ω ends "
        + ", ".join(f"{omega:.3f}" for omega in omegas)
        + f" for e = {', '.join(map(str, present))}: positive {holds(min(omegas) > 0)}"
        + (f", growing with e {holds(omegas == sorted(omegas))}." if len(present) > 1 else "."),
        f"4. Scale's redundancy is below Switch's: {holds(scale_redundancy < switch_redundancy)}. "
        "Fraction of latents with max decoder cosine > 0.9: Scale "
        + ", ".join(f"e={e} {scale[e]['redundancy']:.4f}" for e in scale)
        + f"; Switch {half} {switches[0]['redundancy']:.4f}, Switch {n_experts} {switches[1]['redundancy']:.4f}; "
        f"TopK {dense['redundancy']:.4f}. Scale e=2 against Switch {n_experts} (the same experts): "
        f"{_relative(scale[2], switches[1], 'redundancy')} (paper: -99 %).",
        (
            f"5. Width-matched, Scale {n_experts}/e=2 reaches FVU {fvu(scale[2])} against dense TopK's {fvu(dense)} "
            f"({_relative(scale[2], dense)}) and trains "
            f"{dense['train_seconds'] / scale[2]['train_seconds']:.1f}x faster "
            f"({scale[2]['train_seconds']:.0f} s vs {dense['train_seconds']:.0f} s for the same tokens)."
        ),
        *gated_line,
    ]


def plots(summary: list[dict[str, Any]], stem: str) -> list[Path]:
    from matplotlib.figure import Figure

    colours = {"topk": "tab:gray", "switch": "tab:orange", "scale": "tab:blue", "gated": "tab:green"}
    frontier = Figure(figsize=(8, 5))
    axes = frontier.subplots()
    topk = sorted((row for row in summary if row["family"] == "topk"), key=lambda row: row["encoder_flops_per_token"])
    axes.plot(
        [row["encoder_flops_per_token"] / 1e6 for row in topk],
        [row["fvu"] for row in topk],
        color=colours["topk"],
        linewidth=0.8,
    )
    for row in summary:
        flops = row["encoder_flops_per_token"] / 1e6
        axes.errorbar(  # half the max - min seed spread either side; zero for single-seed rows
            flops,
            row["fvu"],
            yerr=row["fvu_spread"] / 2,
            color=colours[row["family"]],
            marker="o" if "no FS" not in row["name"] else "x",
            capsize=2,
        )
        axes.annotate(row["name"], (flops, row["fvu"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axes.set(
        xscale="log",
        xlabel="encoder MFLOP per token (x: Scale without Feature Scaling)",
        ylabel="held-out FVU (lower is better)",
        title="Reconstruction against encoder cost",
    )
    flops = [row["encoder_flops_per_token"] / 1e6 for row in summary]
    ticks = [tick for tick in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if min(flops) / 2 <= tick <= max(flops) * 2]
    axes.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
    axes.set_xticks([], minor=True)
    frontier.tight_layout()
    frontier_path = result_file(f"{stem}-frontier.png")
    frontier.savefig(frontier_path, dpi=120)

    bars = Figure(figsize=(7, 4.5))
    axes = bars.subplots()
    names = [row["name"] for row in summary]
    axes.barh(names, [row["redundancy"] for row in summary], color=[colours[row["family"]] for row in summary])
    axes.set(xlabel="fraction of latents with max decoder cosine > 0.9", title="Feature redundancy")
    axes.invert_yaxis()
    bars.tight_layout()
    bars_path = result_file(f"{stem}-redundancy.png")
    bars.savefig(bars_path, dpi=120)
    return [frontier_path, bars_path]


class HeldoutCurve:
    """The training stream, evaluating the SAE it feeds on held-out activations every ``interval`` batches."""

    def __init__(self, sae: TrainingSAE[Any], stream: Iterator[torch.Tensor], heldout: torch.Tensor, interval: int):
        self.sae, self.stream, self.heldout, self.interval = sae, stream, heldout, interval
        self.batches = 0
        self.points: list[dict[str, float]] = []

    def __iter__(self) -> "HeldoutCurve":
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self.stream)
        if self.batches % self.interval == 0:
            self.record(tokens=self.batches * batch.shape[0])
        self.batches += 1
        return batch

    def record(self, tokens: int) -> None:
        """FVU and never-active latents on the held-out tokens, in the same scaled space the SAE trains in."""
        self.points.append({"tokens": tokens, **reconstruction(self.sae, self.heldout)})


def run_curves(
    cfg: QualityConfig,
    cache: Path,
    names: tuple[str, ...] = CURVE_NAMES,
    points_per_pass: int = CURVE_POINTS_PER_PASS,
) -> dict[str, Any]:
    """One run per SAE in ``names`` over ``cfg.epochs`` passes, with held-out FVU and dead latents along the way."""
    acts = cached_activations(cfg, cache)
    train = acts["train"]
    d_in = train.shape[1]
    scale = activation_scale(train)
    heldout = acts["heldout"].float() * scale
    interval = cfg.train_tokens // cfg.batch // points_per_pass
    curves = {}
    for contender in tqdm([c for c in contenders(cfg, d_in) if c.name in names], desc="SAEs"):
        torch.manual_seed(0)
        sae = contender.make()
        curve = HeldoutCurve(sae, batches(train, cfg.batch, scale, seed=0), heldout, interval)
        seconds = train_sae(sae, curve, trainer_config(cfg))
        curve.record(tokens=curve.batches * cfg.batch)
        curves[contender.name] = {
            "family": contender.family,
            "d_sae": sae.cfg.d_sae,
            "encoder_flops_per_token": contender.flops.encoder,
            "training_flops_per_token": contender.flops.training_step,
            "train_seconds": seconds,
            "points": curve.points,
        }
    return {"config": asdict(cfg), "d_in": d_in, "points_per_pass": points_per_pass, "curves": curves}


def reaches(points: list[dict[str, Any]], fvu: float) -> int | None:
    """The index from which a curve's held-out FVU stays below ``fvu``, if it gets there."""
    below = [point["fvu"] < fvu for point in points]
    return next((i for i in range(len(below)) if all(below[i:])), None)


def training_flops_per_token(curves: dict[str, Any]) -> dict[str, int]:
    """Each contender's training FLOPs per token, by name, in the setting the curves ran in."""
    cfg = QualityConfig(**curves["config"])
    return {contender.name: contender.flops.training_step for contender in contenders(cfg, curves["d_in"])}


def long_crossings(result: dict[str, Any], baselines: dict[str, Any]) -> list[dict[str, Any]]:
    """For each long routed curve and each baseline curve: the training FLOPs at which the routed curve gets below the
    baseline's final FVU for good, against the FLOPs the baseline spent to get there."""
    flops = training_flops_per_token(baselines)
    found = []
    for name, curve in result["curves"].items():
        for baseline_name in LONG_CURVE_BASELINES:
            baseline = baselines["curves"][baseline_name]
            final = baseline["points"][-1]
            index = reaches(curve["points"], final["fvu"])
            tokens = curve["points"][index]["tokens"] if index is not None else None
            found.append(
                {
                    "sae": name,
                    "baseline": baseline_name,
                    "baseline_final_fvu": final["fvu"],
                    "baseline_training_flops": final["tokens"] * flops[baseline_name],
                    "tokens": tokens,
                    "training_flops": tokens * flops[name] if tokens is not None else None,
                    "final_fvu": curve["points"][-1]["fvu"],
                }
            )
    return found


def long_curves_report(result: dict[str, Any], baselines: dict[str, Any], stem: str) -> None:
    """JSON, a Markdown table (FVU and dead latents at the end of every pass, and the crossings) and a plot of held-out
    FVU against training FLOPs with the baselines' curves."""
    from matplotlib.figure import Figure

    flops = training_flops_per_token(baselines)
    result["crossings"] = long_crossings(result, baselines)
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    colours = {"topk": "tab:gray", "switch": "tab:orange", "scale": "tab:blue"}
    drawn = [(name, curve, result["config"]["epochs"], "-") for name, curve in result["curves"].items()]
    drawn += [
        (name, baselines["curves"][name], baselines["config"]["epochs"], style)
        for name, style in zip(LONG_CURVE_BASELINES, ("--", ":"), strict=True)
    ]
    for name, curve, passes, style in drawn:
        points = curve["points"][1:]  # from the first step on: zero tokens has no place on a log axis
        x = [point["tokens"] * flops[name] / 1e12 for point in points]
        fvu = [point["fvu"] for point in points]
        axes.plot(x, fvu, style, color=colours[curve["family"]], label=f"{name}, {passes} passes")
    axes.set(xlabel="training FLOPs (TFLOP)", ylabel="held-out FVU", xscale="log", yscale="log")
    axes.legend(fontsize=8)
    plot = result_file(f"{stem}.png")
    figure.savefig(plot, dpi=120)
    result["plots"] = [str(plot.relative_to(RESULTS.parent.parent))]

    passes = result["config"]["epochs"]
    per_pass = result["points_per_pass"]
    lines = [
        "# Longer training (CPU)",
        "",
        f"Held-out FVU / latents dead on held-out text at the end of each pass over {result['config']['train_tokens']} "
        f"training tokens, {passes} passes, one run per SAE (lr schedule of the whole run).",
        "",
        "| SAE | " + " | ".join(f"pass {i + 1}" for i in range(passes)) + " | train s |",
        "|---|" + "---:|" * passes + "---:|",
    ]
    for name, curve in result["curves"].items():
        ends = curve["points"][per_pass::per_pass]
        cells = " | ".join(f"{p['fvu']:.4f} / {p['dead_latents']}" for p in ends)
        lines.append(f"| {name} | {cells} | {curve['train_seconds']:.0f} |")
    lines += [
        "",
        f"Against the TopK curves of `--curves` ({baselines['config']['epochs']} passes over the same tokens): the "
        "training FLOPs (3 x forward FLOPs per token x tokens) at which each curve gets below the baseline's final FVU "
        "and stays there.",
        "",
        "| SAE | baseline | baseline final FVU | baseline TFLOP | reached after tokens | TFLOP | FLOPs ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["crossings"]:
        if row["tokens"] is None:
            reached = f"not within {passes} passes (final FVU {row['final_fvu']:.4f}) | | "
        else:
            ratio = row["baseline_training_flops"] / row["training_flops"]
            reached = f"{row['tokens']:,} | {row['training_flops'] / 1e12:.2f} | {ratio:.1f}x fewer"
        lines.append(
            f"| {row['sae']} | {row['baseline']} | {row['baseline_final_fvu']:.4f} "
            f"| {row['baseline_training_flops'] / 1e12:.2f} | {reached} |"
        )
    table = "\n".join(lines) + "\n"
    write_results(stem, result, table)
    print(table, end="")


def crossing(curves: dict[str, Any]) -> dict[str, Any]:
    """Where Scale's held-out FVU first drops below FLOPs-matched TopK's and stays there, if it does."""
    scale, topk = (curves[name]["points"] for name in CURVE_NAMES[0::2])
    below = [point["fvu"] < other["fvu"] for point, other in zip(scale, topk, strict=True)]
    first = next((i for i in range(len(below)) if all(below[i:])), None)
    return {
        "tokens": scale[first]["tokens"] if first is not None else None,
        "final_scale_fvu": scale[-1]["fvu"],
        "final_topk_fvu": topk[-1]["fvu"],
    }


def curves_report(result: dict[str, Any], stem: str) -> None:
    """JSON, a Markdown table (FVU and dead latents at each pass) and the learning-curve plot."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    fvu_axes, dead_axes = figure.subplots(1, 2)
    colours = {"topk": "tab:gray", "switch": "tab:orange", "scale": "tab:blue"}
    for name, curve in result["curves"].items():
        tokens = [point["tokens"] / 1e6 for point in curve["points"]]
        style = "--" if "width-matched" in name else "-"
        fvu_axes.plot(tokens, [p["fvu"] for p in curve["points"]], style, color=colours[curve["family"]], label=name)
        dead = [p["dead_latents"] / curve["d_sae"] for p in curve["points"]]
        dead_axes.plot(tokens, dead, style, color=colours[curve["family"]], label=name)
    passes = result["config"]["train_tokens"] / 1e6
    for axes in (fvu_axes, dead_axes):
        for line in range(1, result["config"]["epochs"]):
            axes.axvline(line * passes, color="lightgray", linewidth=0.6)
    fvu_axes.set(xlabel="training tokens (millions; grey lines: passes)", ylabel="held-out FVU", yscale="log")
    dead_axes.set(xlabel="training tokens (millions)", ylabel="fraction of latents dead on held-out text")
    fvu_axes.legend(fontsize=7)
    crossing_tokens = result["crossing"]["tokens"]
    if crossing_tokens is not None:
        fvu_axes.axvline(crossing_tokens / 1e6, color="tab:blue", linestyle=":", linewidth=0.8)
    plot = result_file(f"{stem}.png")
    figure.savefig(plot, dpi=120)
    result["plots"] = [str(plot.relative_to(RESULTS.parent.parent))]

    per_pass = CURVE_POINTS_PER_PASS
    header = " | ".join(f"pass {i + 1}" for i in range(result["config"]["epochs"]))
    lines = [
        "# Learning curves (CPU)",
        "",
        f"Held-out FVU / latents dead on held-out text at the end of each pass over {result['config']['train_tokens']} "
        "training tokens; one run per SAE, evaluated along the way (lr schedule of the whole run).",
        "",
        f"| SAE | width | {header} | train s |",
        "|---|---:|" + "---:|" * result["config"]["epochs"] + "---:|",
    ]
    for name, curve in result["curves"].items():
        ends = curve["points"][per_pass::per_pass]
        cells = " | ".join(f"{p['fvu']:.4f} / {p['dead_latents']}" for p in ends)
        lines.append(f"| {name} | {curve['d_sae']} | {cells} | {curve['train_seconds']:.0f} |")
    found = result["crossing"]
    lines += [
        "",
        f"Scale 32/e=2 against FLOPs-matched TopK: final FVU {found['final_scale_fvu']:.4f} against "
        f"{found['final_topk_fvu']:.4f}; "
        + (
            f"below it from {found['tokens']:,} training tokens on."
            if found["tokens"] is not None
            else "it does not get below it and stay there within this budget."
        ),
    ]
    table = "\n".join(lines) + "\n"
    write_results(stem, result, table)
    print(table, end="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_true", help="half the width, 18 %% of the tokens, one seed")
    budget.add_argument("--curves", action="store_true", help="learning curves over 4 passes")
    budget.add_argument(
        "--long-curves", action="store_true", help="Scale 32/e=2 and Switch 16 over 12 passes, against --curves' TopK"
    )
    parser.add_argument("--layers", action="store_true", help="the headline SAEs on layers 6 and 18, one seed")
    parser.add_argument(
        "--paper-width", action="store_true", help="24,576 latents, Scale 64 with e up to 16, Gated; one seed"
    )
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, help="the headline SAEs with each optimizer")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.paper_width:
        quick = replace(
            PAPER_WIDTH, train_tokens=QUALITY_QUICK.train_tokens, heldout_tokens=QUALITY_QUICK.heldout_tokens
        )
        cfg = replace(quick, ce_batches=1) if args.quick else PAPER_WIDTH
        result = run(cfg, activation_cache(cfg))
        result["wall_seconds"] = time.perf_counter() - started
        write_reports(result, "quality-cpu-paper-width" + ("-quick" if args.quick else ""))
        return
    if args.layers:
        result = run_layers(replace(QUALITY_QUICK if args.quick else QUALITY_FULL, seeds=(0,)))
        result["wall_seconds"] = time.perf_counter() - started
        layers_report(result, "quality-cpu-layers" + ("-quick" if args.quick else ""))
        return
    if args.optimizers:
        # Two seeds at either budget: the comparison is between optimizers on the same SAE.
        cfg = replace(QUALITY_QUICK, seeds=(0, 1)) if args.quick else QUALITY_FULL
        result = run_optimizers(cfg, activation_cache(cfg), args.optimizers)
        result["wall_seconds"] = time.perf_counter() - started
        optimizers_report(result, "quality-cpu-optimizers" + ("-quick" if args.quick else ""))
        return
    if args.curves:
        result = run_curves(CURVES, activation_cache(CURVES))
        result["crossing"] = crossing(result["curves"])
        result["wall_seconds"] = time.perf_counter() - started
        curves_report(result, "quality-cpu-curves")
        return
    if args.long_curves:
        baselines = json.loads((RESULTS / "quality-cpu-curves.json").read_text())
        result = run_curves(LONG_CURVES, activation_cache(LONG_CURVES), LONG_CURVE_NAMES, LONG_CURVE_POINTS_PER_PASS)
        result["wall_seconds"] = time.perf_counter() - started
        long_curves_report(result, baselines, "quality-cpu-curves-long")
        return
    cfg = QUALITY_QUICK if args.quick else QUALITY_FULL
    result = run(cfg, activation_cache(cfg))
    result["wall_seconds"] = time.perf_counter() - started
    write_reports(result, "quality-cpu-quick" if args.quick else "quality-cpu")


def write_reports(result: dict[str, Any], stem: str) -> None:
    """The JSON, the Markdown table (with the claims when every SAE ran) and both plots, under ``RESULTS``."""
    summary = mean_over_seeds(result["rows"])
    result["summary"] = summary
    result["plots"] = [str(path.relative_to(RESULTS.parent.parent)) for path in plots(summary, stem)]
    table = markdown(result, summary)
    write_results(stem, result, table)
    print(table)
    print(f"wall time {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
