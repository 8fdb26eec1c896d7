"""Bad input at scale: generated configs, policy files, argument lists and corrupt snapshots (hypothesis).

The contract every generated input is held to, through `workbench.cli.main` in-process:
- exit code 2 (bad input);
- stderr is exactly one line `workbench: error: <message>` (a `WorkbenchError`), or, for an argument list
  argparse itself rejects, its usage lines (the first starts `usage:`, the others are indented) followed by
  exactly one line `workbench[ VERB]: error: <message>`;
- no traceback;
- nothing is written: no store is created, and a run's metrics and artifacts are as they were.
Every strategy only makes inputs that are bad by construction, so a valid one slipping through fails the test.
Examples are derandomized (CI sees the same ones every time); together the tests below try 600 inputs.
"""

from __future__ import annotations

import json
import re
import shutil
import string
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from safetensors.torch import save_file

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.policies import parse_policy
from workbench.snapshots import INDEX_FILE, SnapshotWriter, read_snapshot_dir, snapshot_file
from workbench.tracking import Tracker

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grokking.yaml"


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of `workbench ARGV`, argparse's own exits included."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's parser.error
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str) -> str:
    """The contract above; returns the error line."""
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    lines = err.rstrip("\n").split("\n")
    if lines[0].startswith("usage: workbench"):  # argparse: usage (maybe wrapped), then one error line
        assert all(line.startswith(" ") for line in lines[1:-1]), err
        assert re.fullmatch(r"workbench( [a-z]+)?: error: \S.*", lines[-1]), err
    else:
        assert len(lines) == 1 and lines[0].startswith("workbench: error: ") and len(lines[0]) > 20, err
    return lines[-1]


def assert_nothing_written(folder: Path) -> None:
    assert not (folder / "mlflow.db").exists() and not (folder / "mlruns").exists() and not (folder / "pwned").exists()


# --- configs ------------------------------------------------------------------------------------------

BASE = yaml.safe_load(CONFIG.read_text())
# (path, bad values): wrong types and out-of-range values of real fields.
NOT_A_NUMBER = st.one_of(
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from("abc"), st.integers(), min_size=1, max_size=2),
    st.text(alphabet=string.ascii_letters, min_size=1, max_size=8).filter(
        lambda s: s.lower() not in {"inf", "infinity", "nan", "true", "false", "yes", "no", "on", "off", "y", "n"}
    ),
)
BAD_FIELDS = {
    ("seed",): NOT_A_NUMBER,
    ("device",): st.text(max_size=8).filter(lambda s: s not in ("auto", "cpu", "cuda")),
    ("task", "op"): st.text(max_size=4).filter(lambda s: s not in ("+", "-", "*", "/", "x^2+xy+y^2")),
    ("task", "p"): st.one_of(st.integers(max_value=1), NOT_A_NUMBER),
    ("task", "train_fraction"): st.one_of(st.floats(min_value=1.0), st.floats(max_value=0.0), NOT_A_NUMBER),
    ("model", "hidden_size"): st.one_of(st.integers(max_value=0), NOT_A_NUMBER),
    ("model", "num_heads"): st.one_of(st.integers(max_value=0), st.integers(3, 63).filter(lambda h: 64 % h)),
    ("optim", "lr"): st.one_of(st.floats(max_value=0.0), NOT_A_NUMBER),
    ("train", "max_steps"): st.one_of(st.integers(max_value=0), NOT_A_NUMBER),
    ("snapshot", "pooling"): st.text(max_size=6).filter(lambda s: s not in ("token", "last", "mean", "answer")),
    ("snapshot", "layers"): st.one_of(
        st.text(max_size=4).filter(lambda s: s != "all"), st.lists(st.text(), min_size=1)
    ),
    ("tracking", "flush_seconds"): st.one_of(st.floats(max_value=0.0), NOT_A_NUMBER),
    ("policies",): st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=2)),
    ("task",): st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2)),
}


@st.composite
def bad_config_text(draw) -> str:
    data = json.loads(json.dumps(BASE))
    kind = draw(st.sampled_from(["field", "unknown key", "stage", "yaml", "not a mapping"]))
    if kind == "field":
        path = draw(st.sampled_from(list(BAD_FIELDS)))
        value = draw(BAD_FIELDS[path])
        node = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    elif kind == "unknown key":
        section = draw(st.sampled_from([None, "task", "model", "optim", "train", "snapshot", "tracking"]))
        key = "zz_" + draw(st.text(alphabet=string.ascii_lowercase, max_size=6))
        (data if section is None else data[section])[key] = draw(st.integers())
    elif kind == "stage":
        data["stage"] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=8).filter(lambda s: s != "grokking")))
    elif kind == "not a mapping":
        return yaml.safe_dump(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5))))
    else:  # broken YAML: a prefix no parser accepts, then anything
        broken = draw(
            st.sampled_from(
                [
                    "task: [unclosed\n",
                    "\tstage: grokking\n",
                    "stage: grokking: twice\n",
                    "stage: grokking\n  task: 1\n bad: 2\n",
                    "- a list\nstage: grokking\n",
                    "{stage: grokking\n",
                    "!!python/object/apply:os.system ['touch pwned']\n",
                    "stage: !!python/name:os.system\n",
                    '"unterminated\n',
                ]
            )
        )
        return broken + draw(st.text(max_size=30))
    return yaml.safe_dump(data)


@fuzz(150)
@given(text=bad_config_text(), binary=st.booleans())
def test_generated_bad_configs_are_one_line_errors(text, binary, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_bytes(text.encode() if not binary else b"\xff\xfe" + text.encode())  # binary: not UTF-8
    line = assert_one_line_error(*cli(["run", config, "train.max_steps=2"], capsys))
    assert str(config) in line
    assert_nothing_written(tmp_path)


BAD_OVERRIDE = st.one_of(
    st.sampled_from(["=3", "task.p", "a..b=1", ".p=1", "task.p.x=1", "task=3", "train.max_steps=-1", "seed=[1"]),
    st.builds(lambda k, v: f"zz_{k}={v}", st.text(alphabet=string.ascii_lowercase, max_size=5), st.integers()),
    st.builds(lambda v: f"task.p={v}", st.integers(max_value=1)),
    st.builds(lambda v: f"device={v}", st.text(alphabet=string.ascii_letters, min_size=1, max_size=6)).filter(
        lambda s: s not in ("device=auto", "device=cpu", "device=cuda")
    ),
)


@fuzz(60)
@given(override=BAD_OVERRIDE)
def test_generated_bad_overrides_are_one_line_errors(override, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = assert_one_line_error(*cli(["run", CONFIG, "train.max_steps=2", override], capsys))
    assert "override" in line or str(CONFIG) in line
    assert_nothing_written(tmp_path)


# --- policy files -------------------------------------------------------------------------------------

GOOD_RULE = {"name": "r", "when": {"metric": "train/loss", "above": 10}, "actions": ["stop"]}
CODE = "__import__('os').system('touch pwned')"  # policies are data: never evaluated


@st.composite
def bad_policy_text(draw) -> str:
    rule = json.loads(json.dumps(GOOD_RULE))
    kind = draw(
        st.sampled_from(
            ["action", "unknown key", "no test", "two kinds", "mode", "number", "name", "shape", "event", "yaml"]
        )
    )
    if kind == "action":
        rule["actions"] = draw(st.one_of(st.just([CODE]), st.lists(st.text(max_size=6), min_size=1, max_size=2)))
        if set(rule["actions"]) <= {"alert", "checkpoint", "stop", "hold"}:
            rule["actions"] = ["hold", "stop"]  # contradictory
    elif kind == "unknown key":
        target = rule if draw(st.booleans()) else rule["when"]
        target["zz_" + draw(st.text(alphabet=string.ascii_lowercase, max_size=5))] = draw(st.integers())
    elif kind == "no test":
        rule["when"] = {"metric": draw(st.text(min_size=1, max_size=10))}
    elif kind == "two kinds":
        rule["when"]["event"] = "grokking_forecast"
    elif kind == "mode":
        rule["when"] = {
            "metric": "eval/acc",
            "patience": 3,
            "mode": draw(st.text(max_size=4).filter(lambda s: s not in ("min", "max"))),
        }
    elif kind == "number":
        knob = draw(st.sampled_from(["above", "patience", "drop_from_peak", "warmup_steps", "for_snapshots"]))
        bad = {
            "above": st.one_of(st.just(CODE), st.lists(st.integers(), max_size=2)),
            "patience": st.integers(max_value=-1),
            "drop_from_peak": st.one_of(st.floats(min_value=1.0), st.floats(max_value=0.0)),
            "warmup_steps": st.one_of(st.integers(max_value=-1), st.just(CODE)),
            "for_snapshots": st.integers(max_value=0),
        }[knob]
        rule["when"][knob] = draw(bad)
        if knob == "patience":
            rule["when"]["mode"] = "min"
    elif kind == "name":
        rule["name"] = draw(st.one_of(st.just(""), st.text(min_size=101, max_size=120), st.integers(), st.none()))
    elif kind == "event":
        rule["when"] = {"event": "zz_" + draw(st.text(alphabet=string.ascii_lowercase, max_size=6))}
        rule["actions"] = ["hold"]
    elif kind == "shape":
        policy = draw(
            st.sampled_from([{"rules": [rule]}, rule, "stop", 3, [rule, rule], [rule, 3], [rule, [rule]], [rule, CODE]])
        )
        return yaml.safe_dump(policy)
    else:
        return draw(
            st.sampled_from(
                ["- name: [\n", "- {name: r\n", "\t- a\n", "!!python/object/apply:os.system ['touch pwned']\n"]
            )
        )
    return yaml.safe_dump([rule])


@pytest.fixture
def tiny_config(tmp_path):
    """The main job's config at a few steps, into a store under tmp_path (never created: runs are refused)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**BASE, "train": {"max_steps": 2, "eval_every": 1}}))
    return config


@fuzz(120)
@given(text=bad_policy_text())
def test_generated_bad_policy_files_are_one_line_errors(text, tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    line = assert_one_line_error(*cli(["run", tiny_config, "--policy", policy], capsys))
    assert str(policy) in line
    with pytest.raises(WorkbenchError) as refused:  # the app's editor validates the same way
        parse_policy(text)
    assert "\n" not in str(refused.value)
    assert_nothing_written(tmp_path)


# --- argument lists -----------------------------------------------------------------------------------


def make_snapshot_run(uri: str) -> str:
    """A finished run with 3 snapshots of 2 layers, 6 points x 4 dims, and one metric."""
    torch.manual_seed(0)
    tracker = Tracker.start(uri, "fuzz")
    index = {
        "pooling": "token",
        "dtype": "float16",
        "layers": ["layer_00", "layer_01"],
        "hidden_size": 4,
        "probe_ids": [1, 2],
        "points": [[1, p] for p in range(3)] + [[2, p] for p in range(3)],
    }
    writer = SnapshotWriter(tracker, index)
    for step in (0, 10, 20):
        writer.write(step, {name: torch.randn(6, 4) for name in index["layers"]})
    tracker.log_metrics({"train/loss": 1.0}, 0)
    tracker.finish()
    return tracker.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, run id, its snapshot folder): one real run the argument and snapshot tests aim at."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        run_id = make_snapshot_run(uri)
    artifacts = Path(MlflowClient(uri).get_run(run_id).info.artifact_uri.removeprefix("file://"))
    return uri, run_id, artifacts / "snapshots"


RUN_ID = st.one_of(
    st.text(alphabet=string.hexdigits, min_size=1, max_size=40),
    st.sampled_from(["../../etc/passwd", "/etc/passwd", "'; DROP TABLE runs; --", "%", "*", "run id", "é"]),
    st.text(alphabet=string.printable.strip(), min_size=1, max_size=20).filter(lambda s: not s.startswith("-")),
)
UNKNOWN_OPTION = st.builds(lambda s: f"--zz{s}", st.text(alphabet=string.ascii_lowercase, max_size=6))


@st.composite
def bad_argv(draw, uri: str, run_id: str, missing: str, policy: str) -> list[str]:
    """An argument list that is wrong in at least one way, for every verb."""
    store = ["--tracking-uri", uri]
    other_id = draw(RUN_ID.filter(lambda s: s != run_id))
    choices = [
        [
            draw(
                st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8).filter(
                    lambda s: s not in {"run", "analyze", "ls", "backtest", "stop", "attach", "resume", "events"}
                )
            )
        ],
        [],
        ["run"],
        ["run", missing],
        ["run", missing, "--policy", policy],
        ["run", str(CONFIG), draw(UNKNOWN_OPTION)],
        ["run", str(CONFIG), "--policy"],
        ["run", str(CONFIG), "--policy", missing],
        ["analyze", other_id, *store],
        ["analyze", run_id, *store, "--features", draw(st.text(alphabet="abcxyz_,", min_size=1, max_size=10))],
        ["analyze", run_id, *store, "--layers", str(draw(st.integers(min_value=2, max_value=99)))],
        ["analyze", run_id, "--tracking-uri", "sqlite:///" + missing + ".db"],
        ["analyze", run_id, "--tracking-uri", draw(st.sampled_from(["garbage://x", "http://127.0.0.1:9", "ftp://x"]))],
        ["ls", *store, "--limit", draw(st.text(alphabet="abc.x", min_size=1, max_size=4))],
        ["ls", *store, draw(UNKNOWN_OPTION)],
        ["ls", *store, "--experiment", "zz_" + draw(st.text(alphabet=string.ascii_lowercase, max_size=5))],
        ["backtest", missing, run_id, *store],
        ["backtest", policy, other_id, *store],
        ["stop", other_id, *store],
        ["stop", *store],
        ["attach", other_id, policy, *store],
        ["attach", run_id, missing, *store],
        ["resume", other_id, *store],
        ["events", other_id, *store],
        ["events", run_id, *store, draw(UNKNOWN_OPTION)],
    ]
    return draw(st.sampled_from(choices))


@fuzz(150)
@given(data=st.data())
def test_generated_bad_argument_lists_are_one_line_errors(data, store, tmp_path, monkeypatch, capsys):
    uri, run_id, _ = store
    monkeypatch.chdir(tmp_path)
    policy = tmp_path / "ok.yaml"
    policy.write_text(yaml.safe_dump([GOOD_RULE]))
    before = MlflowClient(uri).get_run(run_id).data
    argv = data.draw(bad_argv(uri, run_id, str(tmp_path / "missing"), str(policy)))
    assert_one_line_error(*cli(argv, capsys))
    after = MlflowClient(uri).get_run(run_id).data
    assert (after.metrics, after.tags) == (before.metrics, before.tags)
    assert_nothing_written(tmp_path)
    assert not Path(tmp_path / "missing.db").exists()


# --- corrupt snapshots and index ----------------------------------------------------------------------

STEP_FILE = snapshot_file(10)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)
WRONG_INDEX_VALUE = {  # index key: values the reader must refuse (the run has steps 0, 10, 20; 6 points x 4)
    "steps": st.one_of(
        st.text(max_size=5),
        st.integers(),
        st.lists(
            st.one_of(
                st.integers(max_value=-1),
                st.sampled_from(["../../../etc/passwd", "/etc/passwd", "0", 1.5, True, None, [0]]),
            ),
            min_size=1,
            max_size=3,
        ).map(lambda bad: [0, *bad]),
        st.just([0, 10, 20, 30]),  # a step whose file does not exist
    ),
    "layers": st.one_of(
        st.text(max_size=5),
        st.integers(),
        st.lists(st.one_of(st.integers(), st.none(), st.just(["layer_00"])), min_size=1, max_size=2),
        st.sampled_from([["layer_00"], ["layer_00", "layer_01", "layer_02"], ["../../x", "layer_01"]]),
    ),
    "dtype": st.one_of(st.text(max_size=8).filter(lambda s: s != "float16"), st.integers(), st.lists(st.none())),
    "hidden_size": st.one_of(st.integers().filter(lambda n: n != 4), st.text(max_size=3), st.none()),
    "points": st.one_of(st.lists(st.integers(), max_size=5), st.integers(), st.text(max_size=3), st.none()),
    "format_version": st.one_of(st.integers().filter(lambda n: n != 1), st.text(max_size=3), st.none()),
}


@st.composite
def corruption(draw):
    """(description, function that corrupts a copy of the run's snapshot folder)."""
    kind = draw(
        st.sampled_from(
            ["truncate", "garbage", "dtype", "shape", "names", "delete", "index bytes", "index json", "index key"]
        )
    )
    if kind == "truncate":
        cut = draw(st.floats(min_value=0, max_value=0.999))

        def apply(folder: Path) -> None:
            data = (folder / STEP_FILE).read_bytes()
            (folder / STEP_FILE).write_bytes(data[: int(len(data) * cut)])

    elif kind == "garbage":
        junk = draw(st.binary(max_size=200))
        apply = lambda folder: (folder / STEP_FILE).write_bytes(junk)  # noqa: E731
    elif kind in ("dtype", "shape", "names"):
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int8, torch.float64]))
        shape = draw(st.sampled_from([(7, 4), (6, 5), (6,), (6, 4, 1), (0, 4)]))
        names = draw(st.sampled_from([["layer_00"], ["layer_00", "layer_01", "layer_02"], ["layer_00", "x"]]))
        layers = {
            "dtype": {n: torch.zeros(6, 4, dtype=dtype) for n in ("layer_00", "layer_01")},
            "shape": {n: torch.zeros(shape, dtype=torch.float16) for n in ("layer_00", "layer_01")},
            "names": {n: torch.zeros(6, 4, dtype=torch.float16) for n in names},
        }[kind]
        apply = lambda folder: save_file(layers, str(folder / STEP_FILE))  # noqa: E731
    elif kind == "delete":
        apply = lambda folder: (folder / STEP_FILE).unlink()  # noqa: E731
    elif kind == "index bytes":
        junk = draw(st.one_of(st.binary(max_size=100), st.just(b"[" * 100000)))  # deeply nested JSON too
        apply = lambda folder: (folder / INDEX_FILE).write_bytes(junk)  # noqa: E731
    elif kind == "index json":
        value = draw(JSON.filter(lambda v: not isinstance(v, dict)) | st.just({}))
        apply = lambda folder: (folder / INDEX_FILE).write_text(json.dumps(value))  # noqa: E731
    else:
        key = draw(st.sampled_from([*WRONG_INDEX_VALUE, "probe_ids"]))
        remove = key == "probe_ids" or draw(st.booleans())
        value = None if remove else draw(WRONG_INDEX_VALUE[key])

        def apply(folder: Path) -> None:
            index = json.loads((folder / INDEX_FILE).read_text())
            if remove:
                del index[key]
            else:
                index[key] = value
            (folder / INDEX_FILE).write_text(json.dumps(index))

    return kind, apply


@fuzz(90)
@given(bad=corruption())
def test_generated_corrupt_snapshots_are_refused_naming_the_file(bad, store, tmp_path):
    _, _, snapshots = store
    folder = tmp_path / "snapshots"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(snapshots, folder)
    kind, apply = bad
    apply(folder)
    with pytest.raises(WorkbenchError) as refused:
        read_snapshot_dir(folder)
    message = str(refused.value)
    assert "\n" not in message and str(folder) in message, (kind, message)


@fuzz(30)
@given(bad=corruption())
def test_analyze_on_corrupt_snapshots_is_a_one_line_error_that_logs_nothing(bad, store, tmp_path, capsys):
    uri, run_id, snapshots = store
    kept = tmp_path / "kept"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(snapshots, kept)
    before = MlflowClient(uri).get_run(run_id).data.metrics
    try:
        bad[1](snapshots)
        line = assert_one_line_error(*cli(["analyze", run_id, "--tracking-uri", uri], capsys))
    finally:
        shutil.rmtree(snapshots)
        shutil.copytree(kept, snapshots)
    assert "snapshots" in line
    assert MlflowClient(uri).get_run(run_id).data.metrics == before
