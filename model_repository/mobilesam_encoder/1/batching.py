"""How the requests of one `execute()` call become runtime calls of bounded work, and back.

Triton's dynamic batcher hands `execute()` several requests. Requests whose non-batch shapes
agree are concatenated along the batch axis and run together, which is what makes batching pay
off. But a runtime call's memory grows with the work in it (the decoder holds ~18 MB of
activations per prompt), so no call gets more than `max_work` units of work: a batch item, or,
for tensors with a prompt axis (axis 1, named in `prompt_tensors`), a prompt. Requests are
packed into calls up to that bound in arrival order; a request larger than the bound is split
into pieces (whole batch items first, then runs of prompts), and its outputs are put back
together. Plain numpy, so that it is tested without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Piece:
    """Part of one request: some of its batch items and, when split, some of their prompts."""

    request: int
    items: slice
    prompts: slice | None
    work: int


def prompt_count(arrays: Mapping[str, np.ndarray], prompt_tensors: Sequence[str]) -> int:
    """Prompts per batch item: axis 1 of the first prompt-axis input (1 when there is none)."""
    for name in prompt_tensors:
        if name in arrays:
            return int(arrays[name].shape[1])
    return 1


def split(index: int, arrays: Mapping[str, np.ndarray], prompts: int, max_work: int) -> list[Piece]:
    """One request's pieces, each at most `max_work` (a single prompt may exceed nothing)."""
    items = len(next(iter(arrays.values())))
    if items * prompts <= max_work:
        return [Piece(index, slice(0, items), None, items * prompts)]
    if prompts <= max_work:
        step = max_work // prompts
        return [
            Piece(
                index,
                slice(start, min(start + step, items)),
                None,
                (min(step, items - start)) * prompts,
            )
            for start in range(0, items, step)
        ]
    return [
        Piece(
            index,
            slice(item, item + 1),
            slice(start, min(start + max_work, prompts)),
            min(max_work, prompts - start),
        )
        for item in range(items)
        for start in range(0, prompts, max_work)
    ]


def cut(
    arrays: Mapping[str, np.ndarray], piece: Piece, prompts: int, prompt_tensors: Sequence[str]
) -> Arrays:
    """The piece's inputs. A prompt-axis tensor with one entry there (a mask input shared by
    every prompt) is passed whole to every piece."""
    result = {}
    for name, array in arrays.items():
        part = array[piece.items]
        if piece.prompts is not None and name in prompt_tensors and array.shape[1] == prompts:
            part = part[:, piece.prompts]
        result[name] = part
    return result


def plan(
    requests: Sequence[Mapping[str, np.ndarray]], max_work: int, prompt_tensors: Sequence[str]
) -> list[list[tuple[Piece, Arrays]]]:
    """Runtime calls in order: lists of pieces with equal non-batch shapes, at most `max_work`
    together."""
    calls: list[list[tuple[Piece, Arrays]]] = []
    open_calls: dict[tuple, int] = {}  # signature -> index of the call still taking pieces
    for index, arrays in enumerate(requests):
        prompts = prompt_count(arrays, prompt_tensors)
        for piece in split(index, arrays, prompts, max_work):
            inputs = cut(arrays, piece, prompts, prompt_tensors)
            signature = tuple((name, array.shape[1:]) for name, array in inputs.items())
            call = open_calls.get(signature)
            if call is None or sum(p.work for p, _ in calls[call]) + piece.work > max_work:
                open_calls[signature] = len(calls)
                calls.append([])
                call = open_calls[signature]
            calls[call].append((piece, inputs))
    return calls


def run_all(
    requests: Sequence[Mapping[str, np.ndarray]],
    run: Callable[[Arrays], list[np.ndarray]],
    output_names: Sequence[str],
    max_work: int,
    prompt_tensors: Sequence[str] = (),
) -> list[Arrays]:
    """Every request's outputs, computed in calls of at most `max_work`."""
    parts: dict[int, list[tuple[Piece, Arrays]]] = {index: [] for index in range(len(requests))}
    for call in plan(requests, max_work, prompt_tensors):
        batch = {
            name: np.concatenate([inputs[name] for _, inputs in call])
            if len(call) > 1
            else call[0][1][name]
            for name in call[0][1]
        }
        results = run(batch)
        start = 0
        for piece, inputs in call:
            stop = start + len(next(iter(inputs.values())))
            outputs = {
                name: result[start:stop] for name, result in zip(output_names, results, strict=True)
            }
            parts[piece.request].append((piece, outputs))
            start = stop
    return [assemble(parts[index], output_names, prompt_tensors) for index in range(len(requests))]


def assemble(
    parts: Sequence[tuple[Piece, Arrays]],
    output_names: Sequence[str],
    prompt_tensors: Sequence[str],
) -> Arrays:
    """A request's outputs from its pieces' (in any order): prompts joined along axis 1 per
    batch item, then batch items along axis 0."""
    if len(parts) == 1:
        return parts[0][1]
    rows: list[list[Arrays]] = []
    ordered = sorted(
        parts, key=lambda part: (part[0].items.start, (part[0].prompts or slice(0)).start or 0)
    )
    for piece, outputs in ordered:
        if piece.prompts is not None and piece.prompts.start > 0:
            rows[-1].append(outputs)
        else:
            rows.append([outputs])
    joined = []
    for row in rows:
        joined.append(
            {
                name: np.concatenate([o[name] for o in row], axis=1)
                if len(row) > 1 and name in prompt_tensors
                else row[0][name]
                for name in output_names
            }
        )
    return {name: np.concatenate([j[name] for j in joined]) for name in output_names}
