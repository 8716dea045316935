#!/usr/bin/env bash
# Starts a registry on the embedded default: one node, region `local`, data in
# ./portolan-data (relative to where this is run), HTTP on 127.0.0.1:5000. Extra arguments
# go to `portolan serve`.
set -eu
here="$(pwd)"
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/deps.sh" build
(cd "$root" && cargo build --release -p portolan-node --bin portolan)
cd "$here"
exec "$root/target/release/portolan" serve "$@"
