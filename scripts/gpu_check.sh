#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run of at most ~8 minutes (each part under its
# own timeout, and they add up to 665 s at worst, 545 s without fuzz), so that one scarce
# GPU session proves the Triton kernel:
#
#   parity    tests/test_kernel_parity.py: Triton on the GPU stores the numba CPU
#             kernel's bits (every dtype, state precision, master-weight/rounding mode)
#   ptx       tests/test_triton_compile.py with this machine's Triton (IEEE arithmetic,
#             vector loads in the sm_90 PTX)
#   cuda      tests/test_cuda.py (default backend, CUDA graphs, GradScaler, torch fused),
#             the torch.compile tests on CUDA, and the whole conformance matrix on CUDA
#             (every CUDA backend against the NumPy reference)
#   fuzz      the hostile-use fuzzer on CUDA (tests/hostile_fuzz.py triton 30 cuda: the sweep, 30 random):
#             user mutations between steps on CUDA params; an access outside a tensor is
#             a CUDA error that fails the part (the memory-safety issue)
#   bench     benchmarks/bench_gpu.py: cases a, b, c (fp32 ~1B, 10,000 tensors, bf16)
#   sweep     benchmarks/bench_gpu.py --sweep: the kernel's launch shapes, fp32, int8 and int4
#   quant     benchmarks/bench_gpu.py: case d (int8/int4 against torch fused,
#             bitsandbytes and torchao where importable; torchao compiles per shape)
#   cli       adamkit bench --device cuda
#   peers     benchmarks/peers_gpu.py: evidence that bitsandbytes' and torchao's fast paths ran
#             (the native CUDA library, no dynamo recompiles in the timed rounds, the kernels a
#             step launches) and each contender's host, device and wall time per step
#   latency   benchmarks/first_step_latency.py --device cuda: the first step() in a fresh
#             process with an empty and with a warm Triton cache (fp32, bf16 + fp32 masters,
#             int8); the dry run times the CPU kernel's
#   host      benchmarks/bench_cpu.py and bench_quantized.py on the machine's host cores: the
#             CPU kernel (fp32, int8, int4) against torch's fused CPU AdamW, the host step
#             offload runs on (runs on CPU alike: no GPU needed)
#   offload   offload="cpu" (issue 36): tests/test_offload.py and test_offload_timing.py with CUDA params (offloaded runs
#             equal Triton-resident runs bit for bit), then benchmarks/bench_offload.py: a ~1B
#             GPT-like model, resident vs offloaded (fp32 and int8 host states) vs torchao's
#             CPUOffloadOptimizer, peak memory and step time against their parts
#
# peers, latency, host and offload are not in the default list (which stays within ~8
# minutes): name them in runs of their own, e.g. `bash scripts/gpu_check.sh peers latency
# host` (up to 150 + 150 + 240 s) and `bash scripts/gpu_check.sh offload` (up to 480 s).
#
# parity and ptx start first, in the background (their CPU side, numba's and Triton's
# compilers, overlaps the GPU tests); the benchmarks run alone after the tests.
# Installs nothing.  It expects a Python with torch, triton, numba and pytest (as on
# the lent GPU machines; pytest-xdist is used where present) and runs adamkit from
# src/.  bitsandbytes and torchao are taken from .gpu-site/ when that folder exists
# (the GPU machines cannot download: `bash scripts/gpu_check.sh prepare` fills it here).
#
#   bash scripts/gpu_check.sh                       # every part; logs to $OUT or /tmp/adamkit-gpu
#   bash scripts/gpu_check.sh --logs DIR cuda bench # some parts, logs to DIR
#   bash scripts/gpu_check.sh prepare               # (with network) fill .gpu-site/
#
# Without a CUDA device it is a dry run: the test parts run on the CPU (Triton under
# its interpreter) and the GPU-only parts are skipped.  summary.txt (one screen) says,
# per part, PASS / FAIL / TIMEOUT / SKIP, its seconds and its last lines.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-/tmp/adamkit-gpu}
if [[ ${1:-} == --logs ]]; then LOGS=$2; shift 2; fi
PARTS=("$@")
[[ ${#PARTS[@]} -eq 0 ]] && PARTS=(parity ptx cuda fuzz bench sweep quant cli)

if [[ ${PARTS[0]} == prepare ]]; then  # bitsandbytes (its CUDA 13 library only), torchao, hypothesis (the fuzzer) and schedulefree (an oracle), unpacked
    rm -rf .gpu-site /tmp/adamkit-wheels && mkdir -p .gpu-site /tmp/adamkit-wheels
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d /tmp/adamkit-wheels \
        bitsandbytes==0.50.2 torchao==0.18.0 hypothesis==6.170.27 sortedcontainers==2.4.0 attrs==26.1.0 \
        schedulefree==1.4.1 || exit 1
    for wheel in /tmp/adamkit-wheels/*.whl; do "$PYTHON" -m zipfile -e "$wheel" .gpu-site; done
    rm -rf .gpu-site/test  # torchao's wheel carries its tests as a top-level package
    find .gpu-site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
    grep -qx '/.gpu-site/' .git/info/exclude 2>/dev/null || echo '/.gpu-site/' >> .git/info/exclude
    du -sh .gpu-site
    exit 0
fi

mkdir -p "$LOGS"
SUMMARY=$LOGS/summary.txt
STATUS=$(mktemp -d)  # a line per part (the device tool brings back at most 8 files: the logs and the summary)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[[ -d .gpu-site ]] && export PYTHONPATH="$PYTHONPATH:$ROOT/.gpu-site"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/adamkit-triton-cache} NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/adamkit-numba-cache}
START=$SECONDS

if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    export ADAMKIT_TEST_DEVICE=cuda
    GPU=1
else
    export ADAMKIT_TEST_DEVICE=cpu
    GPU=0
fi
XDIST=() PARITY_XDIST=()  # pytest-xdist workers where it is installed (16 cores on the GPU machines)
"$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n 6) PARITY_XDIST=(-n 4)

{
    echo "adamkit GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    "$PYTHON" - <<'EOF'
import torch, triton, numba
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device: dry run on the CPU"
print(f"{name}; torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, numba {numba.__version__}")
for module in ("bitsandbytes", "torchao", "xdist"):
    try:
        print(f"  {module} {__import__(module).__version__}")
    except Exception as error:
        print(f"  {module}: not importable ({type(error).__name__})")
EOF
} > "$SUMMARY" 2>&1

wanted() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }

# run_part NAME SECONDS NEEDS_GPU COMMAND...: the command's output goes to NAME.log; a
# line for the summary goes to NAME.status
run_part() {
    local name=$1 limit=$2 needs_gpu=$3 begin=$SECONDS rc
    shift 3
    if [[ $needs_gpu == 1 && $GPU == 0 ]]; then
        echo "SKIP     $name (needs a GPU)" > "$STATUS/$name.status"
        return 0
    fi
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    local verdict=PASS
    [[ $rc -ne 0 ]] && verdict="FAIL($rc)"
    [[ $rc -eq 124 || $rc -eq 137 ]] && verdict="TIMEOUT(${limit}s)"
    printf '%-8s %s, %ss\n' "$verdict" "$name" "$((SECONDS - begin))" > "$STATUS/$name.status"
    return "$rc"
}

PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -rfE)

declare -A BACKGROUND
if wanted parity; then
    ADAMKIT_PARITY_DUMP="$LOGS/parity-dumps" run_part parity 240 0 "${PYTEST[@]}" "${PARITY_XDIST[@]}" tests/test_kernel_parity.py &
    BACKGROUND[parity]=$!
fi
if wanted ptx; then
    run_part ptx 150 0 "${PYTEST[@]}" tests/test_triton_compile.py &
    BACKGROUND[ptx]=$!
fi
if wanted cuda; then
    run_part cuda 200 1 "${PYTEST[@]}" "${XDIST[@]}" tests/test_cuda.py tests/test_compile.py tests/test_conformance.py
fi
for name in "${!BACKGROUND[@]}"; do wait "${BACKGROUND[$name]}"; done
if wanted fuzz; then  # CUDA params on the GPU; the CPU kernel's guard-page run in a dry run
    if [[ $GPU == 1 ]]; then
        run_part fuzz 120 1 "$PYTHON" tests/hostile_fuzz.py triton 30 cuda
    else
        run_part fuzz 120 0 "$PYTHON" tests/hostile_fuzz.py cpu 100
    fi
fi

wanted bench && run_part bench 90 1 "$PYTHON" benchmarks/bench_gpu.py --cases a,b,c
wanted sweep && run_part sweep 90 1 "$PYTHON" benchmarks/bench_gpu.py --cases "" --sweep fp32,int8,int4
wanted quant && run_part quant 150 1 "$PYTHON" benchmarks/bench_gpu.py --cases d
wanted cli && run_part cli 45 1 "$PYTHON" -m adamkit bench --device cuda
wanted peers && run_part peers 150 1 "$PYTHON" benchmarks/peers_gpu.py
if wanted latency; then
    if [[ $GPU == 1 ]]; then
        run_part latency 150 1 "$PYTHON" benchmarks/first_step_latency.py --device cuda
    else
        run_part latency 150 0 "$PYTHON" benchmarks/first_step_latency.py
    fi
fi
wanted host && run_part host 240 0 bash -c "$PYTHON benchmarks/bench_cpu.py --rounds 10 && $PYTHON benchmarks/bench_quantized.py --rounds 10"
if wanted offload; then  # CUDA params against host states; the dry run: CPU params and a tiny model
    if [[ $GPU == 1 ]]; then
        run_part offload 480 1 bash -c "${PYTEST[*]} ${XDIST[*]} tests/test_offload.py tests/test_offload_timing.py && $PYTHON benchmarks/bench_offload.py"
    else  # (a cold numba cache compiles ~35 CPU-kernel specializations first: about a minute here)
        run_part offload 420 0 bash -c "${PYTEST[*]} ${XDIST[*]} tests/test_offload.py tests/test_offload_timing.py && $PYTHON benchmarks/bench_offload.py"
    fi
fi

status=0
for name in parity ptx cuda fuzz bench sweep quant cli peers latency host offload; do
    wanted "$name" || continue
    cat "$STATUS/$name.status" >> "$SUMMARY"
    grep -q '^PASS\|^SKIP' "$STATUS/$name.status" || status=1
    case $name in
        parity | ptx | cuda | fuzz) [[ -f $LOGS/$name.log ]] && grep -E '^(FAILED|ERROR)|passed|failed|error' "$LOGS/$name.log" | tail -6 | sed 's/^/    /' >> "$SUMMARY" ;;
        peers) [[ -f $LOGS/$name.log ]] && tail -14 "$LOGS/$name.log" | sed 's/^/  /' >> "$SUMMARY" ;;
        latency) [[ -f $LOGS/$name.log ]] && tail -7 "$LOGS/$name.log" | sed 's/^/  /' >> "$SUMMARY" ;;
        host) [[ -f $LOGS/$name.log ]] && grep -E '^\(|^  [a-z]' "$LOGS/$name.log" | grep -v '^  contender' | head -40 | sed 's/^/  /' >> "$SUMMARY" ;;
        offload) [[ -f $LOGS/$name.log ]] && grep -E 'passed|failed|bit for bit|DIFFERS|parts alone|memory bound|^\(|^run' "$LOGS/$name.log" | head -16 | sed 's/^/  /' >> "$SUMMARY" ;;
        bench | sweep | quant) [[ -f $LOGS/$name.log ]] && grep -E '^\(|^  [a-z]' "$LOGS/$name.log" | grep -v '^  contender' | head -40 | sed 's/^/  /' >> "$SUMMARY" ;;
    esac
done
echo "total $((SECONDS - START))s" >> "$SUMMARY"
cat "$SUMMARY"
exit $status
