"""`python -m serving` (what `make run` and `make triton` run): export check, ready, clean stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from common.settings import PROJECT_ROOT
from serving.processes import PYTHON_BACKEND_SHM_PREFIX, kill_process_group, proc_stat
from testkit.ports import free_port


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _kill(launcher: subprocess.Popen, triton_http_port: int | str) -> None:
    """After a failure: the launcher, its children (the proxy) and its Triton, which runs in a
    session of its own and is found by its port."""
    if launcher.poll() is not None:
        return
    flag = f"--http-port={triton_http_port}".encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if flag in cmdline.read_bytes().split(b"\0"):
                kill_process_group(int(cmdline.parent.name))
    for entry in Path("/proc").glob("[0-9]*"):
        fields = proc_stat(int(entry.name))
        if fields and int(fields[1]) == launcher.pid:  # a child of the launcher
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
    launcher.kill()
    launcher.wait()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_launcher_serves_and_stops_cleanly(
    model_repository, checkpoint_path, stop_signal, tmp_path
):
    ports = {name: str(free_port()) for name in ("HTTP", "GRPC", "METRICS")}
    env = dict(
        os.environ,
        MODEL_REPOSITORY=str(model_repository),
        MOBILESAM_CHECKPOINT=str(checkpoint_path),
        **{f"TRITON_{name}_PORT": port for name, port in ports.items()},
    )
    log = (tmp_path / "launcher.log").open("w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "serving", "--triton-only"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not _ready(int(ports["HTTP"])):
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()
            assert time.monotonic() < deadline, "launcher never became ready"
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['METRICS']}/metrics") as r:
            assert r.status == 200

        launcher.send_signal(stop_signal)
        assert launcher.wait(timeout=60) == 0
        output = (tmp_path / "launcher.log").read_text()
        assert "are current for checkpoint" in output, "the launcher checks the export first"
        assert not _ready(int(ports["HTTP"])), "tritonserver must be gone after the launcher"
    finally:
        _kill(launcher, ports["HTTP"])


def test_make_run_serves_the_proxy_and_stops_both(model_repository, checkpoint_path, tmp_path):
    """`python -m serving`: Triton, then the proxy; SIGTERM stops both."""
    import httpx

    from .test_proxy_api import POINT, png_bytes

    ports = {name: free_port() for name in ("HTTP", "GRPC", "METRICS", "PROXY")}
    env = dict(
        os.environ,
        MODEL_REPOSITORY=str(model_repository),
        MOBILESAM_CHECKPOINT=str(checkpoint_path),
        PROXY_PORT=str(ports["PROXY"]),
        **{f"TRITON_{name}_PORT": str(ports[name]) for name in ("HTTP", "GRPC", "METRICS")},
    )
    log_path = tmp_path / "run.log"
    runner = subprocess.Popen(
        [sys.executable, "-m", "serving"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{ports['PROXY']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert runner.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "make run never became ready"
            try:
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        response = httpx.post(
            f"{base_url}/segment-image",
            data={"prompts": POINT},
            files={"file": ("a.png", png_bytes(seed=30))},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        page = httpx.get(f"{base_url}/", timeout=10)
        assert page.status_code == 200 and 'src="/static/app.js"' in page.text, "the web page"

        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 0, log_path.read_text()
        assert not _ready(ports["HTTP"]), "Triton must be stopped"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base_url}/healthz", timeout=2)
    finally:
        _kill(runner, ports["HTTP"])


def test_an_orphaned_stub_and_its_shared_memory_are_reaped() -> None:
    """What `TritonServer.stop` does after Triton exits: nothing of its group stays behind."""
    region = f"{PYTHON_BACKEND_SHM_PREFIX}test-{uuid.uuid4()}"
    path = Path("/dev/shm") / region
    path.write_bytes(b"held by the stub")
    # A stand-in for an orphaned stub: its own session, the region named on its command line.
    stub = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", region], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while region.encode() not in Path(f"/proc/{stub.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in never started"
            time.sleep(0.05)

        assert kill_process_group(stub.pid) == [stub.pid]

        assert stub.wait(timeout=10) == -signal.SIGKILL
        assert not path.exists()
    finally:
        stub.kill()
        path.unlink(missing_ok=True)


def test_free_port_never_hands_out_a_port_twice(monkeypatch) -> None:
    """The OS can return a just-closed ephemeral port again; two servers then collide."""
    from testkit import ports

    offered = iter([41001, 41001, 41002])

    class OsSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(ports.socket, "socket", OsSocket)
    monkeypatch.setattr(ports, "_ports_handed_out", set())
    assert [ports.free_port(), ports.free_port()] == [41001, 41002]
