#!/usr/bin/env bash
# The GPU checks in one go, sized for about 8 minutes on one H200: which expert-matmul path runs, the CUDA tests, then
# the speed table and the width sweep (to 1,048,576 latents, each SAE with Adam, fused Adam and the row-sparse step)
# in bf16 autocast. Run from the repository root on a machine whose python3 has a CUDA
# torch (2.9 or later, for grouped GEMM). Packages that machine lacks travel as wheels in .whl/
# (benchmarks/gpu_wheels.sh downloads them); results land in benchmarks/results/ and, when $OUT is set, in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
# Which expert-matmul path runs here, so that no GPU number measures the loop fallback unawares.
(cd benchmarks && python3 -c "import common; print('expert matmul:', common.machine('cuda')['expert_matmul'])")
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_row_sparse_adam.py -k "cuda"
(cd benchmarks && python3 speed.py --device cuda --autocast)
(cd benchmarks && python3 width_sweep.py --device cuda --autocast --max-width 1048576 --max-topk-width 1048576 \
  --optimizers adam adam_fused adam_row_sparse)
(cd benchmarks && python3 decode_memory.py --device cuda)
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/speed-cuda.* benchmarks/results/width-sweep-cuda-optimizers.* \
    benchmarks/results/decode-memory-cuda.* "$OUT"/
fi
