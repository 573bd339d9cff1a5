"""Registration with SAELens, and what ``import sae_lens_scale`` costs."""

import importlib.metadata
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

import sae_lens_scale
from sae_lens_scale import (
    ArchitectureConflictError,
    ScaleSAE,
    ScaleSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)

PACKAGE = Path(sae_lens_scale.__file__).parent


def test_registration_is_idempotent_and_inference_first() -> None:
    assert SAE_CLASS_REGISTRY["scale"] == (ScaleSAE, ScaleSAEConfig)
    assert SAE_TRAINING_CLASS_REGISTRY["switch"] == (SwitchTrainingSAE, SwitchTrainingSAEConfig)
    before = (dict(SAE_CLASS_REGISTRY), dict(SAE_TRAINING_CLASS_REGISTRY))
    sae_lens_scale.register()
    sae_lens_scale.register()
    assert before == (SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY)


@pytest.fixture
def foreign_scale() -> Iterator[None]:
    """Another package's class under the name "scale", restored afterwards."""
    ours = SAE_CLASS_REGISTRY["scale"]
    SAE_CLASS_REGISTRY["scale"] = (TopKSAE, TopKSAEConfig)
    yield
    SAE_CLASS_REGISTRY["scale"] = ours


def test_registration_refuses_a_name_another_package_holds(foreign_scale: None) -> None:
    with pytest.raises(
        ArchitectureConflictError,
        match=r"architecture 'scale' registered as sae_lens\.saes\.topk_sae\.TopKSAE .*cannot register "
        r"sae_lens_scale\.scale_sae\.ScaleSAE",
    ):
        sae_lens_scale.register()
    assert SAE_CLASS_REGISTRY["scale"] == (TopKSAE, TopKSAEConfig)  # the other package's class is left in place


def test_import_loads_nothing_that_sae_lens_does_not_already_load() -> None:
    """Checked in a fresh interpreter: the plugin must not pull plotting, GGUF or the tools' packages."""
    script = (
        "import json, sys\n"
        "import sae_lens\n"
        "before = set(sys.modules)\n"
        "import sae_lens_scale\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in set(sys.modules) - before})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == ["sae_lens_scale"]


def test_the_plugin_depends_only_on_what_it_imports() -> None:
    """``pip install sae-lens-scale`` pulls no plotting, GGUF or tool packages; those are the ``demo`` extra.

    Read from the installed distribution's metadata, which is what pip resolves.
    """
    requirements = importlib.metadata.requires("sae-lens-scale") or []
    core = {re.split(r"[<>=\[; ]", requirement)[0] for requirement in requirements if "extra ==" not in requirement}
    assert core == {
        "sae-lens",
        "datasets",
        "torch",
        "transformer-lens",
        "safetensors",
        "huggingface-hub",
        "typing-extensions",
    }
    demo = {re.split(r"[<>=\[; ]", requirement)[0] for requirement in requirements if 'extra == "demo"' in requirement}
    assert {"gguf", "matplotlib", "transformers", "simple-parsing"} <= demo


def test_the_core_does_not_import_its_tools() -> None:
    """Not even the modules ``import sae_lens_scale`` leaves out (``hub``, ``metrics``, ``flops``)."""
    tools_import = re.compile(r"^\s*(from|import) sae_lens_scale\.tools", re.MULTILINE)
    core = sorted(PACKAGE.glob("*.py"))
    assert len(core) >= 8 and not [path.name for path in core if tools_import.search(path.read_text())]


def test_the_engine_imports_only_torch() -> None:
    """Loaded from its file in a fresh interpreter after torch: no module outside torch and the standard library."""
    script = (
        "import importlib.util, json, sys\n"
        "import torch\n"
        "before = set(sys.modules)\n"
        f"spec = importlib.util.spec_from_file_location('engine', {str(PACKAGE / 'routing.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in set(sys.modules) - before})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert not {name for name in loaded if name != "torch" and name not in sys.stdlib_module_names}, loaded


def test_the_single_device_sae_knows_nothing_of_the_parallel_package() -> None:
    """Distribution wraps the SAE: no module outside ``parallel/`` imports it, names it, or speaks of ranks."""
    mention = re.compile(r"\bparallel\b|\brank|replica", re.IGNORECASE)
    core = sorted(PACKAGE.glob("*.py"))
    assert len(core) >= 9
    assert not [path.name for path in core if mention.search(path.read_text())]


def test_no_module_reads_stack_frames() -> None:
    frame_access = re.compile(r"currentframe|f_locals|_getframe|f_back")
    assert not [str(path) for path in PACKAGE.rglob("*.py") if frame_access.search(path.read_text())]
