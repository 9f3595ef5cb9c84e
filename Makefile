# snapblk — build, test and demo targets. Every target installs what it needs (scripts/install-deps.sh).
SHELL := /bin/bash
CARGO ?= cargo
SNAPBLK := target/release/snapblk

.PHONY: all build deps guest run run-overlay test test-guest test-quick lint fmt clippy bench bench-nbd soak restart-soak mutants fuzz installer-demo clean-build

all: build

deps:
	bash scripts/install-deps.sh

build:
	$(CARGO) build --release -p snapblk

guest: deps
	bash scripts/build-guest.sh

# The main job: a QEMU guest against snapblk on a demo image, ending with a checksum comparison.
run: deps
	bash scripts/demo.sh

# The same on a qcow2 overlay over a random raw base.
run-overlay: deps
	DEMO_OVERLAY=1 bash scripts/demo.sh

# The whole default suite: unit, integration, qemu-img interop, crash/fault, and real-guest end-to-end tests.
test: deps
	$(CARGO) build --release -p snapblk
	bash scripts/build-guest.sh
	SNAPBLK_REQUIRE_GUEST=1 $(CARGO) test --release --workspace --no-fail-fast

# Only the real-guest end-to-end tests, including the reference-peer (qemu-storage-daemon) runs.
test-guest: deps build
	bash scripts/build-guest.sh
	SNAPBLK_REQUIRE_GUEST=1 $(CARGO) test --release -p snapblk-tests --test e2e_guest --test e2e_live_snapshot --test e2e_restart -- --include-ignored

# Unit tests only (no guest, no qemu-img): fast inner loop.
test-quick:
	$(CARGO) test --workspace --lib

lint: fmt clippy

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: deps
	bash scripts/bench.sh

# NBD bases (qemu-nbd) vs local bases vs qemu-storage-daemon with the same NBD backing: a short,
# informational run (scripts/bench-nbd.sh; the table goes to build/bench/nbd.md).
bench-nbd: deps
	bash scripts/bench-nbd.sh

# Longer model/soak runs than the default suite (not part of `make test`).
soak: deps
	$(CARGO) build --release -p snapblk
	SNAPBLK_FSX_SECS=$${SNAPBLK_FSX_SECS:-300} SNAPBLK_CRASH_STATES=$${SNAPBLK_CRASH_STATES:-50000} \
		$(CARGO) test --release --workspace -- --ignored --nocapture

# A guest writing through many SIGKILLs of snapblk (8 kills, 120 iterations; a few minutes of
# TCG). The default suite runs the short variant (2 kills) and the SIGTERM upgrade.
restart-soak: deps build
	bash scripts/build-guest.sh
	SNAPBLK_REQUIRE_GUEST=1 $(CARGO) test --release -p snapblk-tests --test e2e_restart -- --include-ignored --nocapture --test-threads 1

# Mutation testing of the storage layers: every surviving mutant is a rule no test enforces.
# One job and a per-mutant timeout keep it from hogging the machine; it is still slow (hours for
# all three crates), so narrow it: MUTANTS_ARGS='--file cache/src/cache/read.rs'.
# Results land in mutants.out/ (missed.txt lists the survivors). .cargo/mutants.toml keeps what
# .gitignore names (build/, target/) out of the scratch copies of the tree.
MUTANTS_ARGS ?=
MUTANTS_TIMEOUT ?= 300
mutants:
	command -v cargo-mutants >/dev/null 2>&1 || $(CARGO) install --locked cargo-mutants
	$(CARGO) mutants --jobs 1 --timeout $(MUTANTS_TIMEOUT) --profile release \
		--package cache --package qcow-snapshot --package blockdev $(MUTANTS_ARGS)

fuzz:
	bash scripts/fuzz.sh

installer-demo: deps build
	bash scripts/installer/run.sh

clean-build:
	rm -rf build
