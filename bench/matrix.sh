#!/usr/bin/env bash
# The side-by-side bench: the same matrix against the null server, the
# reference rstmdb 0.3.0 and ours, in one run, each server fresh with a
# temporary data directory on a real disk and RUST_LOG=warn. Writes the
# table into docs/PERFORMANCE.md (between the bench markers).
#
#   bench/matrix.sh            # quick: apply and get, 1x1 and 16x8, 2 s cells
#   MODE=full bench/matrix.sh  # the record: apply/get/create/mixed, all cells, 10 s
#
# Needs the reference server in .tools/bin/rstmdb (`make bench` installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${MODE:-quick}
REF=${REF:-$PWD/.tools/bin/rstmdb}
OURS=${OURS:-$PWD/target/release/rstmdb}
BENCH=${BENCH:-$PWD/target/release/rstmdb-bench}
DOC=${DOC:-docs/PERFORMANCE.md}
PORT=${PORT:-7411}
WORK=$PWD/target/bench-matrix
RESULTS=$WORK/results.jsonl

if [ "$MODE" = full ]; then
    WORKLOADS=(apply get create mixed)
    CELLS=("1 1" "1 8" "16 1" "16 8" "64 8")
    FLOOR_CELLS=("1 1" "1 8" "16 1")
    DURATION=10; WARMUP=2
else
    WORKLOADS=(apply get)
    CELLS=("1 1" "16 8")
    FLOOR_CELLS=("1 1")
    DURATION=2; WARMUP=0.5
fi
# The glommio null server (the floor of any server on the design card's
# runtime) is measured in the low-concurrency cells, where a reactor turn
# per request is the cost that matters.
# The cross-check: the many-connection cells again with the lighter client
# (one thread drives every connection), so that no ratio is an artefact of
# the thread-per-connection client's design.
CHECK_WORKLOADS=(apply get)
CHECK_CELLS=("16 8" "64 8")
FSYNCS=(every_write never)

if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release --quiet -p rstmdb -p rstmdb-bench
fi
[ -x "$REF" ] || { echo "reference server not found at $REF (run: make bench)" >&2; exit 1; }

rm -rf "$WORK"
mkdir -p "$WORK"
: >"$RESULTS"
ADDR=127.0.0.1:$PORT
PID= KIND=

wait_port() {
    for _ in $(seq 1 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
        if ! kill -0 "$PID" 2>/dev/null; then echo "server exited:" >&2; cat "$WORK/server.log" >&2; return 1; fi
        sleep 0.05
    done
    echo "server did not listen on $ADDR" >&2
    return 1
}

start() { # kind fsync
    local kind=$1 fsync=$2 data=$WORK/data-$1-$2
    rm -rf "$data"
    case $kind in
        null) "$BENCH" null-server --bind "$ADDR" >"$WORK/server.log" 2>&1 & ;;
        null-glommio) "$BENCH" null-server --runtime glommio --bind "$ADDR" >"$WORK/server.log" 2>&1 & ;;
        reference) RUST_LOG=warn RSTMDB_BIND=$ADDR RSTMDB_DATA=$data RSTMDB_FSYNC_POLICY=$fsync \
            "$REF" >"$WORK/server.log" 2>&1 & ;;
        ours) RUST_LOG=warn RSTMDB_BIND=$ADDR RSTMDB_DATA=$data RSTMDB_FSYNC_POLICY=$fsync \
            "$OURS" >"$WORK/server.log" 2>&1 & ;;
    esac
    PID=$! KIND=$kind
    wait_port
}

stop() {
    # The null servers hold no data: no graceful stop needed.
    if [[ "$KIND" = null* ]]; then kill -9 "$PID" 2>/dev/null || true; fi
    kill -INT "$PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    # A killed process's io_uring listener outlives it by a few ms: wait
    # until nothing listens, or the next cell would reach the old server.
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || break
        sleep 0.03
    done
}

run_cells() { # kind fsync [client]
    local kind=$1 fsync=$2 client=${3:-threads} check=() workloads cells
    [[ "$kind" = null* ]] && check=(--no-check)
    if [ "$kind" = null-glommio ]; then
        workloads=("${WORKLOADS[@]}"); cells=("${FLOOR_CELLS[@]}")
    elif [ "$client" = threads ]; then
        workloads=("${WORKLOADS[@]}"); cells=("${CELLS[@]}")
    else
        workloads=("${CHECK_WORKLOADS[@]}"); cells=("${CHECK_CELLS[@]}")
    fi
    for w in "${workloads[@]}"; do
        for cell in "${cells[@]}"; do
            read -r c p <<<"$cell"
            start "$kind" "$fsync"
            echo "== $kind fsync=$fsync $w ${c}x${p} client=$client" >&2
            "$BENCH" --addr "$ADDR" run --workload "$w" --connections "$c" --pipeline "$p" \
                --duration "$DURATION" --warmup "$WARMUP" --server-pid "$PID" --json "${check[@]}" \
                --client "$client" --tag "server=$kind" --tag "fsync=$fsync" >>"$RESULTS" \
                || echo "{\"workload\":\"$w\",\"connections\":$c,\"pipeline\":$p,\"client\":\"$client\",\"tags\":{\"server\":\"$kind\",\"fsync\":\"$fsync\"},\"failed\":true}" >>"$RESULTS"
            stop
        done
    done
}

run_cells null -
run_cells null-glommio -
for f in "${FSYNCS[@]}"; do
    run_cells reference "$f"
    run_cells ours "$f"
done
run_cells null - evented
for f in "${FSYNCS[@]}"; do
    run_cells reference "$f" evented
    run_cells ours "$f" evented
done

CPU=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
HEADER="### Side by side ($MODE mode, $(date -u +%F))

Command: \`MODE=$MODE bench/matrix.sh\` (\`make bench\` = quick, \`make bench-full\` = full);
commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); machine: $(nproc) vCPU ($CPU), $(uname -r);
client and server on the same cores; each cell ${DURATION} s after ${WARMUP} s warm-up on a fresh server
(temporary data directory on ext4, \`RUST_LOG=warn\`, default config otherwise: ours runs the
colocated layout with $(( $(nproc) > 1 ? $(nproc) - 1 : 1 )) shard(s), each executor also accepting connections).
Ratios are ops/s; latencies from the client (HdrHistogram). The glommio null server answers
every frame at once from one glommio executor: no server on that runtime can do better. CPU µs/op: CPU-seconds of the server
process over the measured window ÷ operations answered; in brackets the load generator's own.
Client \`threads\`: a thread per connection; \`evented\`: one thread drives every connection (poll).
Raw results: \`target/bench-matrix/results.jsonl\`."
"$BENCH" report --input "$RESULTS" --into "$DOC" --header "$HEADER"
echo "table written to $DOC" >&2
