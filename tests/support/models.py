"""The tiny HookedTransformer built from a config and the in-memory token dataset every offline test trains on."""

import torch
from datasets import Dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig

CONTEXT = 16
D_MODEL = 32


def build_tiny_model() -> HookedTransformer:
    """The same model in every process: its initialisation is seeded."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D_MODEL, n_ctx=CONTEXT, d_head=8, n_heads=4, d_vocab=64, act_fn="relu", seed=0
    )
    return HookedTransformer(cfg)


def build_token_dataset(n_rows: int = 400) -> Dataset:
    """Sequences from a small Markov chain, so the model's activations have structure an SAE can learn."""
    generator = torch.Generator().manual_seed(0)
    transitions = torch.softmax(3 * torch.randn(64, 64, generator=generator), dim=-1)
    tokens = torch.empty(n_rows, CONTEXT, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, 64, (n_rows,), generator=generator)
    for position in range(1, CONTEXT):
        tokens[:, position] = torch.multinomial(transitions[tokens[:, position - 1]], 1, generator=generator)[:, 0]
    return Dataset.from_dict({"input_ids": tokens.tolist()})
