"""What the language-model stages share: their start and end, trainer arguments, the starting model, the
workbench's callback on their trainer and the held-out generation check (the RL stages add theirs in rl.py).
Each stage module reads top to bottom on its own.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.lm.models import load_pretrained
from pipelines.lm.task import ReversalTask, gold_reward, text_of
from workbench import tags
from workbench.artifacts import MODEL_DIR, log_pretrained, log_tree, model_checkpoint_path
from workbench.callback import WorkbenchCallback
from workbench.errors import WorkbenchError
from workbench.launch import run_nested
from workbench.runtime import resolve_device
from workbench.stages import StageResult, stage_config_class

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

    from pipelines.lm.config import LoraSettings
    from workbench.config import StageConfig
    from workbench.tracking import Tracker

# The stage a stage starts from, trained on the fly (with its defaults) when `model.name_or_path` is empty.
PREVIOUS_STAGE = {"sft": "pretrain", "rm": "sft", "dpo": "sft", "grpo": "sft", "ppo": "sft"}
MAX_CHECKED_PROMPTS = 256  # held-out prompts answered by generation at the start and the end of a stage
GOLD_SAMPLES = 4  # sampled answers per held-out prompt behind gold/accuracy


def stage_start(config: Any) -> tuple[str, ReversalTask]:
    """How every language-model stage begins: its device, the seed set, the built-in task of its settings."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    return device, ReversalTask(config.task, config.seed)


@contextmanager
def trainer_output(tracker: Tracker, stage: str) -> Iterator[str]:
    """The trainer's output folder, temporary; the checkpoints a policy asked for in it are kept in the run."""
    with tempfile.TemporaryDirectory(prefix=f"workbench-{stage}-") as output_dir:
        yield output_dir
        log_checkpoints(output_dir, tracker)


def training_arguments(
    args_class: type[TrainingArguments], config: StageConfig, output_dir: str, device: str, **extra: Any
) -> TrainingArguments:
    """The stage config as a `TrainingArguments` (or TRL `*Config`) instance: the same knobs for every stage,
    `extra` adding to or replacing them.

    Logging goes through `WorkbenchCallback` only (report_to none); evaluation and logging every
    `train.eval_every` steps; no periodic checkpoints (a policy's `checkpoint` action saves one).
    """
    train = config.train
    knobs: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=2 * train.batch_size,
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_steps,
        lr_scheduler_type="linear",
        logging_steps=train.eval_every,
        eval_strategy="steps",
        eval_steps=train.eval_every,
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        use_cpu=device == "cpu",
        bf16=device.startswith("cuda") and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    return args_class(**{**knobs, **extra})


def lora_config(lora: LoraSettings) -> LoraConfig | None:
    """The `lora` settings as peft's `LoraConfig` (LoRA, Hu et al. 2021: W + (alpha / r) B A on every linear
    layer), or None for full fine-tuning."""
    if not lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def starting_model(
    config: Any, tracker: Tracker, head: str = "causal_lm"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`model.name_or_path`, or else the previous stage trained now on the built-in task with its defaults
    (this stage's seed, device, model sizes and task), as a nested run."""
    if config.model.name_or_path is not None:
        model, tokenizer = load_pretrained(config.model.name_or_path, tracker.tracking_uri, head)
        if config.task.chat_template and tokenizer.chat_template is None:
            raise WorkbenchError(
                f"task.chat_template: the tokenizer of {config.model.name_or_path} has no chat template; set "
                "task.chat_template=false"
            )
        return model, tokenizer
    previous = stage_config_class(PREVIOUS_STAGE[config.stage])(
        seed=config.seed,
        device=config.device,
        task=config.task,
        model=config.model,
        snapshot={"enabled": False},
        tracking=config.tracking,
    )
    result, _ = run_nested(previous, tracker, run_name=f"{previous.stage} (on the fly, for {config.stage})")
    tracker.set_tags({tags.BASE_MODEL: result.model_uri})
    return load_pretrained(result.model_uri, tracker.tracking_uri, head)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    sample: bool = False,
    batch_size: int = 256,
) -> list[str]:
    """Completions of `prompts`, greedy or sampled at temperature 1 (seeded, leaving the global RNG as it was);
    left-padded batches, stopping at EOS."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    completions = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
                batch = batch.to(device)
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=sample,
                    temperature=1.0 if sample else None,
                    top_k=0 if sample else None,
                    top_p=1.0 if sample else None,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                completions += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return completions


def held_out_check(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    fmt: str,
    gold: bool,
    max_new_tokens: int,
) -> dict[str, float]:
    """Answers to held-out prompts, scored; {} for data without prompts (text, messages).

    Greedy answers against the references (the completion, or a pair's chosen answer): `eval/exact_match`
    and ROUGE-L F1 (`rouge-score`). With a gold check (the built-in task): `gold/greedy_accuracy`, and over
    `GOLD_SAMPLES` answers per prompt sampled at temperature 1, `gold/accuracy` (share exactly right: the
    policy's probability of answering right) and `gold/reward` (mean partial credit). Conversational prompts
    are answered through the tokenizer's chat template, as the trainers present them.
    """
    from rouge_score import rouge_scorer

    reference = {"prompt_completion": "completion", "preference": "chosen"}.get(fmt)
    rows = [r for r in rows[:MAX_CHECKED_PROMPTS] if isinstance(r.get("prompt"), str | list)]
    if reference is None or not rows:
        return {}
    questions, references = [text_of(r["prompt"]) for r in rows], [text_of(r[reference]) for r in rows]
    prompts = [generation_prompt(tokenizer, r["prompt"]) for r in rows]
    greedy = generate(model, tokenizer, prompts, max_new_tokens)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = list(zip(greedy, references, strict=True))
    metrics = {
        "eval/exact_match": _mean(c.strip() == r.strip() for c, r in pairs),
        "eval/rougeL": _mean(scorer.score(r, c)["rougeL"].fmeasure for c, r in pairs),
    }
    if gold:
        metrics["gold/greedy_accuracy"] = _mean(r == 1.0 for r in gold_reward(questions, greedy))
        repeated = [p for p in prompts for _ in range(GOLD_SAMPLES)]
        answers = generate(model, tokenizer, repeated, max_new_tokens, sample=True)
        rewards = gold_reward([q for q in questions for _ in range(GOLD_SAMPLES)], answers)
        metrics["gold/accuracy"] = _mean(r == 1.0 for r in rewards)
        metrics["gold/reward"] = _mean(rewards)
    return metrics


def generation_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]]) -> str:
    """The text a model continues: a conversational prompt rendered by the chat template, up to the assistant's
    turn (as TRL renders it for generation); a text prompt as it is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def instrument_trainer(trainer: Trainer, config: StageConfig, tracker: Tracker) -> WorkbenchCallback:
    """Add the workbench's callback to a stage's trainer: snapshots of the trainer's own (processed) eval rows, else
    its train rows, geometry, the stage's policies, all logged to the stage's run."""
    rows = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
    callback = WorkbenchCallback(
        config.snapshot, tracker=tracker, probes=rows, seed=config.seed, policies=config.policies
    )
    trainer.add_callback(callback)
    return callback


def log_checkpoints(output_dir: str, tracker: Tracker) -> None:
    """Checkpoints a policy asked for (`control.should_save`, the trainer's `checkpoint-<step>` folders) are kept
    as run artifacts `checkpoints/step_XXXXXXXX`, like every stage's, not in a temporary folder."""
    for folder in sorted(Path(output_dir).glob("checkpoint-*")):
        log_tree(tracker, folder, model_checkpoint_path(int(folder.name.removeprefix("checkpoint-"))))


def stage_result(
    callback: WorkbenchCallback,
    config: StageConfig,
    tracker: Tracker,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    metrics: dict[str, float],
    summary: list[str],
) -> StageResult:
    """The end of a stage: its model and tokenizer logged as `model/`, and first in the summary, the step a policy
    (or a stop request) ended it at."""
    stopped = callback.engine.stopped if callback.engine is not None else None
    if stopped is not None:
        summary = [f"stopped at step {stopped.step} of {config.train.max_steps}: {stopped.message}", *summary]
    model_uri = log_pretrained(tracker, MODEL_DIR, model, tokenizer)
    return StageResult(model_uri, metrics, summary, ended_by_user=callback.ended_by_user)
