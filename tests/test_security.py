"""Security: artifact paths stay inside the run, policies and indexes are data, nothing is unpickled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import save_file

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.policies import PolicyEngine, attach_policies, load_rules, parse_policy
from workbench.snapshots import INDEX_FILE, read_snapshot_dir, snapshot_file
from workbench.tracking import Tracker, run_artifact_path

ROOT = Path(__file__).resolve().parents[1]
ESCAPES = ["../x.txt", "a/../../x.txt", "snapshots/../../../x.txt", "/tmp/x.txt", "..", "", ".", "a\\..\\x.txt"]


@pytest.mark.parametrize("path", ESCAPES)
def test_artifact_paths_that_leave_the_run_are_refused(path):
    with pytest.raises(WorkbenchError, match="artifact path"):
        run_artifact_path(path)


def test_artifact_paths_are_normalised():
    assert run_artifact_path("snapshots/./index.json") == "snapshots/index.json"
    assert run_artifact_path("model/../snapshots//step.safetensors") == "snapshots/step.safetensors"


def test_tracker_writes_no_artifact_outside_the_run(tracking_uri, tmp_path):
    source = tmp_path / "payload.txt"
    source.write_text("payload")
    with Tracker.start(tracking_uri, "security") as tracker:
        for path in ("../../escaped.txt", "/tmp/escaped.txt"):
            with pytest.raises(WorkbenchError, match="artifact path"):
                tracker.log_text("payload", path)
        with pytest.raises(WorkbenchError, match="artifact path"):
            tracker.log_artifact(source, "../../escaped")
        tracker.log_text("inside", "notes/./a.txt")
    written = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("mlflow.db", "payload.txt"))
    assert written == ["a.txt"]  # only the legitimate artifact, under the run's folder
    assert MlflowClient(tracking_uri).list_artifacts(tracker.run_id, "notes")[0].path == "notes/a.txt"


@pytest.mark.parametrize("steps", [["../../../etc/passwd"], ["/etc/passwd"], [0, "../index"], [-1], [0.5]])
def test_snapshot_index_cannot_point_outside_the_run(tmp_path, steps):
    folder = tmp_path / "snapshots"
    folder.mkdir()
    save_file({"layer_00": torch.ones(1, 2)}, str(folder / snapshot_file(0)))
    index = {"format_version": 1, "pooling": "last", "dtype": "float32", "layers": ["layer_00"], "hidden_size": 2}
    (folder / INDEX_FILE).write_text(json.dumps({**index, "probe_ids": [1], "points": [[1, 0]], "steps": [0]}))
    assert read_snapshot_dir(folder).steps == [0]  # the folder is valid as written
    (folder / INDEX_FILE).write_text(json.dumps({**index, "probe_ids": [1], "points": [[1, 0]], "steps": steps}))
    with pytest.raises(WorkbenchError, match=r"index.json: steps: expected a list of steps >= 0"):
        read_snapshot_dir(folder)


def test_policy_yaml_cannot_construct_python_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = "!!python/object/apply:os.system ['touch pwned']\n"
    with pytest.raises(WorkbenchError, match="invalid YAML"):
        parse_policy(text)
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    assert main(["run", str(ROOT / "configs" / "grokking.yaml"), "--policy", str(policy)]) == 2
    assert not (tmp_path / "pwned").exists()


def test_code_in_a_policy_is_a_metric_name_never_evaluated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = "__import__('os').system('touch pwned')"
    rules = load_rules([{"name": code, "when": {"metric": code, "above": 1}, "actions": ["alert"]}])
    engine = PolicyEngine(rules, forecasters=[], console=False)
    engine.observe(1, {code: 2.0, "train/loss": 0.1})
    assert [f.name for f in engine.firings] == [code]  # it fired on the metric of that name, as data
    assert not (tmp_path / "pwned").exists()


def test_a_policy_file_holding_a_path_does_not_read_that_file(tmp_path):
    secret = tmp_path / "elsewhere.yaml"
    secret.write_text(yaml.safe_dump([{"name": "x", "when": {"metric": "m", "above": 0}, "actions": ["stop"]}]))
    policy = tmp_path / "policy.yaml"
    policy.write_text(str(secret))
    with pytest.raises(WorkbenchError, match=r"rule #1: expected a mapping"):
        parse_policy(policy.read_text())
    config = tmp_path / "config.yaml"
    from pipelines.grokking.config import GrokkingStageConfig

    with pytest.raises(WorkbenchError, match=re.escape(str(policy))):
        attach_policies(GrokkingStageConfig(), config, [policy])


UNSAFE = {
    "pickle": re.compile(r"\b(c?pickle|dill|joblib|cloudpickle|marshal|shelve)\b"),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only=True)"),
    "eval/exec": re.compile(r"(?<![.\w])(eval|exec)\("),
    "unsafe yaml": re.compile(r"yaml\.(load|unsafe_load|full_load|load_all)\(|Loader="),
    "numpy pickle": re.compile(r"allow_pickle\s*=\s*True"),
    "remote code": re.compile(r"trust_remote_code=True"),
}


def test_no_unsafe_deserialisation_in_the_source():
    """A guard beside the behavioural tests above: none of these constructs creeps back into the code."""
    sources = [ROOT / "app.py", *(p for d in ("workbench", "pipelines", "analysis") for p in (ROOT / d).rglob("*.py"))]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {name}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        for name, pattern in UNSAFE.items()
        if pattern.search(line.split("#")[0]) and not line.lstrip().startswith(('"', "'"))
    ]
    assert found == []
