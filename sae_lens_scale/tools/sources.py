"""Where activations come from: a language model and token datasets, bundled offline or from the Hub by name.

Shared by ``sae-lens-scale demo`` and ``sae-lens-scale analyze`` so both read a model, a text and a hook the same way.
"""

from typing import Any

import torch
from datasets import Dataset
from sae_lens import HookedSAETransformer
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
from tqdm import tqdm
from transformer_lens import HookedTransformer

from sae_lens_scale.tools.offline import (
    CORPORA,
    SMOLLM2_MODEL_NAME,
    TokenSplits,
    build_token_dataset,
    load_corpus,
    load_smollm2_hooked,
)

BUNDLED_MODEL = "smollm2-135m"
HUB_TEXT_DOCUMENTS = 20_000  # documents streamed from a Hub dataset: plenty for the token budgets used here


class HubUnavailable(RuntimeError):
    """A non-bundled model or dataset was asked for and the Hugging Face Hub cannot be reached."""


def load_model(name: str) -> tuple[HookedTransformer, Any]:
    """The bundled SmolLM2 offline, else a TransformerLens model by name (which needs the Hugging Face Hub)."""
    if name == BUNDLED_MODEL:
        return load_smollm2_hooked()
    try:
        model = HookedSAETransformer.from_pretrained_no_processing(name)
    except OSError as error:
        raise HubUnavailable(
            f"--model {name} downloads from the Hugging Face Hub, which this machine cannot reach ({error}). "
            f"Use --model {BUNDLED_MODEL} (the bundled {SMOLLM2_MODEL_NAME})."
        ) from error
    return model, model.tokenizer


def load_texts(dataset: str) -> list[str]:
    """A bundled corpus by name, else the ``text`` column of a Hugging Face dataset's train split."""
    if dataset in CORPORA:
        return load_corpus(dataset)
    from datasets import load_dataset

    try:
        rows = load_dataset(dataset, split="train", streaming=True)
        return [row["text"] for row in rows.take(HUB_TEXT_DOCUMENTS)]
    except (OSError, ConnectionError) as error:
        raise HubUnavailable(
            f"--dataset {dataset} downloads from the Hugging Face Hub, which this machine cannot reach ({error}). "
            f"Use one of the bundled corpora: {', '.join(CORPORA)}."
        ) from error


def token_splits(
    tokenizer: Any, dataset: str, context_size: int, heldout_fraction: float, seed: int, max_tokens: int
) -> TokenSplits:
    """Train and held-out token rows, split by document before tokenising so no document is in both."""
    return build_token_dataset(
        tokenizer, load_texts(dataset), context_size, heldout_fraction, seed=seed, max_tokens=max_tokens
    )


@torch.no_grad()
def hook_activations(
    model: HookedTransformer, rows: Dataset, hook: str, rows_per_batch: int = 32, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``[n_rows * context, d]`` activations at ``hook``, running the model only up to the hooked block.

    Rows go through the model ``rows_per_batch`` at a time (bounded memory, a progress bar for long harvests), and
    each batch is cast to ``dtype`` (e.g. float16 for a disk cache) before the next one runs.
    """
    stop_at_layer = extract_stop_at_layer_from_tlens_hook_name(hook)
    batches = []
    for start in tqdm(range(0, len(rows), rows_per_batch), desc=f"activations at {hook}", leave=False):
        tokens = torch.as_tensor(rows[start : start + rows_per_batch]["input_ids"])
        _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=stop_at_layer)
        batches.append(cache[hook].reshape(-1, cache[hook].shape[-1]).to(dtype or cache[hook].dtype))
    return torch.cat(batches)
