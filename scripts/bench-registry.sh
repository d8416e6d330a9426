#!/usr/bin/env bash
# Runs the registry benchmark: 10,000 simulated executors heartbeating at
# 1 Hz against one registry process (see services/registry/cmd/registry-bench).
# Figures go to bench/results.json (override with TESSERA_BENCH_RESULTS);
# extra arguments go to registry-bench (e.g. -nodes 1000 -window 10s).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
cd "$root"
go build -o "$bin/tessera-registry" ./services/registry/cmd/tessera-registry
go build -o "$bin/registry-bench" ./services/registry/cmd/registry-bench
export TESSERA_BENCH_RESULTS=${TESSERA_BENCH_RESULTS:-$root/bench/results.json}
"$bin/registry-bench" -registry "$bin/tessera-registry" "$@"
