#!/usr/bin/env bash
# Where kv's CPU goes, by thread: for each workload, one wrk run against kv (KV_SYNC=full) with the
# CPU time (utime + stime from /proc/PID/task/*/stat) of each kind of thread (named kv-conn,
# kv-writer, kv-checkpoint, …) sampled 1 s into the run and 1 s before its end, divided by the
# requests kv answered between the two samples (from its /metrics).
# Usage: bench/threads.sh                  (about 40 s)
# Settings (environment): WORKLOADS ("put100 get100 mixed"; also "delete"), DURATION (8),
# CONNECTIONS (32), KEYS (10000), DELETE_KEYS (740000, prepopulated as d* when "delete" is asked
# for), KV_BINARY, SKIP_BUILD=1, KEEP_DATA=1. Prints a markdown table; writes no file.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WORKLOADS=${WORKLOADS:-put100 get100 mixed}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-32}
KEYS=${KEYS:-10000}
# About what bench/run.sh prepopulates on this machine, so the two measure DELETE on a table of the
# same size.
DELETE_KEYS=${DELETE_KEYS:-740000}
((DURATION >= 4)) || die "DURATION must be at least 4 s (1 s is left out at each end)"
need wrk
need curl
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kv-threads.XXXXXX")
build

# thread_ticks PID: "NAME TICKS" per thread name, summed over the threads of that name.
thread_ticks() {
	local task
	for task in /proc/"$1"/task/*; do
		printf '%s %s\n' "$(cat "$task/comm" 2>/dev/null)" "$(awk '{print $14 + $15}' "$task/stat" 2>/dev/null || echo 0)"
	done | awk 'NF == 2 {ticks[$1] += $2} END {for (name in ticks) print name, ticks[name]}' | sort
}
# answered PORT: requests kv has counted (every route and status).
answered() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^kv_http_requests_total/ {n += $2} END {print n + 0}'; }

start_server KV "$WORK/kv.log" PORT=0 DB_PATH="$WORK/data" KV_SYNC=full RUST_LOG=info -- "$KV_BIN"
log "prepopulating $KEYS keys of 100 B: $(fill "http://127.0.0.1:$KV_PORT/" k "$KEYS" 100) s"
if [[ " $WORKLOADS " == *" delete "* ]]; then
	log "prepopulating $DELETE_KEYS keys d* for DELETE: $(fill "http://127.0.0.1:$KV_PORT/" d "$DELETE_KEYS" 100) s"
fi
HZ=$(getconf CLK_TCK)
echo "| workload | requests measured | thread | µs/request |"
echo "|---|--:|---|--:|"
for workload in $WORKLOADS; do
	case $workload in
	put100) script=put.lua ;;
	get100) script=get.lua ;;
	mixed) script=mixed.lua ;;
	delete) script=delete.lua ;;
	*) die "unknown workload $workload (put100, get100, mixed, delete)" ;;
	esac
	prefix=k keys=$KEYS
	[[ $workload != delete ]] || prefix=d keys=$DELETE_KEYS
	env PREFIX="$prefix" KEYS="$keys" VALUE_BYTES=100 GET_PERCENT=70 \
		wrk -t1 "-c$CONNECTIONS" "-d${DURATION}s" -s "$BENCH/$script" "http://127.0.0.1:$KV_PORT/" >"$WORK/wrk-$workload.txt" &
	wrk_pid=$!
	sleep 1
	thread_ticks "$KV_PID" >"$WORK/before"
	before=$(answered "$KV_PORT")
	sleep $((DURATION - 2))
	thread_ticks "$KV_PID" >"$WORK/after"
	after=$(answered "$KV_PORT")
	wait "$wrk_pid"
	join "$WORK/before" "$WORK/after" | awk -v w="$workload" -v n=$((after - before)) -v hz="$HZ" '
		{ d = $3 - $2; total += d; if (d > 0) printf "| %s | %d | %s | %.1f |\n", w, n, $1, d * 1e6 / hz / n }
		END { printf "| %s | %d | **all** | %.1f |\n", w, n, total * 1e6 / hz / n }'
done
