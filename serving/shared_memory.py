"""Triton's Python backend moves every tensor through /dev/shm: how much it can need with the
configured caps, and the regions that stubs killed with their server leave behind.

Each model instance (one stub) has one region, `shm-default-byte-size` at first. An allocation
that does not fit grows it by whole `shm-growth-byte-size` steps, at least one step more than
it asks (python_backend's `SharedMemoryManager::GrowIfNeeded`), and a region never shrinks. An
instance executes one batch at a time and holds all of that batch's inputs and outputs at
once, so the most one instance can need is its first size, plus one full batch of its largest
requests rounded up to whole steps, plus one step. The sum over all instances is the size
/dev/shm must have: docker-compose.yml's `shm_size` is that figure, and a test checks that the
two agree.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable
from pathlib import Path

from common import contract
from common.settings import PROJECT_ROOT, Settings
from serving.processes import PYTHON_BACKEND_SHM_PREFIX
from serving.triton import PYTHON_BACKEND_SHM_BYTES

MIB = 1024 * 1024
FLOAT32 = 4
INT32 = 4


def encoder_request_bytes() -> int:
    """One image in and its embedding out."""
    side = contract.DEFAULT_IMAGE_SIDE
    embedding = math.prod(contract.EMBEDDING_SHAPE) * FLOAT32
    return side * side * 3 + 2 * INT32 + embedding


def decoder_request_bytes(prompts: int, points: int, mask_inputs: int) -> int:
    """One image's embedding, `prompts` prompts of `points` points and `mask_inputs` mask
    inputs in; four mask logits and four scores per prompt out."""
    low_res = contract.LOW_RES_SIDE * contract.LOW_RES_SIDE * FLOAT32
    inputs = (
        math.prod(contract.EMBEDDING_SHAPE) * FLOAT32
        + prompts * points * 3 * FLOAT32  # coordinates (x, y) and a label per point
        + mask_inputs * (low_res + FLOAT32)  # mask_input and has_mask_input
    )
    return inputs + contract.decoder_output_bytes(prompts)


def largest_decoder_request_bytes(settings: Settings) -> int:
    """The larger of the two kinds of decoder request the proxy sends.

    Segment-everything: up to `MAX_PROMPTS_PER_DECODER_CALL` grid points, each with upstream's
    padding point, and one shared (unused) mask input. Prompted: every prompt with the most
    points plus a box (two corner points) and a mask input of its own.
    """
    everything = decoder_request_bytes(contract.MAX_PROMPTS_PER_DECODER_CALL, 2, 1)
    prompts = settings.max_prompts
    prompted = decoder_request_bytes(prompts, settings.max_points_per_prompt + 2, prompts)
    return max(everything, prompted)


def read_caps(config: Path) -> tuple[int, int]:
    """(max_batch_size, instances) of one model's config.pbtxt."""
    text = config.read_text()
    batch = re.search(r"^\s*max_batch_size:\s*(\d+)", text, re.MULTILINE)
    groups = re.search(r"instance_group\s*\[(.*?)\]", text, re.DOTALL)
    if batch is None or groups is None:
        raise ValueError(f"{config} has no max_batch_size or instance_group")
    counts = [int(count) for count in re.findall(r"count:\s*(\d+)", groups.group(1))]
    return int(batch.group(1)), sum(counts) or 1


def region_bytes(batch_bytes: int) -> int:
    """The most one instance's region grows to for batches of at most `batch_bytes`."""
    step = PYTHON_BACKEND_SHM_BYTES  # shm-default-byte-size and shm-growth-byte-size
    return step + math.ceil(batch_bytes / step) * step + step


def python_backend_shm_bytes(
    repository: Path = PROJECT_ROOT / "model_repository", settings: Settings | None = None
) -> int:
    """The /dev/shm the configured caps can need at worst, in whole MiB."""
    settings = settings or Settings()
    request_bytes = {
        contract.ENCODER_MODEL: encoder_request_bytes(),
        contract.DECODER_MODEL: largest_decoder_request_bytes(settings),
    }
    total = 0
    for model, largest_request in request_bytes.items():
        max_batch_size, instances = read_caps(repository / model / "config.pbtxt")
        total += instances * region_bytes(max_batch_size * largest_request)
    return math.ceil(total / MIB) * MIB


def proxy_slots_bytes(settings: Settings | None = None) -> int:
    """The proxy's shared-memory slots (proxy/shm_slots.py), where they share Triton's /dev/shm."""
    settings = settings or Settings()
    slots = settings.triton_shared_memory_slots
    return slots * contract.decoder_output_bytes(settings.triton_shared_memory_prompts)


def compose_shm_bytes(settings: Settings | None = None) -> int:
    """docker-compose.yml's one /dev/shm: Triton's Python backend and the proxy's slots."""
    return (
        math.ceil((python_backend_shm_bytes(settings=settings) + proxy_slots_bytes(settings)) / MIB)
        * MIB
    )


def regions_in_use(proc: Path = Path("/proc")) -> set[str]:
    """Regions named on a live process's command line: a stub gets its region's name there."""
    names: set[str] = set()
    for cmdline in proc.glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            arguments = cmdline.read_bytes().decode(errors="replace").split("\0")
            names |= {a for a in arguments if a.startswith(PYTHON_BACKEND_SHM_PREFIX)}
    return names


def free_stale_regions(
    shm: Path = Path("/dev/shm"), in_use: Iterable[str] | None = None
) -> list[str]:
    """Unlink the regions no live stub holds; returns their names.

    Only for a /dev/shm that no other server shares (a container's own): a server that is
    starting has created its region a moment before its stub names it.
    """
    keep = set(regions_in_use() if in_use is None else in_use)
    stale = sorted(p for p in shm.glob(PYTHON_BACKEND_SHM_PREFIX + "*") if p.name not in keep)
    for region in stale:
        region.unlink(missing_ok=True)
    return [region.name for region in stale]
