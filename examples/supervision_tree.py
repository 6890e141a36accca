"""A small supervision tree: a crashing worker, a Server and an OS-process child.

    python examples/supervision_tree.py

root (one_for_one, auto_shutdown=any_significant)
├── counter   Server "counter": counts the work done
├── flaky     async worker: does some work, crashes twice, then keeps going
├── ticker    OS process (python): prints a few lines, fails once with exit code 3
└── director  temporary, significant: waits, reports, returns -> the tree shuts down

Every start, exit, restart and the final shutdown is printed as a timeline; the program ends
on its own after about three seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import structlog
import trio

import supervise as sv

T0 = 0.0


def timeline(_logger: Any, _name: str, event: dict[str, Any]) -> str:
    """Render one structlog event as a line of the timeline."""
    now = trio.current_time() - T0
    where = event.pop("supervisor", "")
    who = event.pop("child", "")
    name = event.pop("event")
    event.pop("log_level", None)
    exc = event.pop("exc_info", None)
    details = " ".join(f"{k}={v}" for k, v in event.items() if v is not None)
    if exc is not None and "error" not in event:
        details += f" error={exc!r}"
    path = f"{where}/{who}" if where and who else (where or who)
    return f"[{now:5.2f}s] {path:<16} {name:<24} {details}"


class Counter(sv.Server):
    async def init(self) -> None:
        self.done = 0

    def handle_call(self, request: Any) -> int:
        if request == "total":
            return self.done
        raise ValueError(f"unknown request {request!r}")

    def handle_cast(self, message: Any) -> None:
        self.done += message


CRASHES = {"left": 2}


async def flaky() -> None:
    """Reports work to the counter; crashes the first two times after 0.4 s."""
    counter = sv.whereis("counter")
    assert counter is not None
    for _ in range(4):
        await trio.sleep(0.1)
        counter.cast(1)
    if CRASHES["left"]:
        CRASHES["left"] -= 1
        raise RuntimeError("flaky worker lost its connection")
    await trio.sleep_forever()


TICKER = """
import os, sys, time
marker = os.path.join(sys.argv[1], "ticker-failed-once")
for i in range(3):
    print(f"tick {i}", flush=True)
    time.sleep(0.2)
if not os.path.exists(marker):
    open(marker, "w").close()
    print("ticker: simulated failure", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(60)
"""


async def director() -> None:
    """Lets the tree run, shows its state, then returns: a significant exit ends the tree."""
    await trio.sleep(2.5)
    counter = sv.whereis("counter")
    root = sv.whereis("root", sv.SupervisorRef)
    assert counter is not None and root is not None
    print(f"--- work done so far: {await counter.call('total')}")
    for info in await root.which_children():
        print(f"--- {info.id:<9} {info.state.value:<10} restarts={info.restarts}")


async def main(scratch: str) -> None:
    global T0  # noqa: PLW0603 (the example's clock origin)
    T0 = trio.current_time()
    ticker = Path(scratch) / "ticker.py"
    ticker.write_text(TICKER)
    tree = sv.Supervisor(
        [
            sv.child(Counter, id="counter", name="counter"),
            sv.child(flaky, id="flaky"),
            sv.child(
                sv.OsProcess([sys.executable, str(ticker), scratch]), id="ticker", shutdown=2.0
            ),
            sv.child(director, id="director", restart="temporary", significant=True),
        ],
        strategy="one_for_one",
        max_restarts=5,
        max_seconds=10,
        auto_shutdown="any_significant",
    )
    await tree.run(name="root")
    print("--- the tree shut down on its own")


if __name__ == "__main__":
    import tempfile

    structlog.configure(
        processors=[timeline],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
    )
    with tempfile.TemporaryDirectory() as scratch:
        trio.run(main, scratch)
