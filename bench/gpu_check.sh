#!/usr/bin/env bash
# GPU acceptance check for the invariant Triton kernels, for a CUDA machine with torch, triton,
# pytest and hypothesis already installed: installs nothing, needs no network and no gguf.
#   1. the `gpu` tests: bf16 invariance at Llama-3-8B shapes and a whole random-weight 8B model;
#   2. the interpreter-sized Triton tests, here compiled for this GPU (fp16/fp32, small tiles);
#   3. bench.kernels: invariant kernels vs cuBLAS / SDPA, timed in the same run;
#   4. bench.kernels --sweep: candidate tilings, each checked invariant, timed against cuBLAS, and the
#      best per weight shape printed as configs.py entries (pin them, then rerun step 3).
# A summary table comes last; the exit status is nonzero if a step failed.
# Usage, from anywhere: bash bench/gpu_check.sh   (PYTHON=/path/to/python to pick the interpreter)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
logs=$(mktemp -d)

"$PYTHON" -c '
import torch, triton
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
' || exit 1

run_step() {  # run_step NAME CMD...: show the output, keep a log and the exit status
    local name=$1
    shift
    echo
    echo "== $name: $* =="
    "$@" 2>&1 | tee "$logs/$name.log"
    echo "${PIPESTATUS[0]}" >"$logs/$name.rc"
}

run_step gpu_tests "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/kernels
run_step compiled_small_tests "$PYTHON" -m pytest -q -p no:cacheprovider -m "not gpu" \
    tests/kernels/test_triton_matmul.py tests/kernels/test_triton_rows.py tests/kernels/test_triton_attention.py \
    tests/kernels/test_triton_elementwise.py
run_step bench "$PYTHON" -m bench.kernels
run_step sweep "$PYTHON" -m bench.kernels --sweep

echo
echo "== gpu_check summary =="
status=0
printf '%-22s %-4s %s\n' step rc result
for name in gpu_tests compiled_small_tests bench sweep; do
    rc=$(cat "$logs/$name.rc")
    [ "$rc" = 0 ] || status=1
    if [ "$name" = bench ] || [ "$name" = sweep ]; then
        result=$([ "$rc" = 0 ] && echo "table below" || tail -n 1 "$logs/$name.log")
    else
        result=$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$logs/$name.log" | tail -n 1)
    fi
    printf '%-22s %-4s %s\n' "$name" "$rc" "$result"
done
sed -n '/^best invariant tiling/,$p' "$logs/sweep.log"
sed -n '/^== summary/,$p' "$logs/bench.log"
exit $status
