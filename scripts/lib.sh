# Shared set-up for scripts/test and scripts/demo: installs and starts what CloudAI needs on a fresh
# Debian/Ubuntu machine, and stops what it started on exit. Source it; don't run it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.cache/run"
VENV="${CLOUDAI_VENV:-$ROOT/.venv}"
TEST_IMAGE="${CLOUDAI_TEST_IMAGE:-cloudai/busybox:local}"
mkdir -p "$STATE"
_STARTED_PIDS=()
_STARTED_NAMES=()
# 1: what `spawn` starts gets a session of its own (setsid, stdin from /dev/null), so it outlives this script, a
# Ctrl-C and a hang-up of its terminal: scripts/demo leaves its stack running. 0: scripts/test and scripts/bench
# stop what they started (stop_started) when they end.
DETACH=0

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root for: $* (run as root or install sudo)"; fi
}

# The Debian packages MODE still lacks, one a line. MODE is `demo` (what CloudAI needs to run), `cluster` (that
# plus redis-sentinel, iproute2 and iptables for scripts/cluster) or `test` (all that, plus Chromium and its driver for the
# browser tests, and docker-compose for the compose checks; tests/cluster runs the simulated cluster). A function of
# PATH and of $CLOUDAI_BUSYBOX alone, so tests/unit/test_setup_scripts.py can call it with a PATH that lacks
# the tools. The mode is an argument, never an environment variable: `VAR=1 source lib.sh` would not last.
packages_needed() {
  local mode="${1:-}"
  case "$mode" in demo|cluster|test) ;; *)
    echo "packages_needed: mode must be demo, cluster or test, not '$mode'" >&2; return 2;; esac
  local busybox="${CLOUDAI_BUSYBOX:-/bin/busybox}"
  command -v redis-server >/dev/null 2>&1 || echo redis-server
  { command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1; } || echo docker.io
  # a static busybox: the test image is built from it with `docker import` (no registry needed)
  if ! { [ -x "$busybox" ] && ! ldd "$busybox" >/dev/null 2>&1; }; then echo busybox-static; fi
  { command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' 2>/dev/null; } || echo python3-venv
  command -v git >/dev/null 2>&1 || echo git
  if [ "$mode" = cluster ] || [ "$mode" = test ]; then
    command -v redis-sentinel >/dev/null 2>&1 || echo redis-sentinel
    command -v ip >/dev/null 2>&1 || echo iproute2
    command -v iptables >/dev/null 2>&1 || echo iptables
  fi
  if [ "$mode" = test ]; then
    command -v chromium >/dev/null 2>&1 || echo chromium
    command -v chromedriver >/dev/null 2>&1 || echo chromium-driver
    command -v docker-compose >/dev/null 2>&1 || echo docker-compose
  fi
  return 0
}

# spawn NAME LOG CMD...: CMD in the background, its output in LOG; its pid (in _STARTED_PIDS) is CMD's own, as
# stop_started and scripts/demo stop need it (setsid, not the group leader of a shell without job control, execs)
spawn() {
  local name="$1" out="$2"
  shift 2
  if [ "$DETACH" = 1 ]; then
    setsid "$@" >"$out" 2>&1 </dev/null &
  else
    "$@" >"$out" 2>&1 &
  fi
  _STARTED_PIDS+=($!)
  _STARTED_NAMES+=("$name")
}

ensure_packages() {
  local missing
  missing="$(packages_needed "$1")" || die "packages_needed $1 failed"
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # one package a line
    log "installing" $missing
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    local still
    still="$(packages_needed "$1")"
    [ -z "$still" ] || die "still missing after apt-get install: $still"
  fi
}

ensure_dockerd() {
  if docker info >/dev/null 2>&1; then return; fi
  log "starting dockerd"
  # flags for VMs without iptables/overlay support; harmless elsewhere for CloudAI's needs
  # its pid is dockerd itself, or sudo, which passes our SIGTERM on: stop_started must really stop it
  local flags=(--iptables=false --bridge=none --storage-driver=vfs)
  if [ "$(id -u)" = 0 ]; then
    spawn dockerd "$STATE/dockerd.log" dockerd "${flags[@]}"
  else
    command -v sudo >/dev/null || die "need root to start dockerd (run as root or install sudo)"
    spawn dockerd "$STATE/dockerd.log" sudo dockerd "${flags[@]}"
  fi
  for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && return; sleep 0.5; done
  tail -20 "$STATE/dockerd.log" >&2
  die "dockerd did not start (log above: $STATE/dockerd.log)"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_redis() {
  local port
  port="$(free_port)"
  log "starting redis-server on port $port"
  spawn redis-server "$STATE/redis.log" \
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --protected-mode yes
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

# The virtualenv, from the lock: requirements/test.txt pins every package (and setuptools, which builds
# CloudAI itself) with its hashes, so what is installed is decided by the commit, never by the day. `pip` only
# checks: --require-hashes refuses a file whose hash the lock lacks, --no-deps installs nothing the lock doesn't
# name. scripts/relock moves the lock to newer releases as a deliberate step.
ensure_venv() {
  local lock="$ROOT/requirements/${CLOUDAI_LOCK:-test}.txt"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  # the stamp holds the lock's and the recipe's digest: a venv installed from another lock is installed again
  local stamp="$VENV/.cloudai-installed" want
  want="$(cat "$lock" "$ROOT/setup.cfg" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing $(basename "$lock") into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r "$lock" \
      >"$STATE/pip.log" 2>&1 || { tail -30 "$STATE/pip.log" >&2; die "pip install failed (log: $STATE/pip.log)"; }
    # CloudAI itself, editable as a plain path entry (compat mode: the repository's root on sys.path, so tests/
    # and bench/ are importable too, and cloudai/cli, cloudai/workers, cloudai/beat are the links to the top-level
    # folders; docs/architecture.md, "Layout"): setuptools' default editable finder imports pathlib,
    # importlib.util and urllib.parse at every interpreter start, ~10 ms of each `cloudai` command. Built with
    # the locked setuptools, nothing fetched.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
      -e "$ROOT" --config-settings editable_mode=compat >>"$STATE/pip.log" 2>&1 ||
      { tail -30 "$STATE/pip.log" >&2; die "pip install -e failed (log: $STATE/pip.log)"; }
    "$VENV/bin/python" -m pip check >>"$STATE/pip.log" 2>&1 ||
      { tail -10 "$STATE/pip.log" >&2; die "the lock $lock is not consistent (pip check; run scripts/relock)"; }
    echo "$want" >"$stamp"
  fi
  # bytecode for our own sources, as an installed (non-editable) package has it: where
  # PYTHONDONTWRITEBYTECODE is set (CI sandboxes), every `cloudai` process would compile them anew (~60 ms of
  # CPU a command). Only changed files are compiled again; a stale one is simply ignored by Python.
  "$VENV/bin/python" -m compileall -q -j 0 "$ROOT/cloudai" "$ROOT/cli" "$ROOT/workers" "$ROOT/beat" \
    >/dev/null 2>&1 || true
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

# MODE: demo (scripts/demo, scripts/bench) or test (scripts/test, .ci/run).
# With CLOUDAI_SETUP_PLAN=1 it only prints the packages it would install, and the script exits (tests use it).
setup_all() {
  if [ "${CLOUDAI_SETUP_PLAN:-}" = 1 ]; then packages_needed "${1:-}"; exit $?; fi
  ensure_packages "${1:?setup_all demo|test}"
  ensure_venv
  ensure_dockerd
  build_test_image
  start_redis
  export CLOUDAI_TEST_IMAGE="$TEST_IMAGE"
}
