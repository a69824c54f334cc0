"""The Docker-free launcher: the real tritonserver from the PyTriton wheel, then the proxy."""
