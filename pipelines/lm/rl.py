"""What the RL stages (grpo, ppo) share: the starting policy, the reward they maximise and the gold check.

Rewards (`reward.function`), each with TRL's reward-function signature `f(prompts, completions) -> floats`:

- `rm`: the reward model of the rm stage, r(x, y) of prompt + answer + EOS, as it was trained (a proxy: with
  a biased labeller, `task.length_bias` > 0, it rewards longer answers and the policy can hack it);
- `gold`: the task's gold reward (pipelines/lm/task.py), the reward the proxy stands for;
- `self_confidence`: the policy's own mean token probability of its answer, exp(1/T sum_t log pi(y_t|x, y_<t)),
  a self-feedback reward in the spirit of RLSF (van Niekerk et al. 2025): no labels, and a known way to
  drive entropy down.

Any of them can be given flaws on purpose, as proxies have them: `reward.length_bonus` per word of the answer
(verbosity bias) and `reward.token_bonus` per occurrence of `reward.bonus_token` (a surface feature). The failure
suite (benchmarks/early_warning.py) hacks these.

The RM must share the policy's tokenizer (it is a head on the same SFT model); the stages refuse one that
does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pipelines.lm.config import RewardStageConfig
from pipelines.lm.models import load_pretrained
from pipelines.lm.rm import scores
from pipelines.lm.supervised import generate, generation_prompt, held_out_check, starting_model
from pipelines.lm.task import ReversalTask, gold_reward, text_of
from workbench import tags
from workbench.errors import WorkbenchError
from workbench.launch import run_nested
from workbench.snapshots import layer_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pipelines.lm.config import GRPOStageConfig, PPOStageConfig
    from workbench.tracking import Tracker

    RLConfig = GRPOStageConfig | PPOStageConfig

RewardFunction = Callable[..., list[float]]
CHECKED_PROMPTS = 128  # held-out prompts of the periodic gold check (x 4 sampled answers, + 1 greedy)


def start(config: RLConfig, tracker: Tracker) -> tuple[RLConfig, PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The config as run, the policy to train, its tokenizer and the URI it came from.

    The policy is `model.name_or_path`, else an SFT model trained now (nested, as `starting_model` does for
    every stage). In a chain (pretrain -> sft -> rm -> ppo) the stage before is the rm stage: the policy is
    then the model that RM started from, and the RM becomes `reward.model` (unless one is given).
    """
    uri = config.model.name_or_path
    if uri is not None and uri.startswith("runs:/"):
        try:
            run = tracker.client.get_run(uri.removeprefix("runs:/").split("/")[0])
        except Exception:  # MLflow raises several types for an unknown run id; load_pretrained says which
            run = None
        if run is not None and run.data.tags.get(tags.STAGE) == "rm":
            policy_uri = run.data.tags.get(tags.BASE_MODEL) or run.data.params["model.name_or_path"]
            update = {"model": config.model.model_copy(update={"name_or_path": policy_uri})}
            if config.reward.model is None:
                update["reward"] = config.reward.model_copy(update={"model": uri})
            config = config.model_copy(update=update)
    policy, tokenizer = starting_model(config, tracker)
    base = config.model.name_or_path or tracker.get_tag(tags.BASE_MODEL)
    tracker.set_tags({tags.POLICY_MODEL: base})
    return config, policy, tokenizer, base


def reward_function(
    config: RLConfig,
    tracker: Tracker,
    base: str,
    tokenizer: PreTrainedTokenizerBase,
    policy: Callable[[], PreTrainedModel],
    device: str,
) -> RewardFunction:
    """The reward `reward.function` names, with the flaws `reward.length_bonus` and `reward.token_bonus` add;
    `policy()` is the policy being trained (for self-feedback)."""
    reward = _named_reward(config, tracker, base, tokenizer, policy, device)
    settings = config.reward
    if not settings.length_bonus and not settings.token_bonus:
        return reward

    def flawed(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        words = [text_of(c).split() for c in completions]
        return [
            r + settings.length_bonus * len(w) + settings.token_bonus * w.count(settings.bonus_token)
            for r, w in zip(reward(prompts, completions, **kwargs), words, strict=True)
        ]

    flawed.__name__ = reward.__name__  # TRL logs rewards/<name>/mean
    return flawed


def _named_reward(
    config: RLConfig,
    tracker: Tracker,
    base: str,
    tokenizer: PreTrainedTokenizerBase,
    policy: Callable[[], PreTrainedModel],
    device: str,
) -> RewardFunction:
    if config.reward.function == "gold":
        return gold_reward
    if config.reward.function == "self_confidence":

        def self_confidence(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
            return mean_token_probability(policy(), tokenizer, prompts, completions)

        return self_confidence
    rm, rm_tokenizer = reward_model(config, tracker, base)
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise WorkbenchError(
            f"reward.model: {config.reward.model or base}: its tokenizer does not match the policy's "
            f"({len(rm_tokenizer)} vs {len(tokenizer)} tokens); train the RM on the policy's SFT model"
        )
    rm = rm.to(device).eval().requires_grad_(False)

    def rm_reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
        return scores(rm, rm_tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)])

    return rm_reward


def reward_model(config: RLConfig, tracker: Tracker, base: str) -> tuple[Any, Any]:
    """`reward.model`, or an RM trained now (nested run, rm defaults but `reward.rm_steps`) on the starting
    model with this stage's task, so `task.length_bias` biases its labeller."""
    uri = config.reward.model
    if uri is None:
        rm_config = RewardStageConfig(
            seed=config.seed,
            device=config.device,
            task=config.task,
            model=config.model.model_copy(update={"name_or_path": base}),
            train={"max_steps": config.reward.rm_steps},
            snapshot={"enabled": False},
            tracking=config.tracking,
        )
        result, _ = run_nested(rm_config, tracker, run_name=f"rm (on the fly, for {config.stage})")
        uri = result.model_uri
    tracker.set_tags({tags.REWARD_MODEL: uri})
    try:
        return load_pretrained(uri, tracker.tracking_uri, head="reward")
    except WorkbenchError as exc:
        raise WorkbenchError(f"reward.model: {str(exc).removeprefix('model.name_or_path: ')}") from None


@torch.no_grad()
def mean_token_probability(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str]
) -> list[float]:
    """exp of the mean log-probability of each completion's tokens (and EOS) given its prompt."""
    ids, attention, answer_mask = answer_batch(model, tokenizer, prompts, completions)
    was_training = model.training
    model.eval()
    try:
        logprobs = model(input_ids=ids, attention_mask=attention).logits
    finally:
        model.train(was_training)
    taken = logprobs[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = answer_mask[:, 1:].float()
    return ((taken * mask).sum(1) / mask.sum(1)).exp().tolist()


def answer_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + answer + EOS of each pair, right-padded (positions start at 0), on the model's device: input ids,
    attention mask, and the mask of the answer's tokens (EOS included)."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    answers = [c + tokenizer.eos_token for c in completions]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    width = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids, strict=True))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    answer_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (p, a) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
        ids[row, : len(p) + len(a)] = torch.tensor(p + a)
        attention[row, : len(p) + len(a)] = 1
        answer_mask[row, len(p) : len(p) + len(a)] = True
    device = next(model.parameters()).device
    return ids.to(device), attention.to(device), answer_mask.to(device)


def answer_geometry(config: RLConfig, task: ReversalTask, tokenizer: PreTrainedTokenizerBase) -> AnswerGeometry | None:
    """The stage's `AnswerGeometry` on its first `answer_probes` held-out prompts; None when that is 0 (or the task
    has fewer than 4)."""
    rows = task.rl_prompts("eval")[: config.answer_probes]
    if len(rows) < 4:
        return None
    return AnswerGeometry([generation_prompt(tokenizer, r["prompt"]) for r in rows], tokenizer, config.max_new_tokens)


class AnswerGeometry:
    """Where the policy's own answers sit against the starting policy's, read from hidden states: gold-free.

    The held-out prompts are split in two halves. At the first call the policy (the frozen reference then: RL
    starts from it) answers the first half greedily, and each layer's state of each answer (the mean over its
    tokens) is kept: the reference cloud. At every call the policy answers the second half and, per layer i,

    * `geom/answer_knn_gap/layer_i`: mean distance from each answer's state to the nearest reference state, over
      the reference states' own mean nearest-neighbour distance (`analysis.heldout.knn_gap`). Two halves, so it
      starts near 1 rather than at 0, and grows as the policy's answers, or how it represents them, leave the
      reference's distribution: an out-of-distribution score (InfoRM's outlier idea, Miao et al. 2024, on the
      policy's states instead of a reward model's);
    * `geom/answer_eff_rank/layer_i`: the effective rank (RankMe) of the answers' states.
    """

    def __init__(self, prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> None:
        half = len(prompts) // 2
        self.reference_prompts, self.prompts = list(prompts[:half]), list(prompts[half : 2 * half])
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.reference: list[torch.Tensor] | None = None

    def __call__(self, model: PreTrainedModel) -> dict[str, float]:
        from analysis.heldout import knn_gap
        from analysis.spectra import EffectiveRank

        if self.reference is None:
            self.reference = self._states(model, self.reference_prompts)
        metrics = {}
        for i, (reference, states) in enumerate(zip(self.reference, self._states(model, self.prompts), strict=True)):
            metrics[f"geom/answer_knn_gap/{layer_name(i)}"] = knn_gap(reference, states)[0]
            metrics[f"geom/answer_eff_rank/{layer_name(i)}"] = EffectiveRank().fit(states).dimension_
        return metrics

    @torch.no_grad()
    def _states(self, model: PreTrainedModel, prompts: list[str]) -> list[torch.Tensor]:
        """Per layer, [prompts, hidden]: each greedy answer's mean state over its tokens."""
        answers = generate(model, self.tokenizer, prompts, self.max_new_tokens)
        ids, attention, answer_mask = answer_batch(model, self.tokenizer, prompts, answers)
        was_training = model.training
        model.eval()
        try:
            hidden = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        finally:
            model.train(was_training)
        weights = answer_mask.float().unsqueeze(-1) / answer_mask.sum(1).view(-1, 1, 1)
        return [(layer.float() * weights).sum(1).cpu() for layer in hidden]


def gold_check(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: ReversalTask, max_new_tokens: int
) -> dict[str, float]:
    """`gold/accuracy` (sampled), `gold/greedy_accuracy`, `gold/reward` on held-out prompts (supervised.py)."""
    rows = task.sft_rows("eval")[:CHECKED_PROMPTS]
    metrics = held_out_check(model, tokenizer, rows, "prompt_completion", True, max_new_tokens)
    return {k: v for k, v in metrics.items() if k.startswith("gold/")}
