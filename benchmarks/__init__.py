"""`python -m benchmarks` (`make bench`): how fast the service is, measured side by side.

Triton sweeps (perf_analyzer on variants of the model repository), the end-to-end load
generator against the proxy, the in-process PyTorch comparison (`baseline_pytorch`), a matmul
peak, and a report writer that regenerates BENCHMARKS.md from the raw JSON in build/bench/.
Nothing here is imported by the product: it only drives it from outside.
"""
