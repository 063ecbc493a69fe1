#!/usr/bin/env bash
# What a GPU machine of the device tool runs (no Ray, no weights there; transformers 5.23 and xgrammar
# travel as wheels in .whl/). Writes logs and tables under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# tests/gpu on CUDA, plus the engine's and TP's unit tests (CPU, no Ray needed) on that machine's stack
python3 -m pytest -q -p no:cacheprovider tests/gpu tests/unit/test_engine.py tests/unit/test_tp.py 2>&1 | tee "$OUT/gpu_tests.log"
# the engine's CUDA defaults ("auto": 2048 prompt tokens per step, separate prefill steps) against the static batch
timeout 150 python3 bench/bench_engine.py --arch llama-1b --levels 1,32,128 --seconds 5 \
  --budgets auto,2048 2>&1 | tee "$OUT/bench_llama1b.md"
timeout 150 python3 bench/bench_engine.py --arch llama-8b --levels 32,128 --seconds 5 \
  --budgets auto 2>&1 | tee "$OUT/bench_llama8b.md"
