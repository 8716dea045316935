#!/usr/bin/env bash
# Makes sure a Docker Engine (Debian's docker.io: dockerd + containerd) answers `docker info`.
#
# Idempotent: does nothing when the engine already answers. Otherwise installs docker.io if
# dockerd is missing, starts containerd and dockerd in the background (logs in /tmp), and waits
# a bounded time for the engine. Exits non-zero with a one-line reason on stderr when it cannot.
#
# Env: DOCKER_ENGINE_WAIT_SECS (default 60) — how long to wait for `docker info`.
#
# Builds: the Docker CLI here (28) has no buildx plugin and the engine is 20.10, so images are
# built with the legacy builder: `DOCKER_BUILDKIT=0 docker build ...`.

set -u

WAIT_SECS="${DOCKER_ENGINE_WAIT_SECS:-60}"
CONTAINERD_SOCK=/run/containerd/containerd.sock
CONTAINERD_LOG=/tmp/containerd.log
DOCKERD_LOG=/tmp/dockerd.log

fail() {
    echo "docker-engine.sh: $*" >&2
    exit 1
}

engine_up() {
    timeout 20 docker info >/dev/null 2>&1
}

command -v docker >/dev/null 2>&1 || fail "no docker CLI on PATH"

if engine_up; then
    echo "docker engine already running"
    exit 0
fi

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        return 1
    fi
}

# Install the engine if it is missing.
if ! command -v dockerd >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || fail "dockerd is missing and apt-get is not available"
    echo "dockerd missing: installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    as_root timeout 600 apt-get -o DPkg::Lock::Timeout=300 update -q >/tmp/docker-engine-apt.log 2>&1 \
        || fail "apt-get update failed (see /tmp/docker-engine-apt.log)"
    as_root timeout 900 apt-get -o DPkg::Lock::Timeout=300 install -y -q docker.io >>/tmp/docker-engine-apt.log 2>&1 \
        || fail "apt-get install docker.io failed (see /tmp/docker-engine-apt.log)"
    command -v dockerd >/dev/null 2>&1 || fail "docker.io installed but dockerd is still missing"
fi

# Starting daemons needs root.
if [ "$(id -u)" != 0 ] && ! sudo -n true 2>/dev/null; then
    fail "docker engine is not running and starting it needs root (no passwordless sudo)"
fi

running() {
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -x "$1" >/dev/null 2>&1
    elif command -v pidof >/dev/null 2>&1; then
        pidof "$1" >/dev/null 2>&1
    else
        return 1
    fi
}

containerd_up() {
    [ -S "$CONTAINERD_SOCK" ] || return 1
    if command -v ctr >/dev/null 2>&1; then
        timeout 10 ctr --address "$CONTAINERD_SOCK" version >/dev/null 2>&1
    else
        return 0
    fi
}

start_detached() {
    # New session, no inherited stdio: the caller may be waiting on our pipes.
    local log="$1"
    shift
    as_root setsid nohup "$@" </dev/null >>"$log" 2>&1 &
}

deadline=$((SECONDS + WAIT_SECS))

if ! containerd_up; then
    command -v containerd >/dev/null 2>&1 || fail "containerd binary is missing"
    if running containerd; then
        echo "containerd process exists; waiting for its socket"
    else
        echo "starting containerd (log: $CONTAINERD_LOG)"
        start_detached "$CONTAINERD_LOG" containerd
    fi
    until containerd_up; do
        [ "$SECONDS" -lt "$deadline" ] \
            || fail "containerd did not come up within ${WAIT_SECS}s (see $CONTAINERD_LOG)"
        sleep 0.5
    done
fi

if running dockerd; then
    echo "dockerd process exists; waiting for it to answer"
else
    echo "starting dockerd (log: $DOCKERD_LOG)"
    start_detached "$DOCKERD_LOG" dockerd --containerd="$CONTAINERD_SOCK"
fi

until engine_up; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        reason="$(tail -n 3 "$DOCKERD_LOG" 2>/dev/null | tr '\n' ' ')"
        fail "docker engine did not answer within ${WAIT_SECS}s (see $DOCKERD_LOG): $reason"
    fi
    if ! running dockerd; then
        reason="$(tail -n 3 "$DOCKERD_LOG" 2>/dev/null | tr '\n' ' ')"
        fail "dockerd exited during startup (see $DOCKERD_LOG): $reason"
    fi
    sleep 0.5
done

echo "docker engine is up"
exit 0
