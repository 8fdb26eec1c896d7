"""A small synthetic MultiWOZ-like dataset in ConvLab-3's unified layout, generated at run time.

`write_synthetic_dataset(out)` writes `out/data/ontology.json`, `out/data/dialogues.json` and
`out/data/<domain>_db.json` for restaurant, hotel, attraction, train and taxi, with MultiWOZ's slot names
(unified) and database attribute names (`pricerange`, `leaveAt`, ...). The dialogues are the rule expert
playing the wizard against the agenda-based user, with `wizard_noise` of its turns carrying one mistake, as
human wizards' turns do; utterances are the dialogue acts written out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.tod.data import TAXI, Act, Database, Ontology, acts_to_unified, load_dataset, parse_ontology
from pipelines.tod.dst import DialogueState
from pipelines.tod.env import DialogueEnv
from pipelines.tod.policy import RuleExpert
from pipelines.tod.simulator import GoalGenerator

DOMAINS = ("restaurant", "hotel", "attraction", "train", "taxi")
AREAS = ["centre", "north", "south", "east", "west"]
PRICES = ["cheap", "moderate", "expensive"]
FOODS = ["british", "chinese", "indian", "italian", "european", "french", "thai", "mediterranean"]
ATTRACTIONS = ["museum", "college", "park", "theatre", "nightclub", "architecture", "cinema"]
STATIONS = ["london kings cross", "ely", "norwich", "peterborough", "stansted airport", "leicester", "broxbourne"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
TIMES = [f"{h:02d}:{m:02d}" for h in range(7, 22) for m in (0, 30)]
WORDS = ["golden", "river", "old", "royal", "little", "green", "grand", "blue", "city", "garden", "king", "star"]
NOUNS = ["house", "kitchen", "lodge", "inn", "hall", "court", "place", "bridge", "tower", "garden", "arms", "mill"]
SIZES = {"restaurant": 60, "hotel": 30, "attraction": 40, "train": 200}

# domain -> slot -> (description, categorical, database attribute values come from)
SLOTS: dict[str, dict[str, tuple[str, bool]]] = {
    "restaurant": {
        "area": ("area of the restaurant", True),
        "price range": ("price budget", True),
        "food": ("cuisine", False),
        "name": ("name of the restaurant", False),
        "book people": ("people in the booking", False),
        "book day": ("day of the booking", True),
        "book time": ("time of the booking", False),
        "address": ("address", False),
        "phone": ("phone number", False),
        "postcode": ("postal code", False),
        "ref": ("booking reference", False),
    },
    "hotel": {
        "area": ("area of the hotel", True),
        "price range": ("price budget", True),
        "stars": ("star rating", True),
        "type": ("hotel or guesthouse", True),
        "parking": ("free parking", True),
        "internet": ("free internet", True),
        "name": ("name of the hotel", False),
        "book people": ("people in the booking", False),
        "book day": ("first night", True),
        "book stay": ("nights", False),
        "address": ("address", False),
        "phone": ("phone number", False),
        "postcode": ("postal code", False),
        "ref": ("booking reference", False),
    },
    "attraction": {
        "area": ("area of the attraction", True),
        "type": ("kind of attraction", False),
        "name": ("name of the attraction", False),
        "address": ("address", False),
        "phone": ("phone number", False),
        "postcode": ("postal code", False),
        "entrance fee": ("entrance fee", False),
    },
    "train": {
        "departure": ("departure station", False),
        "destination": ("destination station", False),
        "day": ("day of the journey", True),
        "leave at": ("leave at or after", False),
        "arrive by": ("arrive by", False),
        "book people": ("tickets", False),
        "train id": ("train id", False),
        "duration": ("journey time", False),
        "price": ("ticket price", False),
        "ref": ("booking reference", False),
    },
    "taxi": {
        "departure": ("pick-up place", False),
        "destination": ("drop-off place", False),
        "leave at": ("leave at or after", False),
        "arrive by": ("arrive by", False),
        "car type": ("colour and make of the car", False),
        "phone": ("driver's phone", False),
    },
}
STATE = {
    "restaurant": ["area", "price range", "food", "book people", "book day", "book time"],
    "hotel": ["area", "price range", "stars", "type", "parking", "internet", "book people", "book day", "book stay"],
    "attraction": ["area", "type"],
    "train": ["departure", "destination", "day", "leave at", "arrive by", "book people"],
    "taxi": ["departure", "destination", "leave at", "arrive by"],
}
INTENTS = ("inform", "request", "book", "nobook", "nooffer", "reqmore", "bye")


def make_databases(rng: np.random.Generator) -> dict[str, Any]:
    """MultiWOZ-shaped databases: entity lists with its attribute names; taxi as colours and makes."""
    names = iter(rng.permutation([f"the {w} {n}" for w in WORDS for n in NOUNS]).tolist())

    def place(prefix: str) -> dict[str, str]:
        return {
            "address": f"{rng.integers(1, 99)} {rng.choice(WORDS)} road",
            "phone": f"01223{rng.integers(100000, 999999)}",
            "postcode": f"cb{rng.integers(1, 9)}{rng.integers(1, 9)}{''.join(rng.choice(list('abdefghjn'), 2))}",
            "id": prefix,
        }

    def pick(values: list[str]) -> str:
        return str(rng.choice(values))

    dbs: dict[str, Any] = {
        "restaurant": [
            {"name": next(names), "area": pick(AREAS), "pricerange": pick(PRICES), "food": pick(FOODS), **place(str(i))}
            for i in range(SIZES["restaurant"])
        ],
        "hotel": [
            {
                "name": next(names),
                "area": pick(AREAS),
                "pricerange": pick(PRICES),
                "stars": pick(["2", "3", "4", "5"]),
                "type": pick(["hotel", "guesthouse"]),
                "parking": pick(["yes", "no"]),
                "internet": pick(["yes", "no"]),
                **place(str(i)),
            }
            for i in range(SIZES["hotel"])
        ],
        "attraction": [
            {
                "name": next(names),
                "area": pick(AREAS),
                "type": pick(ATTRACTIONS),
                "entrance fee": pick(["free", "2 pounds", "5 pounds", "7 pounds"]),
                **place(str(i)),
            }
            for i in range(SIZES["attraction"])
        ],
        "train": [],
        "taxi": {"taxi_colors": ["black", "white", "red", "yellow", "blue", "grey"], "taxi_types": ["toyota", "skoda"]},
    }
    for i in range(SIZES["train"]):
        other, outward = pick(STATIONS), rng.random() < 0.5
        leave = int(rng.integers(5 * 60, 22 * 60) // 15 * 15)
        minutes = int(rng.integers(2, 12)) * 10 + 7
        dbs["train"].append(
            {
                "trainID": f"TR{1000 + i}",
                "departure": "cambridge" if outward else other,
                "destination": other if outward else "cambridge",
                "day": pick(DAYS),
                "leaveAt": f"{leave // 60:02d}:{leave % 60:02d}",
                "arriveBy": f"{(leave + minutes) // 60:02d}:{(leave + minutes) % 60:02d}",
                "duration": f"{minutes} minutes",
                "price": f"{minutes * 0.2:.2f} pounds",
            }
        )
    return dbs


def make_ontology(dbs: dict[str, Any]) -> dict[str, Any]:
    """ConvLab-3's ontology.json: domains with slot descriptions and values, intents, the state."""
    values: dict[tuple[str, str], list[str]] = {}
    for domain in ("restaurant", "hotel", "attraction", "train"):
        for slot in SLOTS[domain]:
            found = sorted({Database.value(e, slot) for e in dbs[domain]} - {""})
            values[domain, slot] = found
    places = [e["name"] for d in ("restaurant", "hotel", "attraction") for e in dbs[d][:10]]
    values["taxi", "departure"] = values["taxi", "destination"] = places
    values["taxi", "leave at"] = values["taxi", "arrive by"] = TIMES
    for domain in ("restaurant", "hotel", "train"):
        values[domain, "book people"] = [str(n) for n in range(1, 9)]
        values[domain, "book day"] = DAYS
    values["restaurant", "book time"] = TIMES
    values["hotel", "book stay"] = [str(n) for n in range(1, 6)]
    return {
        "domains": {
            domain: {
                "description": f"{domain} domain",
                "slots": {
                    s: {"description": text, "is_categorical": cat, "possible_values": values.get((domain, s), [])}
                    for s, (text, cat) in slots.items()
                },
            }
            for domain, slots in SLOTS.items()
        },
        "intents": {intent: {"description": intent} for intent in INTENTS},
        "state": {domain: dict.fromkeys(slots, "") for domain, slots in STATE.items()},
        "dialogue_acts": {"categorical": [], "non-categorical": [], "binary": []},
    }


def write_synthetic_dataset(out: str | Path, dialogues: int, wizard_noise: float, seed: int) -> Path:
    """Generate databases, ontology and `dialogues` dialogues; returns the dataset directory (`out/data`)."""
    rng = np.random.default_rng([seed, 8])
    dbs = make_databases(rng)
    raw_ontology = make_ontology(dbs)
    ontology = parse_ontology(raw_ontology, "synthetic ontology")
    db = Database({d: t for d, t in dbs.items() if d != TAXI}, dbs[TAXI])
    env = DialogueEnv(ontology, db, DOMAINS, rng)
    goals = GoalGenerator(ontology, db, DOMAINS)
    wizard = RuleExpert(env)
    records: list[dict[str, Any]] = []
    act_types: dict[str, dict[tuple[str, str, str], set[str]]] = {}
    splits = ["train"] * round(0.8 * dialogues) + ["validation"] * round(0.1 * dialogues)
    for i in range(dialogues):
        split = splits[i] if i < len(splits) else "test"
        goal = goals.sample(rng)
        state = env.reset(goal)
        turns = [_turn(0, "user", state.user_acts, ontology, state=_belief(state))]
        done = False
        while not done:
            chosen = wizard(state)
            if rng.random() < wizard_noise:  # one mistake: an act left out, or one added
                if chosen and rng.random() < 0.5:
                    drop = int(rng.integers(len(chosen)))
                    chosen = [a for j, a in enumerate(chosen) if j != drop]
                else:
                    chosen = [*chosen, env.actions.acts[int(rng.integers(len(env.actions)))]]
            state, _, done = env.step(chosen)
            booked = {d: [{"name": name, "reference": ref}] for d, (name, ref) in env.bookings.items()}
            turns.append(_turn(len(turns), "system", state.system_acts, ontology, db_results={}, booked=booked))
            turns.append(_turn(len(turns), "user", state.user_acts, ontology, state=_belief(state)))
        for turn in turns:
            for kind, acts in turn["dialogue_acts"].items():
                for act in acts:
                    key = (act["intent"], act["domain"], act["slot"])
                    act_types.setdefault(kind, {}).setdefault(key, set()).add(turn["speaker"])
        records.append(
            {
                "dataset": "synthetic_woz",
                "data_split": split,
                "dialogue_id": f"synthetic_woz-{split}-{i}",
                "domains": goal.domains,
                "goal": goal.to_unified(),
                "turns": turns,
            }
        )
    raw_ontology["dialogue_acts"] = {  # as ConvLab lists them: str() of a dict per act type
        kind: sorted(
            str({"user": "user" in who, "system": "system" in who, "intent": i, "domain": d, "slot": s})
            for (i, d, s), who in found.items()
        )
        for kind, found in act_types.items()
    }
    directory = Path(out) / "data"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ontology.json").write_text(json.dumps(raw_ontology, indent=1))
    (directory / "dialogues.json").write_text(json.dumps(records, indent=1))
    for domain, table in dbs.items():
        (directory / f"{domain}_db.json").write_text(json.dumps(table, indent=1))
    load_dataset(directory)  # what we write must read back
    return directory


def _belief(state: DialogueState) -> dict[str, dict[str, str]]:
    return {d: dict(slots) for d, slots in state.belief.items()}


def _turn(index: int, speaker: str, acts: list[Act], ontology: Ontology, **extra: Any) -> dict[str, Any]:
    utterance = " ; ".join(" ".join(p for p in act if p) for act in acts)
    return {
        "speaker": speaker,
        "utterance": utterance,
        "utt_idx": index,
        "dialogue_acts": acts_to_unified(acts, ontology),
        **extra,
    }
