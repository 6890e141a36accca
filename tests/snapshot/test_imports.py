import subprocess
import sys


def test_the_torch_free_core_does_not_import_torch() -> None:
    code = (
        "import sys, supervise, supervise.snapshot, supervise.snapshot.service, "
        "supervise.snapshot.persist, supervise.snapshot.client, supervise.tasks, "
        "supervise.tasks._worker, supervise.tasks._pool_worker, supervise.tasks.pool; "
        "assert 'torch' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
