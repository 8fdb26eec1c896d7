import json
import re
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.lm.config import GoldTaskConfig, ModelConfig
from pipelines.lm.models import build_causal_lm, train_tokenizer
from pipelines.lm.task import ReversalTask
from workbench.cli import main
from workbench.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from rl_figures import FAILURES, failure_shown  # noqa: E402

CONFIGS = ROOT / "configs"
# A 1-layer d=32 policy, 4 updates of 16 answers, snapshots at 0, 2, 4.
TINY = [
    "task.n_train=64",
    "task.n_eval=8",
    "train.max_steps=4",
    "train.eval_every=2",
    "train.batch_size=16",
    "snapshot.every=2",
    "snapshot.probes=8",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        yield f"sqlite:///{path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny untrained causal LM and its tokenizer, saved as a user's local model would be."""
    path = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(ReversalTask(GoldTaskConfig(n_pretrain=300)).pretraining_text(), 270)
    build_causal_lm(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1), tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_stage(tracking_uri, config, *overrides, exit_code=0):
    assert main(["run", str(config), *overrides, f"tracking.uri={tracking_uri}"]) == exit_code
    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["attribute.start_time DESC"]
    )
    return client, [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0]


def test_grpo_on_an_rm_trained_on_the_fly_logs_trls_rl_statistics_the_gold_check_and_geometry(store, saved_model):
    rm = ["reward.function=rm", "reward.rm_steps=2"]
    client, run = run_stage(
        store, CONFIGS / "grpo.yaml", *TINY, f"model.name_or_path={saved_model}", "group_size=4", "kl_coef=0.1", *rm
    )
    assert run.info.status == "FINISHED" and run.data.tags["workbench.reward"] == "rm"
    [rm_run] = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert rm_run.data.tags["workbench.stage"] == "rm" and rm_run.data.params["model.name_or_path"] == str(saved_model)
    assert run.data.tags["workbench.reward_model"] == f"runs:/{rm_run.info.run_id}/model"
    assert "rewards/rm_reward/mean" in run.data.metrics
    keys = {"reward", "reward_std", "kl", "entropy", "clip_ratio/region_mean", "completions/mean_length"}
    assert keys | {"gold/accuracy", "gold/reward", "geom/eff_rank/layer_01"} <= set(run.data.metrics)
    # The gold check sits in every training log, beside the proxy reward, and before and after training.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "gold/accuracy")] == [0, 2, 4, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward")] == [2, 4]


def test_ppo_with_lora_logs_trls_ppo_names_and_leaves_a_plain_model(store, saved_model):
    import mlflow
    from transformers import AutoModelForCausalLM

    client, run = run_stage(
        store,
        CONFIGS / "ppo.yaml",
        *TINY,
        f"model.name_or_path={saved_model}",
        "reward.function=self_confidence",
        "lora.enabled=true",
    )
    assert run.info.status == "FINISHED"
    ppo = {"objective/kl", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/value_avg", "loss/policy_avg"}
    assert ppo | {"reward", "reward_std", "entropy", "completions/mean_length", "gold/accuracy"} <= set(
        run.data.metrics
    )
    assert [m.step for m in client.get_metric_history(run.info.run_id, "geom/eff_rank/layer_01")] == [0, 2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "gold/accuracy")] == [0, 2, 4]
    # Self-feedback rewards are mean token probabilities; the approx-KL estimator (k3) is never negative.
    assert 0 < run.data.metrics["reward"] <= 1 and run.data.metrics["policy/approxkl_avg"] >= 0
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", tracking_uri=store)
    assert not any("lora" in name for name, _ in AutoModelForCausalLM.from_pretrained(local).named_parameters())


@pytest.mark.parametrize(
    ("config", "override", "message"),
    [
        ("grpo.yaml", "group_size=1", r"group_size: Input should be greater than or equal to 2"),
        ("ppo.yaml", "reward.function=applause", r"reward.function: Input should be 'rm', 'gold' or 'self_confid"),
        ("grpo.yaml", "kl_coef=-0.1", r"kl_coef: Input should be greater than or equal to 0"),
        ("ppo.yaml", "reward.model={other_rm}", r"reward.model: .*other_rm: its tokenizer does not match the policy"),
    ],
)
def test_bad_input_is_one_line_naming_the_field_and_exit_2(
    config, override, message, store, saved_model, tmp_path, capsys
):
    other_rm = tmp_path / "other_rm"  # a reward model on another tokenizer of the same size
    tokenizer = train_tokenizer(["entirely different words here"] * 50, 270)
    build_causal_lm(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1), tokenizer).save_pretrained(
        other_rm
    )
    tokenizer.save_pretrained(other_rm)
    override = override.format(other_rm=other_rm)
    run_stage(store, CONFIGS / config, *TINY, f"model.name_or_path={saved_model}", override, exit_code=2)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("workbench: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors


# --- the failure configs, shrunk: each fails the way it says, its control does not -----------------------

SMALL_TASK = ["task.letters=4", "task.length=4", "task.n_pretrain=2000", "task.n_train=500", "task.n_eval=32"]


@pytest.fixture(scope="module")
def small_models(store):
    """An SFT model that answers the 4-letter task at times (pretrain 300 + SFT 200 steps), and reward models
    trained from it for an unbiased and for a length-biased labeller, as the failure configs would train them
    on the fly (here once for all of them): {"sft": uri, 0.0: rm uri, 0.5: rm uri}."""
    quiet = [*SMALL_TASK, "snapshot.enabled=false", "train.eval_every=50"]
    _, pretrain = run_stage(store, CONFIGS / "pretrain.yaml", *quiet, "train.max_steps=300")
    start = f"model.name_or_path=runs:/{pretrain.info.run_id}/model"
    _, sft = run_stage(store, CONFIGS / "sft.yaml", *quiet, "train.max_steps=200", start)
    models = {"sft": f"runs:/{sft.info.run_id}/model"}
    for bias in (0.0, 0.5):
        overrides = [f"model.name_or_path={models['sft']}", f"task.length_bias={bias}", "train.max_steps=600"]
        _, rm = run_stage(store, CONFIGS / "rm.yaml", *quiet, *overrides)
        models[bias] = f"runs:/{rm.info.run_id}/model"
    return models


def series(client, run):
    keys = ("reward", "kl", "objective/kl", "entropy", "gold/accuracy")
    return {k: [m.value for m in client.get_metric_history(run.info.run_id, k)] for k in keys}


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "steps"), [("reward_hacking", 30), ("entropy_collapse", 120), ("kl_blowup", 100)])
def test_a_failure_config_fails_as_it_says_and_its_control_does_not(kind, steps, store, small_models):
    assert set(FAILURES) == {"reward_hacking", "entropy_collapse", "kl_blowup"}
    shrunk = [*SMALL_TASK, f"model.name_or_path={small_models['sft']}", "snapshot.enabled=false"]
    shrunk += [f"train.max_steps={steps}", "train.eval_every=5", "train.batch_size=32"]
    shown = {}
    for name in (kind, FAILURES[kind][1]):
        config = load_config(CONFIGS / "failure" / f"{name}.yaml")
        rm = [f"reward.model={small_models[config.task.length_bias]}"] if config.reward.function == "rm" else []
        client, run = run_stage(store, CONFIGS / "failure" / f"{name}.yaml", *shrunk, *rm)
        shown[name] = failure_shown(kind, series(client, run))
    assert shown == {kind: True, FAILURES[kind][1]: False}


def test_an_rm_run_handed_to_an_rl_stage_is_its_reward_and_its_base_the_policy(store, saved_model, tmp_path):
    """As in rlhf_chain.yaml: the stage after `rm` gets the RM's model as `model.name_or_path`."""
    data = tmp_path / "rank.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ReversalTask(GoldTaskConfig(n_train=16)).ranking_rows()))
    quiet = ["train.max_steps=2", "train.eval_every=2", "train.batch_size=8", "snapshot.enabled=false"]
    _, rm = run_stage(store, CONFIGS / "rm.yaml", *quiet, f"model.name_or_path={saved_model}", f"data.path={data}")
    rm_uri = f"runs:/{rm.info.run_id}/model"
    _, run = run_stage(store, CONFIGS / "ppo.yaml", *TINY, "snapshot.enabled=false", f"model.name_or_path={rm_uri}")
    assert run.info.status == "FINISHED" and run.data.tags["workbench.reward_model"] == rm_uri
    assert run.data.tags["workbench.policy_model"] == str(saved_model)
