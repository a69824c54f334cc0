"""Shared settings and the local (Docker-free) Triton launcher and perf tooling."""
