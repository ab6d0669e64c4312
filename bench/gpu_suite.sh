#!/usr/bin/env bash
# The GPU session in one script (bench/README.md, "GPU session runbook"): gpu-marked tests, kernel and
# engine benchmarks per released size, the `rwkv` package's CUDA path; each step bounded in time, a
# failed step reported and skipped, the whole run kept inside SUITE_BUDGET. Carried wheels (.whl/) are
# installed into /tmp/site first. Results (JSON), logs and summary.txt go to bench/results/gpu-<date>/,
# or, when $OUT is set (the device tool, which returns at most 8 files), to a scratch folder that is
# packed into $OUT/gpu-suite-<date>.tar.gz after every step, beside $OUT/summary.txt and environment.txt.
#
#   bash bench/gpu_suite.sh                      # every step, in priority order (longer than 10 minutes)
#   bash bench/gpu_suite.sh tests kernels        # only these steps, in this order
#   bash bench/gpu_suite.sh --list               # the steps and their time limits
#
# Steps: preflight tests kernels engine-0.1b engine-1.5b engine-2.9b engine-7.2b graphs-off
#        engine-2.9b-sampled package   (preflight always runs first)
# Optional steps, run only when named: engine-2.9b-fp16state (engine-2.9b with --state-dtype float16,
#        the reduced-precision WKV state: compare it with engine-2.9b from the same run), overlap-off
#        (0.1B and 2.9B decode with --overlap off: what overlapping host work with the device buys),
#        host-ceiling (this host's CPU alone on a simulated 5 ms device: engine and gRPC serving ceilings,
#        the engine in the server's process and in one of its own)
# Environment: PYTHON (default python3), RWKVD_COMMIT (the commit, for a tree copied without .git),
# SUITE_BUDGET (seconds for the whole run, default 540 with $OUT set, else 0 = none; a step gets at most
# what is left, one that cannot get 30 s is skipped), WHEEL_SITE (default /tmp/site), BANDWIDTH_GBS
# (HBM GB/s for the rooflines, default from the device table), PACKAGE_SIZES (default "0.1b 1.5b
# 2.9b"), ENGINE_BATCHES (default 1,8,64,256,1024), DECODE_TOKENS (default 64), KERNEL_HEADS (default
# "40 64 12"), T_<STEP> (seconds, e.g. T_TESTS=200, T_ENGINE_7_2B=500) to change a step's limit.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%d-%H%M%S)
SUITE_START=$(date +%s)
if [ -n "${OUT:-}" ]; then
    DIR=/tmp/gpu-suite-$STAMP
    BUDGET=${SUITE_BUDGET:-540}
else
    DIR=bench/results/gpu-$STAMP
    BUDGET=${SUITE_BUDGET:-0}
fi
SUMMARY=$DIR/summary.txt
BATCHES=${ENGINE_BATCHES:-1,8,64,256,1024}
DECODE_TOKENS=${DECODE_TOKENS:-64}
BW_FLAG=()
[ -n "${BANDWIDTH_GBS:-}" ] && BW_FLAG=(--bandwidth "$BANDWIDTH_GBS")
ALL=(tests kernels engine-0.1b engine-1.5b engine-2.9b engine-7.2b graphs-off engine-2.9b-sampled package)
OPTIONAL=(engine-2.9b-fp16state overlap-off host-ceiling) # named on the command line only, never part of the default run

limit() { # the time limit of a step: T_<STEP> overrides the default
    local var="T_$(echo "$1" | tr 'a-z.-' 'A-Z__')"
    echo "${!var:-$2}"
}
declare -A DEFAULT_LIMIT=(
    [preflight]=90 [tests]=300 [kernels]=90 [engine-0.1b]=240 [engine-1.5b]=300 [engine-2.9b]=360
    [engine-7.2b]=540 [graphs-off]=180 [engine-2.9b-sampled]=240 [package]=170 [engine-2.9b-fp16state]=360
    [overlap-off]=300 [host-ceiling]=300
) # kernels: per head count; package: per size and path

if [ "${1:-}" = "--list" ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
    echo
    for s in preflight "${ALL[@]}"; do printf '  %-22s %4ss\n' "$s" "$(limit "$s" "${DEFAULT_LIMIT[$s]}")"; done
    for s in "${OPTIONAL[@]}"; do printf '  %-22s %4ss  (optional: only when named)\n' "$s" "$(limit "$s" "${DEFAULT_LIMIT[$s]}")"; done
    exit 0
fi
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL[@]}")
for s in "${STEPS[@]}"; do
    [ -n "${DEFAULT_LIMIT[$s]:-}" ] || { echo "unknown step: $s (bash $0 --list)"; exit 2; }
done
mkdir -p "$DIR/logs"

FAILED=0
SKIPPED=0
note() { echo "$*" | tee -a "$SUMMARY"; }

publish() { # with $OUT: the run so far, packed (the device tool returns at most 8 files, 2 folders deep)
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    cp "$SUMMARY" "$OUT/summary.txt" 2>/dev/null
    cp "$DIR/environment.txt" "$OUT/environment.txt" 2>/dev/null
    tar -czf "$OUT/.gpu-suite.tmp" -C "$DIR" . 2>/dev/null && mv -f "$OUT/.gpu-suite.tmp" "$OUT/gpu-suite-$STAMP.tar.gz"
}

left() { # seconds left in SUITE_BUDGET (a large number without one)
    if [ "$BUDGET" -gt 0 ]; then echo $((BUDGET - ($(date +%s) - SUITE_START))); else echo 999999; fi
}

run() { # run NAME CMD...: one bounded command, its output in logs/NAME.log; records ok / FAILED / TIMEOUT / SKIPPED
    local name=$1 secs rc start status remaining
    shift
    secs=$(limit "$CURRENT" "${DEFAULT_LIMIT[$CURRENT]}")
    remaining=$(($(left) - 25)) # room for the interrupt's grace period, the summary and the archive
    if [ "$remaining" -lt 30 ]; then
        note "$(printf '%-30s %-12s %5ss  %s' "$name" SKIPPED 0 "no time left in SUITE_BUDGET=${BUDGET}s")"
        SKIPPED=$((SKIPPED + 1))
        return 125
    fi
    [ "$secs" -gt "$remaining" ] && secs=$remaining
    start=$(date +%s)
    echo "== $name (limit ${secs}s): $*"
    timeout --signal=INT --kill-after=15 "$secs" "$@" >"$DIR/logs/$name.log" 2>&1
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
    publish
    return $rc
}

setup_python() { # carried wheels into $WHEEL_SITE; PYTHONPATH = repo root, clients/ (the rwkvd stubs), wheels
    local site=${WHEEL_SITE:-/tmp/site} wheels=() key
    shopt -s nullglob
    wheels=(.whl/*.whl)
    shopt -u nullglob
    export PYTHONPATH="$ROOT:$ROOT/clients${PYTHONPATH:+:$PYTHONPATH}"
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "wheels: none carried (.whl/ absent): the image's own packages only"
        return 0
    fi
    key=$(printf '%s\n' "${wheels[@]}" | sort | md5sum | cut -c1-32)
    if [ "$(cat "$site/.carried" 2>/dev/null)" = "$key" ]; then
        echo "wheels: ${#wheels[@]} already in $site"
    else
        rm -rf "$site"
        if timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "${wheels[@]}" >"$DIR/logs/wheels.log" 2>&1; then
            echo "$key" >"$site/.carried"
            echo "wheels: ${#wheels[@]} installed into $site"
        else
            echo "wheels: install FAILED (logs/wheels.log): $(tail -n 2 "$DIR/logs/wheels.log" | tr '\n' ' ')"
            return 0
        fi
    fi
    export PYTHONPATH="$ROOT:$ROOT/clients:$site${PYTHONPATH#"$ROOT:$ROOT/clients"}"
}

preflight() {
    {
        echo "date: $(date -u +%FT%TZ)  commit: ${RWKVD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
        setup_python
        echo "PYTHONPATH=$PYTHONPATH"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1 || echo "nvidia-smi: not found"
        # One interpreter for every import the entry points need (each failure: its last line).
        RWKV_V7_ON=1 RWKV_CUDA_ON=0 RWKV_JIT_ON=1 timeout 120 "$PY" - <<'EOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
checks = [  # (module, what needs it)
    ("torch", "everything"), ("triton", "the triton backend, kernels"), ("numpy", "torch"),
    ("safetensors", "checkpoints"), ("pytest", "tests"), ("pytest_asyncio", "async gpu test (asyncio_mode=auto)"),
    ("pytest_timeout", "pyproject timeout=300"), ("google.protobuf", "stubs (gencode 7.35.1)"),
    ("grpc", "stubs (need grpcio>=1.85.1)"), ("rwkvd.v1.completions_pb2_grpc", "service.app (carry clients/rwkvd/v1)"),
    ("pydantic", "fastapi"), ("fastapi", "service.app"), ("uvicorn", "service.app"),
    ("pyrwkv_tokenizer", "build_engine: bench/engine.py, engine tests"),
    ("service.engine.local", "bench/engine.py, bench/kernels.py"), ("service.app", "tests/conftest.py"),
    ("fla.ops.rwkv7", "bench/kernels.py side by side"), ("rwkv.model", "bench/rwkv_package.py"),
]
failed = []
for name, why in checks:
    try:
        mod = importlib.import_module(name)
    except BaseException as e:  # noqa: BLE001 - report anything
        failed.append(name)
        print(f"module {name}: MISSING ({why}): {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}")
        continue
    version = getattr(mod, "__version__", None) or getattr(sys.modules[name.split(".")[0]], "__version__", "")
    print(f"module {name}: yes {version} {(getattr(mod, '__file__', '') or '')}")
try:
    import torch
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("torch", torch.__version__, "cuda", torch.version.cuda, "device", p.name, f"{p.total_memory / 2**30:.1f} GiB",
              p.multi_processor_count, "SMs")
    else:
        print("torch", torch.__version__, "cuda", torch.version.cuda, "NO CUDA DEVICE")
except BaseException as e:  # noqa: BLE001
    print("torch: FAILED", e)
print("imports that fail:", ", ".join(failed) if failed else "none")
EOF
        if command -v nvcc >/dev/null; then
            echo "nvcc: $(nvcc --version | tail -n 1)"
            # The rwkv package's and Albatross' kernels are built with these flags; newer nvcc may reject some.
            printf '__global__ void k(float *x) { x[threadIdx.x] += 1.f; }\n' >/tmp/rwkvd-flags.cu
            if nvcc -c -res-usage --use_fast_math -O3 -Xptxas -O3 --extra-device-vectorization /tmp/rwkvd-flags.cu \
                -o /tmp/rwkvd-flags.o >/tmp/rwkvd-flags.log 2>&1; then
                echo "nvcc accepts -res-usage --extra-device-vectorization: yes"
            else
                echo "nvcc accepts -res-usage --extra-device-vectorization: NO ($(grep -m1 -i 'fatal\|error' /tmp/rwkvd-flags.log))"
            fi
        else
            echo "nvcc: MISSING (the rwkv package's CUDA kernel cannot be built)"
        fi
        command -v ninja >/dev/null && echo "ninja: yes" || echo "ninja: MISSING"
    } >"$DIR/environment.txt" 2>&1
    cat "$DIR/environment.txt"
    publish
    grep -q "^torch .* device " "$DIR/environment.txt"
}

engine() { # engine NAME SIZE [extra flags]
    local name=$1 size=$2
    shift 2
    run "$name" "$PY" bench/engine.py --size "$size" --device cuda --dtype float16 --batch "$BATCHES" \
        --prompt-lens 1024,8192 --temperature 0 --decode-tokens "$DECODE_TOKENS" --out-dir "$DIR" ${BW_FLAG[@]+"${BW_FLAG[@]}"} "$@"
}

package() {
    if ! grep -q "^module rwkv.model: yes" "$DIR/environment.txt"; then
        note "$(printf '%-30s %-12s' package SKIPPED) the rwkv package does not import (environment.txt)"
        SKIPPED=$((SKIPPED + 1))
        return
    fi
    local cuda_on=1 size rc
    for size in ${PACKAGE_SIZES:-0.1b 1.5b 2.9b}; do
        if [ $cuda_on = 1 ]; then
            RWKV_CUDA_ON=1 run "package-$size-cudakernel" "$PY" bench/rwkv_package.py --size "$size" \
                --device cuda --dtype fp16 --prompt-lens 1024,8192 --out-dir "$DIR"
            rc=$?
            [ $rc = 125 ] && return
            if [ $rc != 0 ]; then
                note "    the package's CUDA kernel failed (build or run, see logs/package-$size-cudakernel.log): its torch path instead"
                cuda_on=0
            fi
        fi
        if [ $cuda_on = 0 ]; then
            RWKV_CUDA_ON=0 run "package-$size-torch" "$PY" bench/rwkv_package.py --size "$size" --device cuda --dtype fp16 \
                --prompt-lens 1024,8192 --out-dir "$DIR"
            [ $? = 125 ] && return
        fi
    done
}

note "GPU suite $STAMP: steps ${STEPS[*]} -> $DIR${OUT:+ (packed into \$OUT/gpu-suite-$STAMP.tar.gz)}; budget ${BUDGET}s"
CURRENT=preflight
if ! preflight; then
    note "preflight: no CUDA device visible to torch; nothing to run"
    publish
    exit 1
fi
for step in "${STEPS[@]}"; do
    CURRENT=$step
    case $step in
        tests)
            # Only the modules with gpu-marked tests: collecting the whole tree would import every
            # module's dependencies (openai, schemathesis, ...), which the device image lacks.
            # The CUDA-graph tests last: their deliberate capture failure can leave torch's allocator unwell.
            mapfile -t GPU_TESTS < <(grep -rlE 'mark\.gpu\b' tests --include='test_*.py' | sort | grep -v test_cuda_graphs
                grep -lE 'mark\.gpu\b' tests/engine/test_cuda_graphs.py)
            RWKVD_TEST_GPU=1 run tests "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs --continue-on-collection-errors \
                --junitxml="$DIR/tests-gpu.xml" "${GPU_TESTS[@]}" ;;
        kernels)
            for heads in ${KERNEL_HEADS:-40 64 12}; do
                run "kernels-h$heads" "$PY" bench/kernels.py --heads "$heads" --batch 1,64,256,1024 --prefill 1024,8192 \
                    --out "$DIR/kernels-h$heads-$STAMP.json"
                [ $? = 125 ] && break
            done ;;
        engine-0.1b | engine-1.5b | engine-2.9b | engine-7.2b)
            engine "$step" "${step#engine-}" ;;
        graphs-off)
            engine graphs-off-0.1b 0.1b --cuda-graphs off --batch 1,8,64 --prompt-lens 1024 ;;
        overlap-off)
            # What overlapping host work with the device buys, where host time matters most: many rows,
            # short steps (compare with engine-0.1b / engine-2.9b at the same batches).
            engine overlap-off-0.1b 0.1b --overlap off --batch 64,256,1024 --prompt-lens 1024 &&
                engine overlap-off-2.9b 2.9b --overlap off --batch 64,256 --prompt-lens 1024 ;;
        host-ceiling)
            # No GPU work: the engine's and the front end's own ceilings on this host's cores
            # (bench/simulated_device.py), beside the 2-core VM's figures in bench/README.md.
            run host-ceiling-engine "$PY" bench/engine.py --size tiny --device cpu --threads 1 --batch 64,256,1024 \
                --prompt-lens 16 --temperature 0 --decode-tokens 64 --simulate-device-ms 5 --overlap on \
                --out-dir "$DIR" &&
                for where in off on; do # the engine in the server's process, then in a process of its own
                    run "host-ceiling-serve-engine-process-$where" "$PY" bench/serve.py --protocol grpc \
                        --simulate-device-ms 5 --concurrency 64,256 --num-prompts 512 --warmup 16 --input-tokens 32 \
                        --output-tokens 128 --client-processes 4 \
                        --server-args "--max-batch-size 256 --threads 1 --overlap on --device cpu --engine-process $where" \
                        --out "$DIR/serve-grpc-host-ceiling-engine-process-$where-$STAMP.json" || break
                done ;;
        engine-2.9b-fp16state)
            # Same points as engine-2.9b (greedy, $BATCHES, prefill 1024 and 8192), the WKV state in fp16.
            engine "$step" 2.9b --state-dtype float16 ;;
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
    state = c.get("state_dtype", "float32").split(" ")[0]
    if state != "float32":  # a reduced-precision WKV state (--state-dtype): never to be read as the default's figures
        head += f" [{state} state]"
    cells = [f"B{d['batch']} {d['tokens_per_second']:,.0f}" + (f" ({d['roofline_fraction']:.0%})" if d.get("roofline_fraction") else "") for d in r["decode"]]
    cells += [f"P{p['prompt_tokens']} {p['tokens_per_second']:,.0f}" + (f" ({p['roofline_fraction']:.0%})" if p.get("roofline_fraction") else "") for p in r["prefill"]]
    more = "" if r.get("complete", True) else "  [incomplete]"
    print(head, " | ".join(cells), more)
EOF
note "steps failed: $FAILED, skipped: $SKIPPED, suite wall time: $(($(date +%s) - SUITE_START))s"
publish
exit $((FAILED > 0))
