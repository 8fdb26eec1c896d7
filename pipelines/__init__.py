"""Stage runners, one family a folder, each with its settings beside it (`config.py`).

- `grokking/`: the modular-arithmetic grokking task;
- `lm/`: language-model stages on the field's libraries (pretrain, sft, rm, dpo, grpo, ppo) and what they share;
- `tod/`: task-oriented dialogue (imitation + PPO, and the continual stage);
- `chain/`: stages in order, each from the previous one's model;
- `policy_gradient.py`: PPO's pure pieces (GAE, clipped losses, the KL estimate), shared by `lm/` and `tod/`.

`workbench.stages` names each `stage:`'s config class and runner; nothing in the core imports this package.
"""
