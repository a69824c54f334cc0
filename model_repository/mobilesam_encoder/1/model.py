"""Triton Python-backend model that runs `model.onnx` (next to this file) on a CPU runtime.

Shared by both MobileSAM models (the decoder's `model.py` is a symlink to this file). Names,
data types and the batching contract come from the model's `config.pbtxt`; the runtime, the
precision and the thread count come from its `parameters`:

  runtime           "onnxruntime" (default) or "openvino"
  precision         "fp32" (default) or "bf16" (OpenVINO on CPUs with AVX512-BF16/AMX)
  intra_op_threads  threads per instance; instances x threads should not exceed the cores
  max_work_per_run  the most batch items (or, with prompt_tensors, prompts) one runtime
                    call gets: bounds its memory (default: max_batch_size)
  memory_arena      "true": ONNX Runtime keeps its buffers between calls and gives them back
                    once the model is idle; "false" (default): every call allocates afresh
  prompt_tensors    comma-separated tensors whose axis 1 counts prompts (the decoder's)

The environment variable PRECISION (the `precision` of common/settings.py, inherited from
Triton's environment) selects the profile: unset or "fp32", the parameters above; "bf16", the
fast profile: OpenVINO with bf16 arithmetic, whatever the parameters say.

Triton's dynamic batcher hands `execute` several requests at once. Requests whose non-batch
shapes agree are concatenated along the batch axis and run together, up to max_work_per_run;
larger requests are split (`batching.py`, next to this file); the outputs are put back
together per request. The runtimes themselves are in `runners.py`, next to this file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import triton_python_backend_utils as pb_utils
from batching import run_all
from runners import RUNNERS

# The precision profile (common/settings.py `precision`; tests/test_precision.py checks the
# name): "bf16" runs this runtime at this precision, whatever config.pbtxt says.
PRECISION_VARIABLE = "PRECISION"
FAST_PROFILES = {"bf16": ("openvino", "bf16")}


def choose_runtime(parameters: dict[str, str], environment: dict[str, str]) -> tuple[str, str]:
    """(runtime, precision): the config's, unless the environment asks for the fast profile."""
    profile = environment.get(PRECISION_VARIABLE, "").strip().lower() or "fp32"
    if profile in FAST_PROFILES:
        return FAST_PROFILES[profile]
    if profile != "fp32":
        choices = ["fp32", *FAST_PROFILES]
        raise ValueError(f"{PRECISION_VARIABLE}={profile!r}: use one of {choices}")
    return parameters.get("runtime", "onnxruntime"), parameters.get("precision", "fp32")


class IdleTrim:
    """Give freed memory back to the system once the model has been idle for a while.

    A runtime call frees its activations (up to ~1 GB for four images), but glibc keeps them
    in its arenas, and a runtime's own arena keeps them too (`release`): the stub would stay
    at its peak for good. Releasing after every call would make the next one fault its pages
    in again; releasing once idle costs a busy model nothing.
    """

    def __init__(self, release: Callable[[], None], idle_s: float = 5.0) -> None:
        path = ctypes.util.find_library("c")
        self.libc = ctypes.CDLL(path) if path else None
        self.release = release
        self.idle_s = idle_s
        self.lock = threading.Lock()
        self.running = 0
        self.last_end = time.monotonic()
        self.dirty = False
        if self.libc is not None and hasattr(self.libc, "malloc_trim"):
            threading.Thread(target=self._run, daemon=True).start()

    def __enter__(self) -> None:
        with self.lock:
            self.running += 1
            self.dirty = True

    def __exit__(self, *_exc: object) -> None:
        with self.lock:
            self.running -= 1
            self.last_end = time.monotonic()

    def _run(self) -> None:
        while True:
            time.sleep(self.idle_s / 2)
            with self.lock:
                idle = self.running == 0 and time.monotonic() - self.last_end >= self.idle_s
                if not (idle and self.dirty):
                    continue
                self.dirty = False
            try:
                self.release()
            except Exception as exc:  # a failed release must not end the trimming
                pb_utils.Logger.log_warn(f"releasing the runtime's memory failed: {exc}")
            self.libc.malloc_trim(0)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        runtime, precision = choose_runtime(parameters, dict(os.environ))
        if runtime not in RUNNERS:
            raise ValueError(f"unknown runtime {runtime!r}; use one of {sorted(RUNNERS)}")
        threads = int(parameters.get("intra_op_threads", "1"))
        self.max_work = int(parameters.get("max_work_per_run", config.get("max_batch_size", 1)))
        self.prompt_tensors = [
            name.strip() for name in parameters.get("prompt_tensors", "").split(",") if name.strip()
        ]

        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.outputs = [
            (tensor["name"], pb_utils.triton_string_to_numpy(tensor["data_type"]))
            for tensor in config["output"]
        ]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        arena = parameters.get("memory_arena", "false").strip().lower() == "true"
        options = {"arena": arena} if runtime == "onnxruntime" else {}
        self.runner = RUNNERS[runtime](path, threads, precision, **options)
        self.idle_trim = IdleTrim(self.runner.release_memory)
        self.logger = pb_utils.Logger
        computes = getattr(self.runner, "computes", precision)
        self.logger.log_info(
            f"{config['name']}: {runtime} {precision} (computes {computes}), {threads} threads, "
            f"max_batch_size {config.get('max_batch_size', 0)}, {self.max_work} per run"
            + (", memory arena released when idle" if arena and runtime == "onnxruntime" else "")
        )

    def execute(self, requests: list) -> list:
        arrays = [
            {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.input_names
            }
            for request in requests
        ]
        with self.idle_trim:
            try:
                results = self._run(arrays)
            except Exception:  # find out which request it was: one bad one must not fail all
                results = []
                for single in arrays:
                    try:
                        results += self._run([single])
                    except Exception as exc:
                        results.append(pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))
        return [
            pb_utils.InferenceResponse(error=result)
            if isinstance(result, pb_utils.TritonError)
            else pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(result[name], dtype=dtype))
                    for name, dtype in self.outputs
                ]
            )
            for result in results
        ]

    def _run(self, arrays: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        names = [name for name, _ in self.outputs]
        return run_all(
            arrays,
            lambda batch: self.runner.run(batch, names),
            names,
            self.max_work,
            self.prompt_tensors,
        )
