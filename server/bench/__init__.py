"""`detserve bench ...`: clients that speak only the public OpenAI API, so they run against any compatible server.

`determinism`: are temperature-0 answers identical under load? `serve`: latency and throughput under
load, with vLLM's serving-benchmark metric names. `soak`: a long mixed load with faults, watching
memory, errors and bits. `common`: what the three share (payloads, streaming client, reports).
These are product code; the developer benchmarks and tools live in the top-level `bench/`.
"""
