"""`python -m benchmarks [--quick]`: measure everything in one run, then rewrite BENCHMARKS.md.

Sections, in order (each writes its raw JSON to build/bench/results/ as soon as it ends):

  peak      matmul peak at fp32/bf16 and the encoder's FLOP count (again at the end)
  delay     decoder queue-delay sweep (full run only): picks the delay the next sections use
  batching  dynamic batching off/on x instances x threads, both models (perf_analyzer)
  runtime   ONNX Runtime vs OpenVINO fp32 vs OpenVINO bf16, with mask parity via the proxy
  graph     the decoder's first layer folded vs shared, at one prompt and at 16 (in process)
  int8      the encoder quantized to int8 against fp32 (full run only)
  e2e       both precision profiles under load, and the in-process PyTorch baseline

Every server is started by this process and stopped on the way out, also on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import analysis, assets, int8, report
from benchmarks.common import (
    BENCH_DIR,
    LOG_DIR,
    RESULTS_DIR,
    SECTIONS,
    load_average,
    machine_info,
    package_versions,
    write_json,
)
from benchmarks.decoder_graph import compare_first_layers
from benchmarks.e2e import (
    EVERYTHING_TRANSPORT_ROUNDS,
    Profile,
    decoder_memory,
    run_end_to_end,
    runtime_checks,
)
from benchmarks.peak import run_in_subprocess
from benchmarks.plan import PLANS, Plan
from benchmarks.triton_sweeps import (
    BATCH_PROMPTS,
    READY_TIMEOUT_S,
    Inputs,
    Levels,
    WhileUp,
    measure_variants,
    start_variant,
    warm_up,
    write_inputs,
)
from benchmarks.variants import SOURCE_REPOSITORY, Variant, committed_variant
from common import contract
from export.manifest import ExportTarget
from serving.triton import TritonServer

log = logging.getLogger("bench")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Run:
    """State shared by the sections of one run."""

    def __init__(self, plan: Plan, source: Path) -> None:
        self.plan = plan
        self.committed = committed_variant(source)
        self.inputs: Inputs | None = None
        self.photos = assets.photo_uploads()
        self.parity_photos = assets.photo_uploads(skip_tiny=False)[: plan.parity_photos]
        # Each profile's stream: its warm-up, the cold levels, segment everything (and, for the
        # default profile, the transport comparison's images), with a margin.
        pool_size = (
            2 * plan.warmup_requests
            + plan.cold.total()
            + len(plan.everything)
            + EVERYTHING_TRANSPORT_ROUNDS
            + 2
        )
        self.pool = assets.cold_pool(pool_size, self.photos)
        self.decoder_delay_us: int | None = None  # from the delay sweep, if it ran

    def section(self, name: str, payload: dict[str, Any]) -> None:
        payload = {"mode": self.plan.name, "measured_at": now(), **payload}
        write_json(RESULTS_DIR / f"{name}.json", payload)

    def measure(
        self,
        variants: list[Variant],
        levels: Levels,
        while_up: WhileUp | None = None,
        rounds: int = 1,
        first: WhileUp | None = None,
    ) -> list[dict[str, Any]]:
        records, self.inputs = measure_variants(
            variants, levels, self.inputs, while_up, rounds, first
        )
        return records

    def base(self) -> Variant:
        """The committed configuration with the tuned decoder queue delay, if there is one."""
        if self.decoder_delay_us is None:
            return self.committed
        return self.committed.with_model(
            contract.DECODER_MODEL,
            "committed",
            self.committed.description,
            queue_delay_us=self.decoder_delay_us,
        )


def run_peak(run: Run, when: str) -> dict[str, Any]:
    started = time.perf_counter()
    result = run_in_subprocess()
    result["when"] = when
    result["seconds"] = round(time.perf_counter() - started, 1)
    log.info("peak (%s): %s GFLOP/s", when, result["gflops"])
    return result


def run_delay(run: Run) -> None:
    plan = run.plan
    levels = Levels(decoder=plan.queue_delay_levels, decoder_window=plan.sweep.decoder_window)
    records = run.measure(
        [
            run.committed.with_model(
                contract.DECODER_MODEL,
                f"decoder-delay-{delay}us",
                f"decoder max_queue_delay_microseconds {delay}",
                queue_delay_us=delay,
            )
            for delay in plan.queue_delays_us
        ],
        levels,
    )
    choice = analysis.choose_queue_delay(records)
    run.decoder_delay_us = choice["delay_us"] if choice else None
    run.section("delay", {"variants": records, "choice": choice})


def batching_variants(run: Run) -> list[Variant]:
    base = run.base()
    variants = [
        base.with_changes(
            "no-batching-1x2",
            "no dynamic batching, 1 instance x 2 threads",
            batching=False,
            instances=1,
            threads=2,
        ),
        base.with_changes(
            "batching-1x2", "dynamic batching, 1 instance x 2 threads", instances=1, threads=2
        ),
        base.with_changes(
            "batching-2x1", "dynamic batching, 2 instances x 1 thread", instances=2, threads=1
        ),
    ]
    encoder = base.configs[contract.ENCODER_MODEL]
    if encoder.max_work is not None and encoder.max_work < 4:
        variants.append(
            base.with_changes("batching-1x2", "", instances=1, threads=2).with_model(
                contract.ENCODER_MODEL,
                "batching-1x2-whole",
                "dynamic batching, 1 instance x 2 threads, the encoder's batches run whole "
                "(max_work_per_run 4, not one image per runtime call)",
                max_work=4,
            )
        )
    decoder = base.configs[contract.DECODER_MODEL]
    if decoder.batching and decoder.max_batch_size is not None:
        # The decoder's queue (and its bound) with and without merging requests into one call.
        merged = decoder.max_batch_size > 1
        variants.append(
            base.with_changes("batching-1x2", "", instances=1, threads=2).with_model(
                contract.DECODER_MODEL,
                analysis.DECODER_OTHER_MAX_BATCH_VARIANT,
                "dynamic batching, 1 instance x 2 threads, decoder max_batch_size "
                + (
                    "1 (the bounded queue kept, requests never merged)"
                    if merged
                    else f"{analysis.DECODER_MERGED_MAX_BATCH} (queued requests merged)"
                ),
                max_batch_size=1 if merged else analysis.DECODER_MERGED_MAX_BATCH,
            )
        )
    if run.plan.fourth_cell:
        variants.append(
            base.with_changes(
                "no-batching-2x1",
                "no dynamic batching, 2 instances x 1 thread",
                batching=False,
                instances=2,
                threads=1,
            )
        )
    return variants


def run_batching(run: Run) -> None:
    records = run.measure(batching_variants(run), run.plan.sweep, rounds=run.plan.rounds)
    run.section("batching", {"variants": records, "decoder_delay_us": run.decoder_delay_us})


def run_runtime(run: Run) -> None:
    base = run.base()
    variants = [
        base.with_changes(
            "onnxruntime-fp32", "ONNX Runtime fp32", runtime="onnxruntime", precision="fp32"
        ),
        base.with_changes("openvino-fp32", "OpenVINO fp32", runtime="openvino", precision="fp32"),
        base.with_changes("openvino-bf16", "OpenVINO bf16", runtime="openvino", precision="bf16"),
        # What serving/triton.py's malloc tunables buy: the same as the first, 4 KB pages.
        base.with_changes("", "", runtime="onnxruntime", precision="fp32").with_environment(
            analysis.SMALL_PAGES_VARIANT,
            "ONNX Runtime fp32, malloc without transparent huge pages",
            GLIBC_TUNABLES="glibc.malloc.hugetlb=0",
        ),
    ]
    decoder = base.configs[contract.DECODER_MODEL]
    if decoder.memory_arena is not None and decoder.max_work is not None:
        # The decoder's other memory arena setting at about the same peak memory: the arena
        # holds about twice the live activations, so it gets half the prompts per call.
        arena = decoder.memory_arena == "true"
        prompts = decoder.max_work * 2 if arena else max(1, decoder.max_work // 2)
        variants.append(
            base.with_changes("", "", runtime="onnxruntime", precision="fp32").with_model(
                contract.DECODER_MODEL,
                analysis.OTHER_ARENA_VARIANT,
                f"ONNX Runtime fp32, the decoder {'without' if arena else 'with'} its memory "
                f"arena, {prompts} prompts per call",
                memory_arena="false" if arena else "true",
                max_work=prompts,
            )
        )

    def checks(server: TritonServer, repository: Path) -> dict[str, Any]:
        return runtime_checks(run.plan, server, repository, run.parity_photos, run.pool)

    def memory(server: TritonServer, _repository: Path) -> dict[str, Any]:
        return {"decoder_memory": decoder_memory(server)}

    records = run.measure(
        variants, run.plan.runtime_sweep, checks, rounds=run.plan.rounds, first=memory
    )
    parity = analysis.parity_summary(records)
    for record in records:  # the masks were only needed for the comparison
        record.pop("parity_masks", None)
    run.section("runtime", {"variants": records, "parity": parity, "batch_prompts": BATCH_PROMPTS})


def run_int8() -> dict[str, Any]:
    source = assets.EXPORT_DIR / contract.ENCODER_MODEL / "1" / "model.onnx"
    result = int8.run_in_subprocess(source, BENCH_DIR / "int8")
    log.info("int8 encoder: %s", result["median_ms"])
    return result


def run_graph(run: Run) -> dict[str, Any]:
    return compare_first_layers(
        ExportTarget(assets.EXPORT_DIR, contract.DECODER_MODEL).onnx_path,
        run.committed.configs[contract.DECODER_MODEL],
    )


def fast_profile(base: Variant) -> Variant:
    """The committed configuration with the fast profile switched on, as it is deployed."""
    return base.with_environment(
        "fast", "PRECISION=bf16: the fast profile (OpenVINO bf16)", PRECISION="bf16"
    )


def run_e2e(run: Run) -> None:
    variants = [run.committed, fast_profile(run.committed)]
    with ExitStack() as stack:
        servers = [start_variant(variant, stack) for variant in variants]
        for server, _ in servers:
            server.wait_ready(READY_TIMEOUT_S)
        run.inputs = run.inputs or write_inputs(servers[0][0].http_url)
        for server, _ in servers:
            warm_up(server.http_url, run.inputs)
        profiles = [
            Profile(target, variant.precision, server, repository)
            for target, variant, (server, repository) in zip(
                ("ours", "ours-fast"), variants, servers, strict=True
            )
        ]
        record = run_end_to_end(
            run.plan,
            profiles,
            run.inputs,
            run.pool,
            run.photos,
            assets.CHECKPOINT_PATH,
            run.parity_photos,
        )
    run.section("e2e", {**run.committed.to_json(), "fast": variants[1].to_json(), **record})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run, about 3 minutes")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite BENCHMARKS.md from the last results"
    )
    parser.add_argument("--no-report", action="store_true", help="do not rewrite BENCHMARKS.md")
    parser.add_argument(
        "--config-source",
        type=Path,
        default=SOURCE_REPOSITORY,
        help="model repository whose config.pbtxt files are the baseline configuration "
        "(default: model_repository/), e.g. to measure proposed defaults before committing",
    )
    args = parser.parse_args(argv)
    args.sections = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    return args


def configure_logging() -> None:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(), logging.FileHandler(LOG_DIR / "bench.log")]
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", handlers=handlers
    )
    logging.getLogger("perf").setLevel(logging.WARNING)  # one line per perf_analyzer call
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    if args.report_only:
        log.info("wrote %s", report.write_report())
        return 0

    def terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    plan = PLANS["quick" if args.quick else "full"]
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "mode": plan.name,
        "started": now(),
        "sections": args.sections,
        "machine": machine_info(),
        "versions": package_versions(),
        "load_before": load_average(),
        "config_source": str(args.config_source),
        "section_seconds": {},
        "section_load": {},
        "complete": False,
    }
    status = 0
    try:
        assets.ensure_export(assets.ensure_checkpoint())
        run = Run(plan, args.config_source)
        peaks = []
        steps = {
            "peak": lambda: peaks.append(run_peak(run, "start")),
            "delay": lambda: run_delay(run) if plan.queue_delays_us else None,
            "batching": lambda: run_batching(run),
            "runtime": lambda: run_runtime(run),
            "graph": lambda: run.section("graph", run_graph(run)),
            "int8": lambda: run.section("int8", run_int8()) if plan.int8 else None,
            "e2e": lambda: run_e2e(run),
        }
        for name in SECTIONS:
            if name not in args.sections:
                continue
            log.info("=== %s ===", name)
            section_started = time.perf_counter()
            load_at_start = load_average()[:1]
            steps[name]()
            meta["section_seconds"][name] = round(time.perf_counter() - section_started, 1)
            meta["section_load"][name] = load_at_start + load_average()[:1]
            if name == "peak":
                run.section("peak", {"measurements": peaks})
        if "peak" in args.sections and plan.peak_at_end:
            peaks.append(run_peak(run, "end"))
            run.section("peak", {"measurements": peaks})
        meta["complete"] = True
    except KeyboardInterrupt:
        log.warning("interrupted: servers stopped, partial results kept")
        status = 130
    finally:
        meta["finished"] = now()
        meta["duration_s"] = round(time.perf_counter() - started, 1)
        meta["load_after"] = load_average()
        write_json(RESULTS_DIR / "run.json", meta)
        log.info("run took %.0f s", meta["duration_s"])
    if not args.no_report:
        log.info("wrote %s", report.write_report())
    return status


if __name__ == "__main__":
    sys.exit(main())
