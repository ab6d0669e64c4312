#!/usr/bin/env bash
# The GPU session in one script (bench/README.md, "GPU session runbook"): gpu-marked tests, kernel and
# engine benchmarks per released size, the `rwkv` package's CUDA path; each step bounded in time, a
# failed step reported and skipped. Results (JSON), logs and summary.txt go to $OUT if set, else
# bench/results/gpu-<date>/.
#
#   bash bench/gpu_suite.sh                      # every step, in priority order (longer than 10 minutes)
#   bash bench/gpu_suite.sh tests kernels        # only these steps, in this order
#   bash bench/gpu_suite.sh --list               # the steps and their time limits
#
# Steps: preflight tests kernels engine-0.1b engine-1.5b engine-2.9b engine-7.2b graphs-off
#        engine-2.9b-sampled package   (preflight always runs first)
# Environment: PYTHON (default python3), RWKVD_COMMIT (the commit, for a tree copied without .git),
# BANDWIDTH_GBS (HBM GB/s for the rooflines, default from the device table), PACKAGE_SIZES (default
# "0.1b 1.5b 2.9b"), ENGINE_BATCHES (default 1,8,64,256,1024), DECODE_TOKENS (default 64),
# T_<STEP> (seconds, e.g. T_TESTS=200, T_ENGINE_7_2B=500) to change a step's limit.
set -u
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%d-%H%M%S)
DIR=${OUT:-bench/results/gpu-$STAMP}
mkdir -p "$DIR/logs"
SUMMARY=$DIR/summary.txt
BATCHES=${ENGINE_BATCHES:-1,8,64,256,1024}
DECODE_TOKENS=${DECODE_TOKENS:-64}
BW_FLAG=()
[ -n "${BANDWIDTH_GBS:-}" ] && BW_FLAG=(--bandwidth "$BANDWIDTH_GBS")
ALL=(tests kernels engine-0.1b engine-1.5b engine-2.9b engine-7.2b graphs-off engine-2.9b-sampled package)

limit() { # the time limit of a step: T_<STEP> overrides the default
    local var="T_$(echo "$1" | tr 'a-z.-' 'A-Z__')"
    echo "${!var:-$2}"
}
declare -A DEFAULT_LIMIT=(
    [preflight]=60 [tests]=300 [kernels]=90 [engine-0.1b]=240 [engine-1.5b]=300 [engine-2.9b]=360
    [engine-7.2b]=540 [graphs-off]=180 [engine-2.9b-sampled]=240 [package]=170
) # kernels: per head count (3 runs); package: per size and path

if [ "${1:-}" = "--list" ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    echo
    for s in preflight "${ALL[@]}"; do printf '  %-22s %4ss\n' "$s" "$(limit "$s" "${DEFAULT_LIMIT[$s]}")"; done
    exit 0
fi
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL[@]}")
for s in "${STEPS[@]}"; do
    [ -n "${DEFAULT_LIMIT[$s]:-}" ] || { echo "unknown step: $s (bash $0 --list)"; exit 2; }
done

FAILED=0
note() { echo "$*" | tee -a "$SUMMARY"; }

run() { # run NAME CMD...: one bounded command, its output in logs/NAME.log; records ok / FAILED / TIMEOUT
    local name=$1 secs rc start status
    shift
    secs=$(limit "$CURRENT" "${DEFAULT_LIMIT[$CURRENT]}")
    start=$(date +%s)
    echo "== $name (limit ${secs}s): $*"
    timeout --signal=INT --kill-after=30 "$secs" "$@" >"$DIR/logs/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137 | 130) status="TIMEOUT after ${secs}s (partial results may be in the JSON)" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    note "$(printf '%-30s %-12s %5ss  %s' "$name" "${status%% *}" "$(($(date +%s) - start))" "$status")"
    if [ $rc -ne 0 ]; then
        FAILED=$((FAILED + 1))
        tail -n 8 "$DIR/logs/$name.log" | sed 's/^/    | /'
    fi
    return $rc
}

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

preflight() {
    {
        echo "date: $(date -u +%FT%TZ)  commit: ${RWKVD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1 || echo "nvidia-smi: not found"
        "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>&1
        for m in triton safetensors pytest pytest_asyncio pytest_timeout grpc fastapi uvicorn fla rwkv einops; do
            if has "$m"; then echo "module $m: yes"; else echo "module $m: MISSING"; fi
        done
        command -v nvcc >/dev/null && echo "nvcc: $(nvcc --version | tail -n 1)" || echo "nvcc: MISSING (the rwkv package's CUDA kernel cannot be built)"
        command -v ninja >/dev/null && echo "ninja: yes" || echo "ninja: MISSING"
        "$PY" -c 'import service.engine.local' 2>&1 && echo "service.engine imports: yes" || echo "service.engine imports: NO"
        "$PY" -c 'import service.app' >/dev/null 2>&1 && echo "service.app imports: yes" || echo "service.app imports: NO (tests that start the server will fail to import)"
    } >"$DIR/environment.txt" 2>&1
    cat "$DIR/environment.txt"
    "$PY" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null
}

engine() { # engine NAME SIZE [extra flags]
    local name=$1 size=$2
    shift 2
    run "$name" "$PY" bench/engine.py --size "$size" --device cuda --dtype float16 --batch "$BATCHES" \
        --prompt-lens 1024,8192 --temperature 0 --decode-tokens "$DECODE_TOKENS" --out-dir "$DIR" ${BW_FLAG[@]+"${BW_FLAG[@]}"} "$@"
}

package() {
    if ! has rwkv; then
        note "$(printf '%-30s %-12s' package SKIPPED) the rwkv package is not installed"
        return
    fi
    local cuda_on=1 size
    for size in ${PACKAGE_SIZES:-0.1b 1.5b 2.9b}; do
        if [ $cuda_on = 1 ] && ! RWKV_CUDA_ON=1 run "package-$size-cudakernel" "$PY" bench/rwkv_package.py --size "$size" \
            --device cuda --dtype fp16 --prompt-lens 1024,8192 --out-dir "$DIR"; then
            note "    the package's CUDA kernel failed (build or run, see logs/package-$size-cudakernel.log): its torch path instead"
            cuda_on=0
        fi
        if [ $cuda_on = 0 ]; then
            RWKV_CUDA_ON=0 run "package-$size-torch" "$PY" bench/rwkv_package.py --size "$size" --device cuda --dtype fp16 \
                --prompt-lens 1024,8192 --out-dir "$DIR"
        fi
    done
}

note "GPU suite $STAMP: steps ${STEPS[*]} -> $DIR"
CURRENT=preflight
if ! preflight; then
    note "preflight: no CUDA device visible to torch; nothing to run"
    exit 1
fi
for step in "${STEPS[@]}"; do
    CURRENT=$step
    case $step in
        tests)
            # --continue-on-collection-errors: a module needing a missing package must not stop the others.
            run tests "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs --continue-on-collection-errors \
                --junitxml="$DIR/tests-gpu.xml" tests ;;
        kernels)
            for heads in 40 64 12; do
                run "kernels-h$heads" "$PY" bench/kernels.py --heads $heads --batch 1,64,256,1024 --prefill 1024,8192 \
                    --out "$DIR/kernels-h$heads-$STAMP.json"
            done ;;
        engine-0.1b | engine-1.5b | engine-2.9b | engine-7.2b)
            engine "$step" "${step#engine-}" ;;
        graphs-off)
            engine graphs-off-0.1b 0.1b --cuda-graphs off --batch 1,8,64 --prompt-lens 1024 ;;
        engine-2.9b-sampled)
            run engine-2.9b-sampled "$PY" bench/engine.py --size 2.9b --device cuda --dtype float16 --batch 64,256 \
                --prompt-lens 1024 --decode-tokens 32 --out-dir "$DIR" ${BW_FLAG[@]+"${BW_FLAG[@]}"} ;;
        package)
            package ;;
    esac
done

echo
echo "== summary ($DIR/summary.txt)"
cat "$SUMMARY"
"$PY" - "$DIR" <<'EOF' | tee -a "$SUMMARY"
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(path.read_text())
    except ValueError:
        continue
    if r.get("benchmark") not in ("engine", "rwkv-package"):
        continue
    c = r["conditions"]
    head = f"{r['benchmark']:12s} {c['size']:5s} {c.get('backend', c.get('strategy', '')):8s} {c.get('cuda_graphs', c.get('cuda_kernel', '')) or '':4s}"
    cells = [f"B{d['batch']} {d['tokens_per_second']:,.0f}" + (f" ({d['roofline_fraction']:.0%})" if d.get("roofline_fraction") else "") for d in r["decode"]]
    cells += [f"P{p['prompt_tokens']} {p['tokens_per_second']:,.0f}" + (f" ({p['roofline_fraction']:.0%})" if p.get("roofline_fraction") else "") for p in r["prefill"]]
    more = "" if r.get("complete", True) else "  [incomplete]"
    print(head, " | ".join(cells), more)
EOF
note "steps failed: $FAILED"
exit $((FAILED > 0))
