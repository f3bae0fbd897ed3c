#!/usr/bin/env bash
# Usage (e.g. on a many-core machine, with stripped release binaries in
# target/device/: rstmdb, rstmdb-bench, rstmdb-ref = the reference 0.3.0):
#   bench/scale.sh   -> one JSON line per (server, workload)
# Scaling run on the device: ours with 1..14 shards, and the reference.
set -u
B=${BENCH:-target/device/rstmdb-bench}
P=7420
run() { # label cmd...
  local label=$1; shift
  RUST_LOG=warn RSTMDB_BIND=127.0.0.1:$P RSTMDB_DATA=$D/sd-$label RSTMDB_FSYNC_POLICY=never "$@" > /tmp/s.log 2>&1 &
  local pid=$!
  for i in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/$P) 2>/dev/null && break; sleep 0.05; done
  for w in apply get; do
    $B --addr 127.0.0.1:$P run --workload $w --connections 64 --pipeline 8 --duration 5 --warmup 1 --instances 10000 --server-pid $pid --json --tag label=$label
  done
  kill -INT $pid; sleep 0.5; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
  rm -rf $D/sd-$label
}
D=${DATA_BASE:-$PWD/target/scale}; mkdir -p $D
for sh in ${SHARDS_LIST:-1 2 4 8 14}; do RSTMDB_SHARDS=$sh run ours-$sh ${OURS:-target/device/rstmdb}; done
run reference ${REF:-target/device/rstmdb-ref}
