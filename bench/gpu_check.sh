#!/usr/bin/env bash
# GPU acceptance check for the invariant Triton kernels, CUDA graphs and serving, for a CUDA machine
# with torch, triton, pytest and hypothesis already installed: needs no network and no gguf, and
# installs nothing but the wheels it is handed in .whl/ (the server's packages, for `serve`).
# Steps, in order (name them as arguments to run a subset, e.g. to fit a 10-minute call):
#   gpu_tests             the `gpu` tests: bf16 invariance at Llama-3-8B shapes, sampling over a
#                         Llama-3 vocab, a whole random-weight 8B model alone vs in batches, and
#                         decode steps replayed from CUDA graphs bitwise equal to eager ones;
#   compiled_small_tests  the interpreter-sized Triton tests, here compiled for this GPU;
#   bench                 bench.kernels: invariant kernels vs cuBLAS / SDPA, eager and in CUDA graphs,
#                         and decode attention as a share of the measured HBM bandwidth;
#   sweep                 bench.kernels --sweep: candidate tilings, each checked invariant, timed
#                         against cuBLAS, the best per weight shape printed as configs.py entries
#                         (pin them, then rerun `bench`);
#   engine                bench.engine_step: whole-engine decode steps of a random 8B model, invariant
#                         vs fast, at batch 1, 16, 64 and 256, in CUDA graphs, with the weight-read floor;
#   engine_eager          the same with --enforce-eager (every step launched from Python);
#   serve                 bench.gpu_serving: `detserve serve` of a random 8B model through HTTP vs the
#                         engine in-process, deterministic and fast, at concurrency 1, 16 and 64 (the
#                         server's packages come from .whl/: see below).
#   moe                   (not run unless named) bench.engine_step on a random Qwen3-30B-A3B-shaped
#                         mixture of experts (bench/configs/qwen3-moe-30b-a3b.json), batch 1, 16, 64:
#                         the grouped expert matmul against fast mode's cuBLAS call per expert.
#   tp                    (not run unless named; needs 2 GPUs, skips otherwise) NCCL tensor parallelism:
#                         a random model's deterministic bits at TP 1 vs TP 2 (S = 2), and
#                         bench.tensor_parallel's decode tok/s at TP 1 and 2.
# A summary table comes last; the exit status is nonzero if a step failed.
# Usage, from anywhere: bash bench/gpu_check.sh [STEP...]
#   PYTHON=/path/to/python picks the interpreter; GPU_CHECK_LOGS=DIR keeps each step's full log there.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
# The checkout's layers importable as the `detserve` package without installing it: a namespace
# folder of links, as pyproject.toml maps the same folders (bench/ and tests/ import from $PWD).
namespace=$(mktemp -d)
mkdir "$namespace/detserve"
for layer in server engine kernels; do ln -s "$PWD/$layer" "$namespace/detserve/$layer"; done
export PYTHONPATH="$PWD:$namespace${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The server's packages, which the GPU image lacks (fastapi, uvicorn, pydantic, httpx2, ...), travel as
# wheels in .whl/ (`python -m bench.gpu_wheels` fetches them where an index is reachable; the device
# call carries .whl): installed into a temporary folder ahead of the image's own packages.
if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:$site"
fi
logs=${GPU_CHECK_LOGS:-$(mktemp -d)}
mkdir -p "$logs"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(gpu_tests compiled_small_tests bench sweep engine engine_eager serve)
for step in "${steps[@]}"; do
    case $step in
        gpu_tests | compiled_small_tests | bench | sweep | engine | engine_eager | serve | moe | tp) ;;
        *) echo "unknown step $step (steps: gpu_tests compiled_small_tests bench sweep engine engine_eager serve" \
                "moe tp)" >&2; exit 2 ;;
    esac
done

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

for step in "${steps[@]}"; do
    case $step in
        gpu_tests) run_step "$step" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/kernels \
            tests/engine/test_cuda_graphs.py ;;
        compiled_small_tests) run_step "$step" "$PYTHON" -m pytest -q -p no:cacheprovider -m "not gpu" \
            tests/kernels/test_triton_matmul.py tests/kernels/test_triton_rows.py \
            tests/kernels/test_triton_attention.py tests/kernels/test_triton_elementwise.py \
            tests/kernels/test_triton_grouped_matmul.py ;;
        bench) run_step "$step" "$PYTHON" -m bench.kernels ;;
        sweep) run_step "$step" "$PYTHON" -m bench.kernels --sweep ;;
        engine) run_step "$step" "$PYTHON" -m bench.engine_step ;;
        engine_eager) run_step "$step" "$PYTHON" -m bench.engine_step --enforce-eager ;;
        serve) if "$PYTHON" -c "import fastapi, uvicorn, httpx2, pydantic" 2>/dev/null; then
                run_step "$step" "$PYTHON" -m bench.gpu_serving
            else
                echo "== serve: the server's packages are missing: run python -m bench.gpu_wheels where an index" \
                    "is reachable, and carry .whl ==" | tee "$logs/$step.log"
                echo 1 >"$logs/$step.rc"
            fi ;;
        moe) run_step "$step" "$PYTHON" -m bench.engine_step --config bench/configs/qwen3-moe-30b-a3b.json \
            --batch-sizes 1,16,64 --prompt-tokens 256 --steps 10 ;;
        tp) if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
                run_step "$step" bash -c "'$PYTHON' -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_tensor_parallel.py \
                    && '$PYTHON' -m bench.tensor_parallel --runs 1:1,1:2,2:2 --config bench/configs/llama-3-8b.json"
            else
                echo "== tp: skipped (one GPU) ==" | tee "$logs/$step.log"
                echo 0 >"$logs/$step.rc"
            fi ;;
    esac
done

echo
echo "== gpu_check summary =="
status=0
printf '%-22s %-4s %s\n' step rc result
for name in "${steps[@]}"; do
    rc=$(cat "$logs/$name.rc")
    [ "$rc" = 0 ] || status=1
    case $name in
        tp) result=$(grep -E 'skipped \(one GPU\)|[0-9]+ (passed|failed)' "$logs/$name.log" | tail -n 1) ;;
        *tests) result=$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$logs/$name.log" | tail -n 1) ;;
        *) result=$([ "$rc" = 0 ] && echo "table below" || tail -n 1 "$logs/$name.log") ;;
    esac
    printf '%-22s %-4s %s\n' "$name" "$rc" "$result"
done
for name in "${steps[@]}"; do
    case $name in
        sweep) sed -n -e '/^== attention sweep/,/^$/p' -e '/^best invariant tiling/,$p' "$logs/sweep.log" ;;
        bench) sed -n '/^== summary/,$p' "$logs/bench.log" ;;
        engine | engine_eager | moe) sed -n '/^weights read per decode step/p; /^== engine decode step/,$p' \
            "$logs/$name.log" ;;
        serve) sed -n '/^== output tokens\/s/,$p' "$logs/serve.log" ;;
    esac
done
exit $status
