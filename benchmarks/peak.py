"""The machine's matmul peak at fp32 and bf16, and the encoder's FLOP count, in the same run.

"The encoder runs at X % of peak" needs a peak measured on the same machine, at the same
precision, with the same thread count, minutes apart: a datasheet number would hide what the
hypervisor and the other tenants leave us. The best of a few trials of a large square matmul
is that peak (noise only ever lowers a trial). numpy (its bundled BLAS) and torch (MKL /
oneDNN) both measure fp32; torch alone measures bf16, which numpy has no type for.

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
from typing import Any

from benchmarks.common import THREADS

# The published figure; the run counts it again with torch's FLOP counter when it can.
ENCODER_GFLOP_NOMINAL = 77.5
MATMUL_SIDE = 2048
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


def measure_torch(threads: int, side: int = MATMUL_SIDE) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"gflops": {}, "libraries": {"torch": "not installed"}}
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(side, side, generator=generator)
    b = torch.randn(side, side, generator=generator)
    ha, hb = a.bfloat16(), b.bfloat16()
    result: dict[str, Any] = {
        "gflops": {
            "fp32": {"torch": round(best_rate(lambda: a @ b, side), 1)},
            "bf16": {"torch": round(best_rate(lambda: ha @ hb, side), 1)},
        },
        "libraries": {"torch": f"torch {torch.__version__} (MKL / oneDNN)"},
    }
    counted = encoder_gflop()
    if counted is not None:
        result["encoder_gflop"] = round(counted, 2)
        result["encoder_gflop_source"] = "torch.utils.flop_counter, one 1x3x1024x1024 image"
    return result


MEASURES = {"numpy": measure_numpy, "torch": measure_torch}


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
    import numpy as np

    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"numpy {np.__version__} ({blas.get('name')} {blas.get('version', '')})".strip()
    except Exception:
        return f"numpy {np.__version__}"


def run_in_subprocess(threads: int = THREADS, timeout_s: float = 300) -> dict[str, Any]:
    """Each library in a fresh process whose pools are sized to `threads`.

    One process per library: a BLAS pool that has just finished keeps its threads spinning for
    a while, and on two cores that halves the next library's figure.
    """
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    result: dict[str, Any] = {
        "threads": threads,
        "matmul_side": MATMUL_SIDE,
        "gflops": {},
        "libraries": {},
        "encoder_gflop": ENCODER_GFLOP_NOMINAL,
        "encoder_gflop_source": "nominal",
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
