"""WorkbenchCallback on the datasets people train with, and instrumentation that never ends their training.

Every variant is a real `Trainer` run of 4 steps with snapshots at steps 0, 2 and 4 of 4 probes from rows of 6
real tokens, so each snapshot holds 4 x 6 = 24 token points per layer: padding that leaked into the probes, a
row read wrongly or a lost snapshot changes that count.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from test_callback import tiny_llama

from workbench.callback import WorkbenchCallback
from workbench.errors import WorkbenchError
from workbench.snapshots import load_snapshots

ROOT = Path(__file__).resolve().parents[1]
LENGTH, PAD = 6, 0


def token_rows(n, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 32, (n, LENGTH), generator=generator)  # ids 1..31: 0 is the padding id


class DictDataset(torch.utils.data.Dataset):
    """The most common dataset there is: items are dicts of tensors."""

    def __init__(self, make_item, n=32):
        self.ids, self.make_item = token_rows(n, seed=0), make_item

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.make_item(self.ids[i])


def plain_item(ids):
    return {"input_ids": ids, "labels": ids.clone()}


def padded_masked_item(ids):
    """Right-padded to 8 with an attention mask; the first 3 tokens (the prompt) masked out of the labels."""
    padded = torch.cat([ids, torch.full((2,), PAD)])
    labels = torch.cat([torch.full((3,), -100), ids[3:], torch.full((2,), -100)])
    return {"input_ids": padded, "attention_mask": (padded != PAD).long(), "labels": labels}


def batched_item(ids):
    """(1, length) tensors, as a tokenizer returns them with return_tensors='pt'."""
    return {"input_ids": ids[None], "labels": ids[None].clone()}


def cat_collator(items):
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


def tuple_collator(items):
    return {"input_ids": torch.stack([i[0] for i in items]), "labels": torch.stack([i[1] for i in items])}


def lm_collator(items):  # a dataset with only input_ids: the collator makes the labels, as for causal LM
    ids = torch.stack([torch.as_tensor(item["input_ids"]) for item in items])
    return {"input_ids": ids, "labels": ids.clone()}


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        for ids in token_rows(1000, seed=0):
            yield {"input_ids": ids, "labels": ids.clone()}


def hf_rows():
    from datasets import Dataset

    ids = token_rows(32, seed=0).tolist()
    return Dataset.from_list([{"input_ids": row, "labels": row} for row in ids])


def train(callback, tmp_path, dataset, collator=None, model=None, steps=4):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model or tiny_llama(),
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[callback],
    )
    trainer.train()
    return trainer


def callback(tracking_uri, **kwargs):
    # No overhead budget: every snapshot comes as set (a tiny model's would cost over 5 % of its steps).
    snapshot = {"every": 2, "probes": 4, "max_overhead": None}
    config = {"snapshot": snapshot, "tracking": {"uri": tracking_uri, "experiment": "cb"}}
    return WorkbenchCallback.from_config(config, **kwargs)


def the_run(tracking_uri):
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("cb").experiment_id])
    return client, run


def assert_snapshots(tracking_uri, points=4 * LENGTH):
    client, run = the_run(tracking_uri)
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics
    assert not [key for key in run.data.tags if key.startswith("workbench.alert.callback")]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "geom/eff_rank/layer_01")] == [0, 2, 4]
    snaps = load_snapshots(run.info.run_id, tracking_uri=tracking_uri)
    assert snaps.steps == [0, 2, 4]
    assert snaps.layers["layer_01"].shape == (3, points, 32)
    return snaps


@pytest.mark.parametrize(
    ("dataset", "collator"),
    [
        pytest.param(hf_rows, None, id="hf-datasets-rows"),
        pytest.param(lambda: DictDataset(plain_item), None, id="torch-dict-of-1d-tensors"),
        pytest.param(lambda: DictDataset(padded_masked_item), None, id="torch-padded-with-masked-labels"),
        pytest.param(lambda: DictDataset(batched_item), cat_collator, id="torch-dict-of-2d-tensors"),
        pytest.param(lambda: torch.utils.data.TensorDataset(*[token_rows(32, 0)] * 2), tuple_collator, id="tuples"),
        pytest.param(lambda: [{"input_ids": r} for r in token_rows(32, 0).tolist()], lm_collator, id="input-ids-only"),
    ],
)
def test_probes_come_from_the_trainers_dataset_whatever_its_items(tracking_uri, tmp_path, dataset, collator):
    train(callback(tracking_uri), tmp_path, dataset(), collator)
    snaps = assert_snapshots(tracking_uri)  # padding is not a probe token: 24 points, not 4 x 8
    assert len(set(snaps.index["probe_ids"])) == 4 and max(snaps.index["probe_ids"]) < 32


def test_an_iterable_dataset_gives_its_first_rows_as_probes(tracking_uri, tmp_path):
    train(callback(tracking_uri), tmp_path, Stream())
    assert assert_snapshots(tracking_uri).index["probe_ids"] == [0, 1, 2, 3]


def test_masked_prompt_labels_set_the_answer_position_of_tensor_rows(tracking_uri, tmp_path):
    snapshot = {"every": 2, "probes": 4, "pooling": "answer", "max_overhead": None}  # every snapshot as set
    config = {"snapshot": snapshot, "tracking": {"uri": tracking_uri}}
    train(WorkbenchCallback.from_config(config), tmp_path, DictDataset(padded_masked_item))
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    snaps = load_snapshots(run.info.run_id, tracking_uri=tracking_uri)
    assert snaps.layers["layer_01"].shape == (3, 4, 32)  # one point per probe: the last prompt token
    model = tiny_llama()  # the step-0 snapshot is of the untrained model, the same seed builds it again
    probe_ids = snaps.index["probe_ids"]
    with torch.no_grad():
        hidden = model(input_ids=token_rows(32, 0)[probe_ids], output_hidden_states=True).hidden_states[1]
    assert torch.allclose(torch.as_tensor(snaps.layers["layer_01"][0]).float(), hidden[:, 2], rtol=1e-2, atol=1e-2)


def chat_tokenizer():
    from pipelines.lm.models import train_tokenizer

    tokenizer = train_tokenizer(["user: what is 2+2?", "assistant: 4", "user: hi", "assistant: hello"], 300)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return tokenizer


CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"what is {a}+{a}?"}, {"role": "assistant", "content": str(2 * a)}]}
    for a in range(16)
]


def sft(callback, tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    model = tiny_llama(vocab=len(tokenizer))
    SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(CONVERSATIONS),
        processing_class=tokenizer,
        callbacks=[callback],
    ).train()


def chat_tokens(tokenizer, rows):
    return sum(len(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False))["input_ids"]) for r in rows)


def test_trl_conversational_rows_give_probes_as_the_trainer_tokenized_them(tracking_uri, tmp_path):
    tokenizer = chat_tokenizer()
    sft(callback(tracking_uri), tokenizer, tmp_path)
    _, run = the_run(tracking_uri)
    snaps = load_snapshots(run.info.run_id, tracking_uri=tracking_uri)
    probes = [CONVERSATIONS[i] for i in snaps.index["probe_ids"]]
    # SFTTrainer tokenized each conversation through the chat template: every token of it is a point.
    assert snaps.layers["layer_01"].shape == (3, chat_tokens(tokenizer, probes), 32)


def test_explicit_conversational_probes_go_through_the_chat_template(tracking_uri, tmp_path):
    tokenizer = chat_tokenizer()
    sft(callback(tracking_uri, probes=CONVERSATIONS[:4]), tokenizer, tmp_path)
    _, run = the_run(tracking_uri)
    snaps = load_snapshots(run.info.run_id, tracking_uri=tracking_uri)
    assert sorted(snaps.index["probe_ids"]) == [0, 1, 2, 3]
    assert snaps.layers["layer_01"].shape == (3, chat_tokens(tokenizer, CONVERSATIONS[:4]), 32)


# --- instrumentation never ends training ----------------------------------------------------------------


def alerts(run, part):
    return json.loads(run.data.tags[f"workbench.alert.callback_{part}"])


def test_rows_no_probe_can_be_built_from_alert_once_and_training_goes_on(tracking_uri, tmp_path, capsys):
    train(callback(tracking_uri, probes=[{"question": "what?"}]), tmp_path, DictDataset(plain_item), steps=6)
    client, run = the_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert alerts(run, "snapshots")["step"] == 0
    assert "rows have columns ['question']" in alerts(run, "snapshots")["message"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "event/callback_snapshots")] == [0]
    assert not [key for key in run.data.metrics if key.startswith("geom/")]
    assert capsys.readouterr().err.count("WorkbenchCallback: snapshots stopped at step 0") == 1
    with pytest.raises(WorkbenchError, match="no snapshots found"):
        load_snapshots(run.info.run_id, tracking_uri=tracking_uri)


class NoHiddenStates(type(tiny_llama())):
    """A model that trains but cannot return hidden states (as some custom heads cannot)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, output_hidden_states=None, **kwargs):
        if output_hidden_states:
            raise ValueError("this model cannot return hidden states")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


def no_hidden_states_model():
    model = tiny_llama()
    model.__class__ = NoHiddenStates
    return model


def test_a_model_that_fails_the_snapshot_keeps_training_and_logging(tracking_uri, tmp_path):
    trainer = train(callback(tracking_uri), tmp_path, DictDataset(plain_item), model=no_hidden_states_model())
    client, run = the_run(tracking_uri)
    assert trainer.state.global_step == 4 and run.info.status == "FINISHED"
    assert alerts(run, "snapshots") == {
        "step": 0,
        "message": "snapshots stopped at step 0, training goes on: ValueError: this model cannot return hidden states",
    }
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]


def test_strict_raises_the_callbacks_own_error(tracking_uri, tmp_path):
    with pytest.raises(ValueError, match="cannot return hidden states"):
        train(callback(tracking_uri, strict=True), tmp_path, DictDataset(plain_item), model=no_hidden_states_model())
    cb = WorkbenchCallback.from_config({"strict": True, "tracking": {"uri": tracking_uri}})
    assert cb.strict is True


def test_a_failing_policy_engine_stops_the_policies_only(tracking_uri, tmp_path, monkeypatch):
    from workbench.policies import PolicyEngine

    def broken(self, step, metrics, *, snapshot=False):
        raise KeyError("lost state")

    monkeypatch.setattr(PolicyEngine, "observe", broken)
    train(callback(tracking_uri), tmp_path, DictDataset(plain_item))
    _, run = the_run(tracking_uri)
    assert alerts(run, "policies")["message"] == "policies stopped at step 0, training goes on: KeyError: 'lost state'"
    assert load_snapshots(run.info.run_id, tracking_uri=tracking_uri).steps == [0, 2, 4]  # snapshots go on


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"snapshot": {"evry": 2}}, "snapshot.evry: unknown key"),
        ({"snapshot": {"every": "often"}}, "snapshot.every"),
        ({"strict": "maybe"}, "strict"),
    ],
)
def test_a_wrong_callback_setting_is_refused_before_training_with_one_line(config, field):
    with pytest.raises(WorkbenchError, match=f"^callback config: {field}") as error:
        WorkbenchCallback.from_config(config)
    assert "\n" not in str(error.value)


USER_SCRIPT = """
import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from workbench import WorkbenchCallback

class Sequences(Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (256, 16), generator=torch.Generator().manual_seed(0))
    def __len__(self):
        return len(self.ids)
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(16, dtype=torch.long), "labels": self.ids[i]}

model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=32))
stop = {"name": "loss-below-6", "when": {"metric": "train/loss", "below": 6.0}, "actions": ["stop"]}
callback = WorkbenchCallback.from_config({"snapshot": {"every": 5, "probes": 16},
                                          "tracking": {"uri": URI, "experiment": "user"}, "policies": [stop]})
args = TrainingArguments(output_dir="out", max_steps=200, per_device_train_batch_size=16, learning_rate=3e-3,
                         logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=Sequences(), callbacks=[callback])
trainer.train()
print("stopped at step", trainer.state.global_step)
"""


def test_a_users_plain_script_with_a_torch_dataset_is_stopped_by_its_policy(tracking_uri, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(f"URI = {tracking_uri!r}\n" + USER_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("user").experiment_id])
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    first_below = min(m.step for m in losses if m.value < 6.0)  # the rule stops at the first log under 6
    assert f"stopped at step {first_below}" in out.stdout and max(m.step for m in losses) == first_below
    assert run.data.tags["workbench.stopped_at_step"] == str(first_below) and first_below < 200
    assert "geom/eff_rank/layer_02" in run.data.metrics
