"""Dialogue evaluation as ConvLab users know it (MultiWozEvaluator; Budzianowski et al. 2018, Zhu et al. 2020).

Per dialogue, against the user goal:
- inform precision / recall / F1 over requestable slots: TP = requested slots the system informed, FN =
  requested slots it never informed, FP = requestable slots it informed that the user neither asked for nor
  constrained;
- book rate: per domain with a booking, the share of the goal's constraints the booked entity meets (0 when
  nothing was booked); the dialogue's book rate is the mean over those domains;
- match: the goal's constraints plus the values the system gave for the requested slots must describe a
  database entity, and a booked entity must meet the constraints (ConvLab's final goal analysis);
- success = every requested slot informed (recall 1), every booking right (book rate 1, booked with the
  goal's booking values: ConvLab's strict check), and match; a goal with neither requests nor bookings counts
  as no success, as in ConvLab.
Corpus aggregates are means over dialogues, each metric over the dialogues where it is defined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.tod.data import NO_CONSTRAINT, TAXI, Act, Database, Goal, Ontology, TODDataset, acts_from_unified

INFORM_INTENTS = ("inform", "recommend", "offerbook", "offerbooked")


@dataclass
class DialogueScore:
    success: bool
    tp: int
    fp: int
    fn: int
    book_rate: float | None  # None: nothing to book in this goal
    turns: int
    reward: float = 0.0
    emotions: dict[str, int] = field(default_factory=dict)  # user emotion -> turns (simulated dialogues only)

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if r is None:
            return None
        return 2 * p * r / (p + r) if p and r else 0.0


class DialogueEvaluator:
    """Follows one dialogue's system acts and bookings; `score(turns)` judges it against the goal."""

    def __init__(self, goal: Goal, db: Database, ontology: Ontology) -> None:
        self.goal, self.db, self.ontology = goal, db, ontology
        self.informed: dict[str, dict[str, str]] = {}  # domain -> requestable slot -> last value the system gave
        self.bookings: dict[str, tuple[Mapping[str, Any] | None, dict[str, str]]] = {}  # entity, booking values

    def add_system_acts(self, acts: Iterable[Act]) -> None:
        for intent, domain, slot, value in acts:
            schema = self.ontology.domains.get(domain)
            if intent in INFORM_INTENTS and schema and slot in schema.requestable and value not in NO_CONSTRAINT:
                self.informed.setdefault(domain, {})[slot] = value

    def record_booking(self, domain: str, entity: Mapping[str, Any] | None, booking: Mapping[str, str]) -> None:
        """The first booking of a domain counts (ConvLab's); `entity` None: booked something not in the database."""
        self.bookings.setdefault(domain, (entity, dict(booking)))

    def score(self, turns: int) -> DialogueScore:
        tp = fp = fn = 0
        for domain, slots in self.informed.items():
            part = self.goal.parts.get(domain)
            wanted = set(part.reqt) | set(part.info) if part else set()
            fp += len(set(slots) - wanted)
        book_scores, all_match, books_right = [], True, True
        for domain, part in self.goal.parts.items():
            told = self.informed.get(domain, {})
            tp += sum(s in told for s in part.reqt)
            fn += sum(s not in told for s in part.reqt)
            entity, booking = self.bookings.get(domain, (None, {}))
            if part.book:
                book_scores.append(self._constraints_met(domain, entity, part.info))
                accepted = {s: (v, *part.alternatives.get(s, ())) for s, v in part.book.items()}
                books_right &= all(booking.get(s, "") in values for s, values in accepted.items())
            all_match &= self._match(domain, part.info, {s: told[s] for s in part.reqt if s in told}, entity)
        book_rate = float(np.mean(book_scores)) if book_scores else None
        score = DialogueScore(False, tp, fp, fn, book_rate, turns)
        recall = score.recall
        if book_rate is None and recall is None:
            return score
        score.success = (book_rate in (None, 1.0)) and (recall in (None, 1.0)) and books_right and all_match
        return score

    def _constraints_met(self, domain: str, entity: Mapping[str, Any] | None, info: Mapping[str, str]) -> float:
        if entity is None:
            return 0.0
        if domain == TAXI or not info:
            return 1.0
        return float(np.mean([self.db.matches(entity, {s: v}) for s, v in info.items()]))

    def _match(
        self, domain: str, info: Mapping[str, str], told: Mapping[str, str], entity: Mapping[str, Any] | None
    ) -> bool:
        if domain == TAXI:  # any taxi is one the user can take (ConvLab's taxi query never comes back empty)
            return True
        constraints = {**info, **told}
        if entity is not None:
            return self.db.matches(entity, constraints)
        return bool(self.db.query(domain, constraints))


def summarize(scores: Sequence[DialogueScore]) -> dict[str, float]:
    """Corpus figures under ConvLab's names; inform and book figures average the dialogues defining them."""

    def mean(values: Iterable[float | None]) -> float:
        kept = [v for v in values if v is not None]
        return float(np.mean(kept)) if kept else 0.0

    return {
        "tod/success_rate": mean(float(s.success) for s in scores),
        "tod/inform_precision": mean(s.precision for s in scores),
        "tod/inform_recall": mean(s.recall for s in scores),
        "tod/inform_f1": mean(s.f1 for s in scores),
        "tod/book_rate": mean(s.book_rate for s in scores),
        "tod/turns": mean(float(s.turns) for s in scores),
        "tod/return": mean(s.reward for s in scores),
        **{
            f"tod/{emotion}_rate": mean(s.emotions.get(emotion, 0) / s.turns if s.turns else None for s in scores)
            for emotion in ("satisfied", "dissatisfied")
            if any(s.emotions for s in scores)
        },
    }


# --- a corpus of recorded dialogues -------------------------------------------------------------------------


def evaluate_corpus(dataset: TODDataset, indices: Sequence[int] | None = None) -> list[DialogueScore]:
    """Score recorded dialogues: their system acts against their goals, bookings read from each system turn's
    `booked` lists (matched to the database by name or train id). MultiWOZ's acts of domain `booking` belong to
    the domain the user is talking about."""
    scores = []
    for i in range(len(dataset.dialogues)) if indices is None else indices:
        dialogue, goal = dataset.dialogues[i], dataset.goals[i]
        where = f"{dataset.source}: dialogue {dialogue.get('dialogue_id', i)}"
        evaluator = DialogueEvaluator(goal, dataset.db, dataset.ontology)
        domain, belief, system_turns = None, {}, 0
        seen_bookings: dict[str, int] = {}
        for t, turn in enumerate(dialogue["turns"]):
            acts = acts_from_unified(turn.get("dialogue_acts", {}), f"{where} turn {t}")
            if turn.get("speaker") == "user":
                domain = next((d for _, d, _, _ in reversed(acts) if d in goal.parts), domain)
                belief = turn.get("state", belief) or belief
                continue
            system_turns += 1
            evaluator.add_system_acts([(a, domain if d == "booking" and domain else d, s, v) for a, d, s, v in acts])
            for booked_domain, entries in (turn.get("booked") or {}).items():
                if len(entries) > seen_bookings.get(booked_domain, 0) and booked_domain in goal.parts:
                    seen_bookings[booked_domain] = len(entries)
                    booking = {s: v for s, v in belief.get(booked_domain, {}).items() if s.startswith("book ")}
                    entity = _find_entity(dataset.db, booked_domain, entries[-1])
                    evaluator.record_booking(booked_domain, entity, booking)
        scores.append(evaluator.score(system_turns))
    return scores


def _find_entity(db: Database, domain: str, booked: Mapping[str, str]) -> Mapping[str, Any] | None:
    if domain == TAXI:
        return dict(booked)
    name = str(booked.get("name", booked.get("trainID", ""))).strip().lower()
    for entity in db.tables.get(domain, []):
        if name in (str(entity.get("name", "")).strip().lower(), str(entity.get("trainID", "")).strip().lower()):
            return entity
    return None
