#!/usr/bin/env bash
# `make bench`: build release binaries, run the gateway's reference suite (bench/bench.py: its own
# redis-server and gateway nodes on free loopback ports), the physical references, and the two
# peers (bench/peer.sh: Socket.IO, then Sockudo when `make sockudo` has built it), then write
# bench/results/table.md. Bounded: every step stops by itself; the whole run takes about 9½ minutes
# plus the build (about 4 minutes from cold) on the 2-core benchmark machine (limit: 15).
# Raw logs and full reports go to a fresh directory under /tmp (printed at the start).
#
#   bench/run.sh            everything
#   BENCH_SKIP_PEER=1 bench/run.sh        without the peers
#   BENCH_ONLY=idle,storm bench/run.sh    only some gateway step groups (see bench/bench.py --help)
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
BENCH_TMP=$(mktemp -d /tmp/presence-bench-run.XXXXXX)
export BENCH_TMP
echo "bench: raw logs in $BENCH_TMP" >&2

child=
cleanup() {
	# Stop whatever step is still running (each step stops its own children on SIGTERM).
	if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
		kill -TERM "$child" 2>/dev/null || true
		wait "$child" 2>/dev/null || true
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs one step as a child we can stop; a failed step is reported, the run goes on.
failed=()
step() {
	local name=$1
	shift
	local rc=0
	"$@" &
	child=$!
	wait "$child" || rc=$?
	child=
	if [ "$rc" != 0 ]; then
		echo "bench: step $name exited $rc" >&2
		failed+=("$name")
	fi
}

${CARGO:-cargo} build --release -p presence-gateway -p presence-loadtest

mkdir -p bench/results
if [ -z "${BENCH_ONLY:-}" ]; then
	rm -f bench/results/*.json bench/results/*.jsonl bench/results/table.md
fi
step gateway-suite python3 bench/bench.py ${BENCH_ONLY:+--only "$BENCH_ONLY"}
if [ -z "${BENCH_SKIP_PEER:-}" ]; then
	step socketio-peer bench/peer.sh socketio
	step sockudo-peer bench/peer.sh sockudo
fi
python3 bench/table.py >bench/results/table.md
elapsed=$(($(date +%s) - start))
printf '\n`make bench` took %d min %02d s (build included).\n' $((elapsed / 60)) $((elapsed % 60)) >>bench/results/table.md
echo "bench: results in bench/results/ (table: bench/results/table.md); ${elapsed} s in all" >&2
if [ "${#failed[@]}" -gt 0 ]; then
	echo "bench: failed steps: ${failed[*]}" >&2
	exit 1
fi
