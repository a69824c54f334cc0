"""The machine's matmul peak at fp32 and bf16, and the encoder's FLOP count, in the same run.

"The encoder runs at X % of peak" needs a peak measured on the same machine, at the same
precision, with the same thread count, minutes apart: a datasheet number would hide what the
hypervisor and the other tenants leave us. The best of a few trials of a large square matmul
is that peak (noise only ever lowers a trial), and the peak of a precision is the best
library's: OpenVINO (oneDNN, what the served models use), torch (MKL / oneDNN) and numpy (its
bundled OpenBLAS). numpy runs with `OPENBLAS_CORETYPE` removed from its environment (a machine
may pin OpenBLAS to an older core's kernels), and threadpoolctl reports the kernels it chose.
bf16 is measured only where the CPU has bf16 arithmetic (OpenVINO lists `BF16`); elsewhere
OpenVINO's bf16 hint runs fp32, and the figure would be fp32's under another name.

Beside the measurements, the theoretical peak from the CPU itself: cores x FMA units x vector
lanes x 2 FLOP x clock.

Runs as its own process (`python -m benchmarks.peak`): thread counts of BLAS libraries are
fixed at import, and torch stays out of the benchmark driver.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import THREADS

# The published figure; the run counts it again with torch's FLOP counter when it can.
ENCODER_GFLOP_NOMINAL = 77.5
MATMUL_SIDE = 2048
# CPU flags of bf16 arithmetic (AVX512-BF16 dot products, AMX tiles).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
TRIALS = 5
REPEATS = 3


def best_rate(matmul: Callable[[], object], side: int) -> float:
    """GFLOP/s of the best trial (2 n^3 FLOP per product)."""
    matmul()  # warm-up: thread pools, packing buffers
    best = 0.0
    for _ in range(TRIALS):
        started = time.perf_counter()
        for _ in range(REPEATS):
            matmul()
        elapsed = time.perf_counter() - started
        best = max(best, 2 * side**3 * REPEATS / elapsed / 1e9)
    return best


def measure_numpy(threads: int, side: int = MATMUL_SIDE) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((side, side), dtype=np.float32)
    b = rng.standard_normal((side, side), dtype=np.float32)
    return {
        "gflops": {"fp32": {"numpy": round(best_rate(lambda: a @ b, side), 1)}},
        "libraries": {"numpy": _numpy_blas()},
    }


def measure_openvino(threads: int, side: int = MATMUL_SIDE) -> dict[str, Any]:
    """oneDNN's matmul through OpenVINO, the library the served models run on."""
    try:
        import numpy as np
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return {"gflops": {}, "libraries": {"openvino": "not installed"}}
    core = ov.Core()
    capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    a = ops.parameter([side, side], ov.Type.f32)
    b = ops.parameter([side, side], ov.Type.f32)
    model = ov.Model([ops.matmul(a, b, False, False)], [a, b])
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((side, side), dtype=np.float32) for _ in range(2)]
    gflops: dict[str, dict[str, float]] = {}
    hints = {"fp32": "f32", "bf16": "bf16"}
    for precision, hint in hints.items():
        if precision == "bf16" and "BF16" not in capabilities:
            continue  # the hint would silently run fp32
        compiled = core.compile_model(
            model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint}
        )
        request = compiled.create_infer_request()
        rate = best_rate(lambda request=request: request.infer(inputs), side)
        gflops[precision] = {"openvino": round(rate, 1)}
    return {
        "gflops": gflops,
        "libraries": {"openvino": f"openvino {ov.__version__} (oneDNN)"},
        "cpu_capabilities": capabilities,
    }


def measure_torch(threads: int, side: int = MATMUL_SIDE) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"gflops": {}, "libraries": {"torch": "not installed"}}
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(side, side, generator=generator)
    b = torch.randn(side, side, generator=generator)
    gflops = {"fp32": {"torch": round(best_rate(lambda: a @ b, side), 1)}}
    if BF16_FLAGS & _cpu_flags()[0]:  # elsewhere torch emulates bf16: not a peak
        ha, hb = a.bfloat16(), b.bfloat16()
        gflops["bf16"] = {"torch": round(best_rate(lambda: ha @ hb, side), 1)}
    result: dict[str, Any] = {
        "gflops": gflops,
        "libraries": {"torch": f"torch {torch.__version__} (MKL / oneDNN)"},
    }
    counted = encoder_gflop()
    if counted is not None:
        result["encoder_gflop"] = round(counted, 2)
        result["encoder_gflop_source"] = "torch.utils.flop_counter, one 1x3x1024x1024 image"
    return result


MEASURES = {"numpy": measure_numpy, "openvino": measure_openvino, "torch": measure_torch}


def encoder_gflop() -> float | None:
    """FLOPs of one TinyViT encoder pass at 1024x1024 (random weights: FLOPs do not care)."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mobile_sam import sam_model_registry
        encoder = sam_model_registry["vit_t"]().image_encoder.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            encoder(torch.zeros(1, 3, 1024, 1024))
        return counter.get_total_flops() / 1e9
    except Exception:  # the nominal figure stands in; the report says which was used
        return None


def _numpy_blas() -> str:
    """numpy's BLAS and the kernels it runs (threadpoolctl), e.g. `openblas Zen, 2 threads`."""
    import numpy as np

    try:
        from threadpoolctl import threadpool_info

        pools = [
            f"{pool['internal_api']} {pool.get('version')} {pool.get('architecture')} kernels, "
            f"{pool['num_threads']} threads"
            for pool in threadpool_info()
            if pool.get("user_api") == "blas"
        ]
    except ImportError:
        pools = ["threadpoolctl not installed"]
    return f"numpy {np.__version__} ({'; '.join(pools)})"


def _cpu_flags() -> tuple[set[str], float | None]:
    """The CPU's feature flags and its clock in GHz (the highest the kernel reports)."""
    flags: set[str] = set()
    clock = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "cpu MHz":
                clock = max(clock or 0.0, float(value) / 1000)
    except (OSError, ValueError):
        pass
    try:  # cpufreq, where the hypervisor exposes it, knows the boost clock
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        clock = max(clock or 0.0, khz / 1e6)
    except (OSError, ValueError):
        pass
    return flags, clock


def theoretical_peak(cores: int) -> dict[str, Any]:
    """cores x FMA units x fp32 lanes x 2 FLOP x clock, per precision the CPU computes in.

    Two FMA units per core: every x86 server core with AVX2 or AVX-512 of the last decade
    (Zen 2-4, Skylake-SP Gold/Platinum and later) has two FMA pipes. bf16 dot products
    (AVX512-BF16) do two products per fp32 lane; AMX tiles are not modelled.
    """
    flags, clock = _cpu_flags()
    if clock is None or "fma" not in flags:
        return {}
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma_units = 2
    fp32 = cores * fma_units * lanes * 2 * clock
    formula = (
        f"{cores} cores x {fma_units} FMA units x {lanes} fp32 lanes x 2 FLOP x {clock:.2f} GHz"
    )
    result = {"fp32": {"gflops": round(fp32, 1), "formula": formula}}
    if "avx512_bf16" in flags:
        result["bf16"] = {"gflops": round(2 * fp32, 1), "formula": f"{formula} x 2 (bf16 pairs)"}
    return result


def run_in_subprocess(threads: int = THREADS, timeout_s: float = 300) -> dict[str, Any]:
    """Each library in a fresh process whose pools are sized to `threads`.

    One process per library: a BLAS pool that has just finished keeps its threads spinning for
    a while, and on two cores that halves the next library's figure.
    """
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    # OpenBLAS picks the kernels for this CPU unless told otherwise; told otherwise (an older
    # core's kernels), numpy's figure is a configuration's, not the machine's.
    pinned_core = env.pop("OPENBLAS_CORETYPE", None)
    result: dict[str, Any] = {
        "threads": threads,
        "matmul_side": MATMUL_SIDE,
        "gflops": {},
        "libraries": {},
        "encoder_gflop": ENCODER_GFLOP_NOMINAL,
        "encoder_gflop_source": "nominal",
        "openblas_coretype_removed": pinned_core,
        "theoretical": theoretical_peak(threads),
    }
    for library in MEASURES:
        output = subprocess.run(
            [sys.executable, "-m", "benchmarks.peak", "--threads", str(threads), library],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout_s,
        ).stdout
        part = json.loads(output.strip().splitlines()[-1])
        for precision, rates in part.pop("gflops").items():
            result["gflops"].setdefault(precision, {}).update(rates)
        result["libraries"].update(part.pop("libraries"))
        result.update(part)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peak", description=__doc__)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("library", choices=sorted(MEASURES))
    args = parser.parse_args(argv)
    print(json.dumps(MEASURES[args.library](args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
