"""Every validation rule, fed a bad value: the error names the key path, the value, what is allowed.

Each case is checked twice: from a TOML file (PolicyError, full key path) and, where the same
value can be given in Python, at construction (InvalidValue naming the field).
"""

from __future__ import annotations

import math
import pickle
import tomllib
from typing import Any

import attrs
import pytest

import supervise as sv
from supervise.policy import PolicyError, Problem
from supervise.policy.sections import DEFAULT_BACKOFF

SECTIONS: dict[str, type] = {
    "supervision": sv.Supervision,
    "snapshot": sv.SnapshotSchedule,
    "retention": sv.Retention,
    "replication": sv.Replication,
    "persist": sv.Persist,
    "recovery": sv.Recovery,
    "cluster": sv.Cluster,
}

# (TOML text, the key path the problem must name, a fragment of what is allowed)
CASES: list[tuple[str, str, str]] = [
    ("[supervision]\nmax_restarts = -1", "supervision.max_restarts", "integer >= 0"),
    ("[supervision]\nmax_restarts = 1.5", "supervision.max_restarts", "integer >= 0"),
    ("[supervision]\nmax_seconds = 0", "supervision.max_seconds", "duration > 0"),
    ('[supervision]\nmax_seconds = "5 parsecs"', "supervision.max_seconds", "unknown unit"),
    ("[snapshot]\nevery_steps = -1", "snapshot.every_steps", "integer >= 0"),
    ('[snapshot]\nevery_steps = "10"', "snapshot.every_steps", "integer >= 0"),
    ("[snapshot]\nevery_seconds = -5", "snapshot.every_seconds", "duration >= 0"),
    ('[snapshot]\nevery_seconds = "soon"', "snapshot.every_seconds", "durations are"),
    ("[snapshot]\nevery_seconds = true", "snapshot.every_seconds", "durations are"),
    ("[snapshot]\nevery_seconds = inf", "snapshot.every_seconds", "finite"),
    ('[snapshot]\non_best = " loss"', "snapshot.on_best", "metric name"),
    ("[snapshot]\non_best = 3", "snapshot.on_best", "must be a string"),
    ("[snapshot]\nmilestones = [0.0]", "snapshot.milestones[0]", "strictly between 0 and 1"),
    ("[snapshot]\nmilestones = [0.5, 1]", "snapshot.milestones[1]", "strictly between 0 and 1"),
    ('[snapshot]\nmilestones = [0.2, "x"]', "snapshot.milestones[1]", "strictly between"),
    ("[snapshot]\nmilestones = [true]", "snapshot.milestones[0]", "strictly between"),
    ("[snapshot]\nmilestones = [0.5, 0.5]", "snapshot.milestones", "must not repeat"),
    ("[snapshot]\nmilestones = 0.5", "snapshot.milestones", "array of numbers"),
    ('[snapshot]\nmilestones = "0.5"', "snapshot.milestones", "array of numbers"),
    ('[snapshot]\nstaging_budget = "101%"', "snapshot.staging_budget", "between 0% and 100%"),
    ('[snapshot]\nstaging_budget = "2GB"', "snapshot.staging_budget", "did you mean 'GiB'"),
    ("[snapshot]\nstaging_budget = -1", "snapshot.staging_budget", "negative"),
    ('[snapshot]\nstaging_budget = "1.5B"', "snapshot.staging_budget", "whole number of bytes"),
    ("[snapshot]\nstaging_budget = 1.5", "snapshot.staging_budget", "sizes are bytes"),
    ("[retention]\nkeep_last = 0", "retention.keep_last", "integer >= 1"),
    ("[retention]\nkeep_best = -1", "retention.keep_best", "integer >= 0"),
    ('[retention]\nbest_metric = ""', "retention.best_metric", "metric name"),
    ('[retention]\nbest_mode = "median"', "retention.best_mode", "'min', 'max'"),
    ('[retention]\nmemory_budget = "0%"', "retention.memory_budget", "more than 0"),
    ("[retention]\nmemory_budget = 0", "retention.memory_budget", "more than 0"),
    ('[retention]\nmemory_budget = "150%"', "retention.memory_budget", "between 0% and 100%"),
    ("[replication]\nreplicas = 0", "replication.replicas", "integer >= 1"),
    ('[replication]\nplacement = "star"', "replication.placement", "'group', 'ring'"),
    ("[replication]\nevery_seconds = -1", "replication.every_seconds", "duration >= 0"),
    ('[replication]\nevery_seconds = "soon"', "replication.every_seconds", "'30s'"),
    ('[replication]\ncurve = "yes"', "replication.curve", "true or false"),
    ("[replication]\ncurve = true", "replication.curve_keys", "required when curve = true"),
    ('[replication]\ncurve_keys = "/etc/keys"', "replication.curve_keys", "only used with"),
    ('[replication]\ncurve_keys = "a\\nb"', "replication.curve_keys", "control characters"),
    ("[persist]\nevery_snapshots = -1", "persist.every_snapshots", "integer >= 0"),
    ('[persist]\npath = ""', "persist.path", "non-empty path"),
    ('[persist]\npath = "  "', "persist.path", "non-empty path"),
    ("[persist]\npath = 5", "persist.path", "must be a string"),
    ("[persist]\nkeep = 0", "persist.keep", "integer >= 1"),
    ("[recovery]\nmax_attempts = -1", "recovery.max_attempts", "integer >= 0"),
    ('[recovery]\ncheckpoint = "oldest"', "recovery.checkpoint", "'latest', 'best', 'specific'"),
    ("[recovery]\nversion = -1", "recovery.version", "integer >= 0"),
    ('[recovery]\ncheckpoint = "specific"', "recovery.version", "needs the version"),
    ("[recovery]\nversion = 500", "recovery.version", "only used with checkpoint = 'specific'"),
    ("[recovery]\nrestore_optimizer = 1", "recovery.restore_optimizer", "true or false"),
    ("[recovery]\nheartbeat_timeout = 0", "recovery.heartbeat_timeout", "duration > 0"),
    ('[recovery]\nstartup_timeout = "-1s"', "recovery.startup_timeout", "durations are"),
    ('[recovery]\nhang_detection = "phi"', "recovery.hang_detection", "'adaptive', 'timeout'"),
    ("[recovery]\nhang_phi = 0", "recovery.hang_phi", "number > 0 and <= 100"),
    ("[recovery]\nhang_min_steps = 0.5", "recovery.hang_min_steps", "number >= 1"),
    ("[recovery]\nhang_min_silence = 0", "recovery.hang_min_silence", "duration > 0"),
    ('[recovery]\non_nan = "panic"', "recovery.on_nan", "'rollback', 'ignore', 'stop'"),
    ('[recovery]\non_no_snapshot = "zero"', "recovery.on_no_snapshot", "'stop', 'restart'"),
    ('[recovery]\non_recovery = "mod.func"', "recovery.on_recovery", "package.module:function"),
    ('[recovery]\non_failure = "a b:c"', "recovery.on_failure", "package.module:function"),
    ('[recovery]\non_failure = "pkg:class"', "recovery.on_failure", "package.module:function"),
    ('[recovery]\non_recovery = "pkg.:f"', "recovery.on_recovery", "package.module:function"),
    ('[recovery]\npreload = "torch"', "recovery.preload", "array of strings"),
    ('[recovery]\npreload = ["torch", 3]', "recovery.preload[1]", "module name"),
    ('[recovery]\npreload = ["numpy", "my-lib"]', "recovery.preload[1]", "module name"),
    ('[recovery]\npreload = ["torch", "torch"]', "recovery.preload", "must not repeat"),
    ("[recovery.backoff]\ninitial = -1", "recovery.backoff.initial", "duration >= 0"),
    ('[recovery.backoff]\ninitial = "abc"', "recovery.backoff.initial", "durations are"),
    (
        '[recovery.backoff]\ninitial = "5s"\nmax = "1s"',
        "recovery.backoff.max",
        "must be >= initial (5 s)",
    ),
    ("[recovery.backoff]\nmultiplier = 0.5", "recovery.backoff.multiplier", ">= 1"),
    ("[recovery.backoff]\njitter = 1.0", "recovery.backoff.jitter", "< 1"),
    ("[recovery.backoff]\njitter = -0.1", "recovery.backoff.jitter", ">= 0"),
    ("[recovery.backoff]\nreset_after = -1", "recovery.backoff.reset_after", "duration >= 0"),
    ('[recovery.backoff]\nreset_after = "1y"', "recovery.backoff.reset_after", "unknown unit"),
    ("[recovery.backoff]\nmultiplier = inf", "recovery.backoff.multiplier", "finite"),
    ('[recovery.backoff]\nmax = "soon"', "recovery.backoff.max", "durations are"),
    ("[cluster]\nheartbeat_interval = 0", "cluster.heartbeat_interval", "duration > 0"),
    ("[cluster]\npeer_timeout = 1.0", "cluster.peer_timeout", "longer than heartbeat_interval"),
    ('[cluster]\npeer_timeout = "x"', "cluster.peer_timeout", "durations are"),
    ("[cluster]\nrejoin_timeout = 0", "cluster.rejoin_timeout", "duration > 0"),
    (
        '[snapshot]\non_best = "accuracy"',
        "snapshot.on_best",
        "retention.best_metric = 'loss'",
    ),
    ('[recovery]\ncheckpoint = "best"', "recovery.checkpoint", "retention.keep_best >= 1"),
    ("snapshot = 5", "snapshot", "must be a table"),
    ("[recovery]\nbackoff = 3", "recovery.backoff", "must be a table"),
    ("[snapshot]\nevry_steps = 5", "snapshot.evry_steps", "did you mean 'snapshot.every_steps'?"),
    ("[retension]\nkeep_last = 2", "retension", "did you mean 'retention'?"),
    (
        "[cluster]\nheartbeat_timeout = 5",
        "cluster.heartbeat_timeout",
        "did you mean 'recovery.heartbeat_timeout'?",
    ),
    ("[recovery.backof]\nmax = 5", "recovery.backof", "did you mean 'recovery.backoff'?"),
    ("[persist]\nzzz = 1", "persist.zzz", "allowed: every_snapshots, path, keep"),
    ("colour = 1", "colour", "unknown key"),
]


def _problems(text: str) -> tuple[Problem, ...]:
    with pytest.raises(PolicyError) as info:
        sv.Policy.from_toml_text(text, source="bad.toml")
    return info.value.problems


@pytest.mark.parametrize(("text", "key", "allowed"), CASES, ids=[c[1] for c in CASES])
def test_file_error_names_the_key(text: str, key: str, allowed: str) -> None:
    problems = _problems(text)
    assert len(problems) == 1, problems
    (problem,) = problems
    assert problem.key == key
    assert problem.file == "bad.toml"
    assert allowed in problem.allowed
    line = str(problem)
    assert line.startswith(f"bad.toml: {key}")
    assert allowed in line
    assert "\n" not in line


def _python_construction(data: dict[str, Any]) -> None:
    sections = {}
    for name, raw in data.items():
        table = dict(raw)
        if name == "recovery" and isinstance(table.get("backoff"), dict):
            table["backoff"] = attrs.evolve(DEFAULT_BACKOFF, **table["backoff"])
        sections[name] = SECTIONS[name](**table)
    sv.Policy(**sections)


PYTHON_CASES = [
    c
    for c in CASES
    if c[1].split(".")[0] in SECTIONS
    and "did you mean" not in c[2]
    and "allowed:" not in c[2]
    and "table" not in c[2]
    and not c[1].startswith("recovery.backoff")  # the runtime's Backoff takes floats only
]


@pytest.mark.parametrize(("text", "key", "allowed"), PYTHON_CASES, ids=[c[1] for c in PYTHON_CASES])
def test_python_construction_names_the_field(text: str, key: str, allowed: str) -> None:
    data = tomllib.loads(text)
    with pytest.raises(sv.InvalidValue) as info:
        _python_construction(data)
    field = key.partition(".")[2]
    expected = key if "retention." in allowed else field  # the cross-section rules
    assert info.value.field == expected
    assert allowed in info.value.allowed


def test_a_lone_surrogate_in_python_is_refused_with_its_field() -> None:
    # TOML files are checked as UTF-8 before parsing; Python strings can hold what no file can
    with pytest.raises(sv.InvalidValue) as info:
        sv.Persist(path="\ud800")
    assert info.value.field == "path"
    assert "valid Unicode" in info.value.allowed


def test_backoff_in_python_names_its_field() -> None:
    with pytest.raises(sv.InvalidValue) as info:
        sv.Recovery(backoff=sv.Backoff(initial=5.0, max=1.0))
    assert info.value.field == "max"
    with pytest.raises(sv.InvalidValue) as info:
        sv.Recovery(backoff={"max": 5.0})  # type: ignore[arg-type]
    assert info.value.field == "backoff"


@pytest.mark.parametrize(
    "backoff",
    [
        sv.Backoff(initial=1.0, max=math.inf),
        sv.Backoff(initial=1.0, max=10.0, multiplier=math.inf),
        sv.Backoff(initial=1.0, max=10.0, reset_after=math.inf),
    ],
)
def test_a_policy_backoff_is_finite_in_python_too(backoff: sv.Backoff) -> None:
    """The runtime's Backoff allows infinity; a policy does not (its file form cannot hold
    it and must round-trip), so it is rejected at construction, naming the key."""
    with pytest.raises(sv.InvalidValue) as info:
        sv.Recovery(backoff=backoff)
    assert info.value.field.startswith("backoff.")
    assert info.value.value == math.inf
    assert "finite" in info.value.allowed


def test_sections_reject_wrong_types_in_python() -> None:
    with pytest.raises(sv.InvalidValue) as info:
        sv.Policy(snapshot=sv.Retention())  # type: ignore[arg-type]
    assert info.value.field == "snapshot"
    assert "SnapshotSchedule" in info.value.allowed


def test_every_problem_in_a_file_is_reported_at_once() -> None:
    text = """
[supervision]
max_restarts = -1
[snapshot]
evry_steps = 5
every_seconds = "5x"
milestones = [0.5, 1.5]
[retention]
best_mode = "mid"
[replication]
curve = true
[recovery]
checkpoint = "specific"
heartbeat_timeout = -1
[recovery.backoff]
initial = "10s"
max = "5s"
jitter = 1.5
[cluster]
peer_timeout = "500ms"
"""
    keys = [p.key for p in _problems(text)]
    assert keys == [
        "supervision.max_restarts",
        "snapshot.evry_steps",
        "snapshot.every_seconds",
        "snapshot.milestones[1]",
        "retention.best_mode",
        "replication.curve_keys",
        "recovery.heartbeat_timeout",
        "recovery.backoff.jitter",
        "recovery.backoff.max",
        "recovery.version",
        "cluster.peer_timeout",
    ]


def test_cross_section_rules_run_even_when_other_keys_are_bad() -> None:
    text = '[snapshot]\non_best = "acc"\nevery_seconds = "x"\n[retention]\nkeep_last = 0\n'
    keys = {p.key for p in _problems(text)}
    assert keys == {"snapshot.every_seconds", "retention.keep_last", "snapshot.on_best"}


def test_rules_reading_a_bad_key_are_skipped() -> None:
    # peer_timeout cannot be compared with a heartbeat_interval that did not parse
    keys = [p.key for p in _problems('[cluster]\nheartbeat_interval = "x"\npeer_timeout = 0.5')]
    assert keys == ["cluster.heartbeat_interval"]


def test_bad_value_is_shown_as_written() -> None:
    (problem,) = _problems("[recovery]\nheartbeat_timeout = -1")
    assert problem.value == -1
    assert str(problem) == (
        "bad.toml: recovery.heartbeat_timeout = -1: must be a duration > 0 "
        "(seconds, or a string like '30s', '5m', '1h', '250ms')"
    )
    (problem,) = _problems('[recovery.backoff]\ninitial = "5s"\nmax = "1s"')
    assert str(problem) == 'bad.toml: recovery.backoff.max = "1s": must be >= initial (5 s)'


def test_long_values_are_shortened_to_one_line() -> None:
    (problem,) = _problems(f'[persist]\npath = 5\n[snapshot]\non_best = "{"x" * 500}\\n"')[1:]
    line = str(problem)
    assert len(line) < 200 and "\n" not in line and "..." in line


def test_dict_errors_have_no_file() -> None:
    with pytest.raises(PolicyError) as info:
        sv.Policy.from_dict({"persist": {"keep": 0}})
    assert str(info.value) == "persist.keep = 0: must be an integer >= 1"
    assert info.value.file is None
    with pytest.raises(PolicyError, match="mapping of sections, not list"):
        sv.Policy.from_dict([])  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match=r"snapshot = \[1, 2\]: must be a table"):
        sv.Policy.from_dict({"snapshot": [1, 2]})
    with pytest.raises(PolicyError, match="unknown key"):
        sv.Policy.from_dict({1: {}})  # type: ignore[dict-item]


def test_errors_survive_pickling() -> None:
    with pytest.raises(PolicyError) as info:
        sv.Policy.from_toml_text("[persist]\nkeep = 0\n", source="p.toml")
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.problems == info.value.problems and str(copy) == str(info.value)
    with pytest.raises(PolicyError) as info:
        sv.Policy.from_toml_text("[persist", source="p.toml")
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
    with pytest.raises(sv.policy.UnitError) as unit:
        sv.Size.parse("2GB")
    assert str(pickle.loads(pickle.dumps(unit.value))) == str(unit.value)


def test_policy_error_is_a_value_error_with_problems() -> None:
    with pytest.raises(ValueError) as info:
        sv.Policy.from_dict({"persist": {"keep": 0, "path": ""}})
    error = info.value
    assert isinstance(error, sv.PolicyError)
    assert [p.key for p in error.problems] == ["persist.keep", "persist.path"]
    assert str(error).splitlines() == [str(p) for p in error.problems]
    with pytest.raises(ValueError, match="at least one"):
        PolicyError([])


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("[snapshot\nevery_steps = 1", 1, "'[snapshot'"),
        ("[snapshot]\nevery_steps 10\n", 2, "'every_steps 10'"),
        ("[a]\nx = 1\n[a]\n", 3, "'[a]'"),
        ('[persist]\npath = "unterminated\n', 2, "path ="),
        ("[snapshot]\nevery_steps = 1\nevery_steps = 2\n", 3, "every_steps = 2"),
    ],
)
def test_toml_syntax_error_gives_the_line(text: str, line: int, fragment: str) -> None:
    (problem,) = _problems(text)
    assert problem.line == line
    assert problem.key == ""
    assert str(problem).startswith(f"bad.toml:{line}: invalid TOML: ")
    assert fragment in str(problem)


def test_toml_error_at_the_end_of_the_file() -> None:
    (problem,) = _problems("x = ")
    assert "invalid TOML" in str(problem) and "end of the file" in str(problem)


def test_not_utf8_names_the_line() -> None:
    with pytest.raises(PolicyError) as info:
        sv.Policy.from_toml_text(b"[snapshot]\nevery_steps = 1\n\xff\xfe", source="bin.toml")
    assert str(info.value) == "bin.toml:3: not a UTF-8 text file (byte 0xff)"


def test_a_byte_order_mark_is_accepted() -> None:
    policy = sv.Policy.from_toml_text("\ufeff[snapshot]\nevery_steps = 7\n".encode())
    assert policy.snapshot.every_steps == 7


def test_deeply_nested_toml_is_an_error_not_a_crash() -> None:
    text = "x = " + "[" * 100_000 + "]" * 100_000
    (problem,) = _problems(text)
    assert "invalid TOML" in str(problem)
