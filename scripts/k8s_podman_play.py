"""`make k8s-play`: the rendered Triton and proxy pods of the small overlay, run with
`podman kube play`, answer one segmentation request.

No cluster runs here, so this is the closest check of the manifests with the real images
(`mobilesam-triton/triton` and `mobilesam-triton/proxy` of `scripts/podman.sh build`, tag
IMAGE_TAG or `latest`):
the containers, commands, variables, probes' paths, volumes and security settings are the
rendered ones. What podman cannot do like Kubernetes is adapted, and only that:

- no Services or cluster DNS: both pods' containers run in one pod, so the proxy reaches
  Triton on localhost (TRITON_ENDPOINTS=127.0.0.1:<TRITON_HTTP_PORT>);
- no Jobs: the model-repository volume is filled from an exported repository on disk
  (default: the tests' export in build/tests);
- an emptyDir is a root-owned directory in podman but world-writable in Kubernetes: each one
  becomes a tmpfs volume owned by the image's user (/dev/shm stays memory-backed);
- the proxy's port is published on 127.0.0.1 only, on a free port;
- init containers run before the pod with `podman run --no-healthcheck` and the same command,
  variables, volumes and security settings: podman 4.3's `kube play` cannot remove an init
  container whose image has a HEALTHCHECK where there is no systemd ("container state
  improper").

Needs podman and catatonit (Debian packages); it cleans up the pod and its volumes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

from common.settings import PROJECT_ROOT
from testkit.ports import free_port

OVERLAY = PROJECT_ROOT / "deploy" / "kubernetes" / "overlays" / "small"
IMAGE_TAG = os.environ.get("IMAGE_TAG", "latest")
IMAGES = {
    name: f"localhost/{name}:{IMAGE_TAG}"
    for name in ("mobilesam-triton/triton", "mobilesam-triton/proxy")
}


def run(*command: str, **options) -> subprocess.CompletedProcess:
    result = subprocess.run(command, text=True, capture_output=True, **options)
    if result.returncode != 0:
        sys.exit(f"k8s-play: {' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    return result


def image_user(image: str) -> str:
    user = run("podman", "image", "inspect", image, "--format", "{{.Config.User}}").stdout.strip()
    uid, _, gid = user.partition(":")
    return f"uid={uid},gid={gid or uid}"


def rendered() -> list[dict]:
    text = run("kubectl", "kustomize", str(OVERLAY)).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def one_pod(
    objects: list[dict], name: str, proxy_port: int
) -> tuple[dict, dict, dict[str, dict | None], list[dict]]:
    """The Triton and proxy pods as one podman pod; returns the pod, its config map, its
    volumes (podman volume name -> the emptyDir it stands for, None for the claim) and its
    init containers (run by `run_init_container`)."""

    def workload(kind: str, workload_name: str) -> dict:
        return next(
            o for o in objects if o["kind"] == kind and o["metadata"]["name"] == workload_name
        )

    settings = next(o for o in objects if o["kind"] == "ConfigMap")
    triton = workload("Deployment", "triton")["spec"]["template"]["spec"]
    proxy = workload("Deployment", "proxy")["spec"]["template"]["spec"]
    data = settings["data"]
    data["TRITON_ENDPOINTS"] = f"127.0.0.1:{data['TRITON_HTTP_PORT']}"
    data["TRITON_HOST"] = "127.0.0.1"
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": settings["metadata"]["name"]},
        "data": data,
    }

    volumes: dict[str, dict | None] = {}
    containers = []
    for pod_spec, prefix in ((triton, "triton"), (proxy, "proxy")):
        renamed = {}
        for volume in pod_spec["volumes"]:
            claim = f"{name}-{prefix}-{volume['name']}"
            if "persistentVolumeClaim" in volume:
                claim = f"{name}-{volume['persistentVolumeClaim']['claimName']}"
            renamed[volume["name"]] = claim
            volumes[claim] = volume.get("emptyDir")
        for spec in pod_spec["containers"] + pod_spec.get("initContainers", []):
            spec["image"] = IMAGES[spec["image"].split(":")[0]]
        for spec in pod_spec["containers"]:
            for mount in spec.get("volumeMounts", []):
                mount["name"] = renamed[mount["name"]]
            containers.append(spec)
        for spec in pod_spec.get("initContainers", []):
            for mount in spec.get("volumeMounts", []):
                mount["name"] = renamed[mount["name"]]
    for port in next(c for c in containers if c["name"] == "proxy")["ports"]:
        port.update(hostPort=proxy_port, hostIP="127.0.0.1")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "enableServiceLinks": False,
            "securityContext": triton["securityContext"],
            "terminationGracePeriodSeconds": triton["terminationGracePeriodSeconds"],
            "containers": containers,
            "volumes": [
                {"name": claim, "persistentVolumeClaim": {"claimName": claim}} for claim in volumes
            ],
        },
    }
    return pod, config_map, volumes, triton.get("initContainers", [])


def run_init_container(spec: dict, variables: dict[str, str], timeout_s: float) -> None:
    """The init container as Kubernetes runs it: to completion, before the pod starts."""
    security = spec.get("securityContext", {})
    command = ["podman", "run", "--rm", "--no-healthcheck", "--name", spec["name"]]
    if security.get("readOnlyRootFilesystem"):
        command.append("--read-only")
    if security.get("allowPrivilegeEscalation") is False:
        command += ["--security-opt", "no-new-privileges"]
    command += [f"--cap-drop={cap}" for cap in security.get("capabilities", {}).get("drop", [])]
    for key, value in variables.items():
        command += ["--env", f"{key}={value}"]
    for mount in spec.get("volumeMounts", []):
        readonly = ":ro" if mount.get("readOnly") else ""
        command += ["--volume", f"{mount['name']}:{mount['mountPath']}{readonly}"]
    command += [spec["image"], *spec.get("command", []), *spec.get("args", [])]
    try:
        run(*command, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        subprocess.run(["podman", "rm", "--force", spec["name"]], capture_output=True)
        sys.exit(f"k8s-play: init container {spec['name']} did not finish in {timeout_s:.0f} s")


def create_volumes(volumes: dict[str, dict | None], repository: Path, owner: str) -> None:
    for name, empty_dir in volumes.items():
        if empty_dir is None:  # the model repository claim
            run("podman", "volume", "create", name)
            mountpoint = run(
                "podman", "volume", "inspect", name, "--format", "{{.Mountpoint}}"
            ).stdout.strip()
            shutil.copytree(repository, mountpoint, symlinks=True, dirs_exist_ok=True)
            continue
        options = f"o={owner}"
        if "sizeLimit" in empty_dir:
            options += f",nr_blocks={int(_bytes(empty_dir['sizeLimit']) // 4096)}"
        run(
            "podman",
            "volume",
            "create",
            "--opt",
            "type=tmpfs",
            "--opt",
            "device=tmpfs",
            "--opt",
            options,
            name,
        )


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, scale in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * scale
    return float(quantity)


def png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=PROJECT_ROOT / "build" / "tests" / "model_repository",
        help="an exported repository to fill the volume with (default: the tests' export)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for /readyz")
    args = parser.parse_args()
    for tool in ("podman", "kubectl"):
        if shutil.which(tool) is None:
            sys.exit(f"k8s-play: {tool} is not installed")
    for image in IMAGES.values():
        if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
            sys.exit(f"k8s-play: image {image} does not exist (scripts/podman.sh build)")
    if not list(args.model_repository.glob("*/1/export.json")):
        sys.exit(f"k8s-play: {args.model_repository} holds no exported models (run the export)")

    objects = rendered()
    name = f"mobilesam-play-{os.getpid()}"
    proxy_port = free_port()
    pod, config_map, volumes, init_containers = one_pod(objects, name, proxy_port)
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "play.yaml"
        manifest.write_text(yaml.safe_dump_all([config_map, pod]))
        try:
            create_volumes(
                volumes, args.model_repository, image_user(IMAGES["mobilesam-triton/triton"])
            )
            for spec in init_containers:
                run_init_container(spec, config_map["data"], timeout_s=60)
            run("podman", "kube", "play", str(manifest))
            return request_once(f"http://127.0.0.1:{proxy_port}", args.timeout, name)
        finally:
            subprocess.run(["podman", "kube", "down", str(manifest)], capture_output=True)
            subprocess.run(["podman", "volume", "rm", "--force", *volumes], capture_output=True)


def request_once(base_url: str, timeout_s: float, pod: str) -> int:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base_url, timeout=120) as client:
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                logs = subprocess.run(
                    ["podman", "pod", "logs", "--tail", "30", pod], capture_output=True, text=True
                )
                print(logs.stdout, logs.stderr, file=sys.stderr)
                print(f"k8s-play: the proxy was not ready after {timeout_s:.0f} s", file=sys.stderr)
                return 1
            time.sleep(2)
        prompts = json.dumps([{"points": [[160, 120]], "labels": [1]}])
        response = client.post(
            "/segment-image", data={"prompts": prompts}, files={"file": ("photo.png", png())}
        )
        body = response.json()
        if response.status_code != 200:
            print(f"k8s-play: {response.status_code} {body}", file=sys.stderr)
            return 1
        masks = body["results"][0]["masks"]
        print(
            f"k8s-play: 200 from the rendered pods: {len(masks)} masks, "
            f"image_id {body['image_id'][:12]}..., timings {body['timings_ms']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
