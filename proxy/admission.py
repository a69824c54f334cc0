"""Admission control: how much work the proxy holds at once, and what waits or is refused.

Two budgets bound the proxy's memory and the load it puts on Triton: image bytes (the upload,
and 3 bytes per pixel once decoded: a 24-megapixel photo is ~70 MB) and segment-everything runs
(each keeps two large decoder calls in flight). A request that does not fit waits, first in
first out, up to `admission_wait_s`, then gets 503 `overloaded` with Retry-After. One request
larger than a whole budget is let in alone rather than refused for ever.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from anyio import to_thread

from common.settings import Settings
from proxy.allocator import release_free_memory
from proxy.errors import Overloaded
from proxy.metrics import ProxyMetrics

# Releasing this much or more, with nothing else held, returns free memory to the system.
TRIM_AFTER_BYTES = 16 * 1024 * 1024


@dataclass
class Reservation:
    """Units held from a budget; `shrink` gives part back early (a transient peak is over)."""

    budget: Budget
    amount: int

    def shrink(self, amount: int) -> None:
        if 0 <= amount < self.amount:
            self.budget.release(self.amount - amount)
            self.amount = amount


@dataclass
class _Waiter:
    amount: int
    granted: asyncio.Future[None]


class Budget:
    """`capacity` units, held by requests for as long as their work lives."""

    def __init__(self, name: str, capacity: int, on_change: Callable[[int], None] | None = None):
        self.name = name
        self.capacity = max(1, capacity)
        self.used = 0
        self._waiters: deque[_Waiter] = deque()
        self._on_change = on_change or (lambda used: None)

    @asynccontextmanager
    async def hold(self, amount: int, wait_s: float) -> AsyncIterator[None]:
        amount = await self.acquire(amount, wait_s)
        try:
            yield
        finally:
            self.release(amount)

    async def acquire(self, amount: int, wait_s: float) -> int:
        """Take `amount` (at most the capacity, which is returned), waiting up to `wait_s`."""
        amount = min(max(amount, 0), self.capacity)
        if not self._waiters and self.used + amount <= self.capacity:
            self._take(amount)
            return amount
        waiter = _Waiter(amount, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter.granted}, timeout=wait_s)
        except BaseException:  # cancelled while waiting (the client left)
            self._withdraw(waiter)
            raise
        if not waiter.granted.done():
            self._withdraw(waiter)
            raise Overloaded(
                f"the proxy is at its limit of {self.capacity} {self.name} in flight; "
                f"retry shortly",
                limit=self.capacity,
                budget=self.name,
            )
        return amount

    def _withdraw(self, waiter: _Waiter) -> None:
        if waiter.granted.done():  # granted just now: give it back
            self.release(waiter.amount)
        else:
            waiter.granted.cancel()
            self._waiters.remove(waiter)
            self._grant()  # those behind it may fit now

    def _take(self, amount: int) -> None:
        self.used += amount
        self._on_change(self.used)

    def release(self, amount: int) -> None:
        self.used -= amount
        self._on_change(self.used)
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0].amount <= self.capacity:
            waiter = self._waiters.popleft()
            self._take(waiter.amount)
            waiter.granted.set_result(None)


class Admission:
    """The proxy's budgets, with their gauges."""

    def __init__(self, settings: Settings, metrics: ProxyMetrics) -> None:
        self.wait_s = settings.admission_wait_s
        self.trim_memory = settings.trim_memory
        self.image_bytes = Budget(
            "image bytes",
            settings.max_image_bytes_in_flight,
            metrics.admission_in_use.labels(budget="image_bytes").set,
        )
        self.everything = Budget(
            "segment-everything runs",
            settings.max_everything_in_flight,
            metrics.admission_in_use.labels(budget="everything").set,
        )
        self.refused = metrics.refused

    @asynccontextmanager
    async def image(self, nbytes: int) -> AsyncIterator[Reservation]:
        """Room for `nbytes` of image data; when the last large image of a burst is released,
        free memory goes back to the system."""
        async with self._counted(self.image_bytes, nbytes, "image_bytes") as reservation:
            yield reservation
        if self.trim_memory and nbytes >= TRIM_AFTER_BYTES and self.image_bytes.used == 0:
            await to_thread.run_sync(release_free_memory)

    def everything_run(self):
        return self._counted(self.everything, 1, "everything")

    @asynccontextmanager
    async def _counted(
        self, budget: Budget, amount: int, reason: str
    ) -> AsyncIterator[Reservation]:
        try:
            reservation = Reservation(budget, await budget.acquire(amount, self.wait_s))
        except Overloaded:
            self.refused.labels(reason=reason).inc()
            raise
        try:
            yield reservation
        finally:
            budget.release(reservation.amount)
