"""Figures derived from the raw results: the targets, the chosen defaults and why.

Pure functions of the JSON in build/bench/results/, so that the report can be regenerated and
tested without running anything. A target is a ratio measured within one run, never an
assertion: a miss is reported with its size and with what bounds it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from benchmarks.peak import ENCODER_GFLOP_NOMINAL
from common import contract
from export.branching import FOLD_FIRST_LAYER_UP_TO_PROMPTS

Results = dict[str, Any]

ENCODER = "encoder"
DECODER = "decoder"  # one click per call
DECODER_BATCH = "decoder-batch"  # segment everything's calls (many prompts per call)
SMALL_PAGES_VARIANT = "onnxruntime-fp32-4k-pages"  # without serving/triton.py's malloc tunables
# The batching sweep's decoder with the other max_batch_size: 1 (never merge requests, queue
# kept) when the committed config merges, else this merged size.
DECODER_OTHER_MAX_BATCH_VARIANT = "batching-1x2-decoder-other-max-batch"
DECODER_MERGED_MAX_BATCH = 8
# The runtime sweep's ONNX Runtime decoder with the other memory_arena setting.
OTHER_ARENA_VARIANT = "onnxruntime-fp32-other-arena"
# Differences smaller than this are within the run-to-run noise of a shared 2-core machine:
# the data then does not argue for changing what is committed. A delay whose throughput is
# within it of the best counts as "as good", and the smaller delay wins, since every request
# pays it at low load.
NOISE = 0.10
DELAY_TOLERANCE = NOISE


def variant(section: Results | None, name: str) -> Results | None:
    for record in (section or {}).get("variants", []):
        if record.get("name") == name:
            return record
    return None


def perf_row(record: Results | None, role: str, concurrency: int) -> Results | None:
    for row in perf_rows(record, role):
        if row["concurrency"] == concurrency:
            return row
    return None


def perf_rows(record: Results | None, role: str) -> list[Results]:
    """One row per concurrency level: the median of its trials (alternating rounds), with
    `trials` and the range of throughput and compute over them."""
    by_level: dict[int, list[Results]] = {}
    for row in (record or {}).get("results", []):
        if row.get("role") == role and "error" not in row:
            by_level.setdefault(row["concurrency"], []).append(row)
    return [median_row(rows) for _, rows in sorted(by_level.items())]


def median_row(rows: list[Results]) -> Results:
    """Trials of one level -> their medians, field by field, plus their spread."""
    merged = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "round":
            values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
            merged[key] = float(statistics.median(values))
    merged["concurrency"] = rows[0]["concurrency"]
    merged["trials"] = len(rows)
    merged["throughput_range"] = [
        min(r["throughput"] for r in rows),
        max(r["throughput"] for r in rows),
    ]
    merged["compute_range"] = [min(compute_ms(r) for r in rows), max(compute_ms(r) for r in rows)]
    return merged


def spread(
    row: Results, key: str = "throughput_range", unit: str = "/s", value: float | None = None
) -> str:
    """`1.40/s (1.31-1.52 over 2 trials)`-style text for a median row (`value`: the median,
    when the row does not hold Triton's throughput or compute figures)."""
    low, high = row.get(key, [None, None])
    if value is None:
        value = row["throughput"] if key == "throughput_range" else compute_ms(row)
    text = f"{value:.2f}{unit}" if unit == "/s" else f"{value:.0f}{unit}"
    if row.get("trials", 1) > 1 and low is not None:
        fmt = "{:.2f}" if unit == "/s" else "{:.0f}"
        text += f" ({fmt.format(low)}-{fmt.format(high)} over {row['trials']} trials)"
    return text


def compute_ms(row: Results) -> float:
    """Server compute of one request: input + infer + output (queue and network excluded)."""
    return (
        row["server_compute_input_ms"]
        + row["server_compute_infer_ms"]
        + row["server_compute_output_ms"]
    )


def per_item_compute_ms(row: Results) -> float:
    """Compute time per inference: a batch of B shares one execution's time B ways."""
    return row["server_compute_infer_ms"] / (row.get("avg_batch") or 1.0)


def load_row(e2e: Results | None, target: str, workload: str, level: int) -> Results | None:
    for row in (e2e or {}).get(target, []):
        if row["workload"] == workload and row["concurrency"] == level:
            return row
    return None


def peak_gflops(peak: Results | None, precision: str) -> tuple[float, str] | None:
    """Best matmul rate seen at `precision` over the run's measurements, and its library."""
    best: tuple[float, str] | None = None
    for measurement in (peak or {}).get("measurements", []):
        for library, rate in measurement.get("gflops", {}).get(precision, {}).items():
            if best is None or rate > best[0]:
                best = (rate, library)
    return best


def computes_bf16(peak: Results | None) -> bool:
    """Whether this CPU has bf16 arithmetic: a bf16 peak is measured only where it does."""
    return any("bf16" in m.get("gflops", {}) for m in (peak or {}).get("measurements", []))


def effective_precision(peak: Results | None, precision: str) -> str:
    """What a model configured at `precision` computes in here (OpenVINO runs a bf16 hint in
    fp32 on a CPU without bf16 arithmetic)."""
    return "bf16" if precision == "bf16" and computes_bf16(peak) else "fp32"


def theoretical_gflops(peak: Results | None, precision: str) -> tuple[float, str] | None:
    for measurement in (peak or {}).get("measurements", []):
        entry = measurement.get("theoretical", {}).get(precision)
        if entry:
            return entry["gflops"], entry["formula"]
    return None


def encoder_gflop(peak: Results | None) -> float:
    for measurement in (peak or {}).get("measurements", []):
        if measurement.get("encoder_gflop"):
            return float(measurement["encoder_gflop"])
    return ENCODER_GFLOP_NOMINAL


def best_encoder_compute(
    results: dict[str, Results | None], config: Results
) -> tuple[float, str] | None:
    """Fastest encoder compute at concurrency 1 of the run with `config`'s runtime, precision
    and threads, and where it was measured.

    Best against best: the matmul peak is the best of several trials too, so both sides of
    the ratio are what the machine gives when the other tenants leave it alone.
    """
    knobs = ("runtime", "precision", "instances", "threads")
    candidates: list[tuple[float, str]] = []
    e2e = results.get("e2e") or {}
    for target, config_of in (("ours", e2e.get("configs")), ("ours-fast", fast_configs(e2e))):
        encoder = (config_of or {}).get(contract.ENCODER_MODEL, {})
        rows = (e2e.get("compute_by_target") or {}).get(target) or (
            e2e.get("compute", []) if target == "ours" else []
        )
        row = perf_row({"results": rows}, ENCODER, 1)
        if row and all(encoder.get(k) == config.get(k) for k in knobs):
            candidates.append((compute_ms(row), f"end-to-end server ({target})"))
    for name in ("batching", "runtime", "delay"):
        for record in (results.get(name) or {}).get("variants", []):
            encoder = record["configs"][contract.ENCODER_MODEL]
            row = perf_row(record, ENCODER, 1)
            if row and all(encoder.get(k) == config.get(k) for k in knobs):
                candidates.append((compute_ms(row), f"{name}/{record['name']}"))
    return min(candidates) if candidates else None


def fast_configs(e2e: Results | None) -> dict[str, Results] | None:
    """The fast profile's effective configs: the committed ones with PRECISION=bf16 applied
    as model.py applies it (OpenVINO at bf16)."""
    fast = (e2e or {}).get("fast")
    if not fast:
        return None
    if fast.get("environment", {}).get("PRECISION") != "bf16":
        return fast.get("configs")
    return {
        model: {**config, "runtime": "openvino", "precision": "bf16"}
        for model, config in fast.get("configs", {}).items()
    }


# --- choices ---------------------------------------------------------------------------------


def choose_queue_delay(records: list[Results]) -> Results | None:
    """The delay with the best mean decoder throughput over the swept levels.

    Within DELAY_TOLERANCE of the best, the smallest delay wins: at concurrency 1 every
    request waits the full delay for company that never comes.
    """
    scores = {}
    for record in records:
        delay = record["configs"][contract.DECODER_MODEL]["queue_delay_us"]
        rows = perf_rows(record, DECODER)
        if rows:
            scores[delay] = {
                "mean_throughput": sum(r["throughput"] for r in rows) / len(rows),
                "by_concurrency": {str(r["concurrency"]): r["throughput"] for r in rows},
            }
    if not scores:
        return None
    best = max(score["mean_throughput"] for score in scores.values())
    chosen = min(
        delay
        for delay, score in scores.items()
        if score["mean_throughput"] >= (1 - DELAY_TOLERANCE) * best
    )
    return {
        "delay_us": chosen,
        "scores": {str(delay): score for delay, score in sorted(scores.items())},
        "reason": (
            f"{chosen} us: mean decoder throughput {scores[chosen]['mean_throughput']:.1f}/s, "
            f"within {DELAY_TOLERANCE:.0%} of the best ({best:.1f}/s) at the smallest delay"
        ),
    }


def parity_summary(records: list[Results]) -> Results:
    """Each variant's masks against ONNX Runtime fp32, and bf16 against OpenVINO fp32."""
    from benchmarks.parity import compare

    masks = {r["name"]: r.get("parity_masks") for r in records if r.get("parity_masks")}
    pairs = [
        ("openvino-fp32", "onnxruntime-fp32"),
        ("openvino-bf16", "onnxruntime-fp32"),
        ("openvino-bf16", "openvino-fp32"),
        (SMALL_PAGES_VARIANT, "onnxruntime-fp32"),
    ]
    comparisons = []
    for candidate, reference in pairs:
        if candidate in masks and reference in masks:
            comparisons.append(
                {
                    "candidate": candidate,
                    "reference": reference,
                    **compare(masks[reference], masks[candidate]),
                }
            )
    return {"comparisons": comparisons}


@dataclass(frozen=True)
class Choice:
    """One default chosen from the data, with the numbers behind it."""

    knob: str
    choice: str
    committed: str
    why: str


def _fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _verdict(gain: float, better: str, worse: str, within: str) -> str:
    """What a measured gain of a candidate over the alternative argues for: `better` beyond
    the noise, `worse` below it, else `within`."""
    if gain >= 1 + NOISE:
        return better
    if gain <= 1 - NOISE:
        return worse
    return within


def decoder_mb_per_prompt(record: Results | None) -> float | None:
    """A runtime variant's decoder memory per prompt of a call, where it was measured."""
    return (record or {}).get("decoder_memory", {}).get("per_prompt_mb")


def _decoder_merging_choice(batching: Results | None) -> Choice | None:
    """Whether the decoder's queued requests should be merged into one runtime call: the same
    dynamic-batching block (so the same bounded queue) with max_batch_size 1 against merged."""
    committed, other = (
        variant(batching, name) for name in ("batching-1x2", DECODER_OTHER_MAX_BATCH_VARIANT)
    )
    if not (committed and other):
        return None
    # "batching-1x2" is the committed config (its instances x threads set to 1x2).
    sizes = [v["configs"][contract.DECODER_MODEL].get("max_batch_size") for v in (committed, other)]
    single, merged = (other, committed) if sizes[1] == 1 else (committed, other)
    high = perf_row(single, DECODER, 8), perf_row(merged, DECODER, 8)
    low = perf_row(single, DECODER, 1), perf_row(merged, DECODER, 1)
    if not (all(high) and all(low)):
        return None
    gain = high[0]["throughput"] / high[1]["throughput"]
    merged_size = max(s for s in sizes if s is not None)
    return Choice(
        "decoder max_batch_size (merging queued requests)",
        _verdict(gain, "1", str(merged_size), f"keep {sizes[0]} (within noise)"),
        str(sizes[0]),
        f"one request per call vs merged (mean batch {high[1].get('avg_batch') or 1:.1f}), both "
        f"with the bounded queue, at concurrency 8: {spread(high[0])} vs {spread(high[1])} "
        f"({gain:.2f}x); p50 at concurrency 1 {low[0]['latency_p50_ms']:.0f} vs "
        f"{low[1]['latency_p50_ms']:.0f} ms",
    )


def _decoder_arena_choice(committed: Results | None, other: Results | None) -> Choice | None:
    """ONNX Runtime's memory arena for the decoder, each setting at its own prompts per call:
    segment everything's calls and one click, and the memory of a call."""
    configs = [
        (r or {}).get("configs", {}).get(contract.DECODER_MODEL, {}) for r in (committed, other)
    ]
    if not all(c.get("memory_arena") for c in configs):
        return None
    with_arena, without = (
        (committed, other) if configs[0]["memory_arena"] == "true" else (other, committed)
    )
    batch = perf_row(with_arena, DECODER_BATCH, 1), perf_row(without, DECODER_BATCH, 1)
    click = perf_row(with_arena, DECODER, 1), perf_row(without, DECODER, 1)
    if not (all(batch) and all(click)):
        return None
    batch_gain = compute_ms(batch[1]) / compute_ms(batch[0])
    click_gain = compute_ms(click[1]) / compute_ms(click[0])
    gain = statistics.mean([batch_gain, click_gain])
    committed_setting = "on" if configs[0]["memory_arena"] == "true" else "off"
    memory = [(r.get("decoder_memory") or {}) for r in (with_arena, without)]
    memory_note = ""
    if all("peak_mb" in m for m in memory):
        memory_note = "; a call's peak " + " vs ".join(
            f"{m['peak_mb']:.0f} MB ({m['prompts']} prompts), "
            f"{m.get('resident_idle_mb', m['resident_after_mb']):.0f} MB once idle"
            for m in memory
        )
    return Choice(
        "decoder memory arena (ONNX Runtime)",
        _verdict(gain, "on", "off", f"keep {committed_setting} (within noise)"),
        committed_setting,
        f"with vs without, medians of alternating trials: compute of segment everything's calls "
        f"{spread(batch[0], 'compute_range', ' ms')} vs {spread(batch[1], 'compute_range', ' ms')} "
        f"({batch_gain:.2f}x), one click {spread(click[0], 'compute_range', ' ms')} vs "
        f"{spread(click[1], 'compute_range', ' ms')} ({click_gain:.2f}x)" + memory_note,
    )


def recommend(results: dict[str, Results | None]) -> list[Choice]:
    """The defaults the data supports, compared with what model_repository/ commits."""
    choices: list[Choice] = []
    runtime, batching = results.get("runtime"), results.get("batching")
    e2e, delay = results.get("e2e"), results.get("delay")
    committed = (e2e or {}).get("configs") or (batching or {}).get("variants", [{}])[0].get(
        "configs"
    )
    enc_cfg = (committed or {}).get(contract.ENCODER_MODEL, {})
    dec_cfg = (committed or {}).get(contract.DECODER_MODEL, {})

    ort, ov, bf16 = (
        variant(runtime, n) for n in ("onnxruntime-fp32", "openvino-fp32", "openvino-bf16")
    )
    ov_enc = perf_row(ov, ENCODER, 1)
    parity = _parity(runtime, "openvino-fp32", "onnxruntime-fp32")
    for role, model_cfg in ((ENCODER, enc_cfg), (DECODER, dec_cfg)):
        low = perf_row(ort, role, 1), perf_row(ov, role, 1)
        levels = {r["concurrency"] for r in perf_rows(ort, role)} & {
            r["concurrency"] for r in perf_rows(ov, role)
        }
        if not (all(low) and levels):
            continue
        top = max(levels)
        high = perf_row(ort, role, top), perf_row(ov, role, top)
        latency_gain = compute_ms(low[0]) / compute_ms(low[1])
        throughput_gain = high[1]["throughput"] / high[0]["throughput"]
        # Latency at low load and throughput at high load both count, and for the decoder
        # segment everything's many-prompt calls too: their mean decides.
        gains = [latency_gain, throughput_gain]
        batch_note = ""
        batch = perf_row(ort, DECODER_BATCH, 1), perf_row(ov, DECODER_BATCH, 1)
        if role == DECODER and all(batch):
            batch_gain = compute_ms(batch[0]) / compute_ms(batch[1])
            gains.append(batch_gain)
            batch_note = (
                f", compute of segment everything's calls "
                f"{spread(batch[1], 'compute_range', ' ms')} vs "
                f"{spread(batch[0], 'compute_range', ' ms')} ({batch_gain:.2f}x)"
            )
        gain = statistics.mean(gains)
        choice = _verdict(
            gain, "openvino", "onnxruntime", f"keep {model_cfg.get('runtime')} (within noise)"
        )
        memory = ""
        if role == DECODER:
            per_prompt = [decoder_mb_per_prompt(r) for r in (ort, ov)]
            if all(per_prompt):
                memory = (
                    f"; decoder memory per prompt of a call {per_prompt[1]:.0f} vs "
                    f"{per_prompt[0]:.0f} MB"
                )
                if per_prompt[1] > (1 + NOISE) * per_prompt[0] and choice == "openvino":
                    choice = "onnxruntime (OpenVINO's memory per prompt is higher)"
        choices.append(
            Choice(
                f"{role} runtime (fp32)",
                choice,
                str(model_cfg.get("runtime")),
                f"OpenVINO vs ONNX Runtime, medians of alternating trials (range): compute at "
                f"concurrency 1 {spread(low[1], 'compute_range', ' ms')} vs "
                f"{spread(low[0], 'compute_range', ' ms')} ({latency_gain:.2f}x), throughput at "
                f"concurrency {top} {spread(high[1])} vs {spread(high[0])} "
                f"({throughput_gain:.2f}x)"
                + batch_note
                + memory
                + (f"; {parity}" if parity else ""),
            )
        )
    small_pages = variant(runtime, SMALL_PAGES_VARIANT)
    huge, small = perf_row(ort, DECODER_BATCH, 1), perf_row(small_pages, DECODER_BATCH, 1)
    if huge and small:
        gain = compute_ms(small) / compute_ms(huge)
        memory = [decoder_mb_per_prompt(r) for r in (ort, small_pages)]
        choices.append(
            Choice(
                "Triton's malloc (GLIBC_TUNABLES)",
                _verdict(gain, "transparent huge pages", "4 KB pages", "either (within noise)"),
                "transparent huge pages (serving/triton.py)",
                f"ONNX Runtime decoder, compute of segment everything's calls "
                f"{spread(huge, 'compute_range', ' ms')} with huge pages vs "
                f"{spread(small, 'compute_range', ' ms')} with 4 KB pages ({gain:.2f}x)"
                + (
                    f"; memory per prompt of a call {memory[0]:.0f} vs {memory[1]:.0f} MB"
                    if all(memory)
                    else ""
                ),
            )
        )
    arena = _decoder_arena_choice(ort, variant(runtime, OTHER_ARENA_VARIANT))
    if arena:
        choices.append(arena)
    bf16_enc = perf_row(bf16, ENCODER, 1)
    if bf16_enc and ov_enc:
        parity = _parity(runtime, "openvino-bf16", "openvino-fp32")
        native = computes_bf16(results.get("peak"))
        choices.append(
            Choice(
                "precision",
                "fp32 default; bf16 the fast profile (PRECISION=bf16)",
                f"{enc_cfg.get('precision')} / {dec_cfg.get('precision')}",
                f"bf16 encoder {compute_ms(bf16_enc):.0f} ms vs fp32 {compute_ms(ov_enc):.0f} ms "
                f"({_fmt_ratio(compute_ms(ov_enc), compute_ms(bf16_enc))} faster)"
                + (
                    ""
                    if native
                    else " (this CPU has no bf16 arithmetic: OpenVINO computes fp32 either way)"
                )
                + (f"; {parity}" if parity else "")
                + ": bf16 moves answers where it computes bf16, so it is a switch, not a default",
            )
        )
    for role, model_cfg, level in ((ENCODER, enc_cfg, 4), (DECODER, dec_cfg, 8)):
        on = perf_row(variant(batching, "batching-1x2"), role, level)
        off = perf_row(variant(batching, "no-batching-1x2"), role, level)
        if on and off:
            gain = on["throughput"] / off["throughput"]
            choices.append(
                Choice(
                    f"{role} dynamic batching",
                    _verdict(
                        gain,
                        "on",
                        "off (or max batch 1)",
                        f"keep {'on' if model_cfg.get('batching') else 'off'} (within noise)",
                    ),
                    "on" if model_cfg.get("batching") else "off",
                    f"at concurrency {level}: {spread(on)} with batching "
                    f"(mean batch {on.get('avg_batch') or 1:.1f}) vs {spread(off)} "
                    f"without ({gain:.2f}x); per-inference compute {per_item_compute_ms(on):.0f} "
                    f"vs {per_item_compute_ms(off):.0f} ms",
                )
            )
        one = perf_row(variant(batching, "batching-1x2"), role, level)
        two = perf_row(variant(batching, "batching-2x1"), role, level)
        low_one = perf_row(variant(batching, "batching-1x2"), role, 1)
        low_two = perf_row(variant(batching, "batching-2x1"), role, 1)
        if one and two and low_one and low_two:
            gain = two["throughput"] / one["throughput"]
            choices.append(
                Choice(
                    f"{role} instances x threads",
                    "2x1"
                    if gain >= 1 + NOISE
                    and low_two["latency_p50_ms"] <= (1 + NOISE) * low_one["latency_p50_ms"]
                    else "1x2",
                    f"{model_cfg.get('instances')}x{model_cfg.get('threads')}",
                    f"2x1 vs 1x2 at concurrency {level}: {spread(two)} vs "
                    f"{spread(one)} ({gain:.2f}x); p50 at concurrency 1: "
                    f"{low_two['latency_p50_ms']:.0f} vs {low_one['latency_p50_ms']:.0f} ms "
                    "(2x1 wins only with more throughput and no latency cost at low load)",
                )
            )
    merging = _decoder_merging_choice(batching)
    if merging:
        choices.append(merging)
    per_image = perf_row(variant(batching, "batching-1x2"), ENCODER, 4)
    whole = perf_row(variant(batching, "batching-1x2-whole"), ENCODER, 4)
    if per_image and whole:
        gain = per_image["throughput"] / whole["throughput"]
        choices.append(
            Choice(
                "encoder images per runtime call (max_work_per_run)",
                _verdict(
                    gain, "1", "whole batches", f"keep {enc_cfg.get('max_work')} (within noise)"
                ),
                str(enc_cfg.get("max_work")),
                f"at concurrency 4: {spread(per_image)} one image per call vs {spread(whole)} "
                f"with whole batches ({gain:.2f}x; mean batch "
                f"{whole.get('avg_batch') or 1:.1f}); per-image compute "
                f"{per_item_compute_ms(whole):.0f} ms in a whole batch",
            )
        )
    choice = (delay or {}).get("choice")
    if choice:
        choices.append(
            Choice(
                "decoder max_queue_delay_microseconds",
                str(choice["delay_us"]),
                str(dec_cfg.get("queue_delay_us")),
                choice["reason"],
            )
        )
    first_layer = _first_layer_choice(results.get("graph"))
    if first_layer:
        choices.append(first_layer)
    return choices


def _first_layer_choice(graph: Results | None) -> Choice | None:
    """Whether one prompt should run the decoder's first layer folded (the `graph` section:
    both branches of model.onnx's If, alternating in one process)."""
    levels = {row["prompts"]: row for row in (graph or {}).get("levels", [])}
    if 1 not in levels or len(levels) < 2:
        return None
    one, many = levels[1], levels[max(levels)]

    def timing(row: Results, form: str) -> str:
        return spread(row[form], "range_ms", " ms", value=row[form]["median_ms"])

    def ratio(row: Results) -> float:  # > 1: folded is faster
        return row["shared"]["median_ms"] / row["folded"]["median_ms"]

    limit = graph["committed_up_to_prompts"]
    return Choice(
        "decoder first layer (export/branching.py)",
        _verdict(ratio(one), "folded for one prompt", "shared", "either (within noise)"),
        f"folded up to {limit} prompt{'s' if limit > 1 else ''} per image, shared above",
        f"folded vs shared, medians of alternating trials (range), ONNX Runtime in process: "
        f"one prompt {timing(one, 'folded')} vs {timing(one, 'shared')} ({ratio(one):.2f}x); "
        f"{many['prompts']} prompts {timing(many, 'folded')} vs {timing(many, 'shared')} "
        f"({ratio(many):.2f}x); answers differ by at most "
        f"{max(one['max_abs_difference'], many['max_abs_difference']):.1g}",
    )


def _parity(runtime: Results | None, candidate: str, reference: str) -> str:
    for item in (runtime or {}).get("parity", {}).get("comparisons", []):
        if item["candidate"] == candidate and item["reference"] == reference:
            return (
                f"mask IoU vs {reference} mean {item['iou_mean']:.4f}, min {item['iou_min']:.4f} "
                f"over {item['masks']} masks"
            )
    return ""


# --- segment everything ----------------------------------------------------------------------


IMAGE_TOKENS, EMBED_DIM, ATTENTION_DIM, HEADS = 64 * 64, 256, 128, 8
# One 256 <-> 128 projection of the 4096 image tokens, upstream decoder's unit of work.
PROJECTION_GFLOP = 2 * IMAGE_TOKENS * EMBED_DIM * ATTENTION_DIM / 1e9
# Image-side projections of the first transformer layer (k, v of token->image, q of
# image->token attention): per prompt upstream, per image in our graph (export/graphs.py).
FIRST_LAYER_PROJECTIONS = 3
# Our graph's products of the image tokens with folded prompt-side vectors (export/graphs.py):
# the first layer's image->token output, both attentions of the second layer twice each,
# the final token->image attention twice.
FOLDED_PRODUCTS = 7


def decoder_gflop(prompts: int, images: int | None = None, tokens: int = 7) -> float:
    """Arithmetic of `prompts` prompts through MobileSAM's mask decoder, counted from shapes.

    Nearly all of it touches the 64x64 = 4096 image tokens. Upstream (`images` None): ten
    256<->128 projections of them per prompt (k and v of three token->image attentions, q and
    out of two image->token ones), the attention products with the `tokens` prompt tokens
    (5 output + 2 for a click and its padding point), the two transposed convolutions that
    upscale to 256x256 and the mask-token products; the token-side layers add well under 1%.
    Our graph (`images` decoder batch items): the first layer's three image-side projections
    once per image, and each later projection folded into the prompt side, so the image
    tokens meet 8 heads x `tokens` vectors of 256 channels instead of 128 projected ones;
    with one prompt per image the first layer is folded too (`export.branching`).
    """
    upscaling = 2 * IMAGE_TOKENS * EMBED_DIM * (64 * 4) / 1e9  # 2x2 transposed conv 256 -> 64
    upscaling += 2 * (128 * 128) * 64 * (32 * 4) / 1e9  # 2x2 transposed conv 64 -> 32
    upscaling += 2 * 4 * 32 * (256 * 256) / 1e9  # hypernetwork tokens x upscaled features
    attention_product = 2 * IMAGE_TOKENS * tokens * ATTENTION_DIM / 1e9  # scores or sums
    if images is None:
        per_prompt = 10 * PROJECTION_GFLOP + 5 * 2 * attention_product + upscaling
        return per_prompt * prompts
    folded = 2 * IMAGE_TOKENS * EMBED_DIM * HEADS * tokens / 1e9
    if prompts <= FOLD_FIRST_LAYER_UP_TO_PROMPTS * images:
        # First layer folded: token->image scores and sums, image->token scores, per prompt.
        return (FOLDED_PRODUCTS * folded + 3 * folded + upscaling) * prompts
    # First layer shared, per prompt: token->image scores and sums, image->token scores.
    per_prompt = FOLDED_PRODUCTS * folded + 3 * attention_product + upscaling
    return per_prompt * prompts + FIRST_LAYER_PROJECTIONS * PROJECTION_GFLOP * images


def everything_rows(e2e: Results | None, suffix: str = "") -> list[Results]:
    """The segment-everything cases where both sides answered 200, seen from one profile
    (`suffix` "" for the default, "_fast" for the fast profile)."""
    rows = (e2e or {}).get("everything")
    if not isinstance(rows, list):
        return []
    views = [
        {**r, "ours": r[f"ours{suffix}"], "triton": r[f"triton{suffix}"]}
        for r in rows
        if f"ours{suffix}" in r
    ]
    return [
        r for r in views if r["ours"].get("status") == 200 and r["upstream"].get("status") == 200
    ]


def everything_decoder_s(row: Results) -> float:
    """Decoder compute during one segment-everything request, each execution counted once
    (where recorded: two calls batched together each report the batch's whole duration)."""
    decoder = row["triton"]["decoder"]
    return decoder.get("execution_compute_ms", decoder["compute_ms"]) / 1000


def everything_bound(
    row: Results, peak: Results | None, goal: float = 10, precision: str = "fp32"
) -> str:
    """What a segment-everything request spends its time on, and the floor that sets."""
    seconds = row["ours"]["ms"] / 1000
    decoder = row["triton"]["decoder"]
    decoder_s = everything_decoder_s(row)
    encoder_s = row["triton"]["encoder"]["compute_ms"] / 1000
    prompts = row["prompts"]
    per_prompt_ms = decoder_s * 1000 / prompts
    ours = decoder_gflop(prompts, images=decoder["requests"])
    upstream = decoder_gflop(prompts)
    allowed_s = row["upstream"]["ms"] / 1000 / goal
    text = (
        f"Triton's decoder computed for {decoder_s:.1f} s of the {seconds:.1f} s "
        f"({decoder_s / seconds:.0%}; {per_prompt_ms:.0f} ms per prompt in "
        f"{decoder['requests']} call{'s' if decoder['requests'] != 1 else ''}), the encoder "
        f"for {encoder_s:.1f} s. The decoder's arithmetic is {ours / prompts:.1f} GFLOP per "
        f"prompt here ({upstream / prompts:.1f} upstream, which projects the image tokens "
        f"for every prompt in every layer): {ours / 1000:.1f} TFLOP for {prompts} "
        f"prompts, done at {ours / decoder_s:.0f} GFLOP/s"
    )
    if ours < 1000:
        text = text.replace(f"{ours / 1000:.1f} TFLOP", f"{ours:.0f} GFLOP")
    best = peak_gflops(peak, precision)
    if best and allowed_s <= encoder_s:
        text += (
            f" ({ours / decoder_s / best[0]:.0%} of the best measured {precision} matmul peak, "
            f"{best[0]:.0f} GFLOP/s). A {goal:g}x speed-up allows {allowed_s:.1f} s in all, "
            f"less than the encoder's {encoder_s:.1f} s alone"
        )
    elif best:
        needed = ours / (allowed_s - encoder_s)
        text += (
            f" ({ours / decoder_s / best[0]:.0%} of the best measured {precision} matmul peak, "
            f"{best[0]:.0f} GFLOP/s). A {goal:g}x speed-up allows {allowed_s:.1f} s in all: the "
            f"decoder would have to run at {needed:.0f} GFLOP/s, {needed / best[0]:.0%} of "
            "that peak, while its layer norms, softmaxes, GELUs and the 4096x256 activations "
            "it writes per prompt are memory-bound"
        )
    return text


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run
    detail: str


def _short(ratio: float, goal: float) -> str:
    return f"short by {1 - ratio / goal:.0%}; " if ratio < goal else ""


# The goals per profile: ("ours" is the default profile, "ours-fast" PRECISION=bf16).
PROFILES = {"ours": "default", "ours-fast": "fast"}
THROUGHPUT_GOAL = {"ours": 3.5, "ours-fast": 6.0}
REPROMPT_GOAL_MS = {"ours": 25.0, "ours-fast": 20.0}
EVERYTHING_GOAL = {"ours": 8.0, "ours-fast": 10.0}
ENCODER_SHARE_GOAL = 0.75


def e2e_compute_row(e2e: Results | None, target: str, role: str) -> Results | None:
    rows = ((e2e or {}).get("compute_by_target") or {}).get(target)
    if rows is None and target == "ours":
        rows = (e2e or {}).get("compute", [])
    return perf_row({"results": rows or []}, role, 1)


def profile_precision(e2e: Results | None, target: str) -> str:
    configs = (e2e or {}).get("configs") if target == "ours" else fast_configs(e2e)
    return ((configs or {}).get(contract.ENCODER_MODEL) or {}).get("precision", "fp32")


def throughput_target(results: dict[str, Results | None], target: str) -> Target | None:
    e2e, peak = results.get("e2e"), results.get("peak")
    ours4, base4 = load_row(e2e, target, "cold", 4), load_row(e2e, "baseline", "cold", 4)
    if not (ours4 and base4 and base4["throughput"] > 0):
        return None
    goal = THROUGHPUT_GOAL[target]
    ratio = ours4["throughput"] / base4["throughput"]
    detail = _short(ratio, goal)
    base1 = load_row(e2e, "baseline", "cold", 1)
    base_encoder = (base1 or {}).get("stage_ms", {}).get("encoder")
    enc = e2e_compute_row(e2e, target, ENCODER)
    precision = effective_precision(peak, profile_precision(e2e, target))
    best = peak_gflops(peak, precision)
    if base_encoder and enc and best:
        gflop = encoder_gflop(peak)
        needed_s = base_encoder / 1000 / goal
        theory = theoretical_gflops(peak, precision)
        detail += (
            f"both sides are bound by the encoder on two cores: PyTorch eager takes "
            f"{base_encoder:.0f} ms per image, ours {compute_ms(enc):.0f} ms "
            f"({precision}). {goal:g}x the baseline needs {needed_s * 1000:.0f} ms per image = "
            f"{gflop / needed_s:.0f} GFLOP/s, {gflop / needed_s / best[0]:.0%} of the best "
            f"measured {precision} matmul ({best[0]:.0f} GFLOP/s, {best[1]})"
            + (
                f" and {gflop / needed_s / theory[0]:.0%} of the CPU's theoretical "
                f"{theory[0]:.0f} GFLOP/s"
                if theory
                else ""
            )
        )
        if target == "ours-fast" and not computes_bf16(peak):
            detail += "; this CPU has no bf16 arithmetic, so the fast profile computes fp32"
    return Target(
        f"cold throughput at concurrency 4 vs in-process PyTorch ({PROFILES[target]})",
        f">= {goal:g}x",
        f"{ratio:.2f}x ({ours4['throughput']:.2f} vs {base4['throughput']:.2f} req/s, "
        "cold images, one click)",
        ratio >= goal,
        detail,
    )


def reprompt_target(results: dict[str, Results | None], target: str) -> Target | None:
    e2e = results.get("e2e")
    cached = load_row(e2e, target, "cached", 1)
    if not (cached and cached["latency_ms"]):
        return None
    goal = REPROMPT_GOAL_MS[target]
    p50 = cached["latency_ms"]["p50"]
    stages = cached.get("stage_ms", {})
    detail = f"over by {p50 - goal:.0f} ms; " if p50 > goal else ""
    triton = cached.get("triton", {}).get("decoder")
    compute = triton["compute_ms"] if triton and triton.get("requests") else None
    if compute is None:
        dec = e2e_compute_row(e2e, target, DECODER)
        compute = compute_ms(dec) if dec else None
    if compute is not None and "decoder" in stages:
        rest = cached["latency_ms"].get("mean", p50) - stages.get("total", 0)
        detail += (
            f"where the time goes (means): decoder compute {compute:.1f} ms (Triton's "
            "statistics over "
            "the same requests), moving the 4 MB embedding in over HTTP, the 1 MB of logits "
            "out (written into the proxy's shared memory) and through the Python backend "
            f"{stages['decoder'] - compute:.1f} ms, post-processing "
            f"{stages.get('postprocess', 0):.1f} ms, the rest of the proxy "
            f"{stages.get('total', 0) - stages['decoder'] - stages.get('postprocess', 0):.1f} "
            f"ms, and the client's upload, form parsing and JSON response {rest:.1f} ms"
            + (
                f". The decoder's compute alone is over the {goal:g} ms budget"
                if compute > goal
                else ""
            )
        )
    return Target(
        f"cached re-prompt p50, one click, concurrency 1 ({PROFILES[target]})",
        f"<= {goal:g} ms",
        f"{p50:.1f} ms",
        p50 <= goal,
        detail,
    )


def encoder_share_target(results: dict[str, Results | None], target: str) -> Target | None:
    e2e, peak = results.get("e2e"), results.get("peak")
    configs = (e2e or {}).get("configs") if target == "ours" else fast_configs(e2e)
    encoder_config = (configs or {}).get(contract.ENCODER_MODEL)
    if not encoder_config:
        return None
    precision = effective_precision(peak, encoder_config["precision"])
    fastest = best_encoder_compute(results, encoder_config)
    best = peak_gflops(peak, precision)
    if not (fastest and best):
        return None
    gflop = encoder_gflop(peak)
    achieved = gflop / (fastest[0] / 1000)
    share = achieved / best[0]
    theory = theoretical_gflops(peak, precision)
    return Target(
        f"encoder vs the best measured {precision} matmul ({PROFILES[target]})",
        f">= {ENCODER_SHARE_GOAL:.0%}",
        f"{share:.0%} ({achieved:.0f} of {best[0]:.0f} GFLOP/s, {best[1]})",
        share >= ENCODER_SHARE_GOAL,
        (
            f"short by {ENCODER_SHARE_GOAL - share:.0%} points; "
            if share < ENCODER_SHARE_GOAL
            else ""
        )
        + f"best encoder compute of the run at concurrency 1 ({fastest[0]:.0f} ms, "
        f"{encoder_config['runtime']} {encoder_config['precision']}, {fastest[1]}) against "
        "the best matmul trial of any library"
        + (f"; {achieved / theory[0]:.0%} of the theoretical {theory[0]:.0f}" if theory else "")
        + ". The peak is one large square matmul; TinyViT also runs depthwise convolutions, "
        "softmax, layer norms and GELUs, which are memory-bound, and attention over small "
        "windows",
    )


def everything_target(results: dict[str, Results | None], target: str) -> Target | None:
    e2e, peak = results.get("e2e"), results.get("peak")
    rows = everything_rows(e2e, "" if target == "ours" else "_fast")
    if not rows:
        return None
    row = rows[0]
    goal = EVERYTHING_GOAL[target]
    ratio = row["upstream"]["ms"] / row["ours"]["ms"]
    precision = effective_precision(peak, profile_precision(e2e, target))
    return Target(
        f"segment everything vs upstream generator ({PROFILES[target]})",
        f">= {goal:g}x",
        f"{ratio:.2f}x ({row['ours']['ms'] / 1000:.1f} vs "
        f"{row['upstream']['ms'] / 1000:.1f} s, {row['name']}, {row['prompts']} prompts)",
        ratio >= goal,
        _short(ratio, goal) + everything_bound(row, peak, goal, precision),
    )


def targets(results: dict[str, Results | None]) -> list[Target]:
    """The issue's targets, each a ratio measured within this run for the default and the
    fast profile, with what bounds it."""
    rows: list[Target] = []
    for make in (throughput_target, encoder_share_target, reprompt_target, everything_target):
        for target in PROFILES:
            made = make(results, target)
            if made is not None:
                rows.append(made)
    return rows
