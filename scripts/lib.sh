# Shared set-up for scripts/test and scripts/demo: installs and starts what CloudAI needs on a fresh
# Debian/Ubuntu machine, and stops what it started on exit. Source it; don't run it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.cache/run"
VENV="${CLOUDAI_VENV:-$ROOT/.venv}"
TEST_IMAGE="${CLOUDAI_TEST_IMAGE:-cloudai/busybox:local}"
mkdir -p "$STATE"
_STARTED_PIDS=()

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root for: $* (run as root or install sudo)"; fi
}

ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v dockerd >/dev/null || missing+=(docker.io)
  if ! { [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; }; then missing+=(busybox-static); fi
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  command -v git >/dev/null || missing+=(git)
  if [ "${CLOUDAI_TEST_TOOLS:-0}" = 1 ]; then  # the browser test and the compose check
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

ensure_dockerd() {
  if docker info >/dev/null 2>&1; then return; fi
  log "starting dockerd"
  # flags for VMs without iptables/overlay support; harmless elsewhere for CloudAI's needs
  # started directly (not through a shell function) so that $! is dockerd itself, or sudo, which passes
  # our SIGTERM on: stop_started must really stop it
  local flags=(--iptables=false --bridge=none --storage-driver=vfs)
  if [ "$(id -u)" = 0 ]; then
    dockerd "${flags[@]}" >"$STATE/dockerd.log" 2>&1 &
  else
    command -v sudo >/dev/null || die "need root to start dockerd (run as root or install sudo)"
    sudo dockerd "${flags[@]}" >"$STATE/dockerd.log" 2>&1 &
  fi
  _STARTED_PIDS+=($!)
  for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && return; sleep 0.5; done
  tail -20 "$STATE/dockerd.log" >&2
  die "dockerd did not start (log above: $STATE/dockerd.log)"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_redis() {
  local port
  port="$(free_port)"
  log "starting redis-server on port $port"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --protected-mode yes \
    >"$STATE/redis.log" 2>&1 &
  _STARTED_PIDS+=($!)
  for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$port" ping >/dev/null || die "redis-server did not start ($STATE/redis.log)"
  export CLOUDAI_REDIS_URL="redis://127.0.0.1:$port/0"
}

build_test_image() {
  if docker image inspect "$TEST_IMAGE" >/dev/null 2>&1; then return; fi
  log "building $TEST_IMAGE from busybox-static (no registry needed)"
  local rootfs
  rootfs="$(mktemp -d)"
  mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
  cp /bin/busybox "$rootfs/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/etc/passwd"
  tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/sh"]' - "$TEST_IMAGE" >/dev/null
  rm -rf "$rootfs"
}

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.cloudai-installed"
  if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ]; then
    log "installing cloudai[test] into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/pip" install -e "$ROOT[test]" >"$STATE/pip.log" 2>&1 || { tail -30 "$STATE/pip.log" >&2;
      die "pip install failed (log: $STATE/pip.log)"; }
    touch "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}

stop_started() {
  local pid
  for pid in "${_STARTED_PIDS[@]:-}"; do
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null || as_root kill "$pid" 2>/dev/null || true
  done
  for pid in "${_STARTED_PIDS[@]:-}"; do
    [ -n "$pid" ] || continue
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  done
}

setup_all() {
  ensure_packages
  ensure_venv
  ensure_dockerd
  build_test_image
  start_redis
  export CLOUDAI_TEST_IMAGE="$TEST_IMAGE"
}
