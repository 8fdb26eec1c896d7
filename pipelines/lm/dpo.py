"""Direct preference optimisation (DPO; Rafailov et al. 2023) with TRL's DPOTrainer and a frozen reference.

The policy pi_theta starts as the SFT model; the reference pi_ref is a frozen copy of it (with LoRA, `lora.enabled`,
the same model with its adapters switched off). For a prompt x with
preferred answer y_w and rejected y_l, DPO minimises (eq. 7)

    -log sigma( beta * log pi_theta(y_w|x) / pi_ref(y_w|x)  -  beta * log pi_theta(y_l|x) / pi_ref(y_l|x) )

the Bradley-Terry likelihood of the preference under the implicit reward r(x, y) = beta log pi_theta / pi_ref,
so no reward model is trained. With `sft_weight` = alpha the loss adds alpha * -log pi_theta(y_w|x) per token
(RPO, Pang et al. 2024), which keeps the chosen answers' likelihood from falling along with the rejected
ones' (measured here: plain DPO past ~200 steps lowers gold accuracy). TRL logs the implicit reward as
`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`, and `logps/chosen`,
`logps/rejected`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from pipelines.lm import supervised
from pipelines.lm.config import DPOStageConfig
from pipelines.lm.data import load_stage_data
from workbench import tags
from workbench.callback import workbench_metric_name
from workbench.stages import StageResult

if TYPE_CHECKING:
    from workbench.tracking import Tracker


def run(config: DPOStageConfig, tracker: Tracker) -> StageResult:
    device, task = supervised.stage_start(config)
    train_rows, eval_rows, fmt = load_stage_data(config.data, "dpo", ("preference",), task.preference_rows, config.seed)
    policy, tokenizer = supervised.starting_model(config, tracker)
    peft_config = supervised.lora_config(config.lora)
    # pi_ref: the starting policy, frozen; with LoRA it is the policy with its adapters off (no second copy).
    reference = None if peft_config else copy.deepcopy(policy).eval().requires_grad_(False)
    tracker.set_tags({tags.DEVICE: device, tags.DATA_FORMAT: fmt})

    gold = config.data.path is None

    def check() -> dict[str, float]:
        return supervised.held_out_check(trainer.model, tokenizer, eval_rows, fmt, gold, config.max_new_tokens)

    with supervised.trainer_output(tracker, "dpo") as output_dir:
        args = supervised.training_arguments(
            DPOConfig,
            config,
            output_dir,
            device,
            beta=config.beta,
            loss_type=["sigmoid", "sft"] if config.sft_weight else ["sigmoid"],
            loss_weights=[1.0, config.sft_weight] if config.sft_weight else None,
            max_length=config.train.max_length,
            gradient_checkpointing=False,
        )
        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
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
        kept = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")  # logged by the callback already
        after = {workbench_metric_name(k): v for k, v in trainer.evaluate().items() if k in kept}
        generated = check()
        tracker.log_metrics(generated, trainer.state.global_step)
        after.update(generated)

    summary = [f"eval loss {after['eval/loss']:.3f}, eval rewards/accuracies {after['eval/rewards/accuracies']:.3f}"]
    for key in ("gold/accuracy", "eval/exact_match"):
        if key in after:
            summary.append(f"{key}: {before[key]:.3f} before DPO -> {after[key]:.3f} after")
    model = trainer.model.merge_and_unload() if config.lora.enabled else trainer.model
    return supervised.stage_result(callback, config, tracker, model, tokenizer, after, summary)
