#!/usr/bin/env bash
# run.sh [--demo]: everything `make run` needs on a fresh machine, then the
# grid. It installs ClickHouse when missing (as root; otherwise it says the
# one command to run), starts a project-local server under var/clickhouse,
# and runs bin/tessera run. A ClickHouse it started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

ch_dir=var/clickhouse
ch_port="${TESSERA_CLICKHOUSE_PORT:-19000}"

scripts/clickhouse.sh ensure >/dev/null
started=0
if ! (exec 3<>"/dev/tcp/127.0.0.1/$ch_port") 2>/dev/null; then
	scripts/clickhouse.sh start "$ch_dir" "$ch_port" >/dev/null
	started=1
fi
stop_clickhouse() {
	if [[ $started == 1 ]]; then
		scripts/clickhouse.sh stop "$ch_dir" >/dev/null 2>&1 || true
	fi
}
trap stop_clickhouse EXIT
echo "ClickHouse on 127.0.0.1:$ch_port (data in $ch_dir)"

export TESSERA_SETTLEMENT_CLICKHOUSE_ADDR="${TESSERA_SETTLEMENT_CLICKHOUSE_ADDR:-127.0.0.1:$ch_port}"
bin/tessera run "$@"
