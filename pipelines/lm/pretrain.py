"""Pretraining: a causal LM learns next-token prediction on a corpus, the built-in task's text or a JSONL of yours.

A byte-level BPE tokenizer is trained here on the corpus (`tokenizers`), a tiny Llama is built from config
(`model.*`), and `transformers.Trainer` minimises the causal-LM loss -1/T sum_t log p(x_t | x_<t) (labels are
the inputs; the model shifts them). With `model.name_or_path` the stage continues pretraining that model.
At the end the gold check asks the model the task's prompts it has never seen in this format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from pipelines.lm import supervised
from pipelines.lm.config import PretrainStageConfig
from pipelines.lm.data import load_stage_data
from pipelines.lm.models import build_causal_lm, load_pretrained, train_tokenizer
from workbench import tags
from workbench.stages import StageResult

if TYPE_CHECKING:
    from workbench.tracking import Tracker


def run(config: PretrainStageConfig, tracker: Tracker) -> StageResult:
    device, task = supervised.stage_start(config)
    train_rows, eval_rows, _ = load_stage_data(
        config.data,
        "pretrain",
        ("text",),
        lambda split: [{"text": t} for t in task.pretraining_text(split)],
        config.seed,
    )

    if config.model.name_or_path is None:
        tokenizer = train_tokenizer((row["text"] for row in train_rows), config.model.vocab_size)
        model = build_causal_lm(config.model, tokenizer)
    else:
        model, tokenizer = load_pretrained(config.model.name_or_path, tracker.tracking_uri)
    tracker.set_tags({tags.DEVICE: device, tags.PARAMETERS: str(model.num_parameters())})

    def tokenize(rows: list[dict]) -> Dataset:
        texts = [row["text"] + tokenizer.eos_token for row in rows]
        encoded = tokenizer(texts, truncation=True, max_length=config.train.max_length)
        return Dataset.from_dict({"input_ids": encoded["input_ids"]})

    with supervised.trainer_output(tracker, "pretrain") as output_dir:
        trainer = Trainer(
            model=model,
            args=supervised.training_arguments(TrainingArguments, config, output_dir, device),
            train_dataset=tokenize(train_rows),
            eval_dataset=tokenize(eval_rows),
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),  # labels = inputs, pads ignored
            processing_class=tokenizer,
        )
        callback = supervised.instrument_trainer(trainer, config, tracker)
        trainer.train()
        metrics = {"eval/loss": trainer.evaluate()["eval_loss"]}

    summary = [f"eval loss {metrics['eval/loss']:.3f} on {len(eval_rows)} held-out texts"]
    if config.data.path is None:  # the built-in task: ask its held-out prompts
        rows = task.sft_rows("eval")
        metrics.update(
            supervised.held_out_check(model, tokenizer, rows, "prompt_completion", True, 2 * config.task.length + 2)
        )
        summary.append(f"gold accuracy on held-out prompts: {metrics['gold/accuracy']:.3f}")
    tracker.log_metrics(metrics, trainer.state.global_step)
    return supervised.stage_result(callback, config, tracker, model, tokenizer, metrics, summary)
