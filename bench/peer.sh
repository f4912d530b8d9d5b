#!/usr/bin/env bash
# The Socket.IO 4 + Redis adapter peer (../shared/peers/socketio from the repo root), run on the
# same machine in the same `make bench` run, driven by its own bench.js as its README says.
# Writes its JSON lines to bench/results/socketio.jsonl; raw stderr goes to $BENCH_TMP (or /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
PEER=../shared/peers/socketio
OUT=bench/results/socketio.jsonl
TMP=${BENCH_TMP:-$(mktemp -d /tmp/presence-bench-peer.XXXXXX)}
mkdir -p "$TMP"

if [ ! -x "$PEER/run.sh" ]; then
	echo "peer: $PEER/run.sh not found" >&2
	exit 1
fi
if [ ! -d "$PEER/node_modules" ]; then
	echo "peer: (cd $PEER && npm ci)" >&2
	(cd "$PEER" && npm ci --no-audit --no-fund) >"$TMP/peer-npm.log" 2>&1 || {
		echo "peer: npm ci failed (offline?), see $TMP/peer-npm.log; no Socket.IO figures" >&2
		echo '{"scenario":"npm_ci_failed"}' >"$OUT"
		exit 1
	}
fi

child=
cleanup() {
	if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
		kill -TERM "$child" 2>/dev/null || true
		wait "$child" 2>/dev/null || true
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# free loopback ports for the peer's redis-server and its two servers
read -r RPORT P1 P2 < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
for s in ss: s.close()')

COMMON=(--redis-port "$RPORT" --ports "$P1,$P2" --retries 0 --quiet-wait 10)
: >"$OUT.tmp"
run() {
	echo "peer: (cd $PEER && ./run.sh $* ${COMMON[*]})" >&2
	(cd "$PEER" && exec ./run.sh "$@" "${COMMON[@]}") >>"$OUT.tmp" 2>>"$TMP/peer.log" &
	child=$!
	local rc=0
	wait "$child" || rc=$?
	child=
	[ "$rc" = 0 ] || echo "peer: run.sh $1 exited $rc (see $TMP/peer.log)" >&2
}
run idle --n 20000 --hold 10
run fanout --rates 50,100,200 --duration 10 --drain 10
run presence --rates 200 --duration 10 --hold-ms 3000 --drain 10
grep '^{' "$OUT.tmp" >"$OUT" || true
rm -f "$OUT.tmp"
echo "peer: $(wc -l <"$OUT") JSON line(s) in $OUT" >&2
