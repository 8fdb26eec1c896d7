"""User goals and the agenda-based user simulator (ABUS; Schatzmann et al. 2007, as in ConvLab's rule user).

A goal is drawn from the database, so it can be met: per domain an entity, some of its informable values as
constraints, slots to ask for, and a booking. The user keeps an agenda, a stack of dialogue acts that starts as
[bye, requests, booking informs, constraint informs] (top last) per domain, first domain on top. Each system
turn pushes acts on it (answer a request, correct a wrong value, repeat what was not handled) and the user
then pops 1..max_acts acts of one domain as its reply; popping `bye` ends the dialogue.

The user also has an emotion each turn, in the spirit of EmoWOZ (Feng et al. 2022), whose most frequent
user emotions towards the system are neutral, satisfied and dissatisfied: dissatisfied when the system repeats its
previous turn, asks for something the user already said, talks about a domain the user does not want, or fails
(`nooffer`, `nobook`); satisfied when it answers a pending request or books; else neutral. The rule draws no
random numbers, so it changes nothing else in a dialogue.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.tod.data import DONT_CARE, NO_CONSTRAINT, TAXI, Act, Database, DomainGoal, Goal, Ontology
from workbench.errors import WorkbenchError

TIME_SLOTS = ("leave at", "arrive by")
BYE: Act = ("bye", "general", "", "")
EMOTIONS = ("neutral", "satisfied", "dissatisfied")


class GoalGenerator:
    """Goals over 1..max_domains distinct domains; constraints are values of one database entity."""

    def __init__(
        self,
        ontology: Ontology,
        db: Database,
        domains: Sequence[str],
        min_domains: int = 1,
        max_domains: int = 3,
        book_probability: float = 0.5,
    ) -> None:
        self.ontology, self.db, self.domains = ontology, db, list(domains)
        self.min_domains, self.max_domains = min_domains, min(max_domains, len(self.domains))
        self.book_probability = book_probability
        for domain in self.domains:
            if not db.has_entities(domain):
                raise WorkbenchError(f"{ontology.source}: domain {domain}: no database entities to draw goals from")

    def sample(self, rng: np.random.Generator) -> Goal:
        n = int(rng.integers(self.min_domains, self.max_domains + 1))
        chosen = rng.choice(len(self.domains), size=n, replace=False)
        return Goal({self.domains[i]: self._domain_goal(self.domains[i], rng) for i in chosen})

    def _values(self, domain: str, slot: str) -> tuple[str, ...]:
        values = self.ontology.schema(domain).values.get(slot, ())
        if not values:
            raise WorkbenchError(
                f"{self.ontology.source}: domains.{domain}.slots.{slot}.possible_values: empty, goals need values"
            )
        return values

    def _domain_goal(self, domain: str, rng: np.random.Generator) -> DomainGoal:
        schema = self.ontology.schema(domain)
        if domain == TAXI:  # no entity: places and a time from the ontology's values
            info = {s: str(rng.choice(self._values(domain, s))) for s in ("departure", "destination")}
            time = TIME_SLOTS[int(rng.integers(2))]
            info[time] = str(rng.choice(self._values(domain, time)))
            entity_values = set(schema.requestable)
        else:
            table = self.db.tables[domain]
            entity = table[int(rng.integers(len(table)))]
            candidates = [s for s in schema.informable if s != "name" and self.db.value(entity, s) not in ("", "?")]
            if "departure" in candidates and "destination" in candidates:  # a journey: where, when, which day
                time = [s for s in TIME_SLOTS if s in candidates]
                chosen = [s for s in candidates if s not in TIME_SLOTS]
                chosen += [time[int(rng.integers(len(time)))]] if time else []
            else:
                k = int(rng.integers(1, min(3, len(candidates)) + 1))
                picked = set(rng.choice(len(candidates), size=k, replace=False).tolist())
                chosen = [s for i, s in enumerate(candidates) if i in picked]
            info = {s: self.db.value(entity, s) for s in chosen}
            entity_values = {s for s in schema.requestable if self.db.value(entity, s) not in ("", "?")}
        book = {}
        if schema.book and rng.random() < self.book_probability:
            book = {s: str(rng.choice(self._values(domain, s))) for s in schema.book}
        requestable = [s for s in schema.requestable if s in entity_values]
        low = 0 if book else 1
        k = int(rng.integers(low, min(3, len(requestable)) + 1)) if requestable else 0
        picked = set(rng.choice(len(requestable), size=k, replace=False).tolist()) if k else set()
        return DomainGoal(info, book, tuple(s for i, s in enumerate(requestable) if i in picked))


class AgendaUser:
    """The agenda-based user of one goal: `start()` gives its first acts, `respond(system_acts)` the next."""

    def __init__(self, goal: Goal, rng: np.random.Generator, max_acts: int = 3) -> None:
        self.goal, self.rng, self.max_acts = goal, rng, max_acts
        self.told: dict[str, dict[str, str]] = {d: {} for d in goal.parts}  # requested slots the system answered
        self.booked: set[str] = set()
        self.last: list[Act] = []
        self.said: set[tuple[str, str]] = set()  # (domain, slot) the user has informed
        self.previous_system: list[Act] = []
        self.emotion = "neutral"
        self.agenda: list[Act] = [BYE]  # a stack: the top is the end of the list
        for domain in reversed(goal.domains):
            part = goal.parts[domain]
            for slot in reversed(part.reqt):
                self.agenda.append(("request", domain, slot, ""))
            self._push_informs(domain, part.book)
            order = list(part.info.items())
            self.rng.shuffle(order)
            for slot, value in order:
                self.agenda.append(("inform", domain, slot, value))

    def start(self) -> list[Act]:
        return self._pop()

    def respond(self, system_acts: Sequence[Act]) -> list[Act]:
        self.emotion = self._emotion(system_acts)
        self.previous_system = list(system_acts)
        for intent, domain, slot, value in system_acts:  # what the system told or did
            part = self.goal.parts.get(domain)
            if part is None:  # about a domain this user does not want
                continue
            if intent in ("inform", "recommend") and slot in part.reqt:
                self.told[domain][slot] = value
                self._remove(("request", domain, slot))
            elif intent == "book" and part.book:
                self.booked.add(domain)
                for s in part.book:
                    self._remove(("inform", domain, s))
        # What the user said last turn and the system let pass, it says again: an unanswered request, or
        # booking details the system neither booked with nor asked about.
        touched = {d for _, d, _, _ in system_acts}
        for intent, domain, slot, value in reversed(self.last):
            unanswered = intent == "request" and slot not in self.told[domain]
            unbooked = intent == "inform" and slot in self.goal.parts[domain].book and domain not in touched
            if unanswered or (unbooked and domain not in self.booked):
                self._push((intent, domain, slot, value))
        for intent, domain, slot, value in system_acts:  # what the system asked for, or got wrong: on top
            part = self.goal.parts.get(domain)
            if part is None:
                continue
            if intent == "request":
                self._push(("inform", domain, slot, part.info.get(slot) or part.book.get(slot) or DONT_CARE))
            elif intent in ("inform", "recommend"):
                wanted = part.info.get(slot)
                if wanted and value not in NO_CONSTRAINT and value != wanted:
                    self._push(("inform", domain, slot, wanted))
            elif intent == "nooffer":
                self._push_informs(domain, part.info)
        return self._pop()

    def _emotion(self, system_acts: Sequence[Act]) -> str:
        """EmoWOZ-style emotion towards this system turn (checked before the user's state takes it in)."""
        for intent, domain, slot, _ in system_acts:
            irrelevant = domain != "general" and domain not in self.goal.parts
            asked_again = intent == "request" and (domain, slot) in self.said
            if irrelevant or asked_again or intent in ("nooffer", "nobook"):
                return "dissatisfied"
        if system_acts and list(system_acts) == self.previous_system:
            return "dissatisfied"
        for intent, domain, slot, _ in system_acts:
            part = self.goal.parts.get(domain)
            answered = intent in ("inform", "recommend") and part and slot in part.reqt
            answered = answered and slot not in self.told[domain]
            if answered or (intent == "book" and part and part.book and domain not in self.booked):
                return "satisfied"
        return "neutral"

    def _push_informs(self, domain: str, slots: dict[str, str]) -> None:
        for slot, value in reversed(slots.items()):
            self._push(("inform", domain, slot, value))

    def _push(self, act: Act) -> None:
        self._remove(act[:3])
        self.agenda.append(act)

    def _remove(self, key: tuple[str, str, str]) -> None:
        self.agenda = [a for a in self.agenda if a[:3] != key]

    def _pop(self) -> list[Act]:
        """1..max_acts acts from the top, all of one domain; `bye` only alone."""
        budget = int(self.rng.integers(1, self.max_acts + 1))
        acts: list[Act] = []
        while self.agenda and len(acts) < budget:
            top = self.agenda[-1]
            if acts and (top == BYE or top[1] != acts[0][1]):
                break
            acts.append(self.agenda.pop())
            if top == BYE:
                break
        self.last = acts or [BYE]
        self.said.update((d, s) for i, d, s, _ in self.last if i == "inform")
        return self.last
