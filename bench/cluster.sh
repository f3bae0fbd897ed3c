#!/usr/bin/env bash
# The cluster bench: durable (every_write) APPLY and GET at 1x1 and 16x8 on
# one node of ours, on a three-node loopback cluster through its leader,
# and through a follower (which forwards to the leader), alternated in one
# run, each fresh, with a temporary data directory on a real disk. Prints
# a markdown table and writes it into docs/PERFORMANCE.md (between the
# cluster bench markers).
#
#   bench/cluster.sh                 # 5 s cells
#   DURATION=10 bench/cluster.sh
#   WORKLOADS=apply DOC=/tmp/scratch.md bench/cluster.sh   # one workload, docs untouched
set -euo pipefail
cd "$(dirname "$0")/.."

OURS=${OURS:-$PWD/target/release/rstmdb}
BENCH=${BENCH:-$PWD/target/release/rstmdb-bench}
DOC=${DOC:-docs/PERFORMANCE.md}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
FSYNC=${FSYNC:-every_write}
WORK=$PWD/target/bench-cluster
RESULTS=$WORK/results.jsonl
CLIENT_PORTS=(7431 7432 7433)
PEER_PORTS=(7531 7532 7533)
PEERS="1=127.0.0.1:${PEER_PORTS[0]},2=127.0.0.1:${PEER_PORTS[1]},3=127.0.0.1:${PEER_PORTS[2]}"
read -ra WORKLOADS <<<"${WORKLOADS:-apply get}"
CELLS=("1 1" "16 8")

if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release --quiet -p rstmdb -p rstmdb-bench
fi
rm -rf "$WORK"
mkdir -p "$WORK"
: >"$RESULTS"
PIDS=()

wait_port() { # port
    for _ in $(seq 1 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    return 1
}

start_single() {
    rm -rf "$WORK/single"
    RUST_LOG=warn RSTMDB_BIND=127.0.0.1:${CLIENT_PORTS[0]} RSTMDB_DATA=$WORK/single \
        RSTMDB_FSYNC_POLICY=$FSYNC "$OURS" >"$WORK/single.log" 2>&1 &
    PIDS=($!)
    wait_port "${CLIENT_PORTS[0]}"
}

start_cluster() {
    local i
    PIDS=()
    for i in 0 1 2; do
        rm -rf "$WORK/node$i"
        RUST_LOG=warn RSTMDB_BIND=127.0.0.1:${CLIENT_PORTS[$i]} RSTMDB_DATA=$WORK/node$i \
            RSTMDB_FSYNC_POLICY=$FSYNC RSTMDB_CLUSTER_NODE_ID=$((i + 1)) \
            RSTMDB_CLUSTER_PEERS=$PEERS RSTMDB_REPL_AUTH_TOKEN=bench \
            "$OURS" >"$WORK/node$i.log" 2>&1 &
        PIDS+=($!)
    done
    local port
    for port in "${CLIENT_PORTS[@]}"; do wait_port "$port"; done
}

# REPLICATION_STATUS's role on a node (one RCP frame, by hand).
replication_role() { # port
    python3 - "$1" <<'PY' 2>/dev/null || true
import json, socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
body = json.dumps({"type": "request", "id": "1", "op": "REPLICATION_STATUS", "params": {}}).encode()
s.sendall(b"RCPX" + struct.pack(">HHHII", 1, 0, 0, len(body), 0) + body)
buf = b""
while len(buf) < 18 or len(buf) < 18 + struct.unpack(">I", buf[10:14])[0]:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
hl = struct.unpack(">H", buf[8:10])[0]
print(json.loads(buf[18 + hl:])["result"]["role"])
PY
}

# The client port of the node that leads (0-based index), once one does.
leader_index() {
    local i
    for _ in $(seq 1 200); do
        for i in 0 1 2; do
            if replication_role "${CLIENT_PORTS[$i]}" | grep -q primary; then
                echo "$i"
                return 0
            fi
        done
        sleep 0.1
    done
    echo "no leader" >&2
    return 1
}

stop_all() {
    local pid port
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for port in "${CLIENT_PORTS[@]}" "${PEER_PORTS[@]}"; do
        for _ in $(seq 1 100); do
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
            sleep 0.03
        done
    done
}

run_cell() { # kind workload connections pipeline
    local kind=$1 w=$2 c=$3 p=$4 target pid
    case $kind in
        single) start_single; target=0 ;;
        leader) start_cluster; target=$(leader_index) ;;
        follower) start_cluster; target=$(( ($(leader_index) + 1) % 3 )) ;;
    esac
    pid=${PIDS[$target]}
    echo "== $kind $w ${c}x${p}" >&2
    "$BENCH" --addr "127.0.0.1:${CLIENT_PORTS[$target]}" run --workload "$w" --connections "$c" \
        --pipeline "$p" --duration "$DURATION" --warmup "$WARMUP" --server-pid "$pid" --json \
        --tag "server=$kind" --tag "fsync=$FSYNC" >>"$RESULTS" \
        || echo "{\"workload\":\"$w\",\"connections\":$c,\"pipeline\":$p,\"tags\":{\"server\":\"$kind\"},\"failed\":true}" >>"$RESULTS"
    stop_all
}

trap stop_all EXIT
for w in "${WORKLOADS[@]}"; do
    for cell in "${CELLS[@]}"; do
        read -r c p <<<"$cell"
        for kind in single leader follower; do
            run_cell "$kind" "$w" "$c" "$p"
        done
    done
done

TABLE=$(python3 - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cells = {}
for r in rows:
    key = (r["workload"], r["connections"], r["pipeline"])
    cells.setdefault(key, {})[r["tags"]["server"]] = r
print("| workload | cell | one node: ops/s, p50 / p99 µs, server CPU µs/op | cluster via leader | cluster via follower (forwarded) | leader / one node |")
print("|---|---|---|---|---|---|")
def fmt(r):
    if r is None or r.get("failed"):
        return "failed"
    l = r["latency_us"]
    return f'{r["ops_per_sec"]:,.0f}, {l["p50"]} / {l["p99"]}, {r["server_cpu_us_per_op"]:.1f}'
for (w, c, p), by in cells.items():
    s, l, f = by.get("single"), by.get("leader"), by.get("follower")
    ratio = "–"
    if s and l and not s.get("failed") and not l.get("failed"):
        ratio = f'{l["ops_per_sec"] / s["ops_per_sec"]:.2f}×'
    print(f"| {w} | {c}×{p} | {fmt(s)} | {fmt(l)} | {fmt(f)} | {ratio} |")
EOF
)
HEADER="### Cluster ($(date -u +%F))

Command: \`bench/cluster.sh\` (\`make bench-cluster\`); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?');
machine: $(nproc) vCPU, $(uname -r); fsync \`$FSYNC\`; every node and the client on the same cores; each
cell ${DURATION} s after ${WARMUP} s warm-up on fresh servers. Server CPU is the measured node's only
(the leader's, or the follower's that forwards). Raw results: \`target/bench-cluster/results.jsonl\`."
BLOCK="$HEADER

$TABLE"
echo "$BLOCK"
python3 - "$DOC" "$BLOCK" <<'EOF'
import sys
doc, block = sys.argv[1], sys.argv[2]
text = open(doc).read()
begin, end = "<!-- cluster-bench:begin -->", "<!-- cluster-bench:end -->"
if begin in text:
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    text = head + begin + "\n" + block + "\n" + end + tail
else:
    text = text.rstrip("\n") + "\n\n## Cluster\n\n" + begin + "\n" + block + "\n" + end + "\n"
open(doc, "w").write(text)
EOF
echo "table written to $DOC" >&2
