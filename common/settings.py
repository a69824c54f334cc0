"""The one settings object, read from environment variables.

Every process (export, the Triton launcher, the proxy, the tests and the benchmarks) reads its
ports, paths, limits and model names from here, so no value is restated between them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common import contract

PROJECT_ROOT = Path(__file__).resolve().parent.parent

OFFICIAL_CHECKPOINT_URL = (
    "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"
)
# SHA-256 of the official weights/mobile_sam.pt (40,728,226 bytes).
OFFICIAL_CHECKPOINT_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- model export -------------------------------------------------------------------
    mobilesam_checkpoint: str = Field(
        default=OFFICIAL_CHECKPOINT_URL,
        description="Local path or http(s) URL of a MobileSAM (vit_t) state_dict checkpoint.",
    )
    mobilesam_checkpoint_sha256: str | None = Field(
        default=None,
        description="Expected SHA-256 of a downloaded checkpoint (known for the official URL).",
    )
    checkpoint_cache_dir: Path = Field(default=Path.home() / ".cache" / "mobilesam-triton")

    # --- the precision profile -------------------------------------------------------------
    # The one switch between the exact and the fast profile. Triton's model stubs inherit it
    # from Triton's environment (model_repository/*/1/model.py reads PRECISION); the proxy
    # keys its embedding cache by it (embeddings of two profiles differ).
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="fp32: the models as configured in model_repository/ (exact); bf16: the "
        "fast profile, both models on OpenVINO with bf16 arithmetic (AVX512-BF16 or AMX; a CPU "
        "without them computes fp32).",
    )

    # --- Triton -------------------------------------------------------------------------
    model_repository: Path = Field(default=PROJECT_ROOT / "model_repository")
    encoder_model: str = contract.ENCODER_MODEL
    decoder_model: str = contract.DECODER_MODEL
    triton_host: str = "127.0.0.1"
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_ready_timeout_s: float = 120.0

    triton_timeout_s: float = Field(
        default=120.0,
        description="Deadline of one Triton call: a hung Triton, not a slow request (a "
        "256-prompt decoder call queued behind others takes a minute on 2 cores).",
    )
    triton_retry_after_s: int = Field(default=2, description="Retry-After when Triton is busy.")
    # Several Tritons (proxy/endpoints.py): a name resolving to several addresses (a headless
    # Kubernetes Service) is one endpoint per address, re-resolved at every health check.
    triton_endpoints: str = Field(
        default="",
        description="Comma-separated host:port list; empty: TRITON_HOST:TRITON_HTTP_PORT.",
    )
    triton_health_interval_s: float = Field(
        default=2.0, description="How often each endpoint's readiness is probed (and DNS read)."
    )
    # Decoder tensors through shared memory where Triton can map it (proxy/shm_slots.py); an
    # endpoint on another host or in another container refuses and is sent them over HTTP.
    triton_shared_memory_slots: int = Field(
        default=4,
        ge=0,
        description="Decoder calls at once whose tensors may bypass HTTP; 0: HTTP always.",
    )
    triton_shared_memory_prompts: int = Field(
        default=64,
        ge=1,
        description="Prompts a slot holds the answers of (1 MB each); larger calls use HTTP.",
    )

    # --- proxy --------------------------------------------------------------------------
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8080
    max_upload_bytes: int = Field(default=25 * 1024 * 1024, description="413 above this.")
    max_image_pixels: int = Field(default=40_000_000, description="422 above this (header).")
    max_image_side: int = Field(default=16_384, description="422 above this (header).")
    max_prompts: int = 64
    max_points_per_prompt: int = 32
    prompt_coordinate_margin: float = Field(
        default=0.5,
        description="How far prompts may lie outside the image, as a fraction of its longest side.",
    )
    embedding_cache_bytes: int = Field(
        default=512 * 1024 * 1024, description="LRU budget; one embedding is 4 MiB."
    )
    mask_cache_bytes: int = Field(
        default=64 * 1024 * 1024,
        description="LRU budget of the masks kept for refinement; one mask is 256 KiB.",
    )

    # --- bounded work per request ---------------------------------------------------------
    request_timeout_s: float = Field(
        default=300.0, description="Overall deadline of a request; past it, 504 and no more work."
    )
    max_everything_prompts: int = Field(
        default=5120,
        description="Decoder prompts one segment-everything request may ask for (grid points "
        "x crops): upstream's defaults are 1024, with one crop layer 5120.",
    )
    max_image_bytes_in_flight: int = Field(
        default=512 * 1024 * 1024,
        description="Uploaded and decoded image bytes (3 per pixel) the proxy holds at once "
        "across requests; a request that would exceed it waits up to admission_wait_s, then 503.",
    )
    max_everything_in_flight: int = Field(
        default=2, description="Segment-everything requests running at once; more wait, then 503."
    )
    max_requests_in_flight: int = Field(
        default=64, description="Requests in the proxy at once; past it, 503 at once."
    )
    admission_wait_s: float = Field(
        default=2.0, description="How long a request may wait for room before 503."
    )
    drain_timeout_s: float = Field(
        default=30.0, description="On SIGTERM, how long in-flight requests may finish."
    )
    malloc_arenas: int = Field(
        default=2, description="glibc malloc arenas of the proxy (0: glibc's default, 8 a core)."
    )
    trim_memory: bool = Field(
        default=True,
        description="Give freed memory back to the system after a burst of large images.",
    )

    # --- the shared embedding cache -------------------------------------------------------
    # The shared tier behind the local LRU (proxy/shared_cache.py), for several proxy replicas.
    redis_url: str | None = Field(default=None, description="redis://host:port/db; unset: local.")
    redis_ttl_s: int = Field(default=3600, description="Entry lifetime, renewed on every read.")
    redis_timeout_s: float = Field(default=0.5, description="Deadline of one Redis call.")
    redis_max_entry_bytes: int = Field(
        default=16 * 1024 * 1024, description="Larger entries (big uploads) stay local."
    )

    @property
    def triton_http_url(self) -> str:
        return f"{self.triton_host}:{self.triton_http_port}"

    @property
    def triton_http_endpoints(self) -> list[str]:
        """host:port of every Triton HTTP endpoint the proxy balances over."""
        listed = [part.strip() for part in self.triton_endpoints.split(",") if part.strip()]
        return listed or [self.triton_http_url]

    @property
    def triton_metrics_url(self) -> str:
        return f"http://{self.triton_host}:{self.triton_metrics_port}/metrics"


@lru_cache
def get_settings() -> Settings:
    return Settings()
