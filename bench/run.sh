#!/usr/bin/env bash
# kv's throughput and latency per workload, under KV_SYNC=full and KV_SYNC=normal, each next to a
# bare tiny_http server (examples/bare.rs) driven by the same wrk script in the same run.
# Usage: bench/run.sh            (about 6 minutes; DURATION=2 bench/run.sh is a quick smoke run)
# Settings (environment): DURATION seconds per measured run (8), CONNECTIONS (32), KEYS per value
# size (10000), MIN_DELETE_KEYS (200000), KV_WORKERS (kv's default; the bare server gets the same
# number, default 2 per CPU like kv), WARMUP seconds of unmeasured GETs after each prepopulation
# (15), KV_MODES (the sync modes in the order measured: "full normal"), SKIP_BUILD=1, KEEP_DATA=1.
# Writes bench/results/latest.md (and latest-raw.txt).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COMMAND=$(command_line DURATION CONNECTIONS KEYS MIN_DELETE_KEYS WARMUP KV_MODES KV_WORKERS KV_BINARY SKIP_BUILD KEEP_DATA)
# The bare server gets as many workers as kv: KV_WORKERS, else kv's default of 2 per CPU.
BARE_WORKERS=${KV_WORKERS:-$((2 * $(nproc)))}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-32}
KEYS=${KEYS:-10000}
MIN_DELETE_KEYS=${MIN_DELETE_KEYS:-200000}
WARMUP=${WARMUP:-15}
KV_MODES=${KV_MODES:-full normal}
[[ $(tr ' ' '\n' <<<"$KV_MODES" | sort | xargs) == "full normal" ]] || die "KV_MODES must name full and normal once each, in the order to measure them"
OTHER_CPU_WARN=10 # % of the machine used by other processes during a run that earns a note
LIST_OBJECTS=100

# name | what | wrk script | its settings | path (for runs without a script) | bare body class
WORKLOADS=(
	"health|GET /health|-||/health|small"
	"put100|PUT 100 B value|put.lua|PREFIX=k VALUE_BYTES=100|/|small"
	"get100|GET 100 B value|get.lua|PREFIX=k|/|get100"
	"mixed|70% GET / 30% PUT, 100 B|mixed.lua|PREFIX=k VALUE_BYTES=100 GET_PERCENT=70|/|small"
	"put4k|PUT 4 KiB value|put.lua|PREFIX=m VALUE_BYTES=4096|/|small"
	"get4k|GET 4 KiB value|get.lua|PREFIX=m|/|get4k"
	"put64k|PUT 64 KiB value|put.lua|PREFIX=l VALUE_BYTES=65536|/|small"
	"get64k|GET 64 KiB value|get.lua|PREFIX=l|/|get64k"
	"list100|LIST 100 objects of 100 B|-||/objects?collection=list100|list"
	"delete|DELETE an existing key|delete.lua|PREFIX=d|/|small"
)
BARE_CLASSES=(small get100 get4k get64k list)

need wrk
need curl
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kv-bench.XXXXXX")
mkdir -p "$RESULTS" "$WORK/raw"
RAW=$WORK/raw
RESULT_ROWS=$WORK/results.tsv # target workload rps p50 p99 requests non2xx socket_errors server% wrk% other% server_us
: >"$RESULT_ROWS"
NOTES=$WORK/notes.md
: >"$NOTES"

HEADER=$WORK/header.md
{
	echo "# kv benchmark: bench/run.sh"
	echo
	echo "- command: \`$COMMAND\`"
	echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
	describe_machine
	echo "- every run: \`wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency\` (keep-alive), one client thread sharing the CPUs with the server"
	echo "- kv: fresh data dir per sync mode, KV_WORKERS=${KV_WORKERS:-default}; bare: examples/bare.rs, WORKERS=$BARE_WORKERS"
} >"$HEADER"
cat "$HEADER"
echo

build

# workload_field NAME FIELD(1-based): one field of a WORKLOADS entry.
workload_field() {
	local w
	for w in "${WORKLOADS[@]}"; do
		[[ ${w%%|*} == "$1" ]] && { echo "$w" | cut -d'|' -f"$2"; return; }
	done
}

# measure TARGET NAME PORT PID [ENV=…]…: runs one workload against a server and records the row.
measure() {
	local target=$1 name=$2 port=$3 pid=$4 script settings path out
	shift 4
	script=$(workload_field "$name" 3)
	settings=$(workload_field "$name" 4)
	path=$(workload_field "$name" 5)
	out=$RAW/$target-$name.txt
	# shellcheck disable=SC2086 # settings are space-separated ENV=value words
	run_wrk "$out" "http://127.0.0.1:$port$path" "$script" "$pid" KEYS="$KEYS" $settings "$@"
	read -r rps p50 p99 requests bad errors < <(parse_wrk "$out")
	read -r server_cpu wrk_cpu other_cpu server_us <"$out.cpu"
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$name" "$rps" "$p50" "$p99" \
		"$requests" "$bad" "$errors" "$server_cpu" "$wrk_cpu" "$other_cpu" "$server_us" >>"$RESULT_ROWS"
	log "$target $name: $rps req/s, p50 $p50 ms, p99 $p99 ms, $bad non-2xx, $errors socket errors;" \
		"CPU: server $server_cpu%, wrk $wrk_cpu%, other processes $other_cpu% of the machine"
	if ((bad || errors)); then
		echo "- $target $name: $bad non-2xx responses, $errors socket errors (of $requests requests)" >>"$NOTES"
	fi
}

# warm_up URL: WARMUP seconds of unmeasured GETs. Without it the first few workloads measured after
# the first prepopulation of the run ran 10 to 40 % slower than the same code measured later (the
# first sync mode measured lost to the second whichever it was); the cause is not known.
warm_up() {
	((WARMUP > 0)) || return 0
	env KEYS="$KEYS" PREFIX=k wrk -t1 "-c$CONNECTIONS" "-d${WARMUP}s" -s "$BENCH/get.lua" "$1" >/dev/null 2>&1 ||
		die "the warm-up run failed"
}

# body_bytes URL [curl args…]: size of the response body.
body_bytes() {
	local url=$1
	shift
	curl -s -o /dev/null -w '%{size_download}' "$@" "$url"
}

declare -A BARE_BYTES
for mode in $KV_MODES; do
	dir=$WORK/kv-$mode
	log "kv KV_SYNC=$mode: starting on a fresh data dir"
	start_server KV "$RAW/kv-$mode.log" PORT=0 DB_PATH="$dir" KV_SYNC="$mode" RUST_LOG=info -- "$KV_BIN"
	base=http://127.0.0.1:$KV_PORT/
	t100=$(fill "$base" k "$KEYS" 100)
	t4k=$(fill "$base" m "$KEYS" 4096)
	t64k=$(fill "$base" l "$KEYS" 65536)
	tlist=$(fill "$base" k "$LIST_OBJECTS" 100 list100)
	log "prepopulated $KEYS keys each of 100 B (${t100} s), 4 KiB (${t4k} s), 64 KiB (${t64k} s), list100 (${tlist} s)"
	warm_up "$base"
	echo "- kv $mode prepopulation through the API: $KEYS keys each of 100 B (k*, ${t100} s), 4 KiB (m*, ${t4k} s), 64 KiB (l*, ${t64k} s); $LIST_OBJECTS objects in collection list100 (${tlist} s)" >>"$NOTES"

	if [[ -z ${BARE_BYTES[small]:-} ]]; then
		# The bare server answers each workload with a body as large as kv's answer to it.
		BARE_BYTES[small]=$(body_bytes "${base}objects" -X PUT -d '{"key":"k0","value":"'"$(printf 'x%.0s' $(seq 98))"'"}')
		BARE_BYTES[get100]=$(body_bytes "${base}objects/k1")
		BARE_BYTES[get4k]=$(body_bytes "${base}objects/m1")
		BARE_BYTES[get64k]=$(body_bytes "${base}objects/l1")
		BARE_BYTES[list]=$(body_bytes "${base}objects?collection=list100")
		echo "- kv response bodies (the bare server's body for the same rows): PUT/DELETE ${BARE_BYTES[small]} B (health is $(body_bytes "${base}health") B), GET 100 B value ${BARE_BYTES[get100]} B, GET 4 KiB ${BARE_BYTES[get4k]} B, GET 64 KiB ${BARE_BYTES[get64k]} B, LIST 100 ${BARE_BYTES[list]} B" >>"$NOTES"
	fi

	for w in "${WORKLOADS[@]}"; do
		name=${w%%|*}
		if [[ $name == delete ]]; then
			# No request is answered faster than /health, so 1.2 x its rate gives every DELETE a key.
			health_rps=$(awk -v t="$mode" '$1 == t && $2 == "health" {print $3}' "$RESULT_ROWS")
			delete_keys=$((health_rps * DURATION * 6 / 5))
			((delete_keys > MIN_DELETE_KEYS)) || delete_keys=$MIN_DELETE_KEYS
			td=$(fill "$base" d "$delete_keys" 100)
			log "prepopulated $delete_keys keys d* for DELETE (${td} s)"
			measure "$mode" delete "$KV_PORT" "$KV_PID" KEYS="$delete_keys"
			counts=$(grep -o 'delete: status .*' "$RAW/$mode-delete.txt" || echo "delete: no status counts")
			echo "- kv $mode DELETE: $delete_keys keys d* prepopulated through the API (${td} s); $counts" >>"$NOTES"
		else
			measure "$mode" "$name" "$KV_PORT" "$KV_PID"
		fi
		kill -0 "$KV_PID" 2>/dev/null || { tail -20 "$RAW/kv-$mode.log" >&2; die "kv ($mode) died during $name"; }
	done
	stop_server "$KV_PID"
done

for class in "${BARE_CLASSES[@]}"; do
	log "bare server, ${BARE_BYTES[$class]} B body"
	start_server BARE "$RAW/bare-$class.log" PORT=0 WORKERS="$BARE_WORKERS" BODY_BYTES="${BARE_BYTES[$class]}" -- "$BARE_BIN"
	for w in "${WORKLOADS[@]}"; do
		# shellcheck disable=SC2153 # BARE_PID and BARE_PORT are set by start_server
		if [[ ${w##*|} == "$class" ]]; then measure bare "${w%%|*}" "$BARE_PORT" "$BARE_PID"; fi
	done
	stop_server "$BARE_PID" 143
done

# The table: one row per workload; each kv column next to the bare server's numbers for it.
TABLE=$WORK/table.md
{
	echo "| workload | bare body B | bare req/s | bare p50 / p99 ms | bare µs/req | full req/s | full p50 / p99 ms | full µs/req | full / bare | normal req/s | normal p50 / p99 ms | normal µs/req | normal / bare |"
	echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
	for w in "${WORKLOADS[@]}"; do
		IFS='|' read -r name what _ _ _ class <<<"$w"
		awk -F'\t' -v name="$name" -v what="$what" -v bytes="${BARE_BYTES[$class]}" -v warn="$OTHER_CPU_WARN" '
			$2 == name {
				rps[$1] = $3; lat[$1] = sprintf("%.2f / %.2f", $4, $5); us[$1] = $12
				shown[$1] = $3 ($11 >= warn ? "*" : "")
			}
			function ratio(t) { return rps["bare"] > 0 ? sprintf("%.2f", rps[t] / rps["bare"]) : "-" }
			END {
				printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", what, bytes,
					shown["bare"], lat["bare"], us["bare"], shown["full"], lat["full"], us["full"], ratio("full"),
					shown["normal"], lat["normal"], us["normal"], ratio("normal")
			}' "$RESULT_ROWS"
	done
} >"$TABLE"

REPORT=$WORK/report.md
{
	cat "$HEADER"
	echo
	cat "$TABLE"
	echo
	echo "µs/req is the server's CPU time (user + system from /proc/PID/stat) over the run divided by the requests it answered. Ratios are kv's req/s over the bare tiny_http server's for the same wrk script in this run (bare answers every request with a fixed body of the size shown, after reading the request body). Latencies are wrk's 50th and 99th percentiles. * marks a run during which other processes used at least $OTHER_CPU_WARN% of the machine's CPU (see the notes)."
	echo
	cat "$NOTES"
	awk -F'\t' -v warn="$OTHER_CPU_WARN" '
		$11 >= warn { list = list sprintf("%s%s %s %d%%", list ? ", " : "", $1, $2, $11) }
		$11 > max { max = $11 }
		END {
			printf "- CPU used by other processes during a run: at most %d%% of the machine", max
			print list ? "; the runs marked * (other processes'"'"' share): " list : ""
		}' "$RESULT_ROWS"
	echo "- total time: $(($(date +%s) - STARTED_AT)) s"
} >"$REPORT"
tail -n +"$(($(wc -l <"$HEADER") + 1))" "$REPORT"
cp "$REPORT" "$RESULTS/latest.md"
for f in "$RAW"/*.txt; do
	printf '==> %s <==\n' "$(basename "$f")"
	cat "$f"
done >"$RESULTS/latest-raw.txt"
log "wrote $RESULTS/latest.md and latest-raw.txt"
