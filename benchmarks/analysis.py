"""Figures derived from the raw results: the targets, the chosen defaults and why.

Pure functions of the JSON in build/bench/results/, so that the report can be regenerated and
tested without running anything. A target is a ratio measured within one run, never an
assertion: a miss is reported with its size and with what bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.peak import ENCODER_GFLOP_NOMINAL
from common import contract

Results = dict[str, Any]

ENCODER = "encoder"
DECODER = "decoder"
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
    for row in (record or {}).get("results", []):
        if row.get("role") == role and row.get("concurrency") == concurrency and "error" not in row:
            return row
    return None


def perf_rows(record: Results | None, role: str) -> list[Results]:
    rows = [r for r in (record or {}).get("results", []) if r.get("role") == role]
    return sorted((r for r in rows if "error" not in r), key=lambda r: r["concurrency"])


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
    row = perf_row({"results": e2e.get("compute", [])}, ENCODER, 1)
    if row:
        candidates.append((compute_ms(row), "end-to-end server"))
    for name in ("batching", "runtime", "delay"):
        for record in (results.get(name) or {}).get("variants", []):
            encoder = record["configs"][contract.ENCODER_MODEL]
            row = perf_row(record, ENCODER, 1)
            if row and all(encoder.get(k) == config.get(k) for k in knobs):
                candidates.append((compute_ms(row), f"{name}/{record['name']}"))
    return min(candidates) if candidates else None


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
        # Latency at low load and throughput at high load both count; their mean decides.
        gain = (latency_gain + throughput_gain) / 2
        choice = (
            "openvino"
            if gain >= 1 + NOISE
            else "onnxruntime"
            if gain <= 1 - NOISE
            else f"keep {model_cfg.get('runtime')} (within noise)"
        )
        choices.append(
            Choice(
                f"{role} runtime (fp32)",
                choice,
                str(model_cfg.get("runtime")),
                f"OpenVINO vs ONNX Runtime: compute at concurrency 1 {compute_ms(low[1]):.0f} "
                f"vs {compute_ms(low[0]):.0f} ms ({latency_gain:.2f}x), throughput at "
                f"concurrency {top} {high[1]['throughput']:.2f} vs "
                f"{high[0]['throughput']:.2f}/s ({throughput_gain:.2f}x)"
                + (f"; {parity}" if parity else ""),
            )
        )
    bf16_enc = perf_row(bf16, ENCODER, 1)
    if bf16_enc and ov_enc:
        parity = _parity(runtime, "openvino-bf16", "openvino-fp32")
        choices.append(
            Choice(
                "precision",
                "fp32 (bf16 opt-in)",
                f"{enc_cfg.get('precision')} / {dec_cfg.get('precision')}",
                f"bf16 encoder {compute_ms(bf16_enc):.0f} ms vs fp32 {compute_ms(ov_enc):.0f} ms "
                f"({_fmt_ratio(compute_ms(ov_enc), compute_ms(bf16_enc))} faster)"
                + (f", but {parity}" if parity else "")
                + ": answers change, so it stays a per-deployment choice",
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
                    "on"
                    if gain >= 1 + NOISE
                    else "off (or max batch 1)"
                    if gain <= 1 - NOISE
                    else f"keep {'on' if model_cfg.get('batching') else 'off'} (within noise)",
                    "on" if model_cfg.get("batching") else "off",
                    f"at concurrency {level}: {on['throughput']:.2f}/s with batching "
                    f"(mean batch {on.get('avg_batch') or 1:.1f}) vs {off['throughput']:.2f}/s "
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
                    f"2x1 vs 1x2 at concurrency {level}: {two['throughput']:.2f} vs "
                    f"{one['throughput']:.2f}/s ({gain:.2f}x); p50 at concurrency 1: "
                    f"{low_two['latency_p50_ms']:.0f} vs {low_one['latency_p50_ms']:.0f} ms "
                    "(2x1 wins only with more throughput and no latency cost at low load)",
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
    return choices


def _parity(runtime: Results | None, candidate: str, reference: str) -> str:
    for item in (runtime or {}).get("parity", {}).get("comparisons", []):
        if item["candidate"] == candidate and item["reference"] == reference:
            return (
                f"mask IoU vs {reference} mean {item['iou_mean']:.4f}, min {item['iou_min']:.4f} "
                f"over {item['masks']} masks"
            )
    return ""


# --- segment everything ----------------------------------------------------------------------


IMAGE_TOKENS, EMBED_DIM, ATTENTION_DIM = 64 * 64, 256, 128
# One 256 <-> 128 projection of the 4096 image tokens, the decoder's unit of work.
PROJECTION_GFLOP = 2 * IMAGE_TOKENS * EMBED_DIM * ATTENTION_DIM / 1e9
# Image-side projections of the first transformer layer (k, v of token->image, q of
# image->token attention): per prompt upstream, per image in our graph (export/graphs.py).
FIRST_LAYER_PROJECTIONS = 3


def decoder_gflop(prompts: int, images: int | None = None, tokens: int = 7) -> float:
    """Arithmetic of `prompts` prompts through MobileSAM's mask decoder, counted from shapes.

    Nearly all of it touches the 64x64 = 4096 image tokens: ten 256<->128 projections of them
    per prompt in upstream's two-way transformer (k and v of three token->image attentions,
    q and out of two image->token ones), the attention products with the `tokens` prompt
    tokens (5 output + 2 for a click and its padding point), the two transposed convolutions
    that upscale to 256x256 and the mask-token products. The token-side layers (7 tokens)
    add well under 1%. With `images` (decoder batch items), our graph's sharing is counted:
    three of the ten projections once per image. Without, upstream's count.
    """
    per_prompt = 10 * PROJECTION_GFLOP
    per_prompt += 5 * 2 * 2 * IMAGE_TOKENS * tokens * ATTENTION_DIM / 1e9  # scores, sums
    per_prompt += 2 * IMAGE_TOKENS * EMBED_DIM * (64 * 4) / 1e9  # 2x2 transposed conv 256 -> 64
    per_prompt += 2 * (128 * 128) * 64 * (32 * 4) / 1e9  # 2x2 transposed conv 64 -> 32
    per_prompt += 2 * 4 * 32 * (256 * 256) / 1e9  # hypernetwork tokens x upscaled features
    if images is None:
        return per_prompt * prompts
    shared = FIRST_LAYER_PROJECTIONS * PROJECTION_GFLOP
    return (per_prompt - shared) * prompts + shared * images


def everything_rows(e2e: Results | None) -> list[Results]:
    """The segment-everything cases where both sides answered 200."""
    rows = (e2e or {}).get("everything")
    if not isinstance(rows, list):
        return []
    return [
        r for r in rows if r["ours"].get("status") == 200 and r["upstream"].get("status") == 200
    ]


def everything_decoder_s(row: Results) -> float:
    """Decoder compute during one segment-everything request, each execution counted once
    (where recorded: two calls batched together each report the batch's whole duration)."""
    decoder = row["triton"]["decoder"]
    return decoder.get("execution_compute_ms", decoder["compute_ms"]) / 1000


def everything_bound(row: Results, peak: Results | None) -> str:
    """What a segment-everything request spends its time on, and the floor that sets."""
    seconds = row["ours"]["ms"] / 1000
    decoder = row["triton"]["decoder"]
    decoder_s = everything_decoder_s(row)
    encoder_s = row["triton"]["encoder"]["compute_ms"] / 1000
    prompts = row["prompts"]
    per_prompt_ms = decoder_s * 1000 / prompts
    ours = decoder_gflop(prompts, images=decoder["requests"])
    upstream = decoder_gflop(prompts)
    allowed_s = row["upstream"]["ms"] / 1000 / 10
    text = (
        f"Triton's decoder computed for {decoder_s:.1f} s of the {seconds:.1f} s "
        f"({decoder_s / seconds:.0%}; {per_prompt_ms:.0f} ms per prompt in "
        f"{decoder['requests']} call{'s' if decoder['requests'] != 1 else ''}), the encoder "
        f"for {encoder_s:.1f} s. The decoder's arithmetic is {ours / prompts:.1f} GFLOP per "
        f"prompt here ({upstream / prompts:.1f} upstream, which repeats the first layer's "
        f"image-side projections for every prompt): {ours / 1000:.1f} TFLOP for {prompts} "
        f"prompts, done at {ours / decoder_s:.0f} GFLOP/s"
    )
    fp32 = peak_gflops(peak, "fp32")
    if fp32:
        needed = ours / max(allowed_s - encoder_s, 1e-9)
        text += (
            f" ({ours / decoder_s / fp32[0]:.0%} of the measured fp32 matmul peak, "
            f"{fp32[0]:.0f} GFLOP/s). A 10x speed-up allows {allowed_s:.1f} s in all: the "
            f"decoder would have to run at {needed:.0f} GFLOP/s, {needed / fp32[0]:.0%} of "
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


def cold_split(cold: Results, enc: Results | None, dec: Results | None) -> dict[str, Any] | None:
    """Encoder and decoder compute per cold request: Triton's statistics over the same
    requests when recorded, else perf_analyzer's compute-alone measurement."""
    triton = cold.get("triton")
    if triton and triton.get("encoder", {}).get("requests"):
        return {
            "encoder": triton["encoder"]["compute_ms"],
            "decoder": triton["decoder"]["compute_ms"],
            "compute": triton["encoder"]["compute_ms"] + triton["decoder"]["compute_ms"],
            "source": "compute read from Triton's statistics over the same requests",
        }
    if enc and dec:
        return {
            "encoder": compute_ms(enc),
            "decoder": compute_ms(dec),
            "compute": compute_ms(enc) + compute_ms(dec),
            "source": "compute measured alone by perf_analyzer before the load",
        }
    return None


def _over(ratio: float, goal: float) -> str:
    return f"over by {ratio / goal - 1:.0%}; " if ratio > goal else ""


def _short(ratio: float, goal: float) -> str:
    return f"short by {1 - ratio / goal:.0%}; " if ratio < goal else ""


def targets(results: dict[str, Results | None]) -> list[Target]:
    """The issues' targets (five for the benchmarks, one for segment everything), each a ratio
    measured within this run, with what bounds it."""
    e2e, batching, peak = results.get("e2e"), results.get("batching"), results.get("peak")
    runtime = results.get("runtime")
    compute_rows = {"results": (e2e or {}).get("compute", [])}
    enc, dec = perf_row(compute_rows, ENCODER, 1), perf_row(compute_rows, DECODER, 1)
    rows: list[Target] = []

    # 1. A cold prompted request vs the encoder + decoder compute of the same requests.
    cold = load_row(e2e, "ours", "cold", 1)
    if cold and cold["latency_ms"]:
        split = cold_split(cold, enc, dec)
        if split:
            ratio = cold["latency_ms"]["mean"] / split["compute"]
            stages = cold.get("stage_ms", {})
            own = {
                k: stages[k] for k in ("decode_image", "preprocess", "postprocess") if k in stages
            }
            transport = (stages.get("encoder", 0) - split["encoder"]) + (
                stages.get("decoder", 0) - split["decoder"]
            )
            rows.append(
                Target(
                    "cold prompted request vs compute alone",
                    "<= 1.10x",
                    f"{ratio:.2f}x (mean {cold['latency_ms']['mean']:.0f} ms vs encoder "
                    f"{split['encoder']:.0f} + decoder {split['decoder']:.0f} ms of compute; "
                    f"p50 {cold['latency_ms']['p50']:.0f} ms)",
                    ratio <= 1.10,
                    _over(ratio, 1.10) + f"{split['source']}. Per request: encoder call "
                    f"{stages.get('encoder', 0):.0f} ms in the proxy for "
                    f"{split['encoder']:.0f} ms of compute, decoder call "
                    f"{stages.get('decoder', 0):.0f} ms for {split['decoder']:.0f} ms: "
                    f"{transport:.0f} ms moving tensors to and from Triton over HTTP. The "
                    f"proxy's own work is {sum(own.values()):.0f} ms ("
                    + ", ".join(f"{name} {value:.0f}" for name, value in own.items())
                    + "): decoding the upload, resizing it to 1024, and upsampling the masks "
                    "to the image's size, all of which grow with the image",
                )
            )

    # 2. Throughput at concurrency 4 vs the in-process PyTorch baseline.
    ours4, base4 = load_row(e2e, "ours", "cold", 4), load_row(e2e, "baseline", "cold", 4)
    if ours4 and base4 and base4["throughput"] > 0:
        ratio = ours4["throughput"] / base4["throughput"]
        base1 = load_row(e2e, "baseline", "cold", 1)
        gflop = encoder_gflop(peak)
        fp32 = peak_gflops(peak, "fp32")
        detail = _short(ratio, 6)
        base_encoder = (base1 or {}).get("stage_ms", {}).get("encoder")
        if base_encoder and fp32 and enc:
            needed_s = base_encoder / 1000 / 6
            detail += (
                f"both sides are bound by the encoder on two cores: PyTorch eager takes "
                f"{base_encoder:.0f} ms per image, ours {compute_ms(enc):.0f} ms. 6x the "
                f"baseline needs {needed_s * 1000:.0f} ms per image = "
                f"{gflop / needed_s:.0f} GFLOP/s, {gflop / needed_s / fp32[0]:.0%} of the "
                "measured fp32 matmul peak: out of reach at fp32 on this machine"
            )
            bf16 = perf_row(variant(runtime, "openvino-bf16"), ENCODER, 1)
            if bf16:
                detail += (
                    f"; OpenVINO bf16 (opt-in) takes {compute_ms(bf16):.0f} ms, at most "
                    f"{base_encoder / compute_ms(bf16):.1f}x"
                )
        rows.append(
            Target(
                "throughput at concurrency 4 vs in-process PyTorch",
                ">= 6x",
                f"{ratio:.2f}x ({ours4['throughput']:.2f} vs {base4['throughput']:.2f} req/s, "
                "cold images, one click)",
                ratio >= 6,
                detail,
            )
        )

    # 3. Cached re-prompt p50.
    cached = load_row(e2e, "ours", "cached", 1)
    if cached and cached["latency_ms"]:
        p50 = cached["latency_ms"]["p50"]
        stages = cached.get("stage_ms", {})
        detail = f"over by {p50 - 20:.0f} ms; " if p50 > 20 else ""
        triton = cached.get("triton", {}).get("decoder")
        if triton and triton.get("requests") and dec:
            dec = {
                **dec,
                "server_compute_input_ms": 0.0,
                "server_compute_output_ms": 0.0,
                "server_compute_infer_ms": triton["compute_ms"],
            }
        if dec and "decoder" in stages:
            detail += (
                f"decoder call {stages['decoder']:.0f} ms in the proxy vs "
                f"{dec['latency_p50_ms']:.0f} ms for the same request from perf_analyzer's C++ "
                f"client and {compute_ms(dec):.0f} ms of compute, then postprocess "
                f"{stages.get('postprocess', 0):.0f} ms. "
                + ("The decoder compute alone is over budget; " if compute_ms(dec) > 20 else "")
                + f"moving the 4 MB embedding in and 1 MB of logits out over HTTP costs "
                f"{stages['decoder'] - compute_ms(dec):.0f} ms of the call"
            )
            fastest = perf_row(variant(runtime, "openvino-bf16"), DECODER, 1)
            if fastest:
                detail += f" (OpenVINO bf16 decoder: {compute_ms(fastest):.0f} ms of compute)"
        rows.append(
            Target(
                "cached re-prompt p50 (concurrency 1)",
                "<= 20 ms",
                f"{p50:.1f} ms",
                p50 <= 20,
                detail,
            )
        )

    # 4. Encoder GFLOP/s vs the matmul peak at the same precision, best against best.
    encoder_config = ((e2e or {}).get("configs") or {}).get(contract.ENCODER_MODEL)
    fastest = best_encoder_compute(results, encoder_config) if encoder_config else None
    best = peak_gflops(peak, encoder_config["precision"]) if encoder_config else None
    if fastest and best:
        gflop = encoder_gflop(peak)
        achieved = gflop / (fastest[0] / 1000)
        share = achieved / best[0]
        rows.append(
            Target(
                f"encoder vs {encoder_config['precision']} matmul peak",
                ">= 75%",
                f"{share:.0%} ({achieved:.0f} of {best[0]:.0f} GFLOP/s, {best[1]})",
                share >= 0.75,
                (f"short by {0.75 - share:.0%} points; " if share < 0.75 else "")
                + f"best encoder compute of the run at concurrency 1 ({fastest[0]:.0f} ms, "
                f"{fastest[1]}) against the best matmul trial. The peak is one large square "
                "matmul; TinyViT also runs depthwise convolutions, softmax, layer norms and "
                "GELUs, which are memory-bound, and attention over small windows",
            )
        )

    # 5. Dynamic batching gain on the decoder at concurrency 8.
    on = perf_row(variant(batching, "batching-1x2"), DECODER, 8)
    off = perf_row(variant(batching, "no-batching-1x2"), DECODER, 8)
    if on and off:
        gain = on["throughput"] / off["throughput"]
        per_call = (
            f"per-inference compute {per_item_compute_ms(on):.0f} ms at mean batch "
            f"{on.get('avg_batch') or 1:.1f} vs {per_item_compute_ms(off):.0f} ms alone"
        )
        why = (
            ": requests that arrive together share one execution and one Python-backend round trip"
            if gain >= 1.3
            else ": one decoder call already keeps both cores busy (attention over 4096 image "
            "tokens, upscaling to 256x256), so a batch saves little but per-call overhead"
        )
        rows.append(
            Target(
                "decoder dynamic batching gain (concurrency 8)",
                ">= 1.3x",
                f"{gain:.2f}x ({on['throughput']:.1f} vs {off['throughput']:.1f} infer/s)",
                gain >= 1.3,
                _short(gain, 1.3) + per_call + why,
            )
        )

    # 6. Segment everything vs upstream's generator, same image and settings (issue 4).
    for row in everything_rows(e2e)[:1]:
        ratio = row["upstream"]["ms"] / row["ours"]["ms"]
        rows.append(
            Target(
                "segment everything vs upstream generator",
                ">= 10x",
                f"{ratio:.2f}x ({row['ours']['ms'] / 1000:.1f} vs "
                f"{row['upstream']['ms'] / 1000:.1f} s, {row['name']}, {row['prompts']} prompts)",
                ratio >= 10,
                _short(ratio, 10) + everything_bound(row, peak),
            )
        )
    return rows
