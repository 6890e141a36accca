"""The training-process side. The only package that imports torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervise.torch.snapshotter import CaptureStats, RestoreStats, Snapshotter

__all__ = ["CaptureStats", "RestoreStats", "Snapshotter"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from supervise.torch import snapshotter

        return getattr(snapshotter, name)
    raise AttributeError(f"module 'supervise.torch' has no attribute {name!r}")
