"""`supervise demo`: node agents on localhost train a real model while the demo injects a worker
crash, a hang, a node loss and a NaN; it prints the recovery timeline (from the agents' spans),
draws it, and checks the final parameters against a failure-free run, bit for bit.

Private: the command line (`supervise.cli.demo`) is the interface. torch is imported only
lazily, for the final comparison. The names below are imported on first use: the demo's
training workers (``python -m supervise._demo.train``) import this package at every (re)start
and need none of the harness (0.3 s of imports).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervise._demo.config import ALL_FAULTS, DemoConfig, FaultKind
    from supervise._demo.result import DemoResult
    from supervise._demo.scenario import run_demo

__all__ = ["ALL_FAULTS", "DemoConfig", "DemoResult", "FaultKind", "run_demo"]

_HOMES = {
    "ALL_FAULTS": "config",
    "DemoConfig": "config",
    "FaultKind": "config",
    "DemoResult": "result",
    "run_demo": "scenario",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
