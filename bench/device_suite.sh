#!/usr/bin/env bash
# The GPU benchmark suite, one prepared run of under 10 minutes on a machine with one H100/H200.
#
#   bash bench/device_suite.sh --prepare   # here (network): wheels of what the GPU machine lacks -> bench/wheels/
#   bash bench/device_suite.sh             # there: the benchmarks; results -> bench/results/ and $OUT/results/
#
# The GPU machine has no network and its own Python 3.12 with JAX (CUDA), flax, optax, orbax and
# torch; the pure-Python (and abi3/cp312) packages tttjax also imports travel as wheels and are
# installed into a private directory only where the import is missing there. With the device tool:
#   run(command="bash bench/device_suite.sh", carry=["bench/wheels"], timeout_s=600)
# Then copy the returned results/*.json into bench/results/device/ and record them in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/wheels
# import name -> distribution
PACKAGES=(ml_collections:ml_collections grain:grain array_record:array_record tensorboardX:tensorboardX
          safetensors:safetensors yaml:pyyaml tqdm:tqdm absl:absl-py cloudpickle:cloudpickle tree:dm-tree
          etils:etils more_itertools:more-itertools google.protobuf:protobuf chex:chex toolz:toolz)

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$WHEELS"
  dists=(); for p in "${PACKAGES[@]}"; do dists+=("${p#*:}"); done
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${dists[@]}"
  ls "$WHEELS"
  exit 0
fi

PY=${PYTHON:-python3}
SITE=$(mktemp -d)/site
for p in "${PACKAGES[@]}"; do
  module=${p%%:*}; dist=${p#*:}
  if ! "$PY" -c "import $module" 2>/dev/null; then
    wheel=$(ls "$WHEELS" 2>/dev/null | grep -i "^${dist//-/_}-.*\.whl$" | head -1 || true)
    [[ -n "$wheel" ]] || { echo "device_suite: $module missing and no wheel in $WHEELS (run --prepare)" >&2; exit 1; }
    "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$WHEELS/$wheel"
  fi
done
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF'
import jax
print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__, "| python", __import__("sys").version.split()[0])
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
step() {  # name, seconds, command...: one benchmark under its own time limit; the suite goes on
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" || { echo "== $name failed or timed out (rc=$?)"; status=1; }
  echo "== $name took $((SECONDS - t0))s"
}
# The 7B-shaped temporal stack with a TTT layer, bf16: MFU against the bf16 matmul rate of this run.
step layer_stack 240 "$PY" bench/layer_stack.py --layers 4 --ttt-layer 1 --frames 2048 --dtype bfloat16
# The small-config train step (JAX only: PyTorch's side of that bench runs on CPU threads).
step train_step 120 "$PY" bench/train_step.py --configs small --steps 8 --repeats 1 --jax_only
# The performance model against the device: predicted (from the compiled step's HLO, with this GPU's
# measured rates and its chips.py datasheet entry) vs measured Trainer step.
step perf_model 100 "$PY" bench/perf_model.py --configs bench_tiny,bench_small --steps 4 --rounds 2
# One TTT-MLP layer: dual vs primal form (and the PyTorch port), T up to 2048.
step ttt_layer 90 "$PY" bench/ttt_layer.py
# Long-sequence attention (window 3000, 32 heads as a 7B layer): blockwise vs cuDNN's local-window kernel.
step attention 120 "$PY" bench/attention.py --frames 4096,16384,65536 --heads 32 --impls blockwise,cudnn --repeats 3

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT/results"
  cp bench/results/layer_stack.json bench/results/train_step.json bench/results/ttt_layer.json bench/results/attention.json bench/results/perf_model.json "$OUT/results/" 2>/dev/null || true
fi
exit $status
