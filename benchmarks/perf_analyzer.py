"""perf_analyzer runs against the real Triton, without Docker.

`python -m benchmarks.perf_analyzer` (`make perf`) exports the models if needed, starts Triton
from the settings, measures both models over HTTP at a few concurrencies, prints perf_analyzer's
own tables and then one summary table, and stops Triton. The functions below are the building
blocks for later benchmarks: the perf_analyzer environment, the `--input-data` JSON files (built
from the shapes Triton reports, so no dimension is repeated here) and a run that returns the
parsed `-f` CSV.

perf_analyzer is the binary in the `tritonclient==2.51.0` wheel. It links against Debian's
`libb64-0d` and the CUDA runtime (`libcudart.so.12` from `nvidia-cuda-runtime-cu12`), even though
no GPU is used (README, "Benchmarks").
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from common import contract
from common.settings import PROJECT_ROOT, Settings, get_settings
from serving.triton import TritonError, TritonServer, export_if_needed

log = logging.getLogger("perf")

OUTPUT_DIR = PROJECT_ROOT / "build" / "perf"
# Triton config data types -> numpy, for the types these models use.
NUMPY_TYPES: dict[str, type[np.generic]] = {
    "TYPE_UINT8": np.uint8,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
}


class PerfError(RuntimeError):
    """perf_analyzer could not be found, could not run, or produced no result."""


# --- perf_analyzer binary and environment --------------------------------------------------


def perf_analyzer_binary() -> Path:
    """The binary installed next to this interpreter by the tritonclient wheel."""
    candidate = Path(sysconfig.get_path("scripts")) / "perf_analyzer"
    if candidate.is_file():
        return candidate
    found = shutil.which("perf_analyzer")
    if found is None:
        raise PerfError("perf_analyzer not found: install tritonclient==2.51.0 (`make setup`)")
    return Path(found)


def cuda_runtime_lib_dir() -> Path:
    """`nvidia/cuda_runtime/lib` from the nvidia-cuda-runtime-cu12 wheel (libcudart.so.12)."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not spec.submodule_search_locations:
        raise PerfError(
            "nvidia-cuda-runtime-cu12 is not installed; perf_analyzer needs its libcudart.so.12"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def perf_analyzer_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment perf_analyzer needs: libcudart.so.12 on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        part for part in (str(cuda_runtime_lib_dir()), env.get("LD_LIBRARY_PATH", "")) if part
    )
    return env


def check_perf_analyzer() -> str:
    """Fail early, with the fix, when the binary or one of its libraries is missing."""
    result = subprocess.run(
        [str(perf_analyzer_binary()), "--version"],
        env=perf_analyzer_environment(),
        capture_output=True,
        text=True,
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        hint = ""
        if "libb64" in output:
            hint = " (install Debian's libb64-0d: `make setup` does)"
        raise PerfError(f"perf_analyzer does not run{hint}: {output}")
    return output


# --- model inputs and --input-data files ----------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One model input as Triton reports it: dims exclude the batch axis, -1 is dynamic."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    @property
    def numpy_type(self) -> type[np.generic]:
        try:
            return NUMPY_TYPES[self.data_type]
        except KeyError:
            raise PerfError(f"{self.name}: unsupported data type {self.data_type}") from None

    def accepts(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.dims) and all(
            want in (-1, got) for want, got in zip(self.dims, shape, strict=True)
        )


def fetch_input_specs(url: str, model: str, timeout_s: float = 10.0) -> dict[str, TensorSpec]:
    """Input names, types and dims from Triton's model config endpoint (`host:port`)."""
    with urllib.request.urlopen(f"http://{url}/v2/models/{model}/config", timeout=timeout_s) as r:
        config = json.load(r)
    return {
        item["name"]: TensorSpec(
            item["name"], item["data_type"], tuple(int(d) for d in item["dims"])
        )
        for item in config["input"]
    }


def _require(specs: Mapping[str, TensorSpec], names: Iterable[str], model: str) -> None:
    missing = set(names) - set(specs)
    extra = set(specs) - set(names)
    if missing or extra:
        raise PerfError(
            f"{model}: the config's inputs changed (missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}); update benchmarks/perf_analyzer.py"
        )


def encoder_request(
    specs: Mapping[str, TensorSpec], height: int, width: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """One image of `height` x `width` zero-padded to the input frame, as the proxy sends it."""
    _require(specs, contract.ENCODER_INPUTS, "encoder")
    frame = specs[contract.IMAGES].dims
    if not (0 < height <= frame[0] and 0 < width <= frame[1]):
        raise PerfError(f"image size {height}x{width} does not fit the {frame} input")
    rng = np.random.default_rng(seed)
    images = np.zeros(frame, dtype=specs[contract.IMAGES].numpy_type)
    images[:height, :width] = rng.integers(0, 256, (height, width, frame[2]), dtype=np.uint8)
    input_size = np.array([height, width], dtype=specs[contract.INPUT_SIZE].numpy_type)
    return {contract.IMAGES: images, contract.INPUT_SIZE: input_size}


def decoder_request(
    specs: Mapping[str, TensorSpec],
    prompts: int = 1,
    points: int = 2,
    seed: int = 0,
    frame: int = contract.DEFAULT_IMAGE_SIDE,
) -> dict[str, np.ndarray]:
    """One image's embedding with `prompts` point prompts of `points` points each.

    As SamPredictor builds them without a box: `points - 1` foreground clicks plus one padding
    point (label -1) at the origin; no mask input. P=1, N=2 is an interactive click, P=64 one
    segment-everything batch.
    """
    _require(specs, contract.DECODER_INPUTS, "decoder")
    if prompts < 1 or points < 1:
        raise PerfError("a decoder request needs at least one prompt of one point")
    rng = np.random.default_rng(seed)
    clicks = points - 1 if points > 1 else 1
    embeddings, coords_spec = specs[contract.IMAGE_EMBEDDINGS], specs[contract.POINT_COORDS]
    coords = np.zeros((prompts, points, coords_spec.dims[-1]))
    coords[:, :clicks] = rng.uniform(0, frame, (prompts, clicks, coords.shape[-1]))
    labels = np.full((prompts, points), float(contract.PADDING_LABEL))
    labels[:, :clicks] = contract.FOREGROUND_LABEL
    mask_spec = specs[contract.MASK_INPUT]
    return {
        contract.IMAGE_EMBEDDINGS: rng.standard_normal(embeddings.dims).astype(
            embeddings.numpy_type
        ),
        contract.POINT_COORDS: coords.astype(coords_spec.numpy_type),
        contract.POINT_LABELS: labels.astype(specs[contract.POINT_LABELS].numpy_type),
        # One mask broadcast to all prompts (M = 1), unused because has_mask_input is 0.
        contract.MASK_INPUT: np.zeros((1, *mask_spec.dims[1:]), dtype=mask_spec.numpy_type),
        contract.HAS_MASK_INPUT: np.zeros(1, dtype=specs[contract.HAS_MASK_INPUT].numpy_type),
    }


def _check_request(request: Mapping[str, np.ndarray], specs: Mapping[str, TensorSpec]) -> None:
    _require(specs, request.keys(), "request")
    for name, array in request.items():
        spec = specs[name]
        if array.dtype != np.dtype(spec.numpy_type) or not spec.accepts(array.shape):
            raise PerfError(
                f"{name}: {array.dtype}{list(array.shape)} does not match "
                f"{spec.data_type}{list(spec.dims)}"
            )


def write_input_data(
    path: Path,
    requests: Sequence[Mapping[str, np.ndarray]],
    specs: Mapping[str, TensorSpec],
) -> Path:
    """Write a perf_analyzer `--input-data` JSON file: one "data" entry per request.

    Every tensor carries its "shape" (needed for the dynamic dims, without the batch axis) and
    its raw little-endian bytes as base64, which perf_analyzer 2.51 accepts and parses far
    faster than million-element JSON lists.
    """
    entries = []
    for request in requests:
        _check_request(request, specs)
        entries.append(
            {
                name: {
                    "content": {"b64": base64.b64encode(_little_endian(array)).decode("ascii")},
                    "shape": list(array.shape),
                }
                for name, array in request.items()
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": entries}))
    return path


def read_input_data(path: Path, specs: Mapping[str, TensorSpec]) -> list[dict[str, np.ndarray]]:
    """Decode a file written by `write_input_data` and check it against the model's inputs."""
    requests = []
    for entry in json.loads(path.read_text())["data"]:
        request = {}
        for name, tensor in entry.items():
            if name not in specs:
                raise PerfError(f"{path}: {name} is not an input of the model")
            dtype = np.dtype(specs[name].numpy_type).newbyteorder("<")
            raw = base64.b64decode(tensor["content"]["b64"], validate=True)
            shape = tuple(tensor["shape"])
            if len(raw) != dtype.itemsize * int(np.prod(shape)):
                raise PerfError(f"{path}: {name} has {len(raw)} bytes for shape {shape}")
            request[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.type)
        _check_request(request, specs)
        requests.append(request)
    if not requests:
        raise PerfError(f"{path}: no data entries")
    return requests


def _little_endian(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


# --- running perf_analyzer --------------------------------------------------------------------


@dataclass(frozen=True)
class PerfOptions:
    """How perf_analyzer measures: short count windows keep a 2-core run to minutes.

    A level is reported once three consecutive windows agree within `stability_percentage`
    (100: max/min of throughput and of latency at most 2, generous because other work shares
    the two cores); perf_analyzer fails a level that is still unstable after `max_trials`
    windows. A window
    holds `window_requests` per concurrent request, so that it spans about the same number of
    server executions at every level (a fixed count made concurrency 2 of the encoder flap
    between one batch of 2 and two of 1). With `request_count`, a level is instead one fixed
    set of requests without any stability check: bounded time, for tests.
    """

    window_requests: int = 8
    stability_percentage: float = 100.0
    max_trials: int = 6
    request_count: int | None = None
    unstable_fallback: bool = True
    protocol: str = "http"
    timeout_s: float | None = 900.0

    def arguments(self, concurrency: int) -> list[str]:
        if self.request_count is not None:
            return [f"--request-count={self.request_count}"]
        return [
            "--measurement-mode=count_windows",
            f"--measurement-request-count={self.window_requests * concurrency}",
            f"--stability-percentage={self.stability_percentage:g}",
            f"--max-trials={self.max_trials}",
        ]


@dataclass(frozen=True)
class PerfResult:
    """One concurrency level of one run; times in milliseconds (the CSV has microseconds)."""

    label: str
    model: str
    concurrency: int
    throughput: float  # inferences per second
    latency_avg_ms: float | None
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    client_send_ms: float
    network_ms: float  # network + server send/receive
    server_queue_ms: float
    server_compute_input_ms: float
    server_compute_infer_ms: float
    server_compute_output_ms: float
    client_recv_ms: float
    avg_batch: float | None = None  # server inferences per execution: dynamic batching at work
    stable: bool = True  # False: perf_analyzer's windows never agreed; a fixed-count measurement


CSV_COLUMNS = {
    "throughput": "Inferences/Second",
    "latency_p50_ms": "p50 latency",
    "latency_p90_ms": "p90 latency",
    "latency_p95_ms": "p95 latency",
    "latency_p99_ms": "p99 latency",
    "client_send_ms": "Client Send",
    "network_ms": "Network+Server Send/Recv",
    "server_queue_ms": "Server Queue",
    "server_compute_input_ms": "Server Compute Input",
    "server_compute_infer_ms": "Server Compute Infer",
    "server_compute_output_ms": "Server Compute Output",
    "client_recv_ms": "Client Recv",
}


def parse_perf_csv(
    path: Path, model: str, label: str, batches: Mapping[int, float] | None = None
) -> list[PerfResult]:
    """Rows of a perf_analyzer `-f` CSV (`--verbose-csv` adds the average latency).

    perf_analyzer orders the rows by throughput; they come back ordered by concurrency.
    """
    results = []
    if not path.is_file():
        return results
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            values = {
                field: float(row[column]) / (1 if field == "throughput" else 1000)
                for field, column in CSV_COLUMNS.items()
            }
            average = row.get("Avg latency")
            concurrency = int(row["Concurrency"])
            results.append(
                PerfResult(
                    label=label,
                    model=model,
                    concurrency=concurrency,
                    latency_avg_ms=float(average) / 1000 if average else None,
                    avg_batch=(batches or {}).get(concurrency),
                    **values,
                )
            )
    return sorted(results, key=lambda result: result.concurrency)


def parse_batch_sizes(output: str) -> dict[int, float]:
    """Average server batch per concurrency, from the 'Inference/Execution count' lines."""
    sizes = {}
    parts = re.split(r"^Request concurrency: (\d+)\s*$", output, flags=re.MULTILINE)
    for concurrency, block in zip(parts[1::2], parts[2::2], strict=True):
        inferences = re.search(r"Inference count: (\d+)", block)
        executions = re.search(r"Execution count: (\d+)", block)
        if inferences and executions and int(executions[1]) > 0:
            sizes[int(concurrency)] = int(inferences[1]) / int(executions[1])
    return sizes


class UnstableMeasurement(PerfError):
    """perf_analyzer gave up on a level: its windows never agreed within the threshold."""


def run_perf_analyzer(
    model: str,
    url: str,
    input_data: Path,
    concurrency: Sequence[int],
    output_dir: Path,
    label: str | None = None,
    options: PerfOptions | None = None,
    stream: TextIO | None = sys.stdout,
    extra_args: Sequence[str] = (),
) -> list[PerfResult]:
    """Measure `model` at each concurrency level; perf_analyzer's output goes to `stream`.

    One perf_analyzer call per level: in a `--concurrency-range` run, a level that does not
    stabilise silently ends the range (exit code 0), and the window size cannot follow the
    level. A level that does not stabilise is measured again over a fixed number of requests
    (three windows' worth) and marked `stable=False`, so that a run on a busy machine still
    ends with numbers (`options.unstable_fallback`).
    """
    options = options or PerfOptions()
    label = label or model
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower().replace("=", "")).strip("-")
    output_dir.mkdir(parents=True, exist_ok=True)
    results: list[PerfResult] = []
    for level in concurrency:
        if level < 1:
            raise PerfError(f"concurrency must be positive, not {level}")
        run = [model, url, input_data, level, output_dir / f"{slug}_c{level}.csv", label]
        try:
            results.append(
                _measure(*run, [*options.arguments(level), *extra_args], options, stream)
            )
        except UnstableMeasurement:
            if not options.unstable_fallback:
                raise
            count = 3 * options.window_requests * level
            log.warning(
                "%s at concurrency %d: not stable; measuring %d requests", label, level, count
            )
            fixed = [f"--request-count={count}", *extra_args]
            result = _measure(*run, fixed, options, stream)
            results.append(dataclasses.replace(result, stable=False))
    return results


def _measure(
    model: str,
    url: str,
    input_data: Path,
    concurrency: int,
    csv_path: Path,
    label: str,
    arguments: Sequence[str],
    options: PerfOptions,
    stream: TextIO | None,
) -> PerfResult:
    """One perf_analyzer call at one concurrency level."""
    csv_path.unlink(missing_ok=True)
    command = [
        str(perf_analyzer_binary()),
        f"-m{model}",
        f"-u{url}",
        f"-i{options.protocol}",
        f"--input-data={input_data}",
        f"--concurrency-range={concurrency}",
        *arguments,
        f"-f{csv_path}",
        "--verbose-csv",
    ]
    log.info("%s", " ".join(command))
    returncode, output = _run_streaming(
        command, perf_analyzer_environment(), stream, options.timeout_s
    )
    tail = "\n".join(output.splitlines()[-10:])
    if "Failed to obtain stable measurement" in output:
        raise UnstableMeasurement(f"{label} at concurrency {concurrency} is not stable:\n{tail}")
    if returncode != 0:
        raise PerfError(f"perf_analyzer exited with code {returncode}:\n{tail}")
    rows = parse_perf_csv(csv_path, model, label, parse_batch_sizes(output))
    if [row.concurrency for row in rows] != [concurrency]:
        raise PerfError(f"no result for {label} at concurrency {concurrency}:\n{tail}")
    return rows[0]


def _run_streaming(
    command: list[str], env: dict[str, str], stream: TextIO | None, timeout_s: float | None
) -> tuple[int, str]:
    """Run, echoing output as it comes (a run takes minutes), and never leave it running."""
    lines: list[str] = []
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    timed_out = threading.Event()

    def kill_on_timeout() -> None:
        timed_out.set()
        process.kill()

    timer = threading.Timer(timeout_s, kill_on_timeout) if timeout_s else None
    try:
        if timer is not None:
            timer.start()
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if stream is not None:
                stream.write(line)
                stream.flush()
        process.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    if timed_out.is_set():
        raise PerfError(f"perf_analyzer timed out after {timeout_s:.0f} s")
    return process.returncode, "".join(lines)


# --- summary ------------------------------------------------------------------------------------


SUMMARY_COLUMNS = (
    ("run", "label", "{}"),
    ("conc", "concurrency", "{}"),
    ("infer/s", "throughput", "{:.2f}"),
    ("batch", "avg_batch", "{:.2f}"),
    ("p50 ms", "latency_p50_ms", "{:.1f}"),
    ("p95 ms", "latency_p95_ms", "{:.1f}"),
    ("p99 ms", "latency_p99_ms", "{:.1f}"),
    ("queue ms", "server_queue_ms", "{:.1f}"),
    ("infer ms", "server_compute_infer_ms", "{:.1f}"),
    ("stable", "stable", "{}"),
)


def format_summary(results: Sequence[PerfResult]) -> str:
    """One aligned table of all runs: the numbers to compare across models and concurrency."""
    rows = [[title for title, _, _ in SUMMARY_COLUMNS]]
    for result in results:
        row = []
        for _, field, fmt in SUMMARY_COLUMNS:
            value = getattr(result, field)
            if isinstance(value, bool):
                value = "yes" if value else "no"
            row.append("-" if value is None else fmt.format(value))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(SUMMARY_COLUMNS))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_summary_csv(path: Path, results: Sequence[PerfResult]) -> Path:
    """All results in one CSV for later reports."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, [f.name for f in dataclasses.fields(PerfResult)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(result) for result in results)
    return path


# --- make perf ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One measured case: a model and the `--input-data` file of its requests."""

    label: str
    model: str
    input_data: Path
    window_requests: int


def build_scenarios(
    settings: Settings,
    url: str,
    output_dir: Path,
    prompts: Sequence[int],
    points: int,
    encoder_window: int,
    decoder_window: int,
) -> list[Scenario]:
    """Write the input files: the encoder gets one landscape and one portrait image (3:4),
    each decoder prompt count two images' embeddings with their prompts."""
    inputs_dir = output_dir / "inputs"
    encoder_specs = fetch_input_specs(url, settings.encoder_model)
    side = encoder_specs[contract.IMAGES].dims[0]
    landscape, portrait = (side, side * 3 // 4), (side * 3 // 4, side)
    encoder_file = write_input_data(
        inputs_dir / f"{settings.encoder_model}.json",
        [
            encoder_request(encoder_specs, *size, seed=i)
            for i, size in enumerate((landscape, portrait))
        ],
        encoder_specs,
    )
    scenarios = [Scenario("encoder", settings.encoder_model, encoder_file, encoder_window)]
    decoder_specs = fetch_input_specs(url, settings.decoder_model)
    for count in prompts:
        path = write_input_data(
            inputs_dir / f"{settings.decoder_model}_p{count}_n{points}.json",
            [decoder_request(decoder_specs, count, points, seed=i, frame=side) for i in range(2)],
            decoder_specs,
        )
        # A call costs about P single-prompt calls: fewer requests per window keep it short.
        window = max(2, decoder_window // count)
        scenarios.append(
            Scenario(f"decoder P={count} N={points}", settings.decoder_model, path, window)
        )
    return scenarios


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, not {text!r}"
        ) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf_analyzer", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 2, 4],
        help="comma-separated concurrency levels (default: 1,2,4)",
    )
    parser.add_argument(
        "--prompts",
        type=_int_list,
        default=[1],
        help="decoder prompts per request, e.g. 1,64 (P=64 costs ~5 s a call on 2 cores)",
    )
    parser.add_argument("--points", type=int, default=2, help="points per prompt (default: 2)")
    parser.add_argument(
        "--encoder-window",
        type=int,
        default=2,
        help="encoder requests per window and concurrent request (default: 2)",
    )
    parser.add_argument(
        "--decoder-window",
        type=int,
        default=16,
        help="decoder requests per window and concurrent request at P=1, divided by P "
        "(at least 2) (default: 16)",
    )
    parser.add_argument(
        "--stability-percentage", type=float, default=PerfOptions.stability_percentage
    )
    parser.add_argument("--max-trials", type=int, default=PerfOptions.max_trials)
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    settings = get_settings()
    try:
        log.info("%s", check_perf_analyzer())
        export_if_needed(settings)
    except (PerfError, subprocess.CalledProcessError) as exc:
        log.error("%s", exc)
        return 1

    server = TritonServer.from_settings(settings, log_path=args.output_dir / "triton.log")
    if server.is_ready():
        log.error("something already serves on %s; stop it or set TRITON_*_PORT", server.http_url)
        return 1

    def terminate(signum: int, _frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)  # even if inherited ignored (serving.launcher)
    results: list[PerfResult] = []
    failures: list[str] = []
    try:
        server.start()
        server.wait_ready(settings.triton_ready_timeout_s)
        log.info("Triton ready on %s (log: %s)", server.http_url, server.log_path)
        scenarios = build_scenarios(
            settings,
            server.http_url,
            args.output_dir,
            args.prompts,
            args.points,
            args.encoder_window,
            args.decoder_window,
        )
        for scenario in scenarios:
            print(f"\n=== {scenario.label} ({scenario.model}) ===", flush=True)
            options = PerfOptions(
                window_requests=scenario.window_requests,
                stability_percentage=args.stability_percentage,
                max_trials=args.max_trials,
            )
            for level in args.concurrency:  # an unstable level must not end the others
                try:
                    results += run_perf_analyzer(
                        scenario.model,
                        server.http_url,
                        scenario.input_data,
                        [level],
                        args.output_dir,
                        scenario.label,
                        options,
                    )
                except PerfError as exc:
                    log.error("%s", exc)
                    failures.append(f"{scenario.label} at concurrency {level}")
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    except (TritonError, PerfError, OSError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        server.stop()

    if results:
        print("\n" + format_summary(results))
        log.info("summary: %s", write_summary_csv(args.output_dir / "summary.csv", results))
    if failures:
        log.error("failed: %s", ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
