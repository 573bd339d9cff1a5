"""sae-dashboard's feature dashboards for a saved Scale or Switch SAE, on held-out Shakespeare through the bundled
SmolLM2; optionally a PNG of them, rendered by headless Chromium without the network.

Runs in the environment that has sae-dashboard (``.venv-interp``, from ``scripts/install.sh``):

    .venv-interp/bin/python examples/feature_dashboards.py --sae sae-lens-scale-demo/sae --output dashboards.html
    .venv-interp/bin/python examples/feature_dashboards.py ... --screenshot dashboard.png   # needs chromium, node-d3

The dashboards' page loads d3 and plotly from their CDNs; for the screenshot they come from local copies instead:
plotly's from the ``plotly`` package, d3's from Debian's ``node-d3`` (its selection API is all the page uses).
"""

import argparse
import subprocess
import tempfile
from pathlib import Path

import plotly
import torch
from sae_dashboard.data_writing_fns import save_feature_centric_vis
from sae_dashboard.sae_vis_data import SaeVisConfig
from sae_dashboard.sae_vis_runner import SaeVisRunner
from sae_lens import SAE
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

import sae_lens_scale  # noqa: F401  registers the routed architectures, so load_from_disk opens them
from sae_lens_scale.tools.offline import load_smollm2_hooked
from sae_lens_scale.tools.sources import token_splits

CDN_SCRIPTS = {
    "https://d3js.org/d3.v6.min.js": "d3",
    "https://cdn.plot.ly/plotly-latest.min.js": "plotly",
}


def screenshot(html: Path, png: Path, d3: Path, width: int = 1400, height: int = 1000) -> None:
    """Render ``html`` to ``png`` with headless Chromium, the CDN scripts replaced by local files."""
    local = {"d3": d3, "plotly": Path(plotly.__file__).parent / "package_data" / "plotly.min.js"}
    page = html.read_text()
    for url, name in CDN_SCRIPTS.items():
        page = page.replace(url, local[name].resolve().as_uri())
    with tempfile.TemporaryDirectory() as folder:
        offline_page = Path(folder) / html.name
        offline_page.write_text(page)
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={width},{height}", "--virtual-time-budget=8000", "--allow-file-access-from-files",
             f"--screenshot={png.resolve()}", offline_page.as_uri()],
            check=True, capture_output=True,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", type=Path, default=Path("sae-lens-scale-demo/sae"), help="a saved SAE folder")
    parser.add_argument("--features", type=int, nargs="*", help="latents to show (default: the 4 most often active)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out rows of 128 tokens to read")
    parser.add_argument("--output", type=Path, default=Path("dashboards.html"))
    parser.add_argument("--screenshot", type=Path, help="also write a PNG of the first dashboard")
    parser.add_argument("--d3", type=Path, default=Path("/usr/share/nodejs/d3/dist/d3.min.js"))
    args = parser.parse_args()

    sae = SAE.load_from_disk(args.sae)
    hook = sae.cfg.metadata.hook_name
    assert hook is not None, f"{args.sae}/cfg.json names no hook: save the SAE with SAELens's runner"
    model, tokenizer = load_smollm2_hooked(n_layers=extract_stop_at_layer_from_tlens_hook_name(hook))
    # The demo's own held-out plays (same split), so no row was seen in training.
    heldout = token_splits(tokenizer, "shakespeare", 128, 0.1, seed=0, max_tokens=args.prompts * 128).heldout
    tokens = torch.as_tensor(heldout["input_ids"][: args.prompts])
    features = args.features
    if not features:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=hook)
            features = sae.encode(cache[hook]).gt(0).sum(dim=(0, 1)).topk(4).indices.tolist()

    cfg = SaeVisConfig(hook_point=hook, features=features, minibatch_size_features=16, minibatch_size_tokens=16)
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    save_feature_centric_vis(sae_vis_data=data, filename=args.output)
    for feature, top in zip(features, data.feature_stats.max, strict=True):
        print(f"latent {feature}: max activation {top:.3f}")
    print(f"dashboards: {args.output}")
    if args.screenshot is not None:
        screenshot(args.output, args.screenshot, args.d3)
        print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
