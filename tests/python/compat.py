"""Compatibility suite: the official Python client `rstmdb` 0.2.1 against
our server. Run by tests/python_compat.rs (which starts the server):

    python compat.py HOST PORT

Exits non-zero on the first failed check; prints one line per section.
"""

import asyncio
import sys

from rstmdb import Client, ServerError
from rstmdb.models import Operation

ORDER = {
    "states": ["created", "paid", "shipped"],
    "initial": "created",
    "transitions": [
        {"from": "created", "event": "PAY", "to": "paid", "guard": "ctx.amount > 0"},
        {"from": "paid", "event": "SHIP", "to": "shipped"},
        {"from": ["created", "paid"], "event": "TICK", "to": "created"},
    ],
}


async def expect_error(coro, code):
    try:
        await coro
    except ServerError as e:
        assert e.code == code, f"expected {code}, got {e.code}: {e.message}"
        return e
    raise AssertionError(f"expected ServerError {code}")


async def main(host: str, port: int) -> None:
    async with Client(host, port) as c:
        # connect, ping, info
        assert await c.ping() is True
        info = await c.info()
        assert info["server_name"] == "rstmdb" and info["max_batch_ops"] == 100
        print("connect/ping/info ok")

        # machines
        put = await c.put_machine("order", 1, ORDER)
        assert put.created is True and put.machine == "order" and put.version == 1
        again = await c.put_machine("order", 1, ORDER)
        assert again.created is False and again.stored_checksum == put.stored_checksum
        got = await c.get_machine("order", 1)
        assert got.checksum == put.stored_checksum
        assert got.definition["transitions"][0]["from"] == ["created"]
        machines = await c.list_machines()
        assert machines == [{"machine": "order", "versions": [1]}], machines
        await expect_error(c.get_machine("order", 9), "MACHINE_NOT_FOUND")
        await expect_error(
            c.put_machine("bad", 1, {"states": ["a"], "initial": "x", "transitions": []}),
            "BAD_REQUEST",
        )
        print("machines ok")

        # instances: the client omits a falsy initial_ctx; ctx must be an object (D1)
        created = await c.create_instance("order", 1, instance_id="py-1", initial_ctx={"amount": 5})
        assert created.instance_id == "py-1" and created.state == "created"
        bare = await c.create_instance("order", 1)
        assert len(bare.instance_id) == 36
        inst = await c.get_instance(bare.instance_id)
        assert inst.ctx == {} and inst.state == "created"
        await expect_error(c.create_instance("order", 1, instance_id="py-1"), "INSTANCE_EXISTS")
        await expect_error(c.get_instance("nope"), "INSTANCE_NOT_FOUND")
        print("instances ok")

        # events
        applied = await c.apply_event("py-1", "PAY", payload={"by": "card"}, expected_state="created")
        assert applied.from_state == "created" and applied.to_state == "paid" and applied.applied is True
        assert applied.ctx == {"amount": 5, "by": "card"}
        inst = await c.get_instance("py-1")
        assert inst.state == "paid" and inst.last_wal_offset == applied.wal_offset
        await expect_error(c.apply_event("py-1", "SHIP", expected_state="created"), "CONFLICT")
        await expect_error(c.apply_event(bare.instance_id, "PAY"), "GUARD_FAILED")
        await expect_error(c.apply_event("py-1", "PAY"), "INVALID_TRANSITION")
        print("events ok")

        # idempotency (D6, D7)
        first = await c.apply_event("py-1", "SHIP", idempotency_key="ship-1")
        replay = await c.apply_event("py-1", "SHIP", idempotency_key="ship-1")
        assert first.applied is True and replay.applied is False
        assert replay.wal_offset == first.wal_offset and replay.to_state == "shipped"
        k1 = await c.create_instance("order", 1, idempotency_key="create-k")
        k2 = await c.create_instance("order", 1, idempotency_key="create-k")
        assert k1.instance_id == k2.instance_id and k1.wal_offset == k2.wal_offset
        print("idempotency ok")

        # list with paging
        for i in range(25):
            await c.create_instance("order", 1, instance_id=f"page-{i:02d}", initial_ctx={"amount": 1})
        seen = []
        offset = 0
        while True:
            page = await c.list_instances(machine="order", limit=6, offset=offset)
            seen += [s.id for s in page.instances]
            offset += len(page.instances)
            if not page.has_more:
                break
        assert len(seen) == len(set(seen)) == page.total == 28, (len(seen), page.total)
        assert seen == sorted(seen)
        shipped = await c.list_instances(state="shipped")
        assert [s.id for s in shipped.instances] == ["py-1"]
        print("list ok")

        # delete
        deleted = await c.delete_instance("page-00")
        assert deleted["deleted"] is True
        await expect_error(c.get_instance("page-00"), "INSTANCE_NOT_FOUND")
        print("delete ok")

        # WAL
        stats = await c.wal_stats()
        assert stats.entry_count > 0 and stats.segment_count >= 1 and stats.io_stats.fsyncs > 0
        wal = await c.wal_read(0, limit=5)
        assert len(wal["records"]) == 5 and wal["next_offset"] == wal["records"][-1]["offset"] + 1
        assert wal["records"][0]["entry"]["type"] == "put_machine"
        everything = []
        offset = 0
        while True:
            page = await c.wal_read(offset, limit=50)
            if not page["records"]:
                break
            everything += page["records"]
            offset = page["next_offset"]
        offsets = [r["offset"] for r in everything]
        assert offsets == sorted(set(offsets))
        assert applied.wal_offset in offsets
        print("wal ok")

        # batch through the low-level request API
        resp = await c._conn.request(
            Operation.BATCH,
            {
                "mode": "best_effort",
                "ops": [
                    {"op": "CREATE_INSTANCE", "params": {"instance_id": "b-1", "machine": "order", "version": 1}},
                    {"op": "GET_INSTANCE", "params": {"instance_id": "b-1"}},
                    {"op": "GET_INSTANCE", "params": {"instance_id": "missing"}},
                ],
            },
        )
        assert resp.status == "ok", resp
        results = resp.result["results"]
        assert [r["status"] for r in results] == ["ok", "ok", "error"]
        assert results[1]["result"]["state"] == "created"
        assert results[2]["error"]["code"] == "INSTANCE_NOT_FOUND"
        print("batch ok")
        await c.create_instance("order", 1, instance_id="w-1", initial_ctx={"amount": 2})
        await c.create_instance("order", 1, instance_id="py-2", initial_ctx={"amount": 2})

        # watch_all / watch_instance / unwatch, with events read through
        # the client's event iterator on a second connection
        async with Client(host, port) as w:
            sub_all = await w.watch_all(machines=["order"], to_states=["paid", "shipped"])
            sub_one = await w.watch_instance("w-1", include_ctx=False)
            assert sub_one.current_state == "created" and sub_one.instance_id == "w-1"
            none = await w.watch_all(events=["NEVER"])
            r1 = await c.apply_event("w-1", "PAY", payload={"n": 1})
            r2 = await c.apply_event("w-1", "SHIP")
            r3 = await c.apply_event("py-2", "PAY")
            got = []
            async def collect():
                async for ev in w.events():
                    got.append(ev)
                    if len(got) == 5:
                        return
            await asyncio.wait_for(collect(), timeout=10)
            per_sub = {}
            for ev in got:
                per_sub.setdefault(ev.subscription_id, []).append(ev.wal_offset)
            assert per_sub[sub_all.subscription_id] == [r1.wal_offset, r2.wal_offset, r3.wal_offset], per_sub
            assert per_sub[sub_one.subscription_id] == [r1.wal_offset, r2.wal_offset], per_sub
            assert none.subscription_id not in per_sub
            first = next(ev for ev in got if ev.subscription_id == sub_all.subscription_id)
            assert first.payload == {"n": 1} and first.ctx == {"amount": 2, "n": 1}
            assert all(ev.ctx is None for ev in got if ev.subscription_id == sub_one.subscription_id)
            removed = await w.unwatch(sub_all.subscription_id)
            assert removed.removed is True
            again = await w.unwatch(sub_all.subscription_id)
            assert again.removed is False
        print("watch ok")

        # FLUSH_ALL is disabled by default
        err = await expect_error(c.flush_all(), "BAD_REQUEST")
        assert "FLUSH_ALL is disabled" in err.message
        print("flush_all refusal ok")

    print("python client suite: all checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
