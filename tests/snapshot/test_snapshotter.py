import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from supervise.policy import Policy
from supervise.snapshot import CapacityError, CorruptSnapshot, SnapshotError
from supervise.snapshot.errors import FinishedJob
from supervise.snapshot.persist import CORRUPT_SUFFIX, JOB_ENV, RESUME_FINISHED_ENV, PersistTier
from supervise.torch import Snapshotter


class Counter:
    """A sampler-like extra object with tensor and non-tensor state."""

    def __init__(self) -> None:
        self.pos = 0
        self.perm = torch.randperm(10)

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "perm": self.perm, "t": (1, "a")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state["t"] == (1, "a")
        self.pos = state["pos"]
        self.perm = state["perm"]


class Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8, dtype=dtype)
        self.bn = torch.nn.BatchNorm1d(8, dtype=dtype)
        self.fc2 = torch.nn.Linear(8, 3, dtype=dtype)
        self.register_buffer("ticks", torch.zeros(2, dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ticks += 1
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x))))) * self.mask


def make_policy(tmp_path: Path, **snapshot: Any) -> Policy:
    return Policy.from_dict(
        {
            "snapshot": {"every_steps": 1, **snapshot},
            "retention": {"keep_last": 2},
            "persist": {"every_snapshots": 1, "path": str(tmp_path / "ckpt"), "keep": 3},
        }
    )


def disk_steps(ckpt: Path) -> list[int]:
    """The steps persisted in ``ckpt`` (in the job's directory, ``ckpt/<job>/``)."""
    [job] = [d.name for d in ckpt.iterdir() if d.is_dir()]
    return [e.manifest.step for e in PersistTier(ckpt, rank=0, keep=1, job=job).entries()]


def make_opt(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    snap: Snapshotter | None,
    steps: range,
    extra: Counter | None = None,
) -> None:
    for step in steps:
        x = torch.randn(5, 6, dtype=next(model.parameters()).dtype)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if extra is not None:
            extra.pos += 1
        if snap is not None:
            snap.step(step, {"loss": loss.item()})
            # A version still being written to disk holds its slot, and the next capture is
            # then skipped by design; waiting keeps every step captured on a slow disk.
            snap.flush()


def state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    ms = {k: v.clone() for k, v in model.state_dict().items()}
    os_ = opt.state_dict()
    st = {
        k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in v.items()}
        for k, v in os_["state"].items()
    }
    return ms, {"state": st, "groups": [dict(g) for g in os_["param_groups"]]}


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1]["groups"] == b[1]["groups"]
    for k, v in a[1]["state"].items():
        for n, t in v.items():
            assert (
                torch.equal(t, b[1]["state"][k][n])
                if torch.is_tensor(t)
                else t == b[1]["state"][k][n]
            )


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_in_place_is_exact_and_continues_identically(
    tmp_path: Path, kind: str, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    model, extra = Net(dtype), Counter()
    opt = make_opt(kind, model)
    snap = Snapshotter(
        model, opt, policy=make_policy(tmp_path), extra={"data": extra}, shm_dir=tmp_path
    )
    train(model, opt, snap, range(3), extra)
    snap.wait()
    saved, rng, pos = state(model, opt), torch.get_rng_state(), extra.pos
    params_before = [p.data_ptr() for p in model.parameters()]
    exp_avg_ptrs = [
        s.get("exp_avg", s.get("momentum_buffer")).data_ptr() for s in opt.state.values()
    ]
    train(model, opt, None, range(3, 6), extra)  # diverge
    after_ref = None
    assert snap.restore() == 2
    assert_same(saved, state(model, opt))
    assert torch.equal(torch.get_rng_state(), rng) and extra.pos == pos
    # in place: same storage, and nothing aliases the arena
    assert [p.data_ptr() for p in model.parameters()] == params_before
    assert [
        s.get("exp_avg", s.get("momentum_buffer")).data_ptr() for s in opt.state.values()
    ] == exp_avg_ptrs
    # continuing after the restore matches continuing before
    train(model, opt, None, range(3, 5), extra)
    after_ref = state(model, opt)
    assert snap.restore(2) == 2
    train(model, opt, None, range(3, 5), extra)
    assert_same(after_ref, state(model, opt))
    snap.close()


def test_fresh_process_restores_from_disk_into_lazily_created_adam_state(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Net()
    opt = make_opt("adam", model)
    with Snapshotter(model, opt, policy=make_policy(tmp_path), shm_dir=tmp_path) as snap:
        train(model, opt, snap, range(4))
        snap.flush()
        saved = state(model, opt)
    torch.manual_seed(99)
    model2 = Net()
    opt2 = make_opt("adam", model2)  # no state yet: created on restore
    with Snapshotter(model2, opt2, policy=make_policy(tmp_path), shm_dir=tmp_path) as snap2:
        assert [v.source for v in snap2.versions()] == ["disk", "disk", "disk"]
        assert snap2.restore() == 3
        assert snap2.last_restore is not None and snap2.last_restore.source == "disk"
        assert_same(saved, state(model2, opt2))


def test_persist_tier_writes_every_nth_snapshot_and_keeps_persist_keep(tmp_path: Path) -> None:
    policy = Policy.from_dict(
        {
            "snapshot": {"every_steps": 1},
            "retention": {"keep_last": 2},
            "persist": {"every_snapshots": 3, "path": str(tmp_path / "ckpt"), "keep": 2},
        }
    )
    model = Net()
    opt = make_opt("adamw", model)
    with Snapshotter(model, opt, policy=policy, shm_dir=tmp_path) as snap:
        train(model, opt, snap, range(10))  # snapshots of steps 0..9: the 3rd, 6th, 9th persist
    assert disk_steps(tmp_path / "ckpt") == [5, 8]


def test_capture_is_skipped_not_waited_for_while_the_disk_lags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    real_write = PersistTier.write

    def stuck_write(self: PersistTier, manifest: Any, data: memoryview) -> Path:
        assert release.wait(30)
        return real_write(self, manifest, data)

    monkeypatch.setattr(PersistTier, "write", stuck_write)
    model = Net()
    opt = make_opt("sgd", model)
    with Snapshotter(model, opt, policy=make_policy(tmp_path), shm_dir=tmp_path) as snap:
        try:
            captured = []
            with caplog.at_level(logging.WARNING):
                for step in range(6):
                    captured.append(snap.capture(step))
                    snap.wait()
            # keep_last=2 plus one slot in flight: every slot is pinned by a pending write
            assert captured == [True, True, True, False, False, False]
            assert "skipping the capture of step 3: no free arena slot" in caplog.text
            assert [(v.step, v.source) for v in snap.versions()] == [(1, "local"), (2, "local")]
        finally:
            release.set()  # a failed check must not leave close() waiting for the disk
        snap.flush()
        assert snap.capture(6)
        snap.flush()
        # RAM keeps the last 2; the disk keeps 3 (persist.keep), none of them lost
        assert [(v.step, v.source) for v in snap.versions()] == [
            (1, "disk"),
            (2, "local"),
            (6, "local"),
        ]
    assert disk_steps(tmp_path / "ckpt") == [1, 2, 6]


def test_weights_only_restore_leaves_the_optimizer(tmp_path: Path) -> None:
    model = Net()
    opt = make_opt("adam", model)
    snap = Snapshotter(model, opt, policy=make_policy(tmp_path), shm_dir=tmp_path)
    train(model, opt, snap, range(2))
    snap.wait()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, None, range(2, 4))
    opt_now = state(model, opt)[1]
    assert snap.restore(restore_optimizer=False) == 1
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert_same(({}, opt_now), ({}, state(model, opt)[1]))
    snap.close()


def test_flipped_byte_in_ram_falls_back_to_older_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = Net()
    opt = make_opt("sgd", model)
    pol = Policy.from_dict(
        {
            "snapshot": {"every_steps": 1},
            "retention": {"keep_last": 2},
            "persist": {"every_snapshots": 0, "path": str(tmp_path / "c")},
        }
    )
    snap = Snapshotter(model, opt, policy=pol, shm_dir=tmp_path)
    train(model, opt, snap, range(1))
    snap.wait()
    first = state(model, opt)
    train(model, opt, snap, range(1, 2))
    snap.wait()
    svc = snap._owner.service  # type: ignore[attr-defined]
    with svc.shard(0, 1) as sh:
        entry = next(t for t in sh.manifest.tensors if t.name == "model/fc1.weight")
        sh.data[entry.offset + 3] ^= 0x40
    with caplog.at_level(logging.WARNING):
        assert snap.restore() == 0
    assert "version 1 failed verification" in caplog.text
    assert_same(first, state(model, opt))
    assert [v.step for v in snap.versions()] == [0]
    assert snap.last_restore is not None and snap.last_restore.fallbacks == 1
    with svc.shard(0, 0) as sh:
        sh.data[0] ^= 1
    with pytest.raises(CorruptSnapshot, match="no valid snapshot"):
        snap.restore()
    snap.close()


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_newest_file_on_disk_is_set_aside_and_the_one_before_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    model = Net()
    opt = make_opt("sgd", model)
    with Snapshotter(model, opt, policy=make_policy(tmp_path), shm_dir=tmp_path) as snap:
        train(model, opt, snap, range(3))
        snap.flush()
    files = sorted((tmp_path / "ckpt").glob("*/step-*"))
    raw = bytearray(files[-1].read_bytes())
    if how == "flip":
        raw[-7] ^= 0x80
    else:
        del raw[-64:]
    files[-1].write_bytes(raw)
    with (
        Snapshotter(
            Net(), make_opt("sgd", Net()), policy=make_policy(tmp_path), shm_dir=tmp_path
        ) as snap2,
        caplog.at_level(logging.WARNING),
    ):
        assert snap2.restore() == 1
    reason = "checksum mismatch" if how == "flip" else "its header announces"
    assert reason in caplog.text
    assert files[-1].with_name(files[-1].name + CORRUPT_SUFFIX).exists()
    # Never offered again: a later process sees only the valid versions.
    with Snapshotter(Net(), policy=make_policy(tmp_path), shm_dir=tmp_path) as snap3:
        assert [v.step for v in snap3.versions()] == [0, 1]


def test_nothing_to_restore_is_a_fresh_start(tmp_path: Path) -> None:
    with Snapshotter(Net(), policy=make_policy(tmp_path), shm_dir=tmp_path) as snap:
        assert snap.restore() is None
        assert snap.versions() == []


def test_schedule_and_best(tmp_path: Path) -> None:
    model = Net()
    opt = make_opt("sgd", model)
    pol = Policy.from_dict(
        {
            "snapshot": {"every_steps": 3},
            "retention": {"keep_last": 1, "keep_best": 1},
            "persist": {"path": str(tmp_path / "c")},
        }
    )
    snap = Snapshotter(model, opt, policy=pol, shm_dir=tmp_path)
    captured = []
    for step, loss in enumerate([5.0, 1.0, 4.0, 3.0, 6.0, 7.0, 8.0]):
        if snap.step(step, {"loss": loss}):
            captured.append(step)
        snap.wait()
    assert captured == [0, 3, 6]
    assert [v.step for v in snap.versions()] == [3, 6]  # keep_last=1 plus the best loss
    assert snap.restore("best") == 3
    assert snap.capture(4, {"loss": 9.0})  # after rolling back to 3, version 6 is a dead future
    snap.wait()
    assert [v.step for v in snap.versions()] == [3, 4]
    snap.close()


def test_pause_tells_the_owner_once_for_nested_blocks_and_ends_with_the_outermost(
    tmp_path: Path,
) -> None:
    with Snapshotter(Net(), policy=make_policy(tmp_path), shm_dir=tmp_path) as snap:
        told: list[bool] = []
        snap._owner.service.add_pause_hook(lambda rank, paused: told.append(paused))
        with snap.pause():
            assert told == [True]  # before the long phase runs
            with snap.pause():  # e.g. a checkpoint inside an evaluation
                snap.step(0)  # stepping inside a pause is allowed
            assert told == [True]
        assert told == [True, False]
        with pytest.raises(RuntimeError, match="boom"), snap.pause():
            raise RuntimeError("boom")
        assert told == [True, False, True, False]  # ended by leaving the block, however
    with pytest.raises(SnapshotError, match="closed"), snap.pause():
        pass


def test_the_last_step_and_finish_tell_the_owner_that_training_ends(tmp_path: Path) -> None:
    policy = make_policy(tmp_path)
    with Snapshotter(Net(), policy=policy, shm_dir=tmp_path, total_steps=3) as snap:
        told: list[bool] = []
        snap._owner.service.add_pause_hook(lambda rank, paused: told.append(paused))
        snap.step(0)
        snap.step(1)
        assert told == []
        snap.step(2)  # the last of total_steps: a pause that never ends
        assert told == [True]
        with snap.pause():  # the final evaluation
            pass
        snap.finish()
        assert told == [True]
    policy = make_policy(tmp_path / "another")  # another job directory: the first finished
    with Snapshotter(Net(), policy=policy, shm_dir=tmp_path) as snap:  # no total_steps
        told = []
        snap._owner.service.add_pause_hook(lambda rank, paused: told.append(paused))
        snap.step(5)
        snap.finish()
        assert told == [True]


def test_memory_budget_too_small_is_a_clear_error(tmp_path: Path) -> None:
    pol = Policy.from_dict(
        {"retention": {"memory_budget": "4KiB"}, "persist": {"path": str(tmp_path / "c")}}
    )
    with Snapshotter(Net(), policy=pol, shm_dir=tmp_path) as snap:
        with pytest.raises(CapacityError, match=r"RAM budget \(retention.memory_budget"):
            snap.capture(0)


def test_too_small_shm_is_a_clear_error(tmp_path: Path, tiny_tmpfs: Path) -> None:
    big = torch.nn.Linear(1024, 512)
    with Snapshotter(big, policy=make_policy(tmp_path), shm_dir=tiny_tmpfs) as snap:
        with pytest.raises(CapacityError, match=r"has only .* free"):
            snap.capture(0)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        Snapshotter(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="state_dict"):
        Snapshotter(Net(), extra={"x": object()})  # type: ignore[dict-item]
    with Snapshotter(Net(), policy=make_policy(tmp_path), shm_dir=tmp_path) as snap:
        with pytest.raises(ValueError, match="step = -1"):
            snap.step(-1)
        with pytest.raises(TypeError, match="metric 'loss' = 'high' is not a number"):
            snap.step(1, {"loss": "high"})
        with pytest.raises(ValueError, match="which = 'newest'"):
            snap.restore("newest")
    with pytest.raises(SnapshotError, match="closed"):
        snap.capture(0)


def test_model_mismatch_is_refused_before_touching_anything(tmp_path: Path) -> None:
    model = Net()
    with Snapshotter(model, policy=make_policy(tmp_path), shm_dir=tmp_path) as snap:
        snap.capture(0)
        snap.flush()
    other = torch.nn.Linear(6, 8)
    before = other.weight.clone()
    with Snapshotter(other, policy=make_policy(tmp_path), shm_dir=tmp_path) as snap2:
        with pytest.raises(SnapshotError, match="the model does not match the snapshot"):
            snap2.restore()
    assert torch.equal(other.weight, before)


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.out = torch.nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    model = Tied()
    with Snapshotter(model, policy=make_policy(tmp_path), shm_dir=tmp_path) as snap:
        snap.capture(0)
        snap.wait()
        rng_bytes = torch.get_rng_state().numel()
        assert snap.last_capture is not None
        assert snap.last_capture.nbytes == 10 * 4 * 4 + rng_bytes
        w = model.emb.weight.detach().clone()
        with torch.no_grad():
            model.emb.weight.zero_()
        assert snap.restore() == 0
        assert torch.equal(model.out.weight, w) and model.out.weight is model.emb.weight


def test_unsupported_state_is_named(tmp_path: Path) -> None:
    class Weird:
        def state_dict(self) -> dict[str, Any]:
            return {"fn": print}

        def load_state_dict(self, s: Any) -> None:
            pass

    with Snapshotter(
        Net(), policy=make_policy(tmp_path), shm_dir=tmp_path, extra={"weird": Weird()}
    ) as snap:
        with pytest.raises(
            SnapshotError, match="extra/weird/fn: a builtin_function_or_method cannot"
        ):
            snap.capture(0)


@pytest.mark.gpu
def test_cuda_capture_and_restore(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = Net().cuda()
    opt = make_opt("adamw", model)
    pol = Policy.from_dict(
        {
            "snapshot": {"every_steps": 1, "staging_budget": "50%"},
            "persist": {"path": str(tmp_path / "c")},
        }
    )
    with Snapshotter(model, opt, policy=pol, shm_dir=tmp_path) as snap:
        for step in range(3):
            x = torch.randn(5, 6, device="cuda")
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            snap.step(step)
        snap.wait()
        views = snap._arenas.views
        assert views and all(v.pinned for v in views.values())  # cudaHostRegister
        saved, cuda_rng = state(model, opt), torch.cuda.get_rng_state()
        x = torch.randn(5, 6, device="cuda")  # moves the CUDA generator on
        model(x).pow(2).mean().backward()
        opt.step()
        assert not torch.equal(torch.cuda.get_rng_state(), cuda_rng)
        assert snap.restore() == 2
        assert_same(saved, state(model, opt))
        assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)


def test_optimizer_step_helps_finish_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import supervise.torch._capture as mod

    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])
    opt = make_opt("adam", model)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    snap = Snapshotter(model, opt, policy=make_policy(tmp_path), shm_dir=tmp_path)
    started, gate = threading.Event(), threading.Event()
    real = mod.memcopy_into_arena

    copied_by_worker = 0

    def gated(address: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        nonlocal copied_by_worker
        if threading.current_thread() is not threading.main_thread():
            copied_by_worker += 1
            if not started.is_set():
                started.set()
                gate.wait(30)  # the worker thread stalls on its first tensor
        real(address, src, dst)

    monkeypatch.setattr(mod, "memcopy_into_arena", gated)
    assert snap.capture(0)
    assert started.wait(30)
    captured = state(model, opt)
    job = snap._capture._job
    assert job is not None and not job.work.done.is_set()

    def release_when_all_taken() -> None:
        while job.work._next < len(job.work.items):
            threading.Event().wait(0.001)
        gate.set()

    helper = threading.Thread(target=release_when_all_taken)
    helper.start()
    model(torch.randn(2, 16)).sum().backward()
    opt.step()  # the pre-hook copies the remaining tensors itself, then waits for the first
    helper.join()
    snap.wait()
    assert snap.last_capture is not None and snap.last_capture.committed
    # The worker thread held its first tensor until every other one was taken: the optimizer
    # step's pre-hook copied all those itself (whether it then also waited is up to timing).
    assert copied_by_worker == 1 and len(job.work.items) > 1
    assert snap.restore() == 0
    assert_same(captured, state(model, opt))
    snap.close()


def test_malformed_environment_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(SnapshotError, match="LOCAL_RANK='first' in the environment"):
        Snapshotter(Net(), policy=make_policy(tmp_path), shm_dir=tmp_path)


def test_torch_and_manifest_dtypes_agree() -> None:
    from supervise.snapshot._dtypes import DTYPES
    from supervise.torch._copy import _DTYPES

    assert set(_DTYPES) == set(DTYPES)
    for name, dtype in _DTYPES.items():
        assert torch.empty((), dtype=dtype).element_size() == DTYPES[name][0]


def test_extra_takes_a_distributed_sampler_and_a_plain_dict(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.arange(8))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1)
    progress: dict[str, Any] = {"epoch": 0, "seen": [1, 2]}
    extra = {"sampler": sampler, "progress": progress}
    with Snapshotter(Net(), policy=make_policy(tmp_path), shm_dir=tmp_path, extra=extra) as snap:
        sampler.set_epoch(3)
        progress.update(epoch=3, seen=[1, 2, 3])
        order = list(sampler)
        snap.capture(7)
        snap.flush()
        sampler.set_epoch(9)
        progress.update(epoch=9, late=True)
        assert snap.restore() == 7
    assert sampler.epoch == 3 and list(sampler) == order
    assert progress == {"epoch": 3, "seen": [1, 2, 3]}  # the same dict, its contents restored


def test_extra_refuses_what_cannot_go_back(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"extra\['n'\] \(int\) has no state_dict\(\)"):
        Snapshotter(Net(), extra={"n": 3})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"extra\['d'\]: dict key 1 must be a string"):
        Snapshotter(Net(), extra={"d": {1: 2}})


def run_job(tmp_path: Path, steps: range, *, finish: bool = False) -> int | None:
    """A standalone training run in ``tmp_path``: restore, train, maybe ``finish()``."""
    model = Net()
    opt = make_opt("sgd", model)
    with Snapshotter(model, opt, policy=make_policy(tmp_path), shm_dir=tmp_path) as snap:
        start = snap.restore()
        train(model, opt, snap, steps)
        if finish:
            snap.finish()
    return start


def test_another_jobs_files_are_not_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(JOB_ENV, "first")
    assert run_job(tmp_path, range(3)) is None
    monkeypatch.setenv(JOB_ENV, "second")
    with caplog.at_level(logging.WARNING):
        assert run_job(tmp_path, range(2)) is None  # a fresh start, not step 2 of "first"
    [line] = [r.getMessage() for r in caplog.records if "of another job" in r.getMessage()]
    assert "(this job is 'second')" in line and "first/step-000000000002" in line
    monkeypatch.setenv(JOB_ENV, "first")
    assert run_job(tmp_path, range(3, 4)) == 2  # its own files are still there


def test_default_job_is_the_command_line_and_world_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(JOB_ENV, raising=False)
    monkeypatch.setattr("sys.argv", ["train.py", "--lr", "0.1"])
    run_job(tmp_path, range(2))
    assert run_job(tmp_path, range(2, 3)) == 1  # the same command resumes
    monkeypatch.setattr("sys.argv", ["train.py", "--lr", "0.2"])
    assert run_job(tmp_path, range(1)) is None  # another command is another job
    monkeypatch.setenv(JOB_ENV, "bad/name")
    with pytest.raises(SnapshotError, match=r"SUPERVISE_JOB='bad/name' in the environment"):
        Snapshotter(Net(), policy=make_policy(tmp_path), shm_dir=tmp_path)


def test_finished_job_is_not_resumed_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(JOB_ENV, "done")
    monkeypatch.delenv(RESUME_FINISHED_ENV, raising=False)
    assert run_job(tmp_path, range(3), finish=True) is None
    assert (tmp_path / "ckpt" / "done" / "finished.rank-00000.json").exists()
    with pytest.raises(FinishedJob, match=r"job 'done' already finished in .*SUPERVISE_RESUME"):
        Snapshotter(Net(), policy=make_policy(tmp_path), shm_dir=tmp_path)
    assert disk_steps(tmp_path / "ckpt") == [0, 1, 2]  # refusing touched nothing
    monkeypatch.setenv(RESUME_FINISHED_ENV, "1")
    assert run_job(tmp_path, range(3, 4)) == 2
    monkeypatch.delenv(RESUME_FINISHED_ENV)
    assert run_job(tmp_path, range(4, 5)) == 3  # running again, not finished: resumes


def test_restore_verifies_with_the_manifests_checksum_xxh3_or_legacy_xxhash64() -> None:
    import xxhash

    from supervise.snapshot import Checksum, TensorEntry
    from supervise.torch._copy import copy_and_verify

    src = torch.arange(3 << 18, dtype=torch.float32)  # 3 MiB: several hash-and-copy chunks
    raw = src.numpy().tobytes()
    for kind, fn in (
        (Checksum.XXH3_64, xxhash.xxh3_64_intdigest),
        (Checksum.XXH64, xxhash.xxh64_intdigest),
    ):
        entry = TensorEntry("w", "float32", tuple(src.shape), 0, len(raw), fn(raw))
        dst = torch.zeros_like(src)
        assert copy_and_verify([(entry, src, dst, src.data_ptr())], 2, kind) == []
        assert torch.equal(dst, src)
        other = Checksum.XXH64 if kind is Checksum.XXH3_64 else Checksum.XXH3_64
        assert copy_and_verify([(entry, src, torch.zeros_like(src), src.data_ptr())], 1, other) == [
            "w"
        ]


def test_checksums_run_at_the_lowest_priority_off_the_training_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import threading

    from supervise.snapshot import checksum
    from supervise.torch import _capture

    seen: list[tuple[int, int]] = []
    real = checksum.digests

    def spy(*args: Any, **kw: Any) -> list[int]:
        tid = threading.get_native_id()
        seen.append((tid, os.getpriority(os.PRIO_PROCESS, tid)))
        return real(*args, **kw)

    monkeypatch.setattr(_capture, "digests", spy)
    me = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, me)
    with Snapshotter(Net(), policy=make_policy(tmp_path), shm_dir=tmp_path) as snap:
        snap.capture(3)
        snap.flush()
        assert snap.restore() == 3  # committed with the checksums it computed
    [(tid, nice)] = seen
    assert tid != me and nice == _capture.CHECKSUM_NICE
    assert os.getpriority(os.PRIO_PROCESS, me) == before  # the training thread keeps its own
