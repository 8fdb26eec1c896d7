import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from pipelines.tod.data import DomainGoal, Goal, load_dataset
from pipelines.tod.env import DialogueEnv
from pipelines.tod.evaluator import DialogueEvaluator, evaluate_corpus, summarize
from pipelines.tod.policy import RuleExpert, run_dialogues
from pipelines.tod.simulator import AgendaUser, GoalGenerator
from pipelines.tod.synthetic import DOMAINS, write_synthetic_dataset
from workbench.cli import main
from workbench.snapshots import load_snapshots

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tod_ppo.yaml")
# The experiment shrunk to seconds: 30 corpus dialogues, 3 imitation epochs, 3 PPO iterations of 2 x 16 turns.
TINY = [
    "data.dialogues=30",
    "imitation.epochs=3",
    "train.max_steps=3",
    "train.eval_every=2",
    "env.eval_dialogues=12",
    "ppo.num_envs=2",
    "ppo.num_steps=16",
    "policy.hidden_size=32",
    "snapshot.every=2",
    "snapshot.probes=40",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A clean (noise-free) synthetic corpus, read back."""
    directory = write_synthetic_dataset(tmp_path_factory.mktemp("tod"), dialogues=40, wizard_noise=0.0, seed=0)
    return directory, load_dataset(directory, DOMAINS)


def make_env(dataset, seed=0, **kwargs):
    return DialogueEnv(dataset.ontology, dataset.db, DOMAINS, np.random.default_rng(seed), **kwargs)


def run_cli(tracking_uri, *overrides, exit_code=0):
    assert main(["run", CONFIG, *TINY, *overrides, f"tracking.uri={tracking_uri}"]) == exit_code
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tod").experiment_id
    return client.search_runs([experiment], order_by=["attribute.start_time DESC"], max_results=1)[0]


# --- data in the unified format ---------------------------------------------------------------------------


def test_synthetic_dataset_is_written_in_the_unified_layout_with_five_domains(synthetic):
    directory, dataset = synthetic
    assert {p.name for p in directory.iterdir()} >= {"ontology.json", "dialogues.json", "train_db.json"}
    assert set(DOMAINS) <= set(dataset.ontology.domains)
    assert dataset.ontology.schema("hotel").book == ("book people", "book day", "book stay")
    assert "entrance fee" in dataset.ontology.schema("attraction").requestable
    dialogue = dataset.dialogues[0]
    assert dialogue["turns"][0]["speaker"] == "user" and set(dialogue["goal"]) == {"description", "inform", "request"}
    acts = [a for t in dialogue["turns"] for kind in t["dialogue_acts"].values() for a in kind]
    assert all(set(a) == {"intent", "domain", "slot", "value"} for a in acts)
    assert {"categorical", "non-categorical", "binary"} == set(dialogue["turns"][0]["dialogue_acts"])
    assert sorted({d["data_split"] for d in dataset.dialogues}) == ["test", "train", "validation"]


def test_generated_goals_are_satisfiable_by_the_database(synthetic):
    _, dataset = synthetic
    goals = GoalGenerator(dataset.ontology, dataset.db, DOMAINS, max_domains=3)
    rng = np.random.default_rng(0)
    for goal in (goals.sample(rng) for _ in range(100)):
        assert 1 <= len(goal.domains) <= 3
        for domain, part in goal.parts.items():
            assert part.reqt or part.book
            if domain != "taxi":
                assert dataset.db.query(domain, part.info), (domain, part.info)


def test_database_query_follows_multiwoz_time_and_dontcare_semantics(synthetic):
    _, dataset = synthetic
    db = dataset.db
    train = db.tables["train"][0]
    leave = train["leaveAt"]
    assert db.matches(train, {"leave at": leave, "day": train["day"], "area": "dontcare"})
    assert not db.matches(train, {"leave at": "23:59"}) or leave == "23:59"
    assert db.matches(train, {"arrive by": "23:59"}) and not db.matches(train, {"arrive by": "00:00"})
    assert db.matches({**train, "day": "?"}, {"day": "someday"})


# --- simulator, evaluator, environment --------------------------------------------------------------------


def hotel_goal():
    return Goal({"hotel": DomainGoal({"area": "east"}, {}, ("phone",))})


def test_agenda_user_answers_requests_repeats_unanswered_ones_and_corrects_wrong_values():
    user = AgendaUser(hotel_goal(), np.random.default_rng(0), max_acts=1)
    assert user.start() == [("inform", "hotel", "area", "east")]
    assert user.respond([("request", "hotel", "stars", "")]) == [("inform", "hotel", "stars", "dontcare")]
    assert user.respond([("inform", "hotel", "area", "west")]) == [("inform", "hotel", "area", "east")]
    assert user.respond([("reqmore", "general", "", "")]) == [("request", "hotel", "phone", "")]
    assert user.respond([("reqmore", "general", "", "")]) == [("request", "hotel", "phone", "")]  # said again
    assert user.respond([("inform", "hotel", "phone", "01223")]) == [("bye", "general", "", "")]


def test_evaluator_counts_inform_precision_recall_and_success_by_hand(synthetic):
    _, dataset = synthetic
    hotel = next(e for e in dataset.db.tables["hotel"])
    goal = Goal({"hotel": DomainGoal({"area": hotel["area"]}, {}, ("phone", "address"))})
    evaluator = DialogueEvaluator(goal, dataset.db, dataset.ontology)
    evaluator.add_system_acts([("inform", "hotel", "phone", hotel["phone"]), ("inform", "hotel", "postcode", "cb1")])
    score = evaluator.score(turns=2)
    assert (score.tp, score.fp, score.fn) == (1, 1, 1)
    assert score.precision == score.recall == score.f1 == 0.5 and not score.success
    evaluator.add_system_acts([("inform", "hotel", "address", hotel["address"])])
    assert evaluator.score(turns=3).recall == 1.0 and evaluator.score(turns=3).success
    wrong = next(e for e in dataset.db.tables["hotel"] if e["area"] != hotel["area"] and e["phone"] != hotel["phone"])
    evaluator.add_system_acts([("inform", "hotel", "phone", wrong["phone"])])  # values of two entities: no match
    assert not evaluator.score(turns=4).success


def test_rule_expert_succeeds_and_its_return_is_ConvLabs_reward(synthetic):
    _, dataset = synthetic
    env = make_env(dataset)
    goals = GoalGenerator(dataset.ontology, dataset.db, DOMAINS)
    rng = np.random.default_rng(1)
    scores = run_dialogues(env, RuleExpert(env), [goals.sample(rng) for _ in range(40)])
    assert all(s.success for s in scores)
    assert all(s.reward == 80 - (s.turns - 1) for s in scores)  # -1 per turn, +80 at the end


def test_a_policy_that_never_answers_fails_at_the_turn_limit(synthetic):
    _, dataset = synthetic
    env = make_env(dataset, max_turns=12)
    [score] = run_dialogues(env, lambda state: [("reqmore", "general", "")], [hotel_goal()])
    assert not score.success and score.turns == 12 and score.reward == -40 - 11


def test_noisy_wizard_corpus_scores_below_the_clean_one(synthetic, tmp_path):
    _, clean = synthetic
    assert summarize(evaluate_corpus(clean))["tod/success_rate"] == 1.0
    noisy = load_dataset(write_synthetic_dataset(tmp_path, dialogues=40, wizard_noise=1.0, seed=0))
    figures = summarize(evaluate_corpus(noisy))
    assert (
        figures["tod/inform_precision"] < 1.0 and figures["tod/turns"] > summarize(evaluate_corpus(clean))["tod/turns"]
    )


# --- the real MultiWOZ / ConvLab-3 layout -----------------------------------------------------------------


def slot(categorical=False, values=()):
    return {"description": "", "is_categorical": categorical, "possible_values": list(values)}


MULTIWOZ_ONTOLOGY = {
    "domains": {
        "hotel": {
            "description": "find and book a hotel",
            "slots": {
                "name": slot(),
                "area": slot(True, ["centre", "east", "north", "south", "west"]),
                "parking": slot(True, ["free", "no", "yes"]),
                "price range": slot(True, ["cheap", "expensive", "moderate"]),
                "stars": slot(True, ["0", "1", "2", "3", "4", "5"]),
                "internet": slot(True, ["free", "no", "yes"]),
                "type": slot(),
                "book stay": slot(),
                "book day": slot(True, ["monday", "tuesday"]),
                "book people": slot(),
                "address": slot(),
                "phone": slot(),
                "postcode": slot(),
                "ref": slot(),
                "choice": slot(),
            },
        },
        "booking": {"description": "booking", "slots": {}},
        "general": {"description": "general", "slots": {}},
    },
    "intents": {"inform": {}, "request": {}, "book": {}, "nobook": {}, "reqmore": {}, "bye": {}},
    "state": {
        "hotel": dict.fromkeys(
            [
                "name",
                "area",
                "parking",
                "price range",
                "stars",
                "internet",
                "type",
                "book stay",
                "book day",
                "book people",
            ],
            "",
        )
    },
    "dialogue_acts": {"categorical": [], "non-categorical": [], "binary": []},
}
HOTEL_DB = [
    {"name": "the cambridge belfry", "area": "west", "pricerange": "cheap", "type": "hotel", "stars": "4",
     "parking": "yes", "internet": "yes", "phone": "01954714600", "postcode": "cb236bw", "address": "back lane",
     "id": "7"},
    {"name": "a and b guest house", "area": "east", "pricerange": "moderate", "type": "guesthouse", "stars": "4",
     "parking": "no", "internet": "yes", "phone": "01223315702", "postcode": "cb12dp", "address": "124 tenison road",
     "id": "0"},
    {"name": "the gonville hotel", "area": "centre", "pricerange": "expensive", "type": "hotel", "stars": "3",
     "parking": "yes", "internet": "yes", "phone": "01223366611", "postcode": "cb11ly", "address": "gonville place",
     "id": "19"},
]  # fmt: skip


def acts(*items):
    """Unified dialogue acts from (intent, domain, slot, value) tuples, split as ConvLab-3 splits them."""
    out = {"categorical": [], "non-categorical": [], "binary": []}
    for intent, domain, slot_name, value in items:
        kind = (
            "binary"
            if not value
            else ("categorical" if slot_name in ("price range", "book day") else "non-categorical")
        )
        out[kind].append({"intent": intent, "domain": domain, "slot": slot_name, "value": value})
    return out


def user(*items, state=None):
    return {"speaker": "user", "utterance": "", "dialogue_acts": acts(*items), "state": {"hotel": state or {}}}


def system(*items, booked=()):
    return {"speaker": "system", "utterance": "", "dialogue_acts": acts(*items), "db_results": {},
            "booked": {"hotel": list(booked)}}  # fmt: skip


BOOKING = {"book stay": "2", "book day": "tuesday", "book people": "6"}
CHEAP_HOTEL = {"type": "hotel", "parking": "yes", "price range": "cheap", "internet": "yes"}
MULTIWOZ_DIALOGUES = [
    {  # MultiWOZ's SNG01856 in ConvLab-3's conversion, shortened: a booking after a failed one ("3|2" nights)
        "dataset": "multiwoz21", "data_split": "train", "dialogue_id": "multiwoz21-train-0", "domains": ["hotel"],
        "goal": {"description": "", "inform": {"hotel": {**CHEAP_HOTEL, "book stay": "3|2", "book day": "tuesday",
                                                          "book people": "6"}}, "request": {"hotel": {}}},
        "turns": [
            user(("inform", "hotel", "price range", "cheap"), ("inform", "hotel", "type", "hotel"), state=CHEAP_HOTEL),
            system(("request", "hotel", "area", "")),
            user(("inform", "hotel", "book day", "tuesday"), ("inform", "hotel", "book stay", "3"),
                 state={**CHEAP_HOTEL, **BOOKING, "book stay": "3"}),
            system(("nobook", "booking", "day", "tuesday"), ("request", "booking", "book stay", "")),
            user(("inform", "hotel", "book stay", "2"), state={**CHEAP_HOTEL, **BOOKING}),
            system(("book", "booking", "ref", "7GAWK763"), ("reqmore", "general", "", ""),
                   booked=[{"name": "the cambridge belfry", "reference": "7GAWK763"}]),
            user(("bye", "general", "", "")),
            system(("bye", "general", "", ""), booked=[{"name": "the cambridge belfry", "reference": "7GAWK763"}]),
        ],
    },
    {  # asked for phone and postcode; told the phone, and an address nobody asked for
        "dataset": "multiwoz21", "data_split": "train", "dialogue_id": "multiwoz21-train-1", "domains": ["hotel"],
        "goal": {"description": "", "inform": {"hotel": {"area": "east", "stars": "4"}},
                 "request": {"hotel": {"phone": "", "postcode": ""}}},
        "turns": [
            user(("inform", "hotel", "area", "east"), ("inform", "hotel", "stars", "4"),
                 ("request", "hotel", "phone", "")),
            system(("inform", "hotel", "name", "a and b guest house"), ("inform", "hotel", "phone", "01223315702"),
                   ("inform", "hotel", "address", "124 tenison road")),
            user(("bye", "general", "", "")),
        ],
    },
    {  # booked an expensive hotel for a user who wanted a cheap one
        "dataset": "multiwoz21", "data_split": "test", "dialogue_id": "multiwoz21-test-0", "domains": ["hotel"],
        "goal": {"description": "", "inform": {"hotel": {**CHEAP_HOTEL, **BOOKING}}, "request": {}},
        "turns": [
            user(("inform", "hotel", "price range", "cheap"), state={**CHEAP_HOTEL, **BOOKING}),
            system(("book", "booking", "ref", "XYZ"), booked=[{"name": "the gonville hotel", "reference": "XYZ"}]),
            user(("bye", "general", "", "")),
        ],
    },
]  # fmt: skip


def write_multiwoz_layout(root: Path, dialogues=MULTIWOZ_DIALOGUES, hotel_db=HOTEL_DB, zipped=True) -> Path:
    """data/unified_datasets/multiwoz21/ as ConvLab-3 ships it: data.zip holding data/*.json."""
    dataset = root / "multiwoz21"
    files = {"ontology.json": MULTIWOZ_ONTOLOGY, "dialogues.json": dialogues, "hotel_db.json": hotel_db}
    dataset.mkdir(parents=True, exist_ok=True)
    if not zipped:
        for name, content in files.items():
            (dataset / name).write_text(content if isinstance(content, str) else json.dumps(content))
        return dataset
    with zipfile.ZipFile(dataset / "data.zip", "w") as archive:
        for name, content in files.items():
            archive.writestr(f"data/{name}", content if isinstance(content, str) else json.dumps(content))
    return dataset


def test_evaluator_runs_on_files_in_the_real_multiwoz_unified_layout(tmp_path):
    dataset = load_dataset(write_multiwoz_layout(tmp_path))
    booked, informed, wrong_booking = evaluate_corpus(dataset)
    assert booked.success and booked.book_rate == 1.0 and booked.recall is None  # "booking" acts -> hotel
    assert (informed.tp, informed.fp, informed.fn) == (1, 1, 1) and not informed.success
    assert wrong_booking.book_rate == 0.75 and not wrong_booking.success  # 3 of 4 constraints: not the price
    figures = summarize([booked, informed, wrong_booking])
    assert figures["tod/success_rate"] == pytest.approx(1 / 3) and figures["tod/inform_f1"] == 0.5


# --- the stage --------------------------------------------------------------------------------------------


def test_tiny_run_logs_tod_metrics_and_snapshots_and_the_same_seed_gives_the_same_curve(tracking_uri):
    first = run_cli(tracking_uri)
    second = run_cli(tracking_uri)
    other_seed = run_cli(tracking_uri, "seed=1")
    client = MlflowClient(tracking_uri)
    assert first.info.status == "FINISHED" and first.data.tags["workbench.stage"] == "tod_ppo"
    logged = ["tod/success_rate", "tod/inform_f1", "tod/book_rate", "tod/turns", "imitation/loss", "train/policy_loss"]
    logged += ["baseline/rule_expert/success_rate", "baseline/random/success_rate", "entropy", "approx_kl"]
    for key in logged:
        assert key in first.data.metrics, key
    assert first.data.metrics["baseline/rule_expert/success_rate"] == 1.0
    steps = [m.step for m in client.get_metric_history(first.info.run_id, "tod/success_rate")]
    assert steps == [0, 2, 3, 5, 6]  # untrained, imitation epochs 2 and 3 (its last), PPO iterations 2 and 3

    def curve(run, key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    for key in ("tod/success_rate", "train/policy_loss", "entropy", "geom/eff_rank/layer_01"):
        assert curve(first, key) == curve(second, key), key
    assert curve(first, "train/policy_loss") != curve(other_seed, "train/policy_loss")

    snaps = load_snapshots(first.info.run_id, tracking_uri=tracking_uri)
    assert snaps.steps == [0, 2, 4, 6] and sorted(snaps.layers) == ["layer_00", "layer_01", "layer_02"]
    n_probes = len(snaps.index["probe_ids"])  # every held-out dialogue state, up to snapshot.probes
    assert 10 < n_probes <= 40 and snaps.layers["layer_01"].shape == (4, n_probes, 32)
    artifacts = {a.path for a in client.list_artifacts(first.info.run_id, "model")}
    assert {"model/policy.safetensors", "model/policy_io.json"} <= artifacts


def test_a_policy_rule_stops_the_dialogue_run(tracking_uri, capsys):
    when = '{"metric": "imitation/loss", "below": 10, "warmup_steps": 1}'
    rule = f'[{{"name": "enough", "when": {when}, "actions": ["stop"]}}]'
    run = run_cli(tracking_uri, f"policies={rule}")
    assert run.info.status == "FINISHED" and "stopped at step 1" in capsys.readouterr().out
    assert [m.step for m in MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "imitation/loss")] == [0, 1]


@pytest.mark.slow
def test_ppo_improves_on_the_imitation_policy(tracking_uri):
    run = run_cli(
        tracking_uri,
        "data.dialogues=100",
        "imitation.epochs=60",
        "train.max_steps=20",
        "train.eval_every=20",
        "ppo.num_envs=8",
        "ppo.num_steps=64",
        "policy.hidden_size=128",
        "env.eval_dialogues=100",
        "snapshot.enabled=false",
    )  # fmt: skip  (the default experiment, a third of its PPO iterations)
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "tod/success_rate")
    start, end = [m.value for m in history if m.step == 60][0], history[-1].value  # end of imitation, of PPO
    assert end > start + 0.1, (start, end)


# --- bad input --------------------------------------------------------------------------------------------


def broken_dialogues(case):
    dialogues = json.loads(json.dumps(MULTIWOZ_DIALOGUES))
    if case == "unknown domain":
        dialogues[1]["goal"]["request"]["police"] = {"phone": ""}
    else:
        dialogues[1]["goal"]["inform"]["hotel"]["colour"] = "blue"
    return dialogues


@pytest.mark.parametrize(
    ("case", "make", "message"),
    [
        ("malformed JSON", lambda root: write_multiwoz_layout(root, dialogues='[{"turns": [}'),
         "data.zip:data/dialogues.json: invalid JSON at line 1"),
        ("unknown domain", lambda root: write_multiwoz_layout(root, broken_dialogues("unknown domain"), zipped=False),
         "multiwoz21-train-1.goal.request.police: domain not in"),
        ("unknown slot", lambda root: write_multiwoz_layout(root, broken_dialogues("unknown slot"), zipped=False),
         "multiwoz21-train-1.goal.inform.hotel.colour: unknown slot"),
        ("empty database", lambda root: write_multiwoz_layout(root, hotel_db=[]),
         "data.zip:data/hotel_db.json: empty database"),
        ("no such path", lambda root: root / "nowhere", "data.path: "),
    ],
)  # fmt: skip
def test_bad_data_is_one_line_naming_file_and_field_and_exit_2(case, make, message, tracking_uri, tmp_path, capsys):
    path = make(tmp_path)
    run_cli(tracking_uri, f"data.path={path}", "env.domains=[hotel]", exit_code=2)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("workbench: error:")]
    assert len(errors) == 1 and message in errors[0], errors


def test_synthetic_corpus_reads_back_from_a_copied_directory(synthetic, tmp_path):
    directory, dataset = synthetic
    copy = shutil.copytree(directory, tmp_path / "data")
    assert len(load_dataset(copy.parent).dialogues) == len(dataset.dialogues)  # <dataset>/data/ontology.json found
