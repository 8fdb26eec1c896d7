"""ConvLab-3's unified data format: ontology, databases, goals and dialogues, read and checked once.

A dataset is what `data/unified_datasets/<name>/data.zip` holds in ConvLab-3 (Zhu et al. 2022), zipped or
extracted: `data/ontology.json` (domains -> slots, intents, the dialogue state), `data/dialogues.json` (a list
of dialogues, each with its user goal and turns whose `dialogue_acts` are split into `categorical`,
`non-categorical` and `binary` acts of `{intent, domain, slot, value}`), and `data/<domain>_db.json` (MultiWOZ's
databases, a list of entities per domain). Every problem is one `WorkbenchError` naming the file and field.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

Act = tuple[str, str, str, str]  # (intent, domain, slot, value); value "" for binary acts
ACT_KINDS = ("categorical", "non-categorical", "binary")
DONT_CARE = "dontcare"
NO_CONSTRAINT = ("", DONT_CARE, "dont care", "don't care", "do n't care", "do not care", "not mentioned")
# MultiWOZ's database files name a few attributes differently from the unified slots (ConvLab's slot2dbattr).
DB_ATTRIBUTE = {
    "price range": "pricerange",
    "arrive by": "arriveBy",
    "leave at": "leaveAt",
    "train id": "trainID",
    "open hours": "openhours",
}
# Slots the system fills by itself, never asked for by a user goal.
NOT_REQUESTABLE = ("choice", "ref", "booked", "name")
TAXI = "taxi"  # MultiWOZ's taxi has no entity table: any taxi fits, the database only lists colours and makes
TAXI_DEFAULTS = {"taxi_colors": ["black", "white", "red", "yellow", "blue", "grey"], "taxi_types": ["toyota", "skoda"]}


# --- ontology -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainSchema:
    """What a domain's dialogue is about: slots that constrain the search, booking slots, slots a user asks for."""

    name: str
    informable: tuple[str, ...]  # state slots that are not booking slots ("area", "price range", ...)
    book: tuple[str, ...]  # "book people", "book day", ...
    requestable: tuple[str, ...]  # "address", "phone", ... (in the ontology, outside the state)
    categorical: frozenset[str] = frozenset()
    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # possible values from the ontology


@dataclass(frozen=True)
class Ontology:
    domains: dict[str, DomainSchema]
    source: str

    def schema(self, domain: str) -> DomainSchema:
        return self.domains[domain]

    def is_categorical(self, domain: str, slot: str) -> bool:
        return domain in self.domains and slot in self.domains[domain].categorical


def parse_ontology(raw: Any, source: str) -> Ontology:
    """Domains from `domains.<d>.slots`; the split of slots from `state.<d>` (booking slots start with "book ")."""
    if not isinstance(raw, dict):
        raise WorkbenchError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    for key in ("domains", "state"):
        if not isinstance(raw.get(key), dict):
            raise WorkbenchError(f"{source}: {key}: missing or not a mapping")
    domains = {}
    for name, spec in raw["domains"].items():
        slots = spec.get("slots") if isinstance(spec, dict) else None
        if not isinstance(slots, dict):
            raise WorkbenchError(f"{source}: domains.{name}.slots: missing or not a mapping")
        state = raw["state"].get(name, {})
        if not isinstance(state, dict):
            raise WorkbenchError(f"{source}: state.{name}: expected a mapping of slots")
        unknown = sorted(set(state) - set(slots))
        if unknown:
            raise WorkbenchError(f"{source}: state.{name}.{unknown[0]}: slot not in domains.{name}.slots")
        domains[name] = DomainSchema(
            name=name,
            informable=tuple(s for s in state if not s.startswith("book ")),
            book=tuple(s for s in state if s.startswith("book ")),
            requestable=tuple(s for s in slots if s not in state and s not in NOT_REQUESTABLE),
            categorical=frozenset(s for s, v in slots.items() if isinstance(v, dict) and v.get("is_categorical")),
            values={s: tuple(v.get("possible_values", [])) for s, v in slots.items() if isinstance(v, dict)},
        )
    return Ontology(domains, source)


# --- goals ----------------------------------------------------------------------------------------------


@dataclass
class DomainGoal:
    info: dict[str, str]  # informable constraints
    book: dict[str, str]  # booking constraints ("book people": "6"); empty: nothing to book
    reqt: tuple[str, ...]  # slots the user asks for
    alternatives: dict[str, tuple[str, ...]] = field(default_factory=dict)  # MultiWOZ's "3|2": 2 if 3 fails


@dataclass
class Goal:
    """A user goal per domain, in the order the user pursues the domains."""

    parts: dict[str, DomainGoal]

    @property
    def domains(self) -> list[str]:
        return list(self.parts)

    def to_unified(self) -> dict[str, Any]:
        """As ConvLab-3 writes `goal`: `inform` holds constraints and bookings, `request` the asked-for slots."""
        return {
            "description": "; ".join(
                f"{d}: {', '.join(f'{s}={v}' for s, v in {**g.info, **g.book}.items())}"
                + (f"; ask for {', '.join(g.reqt)}" if g.reqt else "")
                for d, g in self.parts.items()
            ),
            "inform": {d: {**g.info, **g.book} for d, g in self.parts.items()},
            "request": {d: dict.fromkeys(g.reqt, "") for d, g in self.parts.items()},
        }


def goal_from_unified(raw: Any, ontology: Ontology, where: str) -> Goal:
    """A unified-format goal checked against the ontology. Of MultiWOZ's `a|b` values (b: the fallback after a
    failed booking) the first is the goal and the others are kept as accepted alternatives."""
    if not isinstance(raw, dict):
        raise WorkbenchError(f"{where}.goal: expected a mapping")
    parts: dict[str, DomainGoal] = {}
    for key in ("inform", "request"):
        section = raw.get(key, {})
        if not isinstance(section, dict):
            raise WorkbenchError(f"{where}.goal.{key}: expected a mapping of domains")
        for domain, slots in section.items():
            if domain not in ontology.domains:
                raise WorkbenchError(f"{where}.goal.{key}.{domain}: domain not in {ontology.source} domains")
            if not isinstance(slots, dict):
                raise WorkbenchError(f"{where}.goal.{key}.{domain}: expected a mapping of slots")
            schema = ontology.domains[domain]
            known = set(schema.informable) | set(schema.book) | set(schema.requestable) | set(schema.values)
            for slot in slots:
                if slot not in known:
                    raise WorkbenchError(
                        f"{where}.goal.{key}.{domain}.{slot}: unknown slot ({ontology.source} domains.{domain}.slots)"
                    )
            part = parts.setdefault(domain, DomainGoal({}, {}, ()))
            if key == "request":
                part.reqt = tuple(slots)
                continue
            for slot, value in slots.items():
                first, *others = (v.strip().lower() for v in str(value).split("|"))
                (part.book if slot.startswith("book ") else part.info)[slot] = first
                if others:
                    part.alternatives[slot] = tuple(others)
    return Goal({d: g for d, g in parts.items() if g.info or g.book or g.reqt})


# --- dialogue acts --------------------------------------------------------------------------------------


def acts_from_unified(raw: Any, where: str) -> list[Act]:
    """`{"categorical": [...], "non-categorical": [...], "binary": [...]}` -> [(intent, domain, slot, value)]."""
    if not isinstance(raw, dict):
        raise WorkbenchError(f"{where}.dialogue_acts: expected a mapping of {', '.join(ACT_KINDS)}")
    acts = []
    for kind in ACT_KINDS:
        for i, act in enumerate(raw.get(kind, [])):
            if not isinstance(act, dict) or not {"intent", "domain"} <= act.keys():
                raise WorkbenchError(f"{where}.dialogue_acts.{kind}[{i}]: expected intent, domain, slot, value")
            value = str(act.get("value", "")).strip().lower()
            acts.append((act["intent"], act["domain"], act.get("slot", ""), value))
    return acts


def acts_to_unified(acts: Iterable[Act], ontology: Ontology) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {kind: [] for kind in ACT_KINDS}
    for intent, domain, slot, value in acts:
        act = {"intent": intent, "domain": domain, "slot": slot, "value": value}
        if not value:
            out["binary"].append(act)
        else:
            out["categorical" if ontology.is_categorical(domain, slot) else "non-categorical"].append(act)
    return out


# --- databases ------------------------------------------------------------------------------------------


def time_minutes(value: str) -> int | None:
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", value.strip())
    return int(match[1]) * 60 + int(match[2]) if match else None


class Database:
    """MultiWOZ's databases: `query(domain, constraints)` -> indices of matching entities, in file order.

    As in ConvLab's query: empty and dontcare values constrain nothing, "leave at" means at or after, "arrive by"
    at or before, and an entity's "?" matches anything. Taxi has no entities; its offer is made up from the
    colours and makes it lists, deterministically, once departure, destination and a time are known.
    """

    def __init__(self, tables: Mapping[str, list[dict[str, Any]]], taxi: Mapping[str, list[str]] | None = None):
        self.tables = dict(tables)
        self.taxi = dict(taxi or TAXI_DEFAULTS)

    def has_entities(self, domain: str) -> bool:
        return domain == TAXI or bool(self.tables.get(domain))

    @staticmethod
    def value(entity: Mapping[str, Any], slot: str) -> str:
        return str(entity.get(DB_ATTRIBUTE.get(slot, slot), entity.get(slot, ""))).strip().lower()

    def query(self, domain: str, constraints: Mapping[str, str]) -> list[int]:
        if domain == TAXI:
            return [0] if self._taxi_ready(constraints) else []
        return [i for i, e in enumerate(self.tables.get(domain, [])) if self.matches(e, constraints)]

    def entity(self, domain: str, index: int, constraints: Mapping[str, str]) -> dict[str, str]:
        if domain != TAXI:
            return self.tables[domain][index]
        key = f"{constraints.get('departure', '')}>{constraints.get('destination', '')}"
        h = zlib.crc32(key.encode())  # stable across runs, unlike hash()
        colours, makes = self.taxi["taxi_colors"], self.taxi["taxi_types"]
        car = f"{colours[h % len(colours)]} {makes[(h // 7) % len(makes)]}"
        return {"car type": car, "phone": f"07{h % 10**9:09d}"}

    @staticmethod
    def matches(entity: Mapping[str, Any], constraints: Mapping[str, str]) -> bool:
        for slot, wanted in constraints.items():
            wanted = str(wanted).strip().lower()
            if wanted in NO_CONSTRAINT or slot.startswith("book "):
                continue
            attribute = DB_ATTRIBUTE.get(slot, slot)
            if attribute not in entity:
                continue
            have = str(entity[attribute]).strip().lower()
            if have == "?":
                continue
            if slot in ("leave at", "arrive by"):
                w, h = time_minutes(wanted), time_minutes(have)
                if w is None or h is None:
                    continue
                if (slot == "leave at" and h < w) or (slot == "arrive by" and h > w):
                    return False
            elif have != wanted:
                return False
        return True

    @staticmethod
    def _taxi_ready(constraints: Mapping[str, str]) -> bool:
        def given(slot: str) -> bool:
            return constraints.get(slot, "") not in NO_CONSTRAINT

        return given("departure") and given("destination") and (given("leave at") or given("arrive by"))


# --- a dataset on disk ----------------------------------------------------------------------------------


@dataclass
class TODDataset:
    ontology: Ontology
    db: Database
    dialogues: list[dict[str, Any]]
    goals: list[Goal]  # one per dialogue, parsed and checked
    source: str

    def split(self, name: str) -> list[int]:
        return [i for i, d in enumerate(self.dialogues) if d.get("data_split") == name]


class _Files:
    """The files of a dataset, in a directory (`ontology.json`, ... or `data/ontology.json`, ...) or a data.zip."""

    def __init__(self, path: Path) -> None:
        self.zip: zipfile.ZipFile | None = None
        if path.is_dir() and (path / "data.zip").is_file():
            path = path / "data.zip"
        if path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile:
                raise WorkbenchError(f"{path}: not a zip archive") from None
            names = set(self.zip.namelist())
            self.prefix = "data/" if "data/ontology.json" in names else ""
            self.names = names
        elif path.is_dir():
            self.prefix = "data/" if (path / "data" / "ontology.json").is_file() else ""
        else:
            raise WorkbenchError(f"data.path: {path}: no such file or directory")
        self.path = path

    def label(self, name: str) -> str:
        return f"{self.path}:{self.prefix}{name}" if self.zip else str(self.path / self.prefix / name)

    def exists(self, name: str) -> bool:
        if self.zip:
            return self.prefix + name in self.names
        return (self.path / self.prefix / name).is_file()

    def read_json(self, name: str) -> Any:
        label = self.label(name)
        if not self.exists(name):
            raise WorkbenchError(f"{label}: missing (a ConvLab unified dataset holds ontology.json, dialogues.json)")
        try:
            text = self.zip.read(self.prefix + name) if self.zip else (self.path / self.prefix / name).read_bytes()
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"{label}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise WorkbenchError(f"{label}: cannot read: {exc}") from None


def load_dataset(path: str | Path, domains: Sequence[str] | None = None) -> TODDataset:
    """Read and check a unified-format dataset; `domains` are those the environment uses (default: all of
    the ontology's). Goals naming an unknown domain or slot, and goal domains without a non-empty database,
    are errors naming the file and field."""
    files = _Files(Path(path))
    ontology = parse_ontology(files.read_json("ontology.json"), files.label("ontology.json"))
    for domain in domains or ():
        if domain not in ontology.domains:
            raise WorkbenchError(f"{ontology.source}: domains.{domain}: missing, but env.domains uses it")
    dialogues = files.read_json("dialogues.json")
    where = files.label("dialogues.json")
    if not isinstance(dialogues, list) or not dialogues:
        raise WorkbenchError(f"{where}: expected a non-empty list of dialogues")
    goals = []
    for i, dialogue in enumerate(dialogues):
        if not isinstance(dialogue, dict) or "turns" not in dialogue:
            raise WorkbenchError(f"{where}: [{i}]: expected a dialogue with goal and turns")
        name = f"{where}: {dialogue.get('dialogue_id', i)}"
        goals.append(goal_from_unified(dialogue.get("goal", {}), ontology, name))
    wanted = set(domains or ontology.domains) | {d for g in goals for d in g.domains}
    tables, taxi = {}, None
    for domain in sorted(wanted):
        name = f"{domain}_db.json"
        if not files.exists(name):
            if domain == TAXI or not any(domain in g.parts for g in goals):
                continue
            raise WorkbenchError(f"{files.label(name)}: missing, but dialogue goals use domain {domain}")
        table = files.read_json(name)
        if domain == TAXI:
            if isinstance(table, dict) and table.get("taxi_colors") and table.get("taxi_types"):
                taxi = table
            continue
        if not isinstance(table, list) or not table:
            raise WorkbenchError(f"{files.label(name)}: empty database (expected a list of {domain} entities)")
        tables[domain] = table
    return TODDataset(ontology, Database(tables, taxi), dialogues, goals, str(files.path))
