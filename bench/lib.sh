# shellcheck shell=bash disable=SC2034 # RESULTS, KV_BIN, BARE_BIN are for the scripts that source this
# Shared by bench/run.sh and bench/scale.sh (sourced, not run): logging, tools, building, starting
# and stopping servers, running and parsing wrk. Everything listens on and targets 127.0.0.1 only.

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
RESULTS=$BENCH/results
STARTED_AT=$(date +%s)
PIDS=()        # servers we started; the EXIT trap stops them
WORK=""        # scratch dir (mktemp -d); removed at exit unless KEEP_DATA=1

log() { printf '[%s +%ss] %s\n' "$(basename "$0")" $(($(date +%s) - STARTED_AT)) "$*" >&2; }
die() {
	log "FAILED: $*"
	exit 1
}

cleanup() {
	local pid
	for pid in "${PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null || true
	done
	if [[ -n $WORK && -d $WORK ]]; then
		if [[ ${KEEP_DATA:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# need TOOL [DEBIAN_PACKAGE]: installs the package with apt-get if the tool is missing; runs
# apt-get update only if the first install fails.
need() {
	local tool=$1 package=${2:-$1} sudo=""
	command -v "$tool" >/dev/null && return
	[[ $(id -u) == 0 ]] || sudo=sudo
	log "installing $package (for $tool)"
	$sudo apt-get install -y "$package" >&2 ||
		{ $sudo apt-get update >&2 && $sudo apt-get install -y "$package" >&2; } ||
		die "cannot install $package"
	command -v "$tool" >/dev/null || die "$tool is still missing after installing $package"
}

# Builds kv and the reference server in one cargo run and copies both into $WORK/bin, so a rebuild
# in the tree while the benchmark runs cannot swap the binaries under it. SKIP_BUILD=1 takes the
# binaries already in the target dir.
build() {
	local target=${CARGO_TARGET_DIR:-$ROOT/target}
	if [[ ${SKIP_BUILD:-0} != 1 ]]; then
		log "cargo build --release --bin kv --example bare"
		(cd "$ROOT" && cargo build --release --bin kv --example bare >&2) || die "cargo build failed"
	fi
	mkdir -p "$WORK/bin"
	cp "$target/release/kv" "$target/release/examples/bare" "$WORK/bin/" ||
		die "no release binaries in $target (run without SKIP_BUILD=1)"
	# KV_BINARY measures another kv (an older build, say) against the same reference server.
	[[ -z ${KV_BINARY:-} ]] || cp "$KV_BINARY" "$WORK/bin/kv" || die "cannot copy KV_BINARY=$KV_BINARY"
	KV_BIN=$WORK/bin/kv
	BARE_BIN=$WORK/bin/bare
}

# Facts about the machine and the code, as markdown list items.
describe_machine() {
	local cpu mem fs rev dirty
	cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
	mem=$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
	fs=$(df -T "$WORK" | awk 'NR == 2 {print $2}')
	rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
	dirty=$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)
	echo "- machine: $(nproc) CPUs (nproc), ${cpu:-unknown CPU}, $mem RAM, Linux $(uname -r); data dir on $fs"
	echo "- kv revision: $rev, $dirty dirty files in \`git status --porcelain\` (uncommitted changes to the sources are in the binary measured)"
	echo "- load generator: $(wrk --version 2>&1 | head -1 | awk '{print $1, $2}'), on the same machine as the server, over 127.0.0.1"
}

# The command as typed, with the settings that were given in the environment.
command_line() {
	local prefix="" name
	for name in "$@"; do
		[[ -n ${!name+x} ]] && prefix+="$name=${!name} "
	done
	echo "${prefix}bench/$(basename "$0")"
}

# start_server VAR LOG ENV=… … -- COMMAND …: starts a server in the background and sets
# VAR_PID and VAR_PORT. The server must print `listening on http://127.0.0.1:PORT` and then answer
# GET /health with 200, all within 10 s, or the script fails with the end of its log.
start_server() {
	local var=$1 logfile=$2 envs=() deadline port="" pid
	shift 2
	while [[ $1 != -- ]]; do envs+=("$1"); shift; done
	shift
	: >"$logfile"
	env "${envs[@]}" "$@" 2>>"$logfile" >/dev/null &
	pid=$!
	PIDS+=("$pid")
	deadline=$(($(date +%s%N) + 10 * 1000000000))
	while (($(date +%s%N) < deadline)); do
		kill -0 "$pid" 2>/dev/null || break
		if [[ -z $port ]]; then
			port=$(grep -o 'listening on http://127\.0\.0\.1:[0-9]*' "$logfile" | head -1 | sed 's/.*://') || true
		fi
		if [[ -n $port && $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$port/health") == 200 ]]; then
			printf -v "${var}_PID" %s "$pid"
			printf -v "${var}_PORT" %s "$port"
			return
		fi
		sleep 0.02
	done
	tail -20 "$logfile" >&2
	die "$* did not become healthy within 10 s (log above, $logfile)"
}

# stop_server PID [EXPECTED_STATUS]: SIGTERM, then waits up to 10 s (SIGKILL after that). Warns
# unless it exits with EXPECTED_STATUS (default 0; the bare server just dies of the signal, 143).
stop_server() {
	local pid=$1 expected=${2:-0} rc=0
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	if kill -0 "$pid" 2>/dev/null; then
		log "WARNING: pid $pid still running 10 s after SIGTERM; killing it"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || rc=$?
	((rc == expected)) || log "WARNING: pid $pid exited with status $rc after SIGTERM"
	local kept=()
	for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
	PIDS=("${kept[@]+"${kept[@]}"}")
}

busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# proc_ticks PID…: CPU ticks (user + system) the processes have used, summed.
proc_ticks() {
	local pid total=0
	for pid in "$@"; do
		total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
	done
	echo "$total"
}

# run_wrk OUTFILE URL SCRIPT|- SERVER_PIDS ENV=… …: one measured run, wrk -t${WRK_THREADS:-1}
# -c$CONNECTIONS -d${DURATION}s; SERVER_PIDS is one pid, or several separated by spaces (the nodes
# of a cluster, counted as one server). Also writes OUTFILE.cpu: "server% wrk% other% server_us", the CPU the server, wrk
# and everything else on the machine used during the run (server and wrk in % of one CPU, other in
# % of all CPUs), because another busy process on the machine skews the numbers, and the server's
# CPU time (user + system, /proc/PID/stat) per request in microseconds, which does not depend on
# how the two CPUs were shared between client and server.
run_wrk() {
	local out=$1 url=$2 script=$3 server=$4 TIMEFORMAT='%U %S'
	shift 4
	local args=("-t${WRK_THREADS:-1}" "-c$CONNECTIONS" "-d${DURATION}s" --timeout 5s --latency)
	[[ $script == - ]] || args+=(-s "$BENCH/$script")
	local t0 busy0 server0
	# shellcheck disable=SC2086 # several pids, split on purpose
	t0=$(date +%s%N) busy0=$(busy_ticks) server0=$(proc_ticks $server)
	{ time timeout $((DURATION + 60)) env "$@" wrk "${args[@]}" "$url" >"$out" 2>&1; } 2>"$out.time" ||
		{ cat "$out" >&2; die "wrk failed: $url $script"; }
	local requests
	requests=$(awk '/ requests in / {print $1}' "$out")
	awk -v t0="$t0" -v t1="$(date +%s%N)" -v busy="$(($(busy_ticks) - busy0))" \
		-v server="$(($(proc_ticks $server) - server0))" -v hz="$(getconf CLK_TCK)" -v cpus="$(nproc)" \
		-v requests="${requests:-0}" '
		{ wrk = $1 + $2 }
		END {
			wall = (t1 - t0) / 1e9
			other = (busy / hz - server / hz - wrk) / (wall * cpus) * 100
			us = requests > 0 ? server / hz * 1e6 / requests : 0
			printf "%.0f %.0f %.0f %.1f\n", server / hz / wall * 100, wrk / wall * 100, other < 0 ? 0 : other, us
		}' "$out.time" >"$out.cpu"
}

# parse_wrk FILE: prints "req/s p50_ms p99_ms requests non_2xx socket_errors" from wrk's output.
parse_wrk() {
	awk '
		function ms(v) {
			if (v ~ /us$/) return v / 1000
			if (v ~ /ms$/) return v + 0
			if (v ~ /m$/) return v * 60000
			if (v ~ /s$/) return v * 1000
			return v
		}
		/Latency Distribution/ { dist = 1 }
		dist && $1 == "50%" { p50 = ms($2) }
		dist && $1 == "99%" { p99 = ms($2) }
		/ requests in / { n = $1 }
		/^Requests\/sec:/ { rps = $2 }
		/Non-2xx or 3xx responses:/ { bad = $NF }
		/Socket errors:/ { gsub(",", ""); err = $4 + $6 + $8 + $10 }
		END { printf "%.0f %.3f %.3f %d %d %d\n", rps, p50, p99, n, bad, err }
	' "$1"
}

# fill URL PREFIX KEYS VALUE_BYTES [COLLECTION]: PUTs PREFIX0..PREFIX(KEYS-1) through the API with
# bench/fill.lua (wrk, 32 connections); fails unless every one got 200. Prints the seconds it took.
fill() {
	local url=$1 prefix=$2 keys=$3 bytes=$4 collection=${5:-} out t0
	out=$(mktemp "$WORK/fill.XXXXXX")
	t0=$(date +%s%N)
	timeout 200 env PREFIX="$prefix" KEYS="$keys" VALUE_BYTES="$bytes" COLLECTION="$collection" \
		wrk -t1 "-c$CONNECTIONS" -d180s --timeout 10s -s "$BENCH/fill.lua" "$url" >"$out" 2>&1 || true
	grep -q "^fill: status 200=$keys other=0$" "$out" ||
		{ cat "$out" >&2; die "prepopulating $keys keys $prefix* of $bytes B failed"; }
	awk -v t0="$t0" -v t1="$(date +%s%N)" 'BEGIN {printf "%.1f\n", (t1 - t0) / 1e9}'
}

# load_sql N COLLECTION: the sqlite3 script that bulk-loads k0..k(N-1) into COLLECTION of a kv
# database (schema made by kv) in one transaction, in chunks that print progress: each object
# with its own revision and feed entry, as kv would have written them. Needs VALUE_BYTES and
# LOAD_CHUNK_ROWS.
load_sql() {
	local n=$1 collection=$2 from=0 to
	# 2 GB of page cache: the transaction stays in memory until COMMIT writes it to the WAL once.
	echo "PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF; PRAGMA cache_size = -2000000;"
	echo "BEGIN;"
	while ((from < n)); do
		to=$((from + LOAD_CHUNK_ROWS < n ? from + LOAD_CHUNK_ROWS : n))
		echo "WITH RECURSIVE s(i) AS (SELECT $from UNION ALL SELECT i + 1 FROM s WHERE i < $((to - 1)))"
		echo "INSERT INTO kv (collection, key, value, updated_at, rev)"
		echo "  SELECT '$collection', 'k' || i, printf('\"%0$((VALUE_BYTES - 2))d\"', i), CAST(strftime('%s', 'now') AS INTEGER) * 1000, i + 1 FROM s;"
		echo "WITH RECURSIVE s(i) AS (SELECT $from UNION ALL SELECT i + 1 FROM s WHERE i < $((to - 1)))"
		echo "INSERT INTO changes (rev, collection, key) SELECT i + 1, '$collection', 'k' || i FROM s;"
		echo ".print progress: $to rows inserted"
		from=$to
	done
	echo "UPDATE meta SET value = $n WHERE name = 'revision';"
	echo ".print progress: committing"
	echo "COMMIT;"
	echo ".print progress: checkpointing the WAL into the database file"
	echo "PRAGMA wal_checkpoint(TRUNCATE);"
	echo ".print progress: done"
}

# rss_kib PID: the process's VmRSS in KiB (0 once it is gone).
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# peak_while PID COMMAND…: runs COMMAND, sampling PID's VmRSS every 10 ms; prints the peak KiB.
peak_while() {
	local pid=$1 peak=0 rss job
	shift
	"$@" &
	job=$!
	while kill -0 "$job" 2>/dev/null; do
		rss=$(rss_kib "$pid")
		((rss > peak)) && peak=$rss
		sleep 0.01
	done
	wait "$job"
	echo "$peak"
}

# kib_to_mib KIB: mebibytes with one decimal.
kib_to_mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
