"""`supervise demo`: node agents on localhost train a real model while the demo injects a worker
crash, a hang, a node loss and a NaN; it prints the recovery timeline (from the agents' spans),
draws it, and checks the final parameters against a failure-free run, bit for bit.

Private: the command line (`supervise.cli.demo`) is the interface. torch is imported only
lazily, for the final comparison.
"""

from supervise._demo.config import ALL_FAULTS, DemoConfig, FaultKind
from supervise._demo.result import DemoResult
from supervise._demo.scenario import run_demo

__all__ = ["ALL_FAULTS", "DemoConfig", "DemoResult", "FaultKind", "run_demo"]
