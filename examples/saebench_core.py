"""SAEBench's core eval (CE and KL preservation, explained variance, L0, feature density) of a saved Scale or Switch
SAE, on held-out Shakespeare through the bundled SmolLM2, offline.

SAEBench's by-name entry points load models through TransformerLens's list of official names, which SmolLM2 is not,
so this calls its core eval with the model object, as SAEBench allows. Runs in ``.venv-interp`` (scripts/install.sh):

    .venv-interp/bin/python examples/saebench_core.py --sae sae-lens-scale-demo/sae
"""

import argparse
import json
from pathlib import Path

import torch
from sae_bench.evals.core.eval_config import CoreEvalConfig
from sae_bench.evals.core.main import run_evals
from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
from sae_lens import SAE, ActivationsStore

import sae_lens_scale  # noqa: F401  registers the routed architectures, so load_from_disk opens them
from sae_lens_scale.tools.offline import load_smollm2_hooked
from sae_lens_scale.tools.sources import token_splits

CONTEXT = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", type=Path, default=Path("sae-lens-scale-demo/sae"), help="a saved SAE folder")
    parser.add_argument("--batches", type=int, default=8, help="batches of 8 held-out rows of 128 tokens")
    parser.add_argument("--output", type=Path, default=Path("saebench_core.json"))
    args = parser.parse_args()

    formatted = load_and_format_sae("sae-lens-scale", SAE.load_from_disk(args.sae), "cpu")
    assert formatted is not None
    sae = formatted[1]
    model, tokenizer = load_smollm2_hooked()
    # The demo's own held-out plays (same split), so no row was seen in training.
    heldout = token_splits(tokenizer, "shakespeare", CONTEXT, 0.1, seed=0, max_tokens=2 * args.batches * 8 * CONTEXT)
    store = ActivationsStore.from_sae(
        model, sae, heldout.heldout, context_size=CONTEXT, streaming=False, store_batch_size_prompts=8,
        n_batches_in_buffer=4, sequence_separator_token=None,
    )  # fmt: skip
    eval_cfg = CoreEvalConfig(
        batch_size_prompts=8,
        n_eval_reconstruction_batches=args.batches,
        n_eval_sparsity_variance_batches=args.batches,
        context_size=CONTEXT,
        compute_kl=True,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
    )
    with torch.no_grad():
        metrics, feature_metrics = run_evals(sae, store, model, eval_cfg)
    density = torch.tensor(feature_metrics["feature_density"])
    metrics["frac_alive"] = density.gt(0).float().mean().item()
    args.output.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
