#!/usr/bin/env bash
# Selective activation on stories260K (part of `make bench`, scripts/bench.sh):
# each FFN split into 4 neuron groups, k = 1..4 active per token. Records
# selective_k{1,2,3}_agreement, selective_k2_ffn_flops_saved,
# selective_k2_messages_per_token and dense_messages_per_token in
# bench/results.json (TESSERA_BENCH_RESULTS) and rewrites the table in
# BENCHMARKS.md between its table markers.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export TESSERA_BENCH_RESULTS=${TESSERA_BENCH_RESULTS:-$root/bench/results.json}
mkdir -p "$root/bench/out" "$(dirname "$TESSERA_BENCH_RESULTS")"
table=$root/bench/out/selective-table.md
export TESSERA_SELECTIVE_TABLE=$table
(cd "$root/pkg" && go test ./compute/ -run '^$' -bench '^BenchmarkSelective$' -benchtime 1x -count 1 -timeout 90m)
doc=$root/BENCHMARKS.md
awk -v t="$table" '
	/<!-- table start -->/ { print; while ((getline line < t) > 0) print line; skip = 1; next }
	/<!-- table end -->/ { skip = 0 }
	!skip { print }
' "$doc" > "$doc.tmp" && mv "$doc.tmp" "$doc"
