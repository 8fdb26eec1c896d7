"""The policy language: rules over a run's metric stream, their validation, and where a run's rules come from.

A policy is data: a YAML list of rules, each a condition (`when`) and its actions. Condition knobs are those
Keras, Lightning and Hugging Face users know from their EarlyStopping callbacks (`metric` is their `monitor`),
plus conditions on the shape of a series (drop from its running peak, fraction of its first value, slope over a
window, sustained for k observations) and forecaster events. Nothing in a policy is evaluated as code.
docs/policies.md describes every knob.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from workbench.errors import WorkbenchError
from workbench.schema import Strict, describe, read_yaml, yaml_problem
from workbench.tracking import metric_key

if TYPE_CHECKING:
    from analysis.events import Forecaster

_Config = TypeVar("_Config", bound=BaseModel)

ACTIONS = ("alert", "checkpoint", "stop", "hold")
_TESTS = (
    "patience",
    "patience_steps",
    "stopping_threshold",
    "divergence_threshold",
    "check_finite",
    "above",
    "below",
    "drop_from_peak",
    "fraction_of_initial",
    "slope_below",
)
_DIRECTIONAL = ("patience", "patience_steps", "baseline", "stopping_threshold", "divergence_threshold")


class Condition(Strict):
    """A rule's `when`: tests on one metric's series, a forecaster event, or `all` / `any` of conditions.

    The tests given on one metric combine with "or", as in Lightning's EarlyStopping (check_finite,
    stopping_threshold, divergence_threshold and patience are each a reason to stop); `all` expresses "and".
    """

    metric: str | None = Field(None, min_length=1, description="The monitored MLflow key (Keras' `monitor`).")
    mode: Literal["min", "max"] | None = Field(
        None, description="Which way is better; required by patience, baseline and the two thresholds."
    )
    patience: int | None = Field(
        None, ge=0, description="Observations of `metric` without improvement (Keras/Lightning/HF patience)."
    )
    patience_steps: int | None = Field(None, ge=0, description="Like patience, counted in steps since the best.")
    min_delta: float = Field(0.0, ge=0, description="An improvement must beat the best by more than this.")
    baseline: float | None = Field(
        None, description="Patience runs out unless the metric also beats this value (Keras' baseline)."
    )
    stopping_threshold: float | None = Field(None, description="Holds once the metric is at least this good.")
    divergence_threshold: float | None = Field(None, description="Holds once the metric is worse than this.")
    check_finite: bool = Field(False, description="Holds when the metric is NaN or infinite.")
    warmup_steps: int = Field(0, ge=0, description="Values logged before this step are ignored (start_from_epoch).")
    above: float | None = Field(None, description="Holds while metric > above.")
    below: float | None = Field(None, description="Holds while metric < below.")
    drop_from_peak: float | None = Field(
        None, gt=0, lt=1, description="Holds when the metric is this fraction below its running peak."
    )
    fraction_of_initial: float | None = Field(
        None, gt=0, description="Holds when metric <= this fraction of its first value."
    )
    slope_below: float | None = Field(
        None, description="Holds when the least-squares slope per step over the last `window` steps is below this."
    )
    window: int | None = Field(None, gt=0, description="Steps the slope is fitted over.")
    for_snapshots: int = Field(1, ge=1, description="The metric's tests must hold on this many observations in a row.")
    event: str | None = Field(None, min_length=1, description="A forecaster's event; holds while it is active.")
    all: list[Condition] | None = Field(None, min_length=1, description="Holds when every condition holds.")
    any: list[Condition] | None = Field(None, min_length=1, description="Holds when one condition holds.")

    @model_validator(mode="after")
    def _coherent(self) -> Condition:
        kinds = [k for k in ("metric", "event", "all", "any") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"expected exactly one of metric, event, all, any; got {', '.join(kinds) or 'none'}")
        given = self.model_fields_set - {kinds[0]}
        if kinds[0] != "metric":
            if given:
                raise ValueError(f"{', '.join(sorted(given))}: only valid with metric, not with {kinds[0]}")
            return self
        if all(getattr(self, t) is None or getattr(self, t) is False for t in _TESTS):  # `below: 0` is a test
            raise ValueError(f"metric {self.metric!r}: no test given (expected one of {', '.join(_TESTS)})")
        if self.patience is not None and self.patience_steps is not None:
            raise ValueError("patience and patience_steps: give one of them")
        if self.patience is None and self.patience_steps is None:
            for knob in ("min_delta", "baseline"):
                if knob in given:
                    raise ValueError(f"{knob}: only used with patience or patience_steps")
        directional = [k for k in _DIRECTIONAL if getattr(self, k) is not None]
        if directional and self.mode is None:
            raise ValueError(f"mode: required with {directional[0]} (min or max)")
        if (self.slope_below is None) != (self.window is None):
            raise ValueError("slope_below and window: give both")
        return self


class Rule(Strict):
    """A named condition and what to do when it holds."""

    name: str = Field(min_length=1, max_length=100, description="Names the rule in tags, metrics and messages.")
    when: Condition
    actions: list[str] = Field(min_length=1, description="Some of alert, checkpoint, stop, hold.")
    once: bool = Field(False, description="Fire at most once per run.")
    cooldown: int = Field(0, ge=0, description="Steps after a firing during which the rule does not fire again.")

    @field_validator("actions")
    @classmethod
    def _known_actions(cls, actions: list[str]) -> list[str]:
        for action in actions:
            if action not in ACTIONS:
                raise ValueError(f"unknown action {action!r} (expected {', '.join(ACTIONS)})")
        if "hold" in actions and "stop" in actions:
            raise ValueError("hold and stop in one rule contradict each other")
        return list(dict.fromkeys(actions))


def load_rules(
    value: Sequence[Any] | str | Path,
    source: str | None = None,
    base_dir: Path | None = None,
    node: yaml.Node | None = None,
) -> list[Rule]:
    """Validate a policy: a list of rule mappings, or a YAML file of one (relative paths from `base_dir`).

    Errors are one-line `WorkbenchError`s naming the source (the file, or `source`), the rule and the field;
    given the composed YAML `node` of `value` (`parse_policy`), also the line.
    """
    if isinstance(value, str | Path):
        path = Path(value)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        source, value = str(path), read_yaml(path, "policy")
    prefix = f"{source}: " if source else ""
    if not isinstance(value, list):
        raise WorkbenchError(f"{prefix}expected a list of rules, got {type(value).__name__}")
    rules: list[Rule] = []
    for index, raw in enumerate(value, start=1):
        label = f"rule #{index}"
        if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
            label = f"rule {raw['name']!r} (#{index})"
        if not isinstance(raw, Mapping):
            line = _line(node, [index - 1])
            raise WorkbenchError(f"{prefix}{line}{label}: expected a mapping with name, when, actions; got {raw!r}")
        try:
            rule = Rule.model_validate(raw)
        except ValidationError as exc:
            line = _line(node, [index - 1, *exc.errors()[0]["loc"]])
            raise WorkbenchError(f"{prefix}{line}{label}: {describe(exc)}") from None
        taken = [i for i, other in enumerate(rules, start=1) if other.name == rule.name]
        if taken:
            line = _line(node, [index - 1, "name"])
            raise WorkbenchError(f"{prefix}{line}{label}: name: {rule.name!r} is already rule #{taken[0]}")
        rules.append(rule)
    return rules


def parse_policy(text: str, source: str = "policy") -> list[Rule]:
    """Validate a policy given as YAML text (the app's editor): rules and forecaster events, as a run would.

    Errors name the line, the rule and the field: ``policy: line 4: rule 'p' (#1): when.patience: ...``.
    """
    try:
        node = yaml.compose(text)
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line, problem = yaml_problem(exc)
        where = f"line {line}: " if line else ""
        raise WorkbenchError(f"{source}: {where}invalid YAML: {problem}") from None
    # A policy's text is its rules: a bare string in it is a malformed rule, never a path to read another file from.
    rules = load_rules([] if value is None else [value] if isinstance(value, str) else value, source, node=node)
    check_events(rules, {f.name for f in default_forecasters()}, source, node)
    return rules


def _line(node: yaml.Node | None, path: Sequence[Any]) -> str:
    """'line N: ' of the deepest node along `path` (list indices and mapping keys) in a composed YAML tree."""
    found = node
    for part in path:
        if isinstance(found, yaml.SequenceNode) and isinstance(part, int) and part < len(found.value):
            found = found.value[part]
        elif isinstance(found, yaml.MappingNode):
            child = next((v for k, v in found.value if k.value == part), None)
            if child is None:
                break
            found = child
        else:
            break
    return "" if found is None else f"line {found.start_mark.line + 1}: "


def attach_policies(config: _Config, config_path: Path, policy_files: Sequence[Path] = ()) -> _Config:
    """The config with every rule inline: its `policies` file (relative to the config file) and `--policy` files.

    Everything is validated here, forecaster events included, so a bad policy refuses the run before it starts;
    the inlined rules are then what the run logs as its config.
    """
    sources: list[tuple[str, Any]] = []  # (source named in errors, its rules)
    if isinstance(config.policies, str):
        path = config_path.parent / config.policies
        sources.append((str(path), read_yaml(path, "policy")))
    elif config.policies:
        sources.append((f"{config_path}: policies", config.policies))
    sources += [(str(path), read_yaml(path, "policy")) for path in policy_files]
    names = {f.name for f in default_forecasters()}
    inline: list[Any] = []
    seen: dict[str, str] = {}
    for source, raw in sources:
        rules = load_rules([raw] if isinstance(raw, str) else raw, source)  # file content, never a further path
        check_events(rules, names, source)
        for rule in rules:
            if rule.name in seen:
                raise WorkbenchError(f"{source}: rule {rule.name!r}: name: already a rule of {seen[rule.name]}")
            seen[rule.name] = source
        inline += raw
    return config.model_copy(update={"policies": inline})


def default_forecasters() -> list[Forecaster]:
    """One of each forecaster in `analysis.forecast.FORECASTERS` (name -> zero-argument factory)."""
    from analysis import forecast

    return [factory() for factory in getattr(forecast, "FORECASTERS", {}).values()]


def check_events(rules: Sequence[Rule], names: set[str], source: str, node: yaml.Node | None = None) -> None:
    for index, rule in enumerate(rules, start=1):
        label = f"{source}: {_line(node, [index - 1, 'when'])}rule {rule.name!r} (#{index})"
        unknown = sorted(condition_events(rule.when) - names)
        if unknown:
            expected = ", ".join(sorted(names)) or "none: no forecaster is registered"
            raise WorkbenchError(f"{label}: when.event: unknown event {unknown[0]!r} (expected {expected})")
        if "alert" in rule.actions and metric_key(rule.name) in {metric_key(n) for n in names}:
            raise WorkbenchError(f"{label}: name: {rule.name!r} is a forecaster's event; its alerts would mix with it")


def condition_events(condition: Condition) -> set[str]:
    """The forecaster events a condition waits for, at any depth of `all` / `any`."""
    if condition.event is not None:
        return {condition.event}
    return set().union(*(condition_events(c) for c in condition.all or condition.any or []))
