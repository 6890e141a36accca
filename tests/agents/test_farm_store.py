"""The farm's task table in the store (``--store``): saved fenced on the leader's election, a
deposed coordinator's save refused (it steps down), the next leader reads the queue back."""

from __future__ import annotations

import pytest
import trio

from supervise.agents.config import NodeConfig
from supervise.agents.farm_store import TASKS, FarmStoreTable
from supervise.agents.seat import StoreSeat
from supervise.policy import Policy
from supervise.store import EmbeddedStore, LeaseLost, parse_store_url
from supervise.tasks.control import FarmControl
from supervise.tasks.farm_messages import Query, Submit, TaskList, TaskReply
from supervise.tasks.resources import Resources
from supervise.tasks.spec import TaskSpec
from tests.tasks.farmkit import Farmlet, unwrap

NODES = ("127.0.0.1:29500", "127.0.0.1:29501")


def _seat(rank: int, store: EmbeddedStore) -> StoreSeat:
    config = NodeConfig(
        rank=rank,
        nodes=NODES,
        command=("true",),
        policy=Policy.from_dict({"cluster": {"peer_timeout": 2.0}}),
        store=parse_store_url("etcd://127.0.0.1:2379", job="farm"),
    )
    return StoreSeat(config, connect=lambda: store)


async def test_the_table_lives_in_the_store_and_survives_the_leader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = EmbeddedStore()
    seats = [_seat(0, store), _seat(1, store)]
    f = Farmlet(2)
    f.controls = [
        FarmControl(
            link,
            leader=seat.leader_rank,
            live=lambda: [0, 1],
            lease_s=3.0,
            durable=FarmStoreTable(seat),
            clock=trio.current_time,
            request_timeout=1.0,
        )
        for link, seat in zip(f.links, seats, strict=True)
    ]
    client = f.client()
    with pytest.RaisesGroup(LeaseLost, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(seats[0].run)
            await trio.sleep(1)
            await nursery.start(seats[1].run)
            for c in f.controls:
                await nursery.start(c.run)
            await trio.sleep(1)
            assert f.controls[0].leading and not f.controls[1].leading
            for i in range(3):
                spec = TaskSpec("tests.tasks.taskfuncs:ticks", (i,), task_id=f"t{i}")
                got = await client.request(0, Submit(spec.to_bytes(), Resources(0).to_json()))
                assert isinstance(got.body, TaskReply)
            saved = await store.range(f"/supervise/farm/{TASKS}", prefix=True)
            assert sorted(r.key.rsplit("/", 1)[1] for r in saved.records) == ["t0", "t1", "t2"]

            lease = (await store.get("/supervise/farm/leader")).lease  # type: ignore[union-attr]
            await store.revoke(lease)  # the leader froze past its lease
            await f.controls[0].link.request(  # a change it tries to save is refused
                0,
                Submit(
                    TaskSpec("tests.tasks.taskfuncs:ticks", (9,), task_id="late").to_bytes(),
                    Resources(0).to_json(),
                ),
            )
            await trio.sleep(2)
            assert not f.controls[0].leading and f.controls[1].leading
            got = unwrap(await client.request(1, Query()))
            assert isinstance(got, TaskList)
            assert [t["id"] for t in got.tasks] == ["t0", "t1", "t2"]  # "late" never acked
            await trio.sleep_forever()  # the first seat's keep-alive finds its lease gone
