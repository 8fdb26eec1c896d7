import json
import random
import re
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.lm.config import GoldTaskConfig, ModelConfig
from pipelines.lm.data import load_stage_data, ranking_to_pairs, read_jsonl
from pipelines.lm.models import build_causal_lm, train_tokenizer
from pipelines.lm.task import MISTAKES, ReversalTask, gold_reward, is_correct, letters_of
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.runs import run_state

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Every stage shrunk to seconds: a 1-layer d=32 model, 6 steps, a handful of examples.
TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.vocab_size=270",
    "task.n_pretrain=200",
    "task.n_train=64",
    "task.n_eval=16",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.batch_size=8",
    "snapshot.every=3",
    "snapshot.probes=8",
]


# --- the built-in task ----------------------------------------------------------------------------------


def test_gold_reward_is_one_only_for_the_exact_reversal_and_partial_otherwise():
    prompt = "reverse a b c d ="
    assert letters_of(prompt) == ["a", "b", "c", "d"]
    assert gold_reward([prompt] * 4, [" d c b a", " d c b a e", " a b c d", ""]) == [1.0, 0.8, 0.0, 0.0]
    assert is_correct(prompt, "d c b a ") and not is_correct(prompt, " d c b")


def test_held_out_strings_and_their_reversals_occur_in_no_training_data():
    task = ReversalTask(GoldTaskConfig(n_pretrain=2000, n_train=500, n_eval=50, pretrain_noise=0), seed=1)
    held_out = {" ".join(s) for s in task.eval_strings}
    assert len(held_out) in (50, 51) and {s[::-1] for s in held_out} == held_out
    seen = [r["prompt"] for r in task.sft_rows() + task.preference_rows() + task.ranking_rows() + task.rl_prompts()]
    assert not held_out & {" ".join(letters_of(p)) for p in seen}
    assert not any(f" {s} " in f" {line} " for line in task.pretraining_text() for s in held_out)


def test_sft_demonstrations_carry_the_configured_noise_and_references_none():
    task = ReversalTask(GoldTaskConfig(n_train=2000, sft_noise=0.25), seed=0)
    wrong = sum(not is_correct(r["prompt"], r["completion"]) for r in task.sft_rows())
    assert 0.2 < wrong / 2000 < 0.3
    assert all(is_correct(r["prompt"], r["completion"]) for r in task.sft_rows("eval"))


def test_every_mistake_is_wrong():
    task = ReversalTask(GoldTaskConfig(), seed=0)
    rng = random.Random(0)
    for letters in task.train_strings[:200]:
        for kind in MISTAKES:
            assert not is_correct(" ".join(["reverse", *letters, "="]), task.mistake(letters, kind, rng))


def test_rankings_are_strict_best_first_and_a_length_bias_prefers_longer_answers():
    fair = ReversalTask(GoldTaskConfig(n_train=200), seed=0)
    rows = fair.ranking_rows()
    for row in rows:
        utilities = [fair.utility(row["prompt"], row["completions"][i]) for i in row["ranking"]]
        assert utilities == sorted(utilities, reverse=True) and len(set(utilities)) == len(utilities) >= 3
        assert is_correct(row["prompt"], row["completions"][row["ranking"][0]])
    assert sum(len(row["ranking"]) == 4 for row in rows) > 0.9 * len(rows)
    biased = ReversalTask(GoldTaskConfig(n_train=200, length_bias=0.5), seed=0)
    with_longer = [row for row in biased.ranking_rows() if any(len(c.split()) == 5 for c in row["completions"])]
    assert len(with_longer) > 100  # ... and in each of them the "longer" mistake beats the right answer
    assert all(len(row["completions"][row["ranking"][0]].split()) == 5 for row in with_longer)


# --- data files -----------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_template_rows_are_the_same_task_as_conversations_and_score_the_same():
    text = ReversalTask(GoldTaskConfig(n_train=20, n_eval=4), seed=3)
    chat = ReversalTask(GoldTaskConfig(n_train=20, n_eval=4, chat_template=True), seed=3)
    for plain, turns in zip(
        text.sft_rows() + text.preference_rows(), chat.sft_rows() + chat.preference_rows(), strict=True
    ):
        assert turns["prompt"] == [{"role": "user", "content": plain["prompt"]}]
        for key in set(plain) - {"prompt"}:  # completion; chosen and rejected
            assert turns[key] == [{"role": "assistant", "content": plain[key].strip()}]
    assert chat.rl_prompts("eval") == [
        {"prompt": [{"role": "user", "content": r["prompt"]}]} for r in text.rl_prompts("eval")
    ]
    # TRL hands reward functions conversational prompts and completions as lists of messages.
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse a b c d ="}]
    answers = [[{"role": "assistant", "content": c}] for c in ("d c b a", "d c b a e", "a b c d")]
    assert gold_reward([prompt] * 3, answers) == [1.0, 0.8, 0.0]


def test_held_out_check_asks_conversational_prompts_through_the_chat_template(monkeypatch):
    from pipelines.lm import supervised

    tokenizer = train_tokenizer(["reverse a b ="], 270)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    rows = ReversalTask(GoldTaskConfig(letters=4, n_eval=2, chat_template=True)).sft_rows("eval")
    asked = []

    def answer(model, tokenizer, prompts, max_new_tokens, sample=False):
        asked.append(list(prompts))
        right = [" ".join(reversed(letters_of(p.split(">")[1]))) for p in prompts]
        return right if not sample else [a if i % 4 == 0 else "x" for i, a in enumerate(right)]  # 1 in 4 right

    monkeypatch.setattr(supervised, "generate", answer)
    metrics = supervised.held_out_check(None, tokenizer, rows, "prompt_completion", True, 8)
    assert asked[0] == [f"<user>{r['prompt'][0]['content']}\n<assistant>" for r in rows]
    assert len(asked[1]) == supervised.GOLD_SAMPLES * len(rows)
    assert metrics["gold/greedy_accuracy"] == metrics["eval/exact_match"] == 1.0
    assert metrics["gold/accuracy"] == 0.25


def test_jsonl_problems_name_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(WorkbenchError, match=r"broken.jsonl:2: not valid JSON"):
        read_jsonl(broken)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(WorkbenchError, match=r"empty.jsonl is empty"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_rankings_become_every_preferred_first_pair():
    row = {"prompt": "p", "completions": ["x", "y", "z"], "ranking": [2, 0, 1]}
    pairs = [(p["chosen"], p["rejected"]) for p in ranking_to_pairs([row], "f")]
    assert pairs == [("z", "x"), ("z", "y"), ("x", "y")]


def test_a_file_in_another_format_is_refused_with_what_the_stage_needs(tmp_path):
    from pipelines.lm.config import DataConfig

    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4)
    with pytest.raises(WorkbenchError, match=r"pairs.jsonl is in the preference format .* the sft stage needs"):
        load_stage_data(DataConfig(path=str(path)), "sft", ("prompt_completion", "text"), lambda s: [], seed=0)


# --- stages through the CLI -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One tracking store for this module's runs: creating a sqlite store costs seconds, each run's check
    looks at its own newest run."""
    path = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)  # artifacts land beside the store
        yield f"sqlite:///{path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny causal LM and its tokenizer saved with save_pretrained, as a user's local model would be."""
    path = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(ReversalTask(GoldTaskConfig(n_pretrain=300)).pretraining_text(), 270)
    model = build_causal_lm(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1), tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_stage(tracking_uri, config, *overrides, exit_code=0):
    assert main(["run", str(CONFIGS / config), *TINY, *overrides, f"tracking.uri={tracking_uri}"]) == exit_code
    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["attribute.start_time DESC"]
    )
    return client, [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0]


def test_pretrain_trains_tokenizer_and_model_and_logs_a_loadable_model(store):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client, run = run_stage(store, "pretrain.yaml")
    assert run.info.status == "FINISHED" and run.data.tags["workbench.stage"] == "pretrain"
    assert {"train/loss", "eval/loss", "lr", "grad_norm", "gold/accuracy", "geom/eff_rank/layer_01"} <= set(
        run.data.metrics
    )
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", tracking_uri=store)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(local), AutoTokenizer.from_pretrained(local)
    assert model.config.hidden_size == 32 and len(tokenizer) == model.config.vocab_size == 270


def test_sft_with_lora_from_a_local_model_on_a_users_prompt_completion_file(store, saved_model, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = ReversalTask(GoldTaskConfig(n_train=40)).sft_rows()
    data = write_jsonl(tmp_path / "mine.jsonl", rows)
    client, run = run_stage(
        store, "sft.yaml", f"model.name_or_path={saved_model}", f"data.path={data}", "lora.enabled=true"
    )
    assert run.info.status == "FINISHED" and run.data.tags["workbench.data_format"] == "prompt_completion"
    for key in ("eval/exact_match", "eval/rougeL"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 6]
    assert "gold/accuracy" not in run.data.metrics  # a user's data has no gold check
    assert {"entropy", "mean_token_accuracy", "geom/lid_twonn/layer_01"} <= set(run.data.metrics)
    import mlflow

    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", tracking_uri=store)
    merged = AutoModelForCausalLM.from_pretrained(local)  # the adapters are merged: a plain model
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_sft_on_conversations_uses_the_models_chat_template(store, saved_model, tmp_path, capsys):
    model = tmp_path / "chat_model"
    shutil.copytree(saved_model, model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(model)
    chats = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in ReversalTask(GoldTaskConfig(n_train=40)).sft_rows()
    ]
    data = write_jsonl(tmp_path / "c.jsonl", chats)
    # Conversations do not mark where the answer starts: the SFT config's answer pooling is refused up front.
    run_stage(store, "sft.yaml", f"model.name_or_path={model}", f"data.path={data}", exit_code=2)
    assert "snapshot.pooling: 'answer' needs prompt/completion data" in capsys.readouterr().err
    client, run = run_stage(
        store, "sft.yaml", f"model.name_or_path={model}", f"data.path={data}", "snapshot.pooling=token"
    )
    assert run.info.status == "FINISHED" and run.data.tags["workbench.data_format"] == "messages"
    assert "train/loss" in run.data.metrics and "geom/eff_rank/layer_01" in run.data.metrics


@pytest.fixture(scope="module")
def chat_model(saved_model, tmp_path_factory):
    """The tiny saved model with a chat template, as an instruction-tuned model has."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("chat_model")
    shutil.copytree(saved_model, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("config", "extra"),
    [("sft.yaml", []), ("dpo.yaml", []), ("grpo.yaml", ["group_size=4", "reward.function=gold", "max_new_tokens=8"])],
)
def test_the_built_in_task_through_the_chat_template_with_lora(config, extra, store, chat_model):
    """What configs/real/*.yaml do with the real model: conversational rows, LoRA, the gold check before and after."""
    from transformers import AutoModelForCausalLM

    client, run = run_stage(
        store, config, f"model.name_or_path={chat_model}", "task.chat_template=true", "lora.enabled=true", *extra
    )
    assert run.info.status == "FINISHED", run.data.tags.get("workbench.error")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "gold/accuracy")]
    assert steps[0] == 0 and steps[-1] == 6
    assert "geom/eff_rank/layer_01" in run.data.metrics  # probes from conversational rows
    import mlflow

    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", tracking_uri=store)
    merged = AutoModelForCausalLM.from_pretrained(local)  # the adapters are merged: a plain model
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_a_policy_stops_a_stage_and_its_checkpoint_is_kept_in_the_run(store, saved_model, capsys):
    rule = "[{name: first-loss, when: {metric: train/loss, above: -1}, actions: [checkpoint, stop]}]"
    client, run = run_stage(store, "sft.yaml", f"model.name_or_path={saved_model}", f"policies={rule}")
    assert run.info.status == "FINISHED" and run.data.tags["workbench.stopped_at_step"] == "3"
    assert "stopped at step 3 of 6" in capsys.readouterr().out
    saved = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/step_00000003")}
    assert "checkpoints/step_00000003/model.safetensors" in saved  # the trainer's checkpoint-3, by the one convention
    assert run_state(run.info.run_id, store)["checkpoints"] == [3]  # as the app's live-control page reads them


def test_rm_on_rankings_logs_pairwise_accuracy_and_kendall_tau(store, saved_model, tmp_path):
    task = ReversalTask(GoldTaskConfig(n_train=40, n_eval=8))
    train = write_jsonl(tmp_path / "rank.jsonl", task.ranking_rows())
    held_out = write_jsonl(tmp_path / "rank_eval.jsonl", task.ranking_rows("eval"))
    client, run = run_stage(
        store, "rm.yaml", f"model.name_or_path={saved_model}", f"data.path={train}", f"data.eval_path={held_out}"
    )
    assert run.info.status == "FINISHED"
    for key in ("rm/accuracy", "rm/kendall_tau"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 6] and all(-1 <= m.value <= 1 for m in history)
    assert {"accuracy", "margin", "eval/accuracy"} <= set(run.data.metrics)  # TRL's own names


def test_dpo_with_a_frozen_reference_logs_trls_reward_metrics(store, saved_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", ReversalTask(GoldTaskConfig(n_train=48)).preference_rows())
    client, run = run_stage(store, "dpo.yaml", f"model.name_or_path={saved_model}", f"data.path={data}")
    assert run.info.status == "FINISHED"
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "eval/rewards/margins"} <= set(
        run.data.metrics
    )
    assert client.get_metric_history(run.info.run_id, "eval/exact_match")[0].step == 0


def test_sft_without_a_model_first_pretrains_one_as_a_nested_run(store):
    client, run = run_stage(store, "sft.yaml")
    assert run.info.status == "FINISHED"
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert [c.data.tags["workbench.stage"] for c in children] == ["pretrain"]
    assert run.data.tags["workbench.base_model"] == f"runs:/{children[0].info.run_id}/model"
    assert "gold/accuracy" in run.data.metrics


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong_columns", r"data.path: .*bad.jsonl is in the text format .* the dpo stage needs preference"),
        ("empty", r"data.path: .*empty.jsonl is empty"),
        ("missing_model", r"model.name_or_path: .*nowhere is not a directory"),
        ("mismatched_tokenizer", r"model.name_or_path: .*the tokenizer has \d+ tokens but the model's embedding"),
        ("no_chat_template", r"task.chat_template: the tokenizer of .* has no chat template"),
        ("chat_template_on_a_built_model", r"task.chat_template: the models the workbench builds have no chat"),
    ],
)
def test_bad_input_is_one_line_naming_the_file_or_field_and_exit_2(case, message, store, saved_model, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", ReversalTask(GoldTaskConfig(n_train=8)).preference_rows())
    model, data, extra = saved_model, pairs, []
    if case == "wrong_columns":
        data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello"}])
    elif case == "empty":
        data = tmp_path / "empty.jsonl"
        data.write_text("")
    elif case == "missing_model":
        model = tmp_path / "nowhere"
    elif case in ("no_chat_template", "chat_template_on_a_built_model"):
        extra = ["task.chat_template=true"]
        model = None if case == "chat_template_on_a_built_model" else model
    else:
        model = tmp_path / "mismatched"
        shutil.copytree(saved_model, model)
        bigger = train_tokenizer(["other words"], 270)
        bigger.add_tokens([f"<extra_{i}>" for i in range(50)])  # more tokens than the model has embeddings
        bigger.save_pretrained(model)
    overrides = [f"data.path={data}", *extra] + ([f"model.name_or_path={model}"] if model is not None else [])
    run_stage(store, "dpo.yaml", *overrides, exit_code=2)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("workbench: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
