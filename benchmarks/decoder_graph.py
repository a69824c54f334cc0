"""The decoder's first layer folded vs shared, side by side on the exported model.

model.onnx holds both forms of the first layer behind an If on the prompt count
(`export/branching.py`). Here each branch is lifted out into a model of its own, and both
run in this process through the served model's own ONNX Runtime runner (`runners.py` in
the model repository) with the committed decoder's threads and memory arena, in alternating
trials (A B, B A, ...), at one prompt (a click) and at the prompts of one of segment
everything's runtime calls. The report's "Defaults chosen from the data" sets their medians
and ranges beside the committed `FOLD_FIRST_LAYER_UP_TO_PROMPTS`.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
from onnx import helper

from benchmarks.variants import SOURCE_REPOSITORY, ModelConfig, committed_variant
from common import contract
from export.branching import FOLD_FIRST_LAYER_UP_TO_PROMPTS

# Segment everything's calls reach the runtime in chunks of max_work_per_run prompts
# (model_repository/mobilesam_decoder/config.pbtxt).
MANY_PROMPTS = 16
ROUNDS = 8
# Runs per trial: about half a second of work each.
RUNS = {1: 8, MANY_PROMPTS: 1}


def branch_model(model: onnx.ModelProto, folded: bool) -> onnx.ModelProto:
    """One branch of the decoder's If as a standalone model with the same inputs."""
    (choice,) = [node for node in model.graph.node if node.op_type == "If"]
    name = "then_branch" if folded else "else_branch"
    branch = next(a.g for a in choice.attribute if a.name == name)
    nodes = list(branch.node)
    for inner, outer in zip(branch.output, choice.output, strict=True):
        nodes.append(helper.make_node("Identity", [inner.name], [outer]))
    used = {tensor for node in nodes for tensor in node.input}
    graph = helper.make_graph(
        nodes,
        name,
        list(model.graph.input),
        list(model.graph.output),
        [weight for weight in model.graph.initializer if weight.name in used],  # its own only
    )
    standalone = helper.make_model(graph, opset_imports=list(model.opset_import))
    standalone.ir_version = model.ir_version
    return standalone


def served_runners(source: Path = SOURCE_REPOSITORY) -> ModuleType:
    """The decoder's `runners.py`, loaded from the model repository (it needs no Triton)."""
    path = source / contract.DECODER_MODEL / "1" / "runners.py"
    spec = importlib.util.spec_from_file_location("served_runners", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def click_inputs(prompts: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One image's embedding with `prompts` clicks (each with upstream's padding point)."""
    rng = np.random.default_rng(seed)
    side = contract.LOW_RES_SIDE
    clicks = rng.uniform(0, contract.DEFAULT_IMAGE_SIDE, (1, prompts, 1, 2))
    coords = np.concatenate([clicks, np.zeros((1, prompts, 1, 2))], axis=2)
    labels = np.tile([contract.FOREGROUND_LABEL, contract.PADDING_LABEL], (1, prompts, 1))
    return {
        contract.IMAGE_EMBEDDINGS: rng.normal(size=(1, *contract.EMBEDDING_SHAPE)).astype(
            np.float32
        ),
        contract.POINT_COORDS: coords.astype(np.float32),
        contract.POINT_LABELS: labels.astype(np.float32),
        contract.MASK_INPUT: np.zeros((1, 1, 1, side, side), dtype=np.float32),
        contract.HAS_MASK_INPUT: np.zeros((1, 1), dtype=np.float32),
    }


def compare_first_layers(
    decoder_onnx: Path, config: ModelConfig | None = None, rounds: int = ROUNDS
) -> dict[str, Any]:
    """Per-call milliseconds of both branches, alternating, and how far their answers differ,
    run as `config` (default: the committed decoder's) sets ONNX Runtime up."""
    config = config or committed_variant().configs[contract.DECODER_MODEL]
    if config.runtime != "onnxruntime":
        raise ValueError(f"the decoder is served by {config.runtime}; this compares ONNX Runtime")
    served_runner = served_runners().OnnxRuntimeRunner
    model = onnx.load(str(decoder_onnx))
    outputs = [output.name for output in model.graph.output]
    runners = {
        form: served_runner(
            branch_model(model, folded=form == "folded").SerializeToString(),
            config.threads,
            "fp32",
            arena=config.memory_arena == "true",
        )
        for form in ("folded", "shared")
    }
    levels = []
    for prompts in (1, MANY_PROMPTS):
        feeds = click_inputs(prompts)
        answers = {form: runner.run(feeds, outputs) for form, runner in runners.items()}
        difference = max(
            float(np.abs(a - b).max())
            for a, b in zip(answers["folded"], answers["shared"], strict=True)
        )
        trials: dict[str, list[float]] = {form: [] for form in runners}
        for trial in range(rounds):
            order = list(runners) if trial % 2 == 0 else list(runners)[::-1]
            for form in order:
                started = time.perf_counter()
                for _ in range(RUNS[prompts]):
                    runners[form].run(feeds, outputs)
                trials[form].append((time.perf_counter() - started) / RUNS[prompts] * 1000)
        levels.append(
            {
                "prompts": prompts,
                "max_abs_difference": difference,
                **{
                    form: {
                        "median_ms": statistics.median(ms),
                        "range_ms": [min(ms), max(ms)],
                        "trials": len(ms),
                    }
                    for form, ms in trials.items()
                },
            }
        )
    return {
        "levels": levels,
        "committed_up_to_prompts": FOLD_FIRST_LAYER_UP_TO_PROMPTS,
        "threads": config.threads,
        "memory_arena": config.memory_arena == "true",
    }
