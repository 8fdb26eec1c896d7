"""The RM's held-out check (`ranking_metrics`) on scores set by hand, ties included."""

import pytest

from pipelines.lm import rm


@pytest.fixture
def scored(monkeypatch):
    """`rm.scores` replaced by a table text -> score; returns the table to fill."""
    table: dict[str, float] = {}
    monkeypatch.setattr(rm, "scores", lambda model, tokenizer, texts: [table[t] for t in texts])
    return table


def test_rankings_give_pairwise_accuracy_over_all_pairs_and_kendall_tau_a_per_prompt(scored):
    scored.update({"p:a": 1.0, "p:b": 2.0, "p:c": 3.0, "q:x": 1.0, "q:y": 1.0, "q:z": 0.0, "q:w": 2.0})
    rows = [
        # Labeller: c > a > b; scores 3, 1, 2 in that order. Pairs (3,1) and (3,2) concordant, (1,2) discordant:
        # 2 of 3 right, tau = (2 - 1) / 3 = 1/3.
        {"prompt": "p:", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]},
        # Labeller: x > y > z > w; scores 1, 1, 0, 2. Pairs: (1,1) a tie, (1,0) C, (1,2) D, (1,0) C, (1,2) D,
        # (0,2) D: 2 of 6 right (a tie is not), tau = (2 - 3) / 6 = -1/6 (a tie counts in the 6, tau-a).
        {"prompt": "q:", "completions": ["x", "y", "z", "w"], "ranking": [0, 1, 2, 3]},
        {"prompt": "r:", "completions": ["only"], "ranking": [0]},  # no pair: left out
    ]
    # Accuracy pools the pairs, (2 + 2) / (3 + 6) = 4/9 (not the mean of 2/3 and 1/3); tau is the mean over
    # prompts, (1/3 - 1/6) / 2 = 1/12.
    assert rm.ranking_metrics(None, None, rows, "ranking") == pytest.approx(
        {"rm/accuracy": 4 / 9, "rm/kendall_tau": 1 / 12}
    )


def test_preference_pairs_count_only_a_strictly_higher_chosen_score_as_right(scored):
    scored.update({"p:good": 2.0, "p:bad": 1.0, "tie-a": 1.0, "tie-b": 1.0, "q:good": 0.0, "q:bad": 3.0})
    rows = [
        {"prompt": "p:", "chosen": "good", "rejected": "bad"},  # 2 > 1: right
        {"chosen": "tie-a", "rejected": "tie-b"},  # no prompt; 1 = 1: not right
        {"prompt": "q:", "chosen": "good", "rejected": "bad"},  # 0 < 3: wrong
    ]
    assert rm.ranking_metrics(None, None, rows, "preference") == {"rm/accuracy": 1 / 3}
