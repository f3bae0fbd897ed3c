#!/usr/bin/env bash
# The two figures the side-by-side matrix does not cover, for the reference
# rstmdb 0.3.0 and ours in one run, each server fresh on a temporary data
# directory on a real disk (fsync never, RUST_LOG=warn):
#
#  * watch fan-out: WATCHERS (100) WATCH_ALL subscribers while 4 connections
#    x 8 pipelined requests apply events; events delivered per second and
#    the delivery lag (from an apply's answer to its event at a watcher);
#  * resident memory per instance: RSS before and after creating
#    INSTANCES (1,000,000) instances whose context is {"n": 0}.
#
#   bench/extras.sh            # prints a markdown table, keeps raw output
#
# Needs the reference server in .tools/bin/rstmdb (`make bench` installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

REF=${REF:-$PWD/.tools/bin/rstmdb}
OURS=${OURS:-$PWD/target/release/rstmdb}
BENCH=${BENCH:-$PWD/target/release/rstmdb-bench}
PORT=${PORT:-7412}
WATCHERS=${WATCHERS:-100}
INSTANCES=${INSTANCES:-1000000}
DURATION=${DURATION:-10}
WORK=$PWD/target/bench-extras
ADDR=127.0.0.1:$PORT
PID=

if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release --quiet -p rstmdb -p rstmdb-bench
fi
[ -x "$REF" ] || { echo "reference server not found at $REF (run: make bench)" >&2; exit 1; }
rm -rf "$WORK"
mkdir -p "$WORK"

start() { # kind
    local kind=$1 data=$WORK/data-$1
    rm -rf "$data"
    local bin=$OURS
    [ "$kind" = reference ] && bin=$REF
    # Automatic compaction off for ours, so a snapshot does not count
    # towards the memory figure; the reference has none by default.
    RUST_LOG=warn RSTMDB_BIND=$ADDR RSTMDB_DATA=$data RSTMDB_FSYNC_POLICY=never \
        RSTMDB_COMPACT_ENABLED=false "$bin" >"$WORK/server-$kind.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
        kill -0 "$PID" 2>/dev/null || { cat "$WORK/server-$kind.log" >&2; return 1; }
        sleep 0.05
    done
    return 1
}

stop() {
    kill -INT "$PID" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$PID" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }

ROWS=()
for kind in reference ours; do
    echo "== $kind: watch fan-out, $WATCHERS subscribers" >&2
    start "$kind"
    "$BENCH" --addr "$ADDR" run --workload watch --watchers "$WATCHERS" --connections 4 \
        --pipeline 8 --duration "$DURATION" --warmup 2 --server-pid "$PID" --json \
        >"$WORK/watch-$kind.json"
    stop
    echo "== $kind: memory, $INSTANCES instances" >&2
    start "$kind"
    sleep 0.5
    before=$(rss_kib)
    "$BENCH" --addr "$ADDR" load --instances "$INSTANCES" --events 0 --check 1000 \
        >"$WORK/load-$kind.jsonl"
    after=$(rss_kib)
    stop
    ROWS+=("$(python3 - "$WORK/watch-$kind.json" "$kind" "$before" "$after" "$INSTANCES" <<'EOF'
import json, sys
w = json.load(open(sys.argv[1]))
kind, before, after, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ev = w["watch"]
print(f"| {kind} | {w['ops_per_sec']:.0f} | {ev['events_per_sec']:.0f} | "
      f"{ev['lag_us']['p50'] / 1000:.2f} / {ev['lag_us']['p99'] / 1000:.2f} / {ev['lag_us']['max'] / 1000:.1f} | "
      f"{w['consistency']['wrong']} of {w['consistency']['checked']} | "
      f"{before / 1024:.1f} → {after / 1024:.0f} MiB | {(after - before) * 1024 // n} |")
EOF
)")
done

echo "| server | applies/s | events delivered/s ($WATCHERS watchers) | lag p50 / p99 / max ms | wrong states | RSS before → after $INSTANCES instances | bytes per instance |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
