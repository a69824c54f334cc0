"""Two traced decoder graphs in one ONNX model, chosen per call by the number of prompts.

The tracer records one path through the graph, so the decoder is traced twice (first layer
folded, first layer shared: `export.graphs`) and the two are joined under an ONNX `If` on
`point_labels`' prompt axis. Both branches take the model's inputs from the enclosing scope,
weights identical in both are stored once, and every other name is prefixed with its branch
so that the two never collide. Triton, the proxy and the verification see one model.onnx
with one contract.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from common import contract

# Calls with at most this many prompts per image run the first layer folded
# (`export.graphs.first_layer_per_prompt`); larger ones share its image-side projections
# (`first_layer`). For one click (T = 7 prompt tokens) sharing costs 403 M multiply-adds per
# image (three 4096 x 256 x 128 projections) plus 70 M per prompt, folding 235 M per prompt
# and nothing per image: one prompt is cheaper folded, two cost about as much either way, and
# more points per prompt tip it further towards sharing.
FOLD_FIRST_LAYER_UP_TO_PROMPTS = 1


def _content_key(tensor: onnx.TensorProto) -> tuple:
    array = numpy_helper.to_array(tensor)
    return array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest()


class _Merger:
    def __init__(self, inputs: set[str]) -> None:
        self.inputs = inputs
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.by_content: dict[tuple, str] = {}

    def _store(self, tensor: onnx.TensorProto, prefix: str) -> str:
        """The outer-scope name of this weight: an existing one with the same content, or its
        own (prefixed if another weight already has that name)."""
        key = _content_key(tensor)
        if key in self.by_content:
            return self.by_content[key]
        name = tensor.name if tensor.name not in self.initializers else prefix + tensor.name
        stored = onnx.TensorProto()
        stored.CopyFrom(tensor)
        stored.name = name
        self.initializers[name] = stored
        self.by_content[key] = name
        return name

    def branch(self, model: onnx.ModelProto, prefix: str) -> onnx.GraphProto:
        """The model's graph as an If branch: no inputs, weights in the outer scope."""
        weights = {t.name: self._store(t, prefix) for t in model.graph.initializer}

        def rename(name: str) -> str:
            if not name or name in self.inputs:
                return name
            return weights.get(name, prefix + name)

        nodes = []
        for index, node in enumerate(model.graph.node):
            if any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute
            ):
                raise ValueError(f"{node.name}: nested graphs are not renamed")
            copy = helper.make_node(
                node.op_type,
                [rename(n) for n in node.input],
                [rename(n) for n in node.output],
                name=prefix + (node.name or f"node_{index}"),
                domain=node.domain,
            )
            copy.attribute.extend(node.attribute)
            nodes.append(copy)
        outputs = []
        for output in model.graph.output:
            renamed = onnx.ValueInfoProto()
            renamed.CopyFrom(output)
            renamed.name = rename(output.name)
            outputs.append(renamed)
        return helper.make_graph(nodes, prefix.rstrip("/"), [], outputs)


def select_by_prompts(
    few: onnx.ModelProto, many: onnx.ModelProto, up_to_prompts: int
) -> onnx.ModelProto:
    """One model running `few` for calls with at most `up_to_prompts` prompts per image, else
    `many`. Both must have the same inputs and outputs (names, types, shapes)."""
    if [i.name for i in few.graph.input] != [i.name for i in many.graph.input] or [
        o.name for o in few.graph.output
    ] != [o.name for o in many.graph.output]:
        raise ValueError("the two decoder graphs must share their inputs and outputs")
    merger = _Merger({i.name for i in many.graph.input})
    many_branch = merger.branch(many, "shared/")
    few_branch = merger.branch(few, "folded/")
    limit = numpy_helper.from_array(np.array([up_to_prompts], dtype=np.int64), "prompt_limit")
    nodes = [
        # point_labels is [batch, prompts, points]: its dimension 1 is the prompts per image.
        helper.make_node("Shape", [contract.POINT_LABELS], ["prompt_count"], start=1, end=2),
        helper.make_node("LessOrEqual", ["prompt_count", limit.name], ["few_prompts_vector"]),
        helper.make_node("Squeeze", ["few_prompts_vector"], ["few_prompts"]),
        helper.make_node(
            "If",
            ["few_prompts"],
            [o.name for o in many.graph.output],
            name="choose_first_layer",
            then_branch=few_branch,
            else_branch=many_branch,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        many.graph.name,
        list(many.graph.input),
        list(many.graph.output),
        [*merger.initializers.values(), limit],
    )
    model = helper.make_model(graph, opset_imports=list(many.opset_import))
    model.ir_version = many.ir_version
    onnx.checker.check_model(model)
    return model
