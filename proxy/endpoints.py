"""Several Tritons behind one proxy: each call goes to a healthy endpoint, chosen per call.

Behind a Kubernetes ClusterIP Service, a keep-alive connection stays with the pod it first
reached, so a proxy with pooled connections would keep feeding the same Triton while new
replicas sit idle. The proxy balances itself instead:

- each configured `host:port` (`TRITON_ENDPOINTS`, or `TRITON_HOST:TRITON_HTTP_PORT`) is
  resolved to its addresses, one endpoint (and one client) per address; a headless Service
  resolves to its ready pods, so replicas that the autoscaler adds or removes are seen at the
  next resolution;
- a call goes to the healthy endpoint with the fewest calls in flight, ties taken in turn;
- every `TRITON_HEALTH_INTERVAL_S` a background task re-resolves the names and asks each
  endpoint `/v2/health/ready` (ready only once every model is loaded): a failed probe ejects
  the endpoint, a successful one re-admits it;
- a call that cannot reach its endpoint (connection refused or dropped) ejects it at once
  and is tried once more on another endpoint: inference has no side effects, so a repeat is
  safe. Timeouts and Triton's own answers (a full queue, a model error) are not retried.

With no healthy endpoint left, calls still go to the least loaded one, so the caller gets the
real failure (a 503) rather than a made-up one, and a restarted Triton serves again at once.
`EndpointPool` offers the methods of tritonclient's aio client that the gateway uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import tritonclient.http.aio as triton_http

from proxy.metrics import ProxyMetrics

log = logging.getLogger("proxy.endpoints")

T = TypeVar("T")
Method = Callable[["Endpoint"], Awaitable[T]]
# How many endpoints one call may try: its own, then one other.
ATTEMPTS = 2


def split_host_port(target: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"Triton endpoint {target!r} is not host:port")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def unreachable(error: BaseException) -> bool:
    """The endpoint could not be reached or dropped the connection (not a timeout)."""
    if isinstance(error, TimeoutError):
        return False
    return isinstance(error, aiohttp.ClientConnectionError | OSError)


@dataclass(eq=False)
class Endpoint:
    address: str  # host:port, as the client connects to it
    client: triton_http.InferenceServerClient
    healthy: bool = True
    in_flight: int = 0
    retired: bool = field(default=False, repr=False)


class EndpointPool:
    def __init__(
        self,
        targets: list[str],
        call_timeout_s: float,
        health_interval_s: float,
        metrics: ProxyMetrics,
    ) -> None:
        self.targets = [split_host_port(target) for target in targets]
        self.call_timeout_s = call_timeout_s
        self.health_interval_s = health_interval_s
        self.probe_timeout_s = min(2.0, max(health_interval_s, 0.1))
        self.metrics = metrics
        # target -> its endpoints, in resolution order
        self._endpoints: dict[tuple[str, int], list[Endpoint]] = {
            target: [self._new_endpoint(join_host_port(*target))] for target in self.targets
        }
        self._turn = 0
        self._refreshing: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._closed = False
        self._publish()

    # --- the client's methods, balanced ----------------------------------------------------

    async def infer(self, *args: Any, **kwargs: Any) -> Any:
        return await self.dispatch(lambda endpoint: endpoint.client.infer(*args, **kwargs))

    async def get_model_metadata(self, *args: Any, **kwargs: Any) -> Any:
        return await self.dispatch(
            lambda endpoint: endpoint.client.get_model_metadata(*args, **kwargs)
        )

    async def is_model_ready(self, *args: Any, **kwargs: Any) -> bool:
        return await self.dispatch(lambda endpoint: endpoint.client.is_model_ready(*args, **kwargs))

    async def is_server_ready(self) -> bool:
        """Probes every endpoint now; ready when at least one is."""
        self._start_monitor()
        await self.refresh()
        return any(endpoint.healthy for endpoint in self.endpoints())

    async def close(self) -> None:
        self._closed = True
        for task in (self._monitor, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for endpoint in self.endpoints():
            await endpoint.client.close()

    # --- choosing an endpoint ----------------------------------------------------------------

    def endpoints(self) -> list[Endpoint]:
        return [endpoint for group in self._endpoints.values() for endpoint in group]

    def choose(self, exclude: Collection[Endpoint] = ()) -> Endpoint | None:
        """The healthy endpoint with the fewest calls in flight (ties in turn); if none is
        healthy, the least loaded of the others."""
        candidates = [e for e in self.endpoints() if e not in exclude]
        if not candidates:
            return None
        healthy = [e for e in candidates if e.healthy] or candidates
        self._turn = (self._turn + 1) % len(healthy)
        rotated = healthy[self._turn :] + healthy[: self._turn]
        return min(rotated, key=lambda endpoint: endpoint.in_flight)

    async def dispatch(self, method: Method[T]) -> T:
        """`method(endpoint)` on the chosen endpoint, tried once more elsewhere if unreachable."""
        self._start_monitor()
        tried: set[Endpoint] = set()
        while True:
            endpoint = self.choose(tried)
            assert endpoint is not None, "a pool always has an endpoint"
            tried.add(endpoint)
            endpoint.in_flight += 1
            try:
                return await method(endpoint)
            except Exception as error:
                if not unreachable(error):
                    raise
                self._eject(endpoint, error)
                others = [e for e in self.endpoints() if e not in tried]
                if len(tried) >= ATTEMPTS or not others:
                    raise
            finally:
                endpoint.in_flight -= 1
                if endpoint.retired and endpoint.in_flight == 0:
                    await endpoint.client.close()

    # --- health and discovery ----------------------------------------------------------------

    def _start_monitor(self) -> None:
        if self._monitor is None and not self._closed:
            self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a probe round must never end the monitor
                log.exception("Triton endpoint refresh failed")
            await asyncio.sleep(self.health_interval_s)

    async def refresh(self) -> None:
        """Re-resolve the names and probe every endpoint; concurrent callers share one round."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        for target in self.targets:
            await self._resolve(target)
        endpoints = self.endpoints()
        ready = await asyncio.gather(*(self._probe(e) for e in endpoints))
        for endpoint, is_ready in zip(endpoints, ready, strict=True):
            if is_ready and not endpoint.healthy:
                log.warning("Triton endpoint %s is ready: re-admitted", endpoint.address)
            elif not is_ready and endpoint.healthy:
                log.warning("Triton endpoint %s is not ready: ejected", endpoint.address)
                self.metrics.triton_endpoint_ejections.inc()
            endpoint.healthy = is_ready
        self._publish()

    async def _probe(self, endpoint: Endpoint) -> bool:
        try:
            return await asyncio.wait_for(endpoint.client.is_server_ready(), self.probe_timeout_s)
        except Exception:
            return False

    async def _resolve(self, target: tuple[str, int]) -> None:
        """Replace the target's endpoints with one per address it resolves to now; keep them
        when the name does not resolve (a DNS hiccup must not empty the pool)."""
        host, port = target
        if is_address(host):
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as error:
            log.warning("cannot resolve Triton endpoint %s: %s", host, error)
            return
        addresses = list(dict.fromkeys(join_host_port(info[4][0], port) for info in infos))
        current = {endpoint.address: endpoint for endpoint in self._endpoints[target]}
        if list(current) == addresses:
            return
        self._endpoints[target] = [
            current.pop(address, None) or self._new_endpoint(address) for address in addresses
        ]
        for gone in current.values():
            gone.retired = True
            if gone.in_flight == 0:
                await gone.client.close()
        log.info("Triton endpoints for %s: %s", host, ", ".join(addresses))

    def _new_endpoint(self, address: str) -> Endpoint:
        client = triton_http.InferenceServerClient(address, conn_timeout=self.call_timeout_s)
        return Endpoint(address, client)

    def _eject(self, endpoint: Endpoint, error: BaseException) -> None:
        if endpoint.healthy:
            log.warning("Triton endpoint %s unreachable (%s): ejected", endpoint.address, error)
            self.metrics.triton_endpoint_ejections.inc()
        endpoint.healthy = False
        self._publish()

    def _publish(self) -> None:
        endpoints = self.endpoints()
        healthy = sum(endpoint.healthy for endpoint in endpoints)
        self.metrics.triton_endpoints.labels(state="healthy").set(healthy)
        self.metrics.triton_endpoints.labels(state="ejected").set(len(endpoints) - healthy)
