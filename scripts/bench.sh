#!/usr/bin/env bash
# Speed benchmarks of Tessera's model runtime (what `make bench` runs).
#
# Runs, on a synthetic model of stories110M's shape, the one-process decode
# and prefill benchmarks (f32, f16, q8_0) and decode through three executors
# over NATS on loopback; each records its figures in bench/results.json
# (TESSERA_BENCH_RESULTS), keeping the best of BENCH_COUNT runs. When
# LLAMA_CPP_DIR or LLAMA2C_DIR name checkouts of those engines, runs them on
# the same model file (scripts/bench-compare.sh). Then prints the table.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export TESSERA_BENCH_RESULTS=${TESSERA_BENCH_RESULTS:-$root/bench/results.json}
count=${BENCH_COUNT:-3}
mkdir -p "$(dirname "$TESSERA_BENCH_RESULTS")"

(cd "$root/pkg" && go test ./compute/ -run '^$' -bench 'Decode|Prefill' -benchtime 3s -benchmem -count "$count" -timeout 60m)
(cd "$root/services/executor" && go test . -run '^$' -bench Pipeline3 -benchtime 200x -count "$count" -timeout 60m)
if [ -n "${LLAMA_CPP_DIR:-}" ] || [ -n "${LLAMA2C_DIR:-}" ]; then
	"$root/scripts/bench-compare.sh"
fi
(cd "$root" && go run ./cmd/benchfig table)
