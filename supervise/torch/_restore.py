"""Restore: load a verified version from an arena slot into the live model in place.

Every checksum is verified on the way; a version that fails is reported to the owner and the
next older one is tried. Standalone, the persist tier on disk is the fallback when RAM holds
nothing usable (under a node agent the agent brings what the cluster chose).
"""

from __future__ import annotations

import logging
import time

import attrs
import torch

from supervise.snapshot.client import Owner, Slot
from supervise.snapshot.errors import AgentUnavailable, CorruptSnapshot, SnapshotError
from supervise.snapshot.manifest import Manifest
from supervise.snapshot.persist import PersistTier
from supervise.snapshot.retention import RetentionRule, candidates
from supervise.torch import _state
from supervise.torch._copy import ArenaViews, copy_and_verify

log = logging.getLogger("supervise.torch.snapshotter")


@attrs.frozen(slots=True)
class RestoreStats:
    """What the last restore did: the version, where it came from, bytes, seconds, and how
    many newer versions failed verification first."""

    step: int
    source: str
    nbytes: int
    seconds: float
    fallbacks: int


class Restorer:
    """The restore side of a Snapshotter: candidates from the owner (and, standalone, from
    disk), verified copies into the live tensors, and what the owner must hear about them."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict[str, _state.Stateful],
        owner: Owner,
        arenas: ArenaViews,
        *,
        tier: PersistTier,
        rule: RetentionRule,
        standalone: bool,
        threads: int,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.extra = extra
        self._owner = owner
        self._arenas = arenas
        self._tier = tier
        self._rule = rule
        self.standalone = standalone
        self._threads = threads

    def restore(self, which: str | int, restore_optimizer: bool) -> RestoreStats | None:
        """Load the newest valid candidate for ``which``; None when there is none. Raises
        CorruptSnapshot when every candidate failed verification."""
        t0 = time.perf_counter()
        failures: list[str] = []
        tried_disk = False
        while True:
            for cand in self._owner.restore(which):
                try:
                    self._load(cand.manifest, cand.slot, restore_optimizer)
                except CorruptSnapshot as exc:
                    reason = str(exc)
                    failures.append(f"version {cand.info.step}: {reason}")
                    log.warning(
                        "version %d failed verification (%s); trying the next older one",
                        cand.info.step,
                        reason,
                    )
                    try:
                        self._owner.corrupt(cand.info.step, reason)
                    except AgentUnavailable:
                        raise
                    except SnapshotError as refused:  # e.g. dropped meanwhile: nothing to do
                        log.warning("version %d: %s", cand.info.step, refused)
                    continue
                self._owner.restored(cand.info.step)
                info = cand.info
                seconds = time.perf_counter() - t0
                return RestoreStats(info.step, info.source, info.nbytes, seconds, len(failures))
            # With an agent, the disk tier is the agent's: it brings what the cluster chose.
            if tried_disk or not self.standalone or not self._ingest_from_disk(which):
                break
            tried_disk = True
        if failures:
            raise CorruptSnapshot("no valid snapshot to restore: " + "; ".join(failures))
        return None

    def _load(self, manifest: Manifest, slot: Slot, restore_optimizer: bool) -> None:
        plan = _state.plan_restore(
            manifest, self.model, self.optimizer, self.extra, restore_optimizer=restore_optimizer
        )
        views = self._arenas.of(slot.arena)
        if any(dst.device.type == "cuda" for _, dst in plan.pairs):
            views.pin()
        entries = {e.name: e for e in manifest.tensors}
        items = []
        for name, dst in plan.pairs:
            e = entries[name]
            items.append((e, views.view(slot.slot, e), dst, views.address_of(slot.slot, e)))
        with torch.no_grad():
            bad = copy_and_verify(items, self._threads, manifest.checksum)
        if bad:
            raise CorruptSnapshot(f"checksum mismatch in {len(bad)} tensor(s), first {bad[0]!r}")
        _state.apply_restore(
            plan, self.model, self.optimizer, self.extra, restore_optimizer=restore_optimizer
        )

    def _ingest_from_disk(self, which: str | int) -> bool:
        """Bring the chosen version from the persist tier into RAM (verified on the way)."""
        entries = self._tier.entries()
        by_step = {e.manifest.step: e for e in entries}
        for info in candidates([e.info for e in entries], which, self._rule, None):
            e = by_step[info.step]
            raw = e.manifest.to_bytes()
            need = 2 * len(raw) + (64 << 10)
            self._arenas.arena = self._owner.attach(e.manifest.nbytes, need)
            slot = self._owner.begin()
            if slot is None:
                raise SnapshotError("no free arena slot to load a checkpoint from disk into")
            try:
                self._tier.load(
                    e, slot.arena.data(slot.slot, e.manifest.nbytes), threads=self._threads
                )
            except CorruptSnapshot as exc:
                log.warning("skipping checkpoint %s: %s", e.path, exc)
                self._owner.abort(slot)
                continue
            except BaseException:
                self._owner.abort(slot)
                raise
            self._owner.commit(slot, raw, source="disk")
            return True
        return False
