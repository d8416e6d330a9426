#!/usr/bin/env bash
# fuzz.sh: run every fuzz target in the tree (all modules) for FUZZTIME each.
#
#   scripts/fuzz.sh            every target
#   scripts/fuzz.sh Frame      the targets whose name matches a pattern
#
# FUZZTIME (default 30s) is go test's -fuzztime; FUZZPARALLEL, when set, its
# -parallel (workers per target; default GOMAXPROCS). A failing input is
# saved by go test under the package's testdata/fuzz/<Target>/: fix the
# code and commit the input, which then runs in every `go test` as a
# regression case. Exits non-zero when any target fails.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZTIME=${FUZZTIME:-30s}
pattern=${1:-.}
modules=(pkg schemas services/registry services/planner services/router services/executor services/settlement .)

failed=()
summary=()
for m in "${modules[@]}"; do
	[[ -f "$m/go.mod" ]] || continue
	# Packages of this module only (nested modules are listed on their own).
	while read -r dir; do
		rel=".${dir#"$(cd "$m" && pwd)"}"
		label=$(realpath --relative-to=. "$m/$rel")
		for name in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
			[[ "$name" =~ $pattern ]] || continue
			echo "== $label $name ($FUZZTIME)"
			start=$(date +%s)
			if (cd "$m" && go test -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" ${FUZZPARALLEL:+-parallel "$FUZZPARALLEL"} "$rel"); then
				status=ok
			else
				status=FAIL
				failed+=("$label $name")
			fi
			summary+=("$(printf '%-5s %4ss  %s %s' "$status" "$(($(date +%s) - start))" "$label" "$name")")
		done
	done < <(cd "$m" && go list -f '{{.Dir}}' ./...)
done

echo
echo "== fuzz summary (FUZZTIME=$FUZZTIME)"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]} > 0)); then
	echo "failed: ${failed[*]}" >&2
	exit 1
fi
