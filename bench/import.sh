#!/usr/bin/env bash
# Export and import at scale: POST /import of IMPORT_COUNT objects (100 B values, one NDJSON file
# made here), then GET /export of them, each timed, with kv's peak VmRSS sampled every 10 ms.
# Usage: bench/import.sh          (1M objects; about a minute)
# Settings (environment): IMPORT_COUNT (1000000), SKIP_BUILD=1, KEEP_DATA=1.
# Writes bench/results/import.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COMMAND=$(command_line IMPORT_COUNT SKIP_BUILD KEEP_DATA)
IMPORT_COUNT=${IMPORT_COUNT:-1000000}
need curl
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kv-import.XXXXXX")
mkdir -p "$RESULTS"
build

seconds_since() { awk -v t0="$1" -v t1="$(date +%s%N)" 'BEGIN {printf "%.2f", (t1 - t0) / 1e9}'; }

log "writing $IMPORT_COUNT lines"
awk -v n="$IMPORT_COUNT" 'BEGIN {
	v = sprintf("%098d", 0)
	for (i = 0; i < n; i++) printf "{\"collection\":\"big\",\"key\":\"k%d\",\"value\":\"%s\"}\n", i, v
}' >"$WORK/import.ndjson"
bytes=$(stat -c %s "$WORK/import.ndjson")

start_server KV "$WORK/kv.log" PORT=0 DB_PATH="$WORK/data" RUST_LOG=info -- "$KV_BIN"
base="http://127.0.0.1:$KV_PORT"
before=$(rss_kib "$KV_PID")
t0=$(date +%s%N)
import_peak=$(peak_while "$KV_PID" curl -sf -o "$WORK/import.out" --data-binary @"$WORK/import.ndjson" "$base/import")
import_s=$(seconds_since "$t0")
grep -q "\"imported\":$IMPORT_COUNT" "$WORK/import.out" || die "import answered $(cat "$WORK/import.out")"
t0=$(date +%s%N)
export_peak=$(peak_while "$KV_PID" curl -sf -o "$WORK/export.ndjson" "$base/export")
export_s=$(seconds_since "$t0")
lines=$(wc -l <"$WORK/export.ndjson")
[[ $lines == "$IMPORT_COUNT" ]] || die "export has $lines lines"
stop_server "$KV_PID"
rate() { awk -v n="$IMPORT_COUNT" -v s="$1" 'BEGIN {printf "%.0f", n / s}'; }
{
	echo "# kv export and import: bench/import.sh"
	echo
	echo "- command: \`$COMMAND\`"
	echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
	describe_machine
	echo "- $IMPORT_COUNT objects of 100 B in one collection, $(kib_to_mib $((bytes / 1024))) MiB of NDJSON; KV_SYNC=full; RSS before: $(kib_to_mib "$before") MiB"
	echo
	echo "| step | seconds | objects/s | peak RSS MiB (+ over before) |"
	echo "|---|--:|--:|--:|"
	echo "| POST /import (one transaction) | $import_s | $(rate "$import_s") | $(kib_to_mib "$import_peak") (+$(kib_to_mib $((import_peak - before)))) |"
	echo "| GET /export (one snapshot, streamed) | $export_s | $(rate "$export_s") | $(kib_to_mib "$export_peak") (+$(kib_to_mib $((export_peak - before)))) |"
} >"$WORK/report.md"
cat "$WORK/report.md"
cp "$WORK/report.md" "$RESULTS/import.md"
