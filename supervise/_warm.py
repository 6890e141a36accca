"""A spare worker process: ``python .../supervise/_warm.py GO_FILE PRELOAD -- (-m MODULE |
SCRIPT) ARGS...`` (run by its path, so that starting it imports nothing but the standard
library; see ``supervise.agents.workers``).

Imports the modules in PRELOAD (comma-separated; torch takes seconds) ahead of a restart,
creates GO_FILE with the suffix ``.warm`` to say so, then waits for GO_FILE: a JSON object
``{"env": {...}}`` with the generation's variables (RANK, MASTER_PORT, SUPERVISE_GENERATION,
...). It then runs the training command in this process as ``python -m MODULE`` or ``python
SCRIPT`` would, so a restart skips the interpreter start and the heavy imports. This module
uses the standard library only (it must configure nothing the job configures itself).
A rank other than 0 first waits for MASTER_PORT to accept connections (0.25 s at most, or
SUPERVISE_MASTER_WAIT seconds): a spare can otherwise reach it before rank 0's rendezvous store
listens, and torch's client then backs off 250-750 ms, longer after each refusal.

The imports run in a thread of Linux's idle scheduling class (SCHED_IDLE, that thread only):
the spare is started right after a restart, while training runs on every core, and must not
take CPU from it. The training command runs in the main thread, at its normal priority.

``--template SOCKET_FD AGENT_PID PRELOAD -- (-m MODULE | SCRIPT) ARGS...`` runs the node's
fork server instead: it imports PRELOAD once, in its main thread at normal priority, says
``{"ready": seconds}`` on the socket (an AF_UNIX SOCK_SEQPACKET end), then forks a spare for
each order ``{"go": GO_FILE}`` (with the spare's stdout and stderr write ends attached as
SCM_RIGHTS) and replies ``{"pid": N}`` or ``{"error": "..."}``. Each spare is forked through
an intermediate process that exits at once, so it becomes the agent's own child (the agent is
a child subreaper while it asks): the agent reaps it, reads its exit code and kills its
process group as for any worker. The spare leads its own session, arms PR_SET_PDEATHSIG
against the agent, and then waits for its go order as above. The template starts no thread
and touches no OpenMP pool, CUDA or process group, so a fork copies no lock held by another
thread; with Python threads running (a preload module started one) it refuses to fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import runpy
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

_POLL = 0.005  # seconds between looks for GO_FILE (a stat call: nothing while training runs)
_ADOPTION_WAIT = 5.0  # seconds a forked spare waits to become the agent's child, then exits
_MAX_ORDER = 65536  # bytes of one order on the template's socket
_PR_SET_PDEATHSIG = 1
# A rank other than 0 waits this long at most for rank 0's rendezvous store to listen at
# MASTER_PORT (torch's store client backs off 250-750 ms after a refused connection: the wait
# is never longer than its shortest backoff); SUPERVISE_MASTER_WAIT overrides it, 0 is off.
_MASTER_WAIT = 0.25
MASTER_WAIT_ENV = "SUPERVISE_MASTER_WAIT"
# The agent sets MASTER_WAIT_ENV to this once it saw the job's processes meet at MASTER_PORT:
# rank 0 will listen there again, if later (a replacement node's worker imports for seconds).
MASTER_WAIT_MET = 60.0
_MASTER_POLL = 0.002  # seconds between two connection attempts for the first _MASTER_WAIT,
_MASTER_POLL_LATER = 0.02  # then between two later ones (a remote master is asked gently)


def _usage(message: str) -> int:
    print(f"supervise._warm: {message}", file=sys.stderr, flush=True)
    return 2


def _preload(modules: str) -> None:
    for name in filter(None, modules.split(",")):
        try:
            importlib.import_module(name)
        except Exception as exc:  # the job imports it again and reports it in its own way
            print(
                f"supervise._warm: could not preload {name!r}: {type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )


def _set_idle_class() -> None:
    """Put the calling thread in the idle scheduling class (where the OS has one)."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _set_normal_class(thread: threading.Thread) -> None:
    """Move ``thread`` back to normal scheduling, where allowed (root, CAP_SYS_NICE)."""
    tid = thread.native_id
    if tid is not None:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


class _WarmUp(threading.Thread):
    """Imports PRELOAD in the idle scheduling class, then marks the spare ready."""

    def __init__(self, modules: str, go_file: str) -> None:
        super().__init__(name="supervise-warm")
        self._modules = modules
        self._go_file = go_file
        self._lock = threading.Lock()
        self._urgent = False

    def run(self) -> None:
        with self._lock:
            if not self._urgent:
                _set_idle_class()
        _preload(self._modules)
        with contextlib.suppress(OSError):  # the marker only informs: a spare works without it
            Path(self._go_file).with_suffix(".warm").touch()  # the agent reports it ready

    def hurry(self) -> None:
        """The go order came: finish the imports at normal priority (where allowed)."""
        with self._lock:
            self._urgent = True
            if self.is_alive():
                _set_normal_class(self)


def _wait_for(go_file: str) -> dict[str, str]:
    path = Path(go_file)
    while not path.exists():
        time.sleep(_POLL)
    order = json.loads(path.read_text(encoding="utf-8"))
    path.unlink()
    env = order.get("env") if isinstance(order, dict) else None
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError(f"{go_file}: expected {{'env': {{name: value, ...}}}}")
    return env


def _run_target(target: list[str], env: dict[str, str]) -> None:
    """Become the training process: ``python -m MODULE`` or ``python SCRIPT`` in place."""
    _match_threads(env)
    os.environ.update(env)
    _await_master(os.environ)
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        sys.path[0] = str(Path.cwd())
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        script = Path(target[0]).resolve()
        sys.argv = [target[0], *target[1:]]
        sys.path[0] = str(script.parent)
        runpy.run_path(target[0], run_name="__main__")


def _master_wait(env: Mapping[str, str]) -> float:
    """Seconds to wait for the master (``SUPERVISE_MASTER_WAIT`` or the default)."""
    value = env.get(MASTER_WAIT_ENV)
    if value is None:
        return _MASTER_WAIT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        print(
            f"supervise: {MASTER_WAIT_ENV}={value!r} is not a number of seconds >= 0; "
            f"waiting {_MASTER_WAIT} s for the master",
            file=sys.stderr,
            flush=True,
        )
        return _MASTER_WAIT
    return seconds


def _await_master(env: Mapping[str, str]) -> bool | None:
    """A spare starts in milliseconds, and a rank other than 0 can reach MASTER_PORT before
    rank 0's rendezvous store listens there: torch's client then sleeps 250-750 ms before it
    tries again (most of a warm restart). Connect first, every 2 ms, until the port accepts
    or the wait runs out (torch takes over then, as it would have). Returns whether the port
    accepted; None when there is nothing to wait for (rank 0, one process, no master)."""
    addr, raw = env.get("MASTER_ADDR"), env.get("MASTER_PORT", "")
    port = int(raw) if raw.isdigit() else 0
    alone = env.get("RANK", "0") == "0" or env.get("WORLD_SIZE", "1") in ("0", "1")
    if not addr or not 0 < port < 65536 or alone:
        return None
    limit = _master_wait(env)
    if limit <= 0:
        return None
    start = time.monotonic()
    while True:
        now = time.monotonic()
        left = start + limit - now
        if left <= 0:
            return False
        try:
            socket.create_connection((addr, port), timeout=left).close()
        except OSError:  # refused (not listening yet), unreachable, a name that resolves not
            time.sleep(_MASTER_POLL if now - start < _MASTER_WAIT else _MASTER_POLL_LATER)
            continue
        return True


def _match_threads(env: dict[str, str]) -> None:
    """A preloaded torch read OMP_NUM_THREADS when it was imported: a generation that sets
    another value gets it, as a fresh interpreter would (the pool starts at first use)."""
    torch = sys.modules.get("torch")
    value = env.get("OMP_NUM_THREADS")
    if torch is not None and value and value != os.environ.get("OMP_NUM_THREADS"):
        with contextlib.suppress(Exception):
            torch.set_num_threads(int(value))


def _check_target(target: list[str]) -> str | None:
    if target[0] == "-m" and len(target) < 2:
        return "-m needs a module name"
    return None


def main(argv: list[str]) -> int:
    """Preload, wait for the go order, then become the training process (or, with
    ``--template``, serve forks until the agent closes the socket)."""
    if argv[:1] == ["--template"]:
        return _template_main(argv[1:])
    if len(argv) < 4 or argv[2] != "--":
        return _usage("usage: GO_FILE PRELOAD -- (-m MODULE | SCRIPT) ARGS...")
    go_file, preload, target = argv[0], argv[1], argv[3:]
    problem = _check_target(target)
    if problem:
        return _usage(problem)
    warm = _WarmUp(preload, go_file)
    warm.start()
    env = _wait_for(go_file)
    warm.hurry()  # imports still running: finish them at full speed
    warm.join()
    _run_target(target, env)
    return 0


# --------------------------------------------------------------------------- fork server


class _Order:
    """What a freshly forked spare has to do: its go file and its output's write ends."""

    __slots__ = ("fds", "go_file")

    def __init__(self, go_file: str, fds: list[int]) -> None:
        self.go_file = go_file
        self.fds = fds


def _template_main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--" or not argv[0].isdigit() or not argv[1].isdigit():
        return _usage("usage: --template SOCKET_FD AGENT_PID PRELOAD -- (-m MODULE | SCRIPT) ...")
    sock_fd, agent, preload, target = int(argv[0]), int(argv[1]), argv[2], argv[4:]
    problem = _check_target(target)
    if problem:
        return _usage(problem)
    sock = socket.socket(fileno=sock_fd)
    order = _serve(sock, agent, preload)
    if order is None:
        return 0  # the agent closed the socket: its node stops
    return _spare(order, sock, agent, target)


def _serve(sock: socket.socket, agent: int, preload: str) -> _Order | None:
    """Preload, then fork a spare per order; returns in each forked spare (its order), or
    None in the template once the agent closed the socket."""
    started = time.monotonic()
    _preload(preload)  # the main thread, normal priority: once per node, while it starts
    ready = {"ready": round(time.monotonic() - started, 3), "threads": threading.active_count()}
    sock.send(json.dumps(ready).encode())
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_ORDER, 2)
        except OSError:
            return None
        if not data:
            return None
        forked: int | _Order | None = None
        error = ""
        try:
            go_file = json.loads(data)["go"]
            if not isinstance(go_file, str) or len(fds) != 2:
                raise ValueError("expected {'go': GO_FILE} and two file descriptors")
            forked = _fork_spare(go_file, fds)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        if isinstance(forked, _Order):
            return forked  # in the spare: the descriptors are its output now
        for fd in fds:
            os.close(fd)
        reply = {"pid": forked} if forked is not None else {"error": error}
        sock.send(json.dumps(reply).encode())


def _fork_spare(go_file: str, fds: list[int]) -> int | _Order:
    """Fork a spare through an intermediate that exits at once; the spare's pid (in the
    template, once the spare leads its own process group and the agent adopted it) or its
    order (in the spare)."""
    threads = threading.active_count()
    if threads > 1:  # a lock another thread holds would stay locked forever in the child
        raise RuntimeError(f"{threads} Python threads run in the template: forking is unsafe")
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:  # the intermediate: it never returns to the template's loop
        try:
            os.close(read_end)
            spare = os.fork()
        except BaseException:
            os._exit(1)
        if spare != 0:
            os._exit(0)  # the spare is orphaned: the agent (a child subreaper) adopts it
        # The spare: its own session and process group (as a spawned worker has) before the
        # agent hears of it, so that signalling its group by its pid reaches it from then on.
        try:
            os.setsid()
            os.write(write_end, b"%d" % os.getpid())
            os.close(write_end)
        except BaseException:
            os._exit(1)  # never back into the template's loop
        return _Order(go_file, fds)
    os.close(write_end)
    try:
        said = b""
        while chunk := os.read(read_end, 32):
            said += chunk
    finally:
        os.close(read_end)
        os.waitpid(middle, 0)  # once it is gone the spare is the agent's child
    if not said:
        raise OSError("the intermediate process could not fork the spare")
    return int(said)


def _spare(order: _Order, sock: socket.socket, agent: int, target: list[str]) -> int:
    """In a forked spare: take over its output, become the agent's, wait for the go order."""
    sock.close()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, target_fd in zip(order.fds, (1, 2), strict=True):
        os.dup2(fd, target_fd)
        os.close(fd)
    _adopted_by(agent)
    _reseed()
    with contextlib.suppress(OSError):
        Path(order.go_file).with_suffix(".warm").touch()
    env = _wait_for(order.go_file)
    _run_target(target, env)
    return 0


def _adopted_by(agent: int) -> None:
    """Wait until the agent is our parent, then have the kernel SIGKILL us when it dies."""
    deadline = time.monotonic() + _ADOPTION_WAIT
    while os.getppid() != agent:
        if time.monotonic() > deadline:
            raise SystemExit(f"supervise._warm: spare not adopted by the agent (pid {agent})")
        time.sleep(0.001)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != agent:  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)


def _reseed() -> None:
    """Forked spares would share the template's random state where a module seeded it from
    the OS at import (``random`` reseeds itself after a fork; numpy's global state does not)."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        with contextlib.suppress(Exception):
            numpy_random.seed()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
