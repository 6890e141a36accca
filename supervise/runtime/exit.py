"""Why a child (task, server, supervisor or OS process) exited: a public value type.

The node agent observes worker exits through these, so an OS process's exit code or signal is
carried along with the kind that drives restart decisions.
"""

from __future__ import annotations

import enum
import signal as _signal

import attrs

from supervise.runtime.errors import Shutdown


class ExitKind(enum.StrEnum):
    """OTP's three classes of exit reasons."""

    NORMAL = "normal"  # returned / exit code 0: transient children stay stopped
    SHUTDOWN = "shutdown"  # stopped on request or `raise Shutdown`: transient children stay stopped
    ABNORMAL = "abnormal"  # raised, non-zero exit code, or killed by a signal


def _signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _first_line(text: str) -> str:
    """One line of an exception's message (libraries raise multi-line ones): errors built
    from exit reasons stay one line; the exception itself is kept whole."""
    lines = text.strip().splitlines()
    if len(lines) <= 1:
        return text.strip()
    return f"{lines[0].rstrip()} [...]"


@attrs.frozen(slots=True)
class ExitReason:
    """Kind of exit plus what caused it: an exception, or an exit code / signal."""

    kind: ExitKind = attrs.field(converter=ExitKind)
    exit_code: int | None = None
    signal: int | None = None
    exception: BaseException | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_exception(cls, exc: BaseException) -> ExitReason:
        """`Shutdown` -> shutdown; anything else -> abnormal."""
        if isinstance(exc, Shutdown):
            return cls(ExitKind.SHUTDOWN, exception=exc)
        return cls(ExitKind.ABNORMAL, exception=exc)

    @classmethod
    def from_returncode(cls, returncode: int, *, stopped: bool = False) -> ExitReason:
        """An OS process's return code (negative = killed by that signal).

        ``stopped``: we asked it to stop, so whatever it exited with is a *shutdown*.
        """
        code = returncode if returncode >= 0 else None
        sig = -returncode if returncode < 0 else None
        if stopped:
            kind = ExitKind.SHUTDOWN
        elif returncode == 0:
            kind = ExitKind.NORMAL
        else:
            kind = ExitKind.ABNORMAL
        return cls(kind, exit_code=code, signal=sig)

    @property
    def abnormal(self) -> bool:
        """Whether a transient child is restarted for this reason."""
        return self.kind is ExitKind.ABNORMAL

    def __str__(self) -> str:
        parts: list[str] = [self.kind.value]
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}")
        if self.signal is not None:
            parts.append(f"signal {_signal_name(self.signal)}")
        if self.exception is not None:
            exc = self.exception
            text = _first_line(str(exc))
            parts.append(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
        return parts[0] if len(parts) == 1 else f"{parts[0]}: {', '.join(parts[1:])}"


NORMAL = ExitReason(ExitKind.NORMAL)
SHUTDOWN = ExitReason(ExitKind.SHUTDOWN)
