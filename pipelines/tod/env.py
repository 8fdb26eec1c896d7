"""The dialogue environment: a goal, the agenda-based user, the tracker, the database and the evaluator.

A system action is a set of atomic acts (intent, domain, slot) — request a constraint or booking slot, inform
a requestable slot, book, reqmore — chosen as a multi-hot vector (ConvLab's MultiDiscrete action space). The
environment fills in the values from the top database entity that matches the belief state, as ConvLab's
vectoriser does: an inform with no matching entity becomes `nooffer`, and a booking before every booking
slot is known becomes `nobook`. The state vector is ConvLab's binary one in spirit: last user and system
acts, which slots are filled, pending requests, database matches (bucketed), bookings, active domain.
Reward per ConvLab: -1 per turn, and at the end +80 on success or -40 on failure; optionally a term per turn
the simulated user is dissatisfied (its EmoWOZ-style emotion, `simulator.py`; weight 0 by default).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipelines.tod.data import NO_CONSTRAINT, Act, Database, DomainSchema, Goal, Ontology, acts_from_unified
from pipelines.tod.dst import DialogueState, RuleDST
from pipelines.tod.evaluator import DialogueEvaluator, DialogueScore
from pipelines.tod.simulator import EMOTIONS, AgendaUser

if TYPE_CHECKING:
    from pipelines.tod.config import TODEnvConfig
    from pipelines.tod.data import TODDataset

AtomicAct = tuple[str, str, str]  # (intent, domain, slot)
MATCH_BUCKETS = (0, 1, 2, 6)  # 0, 1, 2-5, 6+ entities


@dataclass(frozen=True)
class Rewards:
    success: float = 80.0
    failure: float = -40.0
    turn: float = -1.0
    dissatisfied: float = 0.0  # added on every turn the user is dissatisfied


class ActionSpace:
    """The system's atomic acts, in a fixed order: the policy's multi-hot output."""

    def __init__(self, schemas: Sequence[DomainSchema]) -> None:
        acts: list[AtomicAct] = []
        for s in schemas:
            acts += [("request", s.name, slot) for slot in (*s.informable, *s.book)]
            acts += [("inform", s.name, slot) for slot in s.requestable]
            acts += [("book", s.name, "")] if s.book else []
        acts.append(("reqmore", "general", ""))
        self.acts = acts
        self.index = {a: i for i, a in enumerate(acts)}

    def __len__(self) -> int:
        return len(self.acts)

    def mask(self, acts: Sequence[AtomicAct]) -> np.ndarray:
        out = np.zeros(len(self.acts), dtype=np.float32)
        for act in acts:
            if act in self.index:
                out[self.index[act]] = 1.0
        return out

    def decode(self, mask: np.ndarray) -> list[AtomicAct]:
        return [self.acts[i] for i in np.flatnonzero(mask > 0.5)]


class StateVectoriser:
    """DialogueState -> a fixed-length binary vector."""

    def __init__(self, schemas: Sequence[DomainSchema], actions: ActionSpace) -> None:
        self.domains = [s.name for s in schemas]
        self.actions = actions
        names: list[tuple[str, ...]] = []
        for s in schemas:
            names += [("user", "inform", s.name, slot) for slot in (*s.informable, *s.book)]
            names += [("user", "request", s.name, slot) for slot in s.requestable]
        names += [("system", *a) for a in actions.acts]
        names += [("system", intent, d, "") for d in self.domains for intent in ("nooffer", "nobook")]
        for s in schemas:
            names += [("filled", s.name, slot) for slot in (*s.informable, *s.book)]
            names += [("pending", s.name, slot) for slot in s.requestable]
            names += [("matches", s.name, str(b)) for b in MATCH_BUCKETS]
            names += [("booked", s.name)] if s.book else []
            names += [("active", s.name)]
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}

    def __len__(self) -> int:
        return len(self.names)

    def __call__(self, state: DialogueState) -> np.ndarray:
        on = [("user", i, d, s) for i, d, s, _ in state.user_acts]
        on += [("system", i, d, s if i not in ("nooffer", "nobook") else "") for i, d, s, _ in state.system_acts]
        on += [("system", "book", d, "") for i, d, _, _ in state.system_acts if i == "book"]
        for d in self.domains:
            on += [("filled", d, s) for s, v in state.belief[d].items() if v]
            on += [("pending", d, s) for s in state.requested[d]]
            count = state.matches.get(d, 0)
            on.append(("matches", d, str(max(b for b in MATCH_BUCKETS if b <= count))))
            on += [("booked", d)] if state.booked.get(d) else []
        on += [("active", state.domain)] if state.domain else []
        vector = np.zeros(len(self.names), dtype=np.float32)
        vector[[self.index[n] for n in on if n in self.index]] = 1.0
        return vector


class DialogueEnv:
    """One dialogue at a time: `reset(goal)` -> state; `step(atomic acts)` -> (state, reward, done)."""

    def __init__(
        self,
        ontology: Ontology,
        db: Database,
        domains: Sequence[str],
        rng: np.random.Generator,
        max_turns: int = 30,
        max_user_acts: int = 3,
        rewards: Rewards = Rewards(),  # noqa: B008 (frozen dataclass)
    ) -> None:
        self.ontology, self.db, self.rng = ontology, db, rng
        self.schemas = [ontology.schema(d) for d in domains]
        self.actions = ActionSpace(self.schemas)
        self.vectorise = StateVectoriser(self.schemas, self.actions)
        self.dst = RuleDST(ontology, domains)
        self.max_turns, self.max_user_acts, self.rewards = max_turns, max_user_acts, rewards
        self._queries: dict[tuple[str, tuple[tuple[str, str], ...]], list[int]] = {}

    def reset(self, goal: Goal) -> DialogueState:
        self.goal = goal
        self.user = AgendaUser(goal, self.rng, self.max_user_acts)
        self.evaluator = DialogueEvaluator(goal, self.db, self.ontology)
        self.state = self.dst.initial_state()
        self.bookings: dict[str, tuple[str, str]] = {}  # domain -> (entity name or train id, reference)
        self.emotions = Counter(dict.fromkeys(EMOTIONS, 0))  # the user's emotion after each system turn
        self._hear(self.user.start())
        return self.state

    def step(self, chosen: Sequence[AtomicAct]) -> tuple[DialogueState, float, bool]:
        acts = self.realise(chosen)
        self.dst.update_system(self.state, acts)
        self.evaluator.add_system_acts(acts)
        self._hear(self.user.respond(acts))
        self.emotions[self.user.emotion] += 1
        emotion = self.rewards.dissatisfied if self.user.emotion == "dissatisfied" else 0.0
        done = self.state.user_done or self.state.turn >= self.max_turns
        if not done:
            return self.state, self.rewards.turn + emotion, False
        return self.state, (self.rewards.success if self.score().success else self.rewards.failure) + emotion, True

    def score(self) -> DialogueScore:
        score = self.evaluator.score(self.state.turn)
        score.emotions = dict(self.emotions)
        return score

    def realise(self, chosen: Sequence[AtomicAct]) -> list[Act]:
        """Atomic acts -> dialogue acts with values from the database and the belief state."""
        state, acts = self.state, []
        for intent, domain, slot in chosen:
            if intent in ("request", "reqmore"):
                acts.append((intent, domain, slot, ""))
                continue
            found = self.query(domain)
            if not found:
                acts.append(("nooffer", domain, "", ""))
                continue
            entity = self.db.entity(domain, found[0], state.constraints(domain))
            if intent == "inform":
                acts.append(("inform", domain, slot, self.db.value(entity, slot)))
            elif state.booked[domain]:
                continue  # booked already: ConvLab counts the first booking
            else:
                booking = {s: state.belief[domain][s] for s in self.ontology.schema(domain).book}
                if any(v in NO_CONSTRAINT for v in booking.values()):
                    acts.append(("nobook", domain, "", ""))
                    continue
                state.booked[domain] = True
                self.evaluator.record_booking(domain, entity, booking)
                reference = f"{found[0]:08d}"
                self.bookings[domain] = (str(entity.get("name", entity.get("trainID", ""))), reference)
                acts.append(("book", domain, "ref", reference))
        return list(dict.fromkeys(acts))  # a nooffer once, however many informs met no entity

    def replay(self, dialogue: dict, where: str) -> list[tuple[np.ndarray, list[AtomicAct], str | None]]:
        """A recorded dialogue's system turns as (state vector before the turn, the wizard's atomic acts, active
        domain): the imitation data. A `nobook` was a booking tried; a `nooffer` names no slot and is left out."""
        self.state = self.dst.initial_state()
        turns = []
        for t, turn in enumerate(dialogue["turns"]):
            acts = acts_from_unified(turn.get("dialogue_acts", {}), f"{where} turn {t}")
            if turn.get("speaker") == "user":
                self._hear(acts)
                continue
            domain = self.state.domain
            acts = [(i, domain if d == "booking" and domain else d, s, v) for i, d, s, v in acts]
            atomic = [("book", d, "") if i in ("book", "nobook") else (i, d, s) for i, d, s, _ in acts]
            turns.append((self.vectorise(self.state), [a for a in atomic if a in self.actions.index], domain))
            for intent, d, _, _ in acts:
                if intent == "book" and d in self.state.booked:
                    self.state.booked[d] = True
            self.dst.update_system(self.state, acts)
        return turns

    def query(self, domain: str) -> list[int]:
        constraints = self.state.constraints(domain)
        key = (domain, tuple(sorted((s, v) for s, v in constraints.items() if not s.startswith("book "))))
        if key not in self._queries:  # the same constraints come back in every dialogue of a goal family
            self._queries[key] = self.db.query(domain, dict(key[1]))
        return self._queries[key]

    def _hear(self, user_acts: list[Act]) -> None:
        self.dst.update_user(self.state, user_acts)
        self.state.matches = {s.name: len(self.query(s.name)) for s in self.schemas}


def env_factory(dataset: TODDataset, env: TODEnvConfig, seed: int) -> Callable[..., DialogueEnv]:
    """`make_env(stream, index=0)`: a fresh environment on the dataset whose randomness is the seeded stream
    (seed, stream, index), so every use (corpus, rollouts, evaluation) draws its own reproducible numbers."""
    rewards = Rewards(env.reward_success, env.reward_failure, env.reward_turn, env.reward_dissatisfied)

    def make_env(stream: int, index: int = 0) -> DialogueEnv:
        rng = np.random.default_rng([seed, stream, index])
        return DialogueEnv(dataset.ontology, dataset.db, env.domains, rng, env.max_turns, env.max_user_acts, rewards)

    return make_env
