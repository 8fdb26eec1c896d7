"""Is a run's process still there? Process identity tags, the stale-run check, and SIGINT/SIGTERM handling.

Every run started by `workbench run` (or reopened by `workbench resume`) carries the host, pid and the
process's start time as tags, so a pid the system reused for another program is not taken for the run. A run
whose status is RUNNING but whose process is gone (`kill -9`, OOM killer, a power cut) is marked FAILED with
`workbench.stop_reason` = "process gone (killed?)" by the stale-run check, which `workbench ls`, the app's run
table and `workbench resume` call. Runs started on another host cannot be checked from here: they stay as the
store says until that host's `workbench ls` looks at them (`workbench resume --force` takes them over).
"""

from __future__ import annotations

import signal
import socket
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

import psutil

from workbench import tags

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mlflow.entities import Run

PROCESS_GONE = "process gone (killed?)"
_SAME_START_S = 0.5  # psutil derives start times from clock ticks since boot: equal to well within this


def process_tags() -> dict[str, str]:
    """The tags that say which process is training a run."""
    me = psutil.Process()
    return {tags.HOST: socket.gethostname(), tags.PID: str(me.pid), tags.PID_STARTED: f"{me.create_time():.3f}"}


def process_alive(run_tags: dict[str, str]) -> bool | None:
    """Whether the process named by a run's tags still runs: None when it cannot be told from this host."""
    if run_tags.get(tags.HOST) != socket.gethostname() or tags.PID not in run_tags or tags.PID_STARTED not in run_tags:
        return None
    try:
        process = psutil.Process(int(run_tags[tags.PID]))
        same = abs(process.create_time() - float(run_tags[tags.PID_STARTED])) < _SAME_START_S
        return same and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except (ValueError, psutil.Error):  # a malformed tag, or a process we may not inspect: cannot tell
        return None


def mark_stale_runs(runs: Sequence[Run], tracking_uri: str | None = None, client: Any = None) -> list[Run]:
    """`runs` with each RUNNING run whose process is gone marked FAILED (reason tag set) and read back."""
    stale = [r for r in runs if r.info.status == "RUNNING" and process_alive(r.data.tags) is False]
    if not stale:
        return list(runs)
    if client is None:
        from workbench.tracking import open_store

        client, _ = open_store(tracking_uri)
    fresh = {}
    for run in stale:
        now = client.get_run(run.info.run_id)  # it may have finished (or been resumed) since it was listed
        if now.info.status == "RUNNING" and process_alive(now.data.tags) is False:
            client.set_tag(run.info.run_id, tags.STOP_REASON, PROCESS_GONE)
            client.set_terminated(run.info.run_id, status="FAILED")
            now = client.get_run(run.info.run_id)
        fresh[run.info.run_id] = now
    return [fresh.get(r.info.run_id, r) for r in runs]


# --- SIGINT and SIGTERM ----------------------------------------------------------------------------------

_active: StopSignals | None = None


class StopSignals:
    """SIGINT/SIGTERM while a stage trains: a loop that polls `pending_stop_signal()` checkpoints and ends at its
    next step boundary; in a stage that never polls, the signal raises KeyboardInterrupt at once. A second signal
    always raises. Either way the run ends KILLED with `workbench.stop_reason` naming the signal, and the CLI
    exits 128 + the signal number (130, 143)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.polled = False
        self._previous: dict[int, Any] = {}

    @property
    def reason(self) -> str:
        return f"{signal.Signals(self.received).name} received" if self.received else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = self.received or signum
        if not (first and self.polled):
            raise KeyboardInterrupt(self.reason)

    def __enter__(self) -> StopSignals:
        global _active
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
            _active = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _active
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if _active is self:
            _active = None


def pending_stop_signal() -> str | None:
    """For a training loop, once per step: the reason to stop now (a signal arrived), else None. Calling it
    tells the handler this loop stops cleanly, so the signal no longer interrupts it mid-step."""
    if _active is None:
        return None
    _active.polled = True
    return _active.reason or None
