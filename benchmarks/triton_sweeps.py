"""perf_analyzer on variants of the model repository: one Triton per variant, interleaved.

Follows the three-way comparison of Triton's dynamic-batching tutorial (Conceptual Guide,
part 2): no dynamic batching, dynamic batching, dynamic batching with several instances; plus
the fourth cell of instances x threads, a queue-delay sweep for the decoder, and the runtime
and precision variants. Every variant gets the same warm-up and the same levels, so the tables
compare like with like; each level is perf_analyzer's own measurement (throughput, client
latency percentiles and the server's queue / compute split) from `benchmarks.perf_analyzer`.

The variants of a section are served side by side, each by its own Triton on its own ports,
and measured level by level in turn: on a machine whose other tenants come and go, that keeps
each comparison within a minute instead of spreading it over the section.

Time is bounded: each level is three count windows of `window x concurrency` requests, and the
stability threshold is set so wide that the three are always accepted (on a shared 2-core
machine, a strict threshold would retry for minutes).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as httpclient

from benchmarks import perf_analyzer as perf
from benchmarks.analysis import DECODER, DECODER_BATCH, ENCODER
from benchmarks.common import BENCH_DIR, LOG_DIR
from benchmarks.variants import Variant, materialize
from common.settings import get_settings
from proxy.everything.params import AmgParams
from serving.triton import TritonServer
from testkit.ports import free_port

log = logging.getLogger("bench.triton")

REPOSITORIES = BENCH_DIR / "repositories"
PERF_DIR = BENCH_DIR / "perf"
READY_TIMEOUT_S = 300.0
# Windows are always accepted (see the module docstring); three is perf_analyzer's minimum.
ALWAYS_STABLE = 1000.0
WINDOWS = 3
# Segment everything's decoder calls: its default prompts per call.
BATCH_PROMPTS = AmgParams().points_per_batch


@dataclass(frozen=True)
class Levels:
    """What to measure on one variant: concurrency levels and requests per window and level."""

    encoder: Sequence[int] = ()
    decoder: Sequence[int] = ()
    encoder_window: int = 2
    decoder_window: int = 6
    # Decoder calls of BATCH_PROMPTS prompts (segment everything), whose cost per prompt
    # differs from one click's: the runtimes compare differently there.
    decoder_batch: Sequence[int] = ()
    decoder_batch_window: int = 2


@dataclass(frozen=True)
class Inputs:
    """perf_analyzer `--input-data` files, written once from the first server's configs."""

    encoder: Path
    decoder: Path
    decoder_batch: Path


def write_inputs(url: str, output_dir: Path = PERF_DIR) -> Inputs:
    """A landscape and a portrait image for the encoder; one click (P=1, N=2) for the decoder,
    and segment everything's call: BATCH_PROMPTS one-point prompts (N=2 with the padding)."""
    encoder, decoder, decoder_batch = perf.build_scenarios(
        get_settings(),
        url,
        output_dir,
        prompts=[1, BATCH_PROMPTS],
        points=2,
        encoder_window=1,
        decoder_window=1,
    )
    return Inputs(encoder.input_data, decoder.input_data, decoder_batch.input_data)


def warm_up(url: str, inputs: Inputs, batch: bool = False, requests: int = 2) -> None:
    """First calls pay for lazy initialisation (thread pools, OpenVINO kernels for each new
    shape, so the batch input too when it is measured): not measured."""
    settings = get_settings()
    client = httpclient.InferenceServerClient(url, network_timeout=300, connection_timeout=300)
    calls = [(settings.encoder_model, inputs.encoder), (settings.decoder_model, inputs.decoder)]
    if batch:
        calls.append((settings.decoder_model, inputs.decoder_batch))
    try:
        for model, path in calls:
            specs = perf.fetch_input_specs(url, model)
            request = perf.read_input_data(path, specs)[0]
            tensors = []
            for name, array in request.items():
                batched = np.ascontiguousarray(array[None])
                tensor = httpclient.InferInput(name, list(batched.shape), specs[name].data_type[5:])
                tensor.set_data_from_numpy(batched, binary_data=True)
                tensors.append(tensor)
            for _ in range(requests):
                client.infer(model, tensors)
    finally:
        client.close()


def measure_level(
    url: str, label: str, role: str, data: Path, level: int, window: int, output_dir: Path
) -> dict[str, Any]:
    """One perf_analyzer measurement; a failure is recorded in the row, not raised."""
    settings = get_settings()
    model = settings.encoder_model if role == ENCODER else settings.decoder_model
    options = perf.PerfOptions(
        window_requests=window,
        stability_percentage=ALWAYS_STABLE,
        max_trials=WINDOWS,
        timeout_s=600,
    )
    try:
        (result,) = perf.run_perf_analyzer(
            model, url, data, [level], output_dir, f"{label} {role}", options, stream=None
        )
    except perf.PerfError as exc:
        log.error("%s %s at concurrency %d failed: %s", label, role, level, exc)
        return {"role": role, "concurrency": level, "error": str(exc)[-500:]}
    log.info(
        "%-22s %-7s c=%d  %6.2f infer/s  p50 %7.1f ms  queue %6.1f  compute %6.1f  batch %.2f",
        label,
        role,
        level,
        result.throughput,
        result.latency_p50_ms,
        result.server_queue_ms,
        result.server_compute_infer_ms,
        result.avg_batch or 0,
    )
    return {"role": role, **dataclasses.asdict(result)}


def _schedule(inputs: Inputs, levels: Levels) -> list[tuple[str, Path, int, int]]:
    return [
        *((ENCODER, inputs.encoder, level, levels.encoder_window) for level in levels.encoder),
        *((DECODER, inputs.decoder, level, levels.decoder_window) for level in levels.decoder),
        *(
            (DECODER_BATCH, inputs.decoder_batch, level, levels.decoder_batch_window)
            for level in levels.decoder_batch
        ),
    ]


def run_levels(
    server: TritonServer, label: str, inputs: Inputs, levels: Levels, output_dir: Path
) -> list[dict[str, Any]]:
    """Every level of one server, in order."""
    return [
        measure_level(server.http_url, label, role, data, level, window, output_dir)
        for role, data, level, window in _schedule(inputs, levels)
    ]


WhileUp = Callable[[TritonServer, Path], dict[str, Any]]


def start_variant(variant: Variant, stack: ExitStack) -> tuple[TritonServer, Path]:
    """Write the variant's repository and start its Triton; `stack` stops it."""
    repository = materialize(variant, REPOSITORIES)
    server = TritonServer(
        repository,
        free_port(),
        free_port(),
        free_port(),
        log_path=LOG_DIR / f"triton-{variant.name}.log",
        work_dir=BENCH_DIR / "triton",
        environment=variant.environment,
    )
    stack.enter_context(server)
    return server, repository


def measure_variants(
    variants: list[Variant],
    levels: Levels,
    inputs: Inputs | None = None,
    while_up: WhileUp | None = None,
    rounds: int = 1,
    first: WhileUp | None = None,
) -> tuple[list[dict[str, Any]], Inputs]:
    """One Triton per variant, all up at once, measured interleaved; always all stopped.

    The machine's load drifts over minutes (other tenants), so measuring one variant after
    the other would compare different machines. Instead every (model, level) is measured on
    each variant back to back, the first variant rotating from turn to turn (A B, B A, ...);
    the idle servers use no CPU meanwhile. With `rounds` > 1 the whole schedule is repeated,
    so each figure is several alternating trials whose spread the report shows. `first` runs
    on each variant once it is ready, before any request (what a fresh server does), and
    `while_up` after the measurements.
    """
    records = [{**v.to_json(), "results": []} for v in variants]
    with ExitStack() as stack:
        started = time.perf_counter()
        servers = [start_variant(variant, stack) for variant in variants]
        for (server, _), record in zip(servers, records, strict=True):
            server.wait_ready(READY_TIMEOUT_S)
            record["startup_s"] = round(time.perf_counter() - started, 2)
        if first is not None:
            for (server, repository), record in zip(servers, records, strict=True):
                record.update(first(server, repository))
        inputs = inputs or write_inputs(servers[0][0].http_url)
        for server, _ in servers:
            warm_up(server.http_url, inputs, batch=bool(levels.decoder_batch))
        schedule = _schedule(inputs, levels)
        for turn in range(rounds * len(schedule)):
            role, data, level, window = schedule[turn % len(schedule)]
            order = [(turn + i) % len(variants) for i in range(len(variants))]
            for index in order:
                server, _ = servers[index]
                name = variants[index].name
                row = measure_level(
                    server.http_url, name, role, data, level, window, PERF_DIR / name
                )
                row["round"] = turn // len(schedule)
                records[index]["results"].append(row)
        for record in records:
            record["rounds"] = rounds
            record["results"].sort(
                key=lambda r: (r["role"] != ENCODER, r["concurrency"], r["round"])
            )
        if while_up is not None:
            for (server, repository), record in zip(servers, records, strict=True):
                record.update(while_up(server, repository))
    return records, inputs
