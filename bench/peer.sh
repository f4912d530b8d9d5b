#!/usr/bin/env bash
# One peer (../shared/peers/<name> from the repo root), run on the same machine in the same
# `make bench` run, driven by its own run.sh as its README says, with the same scenario sizes for
# every peer so that their figures sit side by side in bench/results/table.md.
#
#   bench/peer.sh socketio   Socket.IO 4 + Redis adapter (node)
#   bench/peer.sh sockudo    Sockudo 5.2.0 + Redis adapter, the binary `make sockudo` builds
#
# Writes its JSON lines to bench/results/<name>.jsonl; raw stderr goes to $BENCH_TMP (or /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: bench/peer.sh socketio|sockudo}
PEER=../shared/peers/$NAME
OUT=bench/results/$NAME.jsonl
case $NAME in
socketio) LABEL=Socket.IO ;;
sockudo)
	LABEL=Sockudo
	# The same default as the Makefile's SOCKUDO_ROOT, for bench/run.sh run by hand.
	root=${SOCKUDO_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/presence-gateway/sockudo-5.2.0}
	export SOCKUDO_BIN=${SOCKUDO_BIN:-$root/bin/sockudo}
	if [ ! -x "$SOCKUDO_BIN" ]; then
		# A 20-minute build has no place in a 15-minute benchmark: the run goes on without it.
		echo "peer: no Sockudo figures: run \`make sockudo\` first (about 20 minutes); no binary at $SOCKUDO_BIN" >&2
		rm -f "$OUT"
		exit 0
	fi
	echo "peer: Sockudo binary $SOCKUDO_BIN ($("$SOCKUDO_BIN" --version 2>/dev/null | head -1))" >&2
	;;
*)
	echo "peer: unknown peer '$NAME' (socketio|sockudo)" >&2
	exit 2
	;;
esac

TMP=${BENCH_TMP:-$(mktemp -d /tmp/presence-bench-peer.XXXXXX)}
mkdir -p "$TMP"
if [ ! -x "$PEER/run.sh" ]; then
	echo "peer: $PEER/run.sh not found" >&2
	exit 1
fi
if [ ! -d "$PEER/node_modules" ]; then
	echo "peer: (cd $PEER && npm ci)" >&2
	(cd "$PEER" && npm ci --no-audit --no-fund) >"$TMP/$NAME-npm.log" 2>&1 || {
		echo "peer: npm ci failed (offline?), see $TMP/$NAME-npm.log; no $LABEL figures" >&2
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
	(cd "$PEER" && exec ./run.sh "$@" "${COMMON[@]}") >>"$OUT.tmp" 2>>"$TMP/$NAME.log" &
	child=$!
	local rc=0
	wait "$child" || rc=$?
	child=
	[ "$rc" = 0 ] || echo "peer: $NAME run.sh $1 exited $rc (see $TMP/$NAME.log)" >&2
}
run idle --n 20000 --hold 10
run fanout --rates 50,100,200 --duration 10 --drain 10
run presence --rates 200 --duration 10 --hold-ms 3000 --drain 10
grep '^{' "$OUT.tmp" >"$OUT" || true
rm -f "$OUT.tmp"
echo "peer: $(wc -l <"$OUT") $LABEL JSON line(s) in $OUT" >&2
