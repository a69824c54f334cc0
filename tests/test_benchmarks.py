"""The benchmark's own logic, in seconds: no Triton, no proxy, no model.

Percentiles and the load generator's bounds and error counts, the config.pbtxt edits that make
the variants, the queue-delay choice, and the report writer on a small synthetic result set.
The measurements themselves run only under `make bench`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import numpy as np
import pytest

from benchmarks import analysis, loadgen, report, variants
from common.settings import PROJECT_ROOT
from testkit.masks import mask_iou

ENCODER_CONFIG = PROJECT_ROOT / "model_repository" / "mobilesam_encoder" / "config.pbtxt"


# --- load generator -----------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 5, 50, 95, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    samples = [float(v) for v in np.random.default_rng(0).exponential(100, 37)]
    assert loadgen.percentile(samples, q) == pytest.approx(np.percentile(samples, q))


def test_percentile_edge_cases() -> None:
    assert loadgen.percentile([7.0], 99) == 7.0
    assert np.isnan(loadgen.percentile([], 50))
    assert loadgen.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError):
        loadgen.percentile([1.0], 101)
    assert loadgen.summarize([]) == {}
    summary = loadgen.summarize([10.0, 20.0, 30.0])
    assert (summary["p50"], summary["mean"], summary["min"], summary["max"]) == (20, 20, 10, 30)


def _run(handler, **kwargs) -> loadgen.LoadResult:
    def factory(index: int) -> loadgen.Request:
        return loadgen.Request("/segment-image", {"i": str(index)})

    options = {"concurrency": 3, "max_requests": 10, "max_seconds": 30.0, **kwargs}
    return asyncio.run(
        loadgen.run_load(
            "http://bench.invalid",
            factory,
            target="t",
            workload="w",
            transport=httpx.MockTransport(handler),
            **options,
        )
    )


def test_load_generator_counts_successes_and_errors_by_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        index = int(parse_qs(request.content.decode())["i"][0])  # no file: url-encoded form
        if index % 5 == 4:
            return httpx.Response(503, json={"code": "triton_unavailable"})
        return httpx.Response(200, json={"timings_ms": {"decoder": 10.0, "total": 12.0}})

    result = _run(handler)

    assert result.requests == 10 and result.stopped_by == "count"
    assert result.ok == 8 and result.errors == {"503": 2}
    assert result.latency_ms["p50"] > 0 and result.throughput > 0
    assert result.stage_ms == {"decoder": 10.0, "total": 12.0}


def test_load_generator_stops_at_its_time_limit() -> None:
    async def slow(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return httpx.Response(200, json={})

    result = _run(slow, concurrency=2, max_requests=10_000, max_seconds=0.3)

    assert result.stopped_by == "time"
    assert 2 <= result.requests < 40 and result.ok == result.requests
    assert result.duration_s < 2


def test_load_generator_counts_transport_errors() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    result = _run(broken, concurrency=1, max_requests=3)

    assert result.ok == 0 and result.errors == {"ConnectError": 3}
    assert result.latency_ms == {} and result.throughput == 0


def test_mask_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert mask_iou(a, b) == 1.0  # both empty: they agree
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)


# --- variants -------------------------------------------------------------------------------


def test_committed_config_is_read() -> None:
    config = variants.read_config(ENCODER_CONFIG.read_text())
    assert config.batching and config.queue_delay_us is not None
    assert config.instances * config.threads <= 2  # the machine's cores
    assert config.runtime in ("onnxruntime", "openvino")


def test_config_edits_round_trip() -> None:
    text = ENCODER_CONFIG.read_text()
    config = variants.read_config(text)
    edited = variants.ModelConfig(
        batching=True,
        queue_delay_us=12345,
        instances=2,
        threads=1,
        runtime="openvino",
        precision="bf16",
        max_work=4,
        max_batch_size=1,
    )

    result = variants.apply_config(text, edited)

    assert variants.read_config(result) == edited
    assert "max_queue_size" in result  # the rest of the batching block is kept
    unbatched = variants.apply_config(
        text, variants.ModelConfig(**{**vars(config), "batching": False})
    )
    assert "dynamic_batching" not in unbatched and "max_queue_size" not in unbatched
    assert variants.read_config(unbatched).batching is False
    assert 'name: "images"' in unbatched and "parameters [" in unbatched


def test_the_decoder_memory_arena_is_a_knob() -> None:
    text = (ENCODER_CONFIG.parent.parent / "mobilesam_decoder" / "config.pbtxt").read_text()
    config = variants.read_config(text)
    assert config.memory_arena in ("true", "false")
    other = "false" if config.memory_arena == "true" else "true"
    edited = variants.ModelConfig(**{**vars(config), "memory_arena": other, "max_work": 7})

    assert variants.read_config(variants.apply_config(text, edited)) == edited


def test_block_span_skips_braces_in_comments() -> None:
    text = "a: 1\ndynamic_batching {\n  # a } in a comment\n  x { y: 1 }\n}\nb: 2\n"
    start, end = variants.block_span(text, "dynamic_batching")
    assert text[start:end].endswith("x { y: 1 }\n}")
    assert variants.block_span(text, "missing") is None


def test_config_edit_fails_loudly_on_an_unknown_layout() -> None:
    with pytest.raises(variants.ConfigEditError):
        variants.read_config('name: "m"\n')


# --- analysis and report --------------------------------------------------------------------


def _perf(role: str, concurrency: int, throughput: float, compute: float, batch: float = 1.0):
    return {
        "role": role,
        "concurrency": concurrency,
        "throughput": throughput,
        "avg_batch": batch,
        "latency_avg_ms": compute + 5,
        "latency_p50_ms": compute + 5,
        "latency_p95_ms": compute + 9,
        "latency_p99_ms": compute + 10,
        "server_queue_ms": 1.0,
        "server_compute_input_ms": 1.0,
        "server_compute_infer_ms": compute - 2,
        "server_compute_output_ms": 1.0,
    }


def _config(**changes) -> dict:
    base = {
        "batching": True,
        "queue_delay_us": 1000,
        "instances": 1,
        "threads": 2,
        "runtime": "onnxruntime",
        "precision": "fp32",
    }
    return {**base, **changes}


def _variant(name: str, results: list[dict], **changes) -> dict:
    configs = {"mobilesam_encoder": _config(**changes), "mobilesam_decoder": _config(**changes)}
    return {"name": name, "description": name, "configs": configs, "results": results}


def _load(target: str, workload: str, concurrency: int, throughput: float, p50: float) -> dict:
    return {
        "target": target,
        "workload": workload,
        "concurrency": concurrency,
        "requests": 10,
        "ok": 10,
        "errors": {},
        "duration_s": 10 / throughput,
        "throughput": throughput,
        "latency_ms": {"p50": p50, "p95": p50 * 1.2, "p99": p50 * 1.3, "mean": p50},
        "stopped_by": "count",
        "stage_ms": {"encoder": 500.0, "decoder": 40.0, "postprocess": 8.0, "total": p50 - 5},
    }


def _first_layers(prompts: int, folded: float, shared: float) -> dict:
    def timing(ms: float) -> dict:
        return {"median_ms": ms, "range_ms": [ms * 0.9, ms * 1.1], "trials": 8}

    return {
        "prompts": prompts,
        "max_abs_difference": 3e-7,
        "folded": timing(folded),
        "shared": timing(shared),
    }


def synthetic_results() -> dict[str, dict]:
    batching = [
        _variant(
            "no-batching-1x2",
            [_perf("encoder", 4, 1.6, 600), _perf("decoder", 8, 25, 38)],
            batching=False,
        ),
        _variant(
            "batching-1x2", [_perf("encoder", 4, 1.4, 2700, 4), _perf("decoder", 8, 30, 120, 4)]
        ),
    ]
    runtime = [
        _variant("onnxruntime-fp32", [_perf("encoder", 1, 1.6, 600), _perf("decoder", 1, 25, 38)]),
        _variant(
            "openvino-fp32",
            [_perf("encoder", 1, 2.0, 480), _perf("decoder", 1, 22, 42)],
            runtime="openvino",
        ),
        _variant(
            "openvino-bf16",
            [_perf("encoder", 1, 3.0, 310), _perf("decoder", 1, 30, 30)],
            runtime="openvino",
            precision="bf16",
        ),
    ]
    e2e = _variant("committed", [])
    e2e["compute"] = [_perf("encoder", 1, 1.6, 600), _perf("decoder", 1, 25, 38)]
    cold = _load("ours", "cold", 1, 1.5, 680)
    cold["triton"] = {  # Triton's statistics over the same requests
        "encoder": {"requests": 10, "executions": 10, "queue_ms": 1.0, "compute_ms": 610.0},
        "decoder": {"requests": 10, "executions": 10, "queue_ms": 1.0, "compute_ms": 40.0},
    }
    e2e["ours"] = [
        cold,
        _load("ours", "cold", 4, 1.7, 2300),
        _load("ours", "cached", 1, 20, 45),
    ]
    e2e["baseline"] = [
        _load("baseline", "cold", 1, 0.7, 1400),
        _load("baseline", "cold", 4, 0.7, 5600),
    ]
    e2e["everything"] = [
        {
            "name": "upstream defaults",
            "settings": {},
            "prompts": 1024,
            "image": {"name": "portrait-jpeg", "width": 427, "height": 640},
            "ours": {"status": 200, "ms": 40_000.0, "count": 3, "timings": {}},
            "upstream": {"status": 200, "ms": 120_000.0, "count": 3, "timings": {}},
            "triton": {
                "encoder": {"requests": 1, "executions": 1, "queue_ms": 0.0, "compute_ms": 600.0},
                "decoder": {
                    "requests": 16,
                    "executions": 15,  # two calls batched: both count that execution
                    "queue_ms": 0.0,
                    "compute_ms": 38_400.0,
                    "execution_compute_ms": 36_000.0,
                },
            },
        },
        {
            "name": "many masks",
            "settings": {"points_per_side": 8},
            "prompts": 64,
            "image": {"name": "landscape-png", "width": 451, "height": 300},
            "ours": {"status": 200, "ms": 4_000.0, "count": 40, "timings": {}},
            "upstream": {"status": 504, "detail": "timed out"},
            "triton": {
                "encoder": {"requests": 1, "executions": 1, "queue_ms": 0.0, "compute_ms": 600.0},
                "decoder": {"requests": 1, "executions": 1, "queue_ms": 0.0, "compute_ms": 3000.0},
            },
        },
    ]
    e2e["reprompt_image"] = {"name": "portrait-jpeg", "width": 427, "height": 640}
    e2e["transport"] = {
        "shared_memory": [_load("shared_memory", "cached", 1, 10, p50) for p50 in (90, 80, 95)],
        "http": [_load("http", "cached", 1, 9, p50) for p50 in (100, 99, 120)],
        "everything": {
            "name": "upstream defaults",
            "prompts": 1024,
            "shared_memory": [{"status": 200, "ms": 40_000.0}, {"status": 200, "ms": 42_000.0}],
            "http": [{"status": 200, "ms": 44_000.0}, {"status": 200, "ms": 46_200.0}],
        },
    }
    # The fast profile: the same configs, PRECISION=bf16 in Triton's environment.
    e2e["fast"] = {**_variant("fast", []), "environment": {"PRECISION": "bf16"}}
    e2e["compute_by_target"] = {
        "ours": e2e["compute"],
        "ours-fast": [_perf("encoder", 1, 3.2, 320), _perf("decoder", 1, 30, 30)],
    }
    fast_cached = _load("ours-fast", "cached", 1, 40, 18)
    fast_cached["stage_ms"] = {"decoder": 12.0, "postprocess": 3.0, "total": 16.0}
    fast_cached["triton"] = {
        "decoder": {"requests": 20, "executions": 20, "queue_ms": 0.1, "compute_ms": 9.0}
    }
    e2e["ours-fast"] = [_load("ours-fast", "cold", 4, 2.4, 1600), fast_cached]
    e2e["everything"][0]["ours_fast"] = {"status": 200, "ms": 30_000.0, "count": 3}
    e2e["everything"][0]["triton_fast"] = e2e["everything"][0]["triton"]
    peak = {
        "measurements": [
            {
                "when": "start",
                "threads": 2,
                "matmul_side": 2048,
                "gflops": {"fp32": {"numpy": 190.0, "torch": 180.0}, "bf16": {"torch": 400.0}},
                "libraries": {"numpy": "numpy"},
                "encoder_gflop": 77.54,
                "encoder_gflop_source": "counted",
                "theoretical": {
                    "fp32": {"gflops": 313.0, "formula": "2 x 2 x 16 x 2 x 2.45"},
                    "bf16": {"gflops": 626.0, "formula": "2 x 2 x 16 x 2 x 2.45 x 2"},
                },
            }
        ]
    }
    run = {
        "mode": "quick",
        "machine": {"cpu": "Test CPU", "cores": 2},
        "versions": {},
        "sections": ["peak", "batching", "runtime", "e2e"],
        "complete": True,
        "duration_s": 120,
    }
    return {
        "run": run,
        "peak": peak,
        "batching": {"variants": batching},
        "runtime": {"variants": runtime, "parity": {"comparisons": []}},
        "graph": {
            "levels": [
                _first_layers(1, folded=40.0, shared=50.0),
                _first_layers(16, folded=560.0, shared=540.0),
            ],
            "committed_up_to_prompts": 1,
            "threads": 2,
        },
        "e2e": e2e,
        "int8": {
            "capabilities": ["FP32", "INT8"],
            "quantize_s": 60.0,
            "calibration_photos": 4,
            "trials": 3,
            "ms": {"fp32": [1500.0, 1400.0, 1450.0], "int8": [1420.0, 1500.0, 1390.0]},
            "median_ms": {"fp32": 1450.0, "int8": 1420.0},
            "max_abs_error": 4.6,
            "relative_mean_error": 0.6,
        },
    }


def test_targets_are_ratios_within_the_run_for_both_profiles() -> None:
    targets = {t.name: t for t in analysis.targets(synthetic_results())}

    speedup = targets["cold throughput at concurrency 4 vs in-process PyTorch (default)"]
    assert speedup.measured.startswith("2.43x") and not speedup.met  # 1.7 / 0.7, goal 3.5
    assert "short by 31%" in speedup.detail
    fast = targets["cold throughput at concurrency 4 vs in-process PyTorch (fast)"]
    assert fast.goal == ">= 6x" and fast.measured.startswith("3.43x")  # 2.4 / 0.7
    encoder = targets["encoder vs the best measured fp32 matmul (default)"]
    assert encoder.measured.startswith("68%")  # 77.54 GFLOP / 0.6 s / 190 GFLOP/s
    assert "41% of the theoretical 313" in encoder.detail
    encoder = targets["encoder vs the best measured bf16 matmul (fast)"]
    assert encoder.measured.startswith("63%")  # 77.54 GFLOP / 0.31 s (best) / 400 GFLOP/s
    cached = targets["cached re-prompt p50, one click, concurrency 1 (default)"]
    assert cached.goal == "<= 25 ms" and cached.met is False  # 45 ms
    cached = targets["cached re-prompt p50, one click, concurrency 1 (fast)"]
    assert cached.goal == "<= 20 ms" and cached.met  # 18 ms
    assert "decoder compute 9.0 ms" in cached.detail and "through the Python backend 3.0" in (
        cached.detail
    )
    everything = targets["segment everything vs upstream generator (default)"]
    assert everything.goal == ">= 8x" and everything.measured.startswith("3.00x")  # 120 / 40 s
    assert "36.0 s of the 40.0 s (90%; 35 ms per prompt in 16 calls)" in everything.detail
    assert "1.7 GFLOP per prompt here (3.6 upstream" in everything.detail
    assert "1.7 TFLOP for 1024 prompts, done at 48 GFLOP/s (25% of" in everything.detail
    assert "An 8x speed-up" not in everything.detail and "A 8x speed-up allows 15.0 s" in (
        everything.detail
    )
    everything = targets["segment everything vs upstream generator (fast)"]
    assert everything.goal == ">= 10x" and everything.measured.startswith("4.00x")  # 120 / 30


def test_trials_are_medians_with_their_spread() -> None:
    rows = [
        {**_perf("encoder", 1, throughput, compute), "round": index}
        for index, (throughput, compute) in enumerate(((1.0, 900), (1.4, 600), (1.2, 700)))
    ]
    (row,) = analysis.perf_rows({"results": rows}, "encoder")
    assert row["throughput"] == 1.2 and row["trials"] == 3
    assert row["throughput_range"] == [1.0, 1.4]
    assert analysis.spread(row) == "1.20/s (1.00-1.40 over 3 trials)"


def test_a_cpu_without_bf16_compares_bf16_configs_with_the_fp32_peak() -> None:
    peak = {"measurements": [{"gflops": {"fp32": {"openvino": 120.0, "numpy": 90.0}}}]}
    assert not analysis.computes_bf16(peak)
    assert analysis.effective_precision(peak, "bf16") == "fp32"
    assert analysis.peak_gflops(peak, "fp32") == (120.0, "openvino")  # the best library


def test_decoder_arithmetic_is_counted_from_its_shapes() -> None:
    # Upstream: ten 4096x256x128 projections alone are 2.68 GFLOP; the upscaling adds 0.8 more.
    assert 3.5 < analysis.decoder_gflop(1) < 3.7
    # Ours: three projections per image, each prompt's seven folded products 0.82 GFLOP and the
    # same upscaling; the folding pays for itself from the first prompt.
    shared = 3 * analysis.PROJECTION_GFLOP
    per_prompt = analysis.decoder_gflop(64, images=1) - shared
    assert 1.6 < per_prompt / 64 < 1.7
    assert analysis.decoder_gflop(64, images=2) == pytest.approx(per_prompt + 2 * shared)
    # One click runs the first layer folded as well: ten folded products, nothing per image,
    # 2.0 GFLOP instead of 2.5 with the first layer shared and its three image projections.
    one_click = analysis.decoder_gflop(1, images=1)
    assert 1.7 < one_click < per_prompt / 64 + shared
    assert analysis.decoder_gflop(2, images=2) == pytest.approx(2 * one_click)


def test_recommendations_follow_the_data() -> None:
    choices = {c.knob: c for c in analysis.recommend(synthetic_results())}

    assert choices["encoder runtime (fp32)"].choice == "openvino"  # 1.25x faster
    assert choices["decoder runtime (fp32)"].choice == "onnxruntime"  # 0.89x
    assert choices["precision"].choice.startswith("fp32")
    assert choices["encoder dynamic batching"].choice.startswith("off")  # 1.4 vs 1.6/s
    assert choices["decoder dynamic batching"].choice == "on"  # 30 vs 25/s
    first_layer = choices["decoder first layer (export/branching.py)"]
    assert first_layer.choice == "folded for one prompt"  # 40 vs 50 ms
    assert first_layer.committed == "folded up to 1 prompt per image, shared above"
    assert "16 prompts 560 ms" in first_layer.why and "(0.96x)" in first_layer.why


def test_the_decoder_runtime_weighs_segment_everythings_calls_too() -> None:
    results = synthetic_results()
    runtime = {v["name"]: v for v in results["runtime"]["variants"]}
    # OpenVINO: 0.90x on one click, but twice as fast on segment everything's 64-prompt calls.
    runtime["onnxruntime-fp32"]["results"].append(_perf(analysis.DECODER_BATCH, 1, 0.4, 2400))
    runtime["openvino-fp32"]["results"].append(_perf(analysis.DECODER_BATCH, 1, 0.8, 1200))

    choice = {c.knob: c for c in analysis.recommend(results)}["decoder runtime (fp32)"]

    assert choice.choice == "openvino"
    assert "segment everything's calls 1200 ms vs 2400 ms (2.00x)" in choice.why


def test_the_decoder_merging_choice_compares_max_batch_sizes_with_the_same_queue() -> None:
    results = synthetic_results()
    merged = _variant(
        "batching-1x2",
        [_perf("decoder", 1, 20, 45), _perf("decoder", 8, 30, 120, 2)],
        max_batch_size=8,
    )
    single = _variant(
        analysis.DECODER_OTHER_MAX_BATCH_VARIANT,
        [_perf("decoder", 1, 21, 44), _perf("decoder", 8, 36, 60)],
        max_batch_size=1,
    )
    results["batching"]["variants"][1:] = [merged, single]
    knob = "decoder max_batch_size (merging queued requests)"

    choice = {c.knob: c for c in analysis.recommend(results)}[knob]

    assert choice.choice == "1"  # 36 vs 30/s
    assert "(1.20x)" in choice.why and "mean batch 2.0" in choice.why

    single["results"][1]["throughput"] = 31.0  # within the noise: keep what is committed
    choice = {c.knob: c for c in analysis.recommend(results)}[knob]
    assert choice.choice == "keep 8 (within noise)"
    assert knob not in {c.knob for c in analysis.recommend(synthetic_results())}


def test_the_arena_choice_weighs_both_decoder_workloads_and_shows_memory() -> None:
    results = synthetic_results()
    runtime = results["runtime"]["variants"]
    committed = runtime[0]
    committed["configs"]["mobilesam_decoder"]["memory_arena"] = "true"
    committed["results"].append(_perf(analysis.DECODER_BATCH, 1, 0.4, 2000))
    committed["decoder_memory"] = {"prompts": 16, "peak_mb": 1000.0, "resident_after_mb": 1000.0}
    other = _variant(
        analysis.OTHER_ARENA_VARIANT,
        [_perf("decoder", 1, 20, 57), _perf(analysis.DECODER_BATCH, 1, 0.4, 2600)],
        memory_arena="false",
    )
    other["decoder_memory"] = {"prompts": 32, "peak_mb": 870.0, "resident_after_mb": 160.0}
    runtime.append(other)
    knob = "decoder memory arena (ONNX Runtime)"

    choice = {c.knob: c for c in analysis.recommend(results)}[knob]

    assert choice.choice == "on"  # 2600 vs 2000 ms and 57 vs 38 ms: mean gain 1.40x
    assert "(1.30x)" in choice.why and "(1.50x)" in choice.why
    assert "1000 MB (16 prompts), 1000 MB once idle vs 870 MB (32 prompts)" in choice.why
    other["results"] = [_perf("decoder", 1, 20, 38), _perf(analysis.DECODER_BATCH, 1, 0.4, 2100)]
    choice = {c.knob: c for c in analysis.recommend(results)}[knob]
    assert choice.choice == "keep on (within noise)"


def test_queue_delay_prefers_the_smallest_delay_that_is_as_good() -> None:
    def record(delay: int, throughputs: list[float]) -> dict:
        rows = [_perf("decoder", c, t, 40) for c, t in zip((2, 8), throughputs, strict=True)]
        return _variant(f"d{delay}", rows, queue_delay_us=delay)

    records = [record(0, [15, 18]), record(1000, [21, 25]), record(16000, [22, 26])]

    choice = analysis.choose_queue_delay(records)

    assert choice["delay_us"] == 1000  # 16000 is better by less than the noise
    assert analysis.choose_queue_delay([]) is None


def test_report_is_written_from_results(tmp_path: Path) -> None:
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    for name, payload in synthetic_results().items():
        (results_dir / f"{name}.json").write_text(json.dumps(payload))
    report_path = tmp_path / "BENCHMARKS.md"

    report.write_report(results_dir, report_path, tmp_path / "plots")

    text = report_path.read_text()
    for heading in (
        "## Targets",
        "## Defaults chosen from the data",
        "## End to end",
        "## Runtime and precision",
        "## Matmul peak and encoder efficiency",
        "## QPS and sizing",
        "## Reproduce",
    ):
        assert heading in text
    assert "the comparison, not part of the product" in text
    assert "### Segment everything vs upstream's generator" in text
    assert (
        "| upstream defaults (defaults) | default | 1024 | 40.0 | 120.0 | 3.00x | 3 | 3 | 36.0 |"
        in text
    )
    assert "| upstream defaults (defaults) | fast | 1024 | 30.0 | 120.0 | 4.00x | 3 | 3 |" in text
    assert "| default | 64 | 4.0 | failed: 504 timed out | - | 40 | - | 3.0 |" in text
    assert "| 4 | 1.70 | 2.40 | 0.70 | 2.43x | 3.43x |" in text  # both profiles vs baseline
    assert "### Decoder answers through shared memory" in text
    assert "| 90.0 (80.0-95.0) | 100 (99.0-120) | 1.11x |" in text  # medians of p50s
    assert "| 41.0 (40.0, 42.0) | 45.1 (44.0, 46.2) | 1.10x |" in text
    assert "| CPU | fp32 | theoretical: 2 x 2 x 16 x 2 x 2.45 | 313 |" in text
    assert "so the fast profile does not use it: it is not faster (1.02x) and it moves" in text
    assert "random-init" in text and "Test CPU" in text
    plots = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert "e2e_cold.png" in plots and "runtime.png" in plots
    assert "](plots/e2e_cold.png)" in text  # relative to the report


def test_report_survives_missing_sections(tmp_path: Path) -> None:
    report_path = tmp_path / "BENCHMARKS.md"
    report.write_report(tmp_path / "nothing", report_path, tmp_path / "plots")
    assert "Not measured in this run." in report_path.read_text()


def test_baseline_takes_generator_settings_by_upstream_names() -> None:
    from benchmarks.baseline_pytorch import generator_settings

    form = {"points_per_side": "8", "pred_iou_thresh": "0", "prompts": "[]", "file": "x"}
    assert generator_settings(form) == {"points_per_side": 8, "pred_iou_thresh": 0.0}


def test_triton_split_counts_each_execution_once() -> None:
    from benchmarks.e2e import stats_delta

    def stats(requests: int, per_request_ns: int, execution_ns: int) -> dict:
        phases = {"queue": 0, "compute_input": 0, "compute_output": 0}
        return {
            "decoder": {
                "requests": requests,
                "executions": requests - 1,
                "compute_infer": per_request_ns,
                "execution_compute": execution_ns,
                **phases,
            }
        }

    # Two requests batched into one 3 s execution: each reports 3 s.
    delta = stats_delta(stats(0, 0, 0), stats(2, 6_000_000_000, 3_000_000_000), served=2)
    assert delta["decoder"]["compute_ms"] == 3000.0  # per request
    assert delta["decoder"]["execution_compute_ms"] == 3000.0  # in all


def test_the_first_layer_comparison_runs_each_branch_of_the_export(
    model_repository: Path, settings
) -> None:
    """The `graph` section lifts each branch of model.onnx's If into a model of its own: each
    answers as the whole model does where the If picks it, and the section times both."""
    import onnx
    import onnxruntime as ort

    from benchmarks import decoder_graph
    from export.manifest import ExportTarget

    path = ExportTarget(model_repository, settings.decoder_model).onnx_path
    model = onnx.load(str(path))

    def run(candidate: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
        session = ort.InferenceSession(
            candidate.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return session.run(None, feeds)

    for prompts, folded in ((1, True), (3, False)):
        feeds = decoder_graph.click_inputs(prompts)
        whole = run(model, feeds)
        branch = run(decoder_graph.branch_model(model, folded), feeds)
        for ours, theirs in zip(branch, whole, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)

    record = decoder_graph.compare_first_layers(path, rounds=2)
    assert [level["prompts"] for level in record["levels"]] == [1, decoder_graph.MANY_PROMPTS]
    for level in record["levels"]:
        assert level["max_abs_difference"] < 1e-4
        for form in ("folded", "shared"):
            assert level[form]["trials"] == 2 and level[form]["median_ms"] > 0
