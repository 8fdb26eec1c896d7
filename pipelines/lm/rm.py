"""Reward model (RM): a scalar score r(x, y) fitted to preferences with TRL's RewardTrainer.

The model is the previous stage's LM with a fresh scalar head (AutoModelForSequenceClassification, score of
the last token), as in InstructGPT (Ouyang et al. 2022). Rankings become preferred-first pairs; the loss is
the Bradley-Terry negative log-likelihood of each pair (Bradley & Terry 1952),

    -log sigma( r(x, y_w) - r(x, y_l) ).

Checked on held-out rankings before and after training: `rm/accuracy`, the share of ordered pairs the RM
scores in the labeller's order, and `rm/kendall_tau`, Kendall's rank correlation between the RM's scores and
the labeller's ranking (mean over prompts). TRL's own `accuracy` / `margin` are logged as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from pipelines.lm import supervised
from pipelines.lm.config import RewardStageConfig
from pipelines.lm.data import load_stage_data, ranking_to_pairs
from workbench import tags
from workbench.stages import StageResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from workbench.tracking import Tracker


def run(config: RewardStageConfig, tracker: Tracker) -> StageResult:
    device, task = supervised.stage_start(config)
    train_rows, eval_rows, fmt = load_stage_data(
        config.data, "rm", ("ranking", "preference"), task.ranking_rows, config.seed
    )
    source = config.data.path or "built-in task"
    train_pairs = ranking_to_pairs(train_rows, source) if fmt == "ranking" else train_rows
    eval_pairs = ranking_to_pairs(eval_rows, source) if fmt == "ranking" else eval_rows
    model, tokenizer = supervised.starting_model(config, tracker, head="reward")
    tracker.set_tags({tags.DEVICE: device, tags.DATA_FORMAT: fmt})

    def check() -> dict[str, float]:
        return ranking_metrics(trainer.model, tokenizer, eval_rows, fmt)

    with supervised.trainer_output(tracker, "rm") as output_dir:
        args = supervised.training_arguments(
            RewardConfig,
            config,
            output_dir,
            device,
            max_length=config.train.max_length,
            gradient_checkpointing=False,
        )
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(train_pairs),
            eval_dataset=Dataset.from_list(eval_pairs),
            processing_class=tokenizer,
        )
        callback = supervised.instrument_trainer(trainer, config, tracker)
        before = check()
        tracker.log_metrics(before, 0)
        trainer.train()
        after = check()
        tracker.log_metrics(after, trainer.state.global_step)

    summary = [f"{key}: {before[key]:.3f} before training -> {after[key]:.3f} after" for key in after]
    return supervised.stage_result(callback, config, tracker, trainer.model, tokenizer, after, summary)


@torch.no_grad()
def scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 128
) -> list[float]:
    """r(x, y) of each text (prompt + answer + EOS, as RewardTrainer tokenizes its pairs)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = [t + tokenizer.eos_token for t in texts[start : start + batch_size]]
            encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out += model(**encoded).logits[:, 0].float().tolist()
    finally:
        model.train(was_training)
    return out


def ranking_metrics(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]], fmt: str
) -> dict[str, float]:
    """`rm/accuracy` over every ordered pair; with rankings also `rm/kendall_tau` (mean over prompts)."""
    if fmt == "preference":
        prompts = [r.get("prompt", "") for r in rows]
        chosen = scores(model, tokenizer, [p + r["chosen"] for p, r in zip(prompts, rows, strict=True)])
        rejected = scores(model, tokenizer, [p + r["rejected"] for p, r in zip(prompts, rows, strict=True)])
        return {"rm/accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)}
    rows = [row for row in rows if len(row["ranking"]) >= 2]
    # Every completion in the labeller's order, best first, scored in one pass.
    texts = [row["prompt"] + row["completions"][i] for row in rows for i in row["ranking"]]
    flat = iter(scores(model, tokenizer, texts))
    right = total = 0
    taus = []
    for row in rows:
        ranked = [next(flat) for _ in row["ranking"]]
        pairs = list(itertools.combinations(ranked, 2))  # (better, worse) by the labeller
        concordant = sum(better > worse for better, worse in pairs)
        discordant = sum(better < worse for better, worse in pairs)
        right, total = right + concordant, total + len(pairs)
        taus.append((concordant - discordant) / len(pairs))  # Kendall's tau-a (Kendall 1938)
    return {"rm/accuracy": right / total, "rm/kendall_tau": sum(taus) / len(taus)}
