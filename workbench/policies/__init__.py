"""Early-stop policies: rules over a run's metric stream that alert, checkpoint, stop, or hold other rules' stops.

- `rules.py`: the language (`Rule`, `Condition`) and its validation (`load_rules`, `parse_policy`);
- `checks.py`: a condition compiled to the stateful check the engine updates at every step;
- `engine.py`: `PolicyEngine`, which evaluates the rules, feeds the forecasters and decides;
- `requests.py`: stop / checkpoint / attach requests to a live run over its tags.

docs/policies.md describes every knob.
"""

from workbench.policies.engine import Decision, Firing, PolicyEngine, log_alert
from workbench.policies.requests import STOP_POLL_SECONDS, attach_policy, request_checkpoint, request_stop
from workbench.policies.rules import ACTIONS, Condition, Rule, attach_policies, load_rules, parse_policy

__all__ = [
    "ACTIONS",
    "STOP_POLL_SECONDS",
    "Condition",
    "Decision",
    "Firing",
    "PolicyEngine",
    "Rule",
    "attach_policies",
    "attach_policy",
    "load_rules",
    "log_alert",
    "parse_policy",
    "request_checkpoint",
    "request_stop",
]
