"""The CPU runtimes `model.py` runs `model.onnx` with, one class per runtime.

Apart from `model.py` because nothing here needs Triton: the benchmarks load this file to
time an exported graph with the very settings the served model uses.
"""

from __future__ import annotations

import numpy as np


class OnnxRuntimeRunner:
    """ONNX Runtime's CPU provider, with or without its memory arena.

    Without the arena every buffer of a call is fresh memory from malloc, whose large chunks
    are new pages the kernel faults in and zeroes on every call. The arena reuses its
    buffers, but it keeps the peak of every call (about twice the live memory) for the life
    of the process, so a runner with the arena gives it back when idle: ONNX Runtime shrinks
    an arena only at the end of a run that asks for it, so `release_memory` makes the
    smallest such run.
    """

    def __init__(
        self, model: str | bytes, threads: int, precision: str, arena: bool = False
    ) -> None:
        """`model`: the ONNX file's path, or the model's bytes."""
        import onnxruntime as ort

        if precision != "fp32":
            raise ValueError(f"onnxruntime runs fp32 only, not precision={precision!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = arena
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.arena = arena
        self.shrink = ort.RunOptions()
        self.shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        return self.session.run(output_names, inputs)

    def release_memory(self) -> None:
        """Free the arena's idle buffers: one run of the smallest inputs (zeros, every
        variable axis 1) that asks ONNX Runtime to shrink the arena when it ends."""
        if not self.arena:
            return
        types = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32}
        smallest = {
            tensor.name: np.zeros(
                [axis if isinstance(axis, int) else 1 for axis in tensor.shape],
                types[tensor.type],
            )
            for tensor in self.session.get_inputs()
        }
        self.session.run(None, smallest, self.shrink)


class OpenVinoRunner:
    def __init__(self, path: str, threads: int, precision: str) -> None:
        import openvino as ov

        hints = {"fp32": "f32", "bf16": "bf16"}
        if precision not in hints:
            raise ValueError(f"unknown precision {precision!r}; use one of {sorted(hints)}")
        core = ov.Core()
        # Without bf16 arithmetic (AVX512-BF16, AMX) OpenVINO quietly computes fp32.
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.computes = "bf16" if precision == "bf16" and "BF16" in capabilities else "fp32"
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

    def release_memory(self) -> None:
        """OpenVINO keeps its buffers for its compiled shapes; nothing to give back here."""


RUNNERS = {"onnxruntime": OnnxRuntimeRunner, "openvino": OpenVinoRunner}
