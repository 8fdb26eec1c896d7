import re

import yaml
from mlflow import MlflowClient
from test_stages import CONFIGS, TINY

from workbench.cli import main


def write_chain(tmp_path, dpo_overrides, resume_from=None):
    chain = {
        "stage": "chain",
        "stages": [
            {"config": "configs/pretrain.yaml", "overrides": TINY},
            {"config": "configs/sft.yaml", "overrides": TINY},
            {"config": "configs/dpo.yaml", "overrides": TINY + dpo_overrides},
        ],
        "tracking": {"experiment": "chain"},
        "resume_from": resume_from,
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(chain))
    return path


def runs_of(client, parent_id):
    experiment = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return sorted(children, key=lambda r: r.info.start_time)


def test_a_failed_chain_keeps_its_finished_stages_and_resumes_from_them(tracking_uri, tmp_path, capsys):
    client = MlflowClient(tracking_uri)
    # The DPO stage gets a data file that does not exist: pretrain and SFT finish, DPO fails, exit 2.
    bad = write_chain(tmp_path, ["data.path=missing.jsonl"])
    assert main(["run", str(bad), f"tracking.uri={tracking_uri}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"chain stage 2 \(dpo, .*dpo.yaml\): data.path: missing.jsonl: no such file", error)
    experiment = client.get_experiment_by_name("chain").experiment_id
    [failed_parent] = client.search_runs([experiment], filter_string="tags.`workbench.stage` = 'chain'")
    first = runs_of(client, failed_parent.info.run_id)
    assert [r.data.tags["workbench.stage"] for r in first] == ["pretrain", "sft", "dpo"]
    assert [r.info.status for r in first] == ["FINISHED", "FINISHED", "FAILED"]
    pretrain, sft = first[0].info.run_id, first[1].info.run_id
    # Each stage starts from the previous stage's model, by reference.
    assert first[1].data.params["model.name_or_path"] == f"runs:/{pretrain}/model"
    assert first[2].data.params["model.name_or_path"] == f"runs:/{sft}/model"
    artifacts_before = {r: sorted(a.path for a in client.list_artifacts(r, "model")) for r in (pretrain, sft)}

    fixed = write_chain(tmp_path, [], resume_from=failed_parent.info.run_id)
    assert main(["run", str(fixed), f"tracking.uri={tracking_uri}"]) == 0
    out = capsys.readouterr().out
    parent = client.search_runs(
        [failed_parent.info.experiment_id],
        filter_string="tags.`workbench.stage` = 'chain'",
        order_by=["attribute.start_time DESC"],
    )[0]
    assert parent.info.run_id != failed_parent.info.run_id and parent.info.status == "FINISHED"
    [dpo] = runs_of(client, parent.info.run_id)  # only DPO ran again: pretrain and SFT were reused
    assert dpo.info.status == "FINISHED" and dpo.data.params["model.name_or_path"] == f"runs:/{sft}/model"
    tags = parent.data.tags
    assert [tags[f"workbench.chain.{i}.run_id"] for i in range(3)] == [pretrain, sft, dpo.info.run_id]
    assert f"{pretrain[:8]} (reused)" in out and f"{dpo.info.run_id[:8]} (ran)" in out and "gold/accuracy" in out
    # The parent's gold/accuracy at step i is stage i's: the task over the chain, stage by stage.
    history = client.get_metric_history(parent.info.run_id, "gold/accuracy")
    assert [m.step for m in history] == [0, 1, 2]
    assert "chain.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    for run_id, before in artifacts_before.items():  # earlier stages' runs are untouched
        assert client.get_run(run_id).info.status == "FINISHED"
        assert sorted(a.path for a in client.list_artifacts(run_id, "model")) == before

    # Resuming from the resumed chain reuses all three stages, wherever each ran.
    again = write_chain(tmp_path, [], resume_from=parent.info.run_id)
    assert main(["run", str(again), f"tracking.uri={tracking_uri}"]) == 0
    assert capsys.readouterr().out.count("(reused)") == 3


def test_a_stage_cannot_start_from_a_failed_stages_model(tracking_uri, capsys):
    from workbench.tracking import Tracker

    with Tracker.start(tracking_uri, "chain") as tracker:
        failed = tracker.run_id
    MlflowClient(tracking_uri).set_terminated(failed, "FAILED")
    overrides = [*TINY, f"model.name_or_path=runs:/{failed}/model", f"tracking.uri={tracking_uri}"]
    assert main(["run", str(CONFIGS / "sft.yaml"), *overrides]) == 2
    assert f"run {failed} is FAILED, not a finished stage" in capsys.readouterr().err
