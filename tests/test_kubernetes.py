"""The Kubernetes manifests (deploy/kubernetes), checked offline: no cluster here.

- `kubectl kustomize` renders every overlay; `kubernetes-validate` (schemas bundled in the
  pinned wheel, strict: unknown fields fail) validates every rendered object of a kind
  Kubernetes itself defines, for the oldest Kubernetes the manifests support and the newest
  the wheel knows. KEDA's ScaledObject and prometheus-operator's PodMonitor are custom
  resources whose schemas it does not bundle: they are checked field by field here.
- Every container has requests and limits and runs as non-root; every long-running one has
  readiness and liveness probes.
- One source of truth: the manifests' variable names are the settings' (common/settings.py),
  their values, images and commands are docker-compose.yml's, ports agree everywhere, the
  Triton pod matches the model repository (cores = instances x threads) and the launcher
  (drain time), and the dashboard and the autoscaler query metrics that the proxy and Triton
  really export (Triton's scraped from the session's real Triton).
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from prometheus_client import Counter, Gauge, Histogram

from common.settings import PROJECT_ROOT, Settings
from proxy.metrics import ProxyMetrics
from serving.shared_memory import python_backend_shm_bytes
from serving.triton import EXIT_TIMEOUT_S, TritonServer
from testkit.redis_server import RedisServer

from .test_docker_files import compose_config, environment, seconds

KUBERNETES = PROJECT_ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUBERNETES / "overlays").iterdir() if path.is_dir())
# The oldest Kubernetes these manifests are written for, and the newest the pinned
# kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.28", latest_version())
# Kinds defined by add-ons: kubernetes-validate has no schema for them.
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "PodMonitor")}
WORKLOADS = {"Deployment", "Job"}
# compose service -> the workload that runs the same image in Kubernetes
COMPOSE_WORKLOADS = {
    "export": "Job/export",
    "triton": "Deployment/triton",
    "proxy": "Deployment/proxy",
}
INSTALL_KUBECTL = (
    "kubectl (with kustomize) is missing: this machine image ships it, Debian 12 has no "
    "package of it; install it from the Kubernetes project's packages (scripts/setup.sh)"
)


# --- rendering --------------------------------------------------------------------------------


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(INSTALL_KUBECTL)
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(objects, kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def of_kind(objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    return next(c for c in containers if c["name"] == (name or workload["metadata"]["name"]))


def config_maps(objects) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: o.get("data", {}) for o in of_kind(objects, "ConfigMap")}


def container_env(objects, workload: dict[str, Any], spec: dict[str, Any]) -> dict[str, str]:
    """What the container's process sees of its spec: envFrom ConfigMaps, then env."""
    maps = config_maps(objects)
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for item in spec.get("env", []):
        env[item["name"]] = item["value"]
    return env


def settings_variables() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (500m, 2, 1Gi, 512Mi) as a number (cores or bytes)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in {"", *units}, f"unreadable quantity {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config()


# --- renders and validates --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_the_whole_service(overlay: str) -> None:
    objects = render(overlay)
    for kind, name in [
        ("Job", "export"),
        ("Deployment", "triton"),
        ("Deployment", "proxy"),
        ("Service", "triton"),
        ("Service", "triton-pods"),
        ("Service", "proxy"),
        ("NetworkPolicy", "triton"),
        ("PodDisruptionBudget", "triton"),
        ("PodDisruptionBudget", "proxy"),
        ("PersistentVolumeClaim", "model-repository"),
    ]:
        find(objects, kind, name)
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    (namespace,) = of_kind(objects, "Namespace")
    assert namespaces == {namespace["metadata"]["name"]}, "everything in the overlay's namespace"


def test_the_overlays_are_a_small_and_a_production_one() -> None:
    assert {"small", "production"} <= set(OVERLAYS)
    small, production = render("small"), render("production")
    assert find(small, "Deployment", "triton")["spec"]["replicas"] == 1
    assert not of_kind(small, "HorizontalPodAutoscaler") and not of_kind(small, "ScaledObject")
    assert find(production, "Deployment", "triton")["spec"]["replicas"] >= 2
    assert find(production, "Deployment", "proxy")["spec"]["replicas"] >= 2
    assert of_kind(production, "ScaledObject") and of_kind(production, "PodMonitor")
    claim = find(production, "PersistentVolumeClaim", "model-repository")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes mount it"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_pass_the_kubernetes_schemas(overlay: str, version: str) -> None:
    checked = 0
    for obj in render(overlay):
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue  # test_custom_resources_are_well_formed
        problem = None
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problem = error.message
        assert problem is None, f"{obj['kind']}/{obj['metadata']['name']} ({version}): {problem}"
        checked += 1
    assert checked >= 10


# --- every container --------------------------------------------------------------------------


def every_container(objects):
    for workload in objects:
        if workload["kind"] not in WORKLOADS:
            continue
        spec = pod_spec(workload)
        for kind in ("initContainers", "containers"):
            for spec_container in spec.get(kind, []):
                yield workload, kind, spec_container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_bounded_probed_and_not_root(overlay: str) -> None:
    seen = 0
    for workload, kind, spec in every_container(render(overlay)):
        where = f"{workload['kind']}/{workload['metadata']['name']} {spec['name']}"
        resources = spec.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            assert request and limit, f"{where}: {resource} request and limit"
            assert quantity(request) <= quantity(limit), f"{where}: {resource} request > limit"
        # Long-running containers are probed; a Job's container runs to completion, and init
        # containers may not have readiness or liveness probes at all.
        if workload["kind"] == "Deployment" and kind == "containers":
            assert "readinessProbe" in spec and "livenessProbe" in spec, f"{where}: probes"
        pod_security = pod_spec(workload).get("securityContext", {})
        security = {**pod_security, **spec.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert security.get("runAsUser", 1) != 0, f"{where}: runs as root"
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        seen += 1
    assert seen >= 4


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_docker_link_variables(overlay: str) -> None:
    """Kubernetes would give every pod PROXY_PORT=tcp://<ip>:8080 for the `proxy` Service
    (and TRITON_PORT=...), names that collide with the settings'."""
    for workload in render(overlay):
        if workload["kind"] in WORKLOADS:
            assert pod_spec(workload).get("enableServiceLinks") is False, workload["metadata"]


# --- one source of truth ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_variables_are_the_settings_and_composes(overlay: str, compose) -> None:
    objects = render(overlay)
    for data in config_maps(objects).values():
        if "dashboard.json" in data:
            continue
        unknown = set(data) - settings_variables()
        assert not unknown, f"not settings of common/settings.py: {unknown}"
    for service_name, workload_ref in COMPOSE_WORKLOADS.items():
        kind, name = workload_ref.split("/")
        workload = find(objects, kind, name)
        env = container_env(objects, workload, container(workload))
        for variable, value in environment(compose["services"][service_name]).items():
            if value is None:  # passed through only when set
                continue
            assert env.get(variable) == str(value), (
                f"{workload_ref}: {variable}={env.get(variable)!r}, compose says {value!r}"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_proxies_do_not_offer_shared_memory_to_tritons_in_other_pods(overlay: str) -> None:
    objects = render(overlay)
    proxy, triton = find(objects, "Deployment", "proxy"), find(objects, "Deployment", "triton")
    triton_image = container(triton)["image"]
    images = [spec["image"] for spec in pod_spec(proxy)["containers"]]
    assert triton_image not in images, "with Triton in the proxy's pod, shared memory would pay"
    assert container_env(objects, proxy, container(proxy))["TRITON_SHARED_MEMORY_SLOTS"] == "0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_and_commands_are_composes(overlay: str, compose) -> None:
    """Same images (retagged only through kustomize `images:`) and no command of their own:
    the images' CMD runs, which tests/test_docker_files.py checks against the launcher."""
    objects = render(overlay)
    for service_name, workload_ref in COMPOSE_WORKLOADS.items():
        kind, name = workload_ref.split("/")
        spec = container(find(objects, kind, name))
        assert spec["image"] == compose["services"][service_name]["image"], workload_ref
        assert "command" not in spec and "args" not in spec, f"{workload_ref} overrides the CMD"
        assert "command" not in compose["services"][service_name]


def named_ports(spec: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in spec.get("ports", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_agree_with_the_settings(overlay: str) -> None:
    objects = render(overlay)
    triton = find(objects, "Deployment", "triton")
    proxy = find(objects, "Deployment", "proxy")
    triton_env = container_env(objects, triton, container(triton))
    proxy_env = container_env(objects, proxy, container(proxy))
    defaults = Settings.model_fields
    expected_triton = {
        "http": triton_env["TRITON_HTTP_PORT"],
        "grpc": triton_env["TRITON_GRPC_PORT"],
        "metrics": triton_env["TRITON_METRICS_PORT"],
    }
    assert expected_triton == {
        "http": str(defaults["triton_http_port"].default),
        "grpc": str(defaults["triton_grpc_port"].default),
        "metrics": str(defaults["triton_metrics_port"].default),
    }
    assert {k: str(v) for k, v in named_ports(container(triton)).items()} == expected_triton
    assert named_ports(container(proxy)) == {"http": int(proxy_env["PROXY_PORT"])}
    assert proxy_env["PROXY_PORT"] == str(defaults["proxy_port"].default)
    assert proxy_env["PROXY_HOST"] == "0.0.0.0"

    # Services expose the containers' ports under the same names and numbers.
    for service in of_kind(objects, "Service"):
        selector = service["spec"]["selector"]["app.kubernetes.io/name"]
        workload = find(objects, "Deployment", selector)
        ports = named_ports(container(workload))
        for port in service["spec"]["ports"]:
            assert port["targetPort"] == port["name"] and port["port"] == ports[port["name"]]
    # Scrape annotations name the metrics ports.
    assert (
        triton["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
        == (triton_env["TRITON_METRICS_PORT"])
    )
    assert (
        proxy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
        == (proxy_env["PROXY_PORT"])
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_proxy_reaches_triton_and_redis_through_their_services(overlay: str) -> None:
    objects = render(overlay)
    proxy = find(objects, "Deployment", "proxy")
    env = container_env(objects, proxy, container(proxy))
    settings = Settings(**{k.lower(): v for k, v in env.items()})
    for endpoint in settings.triton_http_endpoints:
        host, port = endpoint.rsplit(":", 1)
        service = find(objects, "Service", host)
        assert service["spec"].get("clusterIP") == "None", "headless: one address per pod"
        assert [p["port"] for p in service["spec"]["ports"]] == [int(env["TRITON_HTTP_PORT"])]
        assert int(port) == int(env["TRITON_HTTP_PORT"])
    assert find(objects, "Service", settings.triton_host)["spec"].get("clusterIP") != "None"
    if settings.redis_url:
        match = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", settings.redis_url)
        assert match, settings.redis_url
        redis = find(objects, "Service", match.group(1))
        assert [p["port"] for p in redis["spec"]["ports"]] == [int(match.group(2))]


def model_cores() -> int:
    """Cores one Triton needs: the largest instances x intra_op_threads of any model (the
    models share the cores, as on the benchmark machine; README, "Triton")."""
    largest = 0
    for config in (PROJECT_ROOT / "model_repository").glob("*/config.pbtxt"):
        text = config.read_text()
        instances = sum(int(n) for n in re.findall(r"count:\s*(\d+)", text))
        threads = re.search(
            r'key:\s*"intra_op_threads",\s*value:\s*\{\s*string_value:\s*"(\d+)"', text
        )
        largest = max(largest, instances * int(threads.group(1)))
    return largest


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_pod_matches_the_model_repository_and_compose(overlay: str, compose) -> None:
    triton = find(render(overlay), "Deployment", "triton")
    spec = container(triton)
    resources = spec["resources"]
    cores = model_cores()
    assert cores >= 1
    assert quantity(resources["requests"]["cpu"]) == quantity(resources["limits"]["cpu"]) == cores

    shm = next(v for v in pod_spec(triton)["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    # Triton's Python backend alone: the proxies run in pods of their own.
    assert quantity(shm["emptyDir"]["sizeLimit"]) == python_backend_shm_bytes()
    assert {m["mountPath"]: m["name"] for m in spec["volumeMounts"]}["/dev/shm"] == "dshm"
    assert quantity(resources["limits"]["memory"]) > quantity(shm["emptyDir"]["sizeLimit"])

    grace = pod_spec(triton)["terminationGracePeriodSeconds"]
    assert grace > EXIT_TIMEOUT_S, "Kubernetes would kill Triton before it drains"
    assert grace == seconds(compose["services"]["triton"]["stop_grace_period"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_what_compose_asks(overlay: str, compose) -> None:
    objects = render(overlay)
    triton = container(find(objects, "Deployment", "triton"))
    ready = "/v2/health/ready"
    # Compose's check is the image's HEALTHCHECK: serving.container --check, TritonServer.is_ready.
    healthcheck = re.search(
        r"^HEALTHCHECK .*\n.*$", (PROJECT_ROOT / "Dockerfile.triton").read_text(), re.M
    )
    assert healthcheck and "serving.container" in healthcheck[0] and "--check" in healthcheck[0]
    assert ready in inspect.getsource(TritonServer.is_ready)
    for probe, path in [
        ("startupProbe", ready),
        ("readinessProbe", ready),
        ("livenessProbe", "/v2/health/live"),
    ]:
        assert triton[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    proxy = container(find(objects, "Deployment", "proxy"))
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def dockerfile_user(name: str) -> tuple[int, int]:
    users = re.findall(r"^USER\s+(\S+)", (PROJECT_ROOT / name).read_text(), re.M)
    assert users, f"{name} has no USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and group.isdigit(), f"{name}: USER must be numeric uid:gid"
    return int(user), int(group)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_export_job_can_write_a_fresh_volume(overlay: str) -> None:
    job = find(render(overlay), "Job", "export")
    assert pod_spec(job)["securityContext"]["fsGroup"] == dockerfile_user("Dockerfile.export")[1]
    mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
    env = container_env(render(overlay), job, container(job))
    assert not mounts[env["MODEL_REPOSITORY"]].get("readOnly")
    assert env["CHECKPOINT_CACHE_DIR"] in mounts


def wait_for_models_script(overlay: str) -> str:
    triton = find(render(overlay), "Deployment", "triton")
    (init,) = pod_spec(triton)["initContainers"]
    assert init["command"][:2] == ["/bin/sh", "-c"]
    return init["command"][2]


def test_triton_waits_until_every_model_is_exported(tmp_path: Path) -> None:
    script = wait_for_models_script("small")

    def finishes(repository: Path) -> bool:
        try:
            subprocess.run(
                ["/bin/sh", "-c", script],
                env={"MODEL_REPOSITORY": str(repository), "PATH": "/usr/bin:/bin"},
                capture_output=True,
                timeout=1,
                check=True,
            )
        except subprocess.TimeoutExpired:
            return False
        return True

    assert not finishes(tmp_path), "an empty volume is not ready"
    for model in ("mobilesam_encoder", "mobilesam_decoder"):
        (tmp_path / model / "1").mkdir(parents=True)
        (tmp_path / model / "config.pbtxt").touch()
    (tmp_path / "mobilesam_encoder" / "1" / "export.json").touch()
    assert not finishes(tmp_path), "one model is not exported yet"
    (tmp_path / "mobilesam_decoder" / "1" / "export.json").touch()
    assert finishes(tmp_path)


def test_only_the_proxy_reaches_triton_and_redis() -> None:
    objects = render("production")
    policy = find(objects, "NetworkPolicy", "triton")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "triton"}
    sources = {
        tuple(sorted(port["port"] for port in rule["ports"])): rule["from"]
        for rule in policy["ingress"]
    }
    assert sources == {
        ("grpc", "http"): [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "proxy"}}}],
        ("metrics",): [
            {"namespaceSelector": {"matchLabels": {"mobilesam-triton/metrics-scraper": "true"}}}
        ],
    }
    redis = find(objects, "NetworkPolicy", "redis")["spec"]
    assert redis["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "proxy"}}}],
            "ports": [{"port": "redis"}],
        }
    ]


def test_redis_runs_as_the_tests_run_it(tmp_path: Path) -> None:
    """A cache: no persistence, LRU eviction at maxmemory, the flags of testkit's server."""
    redis = container(find(render("production"), "Deployment", "redis"))
    args = redis["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    tests = RedisServer(tmp_path / "redis.log").command()[1:]
    tested = dict(zip(tests[::2], tests[1::2], strict=True))
    for flag in ("--save", "--appendonly", "--maxmemory-policy"):
        assert flags[flag] == tested[flag], flag
    assert quantity(redis["resources"]["limits"]["memory"]) > quantity(
        flags["--maxmemory"].replace("gb", "Gi").replace("mb", "Mi")
    )


# --- custom resources -------------------------------------------------------------------------


def prometheus_queries(objects) -> list[str]:
    return [
        trigger["metadata"]["query"]
        for scaled in of_kind(objects, "ScaledObject")
        for trigger in scaled["spec"]["triggers"]
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_are_well_formed(overlay: str) -> None:
    objects = render(overlay)
    (namespace,) = of_kind(objects, "Namespace")
    for scaled in of_kind(objects, "ScaledObject"):
        spec = scaled["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "minReplicaCount",
            "maxReplicaCount",
            "pollingInterval",
            "cooldownPeriod",
            "fallback",
            "advanced",
            "triggers",
        }
        target = find(objects, "Deployment", spec["scaleTargetRef"]["name"])
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
        assert target["spec"]["replicas"] == spec["minReplicaCount"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert set(behavior) <= {"scaleUp", "scaleDown"}
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus"
            # fallback works only for AverageValue triggers (KEDA's documentation)
            assert trigger["metricType"] == "AverageValue"
            metadata = trigger["metadata"]
            assert set(metadata) == {"serverAddress", "threshold", "query"}
            assert all(isinstance(value, str) for value in metadata.values()), "KEDA wants text"
            assert float(metadata["threshold"]) > 0
            assert re.fullmatch(r"https?://[\w.-]+(:\d+)?", metadata["serverAddress"])
            # the overlay's namespace, which kustomize does not rewrite inside a query
            namespaces = set(re.findall(r'namespace="([^"]+)"', metadata["query"]))
            assert namespaces == {namespace["metadata"]["name"]}, metadata["query"]
    for monitor in of_kind(objects, "PodMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        (workload,) = [
            d
            for d in of_kind(objects, "Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in named_ports(container(workload))
        assert endpoint["path"] == "/metrics"
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(
            named_ports(container(workload))[endpoint["port"]]
        )


# --- dashboard and autoscaler metrics ---------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data = config_maps(render("production"))["mobilesam-dashboard"]
    return json.loads(data["dashboard.json"])


def dashboard_queries() -> list[str]:
    return [
        target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])
    ]


def proxy_metric_names() -> set[str]:
    """Every series name the proxy exposes (labelled metrics show none until used)."""
    suffixes = {Counter: ("_total",), Gauge: ("",), Histogram: ("_bucket", "_count", "_sum")}
    names = set()
    for value in vars(ProxyMetrics()).values():
        for kind, endings in suffixes.items():
            if isinstance(value, kind):
                names |= {value._name + ending for ending in endings}
    return names


def metric_names(query: str) -> set[str]:
    return set(re.findall(r"\b((?:nv|proxy)_[a-z_]+)\b", query))


def test_the_dashboard_covers_latency_queue_batches_cache_and_503s() -> None:
    board = dashboard()
    assert board["uid"] and board["panels"]
    titles = " ".join(panel["title"] for panel in board["panels"]).lower()
    for topic in ("latency", "queue", "batch", "cache hit rate", "503"):
        assert topic in titles, topic
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
    for query in dashboard_queries():
        assert 'namespace="$namespace"' in query, query


def test_the_dashboard_and_the_autoscaler_query_real_metrics(triton_server) -> None:
    import urllib.request

    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
        exposition = response.read().decode()
    triton_names = set(re.findall(r"^# TYPE (\S+) ", exposition, re.M))
    exported = proxy_metric_names() | triton_names
    assert "nv_inference_queue_duration_us" in triton_names
    assert "proxy_shared_cache_errors_total" in exported
    queries = dashboard_queries() + prometheus_queries(render("production"))
    used = set().union(*(metric_names(query) for query in queries))
    assert not used - exported, f"not exported by the proxy or Triton: {used - exported}"
    assert {"nv_inference_exec_count", "proxy_embedding_cache_lookups_total"} <= used
