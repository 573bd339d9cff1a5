"""The Scale SAE paper's setup through SAELens's unchanged runner: GPT-2 small, layer 8 residual stream, OpenWebText,
d_sae = 24576 split into 64 experts, 2 active experts per token, k = 32.

Needs the Hugging Face Hub (GPT-2 weights and OpenWebText download at run time). Without it, the config is still
built and validated, and the run stops at the first download with the Hub's own error.

    python examples/train_gpt2_scale.py --training-tokens 819200000 --output runs/gpt2-scale
    torchrun --nproc-per-node 8 examples/train_gpt2_scale.py ...   # data parallel: 8 ranks of 4096 tokens a step
"""

import argparse
import os

from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

from sae_lens_scale import ScaleTrainingSAEConfig
from sae_lens_scale.parallel import DistributedSAETrainingRunner


def paper_config(
    training_tokens: int, output: str, device: str, log_to_wandb: bool, world_size: int = 1
) -> LanguageModelSAERunnerConfig:
    """The paper's run; with ``world_size`` data-parallel ranks each takes 4096 tokens a step, so the run has
    ``world_size`` times fewer steps and the learning-rate schedule is counted in them."""
    batch_tokens = 4096
    n_steps = training_tokens // (batch_tokens * world_size)
    return LanguageModelSAERunnerConfig(
        sae=ScaleTrainingSAEConfig(
            d_in=768,
            d_sae=24576,
            n_experts=64,
            n_active_experts=2,
            k=32,
            feature_scaling="mean",
            normalize_activations="expected_average_only_in",
        ),
        model_name="gpt2",
        hook_name="blocks.8.hook_resid_post",
        dataset_path="Skylion007/openwebtext",
        is_dataset_tokenized=False,
        streaming=True,
        context_size=128,
        training_tokens=training_tokens,
        train_batch_size_tokens=batch_tokens,
        lr=3e-4,
        lr_warm_up_steps=1000,
        lr_decay_steps=n_steps // 5,
        device=device,
        checkpoint_path=f"{output}/checkpoints",
        output_path=f"{output}/final",
        logger=LoggingConfig(log_to_wandb=log_to_wandb, wandb_project="sae-lens-scale"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training-tokens", type=int, default=819_200_000)
    parser.add_argument("--output", default="runs/gpt2-scale")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    args = parser.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it
    cfg = paper_config(args.training_tokens, args.output, args.device, args.wandb, world_size)
    print(
        f"Config built: {cfg.sae.architecture()} d_sae={cfg.sae.d_sae} n_experts={cfg.sae.n_experts} "
        f"e={cfg.sae.n_active_experts} k={cfg.sae.k} on {cfg.model_name} {cfg.hook_name}"
    )
    if world_size > 1:  # started by torchrun: one data-parallel rank
        DistributedSAETrainingRunner(cfg).run()
    else:
        LanguageModelSAETrainingRunner(cfg).run()


if __name__ == "__main__":
    main()
