#!/usr/bin/env bash
# docker-compose.yml with podman, where there is no Docker engine, no container registry and no
# systemd (this project's machines, as root). Idempotent and non-interactive; it changes no
# system-wide podman configuration and touches no container, image, network or volume it did
# not make (they are found by name and by the compose project's label).
#
#   scripts/podman.sh setup            apt packages, and this clone's podman configuration
#   scripts/podman.sh build [IMAGE]    the Debian 12 base image (once), then export, triton, proxy
#   scripts/podman.sh compose ARGS...  docker-compose ARGS against podman's Docker API
#   scripts/podman.sh down             remove the compose project: containers, networks, volumes
#   scripts/podman.sh podman ARGS...   podman ARGS with this clone's configuration
#
# Environment: COMPOSE_PROJECT_NAME (mobilesam-triton), IMAGE_TAG (latest), TORCH_INDEX_URL
# (unset: PyPI's torch, the only index these machines reach; Dockerfile.export explains).
#
# Why each piece (README, "Docker"):
# - runc, not crun (crun refuses these machines' hybrid cgroups), cgroupfs and file events (no
#   systemd), and explicit nofile/nproc limits no higher than the host's hard limits (podman's
#   defaults are higher, and root here may not raise them: "error setting rlimits"). They are
#   in build/podman/containers.conf, which every podman run here gets as CONTAINERS_CONF.
# - docker-compose 1.29 against `podman system service`: it honours depends_on conditions and
#   restart policies (podman-compose 1.6 on podman 4.3 breaks both).
# - A health checker: podman 4.3 runs HEALTHCHECKs from systemd timers, so without systemd
#   none would ever run, and `service_healthy` would never hold.
# - Images are built by `podman build`, not by compose: only it can mount the host's pip
#   configuration into a build (scripts/pip_build_config.py); compose then runs them with
#   --no-build (a user's `docker compose up --build` builds them itself).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=$ROOT/build/podman
SOCKET=$STATE/api.sock
PY=${PY:-$ROOT/.venv/bin/python}
BASE_IMAGE=localhost/mobilesam-triton/base:bookworm
IMAGE_TAG=${IMAGE_TAG:-latest}
HEALTH_INTERVAL_S=5
API_IDLE_S=300   # the API service ends after this long without a client
export CONTAINERS_CONF=$STATE/containers.conf
export DOCKER_HOST=unix://$SOCKET
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-mobilesam-triton}
mkdir -p "$STATE/logs"

log() { printf 'podman.sh: %s\n' "$*" >&2; }

install_packages() {
  # catatonit: the init of `init: true`; curl: to ask the API service whether it is up.
  local packages=(podman runc catatonit netavark aardvark-dns mmdebstrap docker-compose curl)
  local missing=() package
  for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

write_config() {
  local nofile nproc config
  nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
  [ "$nofile" != unlimited ] && [ "$nofile" -le 65536 ] || nofile=65536
  [ "$nproc" != unlimited ] && [ "$nproc" -le 4096 ] || nproc=4096
  config=$(cat <<CONF
# Written by scripts/podman.sh for this clone (CONTAINERS_CONF); see the script for why.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
)
  [ -f "$CONTAINERS_CONF" ] && [ "$(cat "$CONTAINERS_CONF")" = "$config" ] \
    || printf '%s\n' "$config" >"$CONTAINERS_CONF"
}

# Debian 12 with Python 3.11 (what python:3.11-slim is), made with mmdebstrap from Debian's
# packages: python3-venv for the venvs, libpython3.11 for Triton's Python backend stub.
# merged-/usr without the usrmerge package (which would bring perl); no docs or locales.
build_base() {
  podman image exists "$BASE_IMAGE" && return
  log "building $BASE_IMAGE with mmdebstrap (log: build/podman/logs/base.log)"
  local tarball=$STATE/base.tar
  if ! timeout 1200 mmdebstrap --variant=minbase \
    --include=python3,python3-venv,libpython3.11,ca-certificates \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*' \
    bookworm "$tarball" >"$STATE/logs/base.log" 2>&1; then
    tail -n 30 "$STATE/logs/base.log" >&2
    return 1
  fi
  podman import --quiet \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    "$tarball" "$BASE_IMAGE" >/dev/null
  rm -f "$tarball"
}

build_image() {
  local name=$1 image=mobilesam-triton/$1:$IMAGE_TAG start=$SECONDS
  local args=(--build-arg "BASE=$BASE_IMAGE")
  [ "$name" = export ] && args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL-}")
  local pip_options
  mapfile -t pip_options < <("$PY" "$ROOT/scripts/pip_build_config.py" "$STATE/pip")
  log "building $image (log: build/podman/logs/build-$name.log)"
  # --format docker: the OCI format has no HEALTHCHECK (podman drops it with a warning).
  if ! timeout 1800 podman build --format docker --layers \
    -f "$ROOT/Dockerfile.$name" "${args[@]}" "${pip_options[@]}" -t "$image" "$ROOT" \
    >"$STATE/logs/build-$name.log" 2>&1; then
    tail -n 30 "$STATE/logs/build-$name.log" >&2
    return 1
  fi
  log "$image: $((SECONDS - start)) s, $(podman image inspect --format '{{.Size}}' "$image" \
    | awk '{printf "%.0f MB", $1 / 1e6}')"
}

# Layers of earlier builds that no tagged image uses any more (found by the label the
# Dockerfiles give every layer), repeatedly: removing one may leave its parent unused.
prune_superseded() {
  local ids
  while ids=$(podman images --all --quiet --filter dangling=true \
    --filter label=mobilesam-triton.image) && [ -n "$ids" ]; do
    # shellcheck disable=SC2086  # one ID a word
    podman rmi $ids >/dev/null 2>&1 || break
  done
}

build() {
  build_base
  local images=("$@")
  ((${#images[@]})) || images=(export triton proxy)
  for name in "${images[@]}"; do
    case $name in
      export | triton | proxy) build_image "$name" ;;
      *) log "unknown image $name (export, triton or proxy)"; return 2 ;;
    esac
  done
  prune_superseded
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

api_up() {
  curl -sf --max-time 5 --unix-socket "$SOCKET" http://podman/_ping >/dev/null 2>&1
}

start_helpers() {
  if ! api_up; then
    rm -f "$SOCKET"
    setsid podman system service --time="$API_IDLE_S" "unix://$SOCKET" \
      >>"$STATE/logs/api.log" 2>&1 </dev/null &
    echo $! >"$STATE/api.pid"
    local attempt
    for attempt in $(seq 100); do api_up && break; sleep 0.1; done
    api_up || { log "podman system service did not start (build/podman/logs/api.log)"; return 1; }
  fi
  local ticker=$STATE/health-$COMPOSE_PROJECT_NAME.pid
  if ! alive "$ticker"; then
    setsid bash "$0" health-checker >>"$STATE/logs/health-$COMPOSE_PROJECT_NAME.log" 2>&1 \
      </dev/null &
    echo $! >"$ticker"
  fi
}

stop_helpers() {
  local ticker=$STATE/health-$COMPOSE_PROJECT_NAME.pid
  alive "$ticker" && kill -- "-$(cat "$ticker")" 2>/dev/null
  rm -f "$ticker"
  # The API service serves every project of this clone: stop it with the last one.
  local other
  for other in "$STATE"/health-*.pid; do
    alive "$other" && return
  done
  alive "$STATE/api.pid" && kill "$(cat "$STATE/api.pid")"
  rm -f "$STATE/api.pid"
}

# Runs the HEALTHCHECKs of the project's running containers every HEALTH_INTERVAL_S (podman
# applies their start period and retries); ends once the project has had no container for a
# minute.
health_checker() {
  local label=label=com.docker.compose.project=$COMPOSE_PROJECT_NAME idle=0 id
  while ((idle < 60)); do
    if [ -n "$(podman ps --all --quiet --filter "$label")" ]; then
      idle=0
    else
      idle=$((idle + HEALTH_INTERVAL_S))
    fi
    for id in $(podman ps --filter "$label" --filter status=running --format '{{.ID}} {{.Status}}' \
      | awk '/\((starting|healthy|unhealthy)\)$/ {print $1}'); do
      podman healthcheck run "$id" </dev/null >/dev/null 2>&1 || true
    done
    sleep "$HEALTH_INTERVAL_S"
  done
}

compose() {
  docker-compose --file "$ROOT/docker-compose.yml" "$@"
}

down() {
  start_helpers
  # Podman refuses to remove a container whose network namespace others still use, and
  # docker-compose removes containers in parallel: remove the pod's tenants first.
  local tenants
  mapfile -t tenants < <(compose config --services | grep -vx pod)
  compose rm --stop --force -v "${tenants[@]}"
  compose down --volumes --remove-orphans
  stop_helpers
}

command=${1:-}
shift || true
write_config
case $command in
  setup) install_packages ;;
  build) build "$@" ;;
  compose) start_helpers; compose "$@" ;;
  down) down ;;
  podman) exec podman "$@" ;;
  health-checker) health_checker ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
