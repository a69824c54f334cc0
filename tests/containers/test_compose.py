"""docker-compose.yml, built and run: the path a user takes with `docker compose up`.

In order, on one compose project (tests/containers/conftest.py): an unreadable checkpoint stops
start-up at the export with one clear line; then the real start-up (export completes, Triton
becomes healthy, the proxy ready); the proxy answers `POST /segment-image` with the masks the
local path gives for the same checkpoint and photograph, with the decoder's answers written by
Triton into the /dev/shm the two share; Triton's ports answer nowhere outside
the namespace it shares with the proxy; no process of any container runs as root; `kill -9` of
tritonserver is followed by the restart policy and the proxy is ready again, with no shared
memory leaked; `down` leaves no container, volume or network behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import httpx

from common.settings import PROJECT_ROOT
from proxy.encodings import decode_rle
from serving.processes import PYTHON_BACKEND_SHM_PREFIX
from serving.shared_memory import compose_shm_bytes, read_caps
from testkit.masks import mask_iou
from testkit.photos import photos
from tests.containers.conftest import UNREADABLE_CHECKPOINT, ComposeProject

APP_UID = 10001
PROMPTS = [
    {"points": [[200, 150]], "labels": [1]},
    {"box": [60, 40, 320, 260]},
    {"points": [[120, 100], [300, 200]], "labels": [1, 0]},
    {"points": [[220, 160]], "labels": [1], "box": [150, 90, 300, 240]},
]
# Small enough for a shared 2-core machine, and every mask kept (random weights predict low IoUs).
EVERYTHING = {"points_per_side": "8", "pred_iou_thresh": "0", "stability_score_thresh": "0"}


def instances() -> int:
    configs = (PROJECT_ROOT / "model_repository").glob("*/config.pbtxt")
    return sum(read_caps(config)[1] for config in configs)


def health(info: dict) -> str:
    state = info["State"]
    return (state.get("Health") or state.get("Healthcheck") or {}).get("Status", "")


def answers(address: str, port: int) -> bool:
    """Whether anything accepts a TCP connection there."""
    try:
        with socket.create_connection((address, port), timeout=3):
            return True
    except OSError:
        return False


def assert_same_masks(expected: list[dict], actual: list[dict], where: str) -> None:
    assert len(actual) == len(expected), where
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        if got["segmentation"] != want["segmentation"]:
            iou = mask_iou(decode_rle(want["segmentation"]), decode_rle(got["segmentation"]))
            assert iou >= 0.999, f"{where}[{index}]: IoU {iou}"
        for score in ("predicted_iou", "stability_score"):
            assert abs(got[score] - want[score]) <= 1e-5, f"{where}[{index}].{score}"


def segment(base_url: str, data: dict[str, str]) -> dict:
    photo = photos()[0]
    response = httpx.post(
        base_url + "/segment-image",
        files={"file": (f"{photo.name}.png", photo.data)},
        data=data,
        timeout=300,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_unreadable_checkpoint_stops_start_up_with_one_line(project: ComposeProject):
    result = project.up(MOBILESAM_CHECKPOINT=f"/checkpoints/{UNREADABLE_CHECKPOINT}")
    try:
        assert result.returncode != 0, "compose up went on past a failed export"
        assert project.inspect("export")["State"]["ExitCode"] == 1
        lines = [line for line in project.logs("export").splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith("export failed: ") and UNREADABLE_CHECKPOINT in lines[0]
        assert not project.exists("proxy")
        if project.exists("triton"):  # created, perhaps, but never started
            assert project.inspect("triton")["State"]["StartedAt"].startswith("0001-"), "started"
    finally:
        project.down()


def test_export_completes_as_the_containers_user(stack: ComposeProject):
    info = stack.inspect("export")
    assert (info["State"]["Status"], info["State"]["ExitCode"]) == ("exited", 0)
    assert info["Config"]["User"].split(":")[0] == str(APP_UID)
    logs = stack.logs("export")
    for model in ("mobilesam_encoder", "mobilesam_decoder"):
        assert f"{model}/1/model.onnx" in logs, logs[-2000:]
    inspected = stack.podman("volume", "inspect", f"{stack.name}_model-repository").stdout
    (volume,) = json.loads(inspected)
    exported = volume["Mountpoint"] + "/mobilesam_encoder/1/model.onnx"
    assert os.stat(exported).st_uid == APP_UID, "written by the containers' user"


def test_triton_is_healthy_with_the_configured_shared_memory(stack: ComposeProject):
    info = stack.inspect("triton")
    assert health(info) == "healthy", info["State"]
    assert stack.inspect("pod")["HostConfig"]["ShmSize"] == compose_shm_bytes()
    for service in ("triton", "proxy"):  # the pod's one /dev/shm
        free = stack.exec(service, "df", "--block-size=1M", "--output=size", "/dev/shm").stdout
        assert int(free.split()[-1]) == compose_shm_bytes() // 2**20, service


def test_proxy_answers_with_the_masks_of_the_local_path(stack: ComposeProject, proxy):
    prompted = {"prompts": json.dumps(PROMPTS)}
    local, container = segment(proxy.base_url, prompted), segment(stack.proxy_url, prompted)
    assert container["image_id"] == local["image_id"]
    assert len(container["results"]) == len(PROMPTS)
    for index, (want, got) in enumerate(zip(local["results"], container["results"], strict=True)):
        assert_same_masks(want["masks"], got["masks"], f"results[{index}].masks")

    local, container = segment(proxy.base_url, EVERYTHING), segment(stack.proxy_url, EVERYTHING)
    assert container["count"] == local["count"] > 0
    assert_same_masks(local["masks"], container["masks"], "masks")

    # Triton wrote the decoder's answers into the proxy's shared memory, not over HTTP.
    metrics = httpx.get(f"{stack.proxy_url}/metrics", timeout=10).text
    counts = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("proxy_decoder_calls_by_transport_total{")
    }
    assert counts.get("shared_memory", 0) >= 3 and "http" not in counts, counts


def test_triton_answers_nowhere_outside_its_namespace(stack: ComposeProject):
    networks = stack.inspect("pod")["NetworkSettings"]["Networks"]
    addresses = [n["IPAddress"] for n in networks.values() if n.get("IPAddress")]
    assert addresses, networks
    for address in ["127.0.0.1", *addresses]:
        for port in stack.triton_ports:
            assert not answers(address, port), f"Triton answers on {address}:{port}"
    # The check can fail: the namespace's address is reachable from the host (the proxy
    # answers there), and inside the namespace Triton answers on its ports.
    for address in addresses:
        assert httpx.get(f"http://{address}:{stack.proxy_port}/healthz", timeout=5).is_success
    for port in stack.triton_ports[:1]:
        url = f"http://127.0.0.1:{port}/v2/health/ready"
        stack.exec("proxy", "python", "-c", f"import urllib.request as u; u.urlopen({url!r})")
    assert answers("127.0.0.1", stack.proxy_port)


def test_no_process_runs_as_root(stack: ComposeProject):
    for service in ("pod", "triton", "proxy"):
        rows = stack.processes(service)
        assert len(rows) >= 2, f"{service}: the init and its child at least: {rows}"
        for row in rows:
            assert row["user"] != "root" and row["huser"] not in ("0", "root"), (service, row)
            assert row["huser"] == str(APP_UID), (service, row)
    stubs = [r for r in stack.processes("triton") if "triton_python_backend_stub" in r["args"]]
    assert len(stubs) == instances(), "every model instance's stub is among them"


def tritonserver(stack: ComposeProject) -> dict[str, str] | None:
    for row in stack.processes("triton"):
        if row["args"].split()[0].endswith("/tritonserver"):
            return row
    return None


def test_kill_9_of_tritonserver_restarts_it_and_leaks_nothing(stack: ComposeProject):
    before = stack.inspect("triton")
    proxy_restarts = stack.inspect("proxy")["RestartCount"]
    server = tritonserver(stack)
    assert server is not None
    os.kill(int(server["hpid"]), signal.SIGKILL)

    deadline = time.monotonic() + 120
    while True:
        info = stack.inspect("triton")
        if info["RestartCount"] > before["RestartCount"] and info["State"]["Running"]:
            restarted = tritonserver(stack)
            if restarted is not None and restarted["hpid"] != server["hpid"]:
                break
        assert time.monotonic() < deadline, f"Triton was not restarted: {info['State']}"
        time.sleep(0.5)
    stack.wait_ready()
    assert stack.inspect("proxy")["RestartCount"] == proxy_restarts, "the proxy rode it out"
    assert stack.inspect("export")["State"]["ExitCode"] == 0

    # The killed stubs' regions were freed at the restart: only live stubs hold regions.
    listing = stack.exec("triton", "ls", "/dev/shm").stdout.split()
    regions = {name for name in listing if name.startswith(PYTHON_BACKEND_SHM_PREFIX)}
    held = {
        argument
        for row in stack.processes("triton")
        for argument in row["args"].split()
        if argument.startswith(PYTHON_BACKEND_SHM_PREFIX)
    }
    assert regions == held and len(held) == instances(), (regions, held)
    assert "left by a stub of an earlier run" in stack.logs("triton")


def test_down_leaves_nothing_behind(project: ComposeProject):
    project.down()
    label = f"label=com.docker.compose.project={project.name}"
    listings = {
        "container": ("ps", "--all", "--format", "{{.Names}}"),
        "volume": ("volume", "ls", "--format", "{{.Name}}"),
        "network": ("network", "ls", "--format", "{{.Name}}"),
    }
    for kind, listing in listings.items():
        labelled = project.podman(*listing, "--filter", label).stdout.split()
        named = [n for n in project.podman(*listing).stdout.split() if n.startswith(project.name)]
        assert not labelled and not named, f"{kind}s of {project.name} left: {labelled + named}"
