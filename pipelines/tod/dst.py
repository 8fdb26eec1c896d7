"""Rule-based dialogue state tracking at the dialogue-act level (ConvLab's RuleDST, without NLU errors).

The belief state holds the value the user last informed for each state slot of each domain ("dontcare"
included); requested slots are pending until the system informs them; the active domain is that of the
user's latest domain act.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pipelines.tod.data import Act, Ontology


@dataclass
class DialogueState:
    belief: dict[str, dict[str, str]]  # domain -> state slot -> value ("" = not given)
    requested: dict[str, set[str]]  # domain -> slots the user asked for and has not been told
    domain: str | None = None  # the domain the user is talking about
    user_acts: list[Act] = field(default_factory=list)  # last user turn
    system_acts: list[Act] = field(default_factory=list)  # last system turn
    matches: dict[str, int] = field(default_factory=dict)  # database entities matching the belief, per domain
    booked: dict[str, bool] = field(default_factory=dict)
    turn: int = 0  # system turns so far
    user_done: bool = False  # the user said bye

    def constraints(self, domain: str) -> dict[str, str]:
        return {s: v for s, v in self.belief[domain].items() if v}


class RuleDST:
    def __init__(self, ontology: Ontology, domains: Iterable[str]) -> None:
        self.schemas = {d: ontology.schema(d) for d in domains}

    def initial_state(self) -> DialogueState:
        return DialogueState(
            belief={d: dict.fromkeys((*s.informable, *s.book), "") for d, s in self.schemas.items()},
            requested={d: set() for d in self.schemas},
            booked=dict.fromkeys(self.schemas, False),
        )

    def update_user(self, state: DialogueState, acts: list[Act]) -> None:
        state.user_acts = list(acts)
        for intent, domain, slot, value in acts:
            if intent == "bye":
                state.user_done = True
            if domain not in self.schemas:
                continue
            state.domain = domain
            if intent == "inform" and slot in state.belief[domain]:
                state.belief[domain][slot] = value
            elif intent == "request":
                state.requested[domain].add(slot)

    def update_system(self, state: DialogueState, acts: list[Act]) -> None:
        state.system_acts = list(acts)
        state.turn += 1
        for intent, domain, slot, _ in acts:
            if intent in ("inform", "recommend") and domain in self.schemas:
                state.requested[domain].discard(slot)
