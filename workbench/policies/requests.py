"""Requests to a live run over its tags: stop, checkpoint now, attach a policy. `workbench stop` / `attach` and
the app set them; the run's engine polls them (`RequestPoller`), so nothing but the tracking store connects the two.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from workbench import tags
from workbench.errors import WorkbenchError
from workbench.policies.rules import parse_policy
from workbench.tracking import open_run

if TYPE_CHECKING:
    from workbench.tracking import Tracker

ATTACH_MAX_CHARS = 5000  # tag values: 8 000 characters in MLflow 3, 5 000 before; longer ones are truncated
STOP_POLL_SECONDS = 2.0  # a poll is three get_run (stop, checkpoint, attach): cheap on sqlite, requests on a server


def request_stop(run_id: str, tracking_uri: str | None = None) -> str:
    """Ask a RUNNING run to stop at its next step boundary (`workbench stop`, the app's button). Returns the URI."""
    return _request(run_id, tracking_uri, tags.STOP_REQUESTED, "stop")


def request_checkpoint(run_id: str, tracking_uri: str | None = None) -> str:
    """Ask a RUNNING run to save a checkpoint at its next logged step (the app's "Checkpoint now"). Returns the URI."""
    return _request(run_id, tracking_uri, tags.CHECKPOINT_REQUESTED, "checkpoint")


def attach_policy(run_id: str, text: str, tracking_uri: str | None = None, source: str = "policy") -> str:
    """Attach a policy (YAML text) to a RUNNING run (`workbench attach`, the app): validated here with the parser a
    run uses, kept with the run as the artifact `policies/attached_<time>.yaml`, and taken by the run's engine
    at its next poll, where its rules join (or, by name, replace) the run's. Returns the artifact's path."""
    rules = parse_policy(text, source)
    if not rules:
        raise WorkbenchError(f"{source}: no rules to attach")
    value = json.dumps({"requested": datetime.now().isoformat(timespec="milliseconds"), "policy": text})
    if len(value) > ATTACH_MAX_CHARS:
        raise WorkbenchError(f"{source}: {len(text)} characters, too long to attach (about {ATTACH_MAX_CHARS} at most)")
    client, _ = _running(run_id, tracking_uri, "attach a policy to")
    artifact = f"policies/attached_{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.yaml"
    client.log_text(run_id, text, artifact)
    client.set_tag(run_id, tags.ATTACHED_POLICY, value)
    return artifact


def _request(run_id: str, tracking_uri: str | None, tag: str, what: str) -> str:
    client, uri = _running(run_id, tracking_uri, what)
    client.set_tag(run_id, tag, f"requested {datetime.now().isoformat(timespec='milliseconds')}")
    return uri


def _running(run_id: str, tracking_uri: str | None, what: str) -> tuple[Any, str]:
    """(client, resolved URI) of a run that must be RUNNING for `what` to make sense."""
    client, run, uri = open_run(run_id, tracking_uri)
    if run.info.status != "RUNNING":
        raise WorkbenchError(f"run {run_id}: is {run.info.status}, not RUNNING; nothing to {what}")
    return client, uri


@dataclass(frozen=True)
class Requests:
    """What a poll found: a stop request, a checkpoint request not seen before, a policy newly attached (its tag)."""

    stop: bool = False
    checkpoint: bool = False
    attached: str | None = None


class RequestPoller:
    """The run's side of the channel: reads the request tags at most every `every_seconds`, and at every snapshot
    step, so that a request is honoured within one snapshot interval however fast the steps go (a poll costs far
    less than a snapshot). A store that fails a poll is reported once through `report`; the next poll tries again."""

    def __init__(self, tracker: Tracker, every_seconds: float, report: Any) -> None:
        self.tracker = tracker
        self.every_seconds = every_seconds
        self.report = report
        self._last: float | None = None
        self._failed = False
        self._checkpoint: str | None = None  # the last checkpoint request seen (its tag value)
        self._attached: str | None = None  # the last attached policy seen (its tag value)

    def poll(self, snapshot: bool) -> Requests:
        now = time.monotonic()
        if not snapshot and self._last is not None and now - self._last < self.every_seconds:
            return Requests()
        self._last = now
        try:
            stop = bool(self.tracker.get_tag(tags.STOP_REQUESTED))
            checkpoint = self.tracker.get_tag(tags.CHECKPOINT_REQUESTED)
            attached = self.tracker.get_tag(tags.ATTACHED_POLICY)
        except Exception as exc:  # a store hiccup must not end the run
            if not self._failed:
                self._failed = True
                self.report(f"policy: cannot poll for stop requests ({type(exc).__name__}: {exc}); will retry")
            return Requests()
        new = checkpoint is not None and checkpoint != self._checkpoint  # each request (its time) once
        self._checkpoint = checkpoint
        new_policy = attached if attached is not None and attached != self._attached else None
        self._attached = attached
        return Requests(stop, new, new_policy)
