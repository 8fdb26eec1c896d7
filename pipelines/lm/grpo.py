"""Group relative policy optimisation (GRPO; Shao et al. 2024, DeepSeekMath) with TRL's GRPOTrainer.

For each prompt x the policy samples a group of G = `group_size` answers y_1..y_G and each gets a reward r_i
(`reward.function`: the trained RM, the gold reward or the policy's own confidence; pipelines/lm/rl.py). The
advantage needs no value model: it is the reward standardised within its group,

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G),

given to every token of y_i, and the loss is PPO's clipped surrogate (`clip_eps`) with a KL penalty
beta * KL(pi_theta || pi_ref) to the frozen starting policy (`kl_coef`; TRL's k3 estimator) and, optionally,
an entropy bonus (`entropy_coef`). TRL logs `reward`, `reward_std`, `rewards/<function>/mean`, `kl` (when
beta > 0), `entropy`, `clip_ratio/...` and `completions/mean_length`; the stage adds the held-out gold check
(`gold/accuracy`, `gold/reward`, `gold/greedy_accuracy`) to every log, so a proxy that rises while gold falls
is visible in one row, and the gold-free geometry of the policy's answers (`geom/answer_*`, pipelines/lm/rl.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from pipelines.lm import supervised
from pipelines.lm.config import GRPOStageConfig
from pipelines.lm.rl import AnswerGeometry, answer_geometry, gold_check, reward_function, start
from pipelines.lm.task import ReversalTask
from workbench import tags
from workbench.errors import WorkbenchError
from workbench.stages import StageResult

if TYPE_CHECKING:
    from workbench.tracking import Tracker


class HeldOutCallback(TrainerCallback):
    """Adds the held-out gold check and the answers' geometry to each training log, before `WorkbenchCallback`
    logs it."""

    def __init__(self, task: ReversalTask, max_new_tokens: int, answers: AnswerGeometry | None) -> None:
        self.task, self.max_new_tokens, self.answers = task, max_new_tokens, answers

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and "reward" in logs:  # a training log, not the end-of-run summary
            logs.update(gold_check(kwargs["model"], kwargs["processing_class"], self.task, self.max_new_tokens))
            if self.answers is not None:
                logs.update(self.answers(kwargs["model"]))


def run(config: GRPOStageConfig, tracker: Tracker) -> StageResult:
    if config.train.batch_size % config.group_size:
        raise WorkbenchError(
            f"train.batch_size: {config.train.batch_size} answers per step is not a multiple of group_size "
            f"{config.group_size}"
        )
    device, task = supervised.stage_start(config)
    config, policy, tokenizer, base = start(config, tracker)
    tracker.set_tags({tags.DEVICE: device, tags.REWARD: config.reward.function})

    peft_config = supervised.lora_config(config.lora)

    with supervised.trainer_output(tracker, "grpo") as output_dir:
        # TRL builds its frozen reference from the policy's path, so the policy is handed over as one.
        start_dir = Path(output_dir) / "start"
        policy.save_pretrained(start_dir)
        tokenizer.save_pretrained(start_dir)
        reward = reward_function(config, tracker, base, tokenizer, lambda: trainer.model, device)
        answers = answer_geometry(config, task, tokenizer)
        args = supervised.training_arguments(
            GRPOConfig,
            config,
            output_dir,
            device,
            eval_strategy="no",  # the gold check runs at each log instead (HeldOutCallback)
            lr_scheduler_type="constant_with_warmup",
            num_generations=config.group_size,
            max_completion_length=config.max_new_tokens,
            temperature=config.temperature,
            beta=config.kl_coef,
            epsilon=config.clip_eps,
            entropy_coef=config.entropy_coef,
            gradient_checkpointing=False,
        )
        trainer = GRPOTrainer(
            model=str(start_dir),
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_list(task.rl_prompts()),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[HeldOutCallback(task, config.max_new_tokens, answers)],
        )
        callback = supervised.instrument_trainer(trainer, config, tracker)
        before = gold_check(trainer.model, tokenizer, task, config.max_new_tokens)
        tracker.log_metrics({**before, **(answers(trainer.model) if answers is not None else {})}, 0)
        trainer.train()
        after = gold_check(trainer.model, tokenizer, task, config.max_new_tokens)
        tracker.log_metrics(after, trainer.state.global_step)

    model = trainer.model.merge_and_unload() if config.lora.enabled else trainer.model
    summary = [f"{key}: {before[key]:.3f} before GRPO -> {after[key]:.3f} after" for key in sorted(after)]
    return supervised.stage_result(callback, config, tracker, model, tokenizer, after, summary)
