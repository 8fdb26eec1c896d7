import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from workbench.callback import WorkbenchCallback, _unwrap, probe_set_from_rows, workbench_metric_name
from workbench.errors import WorkbenchError
from workbench.snapshots import load_snapshots

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama(vocab=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def lm_rows(n, length, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 32, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


EVAL_ROWS = lm_rows(10, 6, seed=1)  # shorter rows than the train rows: probes show where they came from


def train(callback, tmp_path, report_to="none", steps=10):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=8,
        logging_steps=5,
        eval_strategy="steps",
        eval_steps=5,
        save_strategy="no",
        report_to=report_to,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_list(lm_rows(64, 12, seed=0)),
        eval_dataset=Dataset.from_list(EVAL_ROWS),
        callbacks=[callback],
    )
    trainer.train()
    return trainer


def test_importing_workbench_loads_no_torch_but_exports_the_callback():
    code = (
        "import sys, workbench; heavy = [m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules]; "
        "assert not heavy, heavy; from workbench import WorkbenchCallback; print(WorkbenchCallback.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "WorkbenchCallback"


@pytest.mark.parametrize(
    ("logged", "stored"),
    [
        ("loss", "train/loss"),
        ("eval_loss", "eval/loss"),
        ("learning_rate", "lr"),
        ("grad_norm", "grad_norm"),
        ("rewards/margins", "rewards/margins"),  # TRL's names are kept
        ("eval_rewards/margins", "eval/rewards/margins"),
        ("train_runtime", "train/runtime"),
        ("train_loss", "train/mean_loss"),  # the run's mean, not the last step's loss
    ],
)
def test_trainer_log_keys_get_workbench_names(logged, stored):
    assert workbench_metric_name(logged) == stored


def test_plain_trainer_gets_snapshots_geometry_and_its_logs_in_one_run(tracking_uri, tmp_path):
    # No overhead budget: a tiny model's snapshots cost more than 5 % of its steps and the interval would stretch.
    snapshot = {"every": 5, "probes": 8, "max_overhead": None}
    config = {"snapshot": snapshot, "tracking": {"uri": tracking_uri, "experiment": "cb"}}
    train(WorkbenchCallback.from_config(config, probes=EVAL_ROWS), tmp_path)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("cb").experiment_id])
    assert len(runs) == 1, "one run only: no second run from transformers' MLflow integration"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["workbench.model_class"] == "LlamaForCausalLM"
    for key in ("train/loss", "eval/loss", "lr", "grad_norm", "train/runtime"):
        assert key in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [5, 10]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "geom/eff_rank/layer_01")] == [0, 5, 10]
    snaps = load_snapshots(run.info.run_id, tracking_uri=tracking_uri)
    assert snaps.steps == [0, 5, 10]
    # 8 probes sampled from the 10 eval rows (6 tokens each), every token a point: the eval set, not the train set.
    assert len(snaps.index["probe_ids"]) == 8 and max(snaps.index["probe_ids"]) < 10
    assert snaps.layers["layer_01"].shape == (3, 8 * 6, 32)
    assert "report.html" in [f.path for f in client.list_artifacts(run.info.run_id)]  # as every stage run has


def test_without_probes_the_callback_samples_the_rows_of_the_train_dataloader_it_is_handed(
    tracking_uri, tmp_path, capsys
):
    # The trainer hands its callbacks the train dataloader at on_train_begin (the eval one only after an evaluation).
    # No overhead budget: every snapshot comes as set (a tiny model's would cost over 5 % of its steps).
    snapshot = {"every": 5, "probes": 8, "max_overhead": None}
    config = {"snapshot": snapshot, "tracking": {"uri": tracking_uri, "experiment": "cb"}}
    train(WorkbenchCallback.from_config(config), tmp_path, steps=5)
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("cb").experiment_id])[0]
    snaps = load_snapshots(run.info.run_id, tracking_uri=tracking_uri)
    assert snaps.layers["layer_01"].shape == (2, 8 * 12, 32)  # 8 of the 64 train rows, 12 tokens each
    assert "pass probes=<eval dataset>" in capsys.readouterr().err


def test_grpo_with_the_gold_reward_logs_trls_keys_and_geometry_from_prompt_only_probes(tracking_uri, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from pipelines.lm.config import GoldTaskConfig, ModelConfig
    from pipelines.lm.models import build_causal_lm, train_tokenizer
    from pipelines.lm.task import ReversalTask, gold_reward

    task = ReversalTask(GoldTaskConfig(n_train=64, n_pretrain=300))
    tokenizer = train_tokenizer(task.pretraining_text(), 270)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        logging_steps=2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
    )
    # GRPO's rows are prompts: answer = last prompt token; no overhead budget, so snapshots come every 2 steps.
    snapshot = {"every": 2, "probes": 8, "pooling": "answer", "max_overhead": None}
    callback = WorkbenchCallback.from_config({"snapshot": snapshot, "tracking": {"uri": tracking_uri}})
    GRPOTrainer(
        model=build_causal_lm(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1), tokenizer),
        reward_funcs=gold_reward,
        args=args,
        train_dataset=Dataset.from_list(task.rl_prompts()),
        processing_class=tokenizer,
        callbacks=[callback],
    ).train()
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {"reward", "reward_std", "rewards/gold_reward/mean", "entropy", "train/loss"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "geom/eff_rank/layer_01")] == [0, 2, 4]


def test_a_policy_decision_stops_training_and_saves_a_checkpoint(tracking_uri, tmp_path):
    rule = {"name": "loss-logged", "when": {"metric": "train/loss", "above": -1}, "actions": ["checkpoint", "stop"]}
    config = {"snapshot": {"every": 5, "probes": 8}, "tracking": {"uri": tracking_uri}, "policies": [rule]}
    callback = WorkbenchCallback.from_config(config)
    trainer = train(callback, tmp_path, steps=20)
    # The loss is first logged at step 5: a checkpoint of step 5, and no step after it.
    assert trainer.state.global_step == 5
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-5"]
    assert callback.engine.stopped.name == "loss-logged"
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["workbench.stopped_at_step"] == "5" and run.info.status == "FINISHED"


def test_geometry_reaches_the_policy_from_the_first_snapshot(tracking_uri, tmp_path):
    rule = {"name": "rank", "when": {"metric": "geom/eff_rank/layer_01", "above": 1}, "actions": ["stop"]}
    config = {"snapshot": {"every": 5, "probes": 8}, "tracking": {"uri": tracking_uri}, "policies": [rule]}
    trainer = train(WorkbenchCallback.from_config(config), tmp_path, steps=20)
    assert trainer.state.global_step == 1  # decided on the step-0 snapshot, acted on after the first step


def test_a_bad_policy_is_refused_when_the_callback_is_made():
    with pytest.raises(WorkbenchError, match="unknown action 'halt'"):
        WorkbenchCallback(policies=[{"name": "x", "when": {"metric": "train/loss", "above": 1}, "actions": ["halt"]}])


def test_the_callback_refuses_to_run_beside_transformers_mlflow_callback(tracking_uri, tmp_path):
    callback = WorkbenchCallback.from_config({"tracking": {"uri": tracking_uri}})
    with pytest.raises(WorkbenchError, match="report_to includes 'mlflow'"):
        train(callback, tmp_path, report_to="mlflow")


def test_from_config_reads_yaml_and_names_the_file_and_field_of_a_typo(tmp_path):
    good = tmp_path / "instrument.yaml"
    good.write_text("seed: 3\nsnapshot: {every: 7, pooling: last}\ntracking: {experiment: mine}\n")
    callback = WorkbenchCallback.from_config(good)
    assert callback.snapshot.every == 7 and callback.tracking.experiment == "mine" and callback.seed == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("snapshot: {evry: 7}\n")
    with pytest.raises(WorkbenchError, match=r"bad.yaml: snapshot.evry: unknown key"):
        WorkbenchCallback.from_config(bad)


def test_peft_models_are_unwrapped_to_the_adapted_model():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    inner = _unwrap(peft_model)
    assert type(inner).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        adapted = peft_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(inner(input_ids=ids, output_hidden_states=True).hidden_states[-1], adapted)


class CharTokenizer:
    """Just enough of a tokenizer for text rows: one id per character."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 30 + 1 for c in text]}


@pytest.mark.parametrize(
    ("row", "length", "answer_at"),
    [
        ({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, 4, 1),  # SFTTrainer: prompt masked in labels
        ({"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, 3, None),  # plain language modelling
        ({"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 4]}, 3, 1),  # DPOTrainer
        ({"chosen_ids": [1, 2, 3, 4, 5], "rejected_ids": [1]}, 5, None),  # RewardTrainer
        ({"text": "abcdef"}, 6, None),
        ({"prompt": "ab", "completion": "cde"}, 5, 1),
        ({"prompt": "ab", "chosen": "c", "rejected": "dd"}, 3, 1),
    ],
)
def test_probes_come_from_rows_in_every_trainers_format(row, length, answer_at):
    probe = probe_set_from_rows([row, row], CharTokenizer(), n_probes=2, seed=0)
    assert probe.input_ids.shape == (2, length) and bool(probe.attention_mask.all())
    if answer_at is None:
        assert probe.answer_positions is None
    else:
        assert probe.answer_positions.tolist() == [answer_at, answer_at]


def test_rows_of_an_unknown_shape_or_none_at_all_are_user_errors():
    with pytest.raises(WorkbenchError, match=r"columns \['question'\]"):
        probe_set_from_rows([{"question": "x"}], CharTokenizer(), n_probes=1, seed=0)
    with pytest.raises(WorkbenchError, match="empty"):
        probe_set_from_rows([], CharTokenizer(), n_probes=1, seed=0)


@pytest.mark.parametrize("script", ["trainer_callback.py", "trl_dpo_callback.py"])
def test_examples_run_with_public_apis_only(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--steps", "6", "--tracking-uri", uri],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and "geom/eff_rank/layer_01" in run.data.metrics


def test_a_run_whose_training_dies_ends_failed_with_its_logs_kept(tracking_uri, tmp_path):
    script = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
from test_callback import train
from workbench.callback import WorkbenchCallback

class DiesAtStep3(WorkbenchCallback):
    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if state.global_step == 3:
            raise RuntimeError("out of memory, say")

config = {{"snapshot": {{"every": 2, "probes": 8, "max_overhead": None}}, "tracking": {{"uri": {tracking_uri!r},
          "experiment": "cb"}}}}
train(DiesAtStep3.from_config(config), Path({str(tmp_path)!r}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "out of memory, say" in out.stderr
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("cb").experiment_id])
    assert run.info.status == "FAILED" and "on_train_end" in run.data.tags["workbench.error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "geom/eff_rank/layer_01")] == [0, 2]
    assert "report.html" in [f.path for f in client.list_artifacts(run.info.run_id)]  # drawn from what was logged


def test_a_stop_request_ends_a_trainer_run_even_without_policies(tracking_uri, tmp_path):
    from workbench.tags import STOP_REQUESTED
    from workbench.tracking import Tracker

    with Tracker.start(tracking_uri, "cb") as tracker:
        tracker.set_tags({STOP_REQUESTED: "requested"})  # as `workbench stop RUN_ID` does
        trainer = train(WorkbenchCallback(tracker=tracker, seed=0), tmp_path, steps=10)
    assert trainer.state.global_step < 10
    assert MlflowClient(tracking_uri).get_run(tracker.run_id).data.tags["workbench.stop_reason"] == "stop requested"


def test_under_ddp_rank_0s_stop_reaches_every_rank(tracking_uri, tmp_path):
    # Two CPU processes (gloo). Rank 0 decides at its first log (step 2); the decision is broadcast at the
    # next step end. Without the broadcast rank 1 would train on alone and hang in its next all-reduce.
    script = tmp_path / "ddp.py"
    script.write_text(
        f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import torch.distributed as dist
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from test_callback import lm_rows, tiny_llama
from workbench.callback import WorkbenchCallback

rule = {{"name": "stop-at-first-log", "when": {{"metric": "train/loss", "below": 1e9}}, "actions": ["stop"]}}
config = {{"snapshot": {{"every": 100, "probes": 4}}, "tracking": {{"uri": {tracking_uri!r}, "experiment": "ddp"}},
          "policies": [rule]}}
args = TrainingArguments(output_dir={str(tmp_path / "out")!r}, max_steps=20, per_device_train_batch_size=4,
                         logging_steps=2, save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo",
                         disable_tqdm=True)
trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_list(lm_rows(64, 12, seed=0)),
                  callbacks=[WorkbenchCallback.from_config(config)])
trainer.train()
print(f"rank {{dist.get_rank()}} of {{dist.get_world_size()}} stopped at step {{trainer.state.global_step}}")
dist.barrier()
dist.destroy_process_group()  # gloo's threads abort the process at exit if the group is left open
"""
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 0 of 2 stopped at step 3" in out.stdout and "rank 1 of 2 stopped at step 3" in out.stdout
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "FINISHED" and "stop-at-first-log" in run.data.tags["workbench.stop_reason"]
