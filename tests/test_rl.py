import json
import re
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipelines.lm.config import GoldTaskConfig, ModelConfig
from pipelines.lm.models import build_causal_lm, train_tokenizer
from pipelines.lm.ppo import response_advantages
from pipelines.lm.task import ReversalTask
from pipelines.policy_gradient import approx_kl, clipped_surrogate, clipped_value_loss, gae
from pipelines.tod.continual import vtrace
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


# --- PPO's and V-trace's arithmetic on values worked by hand (gamma = lambda = 0.5 keeps every figure exact) --


def test_gae_on_three_steps_bootstraps_the_last_value_and_stops_at_a_termination():
    rewards, values, next_value = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 1.0, 1.5]), torch.tensor(2.0)
    # No termination: delta = (1 + .5*1 - .5, 0 + .5*1.5 - 1, 2 + .5*2 - 1.5) = (1, -0.25, 1.5);
    # A_2 = 1.5, A_1 = -0.25 + .25*1.5 = 0.125, A_0 = 1 + .25*0.125 = 1.03125.
    running = gae(rewards, values, torch.zeros(3), next_value, 0.5, 0.5)
    assert running.tolist() == [1.03125, 0.125, 1.5]
    # The episode ends with step 1 (step 2 starts the next): delta_1 = 0 - 1 = -1 and A_1 = -1 (nothing from
    # step 2), A_0 = 1 + .25*(-1) = 0.75; step 2 is as before.
    ended = gae(rewards, values, torch.tensor([0.0, 1.0, 0.0]), next_value, 0.5, 0.5)
    assert ended.tolist() == [0.75, -1.0, 1.5]


def test_lm_response_advantages_end_the_episode_at_the_answers_last_token():
    # Row 0: a 2-token answer (EOS at token 1), then padding whose value 3.0 must not be bootstrapped; row 1
    # fills the token limit. The score is the reward at the last token.
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25, 3.0], [0.5, 0.25, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # Row 0: A_1 = 1 - 0.25 = 0.75 (nothing bootstrapped past EOS), A_0 = (.5*.25 - .5) + .25*.75 = -0.1875.
    # Row 1: A_2 = 1 - .5 = 0.5, A_1 = (.5*.5 - .25) + .25*.5 = 0.125, A_0 = (.5*.25 - .5) + .25*.125 = -0.34375.
    assert response_advantages(rewards, values, mask, 0.5, 0.5).tolist() == [
        [-0.1875, 0.75, 0.0],
        [-0.34375, 0.125, 0.5],
    ]


def test_clipped_surrogate_inside_and_outside_the_clip_range():
    ratio = torch.tensor([1.1, 1.5, 0.5, 1.5, 0.5])
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    # max(-A r, -A clip(r, 0.8, 1.2)): inside, -1.1; A > 0 above 1.2: -1.2 (no gain past the clip); A > 0 below
    # 0.8: -0.5 (the unclipped, pessimistic term); A < 0 above: 1.5 (unclipped); A < 0 below 0.8: 0.8 (clipped).
    assert clipped_surrogate(ratio, advantages, 0.2).tolist() == pytest.approx([-1.1, -1.2, -0.5, 1.5, 0.8])


def test_clipped_value_loss_gives_no_credit_for_moving_further_than_the_clip():
    old, returns = torch.tensor(1.0), torch.tensor(2.0)
    values = torch.tensor([1.1, 1.5, 0.5])
    # 0.5 max((V - 2)^2, (1 + clip(V - 1, -.2, .2) - 2)^2): V = 1.1 inside: 0.5*0.81; V = 1.5, towards the
    # return: the clipped 1.2 counts, 0.5*0.64; V = 0.5, away from it: its own 0.5*2.25.
    assert clipped_value_loss(values, old, returns, 0.2).tolist() == pytest.approx([0.405, 0.32, 1.125])


def test_k3_is_never_negative_and_its_mean_under_pi_old_is_the_kl():
    # (r - 1) - log r at r = 2, 1, 1/2: 1 - ln 2, 0, ln 2 - 0.5.
    logratio = torch.log(torch.tensor([2.0, 1.0, 0.5]))
    assert approx_kl(logratio).tolist() == pytest.approx([0.306853, 0.0, 0.193147], abs=1e-6)
    # pi_old = Bernoulli(0.5), pi = Bernoulli(0.25): r = 0.5 at x = 1, 1.5 at x = 0. E_old[k3] =
    # 0.5 (ln 2 - 0.5) + 0.5 (0.5 - ln 1.5) = 0.5 ln(4/3) = KL(pi_old || pi) = 0.5 ln 2 + 0.5 ln(2/3) = 0.143841.
    estimate = approx_kl(torch.log(torch.tensor([0.5, 1.5]))).mean()
    assert estimate.item() == pytest.approx(0.143841, abs=1e-6)


def test_vtrace_truncates_rho_and_c_on_a_two_step_trajectory():
    # pi/mu = 2 then 0.5, rho_bar = 1.5, lambda = 0.5: rho = (1.5, 0.5), c = lambda min(1, pi/mu) = (0.5, 0.25).
    # Row 0 runs on (bootstrap V = 4): delta_1 = 0.5 (2 + .5*4 - 2) = 1, delta_0 = 1.5 (1 + .5*2 - 1) = 1.5;
    # v_1 = 2 + 1 = 3, v_0 = 1 + 1.5 + gamma c_0 delta_1 = 1 + 1.5 + .5*.5*1 = 2.75;
    # advantages rho (r + gamma v_next - V): 1.5 (1 + .5*3 - 1) = 2.25 and 0.5 (2 + .5*4 - 2) = 1.
    # Row 1 ends with step 0 and has r_0 = 2: delta_0 = 1.5 (2 - 1) = 1.5, v_0 = 2.5, its advantage 1.5.
    log_rhos = torch.log(torch.tensor([[2.0, 0.5], [2.0, 0.5]]))
    rewards = torch.tensor([[1.0, 2.0], [2.0, 2.0]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    values, bootstrap = torch.tensor([[1.0, 2.0], [1.0, 2.0]]), torch.tensor([4.0, 4.0])
    vs, advantages = vtrace(log_rhos, rewards, dones, values, bootstrap, 0.5, 0.5, 1.5)
    assert vs.tolist() == [pytest.approx([2.75, 3.0]), pytest.approx([2.5, 3.0])]
    assert advantages.tolist() == [pytest.approx([2.25, 1.0]), pytest.approx([1.5, 1.0])]


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
    # So is the geometry of the policy's own answers against the starting policy's, for both layers (embeddings,
    # the block): 8 held-out prompts, the starting policy's answers to 4 the reference.
    for key in ("geom/answer_knn_gap/layer_00", "geom/answer_eff_rank/layer_01"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 2, 4]


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
    assert [m.step for m in client.get_metric_history(run.info.run_id, "geom/answer_knn_gap/layer_01")] == [0, 2, 4]
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
