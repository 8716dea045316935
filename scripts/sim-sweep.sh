#!/usr/bin/env bash
# A long seed sweep of the deterministic simulator, for a machine left running (hours).
#
#   scripts/sim-sweep.sh [FIRST [COUNT]] [-- simulator flags...]
#
# Runs seeds FIRST..FIRST+COUNT (default: a fresh range from the clock, 200 seeds) at 600 s of
# simulated time, 2 regions x 3 nodes, heavy faults, JOBS runs at once (default: the number of
# cores). Flags after `--` replace the defaults for duration, regions, nodes and faults, e.g.
#
#   scripts/sim-sweep.sh 5000 500 -- --duration 2h
#
# Every failing seed's whole report (violations, trace tail, replay command) is kept in
# $OUT (default ./sim-sweep-<first>/seed-<n>.txt); one line per seed goes to stdout and to
# $OUT/summary.txt. Exits 1 if any seed failed, 0 otherwise. SIM=path runs a simulator binary
# built before (no build step).
set -eu
cd "$(dirname "$0")/.."

first=${1:-}
count=${2:-200}
shift $(( $# > 2 ? 2 : $# )) || true
if [ "${1:-}" = "--" ]; then shift; fi
if [ -z "$first" ]; then
    # A range nobody ran before: seconds since the epoch, times 1000.
    first=$(( $(date +%s) * 1000 ))
fi
case "$first$count" in
    *[!0-9]*) echo "sim-sweep.sh: FIRST and COUNT must be numbers" >&2; exit 2 ;;
esac
jobs=${JOBS:-$(nproc)}
out=${OUT:-./sim-sweep-$first}
flags=("$@")
if [ ${#flags[@]} -eq 0 ]; then
    flags=(--duration 600s --regions 2 --nodes 3 --faults heavy)
fi

sim=${SIM:-}
if [ -z "$sim" ]; then
    bash scripts/deps.sh build
    cargo build --release -p simulator
    sim=target/release/simulator
fi
mkdir -p "$out"
: > "$out/summary.txt"
echo "sim-sweep: seeds $first..$((first + count)) (${flags[*]}), $jobs at a time, reports in $out"
start=$(date +%s)

run_one() {
    local seed=$1 report
    report=$(mktemp)
    if "$sim" --seed "$seed" "${flags[@]}" > "$report" 2>&1; then
        line="seed $seed: PASS $(grep -m1 'simulated' "$report" | sed 's/^ *//')"
        rm -f "$report"
    else
        mv "$report" "$out/seed-$seed.txt"
        line="seed $seed: FAIL (report: $out/seed-$seed.txt)"
    fi
    echo "$line"
    echo "$line" >> "$out/summary.txt"
}

running=0
for seed in $(seq "$first" $((first + count - 1))); do
    run_one "$seed" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n
        running=$((running - 1))
    fi
done
wait

failed=$(grep -c ': FAIL' "$out/summary.txt" || true)
echo "sim-sweep: $count seeds from $first in $(( $(date +%s) - start )) s: $((count - failed)) passed, $failed failed"
if [ "$failed" -gt 0 ]; then
    grep ': FAIL' "$out/summary.txt"
    exit 1
fi
