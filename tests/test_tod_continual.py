import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipelines.policy_gradient import gae
from pipelines.tod.config import ClearConfig, TODPPOSettings
from pipelines.tod.continual import ClearPPO, ReservoirBuffer, continual_metrics, vtrace
from pipelines.tod.data import DomainGoal, Goal, load_dataset
from pipelines.tod.ddpt import DDPTPolicy, DescribedSpace, encode_descriptions, load_descriptions
from pipelines.tod.env import DialogueEnv, Rewards
from pipelines.tod.evaluator import summarize
from pipelines.tod.policy import MLPPolicy, RuleExpert, ValueNetwork, behaviour_cloning_epoch, run_dialogues
from pipelines.tod.simulator import AgendaUser, GoalGenerator
from pipelines.tod.synthetic import DOMAINS, write_synthetic_dataset
from workbench.cli import main
from workbench.errors import WorkbenchError

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tod_continual.yaml")
TINY = [
    "continual.domains=[restaurant,hotel]",
    "train.max_steps=2",
    "train.eval_every=1",
    "env.eval_dialogues=5",
    "ppo.num_envs=2",
    "ppo.num_steps=16",
    "policy.hidden_size=16",
    "snapshot.every=1",
    "snapshot.probes=30",
    "continual.method=clear",  # the config's default too, set here so the run tests keep covering the replay path
    "continual.clear.replay_size=40",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_dataset(write_synthetic_dataset(tmp_path_factory.mktemp("tod"), 10, 0.0, 0), DOMAINS)


def make_env(dataset, seed=0, rewards=Rewards()):  # noqa: B008
    return DialogueEnv(dataset.ontology, dataset.db, DOMAINS, np.random.default_rng(seed), rewards=rewards)


# --- the user's emotion ----------------------------------------------------------------------------------


def test_user_is_dissatisfied_by_repeats_irrelevant_and_redundant_requests_and_satisfied_by_answers():
    goal = Goal({"hotel": DomainGoal({"area": "north"}, {}, ("phone",))})
    user = AgendaUser(goal, np.random.default_rng(0), max_acts=3)
    said = user.start()
    assert ("inform", "hotel", "area", "north") in said
    assert user.respond([("reqmore", "general", "", "")]) and user.emotion == "neutral"
    assert user.respond([("reqmore", "general", "", "")]) and user.emotion == "dissatisfied"  # the same turn again
    user.respond([("request", "hotel", "area", "")])  # the user said the area already
    assert user.emotion == "dissatisfied"
    user.respond([("request", "train", "day", "")])  # a domain the user does not want
    assert user.emotion == "dissatisfied"
    user.respond([("inform", "hotel", "phone", "0123")])
    assert user.emotion == "satisfied"
    user.respond([("nooffer", "hotel", "", "")])
    assert user.emotion == "dissatisfied"


def test_emotion_is_logged_as_rates_and_its_reward_weight_changes_only_dissatisfied_turns(dataset):
    goals = [
        GoalGenerator(dataset.ontology, dataset.db, ["hotel"], max_domains=1).sample(np.random.default_rng(i))
        for i in range(5)
    ]
    always_irrelevant = lambda state: [("request", "train", "day")]  # noqa: E731
    plain = run_dialogues(make_env(dataset), always_irrelevant, goals)
    penalised = run_dialogues(make_env(dataset, rewards=Rewards(dissatisfied=-2.0)), always_irrelevant, goals)
    assert summarize(plain)["tod/dissatisfied_rate"] == 1.0
    for a, b in zip(plain, penalised, strict=True):
        assert b.reward == pytest.approx(a.reward - 2.0 * a.emotions["dissatisfied"]) and a.emotions["dissatisfied"] > 0
    expert = summarize(run_dialogues(make_env(dataset), RuleExpert(make_env(dataset)), goals))
    assert expert["tod/dissatisfied_rate"] < 0.5 and expert["tod/satisfied_rate"] > 0


# --- replay and the continual-learning metrics ------------------------------------------------------------


def test_reservoir_keeps_every_transition_seen_with_the_same_probability():
    kept = np.zeros(1000)
    for trial in range(200):
        buffer = ReservoirBuffer(100, np.random.default_rng(trial))
        for start in range(0, 1000, 64):
            buffer.add({"x": torch.arange(start, min(start + 64, 1000))})
        assert len(buffer) == 100 and len(set(buffer.data["x"].tolist())) == 100
        kept[buffer.data["x"].numpy()] += 1
    first, last = kept[:500].sum() / kept.sum(), kept[500:].sum() / kept.sum()
    assert abs(first - last) < 0.05  # naive "keep the newest" would give 0 vs 1


def test_forgetting_and_forward_transfer_follow_the_literatures_definitions():
    success = [
        {"a": 0.9, "b": 0.2, "c": 0.1},
        {"a": 0.5, "b": 0.8, "c": 0.3},
        {"a": 0.4, "b": 0.6, "c": 0.7},
    ]
    untrained = {"a": 0.0, "b": 0.1, "c": 0.1}
    out = continual_metrics(success, untrained, ["a", "b", "c"])
    assert out["continual/forgetting"] == pytest.approx(((0.9 - 0.4) + (0.8 - 0.6)) / 2)
    assert out["continual/forward_transfer"] == pytest.approx(((0.2 - 0.1) + (0.3 - 0.1)) / 2)
    assert out["continual/earlier_success"] == pytest.approx(0.5) and out["continual/newest_success"] == 0.7


def test_vtrace_is_the_gae_return_on_policy_and_truncates_the_importance_weight_off_policy():
    torch.manual_seed(0)
    rewards, values, bootstrap = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3)
    dones = torch.zeros(3, 8)
    dones[0, 2] = dones[1, 7] = 1.0
    gamma, lam = 0.99, 0.95
    vs, adv = vtrace(torch.zeros(3, 8), rewards, dones, values, bootstrap, gamma, lam, 1.0)
    advantages = gae(rewards, values, dones, bootstrap, gamma, lam)  # PPO's GAE, itself tested on known values
    assert torch.allclose(vs, values + advantages, atol=1e-5)
    # One step: v_s = V + min(rho_bar, pi/mu) (r + gamma V' - V); an act pi no longer takes corrects nothing.
    r, v, boot = torch.tensor([[1.0], [1.0]]), torch.tensor([[0.5], [0.5]]), torch.tensor([2.0, 2.0])
    vs, adv = vtrace(torch.tensor([[np.log(3.0)], [-1e9]]), r, torch.zeros(2, 1), v, boot, 0.9, 1.0, 2.0)
    target = 1.0 + 0.9 * 2.0 - 0.5
    assert vs[:, 0].tolist() == pytest.approx([0.5 + 2.0 * target, 0.5]) and adv[1, 0] == 0.0


def _learner(dataset, buffer, clear, num_steps=16, lr=1e-2):
    env = make_env(dataset)
    torch.manual_seed(0)
    model, value = MLPPolicy(len(env.vectorise), len(env.actions), 16, 1), ValueNetwork(len(env.vectorise), 16)
    goals = iter(_goals(dataset, "hotel", 200))
    settings = TODPPOSettings(num_envs=2, num_steps=num_steps, lr=lr, num_minibatches=1)
    envs = [make_env(dataset, seed=s) for s in (1, 2)]
    return ClearPPO(model, value, envs, lambda: next(goals), settings, clear, buffer), env


def test_clear_stores_whole_pieces_with_the_behaviour_log_probs_and_the_state_after_each(dataset):
    buffer = ReservoirBuffer(4, np.random.default_rng(0))
    learner, _ = _learner(dataset, buffer, ClearConfig(replay_size=64), num_steps=32)
    learner.store = lambda rollout, next_obs, store=learner.store: (seen.append(rollout), store(rollout, next_obs))
    seen = []
    learner.iteration()
    rollout, data = seen[0], buffer.data
    assert learner.piece == 16 and len(buffer) == 4  # 2 envs x 32 turns = 4 pieces of 16
    # piece 1 = env 0, turns 16..31; the state after piece 0 is the first of piece 1
    assert torch.equal(data["obs"][1], rollout["obs"][16:32, 0]) and torch.equal(
        data["rewards"][2], rollout["rewards"][:16, 1]
    )
    assert torch.equal(data["next_obs"][0], data["obs"][1, 0]) and torch.equal(data["next_obs"][2], data["obs"][3, 0])
    mu = torch.distributions.Bernoulli(logits=data["logits"]).log_prob(data["actions"]).sum(-1)
    assert torch.allclose(data["logprobs"], mu, atol=1e-5) and torch.equal(
        data["logprobs"][1], rollout["logprobs"][16:, 0]
    )


def test_clear_off_policy_gradient_pushes_down_a_bad_act_the_policy_prefers_over_the_behaviour(dataset):
    """pi/mu > rho_bar on every replayed turn: a loss on the truncated ratio itself has no gradient there (the bug
    of the first version); V-trace's rho (r + gamma v' - V) grad log pi still pushes the costly act down."""
    env = make_env(dataset)
    buffer = ReservoirBuffer(8, np.random.default_rng(0))
    obs = torch.from_numpy(np.stack([env.vectorise(env.reset(g)) for g in _goals(dataset, "hotel", 8 * 16)]))
    actions = torch.zeros(8, 16, len(env.actions))
    actions[:4, :, 0] = 1.0  # act 0 taken in half the pieces, each of those turns costing 10
    behaviour = torch.full((8, 16, len(env.actions)), -3.0)
    behaviour[4:, :, 0] = 3.0  # mu took what it took with p = 0.05; pi (below) with p = 0.5: pi/mu = 10.5
    buffer.add(
        {
            "obs": obs.reshape(8, 16, -1),
            "actions": actions,
            "logprobs": torch.distributions.Bernoulli(logits=behaviour).log_prob(actions).sum(-1),
            "logits": behaviour,
            "rewards": torch.where(actions[..., 0] > 0, -10.0, 0.0),
            "dones": torch.ones(8, 16),
            "values": torch.zeros(8, 16),
            "next_obs": obs[:8],
            "stage": torch.zeros(8, dtype=torch.long),
        }
    )
    learner, _ = _learner(dataset, buffer, ClearConfig(replay_size=128, policy_cloning=0.0, value_cloning=0.0))
    learner.replay_pieces = 8
    head = learner.policy.head
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, -3.0)
    with torch.no_grad():
        head.bias[0] = 0.0

    def p_act0():
        return torch.sigmoid(learner.policy(obs).logits[:, 0]).mean().item()

    before = p_act0()
    for _ in range(10):
        learner.optimizer.zero_grad()
        learner.auxiliary_loss().backward()
        learner.optimizer.step()
    assert learner.replay_stats["rho"][0] == pytest.approx(1.0)  # every ratio truncated at rho_bar
    assert p_act0() < before - 0.2, (before, p_act0())


def test_clear_replay_leaves_alone_the_turns_the_policy_no_longer_takes(dataset):
    """rho = 0 gives a zero advantage; centring the replayed advantages (as PPO does its own) would push them."""
    env = make_env(dataset)
    obs = torch.from_numpy(np.stack([env.vectorise(env.reset(g)) for g in _goals(dataset, "hotel", 32)]))
    actions = torch.zeros(2, 16, len(env.actions))
    actions[0, :, 1] = 1.0  # piece 0 took act 1, which pi (below) never takes
    behaviour = torch.full((2, 16, len(env.actions)), -3.0)
    replay = {
        "obs": obs.reshape(2, 16, -1),
        "actions": actions,
        "logprobs": torch.distributions.Bernoulli(logits=behaviour).log_prob(actions).sum(-1),
        "logits": behaviour,
        "rewards": torch.linspace(-5.0, 10.0, 32).reshape(2, 16),
        "dones": torch.ones(2, 16),
        "values": torch.zeros(2, 16),
        "next_obs": obs[:2],
        "stage": torch.zeros(2, dtype=torch.long),
    }
    buffer = ReservoirBuffer(2, np.random.default_rng(0))
    learner, _ = _learner(dataset, buffer, ClearConfig(replay_size=32, policy_cloning=0.0, value_cloning=0.0))
    learner.buffer.sample = lambda n: replay
    torch.nn.init.zeros_(learner.policy.head.weight)
    torch.nn.init.constant_(learner.policy.head.bias, -3.0)  # pi = mu on piece 1: rho = 1
    with torch.no_grad():
        learner.policy.head.bias[1] = -40.0
    seen, forward = [], learner.policy.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits.retain_grad()
        seen.append(out.logits)
        return out

    learner.policy.forward = spy
    learner.auxiliary_loss().backward()
    grad = seen[0].grad
    assert grad[0].abs().max() < 1e-6 and grad[1].abs().max() > 1e-3


def test_clear_policy_cloning_pulls_the_policy_back_to_the_replayed_behaviour(dataset):
    env = make_env(dataset)
    buffer = ReservoirBuffer(4, np.random.default_rng(0))
    obs = torch.from_numpy(np.stack([env.vectorise(env.reset(g)) for g in _goals(dataset, "hotel", 64)]))
    behaviour, actions = torch.full((4, 16, len(env.actions)), -3.0), torch.zeros(4, 16, len(env.actions))
    buffer.add(
        {
            "obs": obs.reshape(4, 16, -1),
            "actions": actions,
            "logprobs": torch.distributions.Bernoulli(logits=behaviour).log_prob(actions).sum(-1),
        }
        | {"logits": behaviour, "rewards": torch.zeros(4, 16), "dones": torch.zeros(4, 16)}
        | {"values": torch.zeros(4, 16), "next_obs": obs[:4], "stage": torch.zeros(4, dtype=torch.long)}
    )
    clear = ClearConfig(replay_size=64, policy_cloning=1.0, value_cloning=1.0, cloning_targets="behaviour")
    learner, _ = _learner(dataset, buffer, clear)
    before = learner.auxiliary_loss().item()
    for _ in range(50):
        learner.optimizer.zero_grad()
        learner.auxiliary_loss().backward()
        learner.optimizer.step()
    assert learner.auxiliary_loss().item() < 0.5 * before
    assert learner.replay_stats["policy_cloning"][-1] < 0.2 * learner.replay_stats["policy_cloning"][0]


def test_final_cloning_targets_are_the_networks_at_each_domains_end_and_apply_to_earlier_domains_only(dataset):
    buffer = ReservoirBuffer(8, np.random.default_rng(0))
    clear = ClearConfig(replay_size=128, policy_cloning=1.0, value_cloning=1.0)  # cloning_targets: final
    learner, _ = _learner(dataset, buffer, clear, num_steps=32)
    learner.iteration()  # stores 4 pieces of stage 0 with the behaviour's logits, then updates the networks
    obs, stored = buffer.data["obs"][:4], buffer.data["logits"][:4].clone()
    learner.relabel()
    with torch.no_grad():
        now, values = learner.policy(obs).logits, learner.value(obs)
    assert not torch.allclose(stored, now)
    assert torch.equal(buffer.data["logits"][:4], now) and torch.equal(buffer.data["values"][:4], values)
    learner.auxiliary_loss()
    assert set(learner.replay_stats["policy_cloning"]) == {0.0}  # a domain's own turns are never cloned

    following = ClearPPO(
        learner.policy, learner.value, learner.envs, learner.sample_goal, learner.args, clear, buffer, 1
    )
    with torch.no_grad():
        following.policy.head.bias.add_(2.0)  # the next domain's training moved the policy
    following.auxiliary_loss()
    for _ in range(50):
        following.optimizer.zero_grad()
        following.auxiliary_loss().backward()
        following.optimizer.step()
    first, last = following.replay_stats["policy_cloning"][0], following.replay_stats["policy_cloning"][-1]
    assert first > 0.1 and last < 0.2 * first  # pulled back to the policy of stage 0's end


def _goals(dataset, domain, n, seed=0):
    generator = GoalGenerator(dataset.ontology, dataset.db, [domain], max_domains=1)
    rng = np.random.default_rng(seed)
    return [generator.sample(rng) for _ in range(n)]


# --- the description-conditioned policy ---------------------------------------------------------------------


def test_ddpt_trained_on_two_domains_acts_in_a_domain_it_never_saw_and_the_mlp_does_not(dataset):
    """Behaviour cloning of the rule expert on restaurant and hotel only; attraction is new to both networks."""
    env = make_env(dataset)
    expert = RuleExpert(env)
    states, targets = [], []
    for goal in _goals(dataset, "restaurant", 40) + _goals(dataset, "hotel", 40, seed=1):
        state, done = env.reset(goal), False
        while not done:
            acts = expert(state)
            states.append(env.vectorise(state))
            targets.append(env.actions.mask(acts))
            state, _, done = env.step(acts)
    states, targets = torch.from_numpy(np.stack(states)), torch.from_numpy(np.stack(targets))
    torch.manual_seed(0)
    space = DescribedSpace(env.actions, env.vectorise, load_descriptions(None, env.actions, env.vectorise))
    success = {}
    for name, model in (
        ("ddpt", DDPTPolicy(space, 32, 1)),
        ("mlp", MLPPolicy(len(env.vectorise), len(env.actions), 32, 1)),
    ):
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(30):
            behaviour_cloning_epoch(model, optimizer, states, targets, 64, torch.Generator().manual_seed(0))
        model.eval()
        scores = run_dialogues(make_env(dataset, seed=5), model.greedy(env), _goals(dataset, "attraction", 30, seed=9))
        success[name] = summarize(scores)["tod/success_rate"]
    assert success["ddpt"] >= 0.5 and success["mlp"] <= 0.2, success


def test_a_description_file_changes_the_words_and_a_missing_entry_is_named(dataset, tmp_path):
    env = make_env(dataset)
    names = load_descriptions(None, env.actions, env.vectorise)
    richer = json.loads(json.dumps(names))
    richer["slots"]["attraction"]["area"] = "part of town where the museum, park or college is"
    path = tmp_path / "descriptions.json"
    path.write_text(json.dumps(richer))
    space = DescribedSpace(env.actions, env.vectorise, load_descriptions(path, env.actions, env.vectorise))
    assert "museum" in space.vocabulary
    del richer["slots"]["hotel"]["area"]
    path.write_text(json.dumps(richer))
    with pytest.raises(Exception, match=r"descriptions.json: slots.hotel.area: missing description"):
        load_descriptions(path, env.actions, env.vectorise)


def test_a_local_transformers_encoder_describes_the_acts_frozen_and_a_bad_path_is_named(dataset, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    env = make_env(dataset)
    space = DescribedSpace(env.actions, env.vectorise, load_descriptions(None, env.actions, env.vectorise))
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *sorted(space.vocabulary)])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24
    )
    BertModel(config).save_pretrained(tmp_path)

    acts, features = encode_descriptions(str(tmp_path), space)
    assert acts.shape == (len(env.actions), 2, 12) and features.shape == (len(env.vectorise), 2, 12)
    reqmore = env.actions.acts.index(("reqmore", "general", ""))
    assert torch.all(acts[reqmore, 1] == 0) and not torch.allclose(acts[0, 1], acts[1, 1])  # no slot: zeros
    model = DDPTPolicy(space, 16, 1, (acts, features))
    assert model.words is None and model.act_proj.in_features == 24  # the encoder is not trained: no weights here
    state = torch.from_numpy(env.vectorise(env.reset(_goals(dataset, "hotel", 1)[0])))
    assert model(state).logits.shape == (len(env.actions),)
    with pytest.raises(WorkbenchError, match=r"^policy.encoder: .*nowhere: not a transformers model"):
        encode_descriptions(str(tmp_path / "nowhere"), space)


# --- the stage ----------------------------------------------------------------------------------------


def test_continual_run_nests_a_run_per_domain_with_snapshots_and_logs_forgetting(tracking_uri):
    assert main(["run", CONFIG, *TINY, f"tracking.uri={tracking_uri}"]) == 0
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tod_continual").experiment_id
    runs = client.search_runs([experiment])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: r.data.tags["tod.stage_index"],
    )
    assert [c.data.tags["tod.domain"] for c in children] == ["restaurant", "hotel"]
    for child in children:
        assert child.info.status == "FINISHED"
        snapshots = {a.path for a in client.list_artifacts(child.info.run_id, "snapshots")}
        assert "snapshots/index.json" in snapshots and len(snapshots) >= 3
        assert "tod/dissatisfied_rate" in child.data.metrics and "clear/policy_cloning" in child.data.metrics
    steps = [m.step for m in client.get_metric_history(children[1].info.run_id, "train/policy_loss")]
    assert steps == [3, 4]  # steps run on across domains
    for key in ("continual/forgetting", "continual/forward_transfer", "continual/zero_shot/attraction"):
        assert key in parent.data.metrics
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "continual/success/restaurant")] == [0, 1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("continual.domains=[restaurant,police]", "continual.domains: police not in env.domains"),
        ("continual.clear.replay_size=0", "continual.clear.replay_size"),
        ("continual.clear.cloning_targets=latest", "continual.clear.cloning_targets"),
        ("policy.descriptions=missing.json", "policy.descriptions: missing.json: no such file"),
        ("policy.encoder=no/such/model", "policy.encoder: no/such/model: not a transformers model"),
    ],
)
def test_bad_input_is_one_line_naming_the_field_and_exit_2(override, message, tracking_uri, capsys):
    assert main(["run", CONFIG, *TINY, override, f"tracking.uri={tracking_uri}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
