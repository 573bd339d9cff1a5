"""Hub round trip for real: SAELens's unchanged ``upload_saes_to_huggingface`` and ``SAE.from_pretrained`` against a
local Hub server (``tests/support/fake_hub.py``) over a real socket.

``huggingface_hub`` reads ``HF_ENDPOINT`` (and its cache paths) when it is imported, so the client runs in a fresh
process started with the fake hub's environment; nothing in ``huggingface_hub`` is patched. That process first works
WITHOUT ``import sae_lens_scale`` (to pin the ``KeyError: 'scale'`` the README warns about), then imports the plugin,
loads everything back and hands its tensors to this process, which compares them with ``torch.equal``.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest
import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

from sae_lens_scale import (
    ScaleSAE,
    ScaleTrainingSAE,
    SwitchSAE,
)
from sae_lens_scale.hub import (
    UnregisteredArchitectureError,
    add_plugin_note,
    load_sae,
    model_card,
)
from tests.support.builders import scale_training_sae, switch_training_sae
from tests.support.fake_hub import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]
D_IN, D_SAE = 16, 64
HOOK = "blocks.1.hook_resid_pre"
SCALE_ID = f"{HOOK}/scale"
SWITCH_ID = f"{HOOK}/switch"
SAE_IDS = (SCALE_ID, SWITCH_ID)
REPO = "user/routed-saes"
CARD_REPO = "user/routed-saes-with-card"
OBJECT_ID = "switch-from-object"
FOREIGN_REPO = "user/foreign-sae"
LOADERS = ("from_pretrained", "from_pretrained_with_cfg_and_sparsity")

# Runs in a fresh interpreter with the fake hub's environment. It must not import sae_lens_scale before step 2.
WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    spec = json.loads(Path(sys.argv[1]).read_text())
    import huggingface_hub.constants as hub_constants
    import torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE, upload_saes_to_huggingface

    report = {
        "endpoint": hub_constants.ENDPOINT,
        "offline": hub_constants.HF_HUB_OFFLINE,
        "cache": hub_constants.HF_HUB_CACHE,
        "plugin_imported_at_start": "sae_lens_scale" in sys.modules,
    }
    tensors = {}

    def error_of(load):
        try:
            load()
        except Exception as error:
            return {"type": type(error).__name__, "args": [str(arg) for arg in error.args], "repr": repr(error)}
        return None

    # 1. Without the plugin: SAELens's unchanged upload works (it moves files), loading does not.
    report["load_from_disk_without_plugin"] = {
        sae_id: error_of(lambda: SAE.load_from_disk(folder)) for sae_id, folder in spec["folders"].items()
    }
    upload_saes_to_huggingface({sae_id: Path(folder) for sae_id, folder in spec["folders"].items()}, spec["repo"])
    report["from_pretrained_without_plugin"] = {
        sae_id: error_of(lambda: SAE.from_pretrained(spec["repo"], sae_id)) for sae_id in spec["folders"]
    }
    report["plugin_imported_after_step_1"] = "sae_lens_scale" in sys.modules

    # 2. With the plugin: both SAELens loaders, then the model card step.
    import sae_lens_scale
    from sae_lens_scale.hub import load_sae, upload_saes_to_huggingface as upload_with_card, write_model_card

    x = load_file(spec["inputs"])["x"]

    def record(prefix, sae):
        for name, value in sae.state_dict().items():
            tensors[f"{prefix}/state/{name}"] = value
        with torch.no_grad():
            tensors[f"{prefix}/out"] = sae(x)
            tensors[f"{prefix}/acts"] = sae.encode(x)
        report.setdefault("classes", {})[prefix] = type(sae).__name__

    for sae_id in spec["folders"]:
        record(f"from_pretrained/{sae_id}", SAE.from_pretrained(spec["repo"], sae_id))
        sae, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(spec["repo"], sae_id)
        record(f"from_pretrained_with_cfg_and_sparsity/{sae_id}", sae)
        tensors[f"sparsity/{sae_id}"] = sparsity
        report.setdefault("cfg", {})[sae_id] = cfg
    report["card_written"] = write_model_card(spec["repo"], list(spec["folders"]))
    report["card_written_again"] = write_model_card(spec["repo"], list(spec["folders"]))

    # 3. An SAE object (not a folder) through the plugin's upload, which adds the card; back with load_sae.
    switch = SAE.from_pretrained(spec["repo"], spec["switch_id"])
    upload_with_card({spec["object_id"]: switch}, spec["card_repo"], show_progress=False)
    record(f"load_sae/{spec['object_id']}", load_sae(spec["card_repo"], spec["object_id"]))
    upload_saes_to_huggingface({"mystery": Path(spec["foreign"])}, spec["foreign_repo"], show_progress=False)
    report["load_sae_unregistered"] = error_of(lambda: load_sae(spec["foreign_repo"], "mystery"))
    report["from_pretrained_unregistered"] = error_of(lambda: SAE.from_pretrained(spec["foreign_repo"], "mystery"))

    save_file({name: value.detach().contiguous() for name, value in tensors.items()}, spec["tensors_out"])
    Path(spec["report_out"]).write_text(json.dumps(report, default=str))
    """
)


def training_saes() -> dict[str, Any]:
    return {
        SCALE_ID: scale_training_sae(seed=1, k=8, dtype="float32"),
        SWITCH_ID: switch_training_sae(seed=2, n_experts=4, k=8, dtype="float32"),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Exported SAELens folders (cfg.json, sae_weights.safetensors, sparsity.safetensors) and fixed inputs."""
    root = tmp_path_factory.mktemp("saes")
    torch.manual_seed(0)
    folders, sparsities = {}, {}
    for index, (sae_id, sae) in enumerate(training_saes().items()):
        folder = root / sae_id.replace("/", "__")
        sae.save_inference_model(folder)
        sparsities[sae_id] = torch.log10(torch.rand(D_SAE, generator=torch.Generator().manual_seed(10 + index)))
        save_file({"sparsity": sparsities[sae_id]}, folder / "sparsity.safetensors")
        folders[sae_id] = folder
    inputs = root / "inputs.safetensors"
    save_file({"x": torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(3))}, inputs)
    # The same files with an architecture nothing registers, as a third-party plugin's SAE would look.
    foreign = root / "foreign"
    foreign.mkdir()
    cfg = json.loads((folders[SCALE_ID] / "cfg.json").read_text())
    (foreign / "cfg.json").write_text(json.dumps({**cfg, "architecture": "mystery"}))
    (foreign / "sae_weights.safetensors").write_bytes((folders[SCALE_ID] / "sae_weights.safetensors").read_bytes())
    return {"folders": folders, "sparsities": sparsities, "inputs": inputs, "foreign": foreign}


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with FakeHub(tmp_path_factory.mktemp("fake_hub")) as hub:
        yield hub


@pytest.fixture(scope="module")
def round_trip(fake_hub: FakeHub, saved: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run WORKER once against the fake hub; return its report, its tensors and the hub."""
    work = tmp_path_factory.mktemp("client")
    spec = {
        "repo": REPO,
        "card_repo": CARD_REPO,
        "switch_id": SWITCH_ID,
        "object_id": OBJECT_ID,
        "folders": {sae_id: str(folder) for sae_id, folder in saved["folders"].items()},
        "inputs": str(saved["inputs"]),
        "foreign": str(saved["foreign"]),
        "foreign_repo": FOREIGN_REPO,
        "tensors_out": str(work / "tensors.safetensors"),
        "report_out": str(work / "report.json"),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    env = fake_hub.client_env(work / "hf_home", base={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = subprocess.run(
        [sys.executable, "-c", WORKER, str(work / "spec.json")],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {
        "report": json.loads((work / "report.json").read_text()),
        "tensors": load_file(work / "tensors.safetensors"),
        "hub": fake_hub,
        "hf_home": work / "hf_home",
    }


def reference(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    sae = SAE.load_from_disk(folder)
    with torch.no_grad():
        return {
            **{f"state/{name}": value for name, value in sae.state_dict().items()},
            "out": sae(x),
            "acts": sae.encode(x),
        }


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("sae_id", SAE_IDS)
def test_hub_round_trip_gives_identical_weights_and_outputs(
    round_trip: dict[str, Any], saved: dict[str, Any], sae_id: str, loader: str
) -> None:
    x = load_file(saved["inputs"])["x"]
    expected = reference(saved["folders"][sae_id], x)
    got = {key.removeprefix(f"{loader}/{sae_id}/"): value for key, value in round_trip["tensors"].items()}
    assert round_trip["report"]["classes"][f"{loader}/{sae_id}"] == ("ScaleSAE" if sae_id == SCALE_ID else "SwitchSAE")
    assert {"W_enc", "b_enc", "W_dec", "b_dec", "W_router", "b_router"} == {
        key.removeprefix("state/") for key in expected if key.startswith("state/")
    }
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # The inputs really route and sparsify: at most k = 8 active latents per token, most tokens use all 8.
    active = (got["acts"] != 0).sum(-1)
    assert (active <= 8).all() and active.float().mean() > 6
    assert got["out"].abs().sum() > 0


def test_round_trip_returns_the_config_and_the_sparsity(round_trip: dict[str, Any], saved: dict[str, Any]) -> None:
    report = round_trip["report"]
    for sae_id in SAE_IDS:
        assert torch.equal(round_trip["tensors"][f"sparsity/{sae_id}"], saved["sparsities"][sae_id])
        on_disk = json.loads((saved["folders"][sae_id] / "cfg.json").read_text())
        cfg = report["cfg"][sae_id]
        for key in ("architecture", "d_in", "d_sae", "n_experts", "k"):
            assert cfg[key] == on_disk[key], key
    assert report["cfg"][SCALE_ID]["n_active_experts"] == 2
    assert report["cfg"][SCALE_ID]["architecture"] == "scale"
    assert report["cfg"][SWITCH_ID]["architecture"] == "switch"


def test_the_client_went_through_the_socket_to_the_fake_hub(round_trip: dict[str, Any], saved: dict[str, Any]) -> None:
    report, hub = round_trip["report"], round_trip["hub"]
    assert report["endpoint"] == hub.url
    assert hub.url.startswith("http://127.0.0.1:")
    assert report["offline"] is False
    assert Path(report["cache"]) == round_trip["hf_home"] / "hub"
    assert list(hub.unhandled) == []
    routes = {(method, path.split("?")[0]) for method, path, _ in hub.requests}
    for route in [
        ("POST", "/api/repos/create"),
        ("GET", f"/api/models/{REPO}"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/{REPO}.git/info/lfs/objects/batch"),
        ("POST", f"/api/models/{REPO}/commit/main"),
        ("POST", "/api/validate-yaml"),
        ("HEAD", f"/{REPO}/resolve/main/{SCALE_ID}/cfg.json"),
        ("GET", f"/{REPO}/resolve/main/{SCALE_ID}/sae_weights.safetensors"),
        ("GET", f"/{REPO}/resolve/main/{SWITCH_ID}/sparsity.safetensors"),
    ]:
        assert route in routes, route
    assert any(method == "PUT" and path.startswith(f"/lfs-upload/{REPO}/") for method, path in routes)
    # The repo holds SAELens's folder layout, byte for byte; weights went through LFS as on the real Hub.
    files = hub.list_files(REPO)
    for sae_id, folder in saved["folders"].items():
        for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
            assert hub.read_file(REPO, f"{sae_id}/{name}") == (folder / name).read_bytes()
            assert files[f"{sae_id}/{name}"].lfs == name.endswith(".safetensors")
    downloaded = sorted(round_trip["hf_home"].glob("hub/models--user--routed-saes/snapshots/*/*/*/*"))
    assert {path.name for path in downloaded} == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}


def test_loading_without_the_plugin_fails_with_a_bare_key_error(round_trip: dict[str, Any]) -> None:
    """The README says exactly this; if SAELens ever explains itself, update the README."""
    report = round_trip["report"]
    assert report["plugin_imported_at_start"] is False
    assert report["plugin_imported_after_step_1"] is False
    for step in ("load_from_disk_without_plugin", "from_pretrained_without_plugin"):
        assert report[step][SCALE_ID] == {"type": "KeyError", "args": ["scale"], "repr": "KeyError('scale')"}
        assert report[step][SWITCH_ID] == {"type": "KeyError", "args": ["switch"], "repr": "KeyError('switch')"}


def test_model_card_tells_readers_to_install_and_import_the_plugin(round_trip: dict[str, Any]) -> None:
    hub, report = round_trip["hub"], round_trip["report"]
    readmes: list[str] = []  # each version of README.md, oldest first
    for commit in hub.history(REPO):
        if "README.md" in commit.files and hub.read_file(REPO, "README.md", commit.oid).decode() not in readmes:
            readmes.append(hub.read_file(REPO, "README.md", commit.oid).decode())
    sae_lens_default, ours = readmes[0], readmes[-1]
    assert len(readmes) == 2 and report["card_written"] is True and report["card_written_again"] is False
    # SAELens's default card lists the SAEs and a loading snippet, but not the plugin.
    assert "sae-lens-scale" not in sae_lens_default and "sae_lens_scale" not in sae_lens_default
    assert f"- {SCALE_ID}\n" in sae_lens_default and "SAE.from_pretrained(" in sae_lens_default
    # Ours keeps SAELens's card, adds the import to its snippet and appends the install note.
    assert ours == add_plugin_note(sae_lens_default, REPO)
    for sae_id in SAE_IDS:
        assert f"- {sae_id}\n" in ours
    for card in (ours, hub.read_file(CARD_REPO, "README.md").decode()):
        assert "pip install sae-lens-scale" in card
        assert "library_name: saelens" in card and "- sae-lens-scale" in card
        snippets = [block for block in card.split("```python")[1:] if "SAE.from_pretrained(" in block]
        assert snippets and all(block.lstrip().startswith("import sae_lens_scale") for block in snippets)
    assert hub.read_file(CARD_REPO, "README.md").decode() == model_card(CARD_REPO, [OBJECT_ID])


def test_sae_object_upload_with_card_and_load_sae(round_trip: dict[str, Any], saved: dict[str, Any]) -> None:
    tensors = round_trip["tensors"]
    assert round_trip["report"]["classes"][f"load_sae/{OBJECT_ID}"] == "SwitchSAE"
    assert set(round_trip["hub"].list_files(CARD_REPO)) == {
        ".gitattributes",
        "README.md",
        f"{OBJECT_ID}/cfg.json",
        f"{OBJECT_ID}/sae_weights.safetensors",
    }
    expected = reference(saved["folders"][SWITCH_ID], load_file(saved["inputs"])["x"])
    for key, value in expected.items():
        assert torch.equal(tensors[f"load_sae/{OBJECT_ID}/{key}"], value), key


def test_load_sae_loads_a_folder_and_names_an_unregistered_architecture(saved: dict[str, Any]) -> None:
    x = load_file(saved["inputs"])["x"]
    sae = load_sae(saved["folders"][SCALE_ID])
    assert isinstance(sae, ScaleSAE)
    assert isinstance(load_sae(saved["folders"][SWITCH_ID]), SwitchSAE)
    assert torch.equal(sae(x), reference(saved["folders"][SCALE_ID], x)["out"])

    foreign = saved["foreign"]
    with pytest.raises(KeyError) as bare:
        SAE.load_from_disk(foreign)
    assert bare.value.args == ("mystery",)
    with pytest.raises(UnregisteredArchitectureError, match=r"architecture 'mystery'.*registered: .*scale.*switch"):
        load_sae(foreign)


def test_load_sae_names_an_unregistered_architecture_on_the_hub(round_trip: dict[str, Any]) -> None:
    report = round_trip["report"]
    assert report["from_pretrained_unregistered"]["repr"] == "KeyError('mystery')"
    error = report["load_sae_unregistered"]
    assert error["type"] == "UnregisteredArchitectureError"
    assert error["args"][0].startswith(f"The SAE at {FOREIGN_REPO}, mystery has architecture 'mystery', which is not")
    assert re.search(r"\(registered: [a-z_, ]*\bscale, [a-z_, ]*\bswitch\b", error["args"][0])


def test_add_plugin_note_is_idempotent_and_keeps_the_card() -> None:
    card = "---\nlibrary_name: saelens\n---\n\n# My SAEs\n\nSome text.\n"
    noted = add_plugin_note(card, "me/saes")
    assert noted.index("# My SAEs") < noted.index("Some text.") < noted.index("pip install sae-lens-scale")
    assert 'SAE.from_pretrained("me/saes", "<sae_id>")' in noted
    assert "library_name: saelens" in noted and "- sae-lens-scale" in noted
    assert add_plugin_note(noted, "me/saes") == noted
    assert "pip install sae-lens-scale" in add_plugin_note("no front matter at all", "me/saes")


def _call(hub: FakeHub, method: str, path: str, body: bytes | None = None, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = Request(hub.url + path, data=body, method=method, headers=headers)
    try:
        with urlopen(request, timeout=10) as response:
            return response.status
    except HTTPError as error:
        return error.code


def test_fake_hub_is_local_authenticated_and_bounded(tmp_path: Path) -> None:
    with FakeHub(tmp_path, max_request_bytes=1024) as hub:
        assert hub.address[0] == "127.0.0.1" and hub.address[1] > 0
        create = json.dumps({"name": "r", "organization": "u"}).encode()
        assert _call(hub, "POST", "/api/repos/create", create) == 401
        assert _call(hub, "POST", "/api/repos/create", create, token="wrong") == 401
        assert _call(hub, "POST", "/api/repos/create", create, token=hub.token) == 200
        assert _call(hub, "POST", "/api/repos/create", create, token=hub.token) == 409
        assert _call(hub, "GET", "/api/models/u/r") == 200
        assert _call(hub, "GET", "/api/models/u/missing") == 404
        assert _call(hub, "HEAD", "/u/r/resolve/main/.gitattributes") == 200
        assert _call(hub, "HEAD", "/u/r/resolve/main/missing.txt") == 404
        assert _call(hub, "HEAD", "/u/r/resolve/no-such-branch/.gitattributes") == 404
        assert _call(hub, "PUT", "/lfs-upload/u/r/" + "0" * 64, b"x") == 403  # never announced by a batch call
        header = {"key": "header", "value": {"summary": "s"}}
        escape = {"key": "file", "value": {"path": "../x", "content": "", "encoding": "base64"}}
        bad_path = f"{json.dumps(header)}\n{json.dumps(escape)}\n".encode()
        assert _call(hub, "POST", "/api/models/u/r/commit/main", bad_path, token=hub.token) == 400
        assert _call(hub, "POST", "/api/models/u/r/commit/main", b"x" * 2048, token=hub.token) == 413
        assert list(hub.unhandled) == []
        assert _call(hub, "GET", "/api/whoami-v2") == 404
        assert list(hub.unhandled) == [("GET", "/api/whoami-v2")]
        assert [commit.message for commit in hub.history("u/r")] == ["initial commit"]


def test_load_sae_opens_a_feature_scaling_training_checkpoint(tmp_path: Path) -> None:
    trained = scale_training_sae(n_experts=4, k=8)
    assert trained.omega.abs().min() > 0
    trained.save_model(tmp_path)
    x = torch.randn(32, 16, dtype=torch.float64)

    loaded = load_sae(tmp_path)
    assert isinstance(loaded, ScaleTrainingSAE)
    assert torch.equal(loaded.omega, trained.omega)
    assert torch.equal(loaded(x), trained(x))
