"""What a capture holds and how it goes back: model, optimizer, RNG states and extras.

Tensors go to the arena by name (``model/<key>``, ``optimizer/state/3/exp_avg``,
``extra/<name>/...``, ``rng/torch``, ``rng/cuda/<i>``); everything else is the msgpack tree
stored in the manifest's ``extra`` field.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
import numpy as np
import torch

from supervise.snapshot._dtypes import DTYPES
from supervise.snapshot.errors import SnapshotError
from supervise.snapshot.manifest import Manifest
from supervise.torch import _tree
from supervise.torch._copy import dtype_name, torch_dtype


class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()`` (samplers, schedulers, ...)."""

    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any, /) -> Any: ...


@attrs.define(slots=True)
class Captured:
    """The live tensors of one capture and the non-tensor tree that refers to them."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    background: set[str]  # tensors only optimizer.step mutates: may be copied after returning
    tree: bytes


def cuda_in_use() -> bool:
    """Whether this process has initialised CUDA (then its RNG states are part of a capture)."""
    return torch.cuda.is_available() and bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def collect(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: Mapping[str, Stateful],
) -> Captured:
    """Gather references (no copies) to everything a restore needs."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    background: set[str] = set()
    params = {_key(p.detach()) for p in model.parameters()}
    if optimizer is not None:
        params |= {_key(p.detach()) for g in optimizer.param_groups for p in g["params"]}

    def add(name: str, t: torch.Tensor, *, movable: bool) -> None:
        t = t.detach()
        if t.layout != torch.strided or t.is_sparse or t.device.type == "meta":
            raise SnapshotError(f"{name}: only dense tensors can be snapshotted ({t.layout})")
        if dtype_name(t.dtype) not in DTYPES:
            raise SnapshotError(f"{name}: dtype {t.dtype} cannot be snapshotted")
        k = _key(t)
        if k in seen and t.numel():
            aliases[name] = seen[k]
            return
        seen[k] = name
        tensors[name] = t
        if movable:
            background.add(name)

    model_other: dict[str, Any] = {}
    for k, v in model.state_dict(keep_vars=False).items():
        if isinstance(v, torch.Tensor):
            add(f"model/{k}", v, movable=optimizer is not None and _key(v.detach()) in params)
        else:
            model_other[k] = v

    def on_tensor(path: str, t: torch.Tensor) -> _tree.TensorRef:
        add(path, t, movable=optimizer is not None and path.startswith("optimizer/"))
        return _tree.TensorRef(aliases.get(path, path), str(t.device))

    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if cuda_in_use():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    tree = {
        "model": model_other,
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "extra": {name: obj.state_dict() for name, obj in extra.items()},
        "rng": rng,
    }
    return Captured(tensors, aliases, background, _tree.pack(tree, on_tensor, ""))


@attrs.define(slots=True)
class RestorePlan:
    """Destinations for a version's tensors, and how to apply its non-tensor state after the
    bytes are in place and verified."""

    pairs: list[tuple[str, torch.Tensor]]  # (arena tensor name, destination)
    tree: Any
    tensors: dict[str, torch.Tensor]


def _device(ref: _tree.TensorRef) -> torch.device:
    dev = torch.device(ref.device)
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise SnapshotError(f"{ref.name} was captured on {dev}, which this process does not have")
    return dev


def _mismatch(what: str, only_snap: set[str], only_live: set[str]) -> SnapshotError:
    def few(names: set[str]) -> str:
        listed = sorted(names)
        return ", ".join(listed[:5]) + (f" (+{len(listed) - 5} more)" if len(listed) > 5 else "")

    parts = []
    if only_snap:
        parts.append(f"only in the snapshot: {few(only_snap)}")
    if only_live:
        parts.append(f"only in the {what}: {few(only_live)}")
    return SnapshotError(f"the {what} does not match the snapshot ({'; '.join(parts)})")


def plan_restore(
    manifest: Manifest,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: Mapping[str, Stateful],
    *,
    restore_optimizer: bool,
) -> RestorePlan:
    """Check the snapshot fits the live objects (before touching anything) and pick where
    each tensor goes: existing tensors when they match (in place), fresh ones otherwise."""
    manifest_tensors = {t.name: (t.dtype, t.shape) for t in manifest.tensors}
    aliases = manifest.aliases
    tree = _tree.unpack(manifest.extra)
    pairs: list[tuple[str, torch.Tensor]] = []
    tensors: dict[str, torch.Tensor] = {}

    def check(name: str, dst: torch.Tensor) -> None:
        dtype, shape = manifest_tensors[aliases.get(name, name)]
        if dtype_name(dst.dtype) != dtype or tuple(dst.shape) != shape:
            raise SnapshotError(
                f"{name} is {dtype}{list(shape)} in the snapshot but "
                f"{dtype_name(dst.dtype)}{list(dst.shape)} here"
            )

    live = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    snap = {n[6:] for n in [*manifest_tensors, *aliases] if n.startswith("model/")}
    if snap != set(live):
        raise _mismatch("model", snap - set(live), set(live) - snap)
    for k, dst in live.items():
        check(f"model/{k}", dst)
        pairs.append((aliases.get(f"model/{k}", f"model/{k}"), dst))

    def fresh(ref: _tree.TensorRef) -> torch.Tensor:
        dtype, shape = manifest_tensors[ref.name]
        t = torch.empty(shape, dtype=torch_dtype(dtype), device=_device(ref))
        tensors[ref.name] = t
        pairs.append((ref.name, t))
        return t

    if restore_optimizer and optimizer is not None:
        osd = tree.get("optimizer")
        if osd is None:
            raise SnapshotError(
                "the snapshot holds no optimizer state: restore with restore_optimizer=False"
            )
        saved = osd["param_groups"]
        if len(saved) != len(optimizer.param_groups) or any(
            len(s["params"]) != len(g["params"])
            for s, g in zip(saved, optimizer.param_groups, strict=True)
        ):
            raise SnapshotError(
                "the optimizer's parameter groups do not match the snapshot's "
                f"({[len(g['params']) for g in optimizer.param_groups]} parameters per group "
                f"here, {[len(s['params']) for s in saved]} in the snapshot)"
            )
        ids = [i for s in saved for i in s["params"]]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params, strict=True))
        for pid, state in osd["state"].items():
            live_state = optimizer.state.get(by_id[pid], {}) if pid in by_id else {}
            for key, value in state.items():
                if not isinstance(value, _tree.TensorRef):
                    continue
                cur = live_state.get(key)
                dtype, shape = manifest_tensors[value.name]
                if (
                    isinstance(cur, torch.Tensor)
                    and dtype_name(cur.dtype) == dtype
                    and tuple(cur.shape) == shape
                    and cur.device == _device(value)
                ):
                    tensors[value.name] = cur
                    pairs.append((value.name, cur))
                else:
                    fresh(value)
        for ref in _tree.refs(osd["param_groups"]):
            fresh(ref)

    snap_extra = tree.get("extra", {})
    if set(snap_extra) != set(extra):
        raise _mismatch("extra objects", set(snap_extra) - set(extra), set(extra) - set(snap_extra))
    for ref in _tree.refs(snap_extra):
        fresh(ref)
    for ref in _tree.refs(tree.get("rng", {})):
        if torch.device(ref.device).type != "cpu":
            raise SnapshotError(f"{ref.name}: RNG state must be a CPU tensor")
        fresh(ref)
    for ref in _tree.refs(tree.get("model", {})):
        fresh(ref)
    return RestorePlan(pairs, tree, tensors)


def apply_restore(
    plan: RestorePlan,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: Mapping[str, Stateful],
    *,
    restore_optimizer: bool,
) -> None:
    """Hand the non-tensor state (and the fresh tensors) to their owners; the model's
    tensors were already filled in place."""
    tree, tensors = plan.tree, plan.tensors
    model_other = _tree.resolve(tree.get("model", {}), tensors)
    if model_other:
        model.load_state_dict(model_other, strict=False)
    if restore_optimizer and optimizer is not None:
        optimizer.load_state_dict(_tree.resolve(tree["optimizer"], tensors))
    for name, obj in extra.items():
        obj.load_state_dict(_tree.resolve(tree["extra"][name], tensors))
    rng = _tree.resolve(tree.get("rng", {}), tensors)
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "python" in rng:
        random.setstate(rng["python"])
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        for i, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
