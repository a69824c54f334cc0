"""The shared embedding cache with a real `redis-server`: exact entries, deadlines, degradation,
and two real proxy processes in front of one Triton sharing their images and masks through it.

The tier on its own (no Triton): an entry comes back bit for bit; an unreachable or silent
Redis is a miss counted in `proxy_shared_cache_errors_total`, never an exception; concurrent
misses still share one computation. End to end: an upload to one proxy and a re-prompt by
`image_id` on the other succeed without an encoder call (Triton's inference count does not
move) and give the same masks; stopping Redis mid-test degrades to each proxy's local cache
without a single 5xx, and the proxies share again once Redis is back. A mask answered by one
proxy refines its object on the other exactly as on the first; a stored mask must hash to its
`mask_id`, so a damaged or swapped entry is a miss, never another image's logits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import redis

from common.settings import Settings
from proxy.cache import CachedImage, EmbeddingCache
from proxy.mask_store import MaskStore, StoredMask
from proxy.metrics import ProxyMetrics
from proxy.shared_cache import (
    BACKOFF_S,
    MAGIC,
    MASK_MAGIC,
    RedisTier,
    UnreadableEntry,
    deserialize,
    deserialize_mask,
    mask_key,
    redis_key,
    serialize,
    serialize_mask,
)
from testkit.ports import free_port
from testkit.processes import ServerProcess, proxy_process
from testkit.redis_server import RedisServer

from .conftest import BUILD
from .test_proxy_api import assert_problem, encoder_executions, png_bytes, segment

KEY = ("mobilesam_encoder@test", "ab" * 32)
TTL_S = 600
MASK_BYTES = 256 * 256 * 4


def entry(seed: int = 0, source: bytes = b"\x89PNG...") -> CachedImage:
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((256, 64, 64), dtype=np.float32)
    embedding[0, 0, :3] = [np.nan, np.inf, -0.0]  # every bit pattern survives
    return CachedImage(embedding, (480, 640), (768, 1024), source=source)


def assert_same_entry(got: CachedImage, expected: CachedImage) -> None:
    assert got.embedding.dtype == np.float32 and got.embedding.shape == (256, 64, 64)
    assert got.embedding.tobytes() == expected.embedding.tobytes()
    assert (got.original_size, got.input_size) == (expected.original_size, expected.input_size)
    assert got.source == expected.source


def metric(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(BUILD / "logs" / "redis.log") as server:
        yield server


def tier(url: str, metrics: ProxyMetrics, **overrides) -> RedisTier:
    options = {"ttl_s": TTL_S, "timeout_s": 0.5, "max_entry_bytes": 16 * 1024 * 1024}
    options.update(overrides)
    return RedisTier(url, metrics=metrics, **options)


# --- the stored format ----------------------------------------------------------------------


def test_an_entry_is_stored_exactly() -> None:
    original = entry(source=bytes(range(256)) * 10)
    assert_same_entry(deserialize(serialize(original)), original)
    big_endian = CachedImage(original.embedding.astype(">f4"), (1, 2), (3, 4))
    read_back = deserialize(serialize(big_endian)).embedding
    np.testing.assert_array_equal(read_back, big_endian.embedding)


@pytest.mark.parametrize(
    "damage",
    [
        lambda value: b"not an entry",
        lambda value: b"OTHERFMT" + value[len(MAGIC) :],
        lambda value: value[:-1],  # truncated
        lambda value: value + b"x",  # trailing bytes
        lambda value: value[: len(MAGIC) + 4] + b"}" + value[len(MAGIC) + 5 :],  # bad header
    ],
)
def test_anything_else_is_unreadable(damage) -> None:
    with pytest.raises(UnreadableEntry):
        deserialize(damage(serialize(entry())))


def stored_mask(seed: int, image_id: str = "ab" * 32) -> StoredMask:
    logits = np.random.default_rng(seed).standard_normal((256, 256), dtype=np.float32)
    return StoredMask.of((KEY[0], image_id), logits)


def test_a_mask_is_stored_exactly_under_its_id() -> None:
    original = stored_mask(seed=5)
    read_back = deserialize_mask(original.mask_id, serialize_mask(original))
    assert (read_back.mask_id, read_back.image_key) == (original.mask_id, original.image_key)
    assert read_back.logits.dtype == np.float32 and read_back.logits.shape == (256, 256)
    assert read_back.logits.tobytes() == original.logits.tobytes()


def _flip_last_byte(value: bytes) -> bytes:
    return value[:-1] + bytes([value[-1] ^ 1])


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda value: _flip_last_byte(value), id="logits changed"),
        pytest.param(
            lambda value: value.replace(b'"image_id": "abab', b'"image_id": "cdab'),
            id="another image's key",
        ),
        pytest.param(lambda value: serialize_mask(stored_mask(seed=6)), id="another mask"),
        pytest.param(lambda value: value[:-4], id="truncated"),
        pytest.param(lambda value: MAGIC + value[len(MASK_MAGIC) :], id="an embedding's magic"),
        pytest.param(lambda value: serialize(entry()), id="an embedding"),
    ],
)
def test_a_mask_entry_is_unreadable_unless_it_hashes_to_its_id(damage) -> None:
    original = stored_mask(seed=5)
    damaged = damage(serialize_mask(original))
    assert damaged != serialize_mask(original)
    with pytest.raises(UnreadableEntry):
        deserialize_mask(original.mask_id, damaged)


# --- the tier against a real redis-server ----------------------------------------------------


def test_store_then_load_with_a_ttl_renewed_by_reads(redis_server) -> None:
    metrics = ProxyMetrics()
    original = entry(seed=1)
    direct = redis.Redis.from_url(redis_server.url)

    async def scenario() -> CachedImage | None:
        shared = tier(redis_server.url, metrics)
        try:
            assert await shared.load(KEY) is None
            await shared.store(KEY, original)
            direct.expire(redis_key(KEY), 5)  # as if it had been stored long ago
            return await shared.load(KEY)
        finally:
            await shared.close()

    try:
        loaded = asyncio.run(scenario())
        assert loaded is not None
        assert_same_entry(loaded, original)
        assert 5 < direct.ttl(redis_key(KEY)) <= TTL_S, "a read renews the entry's lifetime"
    finally:
        direct.delete(redis_key(KEY))
        direct.close()
    assert metric(metrics, "proxy_shared_cache_lookups_total", result="miss") == 1
    assert metric(metrics, "proxy_shared_cache_lookups_total", result="hit") == 1
    assert metric(metrics, "proxy_shared_cache_errors_total", operation="load") == 0


def test_entries_over_the_size_bound_stay_local(redis_server) -> None:
    metrics = ProxyMetrics()
    large = entry(seed=2, source=b"x" * 2048)

    async def scenario() -> CachedImage | None:
        shared = tier(redis_server.url, metrics, max_entry_bytes=large.nbytes - 1)
        try:
            await shared.store(KEY, large)
            return await shared.load(KEY)
        finally:
            await shared.close()

    assert asyncio.run(scenario()) is None
    assert metric(metrics, "proxy_shared_cache_skips_total", reason="too_large") == 1


def test_an_unreadable_value_is_a_counted_miss(redis_server) -> None:
    metrics = ProxyMetrics()
    direct = redis.Redis.from_url(redis_server.url)
    direct.set(redis_key(KEY), b"MSAMEMB1 but cut short", ex=60)

    async def scenario() -> CachedImage | None:
        shared = tier(redis_server.url, metrics)
        try:
            return await shared.load(KEY)
        finally:
            await shared.close()

    try:
        assert asyncio.run(scenario()) is None
    finally:
        direct.delete(redis_key(KEY))
        direct.close()
    assert metric(metrics, "proxy_shared_cache_errors_total", operation="load") == 1


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung Redis)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("where", ["nothing listening", "never answers"])
def test_an_unavailable_redis_is_a_miss_then_left_alone(where, silent_server, caplog) -> None:
    port = free_port() if where == "nothing listening" else silent_server
    metrics = ProxyMetrics()

    async def scenario() -> list[CachedImage | None]:
        shared = tier(f"redis://127.0.0.1:{port}/0", metrics, timeout_s=0.2)
        try:
            # A hang would fail here rather than block the suite: each call has its deadline.
            first = await asyncio.wait_for(shared.load(KEY), 10)
            await asyncio.wait_for(shared.store(KEY, entry()), 10)
            second = await asyncio.wait_for(shared.load(KEY), 10)
            return [first, second]
        finally:
            await shared.close()

    with caplog.at_level(logging.WARNING, logger="proxy.shared_cache"):
        assert asyncio.run(scenario()) == [None, None]
    assert metric(metrics, "proxy_shared_cache_errors_total", operation="load") == 1
    # Backed off after the first failure: the next calls do not wait on Redis again.
    assert metric(metrics, "proxy_shared_cache_skips_total", reason="backoff") == 2
    assert [r.message for r in caplog.records if "unavailable" in r.message], caplog.text


def test_two_caches_share_entries_and_concurrent_misses_compute_once(redis_server) -> None:
    """Two proxy replicas' caches over one Redis: the first computes once for four concurrent
    misses and shares the result; the second finds it without computing."""
    metrics = ProxyMetrics()
    key = ("mobilesam_encoder@test", "cd" * 32)
    computed: list[int] = []

    async def compute() -> CachedImage:
        computed.append(1)
        await asyncio.sleep(0.05)
        return entry(seed=3)

    async def scenario() -> tuple[list[tuple[CachedImage, bool]], tuple[CachedImage, bool]]:
        first = EmbeddingCache(64 * 1024 * 1024, tier(redis_server.url, metrics))
        second = EmbeddingCache(64 * 1024 * 1024, tier(redis_server.url, metrics))
        try:
            concurrent = await asyncio.gather(
                *(first.get_or_compute(key, compute) for _ in range(4))
            )
            elsewhere = await second.get_or_compute(key, compute)
            assert await second.lookup(key) is not None  # now in its local LRU too
            return concurrent, elsewhere
        finally:
            await first.close()
            await second.close()

    try:
        concurrent, (found, hit) = asyncio.run(scenario())
    finally:
        redis.Redis.from_url(redis_server.url).delete(redis_key(key))
    assert len(computed) == 1
    assert sorted(hit for _, hit in concurrent) == [False, True, True, True]
    assert hit is True
    assert_same_entry(found, entry(seed=3))


def test_two_mask_stores_share_masks_through_redis(redis_server) -> None:
    """One replica keeps a prompt's masks; another, which never saw them, finds each by id,
    then keeps it locally (no second Redis lookup)."""
    metrics = ProxyMetrics()
    masks = [stored_mask(seed) for seed in (7, 8, 9)]
    direct = redis.Redis.from_url(redis_server.url)

    async def scenario() -> list[StoredMask | None]:
        shared_first, shared_second = (
            tier(redis_server.url, metrics),
            tier(redis_server.url, metrics),
        )
        first = MaskStore(64 * MASK_BYTES, shared_first)
        second = MaskStore(64 * MASK_BYTES, shared_second)
        try:
            ids = await first.keep(masks)
            assert ids == [mask.mask_id for mask in masks]
            found = [await second.lookup(mask_id) for mask_id in ids]
            found.append(await second.lookup(ids[0]))  # local now
            found.append(await second.lookup("0" * 32))  # never kept anywhere
            return found
        finally:
            await shared_first.close()
            await shared_second.close()

    try:
        *found, again, unknown = asyncio.run(scenario())
        ttls = [direct.ttl(mask_key(mask.mask_id)) for mask in masks]
    finally:
        direct.delete(*(mask_key(mask.mask_id) for mask in masks))
        direct.close()
    for got, mask in zip(found, masks, strict=True):
        assert got is not None and got.mask_id == mask.mask_id
        assert got.image_key == mask.image_key
        assert got.logits.tobytes() == mask.logits.tobytes()
    assert again is found[0] and unknown is None
    assert all(0 < ttl <= TTL_S for ttl in ttls), ttls
    assert metric(metrics, "proxy_shared_mask_lookups_total", result="hit") == 3
    assert metric(metrics, "proxy_shared_mask_lookups_total", result="miss") == 1
    assert metric(metrics, "proxy_shared_cache_errors_total", operation="store_masks") == 0


def test_a_swapped_mask_entry_is_a_counted_miss(redis_server) -> None:
    """Whoever can write to Redis still cannot make a mask_id name another image's logits."""
    metrics = ProxyMetrics()
    wanted, other = stored_mask(seed=10), stored_mask(seed=11, image_id="cd" * 32)
    direct = redis.Redis.from_url(redis_server.url)
    direct.set(mask_key(wanted.mask_id), serialize_mask(other), ex=60)

    async def scenario() -> StoredMask | None:
        shared = tier(redis_server.url, metrics)
        try:
            return await MaskStore(64 * MASK_BYTES, shared).lookup(wanted.mask_id)
        finally:
            await shared.close()

    try:
        assert asyncio.run(scenario()) is None
    finally:
        direct.delete(mask_key(wanted.mask_id))
        direct.close()
    assert metric(metrics, "proxy_shared_cache_errors_total", operation="load_mask") == 1


def test_masks_without_redis_stay_local(silent_server) -> None:
    """A hung Redis costs the first call its deadline; the masks are still kept locally."""
    metrics = ProxyMetrics()
    masks = [stored_mask(seed=12)]

    async def scenario() -> tuple[StoredMask | None, StoredMask | None]:
        shared = tier(f"redis://127.0.0.1:{silent_server}/0", metrics, timeout_s=0.2)
        store = MaskStore(64 * MASK_BYTES, shared)
        try:
            await asyncio.wait_for(store.keep(masks), 10)
            here = await asyncio.wait_for(store.lookup(masks[0].mask_id), 10)
            elsewhere = await asyncio.wait_for(shared.load_mask(stored_mask(13).mask_id), 10)
            return here, elsewhere
        finally:
            await shared.close()

    here, elsewhere = asyncio.run(scenario())
    assert here is masks[0] and elsewhere is None
    assert metric(metrics, "proxy_shared_cache_errors_total", operation="store_masks") == 1
    assert metric(metrics, "proxy_shared_cache_skips_total", reason="backoff") == 1


# --- two proxies, one Triton, one Redis -------------------------------------------------------


@pytest.fixture(scope="module")
def two_proxies(
    settings: Settings, triton_server, redis_server
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    env = {"REDIS_URL": redis_server.url}
    first = proxy_process(settings, BUILD / "logs" / "proxy-shared-a.log", env, "/readyz")
    second = proxy_process(settings, BUILD / "logs" / "proxy-shared-b.log", env, "/readyz")
    with first, second:
        yield first, second


@pytest.fixture
def clients(two_proxies) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    first, second = two_proxies
    with (
        httpx.Client(base_url=first.base_url, timeout=120) as a,
        httpx.Client(base_url=second.base_url, timeout=120) as b,
    ):
        yield a, b


def proxy_metric(client: httpx.Client, sample: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_image_uploaded_to_one_proxy_is_reprompted_on_the_other(
    clients, triton_client, settings
) -> None:
    a, b = clients
    before = encoder_executions(triton_client, settings)
    uploaded = segment(a, png_bytes(seed=40))
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["cache_hit"] is False
    assert encoder_executions(triton_client, settings) == before + 1

    elsewhere = segment(b, None, image_id=uploaded.json()["image_id"])
    assert elsewhere.status_code == 200, elsewhere.text
    body = elsewhere.json()
    assert body["cache_hit"] is True and "encoder" not in body["timings_ms"]
    # The embedding read back from Redis gives exactly the masks of the fresh one.
    assert body["results"] == uploaded.json()["results"]
    assert (body["width"], body["height"]) == (160, 120)
    assert encoder_executions(triton_client, settings) == before + 1, "the encoder ran again"
    assert proxy_metric(b, 'proxy_shared_cache_lookups_total{result="hit"}') >= 1


def test_segment_everything_by_image_id_on_the_other_proxy(
    clients, triton_client, settings
) -> None:
    """Segment-everything by image_id needs the uploaded pixels too (here, for the overlay):
    they travel with the embedding."""
    a, b = clients
    embedded = b.post("/embed-image", files={"file": ("photo.png", png_bytes(seed=41))})
    assert embedded.status_code == 200, embedded.text
    image_id = embedded.json()["image_id"]
    before = encoder_executions(triton_client, settings)
    form = {
        "image_id": image_id,
        "points_per_side": "4",
        "pred_iou_thresh": "0",
        "stability_score_thresh": "0",
        "return_overlay": "true",
    }
    here, there = (client.post("/segment-image", data=form) for client in (b, a))
    for response in (here, there):
        assert response.status_code == 200, response.text
    assert there.json()["cache_hit"] is True and there.json()["count"] > 0
    for field in ("count", "masks", "overlay_png"):
        assert there.json()[field] == here.json()[field], field
    assert encoder_executions(triton_client, settings) == before


def test_a_mask_from_one_proxy_refines_its_object_on_the_other(clients) -> None:
    """The page's refinement, with a load balancer between its clicks: the second click's
    `mask_id` names a mask the other proxy answered, and the answer is the one the first
    proxy itself gives."""
    a, b = clients
    first = segment(a, png_bytes(seed=45), prompts=json.dumps([{"points": [[40, 30]]}]))
    assert first.status_code == 200, first.text
    image_id = first.json()["image_id"]
    chosen = first.json()["results"][0]["masks"][0]["mask_id"]
    refine = json.dumps([{"points": [[40, 30], [90, 70]], "labels": [1, 0], "mask_id": chosen}])
    hits_before = proxy_metric(b, 'proxy_shared_mask_lookups_total{result="hit"}')

    there = segment(b, None, image_id=image_id, prompts=refine, multimask_output="false")
    here = segment(a, None, image_id=image_id, prompts=refine, multimask_output="false")
    for response in (there, here):
        assert response.status_code == 200, response.text
    assert there.json()["results"] == here.json()["results"]
    assert proxy_metric(b, 'proxy_shared_mask_lookups_total{result="hit"}') == hits_before + 1

    # Found through Redis, the mask still belongs to its own image only.
    other = segment(b, png_bytes(seed=46), prompts=refine)
    assert_problem(other, 422, "mask_image_mismatch")


def test_stopping_redis_degrades_to_local_caches(
    clients, two_proxies, redis_server, triton_client, settings
) -> None:
    a, b = clients
    statuses: list[int] = []

    def record(response: httpx.Response) -> httpx.Response:
        statuses.append(response.status_code)
        return response

    shared_id = record(segment(a, png_bytes(seed=42))).json()["image_id"]
    assert record(segment(b, None, image_id=shared_id)).status_code == 200  # through Redis
    redis_server.stop()
    try:
        assert a.get("/readyz").status_code == 200, "readiness does not depend on Redis"
        # Shared before the outage and now in B's local cache: still served there.
        assert record(segment(b, None, image_id=shared_id)).status_code == 200
        # A mask answered now is not shared either: refining it on the other proxy is the
        # page's 404 (it then prompts again without the mask), and works where it was answered.
        click = segment(a, None, image_id=shared_id, prompts=json.dumps([{"points": [[20, 20]]}]))
        mask_id = record(click).json()["results"][0]["masks"][0]["mask_id"]
        refine = json.dumps([{"points": [[20, 20]], "mask_id": mask_id}])
        elsewhere = record(segment(b, None, image_id=shared_id, prompts=refine))
        assert_problem(elsewhere, 404, "unknown_mask_id")
        assert record(segment(a, None, image_id=shared_id, prompts=refine)).status_code == 200

        during = png_bytes(seed=43)
        first = record(segment(a, during))
        assert first.status_code == 200 and first.json()["cache_hit"] is False
        by_id = record(segment(a, None, image_id=first.json()["image_id"]))
        assert by_id.status_code == 200 and by_id.json()["cache_hit"] is True  # A's local LRU
        # Not shared while Redis is down: the other proxy does not know it (a 404, not a 500),
        # and the file itself is served there as usual.
        assert_problem(
            record(segment(b, None, image_id=first.json()["image_id"])), 404, "unknown_image_id"
        )
        assert record(segment(b, during)).status_code == 200

        # Each proxy's first call to Redis in the outage, storing its answer's masks, failed.
        for proxy in (a, b):
            assert proxy_metric(proxy, 'proxy_shared_cache_errors_total{operation="store_masks"}')
        logged = two_proxies[0].log_path.read_text(errors="replace")
        assert "shared cache unavailable" in logged
    finally:
        redis_server.start()

    time.sleep(BACKOFF_S + 0.5)  # each proxy leaves Redis alone this long after a failure
    before = encoder_executions(triton_client, settings)
    after = record(segment(a, png_bytes(seed=44)))
    again = record(segment(b, None, image_id=after.json()["image_id"]))
    assert again.status_code == 200 and again.json()["cache_hit"] is True
    assert encoder_executions(triton_client, settings) == before + 1
    assert all(status < 500 for status in statuses), statuses
    assert json.loads(a.get("/readyz").text)["status"] == "ready"
