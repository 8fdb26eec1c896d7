"""Language-model stages: pretrain, sft, rm, dpo (supervised.py) and grpo, ppo (rl.py), with their data, models and
the built-in task whose answers are checkable (task.py)."""
