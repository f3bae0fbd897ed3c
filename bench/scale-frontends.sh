#!/usr/bin/env bash
# Frontends x shards on a many-core machine (stripped release binaries in
# target/device/); one JSON line per (config, workload).
set -u
B=${BENCH:-target/device/rstmdb-bench}
P=7421
D=$PWD/target/scale; mkdir -p $D
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
for fs in "1 4" "2 4" "4 4" "4 8" "6 8"; do read f s <<< "$fs"; RSTMDB_FRONTENDS=$f RSTMDB_SHARDS=$s run f$f-s$s target/device/rstmdb; done
