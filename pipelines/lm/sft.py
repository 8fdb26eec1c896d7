"""Supervised fine-tuning (SFT): the model learns to answer prompts from demonstrations, with TRL's SFTTrainer.

Loss: cross-entropy on the completion tokens only (TRL's `completion_only_loss` for prompt/completion data),
-sum_t log p(y_t | x, y_<t), so the model is taught the answer, not the prompt. Full fine-tuning, or LoRA
(`lora.enabled`, peft: W + (alpha / r) B A with B A of rank r trained, W frozen; Hu et al. 2021), merged
into the weights at the end so the next stage loads a plain model.

The held-out check generates greedy answers to held-out prompts before and after training: exact match and
ROUGE-L against the references, and on the built-in task `gold/accuracy` and `gold/reward`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from pipelines.lm import supervised
from pipelines.lm.config import SFTStageConfig
from pipelines.lm.data import load_stage_data
from workbench import tags
from workbench.errors import WorkbenchError
from workbench.stages import StageResult

if TYPE_CHECKING:
    from workbench.tracking import Tracker


def run(config: SFTStageConfig, tracker: Tracker) -> StageResult:
    device, task = supervised.stage_start(config)
    train_rows, eval_rows, fmt = load_stage_data(
        config.data, "sft", ("prompt_completion", "messages", "text"), task.sft_rows, config.seed
    )
    if fmt != "prompt_completion" and config.snapshot.enabled and config.snapshot.pooling == "answer":
        raise WorkbenchError(
            f"snapshot.pooling: 'answer' needs prompt/completion data to know where the answer starts, but "
            f"{config.data.path} is in the {fmt} format; use snapshot.pooling=token (or last, mean)"
        )
    model, tokenizer = supervised.starting_model(config, tracker)
    tracker.set_tags({tags.DEVICE: device, tags.DATA_FORMAT: fmt})

    peft_config = supervised.lora_config(config.lora)

    gold = config.data.path is None

    def check() -> dict[str, float]:
        return supervised.held_out_check(trainer.model, tokenizer, eval_rows, fmt, gold, config.max_new_tokens)

    with supervised.trainer_output(tracker, "sft") as output_dir:
        args = supervised.training_arguments(
            SFTConfig, config, output_dir, device, max_length=config.train.max_length, gradient_checkpointing=False
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        callback = supervised.instrument_trainer(trainer, config, tracker)
        before = check()
        tracker.log_metrics(before, 0)
        trainer.train()
        after = {**check(), "eval/loss": trainer.evaluate()["eval_loss"]}
        tracker.log_metrics(after, trainer.state.global_step)

    model = trainer.model.merge_and_unload() if config.lora.enabled else trainer.model
    summary = [f"eval loss {after['eval/loss']:.3f}"]
    for key in ("gold/accuracy", "eval/exact_match", "eval/rougeL"):
        if key in after:
            summary.append(f"{key}: {before[key]:.3f} before SFT -> {after[key]:.3f} after")
    return supervised.stage_result(callback, config, tracker, model, tokenizer, after, summary)
