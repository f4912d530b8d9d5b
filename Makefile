# The commands developers and CI run. CI (.ci/run) calls these same targets.
.PHONY: run test lint fmt redis build bench

CARGO ?= cargo

## Start one gateway node in dev mode on the embedded backend (no Redis needed).
run:
	$(CARGO) run -p presence-gateway -- --dev --listen $${PRESENCE_LISTEN:-127.0.0.1:8080}

## Build everything and run every test (installs redis-server when it is missing).
test: redis
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

## fmt check and clippy with warnings as errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Integration tests start their own redis-server processes; this makes sure the binary exists.
redis:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
		echo "installing redis-server (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@redis-server --version

build:
	$(CARGO) build --workspace --release

## Reference benchmark suite (release build, own redis-server and gateway nodes, Socket.IO peer);
## results in bench/results/, page in docs/benchmarks.md. About 7 minutes plus the build.
bench:
	bench/run.sh
