#!/usr/bin/env bash
# The whole test suite: installs what it needs, starts the Docker engine for the end-to-end
# tests, runs every test of the workspace with nextest, then checks format and lints.
set -eu
cd "$(dirname "$0")/.."

bash scripts/deps.sh test
# The AWS CLI and boto3 the ECR tests drive: deps.sh installs them into this virtualenv when
# the host has none, and then its `aws` and `python3` come first.
tools=${PORTOLAN_TOOLS:-$HOME/.cache/portolan-tools}
if [ -x "$tools/bin/aws" ]; then export PATH="$tools/bin:$PATH"; fi
# The Docker end-to-end test needs a running engine; it says loudly (and fails under CI)
# when there is none, so a failure here is reported, not fatal.
bash scripts/docker-engine.sh || echo "test.sh: WARNING: docker engine unavailable; the docker end-to-end test will report it"

cargo build --workspace --all-targets
cargo nextest run --workspace --no-fail-fast
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
