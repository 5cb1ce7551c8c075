#!/usr/bin/env bash
# kv with many objects: for each N in SCALE_COUNTS (and 10,000 for comparison), bulk-load N objects
# of 100 B into a fresh database with the sqlite3 CLI, then measure kv's start-up time, memory, GET
# and PUT throughput over random keys of the whole keyspace, and the database size on disk.
# Usage: bench/scale.sh                  (1M and 10M objects; about 2 minutes here)
#        SCALE_COUNTS=100000 bench/scale.sh   (smoke run)
# Settings (environment): SCALE_COUNTS ("1000000 10000000"), BASE_COUNT (10000), DURATION seconds
# per wrk run (8), CONNECTIONS (32), KV_SYNC (full), SKIP_BUILD=1, KEEP_DATA=1.
# Writes bench/results/scale.md (and scale-raw.txt: wrk's and kv's output).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COMMAND=$(command_line SCALE_COUNTS BASE_COUNT DURATION CONNECTIONS KV_SYNC SKIP_BUILD KEEP_DATA)
SCALE_COUNTS=${SCALE_COUNTS:-"1000000 10000000"}
BASE_COUNT=${BASE_COUNT:-10000}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-32}
KV_SYNC=${KV_SYNC:-full}
VALUE_BYTES=100        # each value is a JSON string of this many bytes, quotes included
LOAD_CHUNK_ROWS=1000000 # rows per INSERT statement (all in one transaction), for progress lines
START_TIMEOUT_SECS=120

((BASH_VERSINFO[0] >= 5)) || die "needs bash 5 (EPOCHREALTIME)"
need wrk
need curl
need sqlite3
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kv-scale.XXXXXX")
mkdir -p "$RESULTS" "$WORK/raw"
RAW=$WORK/raw
ROWS=$WORK/rows.tsv
: >"$ROWS"
NOTES=$WORK/notes.md
: >"$NOTES"

HEADER=$WORK/header.md
{
	echo "# kv at scale: bench/scale.sh"
	echo
	echo "- command: \`$COMMAND\`"
	echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
	describe_machine
	echo "- sqlite3 CLI $(sqlite3 --version | awk '{print $1}') for the bulk load; kv KV_SYNC=$KV_SYNC, KV_WORKERS=${KV_WORKERS:-default}"
	echo "- objects: keys k0 … k(N-1) in collection \`default\`, values JSON strings of $VALUE_BYTES B; GET and PUT: \`wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency\` with keys uniformly random over all N (bench/get.lua, bench/put.lua; every PUT overwrites)"
} >"$HEADER"
cat "$HEADER"
echo

build

# start_timed VAR LOG ENV=… … -- COMMAND …: like start_server, but also sets VAR_MS, the
# milliseconds from starting the process to its first 200 from GET /health. It polls about every
# millisecond with bash's own /dev/tcp and EPOCHREALTIME, so polling forks nothing and costs kv
# (which shares the CPUs) next to nothing.
start_timed() {
	local var=$1 logfile=$2 envs=() port="" pid t0 deadline line fd status sleeper
	shift 2
	while [[ $1 != -- ]]; do envs+=("$1"); shift; done
	shift
	exec {sleeper}<> <(:) # never readable: `read -t` on it is a sleep without a fork
	: >"$logfile"
	t0=${EPOCHREALTIME/./}
	env "${envs[@]}" "$@" 2>>"$logfile" >/dev/null &
	pid=$!
	PIDS+=("$pid")
	deadline=$((t0 + START_TIMEOUT_SECS * 1000000))
	while ((${EPOCHREALTIME/./} < deadline)); do
		kill -0 "$pid" 2>/dev/null || break
		if [[ -z $port ]]; then
			while IFS= read -r line; do
				if [[ $line =~ listening\ on\ http://127\.0\.0\.1:([0-9]+) ]]; then
					port=${BASH_REMATCH[1]}
					break
				fi
			done <"$logfile"
		fi
		if [[ -n $port ]] && exec {fd}<>"/dev/tcp/127.0.0.1/$port"; then
			printf 'GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&"$fd"
			read -r -t 1 status <&"$fd" || status=""
			exec {fd}>&-
			if [[ $status == "HTTP/1."[01]" 200"* ]]; then
				printf -v "${var}_MS" %s $(((${EPOCHREALTIME/./} - t0) / 1000))
				printf -v "${var}_PID" %s "$pid"
				printf -v "${var}_PORT" %s "$port"
				exec {sleeper}>&-
				return
			fi
		fi 2>/dev/null
		read -r -t 0.001 -u "$sleeper" || true
	done
	tail -20 "$logfile" >&2
	die "kv did not become healthy within $START_TIMEOUT_SECS s (log above, $logfile)"
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || true; }

# sample_rss PID FILE: appends VmRSS (KiB) every 0.2 s until killed or PID exits.
sample_rss() {
	while kill -0 "$1" 2>/dev/null; do
		rss_kib "$1" >>"$2"
		sleep 0.2
	done
}

# measure_load LABEL N SCRIPT PID PORT: one wrk run with the RSS sampled; sets M_RPS, M_P50, M_P99
# (ms), M_RSS (the largest VmRSS seen, KiB) and M_OTHER (% of the machine other processes used).
measure_load() {
	local label=$1 n=$2 script=$3 pid=$4 port=$5 out=$RAW/$1.txt sampler
	: >"$out.rss"
	sample_rss "$pid" "$out.rss" &
	sampler=$!
	PIDS+=("$sampler")
	run_wrk "$out" "http://127.0.0.1:$port/" "$script" "$pid" PREFIX=k KEYS="$n" VALUE_BYTES="$VALUE_BYTES"
	stop_server "$sampler" 143
	rss_kib "$pid" >>"$out.rss"
	local requests bad errors
	read -r M_RPS M_P50 M_P99 requests bad errors < <(parse_wrk "$out")
	read -r _ _ M_OTHER _ <"$out.cpu" # server% wrk% other% server_us
	M_RSS=$(sort -n "$out.rss" | tail -1)
	if ((bad || errors)); then
		echo "- $label: $bad non-2xx responses, $errors socket errors (of $requests requests)" >>"$NOTES"
	fi
	if ((M_OTHER >= 10)); then
		echo "- $label: other processes used $M_OTHER% of the machine's CPU during the run; its numbers are disturbed" >>"$NOTES"
	fi
}

# Total bytes of the keys k0..k(N-1) and their values.
payload_bytes() {
	awk -v n="$1" -v v="$VALUE_BYTES" 'BEGIN {
		total = n * (1 + v) # "k" and the value
		for (lo = 1; lo <= n; lo *= 10) { hi = lo * 10; total += ((hi < n ? hi : n) - (lo == 1 ? 0 : lo)) * length(lo "") }
		printf "%.0f\n", total
	}'
}

# file_bytes FILE…: their total size; missing files count 0.
file_bytes() {
	local f total=0
	for f in "$@"; do [[ -e $f ]] && total=$((total + $(stat -c %s "$f"))); done
	echo "$total"
}
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }

for n in $BASE_COUNT $SCALE_COUNTS; do
	dir=$WORK/n$n
	db=$dir/kv.sqlite3
	log "N=$n: creating the schema with kv"
	start_server KV "$RAW/kv-$n-schema.log" PORT=0 DB_PATH="$dir" KV_SYNC="$KV_SYNC" RUST_LOG=info -- "$KV_BIN"
	stop_server "$KV_PID"
	tables=$(sqlite3 "$db" "SELECT group_concat(name, ', ') FROM sqlite_schema WHERE type = 'table'")
	triggers=$(sqlite3 "$db" "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger'")
	[[ $n != "$BASE_COUNT" ]] || echo "- schema kv created: tables $tables; $triggers triggers (they run during the bulk load too)" >>"$NOTES"

	log "N=$n: bulk-loading $n objects with sqlite3"
	t0=$(date +%s%N)
	# sqlite3 also prints the pragmas' answers; only the progress lines are logged.
	load_sql "$n" default | sqlite3 -bail "$db" | while IFS= read -r line; do
		if [[ $line == progress:* ]]; then
			case $line in
			*"rows inserted") log "N=$n: ${line#progress: }" ;;
			*) log "N=$n: ${line#progress: } (database and WAL: $(mib "$(file_bytes "$db" "$db-wal")") MiB)" ;;
			esac
		fi
	done || die "the bulk load of $n objects failed"
	load_s=$(awk -v t0="$t0" -v t1="$(date +%s%N)" 'BEGIN {printf "%.1f", (t1 - t0) / 1e9}')
	db_bytes=$(file_bytes "$db" "$db-wal")
	count=$(sqlite3 "$db" "SELECT count(*) FROM kv")
	[[ $count == "$n" ]] || die "loaded $count objects, expected $n"
	if [[ $tables == *collections* ]]; then
		counted=$(sqlite3 "$db" "SELECT count FROM collections WHERE name = 'default'")
		[[ $counted == "$n" ]] || die "collections says $counted objects in default, expected $n"
	fi
	payload=$(payload_bytes "$n")
	log "N=$n: loaded in $load_s s; database $(mib "$db_bytes") MiB for $(mib "$payload") MiB of keys and values"

	start_timed KV "$RAW/kv-$n.log" PORT=0 DB_PATH="$dir" KV_SYNC="$KV_SYNC" RUST_LOG=info -- "$KV_BIN"
	sleep 1
	idle_kib=$(rss_kib "$KV_PID")
	log "N=$n: healthy $KV_MS ms after start; idle RSS $(mib $((idle_kib * 1024))) MiB"
	measure_load "get-$n" "$n" get.lua "$KV_PID" "$KV_PORT"
	get_rps=$M_RPS get_p50=$M_P50 get_p99=$M_P99 get_rss=$M_RSS
	log "N=$n: GET $get_rps req/s (p50 $get_p50 ms, p99 $get_p99 ms), max RSS $(mib $((get_rss * 1024))) MiB, other CPU $M_OTHER%"
	measure_load "put-$n" "$n" put.lua "$KV_PID" "$KV_PORT"
	put_rps=$M_RPS put_p50=$M_P50 put_p99=$M_P99 put_rss=$M_RSS
	log "N=$n: PUT $put_rps req/s (p50 $put_p50 ms, p99 $put_p99 ms), max RSS $(mib $((put_rss * 1024))) MiB, other CPU $M_OTHER%"
	hwm_kib=$(awk '/^VmHWM/ {print $2}' "/proc/$KV_PID/status")
	after_put_bytes=$(file_bytes "$db" "$db-wal")
	t0=$(date +%s%N)
	stop_server "$KV_PID"
	stop_s=$(awk -v t0="$t0" -v t1="$(date +%s%N)" 'BEGIN {printf "%.1f", (t1 - t0) / 1e9}')
	log "N=$n: stopped in $stop_s s"
	printf '%s\n' "$n $load_s $db_bytes $payload $KV_MS $idle_kib $get_rps $get_p50 $get_p99 $put_rps $put_p50 $put_p99 $get_rss $put_rss $hwm_kib $after_put_bytes $stop_s" >>"$ROWS"
	[[ ${KEEP_DATA:-0} == 1 ]] || rm -rf "$dir"
done

TABLE=$WORK/table.md
awk -v base="$BASE_COUNT" '
	function mib(b) { return sprintf("%.1f", b / 1048576) }
	function ratio(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "-" }
	$1 == base { base_get = $7; base_put = $10 }
	{ row[NR] = $0 }
	END {
		print "| objects | load s | DB MiB | keys + values MiB | DB / payload | start to healthy ms | idle RSS MiB | GET req/s | GET p50 / p99 ms | GET vs " base " | PUT req/s | PUT p50 / p99 ms | PUT vs " base " | max RSS under load MiB | DB + WAL after PUTs MiB | stop s |"
		print "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
		for (i = 1; i <= NR; i++) {
			split(row[i], f, " ")
			rss = f[13] > f[14] ? f[13] : f[14]
			printf "| %d | %s | %s | %s | %.2f | %d | %s | %d | %.2f / %.2f | %s | %d | %.2f / %.2f | %s | %s | %s | %s |\n",
				f[1], f[2], mib(f[3]), mib(f[4]), f[3] / f[4], f[5], mib(f[6] * 1024),
				f[7], f[8], f[9], ratio(f[7], base_get), f[10], f[11], f[12], ratio(f[10], base_put),
				mib(rss * 1024), mib(f[16]), f[17]
		}
	}' "$ROWS" >"$TABLE"

REPORT=$WORK/report.md
{
	cat "$HEADER"
	echo
	cat "$TABLE"
	echo
	echo "DB is kv.sqlite3 (+ WAL, empty after the load's checkpoint) right after the bulk load; keys + values is the sum of their bytes. Start to healthy: from starting kv (page cache warm from the load) to its first 200 from /health. RSS from /proc/PID/status (VmRSS) one second after start, and its maximum sampled every 0.2 s during the GET and PUT runs. The GET and PUT columns compare with N = $BASE_COUNT in this same run. Stop: SIGTERM to exit (kv checkpoints the WAL the PUTs left)."
	echo
	cat "$NOTES"
	echo "- total time: $(($(date +%s) - STARTED_AT)) s"
} >"$REPORT"
tail -n +"$(($(wc -l <"$HEADER") + 1))" "$REPORT"
cp "$REPORT" "$RESULTS/scale.md"
for f in "$RAW"/*.txt "$RAW"/*.log; do
	printf '==> %s <==\n' "$(basename "$f")"
	cat "$f"
done >"$RESULTS/scale-raw.txt"
log "wrote $RESULTS/scale.md and scale-raw.txt"
