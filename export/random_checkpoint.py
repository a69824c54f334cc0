"""A seeded random-init `vit_t` checkpoint, saved like the official file.

The official weights cannot be downloaded on these machines, so the tests and the benchmarks
put one of these through the same export as real weights.
`python -m export.random_checkpoint PATH SEED` writes one from a separate process.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path


def make_random_checkpoint(path: Path, seed: int) -> Path:
    """Write the checkpoint for `seed` to `path` unless it is already there."""
    if path.is_file():
        return path
    import torch

    with warnings.catch_warnings():  # timm's deprecation notices on mobile_sam's import
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        from mobile_sam import sam_model_registry

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    staging = path.with_suffix(".partial")
    torch.save(sam_model_registry["vit_t"]().state_dict(), staging)
    staging.replace(path)
    return path


if __name__ == "__main__":
    make_random_checkpoint(Path(sys.argv[1]), int(sys.argv[2]))
