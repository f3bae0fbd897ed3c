#!/usr/bin/env python3
"""Writes the committed seed corpus, fuzz/corpus/<target>/seed-*.

Valid inputs of every target, so the fuzzers start from the formats the
server really uses. The snapshot and WAL seeds come from a data directory
the real server wrote (argument 1; any small one: a machine, a few
instances, an apply, a delete, an atomic batch, then COMPACT).
"""
import json
import os
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def frame(payload: bytes, crc=True, ext=b"") -> bytes:
    flags = 1 if crc else 0
    return (
        b"RCPX"
        + struct.pack(">HHHII", 1, flags, len(ext), len(payload), crc32c(payload) if crc else 0)
        + ext
        + payload
    )


def req(op, params, rid="1"):
    return json.dumps({"type": "request", "id": rid, "op": op, "params": params}).encode()


ORDER = {
    "states": ["created", "paid", "shipped", "cancelled"],
    "initial": "created",
    "transitions": [
        {"from": "created", "event": "PAY", "to": "paid", "guard": "ctx.amount > 0 && !ctx.blocked"},
        {"from": "paid", "event": "SHIP", "to": "shipped"},
        {"from": ["created", "paid"], "event": "CANCEL", "to": "cancelled"},
    ],
    "meta": {"owner": "x"},
}

REQUESTS = [
    ("HELLO", {"protocol_version": 1, "client_name": "f", "wire_modes": ["binary_json", "jsonl"]}),
    ("AUTH", {"method": "bearer", "token": "t"}),
    ("PING", {}),
    ("INFO", None),
    ("PUT_MACHINE", {"machine": "m", "version": 2, "definition": ORDER}),
    ("GET_MACHINE", {"machine": "m", "version": 1}),
    ("LIST_MACHINES", {}),
    ("CREATE_INSTANCE", {"instance_id": "j", "machine": "m", "version": 1, "initial_ctx": {"amount": 3}, "idempotency_key": "c"}),
    ("GET_INSTANCE", {"instance_id": "i"}),
    ("LIST_INSTANCES", {"machine": "m", "state": "a", "limit": 10, "offset": 0}),
    ("DELETE_INSTANCE", {"instance_id": "i", "idempotency_key": "d"}),
    ("APPLY_EVENT", {"instance_id": "i", "event": "GO", "payload": {"n": 1, "blocked": False}, "expected_state": "a", "expected_wal_offset": 101, "event_id": "e", "idempotency_key": "k"}),
    ("BATCH", {"mode": "atomic", "ops": [{"op": "APPLY_EVENT", "params": {"instance_id": "i", "event": "BACK"}}, {"op": "GET_INSTANCE", "params": {"instance_id": "i"}}]}),
    ("BATCH", {"mode": "best_effort", "ops": [{"op": "CREATE_INSTANCE", "params": {"instance_id": "x", "machine": "m", "version": 1}}]}),
    ("SNAPSHOT_INSTANCE", {"instance_id": "i"}),
    ("WAL_READ", {"from_offset": 0, "limit": 10}),
    ("WAL_STATS", {}),
    ("COMPACT", {"force_snapshot": True}),
    ("WATCH_INSTANCE", {"instance_id": "i", "include_ctx": True}),
    ("WATCH_ALL", {"machines": ["m"], "from_states": ["a"], "to_states": ["b"], "events": ["GO"], "from_offset": 0}),
    ("UNWATCH", {"subscription_id": "s"}),
    ("FLUSH_ALL", {"confirm": True}),
]

OPS = ["HELLO", "AUTH", "PING", "BYE", "INFO", "REPLICATION_STATUS", "PUT_MACHINE", "GET_MACHINE",
       "LIST_MACHINES", "CREATE_INSTANCE", "GET_INSTANCE", "LIST_INSTANCES", "DELETE_INSTANCE",
       "APPLY_EVENT", "BATCH", "SNAPSHOT_INSTANCE", "WAL_READ", "WAL_STATS", "COMPACT",
       "WATCH_INSTANCE", "WATCH_ALL", "UNWATCH", "FLUSH_ALL", "REPLICATE", "REPLICATE_ACK"]

GUARDS = [
    ("ctx.amount > 0 && !ctx.blocked", {"amount": 5, "blocked": False}),
    ("ctx.a.b == \"x\" || (ctx.n >= 1e3 && ctx.n != null)", {"a": {"b": "x"}, "n": 1000}),
    ("!(ctx.s == true) && ctx.list", {"s": False, "list": [1]}),
    ("ctx.x <= -0.5 || ctx.y < .5", {"x": -1, "y": 0.25}),
    ("((ctx.a))", {"a": "yes"}),
]


def raft_frame(msg_type, entries=(), snapshot=None):
    """A peer frame of `replication::wire` (version 1, little-endian)."""
    out = bytes([1]) + struct.pack("<I", 3) + bytes([msg_type])
    # to, from, term, log_term, index, commit, commit_term,
    # request_snapshot, reject_hint, deprecated_priority; priority; reject
    out += struct.pack("<10Q", 2, 1, 7, 6, 41, 40, 6, 0, 0, 0) + struct.pack("<q", 0) + b"\x00"
    out += struct.pack("<I", 3) + b"ctx"
    out += struct.pack("<I", len(entries))
    for term, index, data in entries:
        out += b"\x00" + struct.pack("<QQ", term, index)
        out += struct.pack("<I", len(data)) + data + struct.pack("<I", 0) + b"\x00"
    if snapshot is None:
        return out + b"\x00"
    out += b"\x01" + struct.pack("<I", len(snapshot)) + snapshot + struct.pack("<QQ", 40, 6)
    for ids in ([1, 2, 3], [4], [], []):
        out += struct.pack("<I", len(ids)) + b"".join(struct.pack("<Q", i) for i in ids)
    return out + b"\x00"


def write(target, name, data: bytes):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"seed-{name}"), "wb") as f:
        f.write(data)


def raft_log_seeds():
    # raft_log: a group's log file (entries, a replaced tail, hard states),
    # whole, compacted, and torn.
    def raft_log_frame(body):
        return struct.pack("<II", len(body), crc32c(body)) + body

    def entry(index, term, data):
        return raft_log_frame(struct.pack("<BQQBI", 2, index, term, 0, 0) + data)

    def hard(term, vote, commit):
        return raft_log_frame(struct.pack("<BQQQ", 3, term, vote, commit))

    log = (b"RSTRAFT1" + entry(1, 1, b"") + entry(2, 1, b"\x01" * 12 + b"a") + hard(1, 1, 1)
           + entry(2, 2, b"") + entry(3, 2, b"\x02" * 12) + hard(2, 2, 3))
    write("raft_log", "log", log)
    write("raft_log", "compacted", b"RSTRAFT1" + raft_log_frame(struct.pack("<BQQ", 1, 5, 2))
          + entry(6, 3, b"") + hard(3, 1, 6))
    write("raft_log", "torn", log[:-7])


def main():
    data_dir = sys.argv[1]
    # frame_decode: a chunking seed byte, then a stream.
    stream = b"".join(frame(req(op, p, str(i))) for i, (op, p) in enumerate(REQUESTS[:4]))
    write("frame_decode", "pipelined", b"\x07" + stream)
    write("frame_decode", "nocrc-ext", b"\x01" + frame(req("PING", {}), crc=False, ext=b"abcd"))
    write("frame_decode", "bad-crc", b"\x03" + frame(req("PING", {}))[:-1] + b"}")
    # request: mode 0 = a whole payload; odd modes pick the op (index
    # (mode // 2) % 25) and carry its params.
    for i, (op, p) in enumerate(REQUESTS):
        write("request", f"env-{i:02}", b"\x00" + req(op, p))
        mode = 2 * OPS.index(op) + 1
        write("request", f"params-{i:02}", bytes([mode]) + json.dumps(p).encode())
    # guard: text, NUL, ctx.
    for i, (g, ctx) in enumerate(GUARDS):
        write("guard", f"{i:02}", g.encode() + b"\x00" + json.dumps(ctx).encode())
    # definition.
    write("definition", "order", json.dumps(ORDER).encode())
    write("definition", "positional", json.dumps(
        {"states": ["a", "b"], "initial": "a", "transitions": [["a", "GO", "b"], ["b", "BACK", "a", "ctx.n > 1"]]}).encode())
    # snapshot: mode 0 = the file; mode 1 = its decompressed body.
    snaps = os.path.join(data_dir, "shard-000", "snapshots")
    for name in sorted(os.listdir(snaps)):
        raw = open(os.path.join(snaps, name), "rb").read()
        write("snapshot", "file", b"\x00" + raw)
        body = subprocess.run(["zstd", "-dc"], input=raw[32:-24], capture_output=True, check=True).stdout
        write("snapshot", "body", b"\x01" + body)
        break
    # wal_record: the records of a real segment, one seed each.
    wal = os.path.join(data_dir, "shard-000", "wal", "0000000000000001.wal")
    seg = open(wal, "rb").read()
    pos, n = 4096, 0
    while pos + 32 <= len(seg) and seg[pos:pos + 4] == b"RWAL":
        length = struct.unpack("<I", seg[pos + 4:pos + 8])[0]
        write("wal_record", f"{n:02}", seg[pos:pos + 32 + length])
        n += 1
        pos = (pos + 32 + length + 4095) // 4096 * 4096
    # raft_wire: a heartbeat, an append with entries, a snapshot.
    write("raft_wire", "heartbeat", raft_frame(8))
    write("raft_wire", "append", raft_frame(3, [(7, 42, b"\x01" * 12 + b"records"), (7, 43, b"")]))
    write("raft_wire", "snapshot", raft_frame(7, snapshot=b"snap"))
    raft_log_seeds()
    # wal_recovery: commit shapes, then damage ops (see the target).
    write("wal_recovery", "clean", bytes([6, 0x41, 0, 40, 0x02, 1, 0, 0xC3, 0, 9, 0, 200, 0x40, 2, 0]))
    write("wal_recovery", "torn", bytes([5, 0x40, 0, 50, 0x01, 0, 10, 0x00, 0, 30, 1, 3, 0x10]))
    write("wal_recovery", "flipped", bytes([8, 0x41, 1, 0, 0x81, 0, 64, 0x42, 0, 16, 0, 4, 2, 0x50, 0x20]))


if __name__ == "__main__":
    main()
