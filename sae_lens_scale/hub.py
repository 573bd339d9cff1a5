"""Hugging Face Hub helpers: a model card that says how to load our architectures, and a loader with a clear error.

SAELens's ``upload_saes_to_huggingface`` and ``SAE.from_pretrained`` work unchanged on ``scale`` and ``switch`` SAEs.
Two gaps remain, both because SAELens only knows architectures that were registered in the running process:

- SAELens's default model card says ``SAE.from_pretrained(...)`` and nothing else; a reader who follows it without
  ``import sae_lens_scale`` gets a bare ``KeyError: 'scale'``. :func:`upload_saes_to_huggingface` uploads with SAELens's
  own function and then writes a card that says to ``pip install sae-lens-scale`` and ``import sae_lens_scale``;
  :func:`write_model_card` adds that note to a repo uploaded earlier.
- :func:`load_sae` loads from a local folder or the Hub in one call, and names the missing plugin instead of raising
  a bare ``KeyError`` when a config's architecture is not registered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.utils import EntryNotFoundError
from sae_lens import SAE
from sae_lens import upload_saes_to_huggingface as sae_lens_upload_saes_to_huggingface
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_sae_loaders import get_conversion_loader_name
from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name
from sae_lens.registry import SAE_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAE
from safetensors import SafetensorError, safe_open

from sae_lens_scale.validation import ConfigError, WeightsMismatchError

PACKAGE = "sae-lens-scale"
CARD_TAG = "sae-lens-scale"
CARD_MARKER = "import sae_lens_scale"
README = "README.md"
IMPORT_LINE = f'{CARD_MARKER}  # registers the "scale" and "switch" architectures with SAELens'
SAE_LENS_SNIPPET = "```python\nfrom sae_lens import SAE\n"  # how SAELens's default card starts its loading example


def plugin_note(repo_id: str, with_example: bool = True) -> str:
    """The Markdown section that tells a reader how to load this repo's SAEs (``with_example``: a loading snippet)."""
    lead_in = "Install it next to SAELens and import it before loading" + (":" if with_example else ", as shown above:")
    example = (
        "```python\n"
        f"{IMPORT_LINE}\n"
        "from sae_lens import SAE\n\n"
        f'sae = SAE.from_pretrained("{repo_id}", "<sae_id>")\n'
        "```\n\n"
    )
    return (
        "## Loading needs the `sae-lens-scale` plugin\n\n"
        "These SAEs use the `scale` / `switch` architectures, which SAELens knows only after the plugin is imported. "
        f"{lead_in}\n\n"
        "```bash\n"
        f"pip install {PACKAGE}\n"
        "```\n\n"
        f"{example if with_example else ''}"
        "Without the import, SAELens fails with `KeyError: 'scale'` (or `'switch'`).\n"
    )


def model_card(repo_id: str, sae_ids: Iterable[str]) -> str:
    """A model card for a repo of routed SAEs: SAELens's metadata and SAE list, plus :func:`plugin_note`."""
    listed = "".join(f"- `{sae_id}`\n" for sae_id in sae_ids)
    return (
        "---\n"
        "library_name: saelens\n"
        "tags:\n"
        f"- {CARD_TAG}\n"
        "---\n\n"
        "# SAEs for use with the SAELens library\n\n"
        "This repository contains the following SAEs:\n"
        f"{listed}\n"
        f"{plugin_note(repo_id)}"
    )


def add_plugin_note(card: str, repo_id: str) -> str:
    """``card`` (such as SAELens's default card) made to tell readers about the plugin; unchanged if it already does.

    Adds ``import sae_lens_scale`` to SAELens's loading snippet, appends :func:`plugin_note` (with its own snippet
    only if the card had none to patch) and the ``sae-lens-scale`` tag, and keeps the rest of the card as it was.
    """
    if CARD_MARKER in card:
        return card
    parsed = ModelCard(card, ignore_metadata_errors=True)
    metadata = parsed.data.to_dict()
    tags = list(metadata.get("tags") or [])
    if CARD_TAG not in tags:
        parsed.data = ModelCardData(**{**metadata, "tags": [*tags, CARD_TAG]})
    patched = SAE_LENS_SNIPPET.replace("```python\n", f"```python\n{IMPORT_LINE}\n")
    body = parsed.text.replace(SAE_LENS_SNIPPET, patched)
    parsed.text = body.rstrip("\n") + "\n\n" + plugin_note(repo_id, with_example=patched not in body)
    return str(parsed)


def write_model_card(repo_id: str, sae_ids: Iterable[str], revision: str = "main") -> bool:
    """Make the repo's README.md tell readers to install and import the plugin.

    Writes :func:`model_card` when the repo has no README.md, adds :func:`plugin_note` to one that lacks it (such as
    SAELens's default card), and leaves one that has it alone. Returns whether a commit was made.
    """
    try:
        existing: str | None = Path(hf_hub_download(repo_id, README, revision=revision)).read_text(encoding="utf-8")
    except EntryNotFoundError:
        existing = None
    card = model_card(repo_id, sae_ids) if existing is None else add_plugin_note(existing, repo_id)
    if card == existing:
        return False
    HfApi().upload_file(
        path_or_fileobj=card.encode("utf-8"),
        path_in_repo=README,
        repo_id=repo_id,
        revision=revision,
        commit_message=f"README.md: how to load these SAEs with {PACKAGE}",
    )
    return True


def upload_saes_to_huggingface(
    saes_dict: Mapping[str, SAE[Any] | Path | str],
    hf_repo_id: str,
    hf_revision: str = "main",
    show_progress: bool = True,
) -> None:
    """SAELens's ``upload_saes_to_huggingface`` (unchanged, same arguments), then :func:`write_model_card`.

    Each SAE lands in the folder ``<sae_id>/`` of the repo, so ``SAE.from_pretrained(hf_repo_id, sae_id)`` loads it.
    """
    sae_lens_upload_saes_to_huggingface(
        dict(saes_dict), hf_repo_id, hf_revision=hf_revision, show_progress=show_progress, add_default_readme=False
    )
    write_model_card(hf_repo_id, saes_dict.keys(), revision=hf_revision)


class UnregisteredArchitectureError(LookupError):
    """A saved SAE names an architecture that no imported package registered with SAELens."""


def _require_registered(config_path: Path, where: str) -> None:
    architecture = json.loads(config_path.read_text()).get("architecture", "standard")
    if architecture not in SAE_CLASS_REGISTRY:
        raise UnregisteredArchitectureError(
            f"The SAE at {where} has architecture {architecture!r}, which is not registered with SAELens "
            f"(registered: {', '.join(sorted(SAE_CLASS_REGISTRY))}). Install and import the package that defines "
            f"{architecture!r} (SAELens plugins register their architectures when imported), then load again."
        )


def _holds_omega(weights: Path) -> bool:
    """Whether a weights file is a training checkpoint with Feature Scaling: exports fold omega into W_enc."""
    if not weights.is_file():
        return False  # SAELens's loader names the missing file
    with safe_open(str(weights), framework="pt") as tensors:
        return "omega" in tensors.keys()  # noqa: SIM118 (safe_open has no __contains__)


def load_sae(
    source: str | Path,
    sae_id: str | None = None,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    force_download: bool = False,
) -> SAE[Any]:
    """Load a SAELens SAE from a local folder (``sae_id=None``) or from the Hub (``source`` a release or repo id).

    Equivalent to ``SAE.load_from_disk(source)`` or ``SAE.from_pretrained(source, sae_id)``, with the ``scale`` and
    ``switch`` architectures registered (importing this module imports the plugin). If the saved config names an
    architecture nothing registered, it raises :class:`UnregisteredArchitectureError` naming the architecture and the
    ones SAELens knows, where SAELens would raise a bare ``KeyError``; a truncated local weights file is named too.
    A local training checkpoint with Feature Scaling (it still holds ``omega``) loads as a ``TrainingSAE``. A config
    or weights file that does not fit raises the plugin's error with the folder (or repo and id) in front.
    """
    if sae_id is None:
        _require_registered(Path(source) / SAE_CFG_FILENAME, str(source))
        weights = Path(source) / SAE_WEIGHTS_FILENAME
        try:
            sae_class = TrainingSAE if _holds_omega(weights) else SAE
            return sae_class.load_from_disk(source, device=device, dtype=dtype)
        except SafetensorError as error:  # SAELens lets safetensors' header error through without the path
            raise ValueError(f"{weights} is truncated or corrupt ({error}); re-save or re-download it.") from error
        except (ConfigError, WeightsMismatchError) as error:
            raise type(error)(f"{source}: {error}") from error
    if get_conversion_loader_name(str(source)) == "sae_lens":  # SAELens's own layout; other loaders have no cfg.json
        repo_id, folder = get_repo_id_and_folder_name(str(source), sae_id)
        config = hf_hub_download(repo_id, f"{folder}/{SAE_CFG_FILENAME}", force_download=force_download)
        _require_registered(Path(config), f"{repo_id}, {folder}")
    try:
        return SAE.from_pretrained(
            str(source), sae_id, device=device, dtype=dtype or "float32", force_download=force_download
        )
    except (ConfigError, WeightsMismatchError) as error:
        raise type(error)(f"{source}, sae_id {sae_id}: {error}") from error
