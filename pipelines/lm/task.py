"""The built-in task with a gold answer: reverse a short string of letters.

    prompt      "reverse d a c b ="
    completion  " b c a d"

Correctness is computable, so every stage's effect is checkable without downloads or human labels:
`gold_reward` scores any completion (1.0 = exactly right). Generated here, all from one seed:

- pretraining text: sentences stating reversals in other phrasings, `pretrain_noise` of them wrong (as
  on the web), so a pretrained model knows the content but not the prompt format;
- an SFT set (prompt/completion), `sft_noise` of the demonstrations wrong as human ones can be, so that an
  imitating model answers right only so often and preference tuning has something to fix;
- preference pairs (prompt/chosen/rejected) and rankings (prompt/completions/ranking, best first),
  labelled by a simulated labeller whose utility is the gold reward plus `length_bias` per letter: a
  biased labeller prefers longer answers, which a reward model then learns and an RL policy can exploit
  (reward hacking on purpose);
- prompts for RL.

The held-out strings (`eval_strings`) never occur in any training data, so gold accuracy on them
measures the learned rule, not memory.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.lm.config import GoldTaskConfig

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Ways of getting a reversal wrong, used for noisy pretraining text, rejected answers and ranking candidates.
MISTAKES = ("copy", "swap", "substitute", "longer", "shorter")
PRETRAIN_TEMPLATES = ("the reverse of {s} is{r} .", "{s} backwards reads{r} .", "read{r} , that is {s} reversed .")


def prompt_of(letters: Sequence[str]) -> str:
    return f"reverse {' '.join(letters)} ="


def answer_of(letters: Sequence[str]) -> str:
    return " " + " ".join(reversed(letters))


def letters_of(prompt: str) -> list[str]:
    """The string a prompt asks to reverse: the words between `reverse` and `=`."""
    words = prompt.split()
    start = words.index("reverse") + 1 if "reverse" in words else 0
    end = words.index("=", start) if "=" in words[start:] else len(words)
    return words[start:end]


def text_of(content: str | list[dict[str, str]]) -> str:
    """A prompt or answer as text: a conversational one (a list of chat messages) is its last message's content."""
    return content[-1]["content"] if isinstance(content, list) else content


def gold_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """Share of answer positions that are right, over the longer of answer and target: 1.0 only when exact.

    The signature is TRL's reward-function one (`prompts`, `completions`, extra columns as keywords); prompts and
    completions are text, or lists of chat messages as TRL passes them for conversational data.
    """
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        target = list(reversed(letters_of(text_of(prompt))))
        answer = text_of(completion).split()
        right = sum(a == t for a, t in zip(answer, target, strict=False))
        rewards.append(right / max(len(target), len(answer), 1))
    return rewards


def is_correct(prompt: str, completion: str) -> bool:
    return gold_reward([prompt], [completion])[0] == 1.0


@dataclass
class ReversalTask:
    """Seeded generators for every stage's data; `eval_strings` are held out of all of them."""

    config: GoldTaskConfig
    seed: int = 0

    def __post_init__(self) -> None:
        alphabet = LETTERS[: self.config.letters]
        every = [tuple(s) for s in itertools.product(alphabet, repeat=self.config.length)]
        random.Random(self.seed).shuffle(every)
        # Held out with its reversal: "the reverse of s is t" in training text would also teach t's answer.
        held_out: dict[tuple[str, ...], None] = {}
        for letters in every:
            if len(held_out) >= min(self.config.n_eval, len(every) // 2):
                break
            held_out.update({letters: None, letters[::-1]: None})
        self.alphabet = alphabet
        self.eval_strings = [list(s) for s in held_out]
        self.train_strings = [list(s) for s in every if s not in held_out]

    # --- text and demonstrations ----------------------------------------------------------------------

    def pretraining_text(self, split: str = "train") -> list[str]:
        """Noisy sentences about training strings; for `eval`, one correct sentence per held-out string."""
        rng = self._rng("pretrain", split)
        held_out = split == "eval"
        lines = []
        for i in range(len(self.eval_strings) if held_out else self.config.n_pretrain):
            letters = self.eval_strings[i] if held_out else rng.choice(self.train_strings)
            wrong = not held_out and rng.random() < self.config.pretrain_noise
            answer = self.mistake(letters, rng.choice(MISTAKES), rng) if wrong else answer_of(letters)
            lines.append(rng.choice(PRETRAIN_TEMPLATES).format(s=" ".join(letters), r=answer))
        return lines

    def sft_rows(self, split: str = "train") -> list[dict[str, Any]]:
        """Demonstrations, `sft_noise` of them wrong (none of the held-out references)."""
        rng = self._rng("sft", split)
        noise = self.config.sft_noise if split == "train" else 0.0
        rows = []
        for letters in self._strings(split, "sft"):
            wrong = rng.random() < noise
            answer = self.mistake(letters, rng.choice(MISTAKES), rng) if wrong else answer_of(letters)
            rows.append(self._row(prompt=prompt_of(letters), completion=answer))
        return rows

    def rl_prompts(self, split: str = "train") -> list[dict[str, Any]]:
        return [self._row(prompt=prompt_of(s)) for s in self._strings(split, "rl")]

    # --- labelled comparisons -------------------------------------------------------------------------

    def preference_rows(self, split: str = "train") -> list[dict[str, Any]]:
        """One pair per prompt: the correct answer against one mistake, ordered by the labeller."""
        rng = self._rng("pairs", split)
        rows = []
        for letters in self._strings(split, "pairs"):
            prompt = prompt_of(letters)
            a, b = answer_of(letters), self.mistake(letters, rng.choice(MISTAKES), rng)
            chosen, rejected = sorted((a, b), key=lambda c: -self.utility(prompt, c))
            rows.append(self._row(prompt=prompt, chosen=chosen, rejected=rejected))
        return rows

    def ranking_rows(self, split: str = "train", candidates: int = 4) -> list[dict[str, Any]]:
        """The correct answer and up to `candidates - 1` mistakes of distinct utility, ranked best first."""
        rng = self._rng("rankings", split)
        rows = []
        for letters in self._strings(split, "rankings"):
            prompt = prompt_of(letters)
            completions = [answer_of(letters)]
            for mistake in rng.choices(MISTAKES, k=4 * len(MISTAKES)):  # strings like "a a a a" allow fewer
                answer = self.mistake(letters, mistake, rng)
                # Distinct utilities only: a ranking cannot say two answers tie, so the order must be strict.
                utilities = {self.utility(prompt, c) for c in completions}
                if self.utility(prompt, answer) not in utilities and len(completions) < candidates:
                    completions.append(answer)
            rng.shuffle(completions)
            ranking = sorted(range(len(completions)), key=lambda i: -self.utility(prompt, completions[i]))
            rows.append({"prompt": prompt, "completions": completions, "ranking": ranking})
        return rows

    def utility(self, prompt: str, completion: str) -> float:
        """The simulated labeller: gold reward plus `length_bias` per letter of the answer."""
        return gold_reward([prompt], [completion])[0] + self.config.length_bias * len(completion.split())

    def mistake(self, letters: Sequence[str], kind: str, rng: random.Random) -> str:
        """A wrong answer of the given kind; `longer` is right but for one extra letter."""
        answer = list(reversed(letters))
        if kind == "copy" and list(letters) != answer:
            return " " + " ".join(letters)
        if kind == "swap":
            i = rng.randrange(len(answer) - 1)
            if answer[i] != answer[i + 1]:
                answer[i], answer[i + 1] = answer[i + 1], answer[i]
                return " " + " ".join(answer)
        if kind == "longer":
            return " " + " ".join([*answer, rng.choice(self.alphabet)])
        if kind == "shorter":
            return " " + " ".join(answer[:-1])
        i = rng.randrange(len(answer))  # substitute (and the fallback when a copy or swap changes nothing)
        answer[i] = rng.choice([c for c in self.alphabet if c != answer[i]])
        return " " + " ".join(answer)

    # --- helpers ----------------------------------------------------------------------------------------

    def _row(self, prompt: str, **answers: str) -> dict[str, Any]:
        """A row as text, or with `chat_template` in TRL's conversational form: a user turn, assistant answers."""
        if not self.config.chat_template:
            return {"prompt": prompt, **answers}
        return {
            "prompt": [{"role": "user", "content": prompt}],
            **{k: [{"role": "assistant", "content": v.strip()}] for k, v in answers.items()},
        }

    def _strings(self, split: str, purpose: str) -> list[list[str]]:
        if split == "eval":
            return self.eval_strings
        rng = self._rng(purpose, "strings")
        return [rng.choice(self.train_strings) for _ in range(self.config.n_train)]

    def _rng(self, *purpose: object) -> random.Random:
        # A separate, reproducible stream per purpose: changing one generator leaves the others' data as it was.
        return random.Random(f"{self.seed}/{'/'.join(map(str, purpose))}")
