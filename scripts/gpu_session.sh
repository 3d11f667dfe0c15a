#!/usr/bin/env bash
# Runs on the lent GPU machine, after the vLLM bundle is installed (see ../shared/device/README.md).
#   bash scripts/gpu_session.sh tests [FILES]    GPU tests (default: kernels vs reference, vLLM Triton vs
#                                                reference, KV4 served vs simulated)
#   bash scripts/gpu_session.sh bench CONFIGS WORKLOADS [TIMEOUT]  serving benchmark rows (one engine per
#                                                config, TIMEOUT s each), accumulated in /tmp/bench
#   bash scripts/gpu_session.sh bisect [CONFIG WORKLOAD VARIANTS...]  one serving row per RUQUANT_* variant (default:
#                                                ruquant-w4a4 tp-1024-256 under default / PRETUNE=0 / EXACT_DIVISION=0; ~100 s
#                                                an engine, so at most five variants fit one call)
#   bash scripts/gpu_session.sh serve CONFIG RATES [PROMPTS]  benchmarks/serve_openai.py on a dummy-weight config
#   bash scripts/gpu_session.sh quality SCHEMES SEEDS ROWS [TOKENS]  SmolLM2-135M quality cells, a process per scheme and seed
#   bash scripts/gpu_session.sh smollm2 SCHEMES      SmolLM2-135M served perplexity through the endpoint (ckpts in /tmp/ckpts)
#   bash scripts/gpu_session.sh stage1               RUQuant stage 1 on the Llama-3-8B shape (random weights)
#   bash scripts/gpu_session.sh scale [ARGS]         the converter on a Llama-3-70B-shaped checkpoint of 4 layers
#                                                (benchmarks/convert_scale.py --serve: build, convert, vllm serve;
#                                                its --budget-s, default 500, bounds the whole run)
#   bash scripts/gpu_session.sh profile [ARGS]       decode-step profile per GPU kernel (benchmarks/decode_profile.py:
#                                                bf16, fp8, ruquant w4a4 / w4a4kv4 at batch 1 and 16, ~5-7 min)
#   bash scripts/gpu_session.sh kv4 [SCENARIOS [--no-sweep]]  int4-KV attention kernel: GPU tests vs the reference, then
#                                                benchmarks/kv4_attention.py (ours / vLLM int4 / FA3 bf16)
#   bash scripts/gpu_session.sh kv4serve CONFIGS [TIMEOUT]  sweep the decode tile on "decode 512", then the
#                                                serving rows with the best one (RUQUANT_INT4_KV_DECODE_PLAN)
#   bash scripts/gpu_session.sh tp2                  TP=2 engines vs the simulation (2-GPU machine; not yet run)
#   bash scripts/gpu_session.sh graphq               served vs simulated with the quantization in the compiled graph
#   bash scripts/gpu_session.sh decode               issue 22's newest GPU tests (k_loop GEMV tiles, one-pass norm +
#                                                quantization, rotate_rows, every small GEMM tile), then down_proj's tile sweep; the best tile
#                                                goes to /tmp/bench/long_k_tile, for RUQUANT_GEMV_LONG_K_TILE in `bench`
#   bash scripts/gpu_session.sh gemv [ARGS]          decode GEMV (issue 22): its GPU tests, then decode_linears.py ARGS
#                                                (default: gemm / gemv / linear / linear_gemv at M 1-16, the tile sweep)
# A ruquant serving config on a fresh machine needs ~240 s (vLLM's first import, torch.compile,
# graph capture, then the run): 170 s ran out on 2026-11-30. The first engine of a fresh machine
# spent ~2 more minutes after graph capture (231 s to ready, 253 s with the run, 2026-11-30d):
# FlashInfer's sampler JIT. serving.py turns that sampler off; the first engine then took 131 s
# with its run (2026-11-30e): 300 leaves room. A kv4 sweep of a small-batch scenario compiles
# ~160 plans and ran past 200 s each: time a short list there instead (kv4_attention.py --plans).
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
      | grep -E "passed|failed|error|backends|differ from|served vs simulation|Error|FAILED|KV cache" | tail -30
    # the last `vllm serve` log of the run (the e2e test's server), its tail
    f=$(ls -t /tmp/pytest-of-*/pytest-*/*/serve.log 2>/dev/null | head -1)
    [ -n "$f" ] && tail -c 200000 "$f" > "$OUT/serve.log"
    ;;
  quality)
    # issue 24: SmolLM2-135M quality cells (examples/quality.py) on the GPU, one process per (scheme, seed, row),
    # all at once (a 135M model leaves the GPU mostly idle; the device has 16 cores), each cut at 480 s so that
    # the results still come back in one tar (the device returns few files). The model and texts come as a
    # tar.xz in parts (.carry/d_*/part.*, one carry each) copied to /tmp/carry beforehand.
    #   quality SCHEMES SEEDS ROWS [TOKENS]
    shift
    C=/tmp/smollm2 Q=${QUALITY_DIR:-/tmp/quality}  # QUALITY_DIR: several calls side by side
    if [ ! -d $C/smollm2-135m ]; then
      cat /tmp/carry/part.* > /tmp/smollm2.tar.xz && mkdir -p $C &&
        python3 -c "import tarfile; tarfile.open('/tmp/smollm2.tar.xz').extractall('$C', filter='data')" || exit 1
    fi
    rm -rf $Q && mkdir -p $Q
    for s in ${1//,/ }; do for seed in ${2//,/ }; do for row in ${3//,/ }; do
      OMP_NUM_THREADS=1 timeout 480 python3 examples/quality.py $C/smollm2-135m --eval-text $C/text/wiki_eval.txt \
        --calib-text $C/text/lee_calib.txt --schemes "$s" --rows "$row" --max-eval-tokens "${4:-32768}" --seed "$seed" \
        --json "gpu_${s}_s${seed}_$row.json" --out $Q > "$Q/gpu_${s}_s${seed}_$row.log" 2>&1 &
    done; done; done
    wait
    tar czf "$OUT/$(basename $Q).tgz" -C $Q .
    grep -h "ppl" $Q/*.log
    ;;
  smollm2)
    # issue 20 item 3: SmolLM2-135M checkpoints (carried in parts, unpacked to /tmp/ckpts) served
    # with `vllm serve` defaults (bf16, compile, CUDA graphs) and scored through the OpenAI endpoint
    shift
    for s in ${1//,/ }; do
      VLLM_USE_FLASHINFER_SAMPLER=0 python3 examples/served_perplexity_api.py serve /tmp/ckpts/smollm2-$s \
        --simulated-json examples/results/smollm2-135m/served_api/simulated_$s.json --out "$OUT/served_$s.json" \
        -- --gpu-memory-utilization 0.3 2>&1 | tail -4
      [ -f "$OUT/served_$s.json" ] || echo "$s: no result"
    done
    ;;
  kv4serve)
    python3 benchmarks/kv4_attention.py --out "$OUT/sweep" --only "decode 512" 2>&1 | tail -2
    plan=$(python3 -c "import json; r = json.load(open('$OUT/sweep/kv4_attention.json'))['rows'][0]; print(*r['best_decode'], sep=',')")
    echo "RUQUANT_INT4_KV_DECODE_PLAN=$plan"
    RUQUANT_INT4_KV_DECODE_PLAN=$plan bash "$0" bench "$2" tp-1024-256 "${3:-300}"
    ;;
  bench)
    # one config per serving.py call, results copied after each: a call that runs out of time
    # still returns the configs it finished
    for c in ${2//,/ }; do
      python3 benchmarks/serving.py --only "$c" --workloads "$3" --results /tmp/bench/serving.json \
        --models-dir /tmp/bench/models --timeout "${4:-600}" 2>&1 | grep -E "^$c " | tail -8
      cp /tmp/bench/serving.json /tmp/bench/serving.png "$OUT/" 2>/dev/null
      f=/tmp/bench/models/"$c".log; [ -f "$f" ] && tail -c 30000 "$f" > "$OUT/$c.log"  # one engine, one log
    done
    python3 benchmarks/serving.py --report --results /tmp/bench/serving.json
    ;;
  bisect)
    # one config and workload under each variant of the plugin's switches, an engine each (vLLM's compile
    # cache keys on RUQUANT_* since af039ec, so every variant compiles its own graph); a variant is
    # "default" or NAME=VALUE[,NAME=VALUE]
    cfg=${2:-ruquant-w4a4}; wl=${3:-tp-1024-256}
    variants=("${@:4}"); [ ${#variants[@]} -eq 0 ] && variants=(default RUQUANT_PRETUNE=0 RUQUANT_EXACT_DIVISION=0)
    for v in "${variants[@]}"; do
      tag=${v//[^A-Za-z0-9_=]/_}; envs=(); [ "$v" != default ] && envs=(${v//,/ })
      env "${envs[@]}" python3 benchmarks/serving.py --only "$cfg" --workloads "$wl" --results "$OUT/bisect_$tag.json" \
        --models-dir /tmp/bench/models --timeout 240 2>&1 | grep -E "^$cfg " | tail -1 | sed "s|^|$v: |"
      tail -c 20000 /tmp/bench/models/"$cfg".log > "$OUT/bisect_$tag.log"
      python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['rows'][sys.argv[2]][sys.argv[3]]; \
print('  autotune s (start / serving):', r.get('autotune_s'))" "$OUT/bisect_$tag.json" "$cfg" "$wl" 2>/dev/null
    done
    ;;
  serve)
    python3 benchmarks/serving.py --only "$2" --workloads tp-1024-256 --dry-run --models-dir /tmp/bench/models >/dev/null
    python3 benchmarks/serve_openai.py /tmp/bench/models/"$2" --rates "$3" --num-prompts "${4:-256}" \
      --results "$OUT/serve_openai.json" -- --load-format dummy --max-model-len 2048 --gpu-memory-utilization 0.85 \
      2>&1 | grep -vE "^\s*$" | tail -25
    tail -c 30000 "$OUT/serve_openai.server.log" > /tmp/server_tail.log 2>/dev/null && mv /tmp/server_tail.log "$OUT/serve_openai.server.log"
    ;;
  profile)
    shift
    python3 benchmarks/decode_profile.py --out "$OUT/decode_profile" "$@" 2>&1 | tee "$OUT/decode_profile.log" | tail -40
    # the source of each Inductor kernel the profile names (and its autotuned config), from the compile caches
    mkdir -p "$OUT/inductor_kernels"
    for k in $(grep -ohE "triton_(per|red|poi)_fused[A-Za-z0-9_]*" "$OUT/decode_profile/decode_profile.md" | sort -u); do
      f=$(grep -rlE "^def $k\(" /root/.cache/vllm/torch_compile_cache /tmp/torchinductor_* --include=*.py 2>/dev/null | head -1)
      [ -n "$f" ] && cp "$f" "$OUT/inductor_kernels/$k.py" && cp "${f%.py}.best_config" "$OUT/inductor_kernels/$k.best_config" 2>/dev/null
    done
    ls "$OUT/inductor_kernels" | wc -l | sed 's/$/ Inductor kernel files kept/'
    ;;
  scale)
    # issue 25 item 3: peak GPU memory / host RSS / seconds per layer of the default recipe at 70B dims,
    # then `vllm serve --load-format auto` of the result (skipped when the budget is nearly spent)
    shift
    python3 benchmarks/convert_scale.py --workdir /tmp/convert_scale --out "$OUT/convert_scale.json" --serve "$@" \
      2>&1 | tee "$OUT/convert_scale.log" | grep -vE "^\s*$" | tail -40
    cp /tmp/convert_scale/convert_segments.jsonl "$OUT/" 2>/dev/null
    [ -f /tmp/convert_scale/serve.log ] && tail -c 30000 /tmp/convert_scale/serve.log > "$OUT/convert_scale.serve.log"
    ;;
  stage1)
    python3 benchmarks/ruquant_stage1.py --json "$OUT/ruquant_stage1.json" 2>&1 | tail -5
    ;;
  kv4)
    python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_int4_kv_attention.py 2>&1 | tee "$OUT/gpu_tests_kv4_kernel.log" \
      | grep -E "max \||passed|failed|^E " | tail -10
    python3 benchmarks/kv4_attention.py --out "$OUT" --only "${2:-}" "${@:3}" 2>&1 | tee "$OUT/kv4_attention.log" | tail -9
    ;;
  tp2)
    # issue 25: on a 2-GPU machine (kind nvidia-h200-x2), the CPU CI's TP=2 engine test on the GPUs
    python3 -m pytest -q -s -p no:cacheprovider tests/test_tensor_parallel_served.py tests/test_tensor_parallel.py 2>&1 \
      | tee "$OUT/gpu_tests_tp2.log" | grep -E "passed|failed|served vs simulation|^E " | tail -12
    ;;
  graphq)
    # issue 22: served vs simulated with the graph-visible quantization (default since gpu-2026-12-04g)
    # and its kernel test
    RUQUANT_GRAPH_QUANT=1 timeout 330 python3 -m pytest -q -s -m gpu -p no:cacheprovider -p no:logging \
      tests/test_serve_openai.py tests/test_kernels_gpu.py -k "openai or quantized_in_the_graph" 2>&1 \
      | tee "$OUT/gpu_tests_graphq.log" | grep -E "passed|failed|serve_openai\[cuda\]|^E " | tail -8
    ;;
  decode)
    python3 -m pytest -q -s -m gpu -p no:cacheprovider -p no:logging tests/test_kernels_gpu.py \
      -k "k_loop or one_pass or divides_like_eager or rotate_quant_hadamard or qgemm_every_config or warm_up" 2>&1 | tee "$OUT/gpu_tests_decode.log" \
      | grep -E "passed|failed|^E |Error|norm \+ quantization|constant divisor" | tail -12
    python3 benchmarks/decode_linears.py --out "$OUT/lin" --only stream,gemv,rq --ms 1,16 --gemv-sweep --gemv-int8 --gemv-ms 1 \
      2>&1 | tee "$OUT/decode_linears.log" | tail -12
    python3 - "$OUT/lin/gemv_sweep.json" <<'EOF' | tee /tmp/bench/long_k_tile.txt
import json, sys
row = next(r for r in json.load(open(sys.argv[1]))["rows"] if r["K"] > 4096 and r["M"] == 1)
best = min(row["tiles"], key=row["tiles"].get)
print(best, file=open("/tmp/bench/long_k_tile", "w"))
print(f"down_proj M=1: default {row['default']} {row['default_us']:.1f} us, best {best} {row['tiles'][best]:.1f} us")
EOF
    ;;
  gemv)
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py -k gemv 2>&1 | tee "$OUT/gpu_tests_gemv.log" \
      | grep -E "passed|failed|^E |Error" | tail -12
    shift
    lin_args=("$@"); [ ${#lin_args[@]} -eq 0 ] && lin_args=(--only gemm,gemv,linear,linear_gemv --ms 1,2,4,8,16 --gemv-sweep)
    python3 benchmarks/decode_linears.py --out "$OUT/lin" "${lin_args[@]}" 2>&1 | tee "$OUT/decode_linears_gemv.log" | tail -40
    ;;
  *) echo "usage: $0 tests [FILES] | smollm2 SCHEMES | bench CONFIGS WORKLOADS [TIMEOUT] | serve CONFIG RATES [PROMPTS] | stage1 | scale [ARGS] | profile [ARGS] | kv4 [SCENARIOS] | kv4serve CONFIGS [TIMEOUT] | tp2 | graphq | decode | gemv | bisect [CONFIG WORKLOAD VARIANTS...]"; exit 2 ;;
esac
