"""The policy engine: evaluates a run's rules and feeds its forecasters at every logged step, and acts.

`PolicyEngine.observe(step, metrics)` is the one entry point: every training loop and the HF callback call it
at every logged step, and `workbench backtest` replays logged histories through a fresh engine, so a policy
stops a backtest at the step it stops the live run. Actions: alert, checkpoint, stop, hold (docs/policies.md).
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench import tags
from workbench.errors import WorkbenchError
from workbench.policies.checks import compile_condition
from workbench.policies.requests import STOP_POLL_SECONDS, RequestPoller
from workbench.policies.rules import Rule, check_events, condition_events, default_forecasters, load_rules, parse_policy
from workbench.tracking import metric_key

if TYPE_CHECKING:
    from analysis.events import Forecaster
    from workbench.tracking import Tracker

STOP_REQUEST = "stop request"  # the name a stop request fires under


@dataclass
class Decision:
    """What the loop does after a step: stop (ending the run cleanly), save a checkpoint; and why."""

    stop: bool = False
    checkpoint: bool = False
    reason: str | None = None  # the first stop's rule and why, or "stop requested"
    by_user: bool = False  # the stop honours a user's request: the run ends KILLED, MLflow's word for that
    alerts: list[str] = field(default_factory=list)  # the lines the engine printed at this step


@dataclass(frozen=True)
class Firing:
    """One thing the engine did, in step order: for the backtest report and tests."""

    step: int
    kind: str  # alert, checkpoint, stop, held, hold, release, event, attach
    name: str  # the rule, forecaster or "stop request"
    message: str


class _RuleState:
    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.check = compile_condition(rule.when)
        self.metrics = self.check.metrics()
        self.events = condition_events(rule.when)
        self.last_fired: int | None = None
        self.held = False  # its stop is being held; its other actions already ran for this hold
        self.disabled = False


class PolicyEngine:
    """Evaluates rules and feeds forecasters at every logged step; logs what it does to the tracker's run.

    Args:
        rules: validated rules (`load_rules`).
        tracker: the run to log alerts, events and stop tags to, and to poll for stop requests; None in a
            backtest, where nothing is logged.
        forecasters: objects with `name`, `observe(step, metrics)` and `active(step)` (analysis/forecast.py);
            default: one of each in `analysis.forecast.FORECASTERS`.
        console: print a line for each action (on stderr, above any progress bar).
        stop_poll_seconds: the least time between two polls of the run's stop-request tag (default
            `STOP_POLL_SECONDS`).
        source: names the policy in error messages.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        tracker: Tracker | None = None,
        forecasters: Sequence[Forecaster] | None = None,
        *,
        console: bool = True,
        stop_poll_seconds: float | None = None,
        source: str = "policies",
    ) -> None:
        self.forecasters = {f.name: f for f in (default_forecasters() if forecasters is None else forecasters)}
        check_events(rules, set(self.forecasters), source)
        self.rules = [_RuleState(rule) for rule in rules]
        self.tracker = tracker
        self.console = console
        poll_seconds = STOP_POLL_SECONDS if stop_poll_seconds is None else stop_poll_seconds
        self.requests = RequestPoller(tracker, poll_seconds, self._print) if tracker is not None else None
        self.firings: list[Firing] = []
        self.stopped: Firing | None = None
        self.seen: set[str] = set()  # every metric key observed so far
        self._groups: set[str] = set()  # their prefixes: "eval" for eval/acc
        self._holding: list[str] = []
        self._last_step = 0

    @classmethod
    def from_config(
        cls,
        value: Sequence[Any] | str | Path,
        source: str = "config policies",
        *,
        base_dir: Path | None = None,
        **kwargs: Any,
    ) -> PolicyEngine:
        """An engine for a config's `policies` value: rules inline, or a YAML file (relative to `base_dir`)."""
        return cls(load_rules(value, source, base_dir), source=source, **kwargs)

    # --- the step ---------------------------------------------------------------------------------------

    def observe(self, step: int, metrics: Mapping[str, float], *, snapshot: bool = False) -> Decision:
        """Feed the metrics logged at `step` (only those), evaluate the rules, and say what the loop does.

        `snapshot`: the instrument took a snapshot at this step; requests are polled then whatever the time since
        the last poll, so a stop is honoured within one snapshot interval.
        """
        decision = Decision()
        metrics = {metric_key(k): v for k, v in metrics.items()}  # the names MLflow stores, as a backtest reads them
        self._last_step = step
        new_keys = metrics.keys() - self.seen
        self.seen.update(metrics)
        self._groups.update(_group(k) for k in new_keys)
        self._feed_forecasters(step, metrics, decision)
        if new_keys:
            self._report_missing(step, decision, final=False)
        fresh: dict[int, bool] = {}
        for i, state in enumerate(self.rules):
            if state.disabled:
                continue
            try:
                fresh[i] = state.check.update(step, metrics, self.forecasters)
            except Exception as exc:  # a live run never dies of its policy: the rule goes, the run goes on
                self._disable(state, step, f"{type(exc).__name__}: {exc}", decision)
        self._update_hold(step, decision)
        for i, state in enumerate(self.rules):
            if not state.disabled and fresh.get(i):
                self._consider(state, step, decision)
        if self.requests is None or self.stopped is not None:
            return decision
        requests = self.requests.poll(snapshot)
        if requests.attached is not None:
            self._attach(step, requests.attached, decision)
        if requests.checkpoint and not requests.stop:
            decision.checkpoint = True
            self._record(step, "checkpoint", "checkpoint request", "checkpoint requested", decision)
        if requests.stop:
            decision.stop = decision.checkpoint = decision.by_user = True
            decision.reason = "stop requested"
            self._stop(step, STOP_REQUEST, "stop requested", decision)
        return decision

    def replay(self, history: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """Observe logged steps silently (nothing logged, printed or polled): rules and forecasters reach the
        state they had at the end of `history`, as when a resumed run continues from its checkpoint."""
        tracker, console, requests = self.tracker, self.console, self.requests
        self.tracker, self.console, self.requests = None, False, None
        try:
            for step, metrics in history:
                self.observe(step, metrics)
        finally:
            self.tracker, self.console, self.requests = tracker, console, requests

    @property
    def ended_by_user(self) -> bool:
        """Whether the run's stop was a user's request (`workbench stop`, the app), not a rule's."""
        return self.stopped is not None and self.stopped.name == STOP_REQUEST

    def finish(self) -> list[str]:
        """At the end of a run (or a replay): report rules whose metrics never appeared. Returns the lines."""
        decision = Decision()
        self._report_missing(self._last_step, decision, final=True)
        return decision.alerts

    # --- rules ------------------------------------------------------------------------------------------

    def _update_hold(self, step: int, decision: Decision) -> None:
        holding = [s.rule.name for s in self.rules if not s.disabled and "hold" in s.rule.actions and s.check.true]
        for name in holding:
            if name not in self._holding:
                self._record(step, "hold", name, f"rule '{name}': stops are held", decision)
        if self._holding and not holding:
            self._record(step, "release", ", ".join(self._holding), "stops are no longer held", decision)
            for state in self.rules:
                state.held = False
        self._holding = holding

    def _consider(self, state: _RuleState, step: int, decision: Decision) -> None:
        rule = state.rule
        if not state.check.true:
            state.held = False
            return
        actions = [a for a in rule.actions if a != "hold"]
        if not actions or (rule.once and state.last_fired is not None):
            return
        if state.last_fired is not None and step - state.last_fired < rule.cooldown:
            return
        why = f"rule '{rule.name}': {state.check.why}"
        if "stop" in actions and self._holding:
            # The stop waits for the hold to end; the rule's alert/checkpoint run once per hold, not every step.
            if not state.held:
                state.held = True
                self._record(step, "held", rule.name, f"{why} (stop held by {', '.join(self._holding)})", decision)
                self._act(state, step, why, [a for a in actions if a != "stop"], decision)
            return
        state.last_fired = step
        self._act(state, step, why, actions, decision)

    def _act(self, state: _RuleState, step: int, why: str, actions: list[str], decision: Decision) -> None:
        name = state.rule.name
        if "alert" in actions:
            self._alert(step, name, why, decision)
        if "checkpoint" in actions:
            decision.checkpoint = True
            self._record(step, "checkpoint", name, why, decision)
        if "stop" in actions:
            decision.stop = True
            decision.reason = decision.reason or why
            self._stop(step, name, why, decision)

    def _stop(self, step: int, name: str, why: str, decision: Decision) -> None:
        firing = self._record(step, "stop", name, why, decision)
        if self.stopped is None:
            self.stopped = firing
            if self.tracker is not None:
                self.tracker.set_tags({tags.STOP_REASON: why, tags.STOPPED_AT: str(step)})

    def _alert(self, step: int, name: str, message: str, decision: Decision) -> None:
        self._record(step, "alert", name, message, decision)
        if self.tracker is not None:
            log_alert(self.tracker, step, name, message)

    def _disable(self, state: _RuleState, step: int, why: str, decision: Decision) -> None:
        state.disabled = True
        self._alert(step, state.rule.name, f"rule '{state.rule.name}' disabled: {why}", decision)

    def _report_missing(self, step: int, decision: Decision, final: bool) -> None:
        """A rule on a key this run does not log is a typo: say so against the keys it does log, and drop the rule.

        Keys logged together share a prefix (eval/..., geom/lid_twonn/...): once a rule's prefix has appeared
        without its key, the key is missing; otherwise the end of the run decides.
        """
        for state in self.rules:
            if state.disabled:
                continue
            missing = sorted(k for k in state.metrics - self.seen if final or _group(k) in self._groups)
            if missing:
                self._disable(state, step, self._never_logged(missing[0]), decision)

    def _never_logged(self, key: str) -> str:
        if not self.seen:
            return f"metric '{key}' never logged; this run logged no metrics"
        close = difflib.get_close_matches(key, sorted(self.seen), n=3)
        shown = close + [k for k in sorted(self.seen) if k not in close][: max(0, 8 - len(close))]
        more = f", ... ({len(self.seen) - len(shown)} more)" if len(self.seen) > len(shown) else ""
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"metric '{key}' never logged{hint}; this run logs {', '.join(shown)}{more}"

    # --- forecasters and stop requests ------------------------------------------------------------------

    def _feed_forecasters(self, step: int, metrics: Mapping[str, float], decision: Decision) -> None:
        for name, forecaster in list(self.forecasters.items()):
            try:
                event = forecaster.observe(step, metrics)
            except Exception as exc:  # a broken forecaster takes its rules with it, never the run
                del self.forecasters[name]
                for state in self.rules:
                    if name in state.events and not state.disabled:
                        self._disable(state, step, f"forecaster '{name}' failed: {type(exc).__name__}: {exc}", decision)
                continue
            if event is None:
                continue
            details = ", ".join(f"{k}={v}" for k, v in event.details.items())
            self._record(step, "event", event.name, f"forecast '{event.name}' fired: {details}", decision)
            if self.tracker is not None:
                self.tracker.log_metrics({metric_key(f"event/{event.name}"): 1.0}, event.step)
                tag = json.dumps({"step": event.step, **event.details}, default=str)
                self.tracker.set_tags({tags.EVENT_PREFIX + metric_key(event.name): tag})

    def _attach(self, step: int, value: str, decision: Decision) -> None:
        """Take the rules of a policy attached to the live run (`attach_policy`): an attached rule replaces the
        run's rule of the same name, its state fresh; the others are added. It was validated on attach; a
        policy this run cannot take (an event none of its forecasters raises) is refused with an alert."""
        try:
            rules = parse_policy(json.loads(value)["policy"], source="attached policy")
            check_events(rules, set(self.forecasters), "attached policy")
        except (WorkbenchError, ValueError, KeyError, TypeError) as exc:
            self._alert(step, "attached_policy", f"attached policy refused: {exc}", decision)
            return
        names = {rule.name for rule in rules}
        replaced = [s.rule.name for s in self.rules if s.rule.name in names]
        self.rules = [s for s in self.rules if s.rule.name not in names] + [_RuleState(rule) for rule in rules]
        added = ", ".join(rule.name for rule in rules)
        message = f"attached policy taken: {added}" + (f" (replacing {', '.join(replaced)})" if replaced else "")
        self._record(step, "attach", "attached policy", message, decision)
        self.tracker.set_tags({tags.ATTACHED_POLICY_APPLIED: json.dumps({"step": step, "rules": sorted(names)})})
        self._report_missing(step, decision, final=False)  # a rule on a key this run does not log says so now

    # --- output -----------------------------------------------------------------------------------------

    def _record(self, step: int, kind: str, name: str, message: str, decision: Decision) -> Firing:
        firing = Firing(step, kind, name, message)
        self.firings.append(firing)
        line = f"policy, step {step}: {kind}: {message}"
        decision.alerts.append(line)
        self._print(line)
        return firing

    def _print(self, line: str) -> None:
        if self.console:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stderr)


def _group(key: str) -> str:
    return key.rpartition("/")[0]


def log_alert(tracker: Tracker, step: int, name: str, message: str) -> None:
    """An alert as runs keep it: `event/<name>` at its step, and the latest one's message in a tag."""
    tracker.log_metrics({metric_key(f"event/{name}"): 1.0}, step)
    tracker.set_tags({tags.ALERT_PREFIX + metric_key(name): json.dumps({"step": step, "message": message})})
