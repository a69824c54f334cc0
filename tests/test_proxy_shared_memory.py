"""The decoder's answers through shared memory: the slots, and the real Triton writing them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from common import contract
from proxy import shm_slots
from proxy.endpoints import Endpoint
from proxy.shm_slots import SlotPool
from proxy.triton_client import SharedMemory
from testkit.processes import proxy_process

from .conftest import BUILD
from .test_proxy_api import _metric, png_bytes, segment, without_mask_ids

SHARED = 'proxy_decoder_calls_by_transport_total{transport="shared_memory"}'
OVER_HTTP = 'proxy_decoder_calls_by_transport_total{transport="http"}'
# Two point counts, so two decoder calls.
PROMPTS = json.dumps(
    [{"points": [[40, 30]], "labels": [1]}, {"points": [[80, 60], [5, 5]], "labels": [1, 0]}]
)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- the slots ------------------------------------------------------------------------------


def test_a_slot_holds_the_logits_then_the_iou_of_its_prompts(tmp_path: Path) -> None:
    pool = SlotPool(1, prompts=3, directory=tmp_path)
    try:
        slot = pool.acquire(3)
        assert slot is not None
        assert slot.byte_size == 3 * (4 * 256 * 256 * 4 + 4 * 4)
        assert slot.iou_offset == 3 * 4 * 256 * 256 * 4
        logits = np.ndarray((3, 4, 256, 256), np.float32, slot.buffer, slot.logits_offset)
        iou = np.ndarray((3, 4), np.float32, slot.buffer, slot.iou_offset)
        logits[...] = np.arange(logits.size, dtype=np.float32).reshape(logits.shape)
        iou[...] = -1.0
        read = slot.read(slot.logits_offset, (3, 4, 256, 256))
        np.testing.assert_array_equal(read, logits)
        np.testing.assert_array_equal(slot.read(slot.iou_offset, (3, 4)), iou)
        logits[...] = 0
        assert read.any(), "a read is a copy: the slot is reused as soon as it is released"
    finally:
        pool.close()


def test_slots_are_lent_one_call_at_a_time_and_never_too_small(tmp_path: Path) -> None:
    pool = SlotPool(2, prompts=4, directory=tmp_path)
    try:
        assert pool.acquire(5) is None, "a call with more prompts than a slot holds uses HTTP"
        first, second = pool.acquire(4), pool.acquire(1)
        assert first is not None and second is not None and first is not second
        assert pool.acquire(1) is None, "no waiting: with every slot busy, HTTP"
        pool.release(first)
        assert pool.acquire(2) is first
    finally:
        pool.close()


def test_segments_are_sparse_until_allocated_and_removed_on_close(tmp_path: Path) -> None:
    pool = SlotPool(2, prompts=8, directory=tmp_path)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2
    assert all(path.stat().st_blocks == 0 for path in files), "free until Triton is found"
    pool.allocate()
    assert all(path.stat().st_blocks * 512 >= contract.decoder_output_bytes(8) for path in files)
    pool.close()
    assert list(tmp_path.iterdir()) == []


def test_segments_of_dead_proxies_are_removed_at_start(tmp_path: Path) -> None:
    dead = tmp_path / f"{shm_slots.PREFIX}-{_dead_pid()}-abcd-0"
    # A restarted container's proxy often has its predecessor's pid.
    predecessor = tmp_path / f"{shm_slots.PREFIX}-{os.getpid()}-abcd-0"
    alive = tmp_path / f"{shm_slots.PREFIX}-1-abcd-0"  # pid 1 runs
    other = tmp_path / "somebody-elses-segment"
    for path in (dead, predecessor, alive, other):
        path.write_bytes(b"x")
    pool = SlotPool(1, prompts=1, directory=tmp_path)
    try:
        assert not dead.exists() and not predecessor.exists()
        assert alive.exists() and other.exists()
        (own,) = pool.slots
        assert not shm_slots.is_orphan(own.name) and not shm_slots.is_orphan(f"/{own.name}")
        assert shm_slots.is_orphan(f"/{predecessor.name}"), (
            "a Triton registration names it with a /"
        )
        second = SlotPool(1, prompts=1, directory=tmp_path)
        assert (tmp_path / own.name).exists(), "another pool of this process is not an orphan"
        second.close()
    finally:
        pool.close()
    assert shm_slots.is_orphan(own.name), "once closed, it is"


class RefusingTriton:
    """A Triton that cannot open this proxy's segments (another host or container), or is
    too busy to answer."""

    def __init__(self, status: str) -> None:
        self.status = status
        self.attempts = 0

    async def get_system_shared_memory_status(self) -> list:
        return []

    async def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> None:
        self.attempts += 1
        raise InferenceServerException(
            msg=f"Unable to open shared memory region {key}", status=self.status
        )


@pytest.mark.parametrize(("status", "remembered"), [("400", True), ("503", False)])
def test_an_endpoint_that_cannot_map_the_segments_gets_http(
    tmp_path: Path, status: str, remembered: bool
) -> None:
    pool = SlotPool(2, prompts=1, directory=tmp_path)
    shared = SharedMemory(pool)
    triton = RefusingTriton(status)
    endpoint = Endpoint("elsewhere:8000", triton)  # type: ignore[arg-type]

    async def ask_twice() -> list[bool]:
        return [await shared.usable(endpoint), await shared.usable(endpoint)]

    try:
        assert asyncio.run(ask_twice()) == [False, False]
        # A refusal is remembered; a busy Triton is asked again at the next call.
        assert triton.attempts == (1 if remembered else 2)
        assert not pool.allocated, "no memory is reserved for a Triton that cannot use it"
    finally:
        pool.close()


# --- the real Triton ------------------------------------------------------------------------


def test_answers_through_shared_memory_are_those_over_http(http, settings, triton_server) -> None:
    data = png_bytes(seed=41)
    before = _count(http.get("/metrics").text, SHARED)
    shared = segment(http, data, prompts=PROMPTS, multimask_output="true")
    assert shared.status_code == 200, shared.text
    assert _metric(http.get("/metrics").text, SHARED) >= before + 2

    status = httpclient.InferenceServerClient(triton_server.http_url)
    try:
        regions = status.get_system_shared_memory_status()
    finally:
        status.close()
    assert any(region["name"].startswith(shm_slots.PREFIX) for region in regions)

    over_http = proxy_process(
        settings,
        BUILD / "logs" / "proxy-no-shared-memory.log",
        extra_env={"TRITON_SHARED_MEMORY_SLOTS": "0"},
    )
    with over_http, httpx.Client(base_url=over_http.base_url, timeout=120) as client:
        plain = segment(client, data, prompts=PROMPTS, multimask_output="true")
        assert plain.status_code == 200, plain.text
        text = client.get("/metrics").text
        assert _metric(text, OVER_HTTP) == 2 and not _has(client, SHARED)
    assert without_mask_ids(shared.json()["results"]) == without_mask_ids(plain.json()["results"])


def test_a_triton_that_forgot_the_regions_is_answered_over_http_then_again_in_memory(
    http, triton_server
) -> None:
    data = png_bytes(seed=42)
    assert segment(http, data).status_code == 200
    text = http.get("/metrics").text
    shared, plain = _metric(text, SHARED), _count(text, OVER_HTTP)

    client = httpclient.InferenceServerClient(triton_server.http_url)
    try:
        client.unregister_system_shared_memory()  # as after a restart
        first = segment(http, data)
        assert first.status_code == 200, first.text
        text = http.get("/metrics").text
        assert _count(text, OVER_HTTP) == plain + 1 and _metric(text, SHARED) == shared
        second = segment(http, data)
        assert second.status_code == 200, second.text
        assert without_mask_ids(second.json()["results"]) == without_mask_ids(
            first.json()["results"]
        )
        assert _metric(http.get("/metrics").text, SHARED) == shared + 1
        assert client.get_system_shared_memory_status(), "registered again"
    finally:
        client.close()


def _has(client: httpx.Client, name: str) -> bool:
    return any(line.startswith(name + " ") for line in client.get("/metrics").text.splitlines())


def _count(text: str, name: str) -> float:
    try:
        return _metric(text, name)
    except AssertionError:
        return 0.0
