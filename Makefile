# rstmdb — see README.md for what each target does.
SHELL := /bin/bash
CARGO ?= cargo
TOOLS := $(CURDIR)/.tools
CLI := $(TOOLS)/bin/rstmdb-cli
PY := $(TOOLS)/venv/bin/python
PYTHON ?= python3
CRASH_CYCLES ?= 10
ATOMIC_CRASH_CYCLES ?= 20

.PHONY: all build run test tools lint fmt compat crash sim fuzz bench bench-full bench-extras bench-recovery bench-cluster certs run-secure cluster cluster-test deploy-check clean

all: build

build:
	$(CARGO) build --release

## Build and start the daemon: 127.0.0.1:7401, data in ./data (Ctrl-C stops it cleanly).
run: build
	./target/release/rstmdb $(ARGS)

## Development TLS material in ./certs: a CA, a server certificate for
## 127.0.0.1 and localhost, a client certificate for mTLS (rcgen, via the
## server's --gen-dev-certs).
certs: build
	./target/release/rstmdb --gen-dev-certs certs

CLUSTER_TOKEN ?= local-cluster-token
## A local three-node cluster (config/cluster/node{1,2,3}.yaml): clients on
## 127.0.0.1:7401-7403 (any node serves every operation), peers on 7501-7503,
## data in ./data/cluster/nodeN, logs in ./data/cluster/nodeN.log. Ctrl-C
## stops every node. Set CLUSTER_TOKEN to change the shared peer token.
cluster: build
	@mkdir -p data/cluster
	@trap 'kill $$(jobs -p) 2>/dev/null; wait' INT TERM EXIT; \
	for i in 1 2 3; do \
	  RSTMDB_REPL_AUTH_TOKEN='$(CLUSTER_TOKEN)' ./target/release/rstmdb --config config/cluster/node$$i.yaml \
	    > data/cluster/node$$i.log 2>&1 & \
	done; \
	echo "cluster: nodes on 127.0.0.1:7401 7402 7403 (logs in data/cluster/); Ctrl-C stops them"; \
	wait

CLUSTER_CYCLES ?= 20
## The cluster's black-box tests, long mode, with their figures: three real
## processes on loopback; CLUSTER_CYCLES kill -9s of the leader and a rolling
## restart under retrying writers, partitions, histories checked for
## linearizability (`make test` runs them with 2 kill cycles).
cluster-test: tools
	CLUSTER_CYCLES=$(CLUSTER_CYCLES) RSTMDB_CLI=$(CLI) $(CARGO) test --release --test cluster -- --nocapture

## The daemon with TLS, mTLS, token auth and metrics (config/tls-auth.yaml).
run-secure: certs
	./target/release/rstmdb --config config/tls-auth.yaml $(ARGS)

## Everything CI checks: formatting, clippy, and every test (unit, property,
## black-box, CLI compatibility, crash and recovery).
test: tools
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RSTMDB_CLI=$(CLI) RSTMDB_PYTHON=$(PY) $(CARGO) test --workspace

## The real clients for the compatibility tests, installed once into .tools/:
## rstmdb-cli 0.3.0 (crates.io) and the Python client rstmdb 0.2.1 (PyPI, in a venv).
tools: $(CLI) $(PY)

REF := $(TOOLS)/bin/rstmdb

## The reference server rstmdb 0.3.0, for the side-by-side bench only.
$(REF):
	$(CARGO) install --locked --version 0.3.0 --root $(TOOLS) rstmdb

## Side-by-side bench, quick mode: null server, reference 0.3.0 and ours in one
## run; the table goes into docs/PERFORMANCE.md.
bench: $(REF)
	MODE=quick bench/matrix.sh
	NO_BUILD=1 bench/cluster.sh

## The same, full matrix (the record; ~25 minutes).
bench-full: $(REF)
	MODE=full bench/matrix.sh

## Watch fan-out (100 WATCH_ALL subscribers) and resident memory per
## instance (1M instances), reference and ours in one run (~5 minutes).
bench-extras: $(REF)
	bench/extras.sh

$(CLI):
	$(CARGO) install --locked --version 0.3.0 --root $(TOOLS) rstmdb-cli

$(PY):
	rm -rf $(TOOLS)/venv
	$(PYTHON) -m venv $(TOOLS)/venv
	$(TOOLS)/venv/bin/pip install --quiet rstmdb==0.2.1

## Offline checks of the deployment files (config/kubernetes, the compose
## files, the seccomp profile): the manifests against the Kubernetes API
## schemas (kubernetes-validate, installed into .tools/venv), and what the
## cluster needs of each (config/deploy_check.py says what); then the
## cluster, compaction, watch, TLS and crash tests with every server under
## the seccomp profile (config/docker/seccomp_exec.py, libseccomp).
deploy-check: $(PY)
	$(TOOLS)/venv/bin/pip install --quiet kubernetes-validate==1.37.0 pyseccomp==0.1.2
	$(PY) config/deploy_check.py
	RSTMDB_TEST_WRAPPER="$(PY) $(CURDIR)/config/docker/seccomp_exec.py $(CURDIR)/config/docker/seccomp-rstmdb.json --" \
	  $(CARGO) test --release --test cluster --test compaction --test watch --test security --test crash

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Only the compatibility suites (rstmdb-cli 0.3.0 and the Python client 0.2.1).
compat: tools
	RSTMDB_CLI=$(CLI) RSTMDB_PYTHON=$(PY) $(CARGO) test --test cli_compat --test python_compat -- --nocapture

## The kill -9 crash tests with their figures (docs/DURABILITY.md).
crash:
	CRASH_CYCLES=$(CRASH_CYCLES) ATOMIC_CRASH_CYCLES=$(ATOMIC_CRASH_CYCLES) \
		$(CARGO) test --release --test crash --test atomic_crash -- --nocapture

SIM_SEEDS ?= 20000
SIM_SHARD_SEEDS ?= 5000
SIM_RAFT_SEEDS ?= 5000
## The deterministic simulations, long mode: the WAL (SIM_SEEDS seeds) and
## the whole shard path with snapshots and compaction (SIM_SHARD_SEEDS
## seeds) on the simulated disk, and replicated groups of three and five
## nodes under network faults and crashes (SIM_RAFT_SEEDS seeds each);
## figures in docs/DURABILITY.md. `make test` runs 200, 60 and 300/150 seeds.
sim:
	SIM_SEEDS=$(SIM_SEEDS) $(CARGO) test --release -p rstmdb-wal --test sim wal_survives -- --nocapture
	SIM_SEEDS=$(SIM_SHARD_SEEDS) $(CARGO) test --release -p rstmdb-shards --test sim shard_state -- --nocapture
	SIM_SEEDS=$(SIM_RAFT_SEEDS) $(CARGO) test --release -p rstmdb-shards --test raft_sim nodes_lose -- --nocapture

FUZZ_SECONDS ?= 600
## Every fuzz target (or TARGETS="a b") for FUZZ_SECONDS each, one after
## another (nightly toolchain; cargo-fuzz installed when missing); see
## docs/FUZZING.md.
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh $(TARGETS)

## Durable APPLY and GET at 1x1 and 16x8: one node, a three-node loopback
## cluster through its leader and through a follower (forwarded); the table
## goes into docs/PERFORMANCE.md ("Cluster").
bench-cluster:
	bench/cluster.sh

## Recovery time (snapshot + tail vs WAL only) and the snapshot pause, see docs/PERFORMANCE.md.
bench-recovery:
	bench/recovery.sh

clean:
	$(CARGO) clean
	rm -rf data
