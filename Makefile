# pg_peersync: the single entry point. `make demo` and `make test` work on a fresh Debian 12
# machine as root (they install what is missing first).

PGV        ?= 15
PG_CONFIG  ?= /usr/lib/postgresql/$(PGV)/bin/pg_config
PGRX_VER   := $(shell sed -n 's/^pgrx = "=\(.*\)"/\1/p' Cargo.toml)
TEST_PGDATA ?= /tmp/pg_peersync-pgrx-pgdata
APT_PKGS   := postgresql-$(PGV) postgresql-server-dev-$(PGV) postgresql-contrib libclang-dev clang pkg-config sudo iproute2 procps tcpdump

export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: setup apt-deps install-pgrx pgrx-init build install test test-bridge test-pg test-e2e bench sysbench demo fmt clippy clean

setup: apt-deps install-pgrx pgrx-init

# Debian packages, installed only when one is missing.
apt-deps:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

install-pgrx:
	@if cargo pgrx --version 2>/dev/null | grep -q " $(PGRX_VER)$$"; then :; else \
	  cargo install cargo-pgrx --version $(PGRX_VER) --locked; fi

pgrx-init:
	@if grep -qs "pg$(PGV) = \"$(PG_CONFIG)\"" $(HOME)/.pgrx/config.toml; then :; else \
	  cargo pgrx init --pg$(PGV) $(PG_CONFIG); fi

build: setup
	cargo build

# Installs into the system PostgreSQL (needs root for /usr/lib/postgresql and /usr/share/postgresql).
install: setup
	cargo pgrx install --release --pg-config $(PG_CONFIG)

test: setup test-bridge test-pg test-e2e

test-bridge:
	cargo test -p sync_bridge

# #[pg_test]s run inside a throwaway cluster owned by user postgres (PostgreSQL refuses root).
test-pg:
	rm -rf $(TEST_PGDATA) && mkdir -p $(TEST_PGDATA) && chown postgres: $(TEST_PGDATA)
	cargo pgrx test pg$(PGV) --runas postgres --pgdata $(TEST_PGDATA)

# End-to-end tests: start their own clusters with the installed extension.
test-e2e: install
	cargo test -p pg_peersync_tests --release -- --test-threads=1

# The network part compares with pglogical 2 (Debian's package, installed here when missing).
bench: install
	@dpkg -s postgresql-$(PGV)-pglogical >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-$(PGV)-pglogical)
	cargo run -p pg_peersync_tests --release --bin bench
	cargo run -p pg_peersync_tests --release --bin netbench
	cargo run -p pg_peersync_tests --release --bin joinbench
	cargo run -p pg_peersync_tests --release --bin verifybench

# sysbench's oltp_write_only on two nodes at once, then convergence (Debian's sysbench,
# installed here when missing).
sysbench: install
	@command -v sysbench >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sysbench)
	cargo run -p pg_peersync_tests --release --bin sysbench

demo: install
	cargo run -p pg_peersync_tests --release --bin demo

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --all-targets -- -D warnings

clean:
	cargo clean
	rm -rf $(TEST_PGDATA)
