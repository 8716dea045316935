#!/usr/bin/env bash
# Installs what building and testing Portolan needs, when it is missing. Idempotent.
#
#   scripts/deps.sh build   libclang (RocksDB's bindings are generated with it)
#   scripts/deps.sh test    the above, plus the real clients and peers the tests drive:
#                           skopeo, Debian's docker.io engine, the reference registry
#                           (docker-registry), procps, cargo-nextest, and the AWS CLI and
#                           boto3 (in a virtualenv at $PORTOLAN_TOOLS, default
#                           ~/.cache/portolan-tools, when `aws`/boto3 are not already there)
set -eu

want=${1:-build}
pkgs=(libclang-dev clang)
if [ "$want" = test ]; then
    # procps: `kill` and `pgrep`, which the tests and scripts/docker-engine.sh use.
    pkgs+=(skopeo docker.io docker-registry procps python3-venv)
fi

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else echo "deps.sh: need root to run: $*" >&2; return 1
    fi
}

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get -o DPkg::Lock::Timeout=300 update -q
    as_root apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "deps.sh: cargo is not on PATH; install a Rust toolchain (1.88 or newer) first" >&2
    exit 1
fi
if [ "$want" = test ] && ! cargo nextest --version >/dev/null 2>&1; then
    echo "deps.sh: installing cargo-nextest"
    cargo install cargo-nextest --locked
fi

if [ "$want" = test ]; then
    tools=${PORTOLAN_TOOLS:-$HOME/.cache/portolan-tools}
    if ! { command -v aws >/dev/null 2>&1 && python3 -c 'import boto3' >/dev/null 2>&1; } \
        && ! [ -x "$tools/bin/aws" ]; then
        echo "deps.sh: installing the AWS CLI and boto3 into $tools"
        python3 -m venv "$tools"
        "$tools/bin/pip" install -q awscli boto3
    fi
fi
