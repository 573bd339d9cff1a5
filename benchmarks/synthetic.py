"""Ground truth: do routed SAEs need features that co-occur?

A routed SAE encodes a token with the latents of the experts its router picks, so it can only represent the token's
features if those experts hold them. With independent features a token's features are spread over all experts; with
co-occurrence structure they can be grouped into experts. So TopK, Switch and Scale, at equal width, train here on
SAELens's synthetic activations (``SyntheticModel``), whose true features are known:

- independent features;
- a hierarchy: trees of a parent and its children, where a child fires only with its parent; strength = the
  fraction of the features that sit in a tree;
- low-rank correlation: strength = rank x scale^2, the share of each feature's latent variance that comes from the
  shared factors (SAELens's generator caps each feature's share below 1).

Each SAE is scored with SAELens's ``eval_sae_on_synthetic_data``: MCC (the mean |cosine| of the best one-to-one
matching of decoder rows to true features), explained variance and the latents that never fire, on fresh samples.
The training activations of a setting are drawn once and every SAE sees them in the same order, with the quality
benchmark's schedule and start.

    python benchmarks/synthetic.py --quick   # 256 features, one strength per structure, one seed
    python benchmarks/synthetic.py           # 1,024 features, three strengths per structure, two seeds
"""

import argparse
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, NamedTuple

import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.synthetic import (
    HierarchyConfig,
    LowRankCorrelationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
    eval_sae_on_synthetic_data,
)
from sae_lens.training.activation_scaler import ActivationScaler
from tqdm import tqdm

from sae_lens_scale import ScaleTrainingSAEConfig, SwitchTrainingSAEConfig

from common import activation_scale, batches, result_file, schedule, train_sae, write_results

Structure = Literal["independent", "hierarchy", "correlation"]


@dataclass(frozen=True)
class SyntheticConfig:
    """The ground truth's size, the SAEs trained on it, and the strengths swept."""

    num_features: int = 1024
    hidden_dim: int = 64
    k: int = 8
    n_experts: int = 8
    train_samples: int = 524_288
    eval_samples: int = 32_768
    batch: int = 1024
    lr: float = 3e-3  # at the quality benchmark's 1e-3, TopK's MCC is still far from its plateau within the budget
    seeds: tuple[int, ...] = (0, 1)
    hierarchy_strengths: tuple[float, ...] = (0.25, 0.5, 1.0)
    correlation_strengths: tuple[float, ...] = (0.1, 0.3, 0.6)
    branching: int = 15  # children per parent: a tree of 16 features
    correlation_rank: int = 16
    # Zipfian firing probabilities from 0.4 down to 0.005: about 11 true features per sample at 1,024 features.
    max_firing_probability: float = 0.4
    min_firing_probability: float = 0.005
    firing_exponent: float = 0.7


SYNTHETIC_FULL = SyntheticConfig()
SYNTHETIC_QUICK = replace(
    SYNTHETIC_FULL,
    num_features=256,
    hidden_dim=32,
    k=4,
    n_experts=4,
    train_samples=262_144,
    eval_samples=8192,
    seeds=(0,),
    hierarchy_strengths=(1.0,),
    correlation_strengths=(0.6,),
)


class Setting(NamedTuple):
    structure: Structure
    strength: float  # 0 for independent features


def settings(cfg: SyntheticConfig) -> list[Setting]:
    return [
        Setting("independent", 0.0),
        *(Setting("hierarchy", strength) for strength in cfg.hierarchy_strengths),
        *(Setting("correlation", strength) for strength in cfg.correlation_strengths),
    ]


def synthetic_model(cfg: SyntheticConfig, setting: Setting, seed: int) -> SyntheticModel:
    """SAELens's generator for one setting: the same features and firing probabilities, plus the structure."""
    structure: dict[str, Any] = {}
    if setting.structure == "hierarchy":
        roots = round(setting.strength * cfg.num_features / (cfg.branching + 1))
        structure["hierarchy"] = HierarchyConfig(
            total_root_nodes=roots, branching_factor=cfg.branching, max_depth=1, compensate_probabilities=True
        )
    elif setting.structure == "correlation":
        scale = (setting.strength / cfg.correlation_rank) ** 0.5
        structure["correlation"] = LowRankCorrelationConfig(rank=cfg.correlation_rank, correlation_scale=scale)
    firing = ZipfianFiringProbabilityConfig(
        exponent=cfg.firing_exponent, max_prob=cfg.max_firing_probability, min_prob=cfg.min_firing_probability
    )
    model_cfg = SyntheticModelConfig(
        num_features=cfg.num_features, hidden_dim=cfg.hidden_dim, firing_probability=firing, seed=seed, **structure
    )
    return SyntheticModel(model_cfg)


def sae_configs(cfg: SyntheticConfig) -> dict[str, TrainingSAEConfig]:
    """TopK, Switch and Scale (e = 2) at the width of the true dictionary."""
    width, k, n = cfg.num_features, cfg.k, cfg.n_experts
    return {
        "TopK": TopKTrainingSAEConfig(d_in=cfg.hidden_dim, d_sae=width, k=k, decoder_init_norm=1.0),
        f"Switch {n}": SwitchTrainingSAEConfig(d_in=cfg.hidden_dim, d_sae=width, n_experts=n, k=k),
        f"Scale {n}/e=2": ScaleTrainingSAEConfig(
            d_in=cfg.hidden_dim, d_sae=width, n_experts=n, n_active_experts=2, k=k
        ),
    }


def make_sae(config: TrainingSAEConfig) -> TrainingSAE[Any]:
    return get_sae_training_class(config.architecture())[0](config)


def sample(model: SyntheticModel, n_samples: int, batch: int = 8192) -> torch.Tensor:
    return torch.cat([model.sample(min(batch, n_samples - start)) for start in range(0, n_samples, batch)])


def evaluate(sae: TrainingSAE[Any], model: SyntheticModel, scale: float, cfg: SyntheticConfig) -> dict[str, Any]:
    """SAELens's synthetic eval on fresh samples, the same ones for every SAE of a setting."""
    torch.manual_seed(12345)
    result = eval_sae_on_synthetic_data(
        sae,
        model.feature_dict,
        model.activation_generator,
        num_samples=cfg.eval_samples,
        batch_size=8192,
        activation_scaler=ActivationScaler(scale),
    )
    return {
        "mcc": result.mcc,
        "explained_variance": result.explained_variance,
        "dead_latents": result.dead_latents,
        "dead_fraction": result.dead_latents / sae.cfg.d_sae,
        "uniqueness": result.uniqueness,
        "sae_l0": result.sae_l0,
        "true_l0": result.true_l0,
    }


def run(cfg: SyntheticConfig) -> dict[str, Any]:
    rows = []
    runs = [(setting, seed) for setting in settings(cfg) for seed in cfg.seeds]
    steps = cfg.train_samples // cfg.batch
    for setting, seed in tqdm(runs, desc="settings x seeds"):
        torch.manual_seed(seed)
        model = synthetic_model(cfg, setting, seed)
        train = sample(model, cfg.train_samples)
        scale = activation_scale(train)
        for name, config in sae_configs(cfg).items():
            torch.manual_seed(seed)
            sae = make_sae(config)
            seconds = train_sae(sae, batches(train, cfg.batch, scale, seed=seed), schedule(steps, cfg.batch, cfg.lr))
            rows.append(
                {
                    "structure": setting.structure,
                    "strength": setting.strength,
                    "seed": seed,
                    "name": name,
                    "family": config.architecture(),
                    "train_seconds": seconds,
                    **evaluate(sae, model, scale, cfg),
                }
            )
    return {"config": asdict(cfg), "rows": rows}


METRICS = ("mcc", "explained_variance", "dead_fraction")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, SAE): the mean over seeds, each metric's max - min spread, and the ratio to TopK's."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["structure"], row["strength"], row["name"]), []).append(row)
    summary = []
    for (structure, strength, name), group in groups.items():
        entry: dict[str, Any] = {"structure": structure, "strength": strength, "name": name, "seeds": len(group)}
        entry["family"] = group[0]["family"]
        for metric in (*METRICS, "sae_l0", "true_l0"):
            values = [row[metric] for row in group]
            entry[metric] = sum(values) / len(values)
            entry[f"{metric}_spread"] = max(values) - min(values)
        summary.append(entry)
    topk = {(row["structure"], row["strength"]): row for row in summary if row["family"] == "topk"}
    for entry in summary:
        reference = topk[entry["structure"], entry["strength"]]
        entry["mcc_vs_topk"] = entry["mcc"] / reference["mcc"]
        entry["explained_variance_vs_topk"] = entry["explained_variance"] / reference["explained_variance"]
    return summary


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# Routed SAEs on ground-truth features (CPU)",
        "",
        f"SAELens `SyntheticModel`: {cfg['num_features']} true features in {cfg['hidden_dim']} dimensions, Zipfian "
        f"firing probabilities ({cfg['max_firing_probability']} to {cfg['min_firing_probability']}, exponent "
        f"{cfg['firing_exponent']}). Every SAE has {cfg['num_features']} latents and k={cfg['k']}, and trains on the "
        f"same {cfg['train_samples']:,} samples of its setting; scored by SAELens `eval_sae_on_synthetic_data` on "
        f"{cfg['eval_samples']:,} fresh samples. Hierarchy strength = fraction of features in trees of "
        f"{cfg['branching'] + 1} (a child fires only with its parent); correlation strength = rank x scale^2 (rank "
        f"{cfg['correlation_rank']}). Seeds {list(cfg['seeds'])} (each seed draws its own features); ± = max - min.",
        "",
        "| structure | strength | SAE | MCC | vs TopK | explained var. | vs TopK | dead | L0 (true) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {row['structure']} | {row['strength']:g} | {row['name']} | {row['mcc']:.3f} ± {row['mcc_spread']:.3f} "
            f"| {row['mcc_vs_topk']:.2f} | {row['explained_variance']:.3f} ± {row['explained_variance_spread']:.3f} "
            f"| {row['explained_variance_vs_topk']:.2f} | {row['dead_fraction']:.1%} "
            f"| {row['sae_l0']:.1f} ({row['true_l0']:.1f}) |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], stem: str) -> str:
    """MCC, explained variance and dead latents against each structure's strength (independent features at 0)."""
    from matplotlib.figure import Figure

    summary = result["summary"]
    names = list(dict.fromkeys(row["name"] for row in summary))
    colours = {"topk": "tab:gray", "switch": "tab:orange", "scale": "tab:blue"}
    figure = Figure(figsize=(10, 9), layout="constrained")
    axes = figure.subplots(len(METRICS), 2, sharey="row", squeeze=False)
    labels = {"mcc": "MCC", "explained_variance": "explained variance", "dead_fraction": "fraction of latents dead"}
    xlabels = {"hierarchy": "fraction of features in trees", "correlation": "rank x scale^2"}
    for column, structure in enumerate(("hierarchy", "correlation")):
        for row_index, metric in enumerate(METRICS):
            ax = axes[row_index][column]
            for name in names:
                points = sorted(
                    (row["strength"], row[metric], row[f"{metric}_spread"])
                    for row in summary
                    if row["name"] == name and row["structure"] in ("independent", structure)
                )
                family = next(row["family"] for row in summary if row["name"] == name)
                ax.errorbar(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    yerr=[p[2] / 2 for p in points],
                    marker="o",
                    capsize=2,
                    color=colours[family],
                    label=name,
                )
            ax.set(xlabel=f"{structure}: {xlabels[structure]}", ylabel=labels[metric])
    axes[0][0].legend(fontsize=8)
    figure.suptitle("Equal width on ground-truth features: independent (0) to strongly co-occurring")
    path = result_file(f"{stem}.png")
    figure.savefig(path, dpi=110)
    return str(path.relative_to(path.parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 features, one strength per structure, one seed")
    args = parser.parse_args()
    cfg = SYNTHETIC_QUICK if args.quick else SYNTHETIC_FULL
    stem = "synthetic-cpu" + ("-quick" if args.quick else "")
    started = time.perf_counter()
    result = run(cfg)
    result["summary"] = summarize(result["rows"])
    result["wall_seconds"] = time.perf_counter() - started
    result["plots"] = [plot(result, stem)]
    table = markdown(result)
    write_results(stem, result, table)
    print(table)
    print(f"wall time {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
