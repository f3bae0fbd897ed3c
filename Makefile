# rstmdb — see README.md for what each target does.
SHELL := /bin/bash
CARGO ?= cargo
TOOLS := $(CURDIR)/.tools
CLI := $(TOOLS)/bin/rstmdb-cli
CRASH_CYCLES ?= 10

.PHONY: all build run test tools lint fmt compat crash clean

all: build

build:
	$(CARGO) build --release

## Build and start the daemon: 127.0.0.1:7401, data in ./data (Ctrl-C stops it cleanly).
run: build
	./target/release/rstmdb $(ARGS)

## Everything CI checks: formatting, clippy, and every test (unit, property,
## black-box, CLI compatibility, crash and recovery).
test: tools
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	RSTMDB_CLI=$(CLI) $(CARGO) test --workspace

## The real rstmdb-cli 0.3.0 (compatibility tests), installed once into .tools/.
tools: $(CLI)

$(CLI):
	$(CARGO) install --locked --version 0.3.0 --root $(TOOLS) rstmdb-cli

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Only the rstmdb-cli compatibility suite.
compat: tools
	RSTMDB_CLI=$(CLI) $(CARGO) test --test cli_compat -- --nocapture

## The kill -9 crash test with its figures (docs/DURABILITY.md).
crash:
	CRASH_CYCLES=$(CRASH_CYCLES) $(CARGO) test --release --test crash -- --nocapture

clean:
	$(CARGO) clean
	rm -rf data
