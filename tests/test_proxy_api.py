"""The proxy over real HTTP (uvicorn) in front of the real Triton: contract, errors, cache."""

from __future__ import annotations

import io
import json
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from proxy.encodings import decode_png, decode_polygons, decode_rle
from testkit.photos import photos

POINT = json.dumps([{"points": [[100, 80]], "labels": [1]}])


def png_bytes(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims width x height but whose data is a few bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def segment(http: httpx.Client, data: bytes | None = None, **form) -> httpx.Response:
    files = {"file": ("image", data)} if data is not None else None
    form.setdefault("prompts", POINT)
    return http.post("/segment-image", data=form, files=files)


def assert_problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["code"] == code, body
    assert body["detail"] and body["type"] == f"/problems/{code}"
    return body


def encoder_executions(triton_client, settings) -> int:
    stats = triton_client.get_inference_statistics(settings.encoder_model)["model_stats"][0]
    return int(stats["inference_count"])


# --- the contract ------------------------------------------------------------------------


def test_response_contract(http) -> None:
    response = segment(http, png_bytes(seed=1), multimask_output="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (160, 120)
    assert len(body["image_id"]) == 64
    assert body["cache_hit"] is False
    assert {"decode_image", "preprocess", "encoder", "decoder", "postprocess", "total"} <= set(
        body["timings_ms"]
    )
    (result,) = body["results"]
    masks = result["masks"]
    assert len(masks) == 3
    scores = [mask["predicted_iou"] for mask in masks]
    assert scores == sorted(scores, reverse=True), "ranked by predicted IoU"
    for record in masks:
        assert set(record) == {
            "segmentation",
            "predicted_iou",
            "stability_score",
            "area",
            "bbox",
            "mask_id",
        }
        mask = decode_rle(record["segmentation"])
        assert mask.shape == (120, 160)
        assert record["area"] == int(mask.sum())
        if record["area"]:
            ys, xs = np.nonzero(mask)
            assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert 0.0 <= record["stability_score"] <= 1.0


@pytest.mark.parametrize("output_format", ["rle", "png", "polygon"])
def test_output_formats_describe_the_same_mask(http, output_format) -> None:
    data = png_bytes(seed=2)
    reference = segment(http, data, multimask_output="false").json()["results"][0]["masks"][0]
    expected = decode_rle(reference["segmentation"])
    response = segment(http, data, multimask_output="false", output_format=output_format)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cache_hit"] is True
    segmentation = body["results"][0]["masks"][0]["segmentation"]
    if output_format == "rle":
        mask = decode_rle(segmentation)
    elif output_format == "png":
        mask = decode_png(segmentation)
    else:
        mask = decode_polygons(segmentation, (120, 160))
    if output_format == "polygon":  # polygons are an outline: compare loosely
        union = np.logical_or(mask, expected).sum()
        assert union == 0 or np.logical_and(mask, expected).sum() / union > 0.8
    else:
        np.testing.assert_array_equal(mask, expected)


def test_several_prompts_give_one_result_each_in_order(http) -> None:
    prompts = [
        {"points": [[20, 20]], "labels": [1]},
        {"box": [10, 10, 150, 110]},
        {"points": [[80, 60], [5, 5]], "labels": [1, 0]},
        {"points": [[140, 100]], "labels": [1], "box": [100, 60, 159, 119]},
    ]
    response = segment(
        http, png_bytes(seed=3), prompts=json.dumps(prompts), multimask_output="false"
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [len(result["masks"]) for result in results] == [1, 1, 1, 1]
    # Each result is that prompt's own: asking for the box alone gives the same mask.
    alone = segment(
        http, png_bytes(seed=3), prompts=json.dumps([prompts[1]]), multimask_output="false"
    ).json()["results"][0]
    assert alone["masks"][0]["segmentation"] == results[1]["masks"][0]["segmentation"]


# --- the embedding cache -----------------------------------------------------------------


def without_mask_ids(results: list[dict]) -> list[list[dict]]:
    """The masks without their refinement handles (hashes of the logits, which a re-run may
    change in the last bit)."""
    return [[{**m, "mask_id": None} for m in result["masks"]] for result in results]


def test_cache_hit_skips_the_encoder(http, triton_client, settings) -> None:
    data = png_bytes(seed=4)
    before = encoder_executions(triton_client, settings)
    first = segment(http, data)
    assert first.status_code == 200 and first.json()["cache_hit"] is False
    assert encoder_executions(triton_client, settings) == before + 1

    again = segment(http, data)  # same bytes
    by_id = segment(http, None, image_id=first.json()["image_id"])  # no bytes at all
    for response in (again, by_id):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["cache_hit"] is True and "encoder" not in body["timings_ms"]
        assert without_mask_ids(body["results"]) == without_mask_ids(first.json()["results"])
    assert encoder_executions(triton_client, settings) == before + 1, "encoder ran again"


def test_embed_image_warms_the_cache(http, triton_client, settings) -> None:
    data = jpeg_bytes(seed=5)
    before = encoder_executions(triton_client, settings)
    embedded = http.post("/embed-image", files={"file": ("photo.jpg", data)})
    assert embedded.status_code == 200, embedded.text
    body = embedded.json()
    assert (body["width"], body["height"], body["cache_hit"]) == (320, 240, False)
    response = segment(http, None, image_id=body["image_id"])
    assert response.status_code == 200 and response.json()["cache_hit"] is True
    assert encoder_executions(triton_client, settings) == before + 1


def test_concurrent_requests_for_one_image_share_one_encoder_call(
    proxy, triton_client, settings
) -> None:
    import asyncio

    data = png_bytes(seed=6)
    before = encoder_executions(triton_client, settings)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=proxy.base_url, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/segment-image", data={"prompts": POINT}, files={"file": ("a.png", data)}
                    )
                    for _ in range(4)
                )
            )

    responses = asyncio.run(burst())
    assert all(response.status_code == 200 for response in responses)
    assert encoder_executions(triton_client, settings) == before + 1


def test_cache_metrics_count_hits_and_misses(http) -> None:
    data = png_bytes(seed=7)
    segment(http, data)
    segment(http, data)
    text = http.get("/metrics").text
    hits = _metric(text, 'proxy_embedding_cache_lookups_total{result="hit"}')
    misses = _metric(text, 'proxy_embedding_cache_lookups_total{result="miss"}')
    assert hits >= 1 and misses >= 1
    assert _metric(text, "proxy_embedding_cache_bytes") >= 256 * 64 * 64 * 4


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


# --- bad input: a specific 4xx with a problem body, never a 500 ----------------------------


def test_zero_byte_file(http) -> None:
    assert_problem(segment(http, b""), 422, "empty_file")


def test_truncated_jpeg(http) -> None:
    data = jpeg_bytes(seed=8)
    assert_problem(segment(http, data[: len(data) // 2]), 422, "corrupt_image")


def test_png_header_claiming_60000_by_60000(http) -> None:
    body = assert_problem(segment(http, png_header_claiming(60000, 60000)), 422, "image_too_large")
    assert "3600000000" in body["detail"] and "limit" in body["detail"]


def test_image_too_thin_to_resize(http) -> None:
    # 3000 x 1: the longest side becomes 1024 and the other 0 pixels (upstream fails too).
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 1)).save(buffer, "PNG")
    assert_problem(segment(http, buffer.getvalue()), 422, "degenerate_image")


def test_garbage_bytes(http) -> None:
    assert_problem(
        segment(http, b"this is not an image at all" * 10), 415, "unsupported_media_type"
    )


def test_unsupported_format(http) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, "GIF")
    assert_problem(segment(http, buffer.getvalue()), 415, "unsupported_media_type")


def test_upload_over_the_byte_limit_is_413_while_streaming(proxy, settings) -> None:
    too_big = settings.max_upload_bytes + 2 * 1024 * 1024
    sent = 0

    def body():  # chunked, no Content-Length: the limit must be enforced while reading
        nonlocal sent
        boundary_start = (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        )
        yield boundary_start
        chunk = b"\0" * (1024 * 1024)
        while sent < too_big:
            sent += len(chunk)
            yield chunk
        yield b"\r\n--b--\r\n"

    with httpx.Client(base_url=proxy.base_url, timeout=60) as client:
        response = client.post(
            "/segment-image",
            content=body(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
    assert_problem(response, 413, "payload_too_large")


def test_declared_content_length_over_the_limit_is_413(proxy, settings) -> None:
    data = b"\0" * (settings.max_upload_bytes + 2 * 1024 * 1024)
    with httpx.Client(base_url=proxy.base_url, timeout=60) as client:
        response = client.post(
            "/segment-image", files={"file": ("big.png", data)}, data={"prompts": POINT}
        )
    assert_problem(response, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("prompts", "code"),
    [
        ("{not json", "malformed_json"),
        ('{"points": [[1, 2]]}', "prompts_not_a_list"),
        ("[]", "no_prompts"),
        ('[{"points": [[1, "a"]], "labels": [1]}]', "invalid_number"),
        ('[{"points": [[1, NaN]], "labels": [1]}]', "invalid_number"),
        ('[{"points": [[1, 2], [3, 4]], "labels": [1]}]', "label_count_mismatch"),
        ('[{"points": [[1, 2]], "labels": [2]}]', "invalid_label"),
        ('[{"box": [1, 2, 3]}]', "invalid_box"),
        ('[{"points": [[1e6, 2]], "labels": [1]}]', "coordinate_out_of_range"),
        ('[{"labels": [1]}]', "invalid_labels"),
        ("[{}]", "empty_prompt"),
        ('[{"points": [[1, 2]], "labels": [1], "mask": 1}]', "unknown_field"),
        ("[[1, 2]]", "prompt_not_an_object"),
    ],
)
def test_bad_prompts_are_422(http, prompts: str, code: str) -> None:
    body = assert_problem(segment(http, png_bytes(seed=9), prompts=prompts), 422, code)
    assert "prompts" in body["detail"] or "prompt" in body["detail"]


def test_too_many_points(http, settings) -> None:
    points = [[10, 10]] * (settings.max_points_per_prompt + 1)
    prompts = json.dumps([{"points": points, "labels": [1] * len(points)}])
    assert_problem(segment(http, png_bytes(seed=9), prompts=prompts), 422, "too_many_points")


def test_too_many_prompts(http, settings) -> None:
    prompts = json.dumps([{"points": [[10, 10]], "labels": [1]}] * (settings.max_prompts + 1))
    assert_problem(segment(http, png_bytes(seed=9), prompts=prompts), 422, "too_many_prompts")


def test_bad_prompts_do_not_spend_an_encoder_call(http, triton_client, settings) -> None:
    before = encoder_executions(triton_client, settings)
    segment(http, png_bytes(seed=10), prompts="[{}]")
    assert encoder_executions(triton_client, settings) == before


def test_unknown_image_id_is_404(http) -> None:
    assert_problem(segment(http, None, image_id="0" * 64), 404, "unknown_image_id")


def test_malformed_image_id_is_422(http) -> None:
    body = assert_problem(segment(http, None, image_id="../etc/passwd"), 422, "invalid_request")
    assert "image_id" in body["detail"]


def test_file_or_image_id_is_required(http) -> None:
    assert_problem(segment(http, None), 422, "image_required")
    both = http.post(
        "/segment-image",
        data={"prompts": POINT, "image_id": "0" * 64},
        files={"file": ("a.png", png_bytes())},
    )
    assert_problem(both, 422, "image_required")


def test_bad_form_values_are_422(http) -> None:
    body = assert_problem(segment(http, png_bytes(), output_format="jpeg"), 422, "invalid_request")
    assert "output_format" in body["detail"]
    assert_problem(segment(http, png_bytes(), multimask_output="perhaps"), 422, "invalid_request")


def test_unknown_route_is_a_problem_404(http) -> None:
    assert_problem(http.get("/nope"), 404, "not_found")


def test_bad_inputs_never_crash_the_proxy(http) -> None:
    assert http.get("/healthz").status_code == 200
    text = http.get("/metrics").text
    assert 'status="500"' not in text, "no request may end in a 500"


# --- formats and operations ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP"])
def test_other_formats_are_accepted(http, fmt) -> None:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed=11))).save(buffer, fmt)
    response = segment(http, buffer.getvalue())
    assert response.status_code == 200, response.text


def test_readyz_reports_triton_and_models(http, settings) -> None:
    response = http.get("/readyz")
    assert response.status_code == 200
    assert response.json()["triton"] == {
        "server": True,
        settings.encoder_model: True,
        settings.decoder_model: True,
    }


def test_metrics_count_requests_by_route_and_status(http) -> None:
    segment(http, b"")
    text = http.get("/metrics").text
    assert 'proxy_requests_total{method="POST",route="/segment-image",status="422"}' in text
    assert "proxy_request_duration_seconds_bucket" in text
    assert (
        'proxy_triton_call_duration_seconds_count{model="mobilesam_encoder",outcome="ok"}' in text
    )


def test_openapi_documents_the_api_with_examples(http) -> None:
    spec = http.get("/openapi.json").json()
    operation = spec["paths"]["/segment-image"]["post"]
    for status in ("200", "413", "415", "422", "503", "504"):
        assert status in operation["responses"]
    schema_ref = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = spec["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]["properties"]
    assert {"file", "image_id", "prompts", "multimask_output", "output_format"} <= set(form)
    assert form["prompts"].get("examples")
    assert http.get("/docs").status_code == 200


def test_exif_orientation_is_applied(http) -> None:
    photo = photos()[0]
    image = Image.open(io.BytesIO(photo.data)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    body = segment(http, buffer.getvalue()).json()
    assert (body["width"], body["height"]) == (image.height, image.width)
