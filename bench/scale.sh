#!/usr/bin/env bash
# Scaling runs on a many-core machine: APPLY and GET, 64 connections x 8
# pipelined, fsync never, one JSON line per (configuration, workload).
# Binaries (stripped release builds): BENCH, OURS, REF (the reference 0.3.0),
# by default in target/device/.
#
#   bench/scale.sh                                  # ours with 1..14 shards, then the reference
#   CONFIGS="1x4 2x4 4x4 4x8" bench/scale.sh        # frontends x shards, no reference
set -u
B=${BENCH:-target/device/rstmdb-bench}
P=${PORT:-7420}
D=${DATA_BASE:-$PWD/target/scale}
mkdir -p "$D"
run() { # label cmd...
  local label=$1; shift
  RUST_LOG=warn RSTMDB_BIND=127.0.0.1:$P RSTMDB_DATA=$D/sd-$label RSTMDB_FSYNC_POLICY=never "$@" > "$D/server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/$P) 2>/dev/null && break; sleep 0.05; done
  for w in apply get; do
    "$B" --addr 127.0.0.1:$P run --workload $w --connections 64 --pipeline 8 --duration 5 --warmup 1 \
      --instances 10000 --server-pid $pid --json --tag label=$label
  done
  kill -INT $pid; sleep 0.5; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
  rm -rf "$D/sd-$label"
}
OURS=${OURS:-target/device/rstmdb}
if [ -n "${CONFIGS:-}" ]; then
  for fs in $CONFIGS; do
    f=${fs%x*}; s=${fs#*x}
    RSTMDB_FRONTENDS=$f RSTMDB_SHARDS=$s run "f$f-s$s" "$OURS"
  done
else
  for sh in ${SHARDS_LIST:-1 2 4 8 14}; do RSTMDB_SHARDS=$sh run "ours-$sh" "$OURS"; done
  run reference "${REF:-target/device/rstmdb-ref}"
fi
