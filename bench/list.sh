#!/usr/bin/env bash
# Memory of whole lists: for each N in LIST_COUNTS, bulk-load N objects of 100 B into one
# collection, then GET /objects?collection=big once and then four times at once, sampling kv's
# VmRSS (file-backed pages included) every 10 ms; reports the peak above the RSS just before.
# Usage: bench/list.sh                     (1M objects; about a minute)
#        LIST_COUNTS="1000000 10000000" bench/list.sh   (adds a 10M-object list, ~1.2 GB each)
# Settings (environment): LIST_COUNTS ("1000000"), SKIP_BUILD=1, KEEP_DATA=1.
# Writes bench/results/list.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COMMAND=$(command_line LIST_COUNTS SKIP_BUILD KEEP_DATA)
LIST_COUNTS=${LIST_COUNTS:-1000000}
VALUE_BYTES=100
LOAD_CHUNK_ROWS=1000000
need curl
need sqlite3
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kv-list.XXXXXX")
mkdir -p "$RESULTS"
REPORT=$WORK/report.md
{
	echo "# kv whole-list memory: bench/list.sh"
	echo
	echo "- command: \`$COMMAND\`"
	echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
	describe_machine
	echo "- objects: keys k0 … k(N-1) in collection \`big\`, values JSON strings of $VALUE_BYTES B, bulk-loaded with sqlite3; lists read by curl as fast as it can"
	echo
	echo "| objects | body MiB | one list: s | RSS before MiB | peak, one list MiB (+) | peak, four at once MiB (+) |"
	echo "|--:|--:|--:|--:|--:|--:|"
} >"$REPORT"
build




for n in $LIST_COUNTS; do
	dir=$WORK/n$n
	start_server KV "$WORK/kv-$n-schema.log" PORT=0 DB_PATH="$dir" RUST_LOG=info -- "$KV_BIN"
	stop_server "$KV_PID"
	log "N=$n: bulk-loading"
	load_sql "$n" big | sqlite3 -bail "$dir/kv.sqlite3" >/dev/null
	start_server KV "$WORK/kv-$n.log" PORT=0 DB_PATH="$dir" RUST_LOG=info -- "$KV_BIN"
	url="http://127.0.0.1:$KV_PORT/objects?collection=big"
	count=$(curl -s "$url&limit=1" -o /dev/null -w '%{http_code}')
	[[ $count == 200 ]] || die "kv does not list"
	sleep 1
	before=$(rss_kib "$KV_PID")
	t0=$(date +%s%N)
	one=$(peak_while "$KV_PID" curl -s -o "$WORK/list.json" "$url")
	secs=$(awk -v t0="$t0" -v t1="$(date +%s%N)" 'BEGIN {printf "%.2f", (t1 - t0) / 1e9}')
	bytes=$(stat -c %s "$WORK/list.json")
	listed=$(head -c 100 "$WORK/list.json" | grep -o '"count":[0-9]*' | cut -d: -f2)
	[[ $listed == "$n" ]] || die "the list says count $listed, expected $n"
	rm -f "$WORK/list.json"
	four=$(peak_while "$KV_PID" bash -c "for i in 1 2 3 4; do curl -s -o /dev/null '$url' & done; wait")
	log "N=$n: RSS before $(kib_to_mib "$before") MiB, one list peak $(kib_to_mib "$one") MiB, four at once $(kib_to_mib "$four") MiB, $secs s"
	printf '| %s | %s | %s | %s | %s (+%s) | %s (+%s) |\n' "$n" "$(kib_to_mib $((bytes / 1024)))" "$secs" "$(kib_to_mib "$before")" \
		"$(kib_to_mib "$one")" "$(kib_to_mib $((one - before)))" "$(kib_to_mib "$four")" "$(kib_to_mib $((four - before)))" >>"$REPORT"
	stop_server "$KV_PID"
	[[ ${KEEP_DATA:-0} == 1 ]] || rm -rf "$dir"
done
echo >>"$REPORT"
echo "- total time: $(($(date +%s) - STARTED_AT)) s" >>"$REPORT"
cat "$REPORT"
cp "$REPORT" "$RESULTS/list.md"
