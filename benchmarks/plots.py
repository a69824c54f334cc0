"""Small PNG plots for BENCHMARKS.md (matplotlib, Agg backend, no display needed).

Small on purpose: they are committed next to the report, and a reader needs the shape of a
curve, not a poster. Every plot function returns the file it wrote, or None when the results
it needs are missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.analysis import (
    DECODER,
    DECODER_BATCH,
    ENCODER,
    compute_ms,
    perf_row,
    perf_rows,
)
from common import contract

SIZE = (7.0, 2.8)
DPI = 80


def _save(figure: plt.Figure, path: Path, layout: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def throughput_by_variant(section: dict[str, Any] | None, path: Path, title: str) -> Path | None:
    """Inferences/s against concurrency, one line per variant, encoder and decoder side by side."""
    variants = (section or {}).get("variants", [])
    if not variants:
        return None
    figure, axes = plt.subplots(1, 2, figsize=SIZE)
    for axis, role in zip(axes, (ENCODER, DECODER), strict=True):
        for record in variants:
            rows = perf_rows(record, role)
            if rows:
                axis.plot(
                    [r["concurrency"] for r in rows],
                    [r["throughput"] for r in rows],
                    marker="o",
                    label=record["name"],
                )
        axis.set_title(f"{role}: {title}", fontsize=9)
        axis.set_xlabel("concurrency", fontsize=8)
        axis.set_ylabel("inferences/s", fontsize=8)
        axis.set_xticks(sorted({r["concurrency"] for v in variants for r in perf_rows(v, role)}))
        axis.set_ylim(bottom=0)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=7)
    figure.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(figure, path, layout=False)


def latency_split(
    section: dict[str, Any] | None, path: Path, levels: dict[str, int]
) -> Path | None:
    """Mean latency split into queue, compute and the rest, per variant, at one level each."""
    variants = (section or {}).get("variants", [])
    if not variants:
        return None
    figure, axes = plt.subplots(1, 2, figsize=SIZE)
    for axis, role in zip(axes, (ENCODER, DECODER), strict=True):
        level = levels[role]
        names, queue, compute, rest = [], [], [], []
        for record in variants:
            row = perf_row(record, role, level)
            if row is None:
                continue
            names.append(record["name"])
            queue.append(row["server_queue_ms"])
            compute.append(compute_ms(row))
            total = row.get("latency_avg_ms") or row["latency_p50_ms"]
            rest.append(max(0.0, total - row["server_queue_ms"] - compute_ms(row)))
        positions = range(len(names))
        axis.barh(positions, queue, label="queue", color="#d62728")
        axis.barh(positions, compute, left=queue, label="compute", color="#1f77b4")
        lefts = [q + c for q, c in zip(queue, compute, strict=True)]
        axis.barh(positions, rest, left=lefts, label="network + client", color="#bbbbbb")
        axis.set_yticks(list(positions), names, fontsize=7)
        axis.set_title(f"{role}, concurrency {level}: mean ms", fontsize=9)
        axis.tick_params(labelsize=7)
    axes[1].legend(fontsize=6)
    return _save(figure, path)


def runtime_bars(section: dict[str, Any] | None, path: Path) -> Path | None:
    """Compute time at concurrency 1 for each runtime/precision: encoder, decoder with one
    click, and decoder with segment everything's prompts per call (when measured)."""
    variants = (section or {}).get("variants", [])
    if not variants:
        return None
    roles = [ENCODER, DECODER]
    if any(perf_row(record, DECODER_BATCH, 1) for record in variants):
        roles.append(DECODER_BATCH)
    figure, axes = plt.subplots(1, len(roles), figsize=SIZE)
    for axis, role in zip(axes, roles, strict=True):
        names, values = [], []
        for record in variants:
            row = perf_row(record, role, 1)
            if row:
                names.append(record["name"])
                values.append(compute_ms(row))
        bars = axis.bar(names, values, color=["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"])
        axis.bar_label(bars, fmt="%.0f", fontsize=7)
        axis.set_title(f"{role}\ncompute ms at concurrency 1", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.tick_params(axis="x", labelrotation=30)
    return _save(figure, path)


def _load_lines(axes, rows: list[dict[str, Any]], label: str, percentile: str) -> None:
    """One load-generator series: requests/s (left) and a latency percentile (right)."""
    rows = sorted((r for r in rows if r["ok"]), key=lambda r: r["concurrency"])
    if not rows:
        return
    levels = [r["concurrency"] for r in rows]
    axes[0].plot(levels, [r["throughput"] for r in rows], marker="o", label=label)
    axes[1].plot(levels, [r["latency_ms"][percentile] for r in rows], marker="o", label=label)
    for axis in axes:
        axis.set_xticks(levels)


def _concurrency_axes(axes) -> None:
    for axis in axes:
        axis.set_xlabel("concurrency", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[0].legend(fontsize=7)


def e2e_cold(e2e: dict[str, Any] | None, path: Path) -> Path | None:
    """Cold requests: throughput and p50 against concurrency, ours and the PyTorch baseline."""
    if not e2e:
        return None
    figure, axes = plt.subplots(1, 2, figsize=SIZE)
    for target, label in (("ours", "Triton + proxy"), ("baseline", "PyTorch in-process")):
        cold = [r for r in e2e.get(target, []) if r["workload"] == "cold"]
        _load_lines(axes, cold, label, "p50")
    axes[0].set_title("cold image, one click: requests/s", fontsize=9)
    axes[1].set_title("cold image, one click: p50 latency (ms)", fontsize=9)
    axes[1].set_ylim(bottom=0)
    _concurrency_axes(axes)
    return _save(figure, path)


def e2e_workloads(e2e: dict[str, Any] | None, path: Path) -> Path | None:
    """Our workloads: throughput and p95 against concurrency."""
    if not e2e:
        return None
    workloads = sorted({r["workload"] for r in e2e.get("ours", [])})
    if not workloads:
        return None
    figure, axes = plt.subplots(1, 2, figsize=SIZE)
    for workload in workloads:
        rows = [r for r in e2e["ours"] if r["workload"] == workload]
        _load_lines(axes, rows, workload, "p95")
    axes[0].set_title("requests/s by workload", fontsize=9)
    axes[1].set_title("p95 latency (ms, log scale)", fontsize=9)
    axes[1].set_yscale("log")
    _concurrency_axes(axes)
    return _save(figure, path)


def delay_sweep(section: dict[str, Any] | None, path: Path) -> Path | None:
    """Decoder throughput against max_queue_delay_microseconds, one line per concurrency."""
    variants = (section or {}).get("variants", [])
    if not variants:
        return None
    by_level: dict[int, list[tuple[int, float]]] = {}
    for record in variants:
        delay = record["configs"][contract.DECODER_MODEL]["queue_delay_us"]
        for row in perf_rows(record, DECODER):
            by_level.setdefault(row["concurrency"], []).append((delay, row["throughput"]))
    figure, axis = plt.subplots(figsize=(SIZE[0] / 2, SIZE[1]))
    for level, points in sorted(by_level.items()):
        points.sort()
        axis.plot(
            [p[0] / 1000 for p in points],
            [p[1] for p in points],
            marker="o",
            label=f"concurrency {level}",
        )
    delays = sorted({p[0] for points in by_level.values() for p in points})
    axis.set_xscale("symlog", linthresh=1)
    axis.set_xticks([d / 1000 for d in delays], [f"{d / 1000:g}" for d in delays])
    axis.set_xlabel("max queue delay (ms)", fontsize=8)
    axis.set_ylabel("decoder inferences/s", fontsize=8)
    axis.set_ylim(bottom=0)
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return _save(figure, path)
