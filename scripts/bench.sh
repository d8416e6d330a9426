#!/usr/bin/env bash
# bench.sh: every benchmark (what `make bench` runs). Figures go to
# bench/results.json (TESSERA_BENCH_RESULTS); BENCHMARKS.md explains each
# one and records a run. Parts can be chosen: BENCH_ONLY="runtime planner"
# (runtime, planner, registry, settlement, router, selective).
#
# The model-runtime part compares with llama.cpp and llama2.c when
# LLAMA_CPP_DIR and LLAMA2C_DIR name checkouts of them (never committed
# here; see BENCHMARKS.md). It takes about 25 minutes; the rest about 10.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export TESSERA_BENCH_RESULTS=${TESSERA_BENCH_RESULTS:-$root/bench/results.json}
mkdir -p "$(dirname "$TESSERA_BENCH_RESULTS")"
only=${BENCH_ONLY:-runtime planner registry settlement router selective}
want() { [[ " $only " == *" $1 "* ]]; }
cd "$root"

if want runtime; then
	echo "== model runtime: decode, prefill, three-stage pipeline, hop overhead"
	scripts/bench-runtime.sh
fi
if want planner; then
	echo "== planner: published fleets, 10,000 GPUs, churn"
	(cd services/planner && go test ./helix/ -run '^$' -bench . -benchtime 1x -timeout 30m)
fi
if want registry; then
	echo "== registry: 10,000 executors heartbeating at 1 Hz"
	scripts/bench-registry.sh
fi
if want settlement; then
	echo "== settlement: events/s into ClickHouse against clickhouse-client's bulk insert"
	scripts/clickhouse.sh ensure >/dev/null
	(cd services/settlement && go test . -run '^$' -bench BenchmarkSettle -benchtime 200000x -timeout 30m)
fi
if want router; then
	echo "== router: streams (TTFT, ITL, tokens/s) and failover through three stages"
	go test ./e2e -run '^$' -bench 'Streams|Failover' -benchtime 1x -timeout 60m
fi
if want selective; then
	if [ -x scripts/bench-selective.sh ]; then
		echo "== selective activation: stories260k, G=4, k=1..4"
		scripts/bench-selective.sh
	fi
fi
echo
echo "Figures in $TESSERA_BENCH_RESULTS:"
cat "$TESSERA_BENCH_RESULTS"
