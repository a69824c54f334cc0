"""`python -m benchmarks.reliability [SCENARIO ...] [--quick]`: the whole stack under abuse
and faults, its answers counted and its memory sampled. Opt-in (`make reliability`,
`make soak`); the figures are in RELIABILITY.md.

  uploads     24 concurrent uploads of 24-40 MP photographs, each with one click: as
              configured (most are refused at once), and with patient clients
              (ADMISSION_WAIT_S=600: all are served, within the memory budget)
  allocator   the patient burst with glibc's allocator defaults (MALLOC_ARENAS=0,
              TRIM_MEMORY=false): the proxy's memory before and after the fix
  everything  4 concurrent segment-everything runs at the largest points_per_batch (256),
              with the default admission (2 at once) and with 4 admitted at once
  fault       open-loop load at 3x the capacity measured first, kill -9 of Triton halfway
  soak        30 minutes of mixed traffic: cold images, re-prompts, segment everything and
              bad inputs (--quick: 3 minutes)

Each scenario starts its own stack (`python -m serving` on free ports, serving the seeded
random checkpoint's export, as the benchmarks do), samples the resident memory of the proxy
and of Triton (tritonserver and its Python-backend stubs) every 0.2 s, and writes
build/reliability/<scenario>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks import assets
from benchmarks.common import write_json
from benchmarks.loadgen import percentile
from common.settings import PROJECT_ROOT
from serving.processes import process_group_members
from testkit.processes import LaunchedStack, rss_mb
from testkit.repository import copy_layout

log = logging.getLogger("reliability")

OUTPUT_DIR = PROJECT_ROOT / "build" / "reliability"
SCENARIOS = ("uploads", "allocator", "everything", "fault", "soak")
CLICK = json.dumps([{"points": [[0.5, 0.5]], "labels": [1]}])  # scaled per image below


# --- measuring ----------------------------------------------------------------------------------


class MemorySampler:
    """RSS of the proxy and of Triton's whole group, every `period_s`, in a thread."""

    def __init__(self, stack: LaunchedStack, period_s: float = 0.2) -> None:
        self.stack = stack
        self.period_s = period_s
        self.samples: list[tuple[float, float, float]] = []  # (t, proxy MB, triton MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                proxy = rss_mb(self.stack.proxy_pid())
            except ValueError:  # restarting
                proxy = 0.0
            try:
                triton = sum(rss_mb(pid) for pid in process_group_members(self.stack.triton_pid()))
            except RuntimeError:  # restarting
                triton = 0.0
            self.samples.append((time.monotonic() - self._started, proxy, triton))
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self) -> float:
        return time.monotonic() - self._started

    def summary(self, load_from: float, load_to: float) -> dict[str, dict[str, float]]:
        """Before the load (base), its peak, and at the end of the idle time after it."""
        result = {}
        for index, name in ((1, "proxy_mb"), (2, "triton_mb")):
            before = [s[index] for s in self.samples if s[0] < load_from and s[index]]
            during = [s[index] for s in self.samples if load_from <= s[0] <= load_to]
            after = [s[index] for s in self.samples if s[0] > load_to and s[index]]
            result[name] = {
                "base": round(min(before), 1) if before else None,
                "peak": round(max(during + after), 1) if during + after else None,
                "after": round(after[-1], 1) if after else None,
            }
        return result


def outcome_of(response: httpx.Response | Exception, started: float) -> dict[str, Any]:
    latency_ms = round((time.monotonic() - started) * 1000, 1)
    if isinstance(response, Exception):
        return {"status": type(response).__name__, "ms": latency_ms}
    outcome: dict[str, Any] = {"status": response.status_code, "ms": latency_ms}
    if response.status_code != 200:
        try:
            outcome["code"] = response.json().get("code")
        except ValueError:
            outcome["code"] = "not-json"
        outcome["retry_after"] = response.headers.get("retry-after")
    return outcome


def tally(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by status and code, and latency of the answers and of the refusals."""
    counts = Counter(f"{o['status']} {o.get('code', '')}".strip() for o in outcomes)
    refusals = [o for o in outcomes if o["status"] == 503]
    return {
        "sent": len(outcomes),
        "answered_200": sum(o["status"] == 200 for o in outcomes),
        "by_status": dict(sorted(counts.items())),
        "ok_ms_p50": _p(outcomes, 200, 50),
        "ok_ms_p95": _p(outcomes, 200, 95),
        "refused_ms_p50": _p(outcomes, 503, 50),
        "refused_ms_p95": _p(outcomes, 503, 95),
        "refusals_without_retry_after": sum(not o.get("retry_after") for o in refusals),
        "failed_otherwise": sum(
            o["status"] not in (200, 503, 504) and not str(o["status"]).startswith("4")
            for o in outcomes
        ),
    }


def _p(outcomes: list[dict[str, Any]], status: int, q: float) -> float | None:
    samples = [o["ms"] for o in outcomes if o["status"] == status]
    return round(percentile(samples, q), 1) if samples else None


# --- inputs ---------------------------------------------------------------------------------


def big_photo(width: int, height: int, seed: int) -> bytes:
    """A photograph-sized JPEG: smooth colour fields plus a little noise (compresses like a
    photo, well under the upload limit)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 200 + 2, width // 200 + 2, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    noisy = np.clip(image + rng.normal(0, 3, (height, 1, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=88)
    return buffer.getvalue()


def click_for(width: int, height: int, x: float = 0.5, y: float = 0.5) -> str:
    return json.dumps([{"points": [[round(width * x, 1), round(height * y, 1)]], "labels": [1]}])


# --- the stack ------------------------------------------------------------------------------


def repository() -> Path:
    """The committed layout with the seeded random checkpoint's export linked in."""
    exported = assets.ensure_export(assets.ensure_checkpoint())
    return copy_layout(OUTPUT_DIR / "model_repository", exported)


def stack(name: str, env: dict[str, str] | None = None) -> LaunchedStack:
    env = {"MOBILESAM_CHECKPOINT": str(assets.CHECKPOINT_PATH), **(env or {})}
    return LaunchedStack(repository(), OUTPUT_DIR / "logs" / f"{name}.log", env)


async def post_all(
    base_url: str, requests: list[tuple[dict[str, str], tuple | None]], timeout_s: float
) -> list[dict[str, Any]]:
    """All requests at once; the outcome of each, never an exception."""
    limits = httpx.Limits(max_connections=len(requests) or 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:

        async def one(data: dict[str, str], file: tuple | None) -> dict[str, Any]:
            started = time.monotonic()
            try:
                files = {"file": file} if file else None
                response = await client.post("/segment-image", data=data, files=files)
            except httpx.HTTPError as exc:
                return outcome_of(exc, started)
            return outcome_of(response, started)

        return list(await asyncio.gather(*(one(data, file) for data, file in requests)))


# --- scenarios ------------------------------------------------------------------------------


def uploads_scenario(quick: bool) -> dict[str, Any]:
    return {
        "as configured": burst_of_uploads(quick, {}, "uploads"),
        "patient clients": burst_of_uploads(quick, PATIENT, "uploads-patient"),
    }


PATIENT = {"ADMISSION_WAIT_S": "1200", "REQUEST_TIMEOUT_S": "1500"}


def burst_of_uploads(quick: bool, env: dict[str, str], name: str) -> dict[str, Any]:
    photos = big_photos(6 if quick else 24)
    log.info("%s: %d uploads of %.1f-%.1f MB", name, len(photos), *_mb_range(photos))
    requests = [
        ({"prompts": click_for(w, h)}, (f"photo-{i}.jpg", data, "image/jpeg"))
        for i, (w, h, data) in enumerate(photos)
    ]
    with stack(name, env) as launched, MemorySampler(launched) as memory:
        time.sleep(3)
        load_from = memory.mark()
        outcomes = asyncio.run(post_all(launched.base_url, requests, 1800))
        load_to = memory.mark()
        time.sleep(8)
        return {
            "uploads": len(photos),
            "megapixels": sorted({round(w * h / 1e6) for w, h, _ in photos}),
            "answers": tally(outcomes),
            "memory": memory.summary(load_from, load_to),
            "env": env or {},
        }


@cache
def big_photos(count: int) -> list[tuple[int, int, bytes]]:
    """`count` JPEGs of 24, 35 and 40 megapixels, made once per run."""
    sizes = [(6000, 4000), (7000, 5000), (7300, 5475)]
    return [(*sizes[i % 3], big_photo(*sizes[i % 3], seed=i)) for i in range(count)]


def _mb_range(photos: list[tuple[int, int, bytes]]) -> tuple[float, float]:
    sizes = [len(data) / 1e6 for *_, data in photos]
    return min(sizes), max(sizes)


def everything_scenario(quick: bool) -> dict[str, Any]:
    settings = {"points_per_side": "16", "points_per_batch": "256", "pred_iou_thresh": "0"}
    photo = assets.photo_uploads()[1]
    runs = {}
    for label, env in (
        ("default admission", {}),
        ("4 admitted", {"MAX_EVERYTHING_IN_FLIGHT": "4"}),
    ):
        pool = assets.cold_pool(4, [photo])
        requests = [(settings, (u.name, u.data, u.content_type)) for u in pool]
        with stack(f"everything-{len(runs)}", env) as launched, MemorySampler(launched) as memory:
            time.sleep(3)
            load_from = memory.mark()
            outcomes = asyncio.run(post_all(launched.base_url, requests, 1200))
            load_to = memory.mark()
            time.sleep(8)
            runs[label] = {
                "answers": tally(outcomes),
                "memory": memory.summary(load_from, load_to),
                "env": env,
            }
        if quick:
            break
    return {"settings": settings, "image": photo.name, "runs": runs}


def fault_scenario(quick: bool) -> dict[str, Any]:
    capacity_s, load_s = (20, 40) if quick else (40, 120)
    pool = assets.cold_pool(1000)
    next_image = iter(pool)

    def cold() -> tuple[dict[str, str], tuple]:
        upload = next(next_image)
        data = {"prompts": click_for(upload.width, upload.height)}
        return data, (upload.name, upload.data, upload.content_type)

    with stack("fault") as launched, MemorySampler(launched) as memory:
        capacity = closed_loop_throughput(launched.base_url, cold, 4, capacity_s)
        rate = 3 * capacity
        log.info("capacity %.2f cold requests/s; offering %.2f/s for %d s", capacity, rate, load_s)
        killed_at: list[float] = []
        ready_again: list[float] = []

        def kill_triton_halfway() -> None:
            time.sleep(load_s / 2)
            os.kill(launched.triton_pid(), signal.SIGKILL)
            killed_at.append(time.monotonic())
            log.info("kill -9 tritonserver")
            time.sleep(1)
            ready_again.append(time.monotonic() - killed_at[0] + launched.wait_until_ready(300))

        killer = threading.Thread(target=kill_triton_halfway)
        load_from = memory.mark()
        killer.start()
        outcomes = asyncio.run(open_loop(launched.base_url, cold, rate, load_s, 330))
        killer.join()
        load_to = memory.mark()
        after = asyncio.run(post_all(launched.base_url, [cold() for _ in range(3)], 120))
        time.sleep(5)
        since_kill = [o for o in outcomes if o["sent_at"] >= killed_at[0]]
        return {
            "capacity_rps": round(capacity, 2),
            "offered_rps": round(rate, 2),
            "load_s": load_s,
            "answers": tally(outcomes),
            "answers_after_the_kill": tally(since_kill),
            "ready_again_s": round(ready_again[0], 1),
            "after_recovery": tally(after),
            "memory": memory.summary(load_from, load_to),
        }


def closed_loop_throughput(
    base_url: str, make: Callable[[], tuple], workers: int, seconds: float
) -> float:
    async def run() -> int:
        deadline = time.monotonic() + seconds
        done = 0
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    data, file = make()
                    response = await client.post("/segment-image", data=data, files={"file": file})
                    done += response.status_code == 200

            await asyncio.gather(*(worker() for _ in range(workers)))
        return done

    started = time.monotonic()
    done = asyncio.run(run())
    return done / (time.monotonic() - started)


async def open_loop(
    base_url: str, make: Callable[[], tuple], rate: float, seconds: float, timeout_s: float
) -> list[dict[str, Any]]:
    """Requests at `rate` per second whatever the answers (arrivals do not wait)."""
    outcomes: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=1000)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:

        async def one(data: dict[str, str], file: tuple, sent_at: float) -> None:
            try:
                response = await client.post("/segment-image", data=data, files={"file": file})
            except httpx.HTTPError as exc:
                outcomes.append({**outcome_of(exc, sent_at), "sent_at": sent_at})
                return
            outcomes.append({**outcome_of(response, sent_at), "sent_at": sent_at})

        tasks = []
        started = time.monotonic()
        for index in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
            data, file = make()
            tasks.append(asyncio.ensure_future(one(data, file, time.monotonic())))
        await asyncio.gather(*tasks)
    return outcomes


def soak_scenario(quick: bool) -> dict[str, Any]:
    minutes = 3 if quick else 30
    pool = iter(assets.cold_pool(4000))
    photos = assets.photo_uploads()
    rng = np.random.default_rng(0)
    outcomes: dict[str, list[dict[str, Any]]] = {}

    with stack("soak") as launched, MemorySampler(launched, period_s=1.0) as memory:
        cached = photos[0]
        image_id = httpx.post(
            f"{launched.base_url}/embed-image",
            files={"file": (cached.name, cached.data, cached.content_type)},
            timeout=120,
        ).json()["image_id"]

        def request(kind: str) -> tuple[dict[str, str], tuple | None]:
            if kind == "cold":
                upload = next(pool)
                file = (upload.name, upload.data, upload.content_type)
                return {"prompts": click_for(upload.width, upload.height)}, file
            if kind == "reprompt":
                x, y = rng.uniform(0.1, 0.9, 2)
                return {
                    "image_id": image_id,
                    "prompts": click_for(cached.width, cached.height, x, y),
                }, None
            if kind == "everything":
                upload = next(pool)
                return {"points_per_side": "8"}, (upload.name, upload.data, upload.content_type)
            bad = rng.integers(0, 3)
            if bad == 0:
                return {"prompts": CLICK}, ("junk.bin", rng.bytes(2048), "application/octet-stream")
            if bad == 1:
                return {"image_id": image_id, "prompts": '[{"box": [5, 5]}]'}, None
            return {"image_id": "0" * 64, "prompts": CLICK}, None

        kinds = ["cold"] * 4 + ["reprompt"] * 4 + ["everything"] + ["bad"]

        cache_mb: list[tuple[float, float]] = []  # (sampler time, embedding cache MB)

        async def watch_cache(client: httpx.AsyncClient, deadline: float) -> None:
            while time.monotonic() < deadline:
                metrics = (await client.get("/metrics")).text
                size = re.search(r"^proxy_embedding_cache_bytes (\S+)$", metrics, re.MULTILINE)
                cache_mb.append((memory.mark(), float(size[1]) / 1e6 if size else float("nan")))
                await asyncio.sleep(20)

        async def run(deadline: float) -> None:
            async with httpx.AsyncClient(base_url=launched.base_url, timeout=600) as client:

                async def worker(seed: int) -> None:
                    local = np.random.default_rng(seed)
                    while time.monotonic() < deadline:
                        kind = kinds[local.integers(0, len(kinds))]
                        data, file = request(kind)
                        started = time.monotonic()
                        try:
                            files = {"file": file} if file else None
                            response = await client.post("/segment-image", data=data, files=files)
                            outcome = outcome_of(response, started)
                        except httpx.HTTPError as exc:
                            outcome = outcome_of(exc, started)
                        outcomes.setdefault(kind, []).append(outcome)

                await asyncio.gather(
                    *(worker(seed) for seed in range(3)), watch_cache(client, deadline)
                )

        time.sleep(3)
        load_from = memory.mark()
        asyncio.run(run(time.monotonic() + minutes * 60))
        load_to = memory.mark()
        time.sleep(10)
        return {
            "minutes": minutes,
            "answers": {kind: tally(items) for kind, items in outcomes.items()},
            "memory": memory.summary(load_from, load_to),
            # A leak shows as a floor that keeps rising once the embedding cache is full.
            "proxy_by_sixth": by_sixth(memory.samples, cache_mb, load_from, load_to),
        }


def by_sixth(
    samples: list[tuple[float, float, float]],
    cache_mb: list[tuple[float, float]],
    load_from: float,
    load_to: float,
) -> list[dict[str, float]]:
    """The proxy's median RSS and its embedding cache's size in each sixth of the load."""
    width = (load_to - load_from) / 6
    windows = []
    for index in range(6):
        start, end = load_from + index * width, load_from + (index + 1) * width
        rss = [s[1] for s in samples if start <= s[0] < end and s[1]]
        cache = [size for t, size in cache_mb if t < end]
        windows.append(
            {
                "until_minute": round((end - load_from) / 60, 1),
                "proxy_mb_median": round(float(np.median(rss)), 1) if rss else None,
                "cache_mb": round(cache[-1], 1) if cache else None,
            }
        )
    return windows


RUNNERS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "uploads": uploads_scenario,
    "allocator": lambda quick: burst_of_uploads(
        quick, {**PATIENT, "MALLOC_ARENAS": "0", "TRIM_MEMORY": "false"}, "allocator"
    ),
    "everything": everything_scenario,
    "fault": fault_scenario,
    "soak": soak_scenario,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__)
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS[:-1]), choices=SCENARIOS)
    parser.add_argument("--quick", action="store_true", help="smaller, shorter runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in args.scenarios:
        log.info("=== %s ===", name)
        started = time.monotonic()
        result = RUNNERS[name](args.quick)
        result.update(scenario=name, quick=args.quick, seconds=round(time.monotonic() - started))
        path = write_json(OUTPUT_DIR / f"{name}.json", result)
        print(json.dumps(result, indent=2), flush=True)
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
