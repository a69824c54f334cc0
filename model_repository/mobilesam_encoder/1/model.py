"""Triton Python-backend model that runs `model.onnx` (next to this file) on a CPU runtime.

Shared by both MobileSAM models (the decoder's `model.py` is a symlink to this file). Names,
data types and the batching contract come from the model's `config.pbtxt`; the runtime, the
precision and the thread count come from its `parameters`:

  runtime           "onnxruntime" (default) or "openvino"
  precision         "fp32" (default) or "bf16" (OpenVINO on CPUs with AVX512-BF16/AMX)
  intra_op_threads  threads per instance; instances x threads should not exceed the cores

Triton's dynamic batcher hands `execute` several requests at once. Requests whose non-batch
shapes agree are concatenated along the batch axis and run as one inference, which is what
makes batching pay off; the outputs are split back per request.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np
import triton_python_backend_utils as pb_utils


class OnnxRuntimeRunner:
    def __init__(self, path: str, threads: int, precision: str) -> None:
        import onnxruntime as ort

        if precision != "fp32":
            raise ValueError(f"onnxruntime runs fp32 only, not precision={precision!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        return self.session.run(output_names, inputs)


class OpenVinoRunner:
    def __init__(self, path: str, threads: int, precision: str) -> None:
        import openvino as ov

        hints = {"fp32": "f32", "bf16": "bf16"}
        if precision not in hints:
            raise ValueError(f"unknown precision {precision!r}; use one of {sorted(hints)}")
        core = ov.Core()
        self.model = core.compile_model(
            path,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": hints[precision],
                "PERFORMANCE_HINT": "LATENCY",
            },
        )
        self.request = self.model.create_infer_request()

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        results = self.request.infer(inputs)
        # A port can carry several tensor names; look each output up by any of them.
        return [np.asarray(results[self.model.output(name)]) for name in output_names]


RUNNERS = {"onnxruntime": OnnxRuntimeRunner, "openvino": OpenVinoRunner}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        runtime = parameters.get("runtime", "onnxruntime")
        if runtime not in RUNNERS:
            raise ValueError(f"unknown runtime {runtime!r}; use one of {sorted(RUNNERS)}")
        threads = int(parameters.get("intra_op_threads", "1"))
        precision = parameters.get("precision", "fp32")

        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.outputs = [
            (tensor["name"], pb_utils.triton_string_to_numpy(tensor["data_type"]))
            for tensor in config["output"]
        ]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.runner = RUNNERS[runtime](path, threads, precision)
        self.logger = pb_utils.Logger
        self.logger.log_info(
            f"{config['name']}: {runtime} {precision}, {threads} threads, "
            f"max_batch_size {config.get('max_batch_size', 0)}"
        )

    def execute(self, requests: list) -> list:
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = defaultdict(list)
        for index, request in enumerate(requests):
            arrays = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.input_names
            }
            signature = tuple(array.shape[1:] for array in arrays.values())
            groups[signature].append((index, arrays))

        responses: list = [None] * len(requests)
        for members in groups.values():
            try:
                for index, response in self._run_group(members):
                    responses[index] = response
            except Exception as exc:  # one bad batch must not take the others down
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                for index, _ in members:
                    responses[index] = pb_utils.InferenceResponse(error=error)
        return responses

    def _run_group(self, members: list[tuple[int, dict[str, np.ndarray]]]):
        if len(members) == 1:
            batch = members[0][1]
        else:
            batch = {
                name: np.concatenate([arrays[name] for _, arrays in members])
                for name in self.input_names
            }
        results = self.runner.run(batch, [name for name, _ in self.outputs])
        start = 0
        for index, arrays in members:
            stop = start + len(next(iter(arrays.values())))
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(result[start:stop], dtype=dtype))
                for (name, dtype), result in zip(self.outputs, results, strict=True)
            ]
            yield index, pb_utils.InferenceResponse(output_tensors=tensors)
            start = stop
