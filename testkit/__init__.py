"""What the tests and the benchmarks share, never imported by the product: free ports, server
subprocesses, model-repository copies and real photographs."""
