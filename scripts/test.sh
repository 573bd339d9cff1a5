#!/usr/bin/env bash
# The whole suite under the newest libraries, then every module that touches transformers, transformer-lens or
# datasets (the offline model and text, the demo, the CLIs, SAELens's runners, the Hub, sae-dashboard and SAEBench)
# again under the versions sae-dashboard and SAEBench allow. Both environments come from scripts/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q
.venv-interp/bin/python -m pytest -q tests/tools tests/test_sae_lens_integration.py tests/test_multi_sae_runner.py \
  tests/test_hub.py
