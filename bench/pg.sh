#!/usr/bin/env bash
# kv on SQLite against kv on PostgreSQL, one node and three nodes on one database: req/s, p50 and
# p99 latency, and server CPU per request, of kv (all its processes) and of PostgreSQL (all its
# processes: backends, WAL writer, checkpointer, …) in separate columns. Durability is comparable:
# SQLite with KV_SYNC=full, PostgreSQL a local throwaway cluster (.ci/postgres start --durable)
# with fsync, synchronous_commit and full_page_writes on.
# Load: one wrk with one thread per node (bench/nodes.lua points each wrk thread at one node), so
# the three nodes share the connections evenly and wrk still reports one latency distribution for
# the cluster. Every configuration gets the same 3 wrk threads, so only the server side differs.
# Usage: bench/pg.sh             (about 4 minutes; DURATION=2 bench/pg.sh is a quick smoke run)
# Settings (environment): DURATION seconds per measured run (8), CONNECTIONS (30, a multiple of 3),
# KEYS per value size (10000), WORKLOADS ("put100 get100 mixed put4k"), SKIP_BUILD=1, KEEP_DATA=1.
# Writes bench/results/pg.md (and pg-raw.txt).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COMMAND=$(command_line DURATION CONNECTIONS KEYS WORKLOADS KV_BINARY SKIP_BUILD KEEP_DATA)
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-30}
KEYS=${KEYS:-10000}
WORKLOADS=${WORKLOADS:-put100 get100 mixed put4k}
NODES=3
WRK_THREADS=$NODES
((CONNECTIONS % NODES == 0)) || die "CONNECTIONS must be a multiple of $NODES (wrk splits them over its threads)"

# name | what | wrk script | its settings
ALL_WORKLOADS=(
	"put100|PUT 100 B value|put.lua|PREFIX=k VALUE_BYTES=100"
	"get100|GET 100 B value|get.lua|PREFIX=k"
	"mixed|70% GET / 30% PUT, 100 B|mixed.lua|PREFIX=k VALUE_BYTES=100 GET_PERCENT=70"
	"put4k|PUT 4 KiB value|put.lua|PREFIX=m VALUE_BYTES=4096"
	"health|GET /health|-|"
)
workload_entry() {
	local w
	for w in "${ALL_WORKLOADS[@]}"; do [[ ${w%%|*} == "$1" ]] && { echo "$w"; return; }; done
	die "unknown workload $1"
}
for name in $WORKLOADS; do workload_entry "$name" >/dev/null; done

need wrk
need curl
need psql postgresql-client
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kv-bench-pg.XXXXXX")
mkdir -p "$RESULTS" "$WORK/raw"
RAW=$WORK/raw
RESULT_ROWS=$WORK/results.tsv # config workload rps p50 p99 requests non2xx socket_errors kv_us pg_us
: >"$RESULT_ROWS"
NOTES=$WORK/notes.md
: >"$NOTES"

build

# The cluster: started here, stopped at exit after the kv processes (lib.sh's cleanup).
PG_DIR=""
stop_postgres() { [[ -z $PG_DIR ]] || "$ROOT/.ci/postgres" stop "$PG_DIR" || true; }
trap 'cleanup; stop_postgres' EXIT
log "starting a durable PostgreSQL cluster"
eval "$("$ROOT/.ci/postgres" start --durable)"
PG_DIR=$KV_TEST_POSTGRES_DIR
PG_URL=$KV_TEST_POSTGRES_URL
unset KV_TEST_POSTGRES_URL KV_TEST_POSTGRES_DIR
POSTMASTER=$(head -1 "$PG_DIR/data/postmaster.pid")
PG_SETTINGS=$(psql "$PG_URL" -Atc "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings
	WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method', 'shared_buffers', 'max_connections')")
PG_VERSION=$(psql "$PG_URL" -Atc "SHOW server_version")

# pg_ticks: CPU ticks of the whole cluster: the postmaster, the children it has reaped (cutime,
# cstime) and those still running (backends, WAL writer, checkpointer, …).
pg_ticks() {
	local total children
	total=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$POSTMASTER/stat")
	children=$(ps -o pid= --ppid "$POSTMASTER" | tr '\n' ' ')
	# shellcheck disable=SC2086 # a list of pids
	echo $((total + $(proc_ticks $children)))
}

HEADER=$WORK/header.md
{
	echo "# kv benchmark: bench/pg.sh"
	echo
	echo "- command: \`$COMMAND\`"
	echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
	describe_machine
	echo "- every run: \`wrk -t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s --latency\` (keep-alive) with bench/nodes.lua: wrk thread i sends to node i, so 3 nodes get $((CONNECTIONS / NODES)) connections each; a single node gets all $CONNECTIONS"
	echo "- SQLite: KV_SYNC=full, fresh data dir. PostgreSQL $PG_VERSION: a local cluster on 127.0.0.1, its data dir on the same disk, $PG_SETTINGS; a fresh database per configuration; kv's default settings"
} >"$HEADER"
cat "$HEADER"
echo

# measure CONFIG NAME "PORT…" "KV_PID…": one workload against one configuration.
measure() {
	local config=$1 name=$2 ports=$3 pids=$4 what script settings out pg0 pg_delta
	IFS='|' read -r _ what script settings <<<"$(workload_entry "$name")"
	out=$RAW/$config-$name.txt
	local path=/
	[[ $script != - ]] || path=/health
	pg0=$(pg_ticks)
	# shellcheck disable=SC2086 # settings are space-separated ENV=value words
	WRK_THREADS=$WRK_THREADS run_wrk "$out" "http://127.0.0.1:${ports%% *}$path" nodes.lua "$pids" \
		WORKLOAD="$script" NODES="${ports// /,}" KEYS="$KEYS" $settings
	pg_delta=$(($(pg_ticks) - pg0))
	read -r rps p50 p99 requests bad errors < <(parse_wrk "$out")
	read -r _ _ _ kv_us <"$out.cpu"
	pg_us=$(awk -v t="$pg_delta" -v hz="$(getconf CLK_TCK)" -v n="$requests" 'BEGIN {printf "%.1f", (n > 0 ? t / hz * 1e6 / n : 0)}')
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$config" "$name" "$rps" "$p50" "$p99" "$requests" \
		"$bad" "$errors" "$kv_us" "$pg_us" >>"$RESULT_ROWS"
	log "$config $name: $rps req/s, p50 $p50 ms, p99 $p99 ms, $bad non-2xx, $errors socket errors;" \
		"CPU per request: kv $kv_us µs, PostgreSQL $pg_us µs"
	if ((bad || errors)); then
		echo "- $config $name: $bad non-2xx responses, $errors socket errors (of $requests requests)" >>"$NOTES"
	fi
}

# run_config CONFIG NODES [ENV=…]…: starts NODES kv processes with the given environment (each
# with a data dir of its own), prepopulates through the first, measures every workload, stops them.
run_config() {
	local config=$1 count=$2 ports="" pids="" i t100 t4k
	shift 2
	for ((i = 0; i < count; i++)); do
		start_server KV "$RAW/kv-$config-$i.log" PORT=0 DB_PATH="$WORK/$config-$i" RUST_LOG=info "$@" -- "$KV_BIN"
		ports+="${ports:+ }$KV_PORT"
		pids+="${pids:+ }$KV_PID"
	done
	t100=$(fill "http://127.0.0.1:${ports%% *}/" k "$KEYS" 100)
	t4k=$(fill "http://127.0.0.1:${ports%% *}/" m "$KEYS" 4096)
	log "$config: prepopulated $KEYS keys of 100 B (${t100} s) and of 4 KiB (${t4k} s) through node 1"
	echo "- $config: prepopulation through the API of node 1: $KEYS keys of 100 B (${t100} s), $KEYS of 4 KiB (${t4k} s)" >>"$NOTES"
	for name in $WORKLOADS; do
		measure "$config" "$name" "$ports" "$pids"
		for pid in $pids; do
			kill -0 "$pid" 2>/dev/null || die "a kv of $config died during $name (logs in $RAW)"
		done
	done
	if ((count > 1)); then
		local port served=""
		for port in $ports; do
			served+="${served:+, }$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^kv_http_requests_total/ {n += $2} END {print n + 0}')"
		done
		echo "- $config: requests served per node over the whole run (kv_http_requests_total): $served" >>"$NOTES"
	fi
	for pid in $pids; do stop_server "$pid"; done
}

# database NAME: creates a database on the cluster and prints its URL.
database() {
	psql "$PG_URL" -qc "CREATE DATABASE $1" >&2
	echo "${PG_URL%/*}/$1"
}

CONFIGS=("sqlite|SQLite (KV_SYNC=full)|1" "pg1|PostgreSQL, 1 node|1" "pg3|PostgreSQL, 3 nodes|3")
log "SQLite, KV_SYNC=full"
run_config sqlite 1 KV_SYNC=full
log "PostgreSQL, 1 node"
run_config pg1 1 KV_DATABASE_URL="$(database kv_bench_pg1)"
log "PostgreSQL, 3 nodes on one database"
run_config pg3 "$NODES" KV_DATABASE_URL="$(database kv_bench_pg3)"

TABLE=$WORK/table.md
{
	echo "| workload | storage | kv nodes | req/s | p50 / p99 ms | kv µs/req | PostgreSQL µs/req | server µs/req |"
	echo "|---|---|--:|--:|--:|--:|--:|--:|"
	for name in $WORKLOADS; do
		IFS='|' read -r _ what _ _ <<<"$(workload_entry "$name")"
		for c in "${CONFIGS[@]}"; do
			IFS='|' read -r config label count <<<"$c"
			awk -F'\t' -v config="$config" -v name="$name" -v what="$what" -v label="$label" -v count="$count" '
				$1 == config && $2 == name {
					pg = config == "sqlite" ? "-" : $10
					printf "| %s | %s | %s | %s | %.2f / %.2f | %s | %s | %.1f |\n", what, label, count, $3, $4, $5, $9, pg, $9 + $10
				}' "$RESULT_ROWS"
		done
	done
} >"$TABLE"

REPORT=$WORK/report.md
{
	cat "$HEADER"
	echo
	cat "$TABLE"
	echo
	echo "kv µs/req is the CPU time (user + system, /proc/PID/stat) of every kv process of the configuration over the run, divided by the requests answered; PostgreSQL µs/req the same for the whole cluster (postmaster, the children it reaped, and those running: backends, WAL writer, checkpointer). server µs/req is their sum: the CPU a request costs the machine, client aside. Latencies are wrk's 50th and 99th percentiles over all nodes. Client, kv and PostgreSQL share the same $(nproc) CPUs, so three nodes compete with each other and with PostgreSQL for them: the 3-node rows show the cost of coordination through the database, not the gain of more machines."
	echo
	cat "$NOTES"
	echo "- total time: $(($(date +%s) - STARTED_AT)) s"
} >"$REPORT"
tail -n +"$(($(wc -l <"$HEADER") + 1))" "$REPORT"
cp "$REPORT" "$RESULTS/pg.md"
for f in "$RAW"/*.txt; do
	printf '==> %s <==\n' "$(basename "$f")"
	cat "$f"
done >"$RESULTS/pg-raw.txt"
log "wrote $RESULTS/pg.md and pg-raw.txt"
