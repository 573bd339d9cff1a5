#!/usr/bin/env bash
# Downloads into .whl/ the wheels that benchmarks/gpu_check.sh needs and the lent GPU machine's image lacks (that
# image has torch, transformers, safetensors, huggingface-hub, matplotlib, tqdm and pytest; see the device tool's
# KINDS.md). Python 3.12, x86-64 Linux. Run here, from the repository root, before carrying .whl to the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  sae-lens==6.54.12 transformer-lens==3.9.0 better-abc datasets dill multiprocess docstring-parser simple-parsing \
  pydantic pydantic-core annotated-types typing-inspection wandb truststore fancy-einsum beartype typeguard \
  plotly plotly-express babe nltk python-dotenv tenacity
du -sh .whl
