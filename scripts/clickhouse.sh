#!/usr/bin/env bash
# clickhouse.sh: a project-local ClickHouse server for development and tests.
#
#   scripts/clickhouse.sh ensure                       install clickhouse-server if it is missing
#   scripts/clickhouse.sh start DIR PORT [HTTP_PORT]   start a server with its data in DIR
#   scripts/clickhouse.sh stop DIR                     stop the server started in DIR
#   scripts/clickhouse.sh config DIR PORT HTTP_PORT    only write DIR/config.xml and DIR/users.xml
#   scripts/clickhouse.sh binary                       print the server command (one line)
#
# The server listens on 127.0.0.1 only: native protocol on PORT, HTTP on
# HTTP_PORT (default: the first free port above PORT). Everything it writes
# (data, logs, temporary files, pid) stays under DIR, never under
# /var/lib/clickhouse, so several servers can run side by side, as any user.
# The configuration is written for Debian's clickhouse-server 18.16 and is
# accepted by current releases as well.
set -euo pipefail

die() {
	echo "clickhouse.sh: $*" >&2
	exit 1
}

# server_cmd prints the command that runs the server: Debian ships
# clickhouse-server in /usr/sbin (not on a normal user's PATH); current
# releases ship one `clickhouse` binary with a `server` subcommand.
server_cmd() {
	local p
	for p in "$(command -v clickhouse-server || true)" /usr/sbin/clickhouse-server /usr/bin/clickhouse-server; do
		if [[ -n "$p" && -x "$p" ]]; then
			echo "$p"
			return 0
		fi
	done
	p="$(command -v clickhouse || true)"
	if [[ -n "$p" && -x "$p" ]]; then
		echo "$p server"
		return 0
	fi
	return 1
}

cmd_ensure() {
	if server_cmd >/dev/null; then
		echo "clickhouse-server: $(server_cmd)"
		return 0
	fi
	local install="apt-get install -y clickhouse-server clickhouse-client"
	if [[ "$(id -u)" != 0 ]]; then
		echo "clickhouse-server is not installed; run as root:" >&2
		echo "  apt-get update && DEBIAN_FRONTEND=noninteractive $install" >&2
		exit 1
	fi
	command -v apt-get >/dev/null || die "clickhouse-server is not installed and apt-get is not available"
	export DEBIAN_FRONTEND=noninteractive
	# A fresh image has no package lists; update them when the install
	# cannot find the package.
	if ! $install; then
		apt-get update
		$install
	fi
	server_cmd >/dev/null || die "clickhouse-server still missing after apt-get install"
	echo "clickhouse-server: $(server_cmd)"
}

port_in_use() {
	# A successful connect means something listens there.
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

check_port() {
	[[ "$1" =~ ^[0-9]+$ ]] && (("$1" > 0 && "$1" < 65536)) || die "invalid port '$1'"
}

cmd_config() {
	local dir="$1" port="$2" http="$3"
	check_port "$port"
	check_port "$http"
	[[ "$port" != "$http" ]] || die "native and HTTP port must differ"
	mkdir -p "$dir"
	dir="$(cd "$dir" && pwd)"
	mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$dir/log"
	cat >"$dir/config.xml" <<EOF
<?xml version="1.0"?>
<!-- Written by scripts/clickhouse.sh: a project-local server; everything stays in this directory. -->
<yandex>
    <logger>
        <level>warning</level>
        <log>$dir/log/server.log</log>
        <errorlog>$dir/log/error.log</errorlog>
        <size>10M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <tcp_port>$port</tcp_port>
    <http_port>$http</http_port>
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <format_schema_path>$dir/format_schemas/</format_schema_path>
    <users_config>$dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <max_concurrent_queries>100</max_concurrent_queries>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
EOF
	cat >"$dir/users.xml" <<'EOF'
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
EOF
}

# ping asks the HTTP interface for /ping; the server answers "Ok.".
ping() {
	local reply
	reply="$( (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET /ping HTTP/1.0\r\n\r\n' >&3 && cat <&3) 2>/dev/null || true)"
	[[ "$reply" == *"Ok."* ]]
}

pid_alive() {
	[[ -f "$1/clickhouse.pid" ]] && kill -0 "$(cat "$1/clickhouse.pid")" 2>/dev/null
}

cmd_start() {
	local dir="$1" port="$2" http="${3:-}"
	check_port "$port"
	local server
	server="$(server_cmd)" || die "clickhouse-server not found; run: scripts/clickhouse.sh ensure"
	mkdir -p "$dir"
	dir="$(cd "$dir" && pwd)"
	if pid_alive "$dir"; then
		die "a server already runs in $dir (pid $(cat "$dir/clickhouse.pid")); stop it first"
	fi
	port_in_use "$port" && die "port $port is in use"
	if [[ -z "$http" ]]; then
		http=$((port + 1))
		while port_in_use "$http"; do http=$((http + 1)); done
	fi
	cmd_config "$dir" "$port" "$http"
	# setsid: the server outlives this script and ignores the caller's
	# terminal signals; stop it with `stop DIR`.
	# shellcheck disable=SC2086 # $server may be "clickhouse server"
	setsid $server --config-file="$dir/config.xml" >"$dir/log/stdout.log" 2>&1 </dev/null &
	local pid=$!
	echo "$pid" >"$dir/clickhouse.pid"
	echo "$port $http" >"$dir/ports"
	local i
	for ((i = 0; i < 300; i++)); do
		if ping "$http"; then
			echo "pid=$pid port=$port http_port=$http dir=$dir"
			return 0
		fi
		if ! kill -0 "$pid" 2>/dev/null; then
			tail -n 20 "$dir/log/error.log" "$dir/log/stdout.log" >&2 2>/dev/null || true
			rm -f "$dir/clickhouse.pid"
			die "server exited during start (logs in $dir/log)"
		fi
		sleep 0.1
	done
	kill "$pid" 2>/dev/null || true
	rm -f "$dir/clickhouse.pid"
	die "server did not answer on port $http within 30s (logs in $dir/log)"
}

cmd_stop() {
	local dir="$1"
	[[ -f "$dir/clickhouse.pid" ]] || {
		echo "no server in $dir"
		return 0
	}
	local pid i
	pid="$(cat "$dir/clickhouse.pid")"
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid"
		for ((i = 0; i < 150; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			kill -KILL "$pid"
		fi
	fi
	rm -f "$dir/clickhouse.pid"
	echo "stopped pid=$pid"
}

usage() {
	sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

case "${1:-}" in
ensure) cmd_ensure ;;
start)
	(($# >= 3 && $# <= 4)) || usage
	cmd_start "$2" "$3" "${4:-}"
	;;
stop)
	(($# == 2)) || usage
	cmd_stop "$2"
	;;
config)
	(($# == 4)) || usage
	cmd_config "$2" "$3" "$4"
	;;
binary) server_cmd || die "clickhouse-server not found; run: scripts/clickhouse.sh ensure" ;;
*) usage ;;
esac
