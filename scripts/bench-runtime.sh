#!/usr/bin/env bash
# Speed benchmarks of the model runtime (part of `make bench`, scripts/bench.sh).
#
# On a synthetic model of stories110M's shape, runs the one-process decode
# and prefill benchmarks (f32, f16, q8_0) and decode through three executors
# over NATS on loopback; when LLAMA_CPP_DIR or LLAMA2C_DIR name checkouts of
# those engines, runs them on the same model file (scripts/bench-compare.sh).
# All of it is repeated BENCH_ROUNDS times, interleaved, and each figure's
# best round goes to bench/results.json (TESSERA_BENCH_RESULTS): on a
# machine shared with other work, every engine then gets its quietest
# moments. Then prints the table.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
results=${TESSERA_BENCH_RESULTS:-$root/bench/results.json}
rounds=${BENCH_ROUNDS:-3}
out=$root/bench/out/rounds
mkdir -p "$out" "$(dirname "$results")"
rm -f "$out"/round-*.json

for r in $(seq 1 "$rounds"); do
	export TESSERA_BENCH_RESULTS=$out/round-$r.json
	(cd "$root/pkg" && go test ./compute/ -run '^$' -bench 'Decode|Prefill' -benchtime 3s -benchmem -count 1 -timeout 60m)
	(cd "$root/services/executor" && go test . -run '^$' -bench Pipeline3 -benchtime 200x -count 1 -timeout 60m)
	if [ -n "${LLAMA_CPP_DIR:-}" ] || [ -n "${LLAMA2C_DIR:-}" ]; then
		BENCH_REPS=${BENCH_REPS:-3} "$root/scripts/bench-compare.sh"
	fi
done
export TESSERA_BENCH_RESULTS=$results
(cd "$root" && go run ./cmd/benchfig best "$out"/round-*.json && go run ./cmd/benchfig table)
