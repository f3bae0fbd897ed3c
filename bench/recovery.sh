#!/usr/bin/env bash
# Recovery time from a snapshot + WAL tail versus WAL-only replay, and the
# longest APPLY pause while a snapshot of the whole data set is written
# (issue 5; figures go to docs/PERFORMANCE.md).
#
#   bench/recovery.sh                      # 1M instances, 10M events
#   INSTANCES=100000 EVENTS=1000000 bench/recovery.sh   # a quick run
#
# Uses release builds of the server and of rstmdb-bench; data goes to a real
# disk under target/ (never tmpfs).
set -euo pipefail
cd "$(dirname "$0")/.."

INSTANCES=${INSTANCES:-1000000}
EVENTS=${EVENTS:-10000000}
SHARDS=${SHARDS:-2}
CONNECTIONS=${CONNECTIONS:-4}
PIPELINE=${PIPELINE:-64}
PORT=${PORT:-7409}
DATA=${DATA:-$PWD/target/bench-recovery}
BIN=${BIN:-target/release/rstmdb}
BENCH=${BENCH:-target/release/rstmdb-bench}
ADDR=127.0.0.1:$PORT
LOG=$DATA.log

# NO_BUILD=1 uses binaries already built (e.g. on a machine without cargo).
if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release --quiet -p rstmdb -p rstmdb-bench
fi

PID=
start() {
    : >"$LOG"
    RUST_LOG=info RSTMDB_COMPACT_ENABLED=0 "$BIN" --bind "$ADDR" --data-dir "$DATA" \
        --shards "$SHARDS" --fsync-policy never --wal-segment-size-mb 64 2>>"$LOG" &
    PID=$!
    local t0=$SECONDS
    until grep -q "rstmdb listening" "$LOG"; do
        if ! kill -0 "$PID" 2>/dev/null; then
            echo "server failed to start:" >&2
            cat "$LOG" >&2
            exit 1
        fi
        if ((SECONDS - t0 > 600)); then
            echo "server did not start in 600 s" >&2
            exit 1
        fi
        sleep 0.05
    done
}
stop() {
    kill -TERM "$PID"
    wait "$PID" || true
}
plain_log() { sed 's/\x1b\[[0-9;]*m//g' "$LOG"; }
recovery_ms() {
    plain_log | sed -n 's/.*recovery complete.*elapsed_ms=\([0-9][0-9]*\).*/\1/p' | tail -1
}
du_mb() { du -sm "$@" 2>/dev/null | awk '{s+=$1} END {print s+0}'; }

echo "== machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); rstmdb $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "== load: $INSTANCES instances, $EVENTS events ($SHARDS shards, fsync never)"
rm -rf "$DATA"
start
"$BENCH" --addr "$ADDR" load --instances "$INSTANCES" --events "$EVENTS" \
    --connections "$CONNECTIONS" --pipeline "$PIPELINE"
stop
echo "WAL on disk: $(du_mb "$DATA"/shard-*/wal) MiB"

start
WAL_ONLY=$(recovery_ms)
echo "== recovery, WAL only: ${WAL_ONLY} ms"

echo "== APPLY latency while COMPACT snapshots everything (then a WAL tail)"
"$BENCH" --addr "$ADDR" pause --instances "$INSTANCES" --seconds 20 --compact-at-ms 3000
stop
echo "snapshots on disk: $(du_mb "$DATA"/shard-*/snapshots) MiB; WAL on disk: $(du_mb "$DATA"/shard-*/wal) MiB"

start
SNAP=$(recovery_ms)
plain_log | grep "shard recovered"
echo "== recovery, snapshot + tail: ${SNAP} ms (WAL only was ${WAL_ONLY} ms)"
stop
