from pathlib import Path

import pytest
import torch
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import supervise.telemetry.lifecycle as setup
from supervise.policy import Policy
from supervise.telemetry import Telemetry, TelemetryConfig
from supervise.torch import Snapshotter


def test_capture_and_persist_are_spans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    tel = Telemetry.create(
        TelemetryConfig(),
        rank=0,
        span_processors=[SimpleSpanProcessor(exporter)],
        metric_readers=[InMemoryMetricReader()],
    )
    monkeypatch.setattr(setup._process, "current", tel)
    pol = Policy.from_dict({"persist": {"every_snapshots": 1, "path": str(tmp_path / "c")}})
    try:
        with Snapshotter(torch.nn.Linear(4, 4), policy=pol, shm_dir=tmp_path) as snap:
            snap.capture(3)
            snap.flush()
            nbytes = snap.last_capture.nbytes if snap.last_capture else -1
        spans = {s.name: s for s in exporter.get_finished_spans()}
        capture = spans["supervise.snapshot.capture"]
        persist = spans["supervise.snapshot.persist"]
        assert capture.attributes is not None and persist.attributes is not None
        assert capture.attributes["supervise.snapshot.step"] == 3
        assert capture.attributes["supervise.bytes"] == nbytes
        assert persist.attributes["supervise.snapshot.version"] == 3
    finally:
        tel.shutdown()


def test_torch_loggers_join_the_logging_pipeline() -> None:
    import io
    import json
    import logging

    from supervise.telemetry import configure_logging

    out = io.StringIO()
    configure_logging(stream=out)  # torch is imported: its loggers stopped propagating
    logging.getLogger("torch.distributed").warning("rendezvous %s lost", "tcp://x")
    [line] = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line["event"] == "rendezvous tcp://x lost"
    assert logging.getLogger("torch").propagate
