"""Developer benchmarks and tools, run from the repo root (`python -m bench.<name>`); not installed.

Each prints a table and is recorded in RESULTS.md: `kernels` (GPU kernels vs cuBLAS/SDPA, and the
tile sweep), `kernel_compile` (ahead-of-time compile report), `engine_step` (decode step cost of
determinism), `cpu_serving` (detserve vs llama.cpp on CPU), `gpu_serving` (a random 8B model
through HTTP vs in-process), `gpu_wheels` (the server's packages as wheels for the GPU image),
`quantization_quality` (4-bit vs float), `structured_outputs` (the grammar mask's cost per step),
`scoring` (prompt logprobs of a long prompt), and `gpu_check.sh` (the whole GPU acceptance run). The `detserve bench` clients are in `server/bench/`.
"""
