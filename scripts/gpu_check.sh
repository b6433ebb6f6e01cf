#!/usr/bin/env bash
# The GPU checks of issue 11 in one prepared run: the CUDA benchmark (dgtrain against the hand loop, the
# resident fused loop and Lightning) and the `gpu`-marked tests. Every result goes under $OUT (default
# ./gpu_out): gpu.txt (the card), bench_cuda.{txt,json}, bench_lm.{txt,json},
# bench_lm48.{txt,json}, pytest_gpu.txt.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh            # dgtrain and its dependencies importable
#
# On a GPU machine without a package registry, carry the wheels that machine lacks in .whl/ (hydra-core,
# omegaconf, antlr4-python3-runtime; docs/performance.md shows how to fetch them): they are installed
# into /tmp/site and put on PYTHONPATH, and the machine's own torch is kept.
# Each part has its own time limit, so one slow part still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt" 2>&1

# every case but the LM: 3 alternating repeats of each runner
timeout "${BENCH_S:-240}" $PY scripts/bench.py --device cuda --repeats 3 \
  --cases linreg mlp convnet convnet_bf16 seq2seq --json "$OUT/bench_cuda.json" > "$OUT/bench_cuda.txt" 2>&1
echo "bench rc=$?" >> "$OUT/bench_cuda.txt"
# GPT-2 small, bf16, compiled: compiling dominates, so one repeat of dgtrain and the hand loop (the LM has
# no resident target); then dgtrain alone at micro-batch 48, where nanoGPT gained 2 points of MFU over 16
timeout "${LM_S:-160}" $PY scripts/bench.py --device cuda --repeats 1 --cases lm --runners dgtrain hand \
  --json "$OUT/bench_lm.json" > "$OUT/bench_lm.txt" 2>&1
echo "bench lm rc=$?" >> "$OUT/bench_lm.txt"
timeout "${LM48_S:-80}" $PY scripts/bench.py --device cuda --repeats 1 --cases lm --runners dgtrain \
  --set data.batch_size=48 --json "$OUT/bench_lm48.json" > "$OUT/bench_lm48.txt" 2>&1
echo "bench lm B=48 rc=$?" >> "$OUT/bench_lm48.txt"
# every file with `gpu` tests (grep -l 'mark.gpu' tests/*.py), the quick ones first (the CUDA smoke recipes
# train for longer); -v: a timeout still leaves each finished test's result
timeout "${TESTS_S:-150}" $PY -m pytest -v -m gpu -p no:cacheprovider tests/test_train.py tests/test_telemetry.py \
  tests/test_checkpoint.py tests/test_sweep.py tests/test_recipes.py > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu.txt"
tail -n 12 "$OUT/bench_cuda.txt" "$OUT/bench_lm.txt" "$OUT/bench_lm48.txt" "$OUT/pytest_gpu.txt"
