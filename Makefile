# The commands developers and CI run. CI (.ci/run) calls these same targets.
.PHONY: run test chaos scale lint msrv doc deny toolchain fmt redis promtool haproxy lb-test build bench \
	fuzz fuzz-corpus cargo-fuzz helm-check sdk-test demo node chromium sockudo

CARGO ?= cargo
# The channel rust-toolchain.toml pins (read here without running rustup).
TOOLCHAIN := $(shell sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
# cargo-deny is built from crates.io when it is missing: a few minutes, once per machine.
CARGO_DENY_VERSION ?= 0.20.2
CLIPPY = $(CARGO) clippy --workspace --all-targets -- -D warnings

## Start one gateway node in dev mode on the embedded backend (no Redis needed). Ctrl-C stops it
## at once: no load balancer needs the drain's delay and spread here (PRESENCE_DRAIN_* still apply).
run:
	$(CARGO) run -p presence-gateway -- --dev --listen $${PRESENCE_LISTEN:-127.0.0.1:8080} \
		--drain-delay-secs $${PRESENCE_DRAIN_DELAY_SECS:-0} --drain-spread-secs $${PRESENCE_DRAIN_SPREAD_SECS:-0}

## Build everything and run every test (installs redis-server when it is missing).
## The gateway's integration tests mostly wait on sockets and timers, so six at a time take a
## third of the wall time of two on this 2-core machine (61 s -> 20 s, measured 2026-11-30).
GATEWAY_TEST_THREADS ?= 6

test: redis promtool haproxy
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --exclude presence-gateway
	RUST_TEST_THREADS=$(GATEWAY_TEST_THREADS) $(CARGO) test -p presence-gateway
	$(MAKE) sdk-test

## The TypeScript SDK (clients/js): unit tests on fake timers, the golden frames the shared crate
## writes, integration tests against real nodes (embedded and on a real Redis), and the demo page
## in headless Chromium. Needs the gateway binary `cargo build --workspace --bins` made (the SDK's
## harness finds it under CARGO_TARGET_DIR, else target/). Installs node, the locked npm
## dependencies and Debian's chromium when missing.
sdk-test: redis node chromium
	cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm test

## The live presence page: serves it on 127.0.0.1:8081 (DEMO_PORT) against the gateway that
## `make run` starts (DEMO_GATEWAY, default http://127.0.0.1:8080). Open
## http://127.0.0.1:8081/?user=alice and, in another window, ?user=bob.
demo: node
	cd clients/js && { [ -d node_modules ] || npm ci --no-audit --no-fund --loglevel=error; } && npm run --silent demo

node:
	@command -v node >/dev/null && command -v npm >/dev/null || { \
		echo "installing nodejs and npm (Debian packages)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	@node --version

## Debian's chromium for the SDK's browser test (playwright-core drives it; it never downloads one).
chromium:
	@command -v chromium >/dev/null || { \
		echo "installing chromium (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

## Behind a real load balancer at scale: HAProxy in front of three nodes on one Redis, LB_CLIENTS
## clients (with watchers and group messages) connected through it, a restart rolled through the
## nodes with the default drain settings (5 s delay, 10 s spread, 10 s handover); checks that the
## roll is invisible and prints reconnect p50/p99 and the roll's time (docs/benchmarks.md). A
## release build, as the figures are measured; `make test` runs a 30-client version.
LB_CLIENTS ?= 1000

lb-test: redis haproxy
	$(CARGO) build --release -p presence-gateway --bins
	LB_CLIENTS=$(LB_CLIENTS) $(CARGO) test --release -p presence-gateway --test it \
		lb::a_rolling_restart_behind_haproxy_at_scale -- --ignored --nocapture

## Chaos: 3 nodes on Redis under random churn while nodes and Redis are killed and restarted, then
## the truth is checked (docs/ARCHITECTURE.md, "Faults"). CHAOS_SECS of faults (default 180),
## CHAOS_SEED to replay a run's choices. The short run (15 s, Redis back with its data) comes first.
CHAOS_SECS ?= 180

chaos: redis
	$(CARGO) build -p presence-gateway --bins
	$(CARGO) test -p presence-gateway --test it chaos::chaos_short -- --nocapture
	CHAOS_SECS=$(CHAOS_SECS) $(CARGO) test -p presence-gateway --test it chaos::chaos_long -- --ignored --nocapture

## Scale (docs/benchmarks.md, "Sizing"): a million online users put into one redis-server as 10
## nodes would, through the gateway's own Redis backend; renewal rounds, churn at 10,000 changes
## a second, a dead node of 100,000 users reaped in small steps, GET /v1/stats and a full
## GET /v1/online walk on a real node, all checked exact; fails on any command over 1 ms in
## Redis's SLOWLOG (wall time: run it on a quiet machine). A few minutes plus a release build of
## the test binary. SCALE_USERS, SCALE_CHURN_PER_SEC, SCALE_CHURN_SECS, SCALE_FILL_PER_SEC and
## SCALE_RENEW_PER_SEC change the run; `make test` runs the 100,000-user version. Each SLOWLOG
## entry is printed with what the machine did meanwhile; one that a stall of Redis's own core
## explains (a probe on that core woke late by as much) is the machine's, not the command's
## (SCALE_SLOWLOG=strict fails on those too). `make scale SCALE_CLUSTER=1` runs the same work on
## a local 3-master Redis Cluster instead (300,000 users unless SCALE_USERS): commands, CPU,
## memory and SLOWLOG per master, commands per master within 2x of each other.
SCALE_CLUSTER ?=

scale: redis
	$(CARGO) build --release -p presence-gateway --bins
	$(CARGO) test --release -p presence-gateway --test it \
		$(if $(SCALE_CLUSTER),scale::scale_cluster,scale::scale_1m) -- --ignored --nocapture

## fmt check, clippy with warnings as errors, the MSRV check of the dependencies (see msrv), and
## no import circle between the gateway's top-level modules (tools/module_cycles.py --graph shows
## the layering).
lint: toolchain
	$(CARGO) fmt --all -- --check
	$(CLIPPY)
	$(MSRV_DEPS)
	python3 tools/module_cycles.py

## MSRV, i.e. rust-version in Cargo.toml, checked offline with the pinned compiler only:
## 1. no locked dependency declares a rust-version newer than ours;
## 2. clippy's incompatible_msrv (denied in Cargo.toml) finds no std API newer than ours.
## Neither compiles with the old compiler: language features (let-chains are 1.88) are not
## checked, nor are std APIs used through macros of other crates.
msrv: toolchain
	$(MSRV_DEPS)
	$(CLIPPY)

## API docs of the workspace's crates into target/doc; any rustdoc warning is an error.
doc: toolchain
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --workspace

## Dependency policy in deny.toml: licenses, duplicate crates, sources (crates.io only).
## Advisories are left out: their database is on GitHub, which CI cannot reach (see deny.toml).
## Installs cargo-deny when it is missing.
deny: toolchain
	@command -v cargo-deny >/dev/null || { \
		echo "installing cargo-deny $(CARGO_DENY_VERSION) from crates.io (a few minutes)"; \
		env -u CARGO_TARGET_DIR $(CARGO) install cargo-deny --locked --version $(CARGO_DENY_VERSION); }
	$(CARGO) deny --locked check bans licenses sources

## rust-toolchain.toml pins the compiler. A machine whose only toolchain is `stable` at that same
## version (CI's, with no way to download another) gets it registered under the pinned name, a
## link to the same files, so rustup resolves the pin without a download. Elsewhere this does
## nothing and rustup installs the pinned toolchain as usual.
toolchain:
	@home="$${RUSTUP_HOME:-$$HOME/.rustup}"; \
	for stable in "$$home"/toolchains/stable-*; do \
		[ -n "$(TOOLCHAIN)" ] && [ -x "$$stable/bin/rustc" ] || continue; \
		host="$${stable##*/stable-}"; \
		[ ! -e "$$home/toolchains/$(TOOLCHAIN)-$$host" ] || continue; \
		"$$stable/bin/rustc" -V | grep -q "^rustc $(TOOLCHAIN) " || continue; \
		echo "toolchain: stable is $(TOOLCHAIN): registering it as $(TOOLCHAIN)-$$host (no download)"; \
		ln -s "stable-$$host" "$$home/toolchains/$(TOOLCHAIN)-$$host"; \
	done
	@rustc -V

## Fuzzing (docs/fuzzing.md): runs each fuzz target in fuzz/ for FUZZ_SECS seconds with
## cargo-fuzz (libFuzzer + AddressSanitizer), on the pinned stable compiler: RUSTC_BOOTSTRAP=1
## unlocks the -Z flags cargo-fuzz passes, so no nightly is needed. Starts from the stored
## corpus (fuzz/corpus/, fuzz/regressions/); new inputs go to a scratch corpus in
## $(FUZZ_WORK), a crash to $(FUZZ_WORK)/artifacts/<target>/ and stops the run. `make test`
## replays the stored corpus; `make fuzz-corpus` folds the scratch corpus into it, minimized.
## Installs cargo-fuzz when it is missing (a minute or two, once per machine).
## First runs (5 min per target, 2026-11-30) found two body bugs, both fixed; see docs/fuzzing.md.
FUZZ_SECS ?= 60
FUZZ_TARGETS ?= frame_msgpack frame_json body rest
CARGO_FUZZ_VERSION ?= 0.13.2
FUZZ_WORK ?= $(CURDIR)/target/fuzz-work
FUZZ_ENV = RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=$${CARGO_TARGET_DIR:-$(CURDIR)/target}/fuzz

fuzz: toolchain cargo-fuzz
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_WORK)/corpus/$$t $(FUZZ_WORK)/artifacts/$$t; \
		stored=$$(cd fuzz && ls -d corpus/$$t regressions/$$t 2>/dev/null); \
		echo "fuzz: $$t for $(FUZZ_SECS) s"; \
		(cd fuzz && $(FUZZ_ENV) $(CARGO) fuzz run $$t $(FUZZ_WORK)/corpus/$$t $$stored -- \
			-max_total_time=$(FUZZ_SECS) -artifact_prefix=$(FUZZ_WORK)/artifacts/$$t/ \
			-print_final_stats=1) || { echo "fuzz: $$t failed; input in $(FUZZ_WORK)/artifacts/$$t/" >&2; exit 1; }; \
	done

## Replaces fuzz/corpus/<target>/ with at most FUZZ_CORPUS_MAX inputs of it and of the scratch
## corpus of the last `make fuzz`: libFuzzer's merge lists the edges each input covers, and
## tools/fuzz_corpus_pick.py keeps the inputs that add the most, greedily (libFuzzer's own
## minimization keeps well over a thousand per frame target).
FUZZ_CORPUS_MAX ?= 300

fuzz-corpus: toolchain cargo-fuzz
	@for t in $(FUZZ_TARGETS); do \
		rm -rf $(FUZZ_WORK)/merged/$$t $(FUZZ_WORK)/merge-$$t.ctl && mkdir -p $(FUZZ_WORK)/merged/$$t fuzz/corpus/$$t; \
		(cd fuzz && $(FUZZ_ENV) $(CARGO) fuzz run $$t $(FUZZ_WORK)/merged/$$t $(CURDIR)/fuzz/corpus/$$t \
			$(FUZZ_WORK)/corpus/$$t -- -merge=1 -merge_control_file=$(FUZZ_WORK)/merge-$$t.ctl \
			>$(FUZZ_WORK)/merge-$$t.log 2>&1) || { cat $(FUZZ_WORK)/merge-$$t.log; exit 1; }; \
		python3 tools/fuzz_corpus_pick.py $(FUZZ_WORK)/merge-$$t.ctl $(FUZZ_CORPUS_MAX) \
			fuzz/corpus/$$t || exit 1; \
	done

cargo-fuzz:
	@command -v cargo-fuzz >/dev/null || { \
		echo "installing cargo-fuzz $(CARGO_FUZZ_VERSION) from crates.io (a minute or two)"; \
		env -u CARGO_TARGET_DIR $(CARGO) install cargo-fuzz --locked --version $(CARGO_FUZZ_VERSION) || { \
			echo "fuzz: cargo-fuzz is missing and could not be installed (is crates.io reachable?)" >&2; \
			exit 1; }; }

fmt:
	$(CARGO) fmt --all

## Integration tests start their own redis-server processes; this makes sure the binary exists.
redis:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
		echo "installing redis-server (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@redis-server --version

## The metrics test checks a live node's /metrics with promtool (Debian's prometheus package;
## only promtool is used, no Prometheus server is started).
promtool:
	@command -v promtool >/dev/null || { \
		echo "installing promtool (Debian package prometheus)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@promtool --version 2>&1 | head -1

## The operator's kit checked with real tools (tools/helm-check/helm_check.py): the Helm chart
## linted and rendered through the Helm SDK with its defaults and each helm/presence-gateway/ci/
## values file, every object validated (kubernetes-validate --strict) and scanned (checkov), the
## alert rules checked and unit-tested (promtool), the Dockerfile linted (hadolint, checkov); then
## helm_check_test.py breaks copies of the chart and shows the check failing. The pinned PyPI tools
## (tools/helm-check/requirements.txt) go into a venv of their own in HELM_CHECK_VENV, made again
## when the requirements change (about 40 s once per machine).
HELM_CHECK_VENV ?= $(HOME)/.cache/presence-gateway/helm-check-venv

helm-check: promtool
	@python3 -c 'import ensurepip' 2>/dev/null || { \
		echo "installing python3-venv (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	@cmp -s tools/helm-check/requirements.txt $(HELM_CHECK_VENV)/requirements.txt || { \
		echo "helm-check: installing tools/helm-check/requirements.txt into $(HELM_CHECK_VENV)"; \
		rm -rf $(HELM_CHECK_VENV) && python3 -m venv $(HELM_CHECK_VENV) && \
		$(HELM_CHECK_VENV)/bin/pip install -q --disable-pip-version-check -r tools/helm-check/requirements.txt && \
		cp tools/helm-check/requirements.txt $(HELM_CHECK_VENV)/requirements.txt; }
	$(HELM_CHECK_VENV)/bin/python tools/helm-check/helm_check.py
	$(HELM_CHECK_VENV)/bin/python tools/helm-check/helm_check_test.py

## HAProxy (Debian's package) for the load-balancer tests: `lb.rs` and the load tool's wss test.
haproxy:
	@command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { \
		echo "installing haproxy (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }
	@PATH="$$PATH:/usr/sbin" haproxy -v | head -1

build:
	$(CARGO) build --workspace --release

## Reference benchmark suite (release build, own redis-server and gateway nodes, the Socket.IO and
## Sockudo peers); results in bench/results/, page in docs/benchmarks.md. About 9½ minutes plus the
## build (about 4 from cold). Sockudo's figures need `make sockudo` once (11–20 minutes); without it the run says so
## and goes on.
bench:
	SOCKUDO_ROOT="$(SOCKUDO_ROOT)" bench/run.sh

## The Sockudo peer's server (../shared/peers/sockudo/README.md), built once from crates.io into
## SOCKUDO_ROOT, outside the repo, where `make bench` looks for it: about 20 minutes on 2 cores,
## so `make bench` never builds it and says so when it is missing. Does nothing when the binary is
## there. Its own target directory, so the gateway's builds neither wait on nor evict it; niced, as
## it is long and the machine is shared.
SOCKUDO_VERSION := 5.2.0
SOCKUDO_ROOT ?= $${XDG_CACHE_HOME:-$$HOME/.cache}/presence-gateway/sockudo-$(SOCKUDO_VERSION)

sockudo:
	@root="$(SOCKUDO_ROOT)"; \
	if [ -x "$$root/bin/sockudo" ]; then echo "sockudo: $$root/bin/sockudo is there"; exit 0; fi; \
	command -v protoc >/dev/null || { \
		echo "installing protobuf-compiler (Debian package; a build script of Sockudo's needs protoc)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null; } && \
	echo "sockudo: building sockudo $(SOCKUDO_VERSION) into $$root (about 20 minutes)" && \
	mkdir -p "$$root" && \
	env CARGO_TARGET_DIR="$$root/target" CARGO_BUILD_JOBS=2 nice -n 19 $(CARGO) install sockudo \
		--version $(SOCKUDO_VERSION) --locked --no-default-features --features "local,redis" \
		--root "$$root" && \
	rm -rf "$$root/target" && \
	"$$root/bin/sockudo" --version

# No locked dependency (for this host's platform, dev-dependencies included) may need a newer
# compiler than the members' rust-version: cargo would refuse to build it with that compiler.
MSRV_DEPS = $(CARGO) metadata --format-version 1 --locked \
	--filter-platform "$$(rustc -vV | sed -n 's/^host: //p')" | python3 -c "$$MSRV_DEPS_PY"
define MSRV_DEPS_PY
import json, sys
m = json.load(sys.stdin)
ver = lambda s: (tuple(int(x) for x in s.split(".")) + (0, 0))[:3]
show = lambda v: ".".join(map(str, v))
members = [p for p in m["packages"] if p["id"] in m["workspace_members"]]
unset = [p["name"] for p in members if not p.get("rust_version")]
if unset:
    sys.exit("msrv: no rust-version in " + ", ".join(unset) + " (rust-version.workspace = true)")
ours = min(ver(p["rust_version"]) for p in members)
used = {n["id"] for n in m["resolve"]["nodes"]}
deps = [(ver(p["rust_version"]), p["name"] + " " + p["version"]) for p in m["packages"]
        if p["id"] in used and p["id"] not in m["workspace_members"] and p.get("rust_version")]
top = max(v for v, _ in deps)
newer = sorted(d for d in deps if d[0] > ours)
for v, name in newer:
    print("msrv: " + name + " needs rust " + show(v) + ", newer than our rust-version " + show(ours))
if newer:
    sys.exit(1)
print("msrv: rust-version " + show(ours) + "; the " + str(len(deps)) + " locked dependencies that declare one need at most " + show(top)
      + " (" + ", ".join(sorted(n for v, n in deps if v == top)) + ")")
endef
export MSRV_DEPS_PY
