#!/usr/bin/env bash
# Runs on the lent GPU machine, after the vLLM bundle is installed (see ../shared/device/README.md).
#   bash scripts/gpu_session.sh tests [FILES]    GPU tests (default: kernels vs reference, vLLM Triton vs
#                                                reference, KV4 served vs simulated)
#   bash scripts/gpu_session.sh bench CONFIGS WORKLOADS   serving benchmark rows, accumulated in /tmp/bench
# Everything worth keeping is copied to $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip -e failed"
mkdir -p /tmp/bench "${OUT:-/tmp/out}"
case "${1:-}" in
  tests)
    shift
    files=("$@"); [ ${#files[@]} -eq 0 ] && files=(tests/test_kernels_gpu.py tests/test_gpu_vllm.py tests/test_kv4_gpu.py)
    python3 -m pytest -q -s -m gpu -p no:cacheprovider -p no:logging -rs "${files[@]}" 2>&1 | tee "$OUT/gpu_tests.log" \
      | grep -E "passed|failed|error|backends|differ from|Error|FAILED|KV cache" | tail -30
    ;;
  bench)
    python3 benchmarks/serving.py --only "$2" --workloads "$3" --results /tmp/bench/serving.json \
      --models-dir /tmp/bench/models --timeout "${4:-420}" 2>&1 | tail -30
    cp /tmp/bench/serving.json /tmp/bench/serving.png "$OUT/" 2>/dev/null
    for c in ${2//,/ }; do for f in /tmp/bench/models/"$c".*.log; do
      [ -f "$f" ] && tail -c 30000 "$f" > "$OUT/$(basename "$f")"; done; done
    ;;
  *) echo "usage: $0 tests | bench CONFIGS WORKLOADS [TIMEOUT]"; exit 2 ;;
esac
