"""perf_analyzer (from the tritonclient wheel) runs for real against the test Triton.

Short runs: one fixed batch of requests at concurrency 1 per model, so the test proves that
the binary, its libraries, the `--input-data` files and the CSV parsing all work, not how fast
the models are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import perf_analyzer as perf
from common.settings import Settings
from serving.triton import TritonServer

# Fixed request counts: no stability windows, so the run time is bounded (~2 encoder calls).
SHORT_RUN = perf.PerfOptions(request_count=2, timeout_s=300)


@pytest.fixture(scope="module")
def perf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("perf")


@pytest.fixture(scope="module")
def encoder_specs(triton_server: TritonServer, settings: Settings) -> dict[str, perf.TensorSpec]:
    return perf.fetch_input_specs(triton_server.http_url, settings.encoder_model)


@pytest.fixture(scope="module")
def decoder_specs(triton_server: TritonServer, settings: Settings) -> dict[str, perf.TensorSpec]:
    return perf.fetch_input_specs(triton_server.http_url, settings.decoder_model)


def test_perf_analyzer_runs() -> None:
    assert "2.51.0" in perf.check_perf_analyzer()  # the version matching the server
    env = perf.perf_analyzer_environment({})
    lib_dir = Path(env["LD_LIBRARY_PATH"].split(":")[0])
    assert (lib_dir / "libcudart.so.12").is_file()


def test_encoder_input_data_is_valid(
    encoder_specs: dict[str, perf.TensorSpec], perf_dir: Path
) -> None:
    request = perf.encoder_request(encoder_specs, 1024, 768)
    path = perf.write_input_data(perf_dir / "encoder.json", [request], encoder_specs)

    (decoded,) = perf.read_input_data(path, encoder_specs)
    images, input_size = decoded["images"], decoded["input_size"]
    assert images.dtype == np.uint8 and images.shape == encoder_specs["images"].dims
    assert input_size.dtype == np.int32 and input_size.tolist() == [1024, 768]
    assert images[:, 768:].max() == 0  # zero padding right of the image
    assert images[:, :768].std() > 0
    np.testing.assert_array_equal(images, request["images"])


@pytest.mark.parametrize(("prompts", "points"), [(1, 2), (64, 2)])
def test_decoder_input_data_is_valid(
    decoder_specs: dict[str, perf.TensorSpec], perf_dir: Path, prompts: int, points: int
) -> None:
    path = perf.write_input_data(
        perf_dir / f"decoder_{prompts}.json",
        [perf.decoder_request(decoder_specs, prompts, points, seed=s) for s in range(2)],
        decoder_specs,
    )

    requests = perf.read_input_data(path, decoder_specs)
    assert len(requests) == 2
    for request in requests:
        assert {a.dtype for a in request.values()} == {np.dtype(np.float32)}
        assert request["image_embeddings"].shape == (256, 64, 64)
        assert request["point_coords"].shape == (prompts, points, 2)
        assert request["point_labels"].shape == (prompts, points)
        assert request["mask_input"].shape == (1, 1, 256, 256)
        assert request["has_mask_input"].shape == (1,)
        coords, labels = request["point_coords"], request["point_labels"]
        assert coords.min() >= 0 and coords.max() <= 1024
        assert (labels[:, :-1] == 1).all() and (labels[:, -1] == -1).all()
        assert (coords[:, -1] == 0).all()  # the padding point
        assert not request["mask_input"].any() and not request["has_mask_input"].any()


def test_input_data_rejects_wrong_shapes(
    decoder_specs: dict[str, perf.TensorSpec], perf_dir: Path
) -> None:
    request = perf.decoder_request(decoder_specs)
    request["point_coords"] = request["point_coords"][..., :1]
    with pytest.raises(perf.PerfError, match="point_coords"):
        perf.write_input_data(perf_dir / "bad.json", [request], decoder_specs)


CSV_BY_THROUGHPUT = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,\
Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,\
p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
1,1.33,3000,9000,2100,300,703300,1100,9000,723300,740000,745800,763300,725000,1,2
2,1.25,3000,9000,358300,400,1139100,6000,9000,1426100,2100000,2132900,2147800,1500000,1,2
"""

OUTPUT_EXCERPT = """\
Request concurrency: 1
  Server:
    Inference count: 12
    Execution count: 12
Request concurrency: 2
  Server:
    Inference count: 15
    Execution count: 9
"""


def test_parse_perf_output(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    path.write_text(CSV_BY_THROUGHPUT)

    results = perf.parse_perf_csv(path, "m", "run", perf.parse_batch_sizes(OUTPUT_EXCERPT))

    assert [r.concurrency for r in results] == [1, 2]  # by concurrency, not throughput
    first, second = results
    assert first.throughput == 1.33 and first.latency_p50_ms == pytest.approx(723.3)
    assert first.latency_avg_ms == pytest.approx(725.0)
    assert second.server_queue_ms == pytest.approx(358.3)
    assert second.server_compute_infer_ms == pytest.approx(1139.1)
    assert (first.avg_batch, second.avg_batch) == (1.0, pytest.approx(15 / 9))


def test_perf_analyzer_measures_both_models(
    triton_server: TritonServer,
    settings: Settings,
    encoder_specs: dict[str, perf.TensorSpec],
    decoder_specs: dict[str, perf.TensorSpec],
    perf_dir: Path,
) -> None:
    encoder_data = perf.write_input_data(
        perf_dir / "encoder.json",
        [perf.encoder_request(encoder_specs, 1024, 768)],
        encoder_specs,
    )
    decoder_data = perf.write_input_data(
        perf_dir / "decoder.json", [perf.decoder_request(decoder_specs)], decoder_specs
    )

    results = []
    for model, data in (
        (settings.encoder_model, encoder_data),
        (settings.decoder_model, decoder_data),
    ):
        results += perf.run_perf_analyzer(
            model, triton_server.http_url, data, [1], perf_dir, options=SHORT_RUN, stream=None
        )

    assert [(r.model, r.concurrency) for r in results] == [
        (settings.encoder_model, 1),
        (settings.decoder_model, 1),
    ]
    for result in results:
        assert result.throughput > 0
        assert result.latency_p50_ms > 0 and result.latency_p99_ms >= result.latency_p50_ms
        assert result.server_compute_infer_ms > 0
        assert result.avg_batch == pytest.approx(1.0)  # concurrency 1: nothing to batch
    summary = perf.format_summary(results)
    assert settings.encoder_model in summary and settings.decoder_model in summary


def test_unstable_level_falls_back_to_a_fixed_count(
    triton_server: TritonServer,
    settings: Settings,
    decoder_specs: dict[str, perf.TensorSpec],
    perf_dir: Path,
) -> None:
    data = perf.write_input_data(
        perf_dir / "decoder.json", [perf.decoder_request(decoder_specs)], decoder_specs
    )
    # Windows that never agree within 0.01 %: perf_analyzer gives up after 3 of them.
    never_stable = perf.PerfOptions(
        window_requests=2, stability_percentage=0.01, max_trials=3, timeout_s=300
    )

    (result,) = perf.run_perf_analyzer(
        settings.decoder_model,
        triton_server.http_url,
        data,
        [1],
        perf_dir,
        options=never_stable,
        stream=None,
    )

    assert not result.stable and result.throughput > 0
    assert "no" in perf.format_summary([result]).splitlines()[-1]
