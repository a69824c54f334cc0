"""docker-compose.yml run for real: a compose project of its own, driven through scripts/podman.sh.

`make test-containers` builds the images first (tagged `$IMAGE_TAG`); these fixtures
run the compose file with docker-compose against podman's Docker API, exactly as the README
tells a user here, with the tests' seeded random checkpoint in a mounted folder. Ports come from
free_port: Triton's too, so that "nothing answers there from the host" means something. The
project is taken down at the end whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from common.settings import PROJECT_ROOT, Settings
from testkit.ports import free_port

PODMAN_SCRIPT = PROJECT_ROOT / "scripts" / "podman.sh"
IMAGE_TAG = os.environ.get("IMAGE_TAG", "latest")  # compose's default; make passes "test"
CHECKPOINT = "mobilesam.pt"  # the tests' seeded checkpoint, in the mounted folder
UNREADABLE_CHECKPOINT = "unreadable.pt"
# Bounds: the export of a fresh volume takes 1-4 minutes on two busy cores.
UP_TIMEOUT_S = 1200
READY_TIMEOUT_S = 300


@dataclass
class ComposeProject:
    """One compose project of docker-compose.yml, and podman's view of its containers."""

    name: str
    env: dict[str, str]
    log_path: Path
    proxy_port: int
    triton_ports: tuple[int, int, int]

    def run(
        self, *args: str, timeout: float = 120, check: bool = True, **env: str
    ) -> subprocess.CompletedProcess:
        with self.log_path.open("a") as log:
            log.write(f"\n$ scripts/podman.sh {' '.join(args)}\n")
        result = subprocess.run(
            ["bash", str(PODMAN_SCRIPT), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        with self.log_path.open("a") as log:
            log.write(result.stdout[:4000] + result.stderr)
        if check and result.returncode != 0:
            raise AssertionError(
                f"scripts/podman.sh {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    def compose(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run("compose", *args, **kwargs)

    def podman(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run("podman", *args, **kwargs)

    def up(self, **env: str) -> subprocess.CompletedProcess:
        """`up -d` without building (the images are built): waits for the depends_on gates."""
        return self.compose(
            "up", "--detach", "--no-build", timeout=UP_TIMEOUT_S, check=False, **env
        )

    def down(self) -> None:
        self.run("down", timeout=300)

    def label(self, service: str | None = None) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={self.name}"]
        if service is not None:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        return filters

    def container(self, service: str) -> str:
        ids = self.podman("ps", "--all", "--quiet", *self.label(service)).stdout.split()
        assert len(ids) == 1, f"{service}: expected one container, found {ids}"
        return ids[0]

    def exists(self, service: str) -> bool:
        return bool(self.podman("ps", "--all", "--quiet", *self.label(service)).stdout.split())

    def inspect(self, service: str) -> dict:
        (info,) = json.loads(self.podman("inspect", self.container(service)).stdout)
        return info

    def processes(self, service: str) -> list[dict[str, str]]:
        """Every process of a running container: container user, host user, host PID, args."""
        output = self.podman(
            "top", self.container(service), "user", "huser", "hpid", "args"
        ).stdout.splitlines()
        rows = []
        for line in output[1:]:
            user, host_user, host_pid, args = line.split(None, 3)
            rows.append({"user": user, "huser": host_user, "hpid": host_pid, "args": args})
        return rows

    def logs(self, service: str) -> str:
        result = self.podman("logs", self.container(service))
        return result.stdout + result.stderr

    def exec(self, service: str, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.podman("exec", self.container(service), *command, check=check)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until the proxy's /readyz is 200 (Triton and both models ready behind it)."""
        deadline = time.monotonic() + timeout_s
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(self.proxy_url + "/readyz", timeout=5).status_code
                if status == 200:
                    return
            except httpx.HTTPError as exc:
                status = repr(exc)
            time.sleep(1)
        raise AssertionError(f"the proxy was not ready after {timeout_s:.0f} s: {status}")


def compose_environment() -> dict[str, str]:
    """This process's environment without the settings' variables (compose must not pick up
    a value meant for the local stack)."""
    settings = {name.upper() for name in Settings.model_fields}
    return {k: v for k, v in os.environ.items() if k.upper() not in settings}


@pytest.fixture(scope="session")
def checkpoints_dir(tmp_path_factory: pytest.TempPathFactory, checkpoint_path: Path) -> Path:
    """The mounted folder: the tests' checkpoint, and one the containers' user cannot read."""
    folder = tmp_path_factory.mktemp("checkpoints")
    shutil.copy(checkpoint_path, folder / CHECKPOINT)
    (folder / UNREADABLE_CHECKPOINT).write_bytes(b"not readable by uid 10001")
    (folder / UNREADABLE_CHECKPOINT).chmod(0o600)  # owned by root, who runs the tests
    (folder / CHECKPOINT).chmod(0o644)
    folder.chmod(0o755)  # a bind mount: the host's parent folders need not be open
    return folder


PROJECT_PREFIX = "mobilesam-test-"


def abandoned_projects(project: ComposeProject) -> set[str]:
    """Projects of earlier runs whose pytest is gone (killed before its teardown)."""
    listings = [
        ("ps", "--all", "--format", '{{index .Labels "com.docker.compose.project"}}'),
        ("volume", "ls", "--format", "{{.Name}}"),
        ("network", "ls", "--format", "{{.Name}}"),
    ]
    names = set()
    for listing in listings:
        for name in project.podman(*listing).stdout.split():
            match = re.match(rf"({PROJECT_PREFIX}(\d+))(_|$)", name)
            if match and not Path(f"/proc/{match.group(2)}").exists():
                names.add(match.group(1))
    return names


@pytest.fixture(scope="session")
def project(checkpoints_dir: Path) -> Iterator[ComposeProject]:
    log_dir = PROJECT_ROOT / "build" / "tests" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    name = f"{PROJECT_PREFIX}{os.getpid()}"
    proxy_port = free_port()
    triton_ports = (free_port(), free_port(), free_port())
    project = ComposeProject(
        name=name,
        env={
            **compose_environment(),
            "COMPOSE_PROJECT_NAME": name,
            "IMAGE_TAG": IMAGE_TAG,
            "CHECKPOINTS_DIR": str(checkpoints_dir),
            "MOBILESAM_CHECKPOINT": f"/checkpoints/{CHECKPOINT}",
            "PUBLISH_ADDRESS": "127.0.0.1",
            "PROXY_PORT": str(proxy_port),
            "TRITON_HTTP_PORT": str(triton_ports[0]),
            "TRITON_GRPC_PORT": str(triton_ports[1]),
            "TRITON_METRICS_PORT": str(triton_ports[2]),
        },
        log_path=log_dir / "containers.log",
        proxy_port=proxy_port,
        triton_ports=triton_ports,
    )
    for abandoned in abandoned_projects(project):
        project.run("down", timeout=300, COMPOSE_PROJECT_NAME=abandoned)
    for image in ("export", "triton", "proxy"):
        image = f"mobilesam-triton/{image}:{IMAGE_TAG}"
        found = project.podman("image", "exists", image, check=False)
        assert found.returncode == 0, f"no image {image}: `make test-containers` builds them"
    try:
        yield project
    finally:
        project.down()


@pytest.fixture(scope="session")
def stack(project: ComposeProject) -> ComposeProject:
    """The whole stack up, the proxy ready."""
    result = project.up()
    assert result.returncode == 0, f"compose up failed:\n{result.stdout}{result.stderr}"
    project.wait_ready()
    return project
