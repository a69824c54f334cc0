"""The export: checkpoint handling, idempotency, graph contracts and its own verification."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

from common.settings import PROJECT_ROOT, Settings
from export.checkpoint import resolve_checkpoint
from export.errors import CheckpointError, VerificationError
from export.manifest import EXPORT_FORMAT_VERSION, ExportTarget, is_up_to_date
from export.verify import ABSOLUTE_TOLERANCE, RELATIVE_TOLERANCE, compare_outputs
from testkit.ports import free_port


def run_export_cli(
    *args: str, env: dict | None = None, prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "export", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server over tmp_path, standing in for the checkpoint's download host."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


# --- checkpoint errors are one clear line, never a traceback ------------------------------


def test_missing_checkpoint_gives_clear_error(tmp_path: Path) -> None:
    result = run_export_cli(
        "--checkpoint", str(tmp_path / "nope.pt"), "--model-repository", str(tmp_path / "repo")
    )
    assert result.returncode == 1
    assert "checkpoint file not found" in result.stderr
    assert "MOBILESAM_CHECKPOINT" in result.stderr
    assert "Traceback" not in result.stderr


def assert_one_clear_line(result: subprocess.CompletedProcess, words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("export failed: "), result.stderr
    assert words in lines[0]


def test_a_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    result = run_export_cli("--checkpoint", str(tmp_path / "weights"))
    assert_one_clear_line(result, "is a directory")


def test_a_dangling_symlink_is_named_as_such(tmp_path: Path) -> None:
    link = tmp_path / "mobile_sam.pt"
    link.symlink_to(tmp_path / "moved-away.pt")
    result = run_export_cli("--checkpoint", str(link))
    assert_one_clear_line(result, "broken symbolic link")
    assert "moved-away.pt" in result.stderr


def test_an_unreadable_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    """Permissions: root reads everything, so the export runs without the capabilities that
    let it (`setpriv`, util-linux)."""
    unreadable = tmp_path / "mobile_sam.pt"
    unreadable.write_bytes(b"weights")
    unreadable.chmod(0)
    result = run_export_cli(
        "--checkpoint",
        str(unreadable),
        prefix=["setpriv", "--bounding-set=-dac_override,-dac_read_search"],
    )
    assert_one_clear_line(result, "cannot read checkpoint")
    assert "Permission denied" in result.stderr


def export_in_process(capsys, *args: str) -> tuple[int, str]:
    """`python -m export` as `main` runs it, in this process (torch is already imported
    here, which a new process would spend seconds on)."""
    from export.__main__ import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_corrupt_checkpoint_gives_clear_error(tmp_path: Path, capsys) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    code, stderr = export_in_process(
        capsys, "--checkpoint", str(corrupt), "--model-repository", str(tmp_path / "repo")
    )
    assert code == 1
    assert stderr.startswith("export failed: ") and "is not a readable PyTorch checkpoint" in stderr


def test_wrong_architecture_checkpoint_gives_clear_error(tmp_path: Path, capsys) -> None:
    import torch

    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    code, stderr = export_in_process(
        capsys, "--checkpoint", str(other), "--model-repository", str(tmp_path)
    )
    assert code == 1
    assert stderr.startswith("export failed: ") and "is not a MobileSAM vit_t checkpoint" in stderr


def test_checkpoint_from_environment_variable(tmp_path: Path) -> None:
    import os

    env = dict(os.environ, MOBILESAM_CHECKPOINT=str(tmp_path / "from-env.pt"))
    result = run_export_cli("--model-repository", str(tmp_path / "repo"), env=env)
    assert result.returncode == 1
    assert "from-env.pt" in result.stderr


def test_download_is_verified_and_cached(file_server, tmp_path: Path) -> None:
    base_url, served = file_server
    payload = b"checkpoint bytes"
    (served / "weights.pt").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"

    path = resolve_checkpoint(f"{base_url}/weights.pt", cache, digest)
    assert path.read_bytes() == payload and path.parent == cache

    (served / "weights.pt").unlink()  # a second resolve must not need the network
    assert resolve_checkpoint(f"{base_url}/weights.pt", cache, digest) == path


def test_download_with_wrong_hash_is_rejected(file_server, tmp_path: Path) -> None:
    base_url, served = file_server
    (served / "weights.pt").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match=r"has SHA-256 .* expected 0{64}"):
        resolve_checkpoint(f"{base_url}/weights.pt", tmp_path / "cache", "0" * 64)
    assert not list((tmp_path / "cache").iterdir()), "a rejected download must not be cached"


def test_offline_download_says_how_to_use_a_local_file(tmp_path: Path) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/mobile_sam.pt"
    with pytest.raises(CheckpointError, match=r"could not download .*MOBILESAM_CHECKPOINT"):
        resolve_checkpoint(unreachable, tmp_path / "cache")


def test_official_url_is_checked_against_the_official_hash(tmp_path: Path) -> None:
    settings = Settings()
    assert settings.mobilesam_checkpoint.endswith("/weights/mobile_sam.pt")
    # Offline here: the error must come from the download, and say what to do.
    with pytest.raises(CheckpointError, match="MOBILESAM_CHECKPOINT"):
        resolve_checkpoint(settings.mobilesam_checkpoint, tmp_path / "cache")


# --- idempotency and recorded metadata ------------------------------------------------------


def test_rerun_with_same_checkpoint_does_nothing(model_repository: Path, checkpoint_path) -> None:
    from export.__main__ import run_export

    before = {p: p.stat().st_mtime_ns for p in model_repository.rglob("model.onnx")}
    assert len(before) == 2
    assert run_export(str(checkpoint_path), model_repository) is False
    assert {p: p.stat().st_mtime_ns for p in model_repository.rglob("model.onnx")} == before


def test_manifest_records_checkpoint_and_versions(
    model_repository: Path, checkpoint_path, settings: Settings
) -> None:
    digest = hashlib.sha256(checkpoint_path.read_bytes()).hexdigest()
    for name in (settings.encoder_model, settings.decoder_model):
        manifest = ExportTarget(model_repository, name).read_manifest()
        assert manifest["checkpoint_sha256"] == digest
        assert manifest["export_format_version"] == EXPORT_FORMAT_VERSION
        assert manifest["opset"] >= 17
        assert {"torch", "onnx", "onnxruntime", "mobilesam-mirror"} <= set(manifest["libraries"])
        assert manifest["verification"], "verification figures are recorded"


def test_other_checkpoint_is_not_up_to_date(model_repository: Path, settings: Settings) -> None:
    targets = [
        ExportTarget(model_repository, settings.encoder_model),
        ExportTarget(model_repository, settings.decoder_model),
    ]
    current = targets[0].read_manifest()["checkpoint_sha256"]
    assert is_up_to_date(targets, current)
    assert not is_up_to_date(targets, "f" * 64)


# --- graph contracts ---------------------------------------------------------------------


def _input_dims(path: Path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        tensor.name: [d.dim_param or d.dim_value for d in tensor.type.tensor_type.shape.dim]
        for tensor in model.graph.input
    }


def test_encoder_graph_takes_uint8_at_any_batch(model_repository: Path, settings) -> None:
    path = ExportTarget(model_repository, settings.encoder_model).onnx_path
    model = onnx.load(str(path), load_external_data=False)
    images = next(t for t in model.graph.input if t.name == "images")
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = _input_dims(path)
    assert dims["images"] == ["batch", 1024, 1024, 3]
    assert dims["input_size"] == ["batch", 2]


def test_decoder_graph_has_named_dynamic_axes(model_repository: Path, settings) -> None:
    dims = _input_dims(ExportTarget(model_repository, settings.decoder_model).onnx_path)
    assert dims["image_embeddings"] == ["batch", 256, 64, 64]
    assert dims["point_coords"] == ["batch", "prompts", "points", 2]
    assert dims["point_labels"] == ["batch", "prompts", "points"]
    assert dims["mask_input"] == ["batch", "masks", 1, 256, 256]
    assert dims["has_mask_input"] == ["batch", "masks"]


def _decode(session, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray):
    """Run the decoder on [P, N, 2] coords and [P, N] labels of one image without mask input."""
    return session.run(
        None,
        {
            "image_embeddings": embedding,
            "point_coords": coords[None],
            "point_labels": labels[None],
            "mask_input": np.zeros((1, 1, 1, 256, 256), dtype=np.float32),
            "has_mask_input": np.zeros((1, 1), dtype=np.float32),
        },
    )


def test_decoder_answers_alike_whichever_first_layer_runs(model_repository: Path, settings) -> None:
    """One prompt runs the first layer folded, several share it (`export.branching`); a
    prompt's masks and scores must not depend on which. The export's own verification
    holds both branches to upstream (one-prompt cases and a three-prompt batch)."""
    import onnxruntime as ort

    from export.branching import FOLD_FIRST_LAYER_UP_TO_PROMPTS

    path = ExportTarget(model_repository, settings.decoder_model).onnx_path
    model = onnx.load(str(path), load_external_data=False)
    assert [node.op_type for node in model.graph.node][-1] == "If"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    embedding = rng.normal(size=(1, 256, 64, 64)).astype(np.float32)
    coords = np.array([[[400.0, 300.0], [0.0, 0.0]]], dtype=np.float32)
    labels = np.array([[1.0, -1.0]], dtype=np.float32)
    alone = _decode(session, embedding, coords, labels)
    together = _decode(
        session,
        embedding,
        np.repeat(coords, FOLD_FIRST_LAYER_UP_TO_PROMPTS + 1, axis=0),
        np.repeat(labels, FOLD_FIRST_LAYER_UP_TO_PROMPTS + 1, axis=0),
    )
    for one, many in zip(alone, together, strict=True):
        np.testing.assert_allclose(one[0, 0], many[0, -1], rtol=1e-4, atol=1e-4)


def test_branches_are_chosen_by_prompt_count_and_share_weights() -> None:
    """`select_by_prompts` on two tiny graphs: y = x * w + 1 (few) and y = x * w + 2 (many)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.branching import select_by_prompts

    def tiny(offset: float) -> onnx.ModelProto:
        weight = numpy_helper.from_array(np.full(3, 2.0, dtype=np.float32), f"w{offset}")
        bias = numpy_helper.from_array(np.array(offset, dtype=np.float32), "bias")
        graph = helper.make_graph(
            [
                helper.make_node("Mul", ["x", weight.name], ["scaled"]),
                helper.make_node("Add", ["scaled", "bias"], ["y"]),
            ],
            "tiny",
            [helper.make_tensor_value_info("point_labels", TensorProto.FLOAT, ["b", "p", 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "p", 3])],
            [weight, bias],
        )
        graph.node[0].input[0] = "point_labels"
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    model = select_by_prompts(few=tiny(1.0), many=tiny(2.0), up_to_prompts=1)
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert sum(array.shape == (3,) for array in stored.values()) == 1, "equal weights once"
    assert sum(array.shape == () for array in stored.values()) == 2, "different ones twice"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for prompts, offset in ((1, 1.0), (2, 2.0), (5, 2.0)):
        x = np.ones((1, prompts, 3), dtype=np.float32)
        (y,) = session.run(None, {"point_labels": x})
        np.testing.assert_array_equal(y, 2.0 + offset)


def test_verification_fails_loudly_past_tolerance() -> None:
    expected = np.linspace(-2, 2, 100, dtype=np.float32)
    bound = ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * 2
    assert compare_outputs("ok", expected + bound / 2, expected) <= bound
    with pytest.raises(VerificationError, match="exceeds tolerance"):
        compare_outputs("bad", expected + bound * 2, expected)
    with pytest.raises(VerificationError, match="shape"):
        compare_outputs("bad shape", expected[:50], expected)
    with pytest.raises(VerificationError):
        compare_outputs("nan", np.full_like(expected, np.nan), expected)
