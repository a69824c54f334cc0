"""Prometheus metrics of the proxy (Triton serves its own on its metrics port).

Each app gets its own registry, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "proxy_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "proxy_request_duration_seconds",
            "HTTP request latency by route.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.triton_latency = Histogram(
            "proxy_triton_call_duration_seconds",
            "Triton call latency by model and outcome.",
            ["model", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tensor_transport = Counter(
            "proxy_decoder_calls_by_transport",
            "Decoder calls by how their tensors travelled: shared_memory or http.",
            ["transport"],
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "proxy_embedding_cache_lookups",
            "Embedding cache lookups by result.",
            ["result"],
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "proxy_embedding_cache_bytes",
            "Bytes held by the embedding cache.",
            registry=self.registry,
        )
        self.requests_in_flight = Gauge(
            "proxy_requests_in_flight",
            "Requests being served (health, readiness and metrics excepted).",
            registry=self.registry,
        )
        self.refused = Counter(
            "proxy_requests_refused",
            "Requests refused with 503 before any work, by the limit they hit.",
            ["reason"],
            registry=self.registry,
        )
        self.abandoned = Counter(
            "proxy_requests_abandoned",
            "Requests whose work was stopped: the client left, or the deadline passed.",
            ["reason"],
            registry=self.registry,
        )
        self.admission_in_use = Gauge(
            "proxy_admission_in_use",
            "Units of each admission budget held by requests in flight.",
            ["budget"],
            registry=self.registry,
        )
        self.cache_entries = Gauge(
            "proxy_embedding_cache_entries",
            "Images held by the embedding cache.",
            registry=self.registry,
        )
        # Several Tritons (proxy/endpoints.py)
        self.triton_endpoints = Gauge(
            "proxy_triton_endpoints",
            "Triton endpoints known to the proxy, by state (healthy or ejected).",
            ["state"],
            registry=self.registry,
        )
        self.triton_endpoint_ejections = Counter(
            "proxy_triton_endpoint_ejections",
            "Triton endpoints taken out of rotation (failed probe or unreachable).",
            registry=self.registry,
        )
        # The shared embedding cache (proxy/shared_cache.py)
        self.shared_cache_lookups = Counter(
            "proxy_shared_cache_lookups",
            "Shared (Redis) cache lookups after a local miss that Redis answered, by result.",
            ["result"],
            registry=self.registry,
        )
        self.shared_mask_lookups = Counter(
            "proxy_shared_mask_lookups",
            "Shared (Redis) lookups of a mask_id after a local miss that Redis answered, "
            "by result.",
            ["result"],
            registry=self.registry,
        )
        self.shared_cache_errors = Counter(
            "proxy_shared_cache_errors",
            "Failed shared-cache calls (unreachable, timed out, unreadable entry), by operation "
            "(load, store, load_mask, store_masks); the proxy then serves from its local cache.",
            ["operation"],
            registry=self.registry,
        )
        self.shared_cache_skips = Counter(
            "proxy_shared_cache_skips",
            "Shared-cache calls not made, by reason (backoff after an error, entry too large).",
            ["reason"],
            registry=self.registry,
        )
