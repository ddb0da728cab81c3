"""Client-side benchmarks that speak only the public OpenAI API, so they run against any compatible server.

`bench.determinism`: are temperature-0 answers identical under load? `bench.serve`: latency and
throughput under load, with vLLM's serving-benchmark metric names.
"""
