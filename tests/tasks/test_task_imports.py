"""The tasks room is torch-free, its worker included (DESIGN §2)."""

import subprocess
import sys


def test_tasks_and_their_worker_do_not_import_torch() -> None:
    code = "import sys, supervise.tasks, supervise.tasks._worker; assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
