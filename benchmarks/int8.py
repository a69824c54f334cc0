"""Would int8 static quantization of the encoder pay here? Measured, not assumed.

The encoder's ONNX file is quantized statically (ONNX Runtime's quantizer: QDQ, weights int8
per channel, activations uint8, convolutions and matmuls), calibrated on the real photographs
of `testkit.photos` prepared exactly as the proxy prepares them. OpenVINO then runs the fp32
and the int8 file in alternating trials, and the int8 embeddings are compared with fp32's. It
would join the fast profile only if it beat what that profile runs (bf16 where the CPU has
it, fp32 otherwise) at a tolerable error.

Runs as its own process (`python -m benchmarks.int8 ENCODER.onnx OUT.json`): the quantizer
and two compiled encoders stay out of the benchmark driver.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import THREADS
from common import contract

TRIALS = 3
CALIBRATION_PHOTOS = 4


def calibration_inputs(side: int = contract.DEFAULT_IMAGE_SIDE) -> list[dict[str, np.ndarray]]:
    from proxy.geometry import prepare_image
    from testkit.photos import photos

    inputs = []
    for photo in photos()[:CALIBRATION_PHOTOS]:
        padded, size = prepare_image(photo.rgb(), side)
        inputs.append(
            {contract.IMAGES: padded[None], contract.INPUT_SIZE: np.array([size], np.int32)}
        )
    return inputs


def quantize(source: Path, target: Path, inputs: list[dict[str, np.ndarray]]) -> float:
    """Seconds spent quantizing `source` into `target`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.pending = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.pending, None)

    started = time.perf_counter()
    prepared = target.with_suffix(".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
    )
    prepared.unlink(missing_ok=True)
    return time.perf_counter() - started


def measure(source: Path, work_dir: Path) -> dict[str, Any]:
    import openvino as ov

    inputs = calibration_inputs()
    quantized = work_dir / "encoder-int8.onnx"
    seconds = quantize(source, quantized, inputs)
    core = ov.Core()
    requests = {}
    for name, path in (("fp32", source), ("int8", quantized)):
        compiled = core.compile_model(
            str(path), "CPU", {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
        )
        requests[name] = compiled.create_infer_request()

    def run(name: str, item: dict[str, np.ndarray]) -> np.ndarray:
        return np.array(next(iter(requests[name].infer(item).values())))

    test = inputs[0]
    outputs = {name: run(name, test) for name in requests}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in requests}
    for trial in range(TRIALS):
        for name in requests if trial % 2 == 0 else reversed(list(requests)):
            started = time.perf_counter()
            run(name, test)
            times[name].append(time.perf_counter() - started)
    reference, candidate = outputs["fp32"], outputs["int8"]
    error = np.abs(candidate - reference)
    return {
        "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        "quantize_s": round(seconds, 1),
        "calibration_photos": len(inputs),
        "trials": TRIALS,
        "ms": {name: [round(t * 1000, 1) for t in values] for name, values in times.items()},
        "median_ms": {
            name: round(statistics.median(values) * 1000, 1) for name, values in times.items()
        },
        "max_abs_error": float(error.max()),
        "relative_mean_error": float(error.mean() / np.abs(reference).mean()),
    }


def run_in_subprocess(source: Path, work_dir: Path, timeout_s: float = 900) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    output = work_dir / "int8.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.int8", str(source), str(output)],
        check=True,
        timeout=timeout_s,
    )
    return json.loads(output.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8", description=__doc__)
    parser.add_argument("source", type=Path, help="the fp32 encoder model.onnx")
    parser.add_argument("output", type=Path, help="where the JSON result goes")
    args = parser.parse_args(argv)
    result = measure(args.source, args.output.parent)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
