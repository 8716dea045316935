#!/usr/bin/env bash
# Starts a registry on the embedded default: one node, region `local`, data in
# ./portolan-data, HTTP on 127.0.0.1:5000. Extra arguments go to `portolan serve`.
set -eu
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/deps.sh" build
cd "$root"
cargo build --release -p portolan-node --bin portolan
exec "$root/target/release/portolan" serve "$@"
