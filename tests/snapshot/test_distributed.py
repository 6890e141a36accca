"""Two gloo ranks on loopback: time/metric triggers are decided collectively."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from snaphelp import Proc

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_on_best_captures_the_same_steps_on_every_rank(tmp_path: Path) -> None:
    port = str(free_port())
    script = str(Path(__file__).with_name("dist_worker.py"))
    procs = [Proc([script, str(r), port, str(tmp_path)], {"SUPERVISE_AGENT": ""}) for r in (0, 1)]
    try:
        results = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rc, out in results:
        assert rc == 0, out
    steps = [json.loads(out.strip().splitlines()[-1]) for _, out in results]
    # alone, rank 0 would capture [0, 1, 4] and rank 1 [0, 3]: together, the union
    assert steps[0] == steps[1] == [0, 1, 3, 4]
