"""End to end: the proxy in front of Triton, and the in-process PyTorch baseline, one run.

Both servers are up at the same time (idle, neither uses CPU), and the cold workload
alternates between them level by level, so that both see the same machine state and the same
images: the throughput ratio is measured side by side. Segment-everything is compared the same
way, one image at a time, against upstream's `SamAutomaticMaskGenerator` in the baseline
server. The other workloads (cached re-prompts, several prompts) exist only on our side.
Before any load, perf_analyzer measures the encoder and decoder compute alone on the same
Triton at concurrency 1: the floor a cold request is compared with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks import workloads
from benchmarks.assets import Upload
from benchmarks.common import LOG_DIR
from benchmarks.loadgen import RequestFactory, run_load
from benchmarks.plan import EverythingCase, Load, Plan
from benchmarks.triton_sweeps import Inputs, Levels, run_levels
from common import contract
from common.settings import Settings, get_settings
from serving.triton import TritonServer
from testkit.ports import free_port
from testkit.processes import ServerProcess, proxy_process

log = logging.getLogger("bench.e2e")

SETTLE_S = 1.0  # between targets: let the other server's thread pools stop spinning


STAT_FIELDS = ("queue", "compute_input", "compute_infer", "compute_output")


def triton_stats(url: str) -> dict[str, dict[str, int]]:
    """Triton's cumulative per-model statistics: request count and nanoseconds per phase.

    The phases are summed per request: requests batched into one execution each count its
    whole duration. `execution_compute` sums each execution once (Triton's `batch_stats`).
    """
    settings = get_settings()
    stats = {}
    for role, model in (("encoder", settings.encoder_model), ("decoder", settings.decoder_model)):
        with urllib.request.urlopen(f"http://{url}/v2/models/{model}/stats", timeout=10) as r:
            body = json.load(r)["model_stats"][0]
        phases = body["inference_stats"]
        stats[role] = {
            "requests": int(phases["success"]["count"]),
            "executions": int(body["execution_count"]),
            **{name: int(phases[name]["ns"]) for name in STAT_FIELDS},
            "execution_compute": sum(
                int(batch[phase]["ns"])
                for batch in body.get("batch_stats", [])
                for phase in ("compute_input", "compute_infer", "compute_output")
            ),
        }
    return stats


def stats_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], served: int
) -> dict[str, dict[str, float]]:
    """What Triton did for one load level, in milliseconds per request the proxy served.

    Read from the server around the very requests measured, so "compute alone" and the
    end-to-end latency are two views of the same requests, not of two moments.
    """
    delta = {}
    for role in after:
        diff = {key: after[role][key] - before[role][key] for key in after[role]}
        per = max(served, 1)
        delta[role] = {
            "requests": diff["requests"],
            "executions": diff["executions"],
            "queue_ms": diff["queue"] / 1e6 / per,
            "compute_ms": (diff["compute_input"] + diff["compute_infer"] + diff["compute_output"])
            / 1e6
            / per,
            "execution_compute_ms": diff["execution_compute"] / 1e6,  # in all, not per request
        }
    return delta


def load_levels(
    base_url: str,
    target: str,
    workload: str,
    factory: RequestFactory,
    load: Load,
    levels: tuple[int, ...] | None = None,
    timeout_s: float = 300.0,
    triton_url: str | None = None,
) -> list[dict[str, Any]]:
    """Each level in turn; with `triton_url`, Triton's own split of the same requests."""
    rows = []
    for level in load.levels if levels is None else levels:
        before = triton_stats(triton_url) if triton_url else None
        result = asyncio.run(
            run_load(
                base_url,
                factory,
                target=target,
                workload=workload,
                concurrency=level,
                max_requests=load.requests(level),
                max_seconds=load.max_seconds,
                timeout_s=timeout_s,
            )
        )
        log.info(
            "%-8s %-10s c=%d  %6.2f req/s  p50 %7.1f ms  p95 %7.1f ms  ok %d/%d  errors %s",
            target,
            workload,
            level,
            result.throughput,
            result.latency_ms.get("p50", float("nan")),
            result.latency_ms.get("p95", float("nan")),
            result.ok,
            result.requests,
            result.errors or "-",
        )
        row = result.to_json()
        if before is not None:
            row["triton"] = stats_delta(before, triton_stats(triton_url), result.ok)
        rows.append(row)
    return rows


def warm(base_url: str, factory: RequestFactory, count: int, timeout_s: float = 300) -> None:
    """Requests that pay for first-call initialisation, not counted."""
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        for index in range(count):
            request = factory(index)
            files = {"file": request.file} if request.file else None
            client.post(request.path, data=request.data, files=files).raise_for_status()


def embed(base_url: str, upload: Upload) -> str:
    """Put one image in the proxy's cache; its image_id drives the re-prompt workloads."""
    response = httpx.post(
        f"{base_url}/embed-image",
        files={"file": (upload.name, upload.data, upload.content_type)},
        timeout=300,
    )
    response.raise_for_status()
    return response.json()["image_id"]


def segment_everything(base_url: str, upload: Upload, case: EverythingCase) -> dict[str, Any]:
    """One no-prompt request; its latency, status and mask count, never an exception."""
    started = time.perf_counter()
    try:
        response = httpx.post(
            f"{base_url}{workloads.SEGMENT}",
            data={name: str(value) for name, value in case.settings.items()},
            files={"file": (upload.name, upload.data, upload.content_type)},
            timeout=case.timeout_s,
        )
    except httpx.HTTPError as exc:
        return {"status": None, "detail": f"{type(exc).__name__}: {exc}"}
    latency_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        return {"status": response.status_code, "detail": response.text[:200]}
    body = response.json()
    return {"status": 200, "ms": latency_ms, "count": body["count"], "timings": body["timings_ms"]}


def compare_everything(
    cases: tuple[EverythingCase, ...], profiles: list[Profile], baseline_url: str
) -> list[dict[str, Any]]:
    """Each case on one cold image: ours in each profile (with Triton's split of it), then
    upstream's."""
    rows = []
    for case in cases:
        uploads = [profile.stream.next() for profile in profiles]  # the same image for each
        upload = uploads[0]
        row: dict[str, Any] = {
            "name": case.name,
            "settings": case.settings,
            "prompts": case.prompts,
            "image": {"name": upload.name, "width": upload.width, "height": upload.height},
        }
        for profile in profiles:
            url = profile.server.http_url
            before = triton_stats(url)
            ours = segment_everything(profile.proxy.base_url, upload, case)
            suffix = "" if profile is profiles[0] else "_fast"
            row[f"ours{suffix}"] = ours
            row[f"triton{suffix}"] = stats_delta(before, triton_stats(url), 1)
            time.sleep(SETTLE_S)
        row["upstream"] = segment_everything(baseline_url, upload, case)
        log.info("everything %-18s %s", case.name, {k: v for k, v in row.items() if k != "image"})
        rows.append(row)
        time.sleep(SETTLE_S)
    return rows


# Alternating rounds of the cached re-prompt in compare_transport (cheap: a few seconds each).
TRANSPORT_ROUNDS = 4
EVERYTHING_TRANSPORT_ROUNDS = 2  # a minute each with upstream's defaults
TRANSPORTS = ("shared_memory", "http")


def compare_transport(plan: Plan, profile: Profile, photo: Upload) -> dict[str, Any]:
    """The decoder's answers through shared memory (the profile's proxy) against HTTP (a
    second proxy with TRITON_SHARED_MEMORY_SLOTS=0), on the same Triton, alternating: the
    cached re-prompt at concurrency 1, then segment everything on a cold image per round."""
    record: dict[str, Any] = {name: [] for name in TRANSPORTS}
    plain = proxy_process(
        proxy_settings(profile.server, profile.repository, profile.precision),
        LOG_DIR / "proxy-e2e-http.log",
        extra_env={"TRITON_SHARED_MEMORY_SLOTS": "0"},
        health_path="/readyz",
    )
    assert profile.proxy is not None and profile.stream is not None
    with plain:
        urls = dict(zip(TRANSPORTS, (profile.proxy.base_url, plain.base_url), strict=True))
        size = (photo.width, photo.height)
        factories = {name: workloads.cached(embed(url, photo), *size) for name, url in urls.items()}
        warm(plain.base_url, factories["http"], plan.warmup_requests)
        for round_index in range(TRANSPORT_ROUNDS):
            order = TRANSPORTS if round_index % 2 == 0 else TRANSPORTS[::-1]
            for name in order:
                record[name] += load_levels(
                    urls[name],
                    name,
                    "cached",
                    factories[name],
                    plan.cached,
                    (1,),
                    triton_url=profile.server.http_url,
                )
                time.sleep(SETTLE_S)
        case = plan.everything[0]
        record["everything"] = {"name": case.name, "prompts": case.prompts}
        for round_index in range(EVERYTHING_TRANSPORT_ROUNDS):  # A B, then B A
            upload = profile.stream.next()  # cold for both proxies
            order = TRANSPORTS if round_index % 2 == 0 else TRANSPORTS[::-1]
            for name in order:
                runs = record["everything"].setdefault(name, [])
                runs.append(segment_everything(urls[name], upload, case))
                time.sleep(SETTLE_S)
    log.info("transport: %s", record["everything"])
    return record


def proxy_settings(server: TritonServer, repository: Path, precision: str = "fp32") -> Settings:
    """The settings of a proxy in front of `server`, serving `repository`."""
    return get_settings().model_copy(
        update={
            "triton_http_port": server.http_port,
            "model_repository": repository,
            "precision": precision,
        }
    )


def baseline_process(checkpoint: Path) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        name="pytorch baseline",
        command=[
            sys.executable,
            "-m",
            "benchmarks.baseline_pytorch",
            "--checkpoint",
            str(checkpoint),
            "--port",
            str(port),
        ],
        port=port,
        log_path=LOG_DIR / "baseline.log",
    )


@dataclass
class Profile:
    """One precision profile under test: its Triton, and the load generator's name for it."""

    target: str  # "ours" (the default profile) or "ours-fast"
    precision: str
    server: TritonServer
    repository: Path
    proxy: ServerProcess | None = None
    stream: workloads.ColdStream | None = None


# Segment everything on these photographs measures the fast profile's quality (small ones:
# every mask is compared with every other).
QUALITY_PHOTOS = ("landscape-png", "portrait-jpeg", "grayscale-png", "rgba-png")


def quality(profiles: list[Profile], parity_photos: list[Upload]) -> dict[str, Any]:
    """The fast profile's masks against the default's on real photographs: prompted masks
    (IoU distribution, score differences) and segment everything (fp32 masks matched)."""
    from benchmarks.parity import collect_masks, compare, everything_masks, match_everything
    from benchmarks.plan import MANY_MASKS

    default, fast = profiles
    prompted = compare(
        collect_masks(default.proxy.base_url, parity_photos),
        collect_masks(fast.proxy.base_url, parity_photos),
    )
    photos = [u for u in parity_photos if u.name in QUALITY_PHOTOS]
    reference, candidate = [], []
    for upload in photos:
        reference += everything_masks(default.proxy.base_url, upload, MANY_MASKS)
        candidate += everything_masks(fast.proxy.base_url, upload, MANY_MASKS)
    return {
        "prompted": prompted,
        "everything": {**match_everything(reference, candidate), "settings": MANY_MASKS},
        "reference": default.precision,
        "candidate": fast.precision,
    }


def run_end_to_end(
    plan: Plan,
    profiles: list[Profile],
    inputs: Inputs,
    pool: list[Upload],
    photos: list[Upload],
    checkpoint: Path,
    parity_photos: list[Upload],
) -> dict[str, Any]:
    """Everything measured against the running Tritons of each profile, the default first.

    Every workload alternates level by level between the profiles (and, for cold requests and
    segment everything, the PyTorch baseline), so that their ratios are side by side.
    """
    record: dict[str, Any] = {"baseline": [], "compute_by_target": {}, "profiles": {}}
    for profile in profiles:
        record["compute_by_target"][profile.target] = run_levels(
            profile.server,
            f"e2e-compute-{profile.target}",
            inputs,
            Levels(
                encoder=(1,),
                decoder=(1,),
                encoder_window=plan.compute_window,
                decoder_window=4 * plan.compute_window,
            ),
            profile.repository.parent.parent / "perf" / f"e2e-compute-{profile.target}",
        )
        record[profile.target] = []
        record["profiles"][profile.target] = profile.precision
    record["compute"] = record["compute_by_target"][profiles[0].target]
    # Every proxy and the baseline get the same sequence of images (none repeats one).
    baseline_stream = workloads.ColdStream(pool)
    reprompt_photo = photos[1 % len(photos)]
    with ExitStack() as stack:
        for profile in profiles:
            profile.proxy = stack.enter_context(
                proxy_process(
                    proxy_settings(profile.server, profile.repository, profile.precision),
                    LOG_DIR / f"proxy-e2e-{profile.target}.log",
                    health_path="/readyz",
                )
            )
            profile.stream = workloads.ColdStream(pool)
            warm(profile.proxy.base_url, workloads.cold(profile.stream), plan.warmup_requests)
        baseline = stack.enter_context(baseline_process(checkpoint))
        warm(baseline.base_url, workloads.cold(baseline_stream), plan.warmup_requests)
        for level in plan.cold.levels:
            for profile in profiles:
                record[profile.target] += load_levels(
                    profile.proxy.base_url,
                    profile.target,
                    "cold",
                    workloads.cold(profile.stream),
                    plan.cold,
                    (level,),
                    triton_url=profile.server.http_url,
                )
                time.sleep(SETTLE_S)
            if level in plan.baseline.levels:
                record["baseline"] += load_levels(
                    baseline.base_url,
                    "baseline",
                    "cold",
                    workloads.cold(baseline_stream),
                    plan.baseline,
                    (level,),
                )
                time.sleep(SETTLE_S)
        record["everything"] = compare_everything(plan.everything, profiles, baseline.base_url)
        baseline.stop()  # done with it: the remaining workloads are ours alone

        if len(profiles) > 1 and plan.parity:
            record["quality"] = quality(profiles, parity_photos)
        size = (reprompt_photo.width, reprompt_photo.height)
        factories = {}
        for profile in profiles:
            image_id = embed(profile.proxy.base_url, reprompt_photo)
            factories[profile.target] = (
                workloads.cached(image_id, *size),
                workloads.multi(image_id, *size),
            )
            warm(profile.proxy.base_url, factories[profile.target][0], plan.warmup_requests)
        for workload, load, which in (("cached", plan.cached, 0), ("multi", plan.multi, 1)):
            for level in load.levels:
                for profile in profiles:
                    record[profile.target] += load_levels(
                        profile.proxy.base_url,
                        profile.target,
                        workload,
                        factories[profile.target][which],
                        load,
                        (level,),
                        triton_url=profile.server.http_url,
                    )
        record["transport"] = compare_transport(plan, profiles[0], reprompt_photo)
        record["reprompt_image"] = {
            "name": reprompt_photo.name,
            "width": size[0],
            "height": size[1],
        }
    return record


def runtime_checks(
    plan: Plan, server: TritonServer, repository: Path, photos: list[Upload], pool: list[Upload]
) -> dict[str, Any]:
    """On a runtime variant: masks for the parity figure, then a few cold requests at c=4."""
    from benchmarks.parity import collect_masks

    record: dict[str, Any] = {}
    with proxy_process(
        proxy_settings(server, repository),
        LOG_DIR / f"proxy-{repository.name}.log",
        health_path="/readyz",
    ) as proxy:
        if plan.parity:
            record["parity_masks"] = collect_masks(proxy.base_url, photos)
        if plan.runtime_e2e is not None:
            stream = workloads.ColdStream(pool)
            warm(proxy.base_url, workloads.cold(stream), 1)
            record["e2e"] = load_levels(
                proxy.base_url, "ours", "cold", workloads.cold(stream), plan.runtime_e2e
            )
    return record


# A few calls: an arena reaches its steady size only after the first; then long enough idle
# for the stub to give memory back (model.py's IdleTrim: 5 s idle, checked every 2.5 s).
MEMORY_PROBE_CALLS = 3
MEMORY_PROBE_IDLE_S = 10.0


def decoder_memory(server: TritonServer) -> dict[str, Any]:
    """What calls of `max_work_per_run` prompts (the most a runtime call gets) cost the
    decoder stub: its resident memory before, its peak, what it keeps right after and what it
    keeps once idle. On a fresh server, before any other request: a runtime that keeps its
    buffers (OpenVINO) would otherwise show only what it adds to what earlier calls left."""
    import numpy as np
    import tritonclient.http as httpclient

    from testkit.processes import reset_peak_rss, rss_mb, stub_pid

    settings = get_settings()
    model = settings.decoder_model
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=600)
    try:
        config = client.get_model_config(model)
        prompts = int(config["parameters"]["max_work_per_run"]["string_value"])
        rng = np.random.default_rng(0)
        points = rng.uniform(0, 1024, (1, prompts, 1, 2)).astype(np.float32)
        arrays = {
            contract.IMAGE_EMBEDDINGS: rng.normal(0, 0.5, (1, 256, 64, 64)).astype(np.float32),
            contract.POINT_COORDS: np.concatenate([points, np.zeros_like(points)], axis=2),
            contract.POINT_LABELS: np.tile(np.array([1.0, -1.0], np.float32), (1, prompts, 1)),
            contract.MASK_INPUT: np.zeros((1, 1, 1, 256, 256), np.float32),
            contract.HAS_MASK_INPUT: np.zeros((1, 1), np.float32),
        }
        tensors = []
        for name, array in arrays.items():
            tensor = httpclient.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array, binary_data=True)
            tensors.append(tensor)
        # Loading the model may have peaked above what is resident now: start afresh.
        stub = stub_pid(server.process.pid, model)
        reset_peak_rss(stub)
        before = rss_mb(stub)
        for _ in range(MEMORY_PROBE_CALLS):
            client.infer(model, tensors)
        peak, after = rss_mb(stub, "VmHWM"), rss_mb(stub)
        time.sleep(MEMORY_PROBE_IDLE_S)
        idle = rss_mb(stub)
    finally:
        client.close()
    return {
        "prompts": prompts,
        "calls": MEMORY_PROBE_CALLS,
        "resident_before_mb": round(before, 1),
        "peak_mb": round(peak, 1),
        "resident_after_mb": round(after, 1),
        "resident_idle_mb": round(idle, 1),
        "per_prompt_mb": round((peak - before) / prompts, 1),
    }
