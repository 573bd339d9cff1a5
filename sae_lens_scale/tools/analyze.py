"""``sae-lens-scale analyze``: the papers' analysis of a saved SAE, as JSON, plots and a table.

Works on any SAELens SAE folder or Hub release; the expert metrics appear when the SAE has experts, omega when the
folder is a Scale training checkpoint (an exported Scale SAE has omega folded into W_enc).
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from simple_parsing import field

from sae_lens_scale import hub, metrics
from sae_lens_scale.tools import plots
from sae_lens_scale.tools.sources import BUNDLED_MODEL, hook_activations, load_model, token_splits
from sae_lens_scale.validation import fail, require_int


@dataclass
class AnalyzeConfig:
    """What to analyse and on which activations.

    ``model`` and ``hook`` default to the ones recorded in the SAE's metadata (the bundled model when none is).
    Activations come from the held-out split of ``dataset``, so an SAE trained by the demo is never analysed on its
    own training text.
    """

    path: str = field(positional=True)
    """SAE folder, or a Hub repo id together with --sae_id"""
    sae_id: str | None = None
    """SAE id inside a Hub repo"""
    model: str | None = None
    """TransformerLens model name (default: the SAE's own model; smollm2-135m is bundled and offline)"""
    hook: str | None = None
    """hook point (default: the SAE's own hook)"""
    dataset: str = "shakespeare"
    """a bundled corpus (shakespeare, python-docs) or a Hugging Face dataset path; its held-out split is used"""
    tokens: int = 16_384
    """held-out tokens to encode"""
    context_size: int = 128
    """tokens per dataset row"""
    seed: int = 0
    """seed of the document split"""
    output: str = "sae-lens-scale-analysis"
    """folder for analysis.json and plots"""

    def __post_init__(self) -> None:
        require_int(self, "tokens", minimum=self.context_size)
        require_int(self, "context_size", minimum=2)


def load_sae(cfg: AnalyzeConfig) -> SAE[Any]:
    """A local SAELens folder (inference export or training checkpoint), else a Hub repo with ``sae_id``."""
    if Path(cfg.path).is_dir():
        return hub.load_sae(cfg.path)
    if cfg.sae_id is None:
        fail(cfg, "path", "is not a folder; to load from the Hub, pass the repo id as the path and --sae_id ID")
    return hub.load_sae(cfg.path, cfg.sae_id)


def heldout_activations(cfg: AnalyzeConfig, hook: str, model_name: str) -> torch.Tensor:
    model, tokenizer = load_model(model_name)
    splits = token_splits(tokenizer, cfg.dataset, cfg.context_size, 0.1, cfg.seed, max_tokens=cfg.tokens)
    rows = splits.heldout.select(range(min(len(splits.heldout), cfg.tokens // cfg.context_size)))
    return hook_activations(model, rows, hook)


def run_analysis(cfg: AnalyzeConfig) -> dict[str, Any]:
    sae = load_sae(cfg)
    hook = cfg.hook or sae.cfg.metadata.hook_name
    if hook is None:
        fail(cfg, "hook", "is needed: the SAE's metadata names no hook_name; pass --hook")
    model_name = cfg.model or sae.cfg.metadata.model_name or BUNDLED_MODEL
    activations = heldout_activations(cfg, hook, model_name)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    name = sae.cfg.architecture()

    redundancy = metrics.feature_redundancy(sae)
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "architecture": name,
        "d_sae": sae.cfg.d_sae,
        "model": model_name,
        "hook": hook,
        "tokens": activations.shape[0],
        "redundancy": redundancy.to_dict(),
        "activation_similarity": metrics.activation_similarity(sae, activations).to_dict(),
        "plots": [str(plots.plot_max_cosine_histogram({name: redundancy}, output / "max_cosine.png"))],
    }
    if hasattr(sae.cfg, "n_experts"):
        experts = metrics.expert_redundancy(sae)
        usage = metrics.expert_usage(sae, activations)
        result["n_experts"] = sae.cfg.n_experts
        result["expert_redundancy"] = experts.to_dict()
        result["expert_usage"] = usage.to_dict()
        result["plots"] += [
            str(plots.plot_expert_usage_cdf({name: usage}, output / "expert_usage.png")),
            str(plots.plot_intra_inter({name: experts}, output / "intra_inter.png")),
        ]
    if getattr(sae, "omega", None) is not None:
        result["omega"] = metrics.omega_per_expert(sae).tolist()
    (output / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def analysis_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    redundancy = result["redundancy"]
    fractions = ", ".join(f"> {t}: {f:.4f}" for t, f in redundancy["fraction_above"].items())
    rows = [
        (
            "SAE",
            f"{result['architecture']} d_sae={result['d_sae']}"
            + (f", {result['n_experts']} experts" if "n_experts" in result else ""),
        ),
        ("activations", f"{result['tokens']} held-out tokens of {result['model']} at {result['hook']}"),
        ("redundancy (max cosine)", f"{fractions}; mean {redundancy['mean_max_cosine']:.3f}"),
        ("activation similarity", f"{result['activation_similarity']['similarity']:.4f}"),
    ]
    if "expert_usage" in result:
        experts, usage = result["expert_redundancy"], result["expert_usage"]
        rows += [
            (
                "intra / inter mean max cosine",
                f"{experts['intra_mean_max_cosine']:.3f} / {experts['inter_mean_max_cosine']:.3f}",
            ),
            ("expert usage entropy / dead", f"{usage['normalized_entropy']:.3f} / {usage['dead_fraction']:.3f}"),
        ]
    if "omega" in result:
        omega = torch.tensor(result["omega"])
        rows.append(("omega min / mean / max", f"{omega.min():.3f} / {omega.mean():.3f} / {omega.max():.3f}"))
    rows.append(("plots", ", ".join(result["plots"])))
    return rows
