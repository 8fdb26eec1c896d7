"""One small wrapper over the MLflow client: a run, its buffered metrics, params, tags and artifacts.

Metrics are buffered and sent with `log_batch`: on sqlite one `log_metric` call is a transaction of its own,
tens of times dearer than a value inside a batch, and a loop at tens of steps a second must batch. The run's
status follows how it ended: FINISHED, FAILED on an exception, KILLED on Ctrl-C or a user's stop request, and
what was buffered is flushed first in every case.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import posixpath
import random
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, closing, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any

from workbench import tags as workbench_tags
from workbench.errors import WorkbenchError, first_line

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own default: `mlflow ui` here finds the runs
_MAX_METRICS_PER_BATCH = 1000  # MLflow's per-request limits (mlflow/utils/validation.py)
_MAX_PARAMS_PER_BATCH = 100
_MAX_RETRY_SECONDS = 60.0  # longest wait between two tries of a failing flush
_JITTER = random.Random()  # its own generator: a failing flush must not move a seeded run's `random` stream
_SCHEMA_SETTLE_SECONDS = 3.0  # a schema unchanged this long is not being migrated by another process
_MLFLOW_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def resolve_tracking_uri(uri: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the embedded sqlite store in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def metric_key(name: str) -> str:
    """The one place names become MLflow keys: characters MLflow rejects (e.g. `@ ( ,`) become `_`."""
    return _MLFLOW_BAD_CHARS.sub("_", name)


def run_artifact_path(path: str) -> str:
    """The one check of a path inside a run's artifacts: normalised, relative, never above the run's root.

    `a/./b` becomes `a/b`; absolute paths, `..` that climbs out and backslashes are refused, whatever the
    artifact store (a local folder, S3, a server) would make of them.
    """
    normal = posixpath.normpath(path) if path else ""
    if (
        not normal
        or normal == "."
        or "\\" in path
        or "\x00" in path
        or posixpath.isabs(normal)
        or normal == ".."
        or normal.startswith("../")
    ):
        raise WorkbenchError(f"artifact path {path!r}: must be a relative path inside the run's artifacts")
    return normal


def _check_server_reachable(tracking_uri: str) -> None:
    """Fail in seconds on a server that is down: MLflow's own retries would hang for minutes first."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=10)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise WorkbenchError(f"tracking.uri: cannot reach MLflow server at {tracking_uri} ({reason})") from None


def open_store(uri: str | None) -> tuple[Any, str]:
    """(MlflowClient, resolved URI) for a tracking store; a server that is down is a user error in seconds."""
    resolved = resolve_tracking_uri(uri)
    _check_server_reachable(resolved)
    try:
        with _schema_lock(resolved):
            return _client_once_schema_settles(resolved), resolved
    except Exception as exc:  # e.g. a sqlite file that cannot be created
        raise _store_error(resolved, exc) from None


def _client_once_schema_settles(uri: str) -> Any:
    """`MlflowClient(uri)`, never migrating a sqlite file's schema while another process migrates it.

    Opening a store creates or migrates its schema when it is incomplete, and MLflow's own openers (a plain
    `MlflowClient`, `mlflow ui`, `mlflow server`) take no lock: two openers of a fresh file run the same
    migrations at once and both fail ('table latest_metrics already exists', 'duplicate column name: step'),
    which can leave the file half-migrated for good. So a fresh store is built aside and moved into place, and a
    store whose schema is incomplete is watched (read-only) until the process at work on it is done.
    """
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    # Absolute: MLflow keeps the store of each URI string it opened, so a relative one opened again from
    # another folder by this process would be the first folder's store.
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    if not db.exists():
        _create_store_aside(db)
    _wait_for_schema(db)
    return MlflowClient(f"sqlite:///{db}")


def _create_store_aside(db: Path) -> None:
    """Create a store's schema in a file of this process's own, then link it in as `db` unless another process
    created `db` meanwhile (a link never replaces a file, so whichever came first stays)."""
    from mlflow import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    # A new name each time: MLflow keeps the store of each URI it has opened in this process.
    handle, name = tempfile.mkstemp(prefix=f".{db.name}.", suffix=".creating", dir=db.parent)
    os.close(handle)
    aside = Path(name)
    try:
        MlflowClient(f"sqlite:///{aside}")  # an empty file is a new sqlite database
        os.link(aside, db)
    except FileExistsError:
        pass
    finally:
        aside.unlink(missing_ok=True)


@functools.cache
def _schema_head() -> str:
    """The head revision this MLflow migrates to: read once per process, as alembic reads it from its ~70 migration
    scripts (0.03-0.1 s a call, and every `open_store` asks)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _wait_for_schema(db: Path) -> None:
    """Return once the file's schema is MLflow's latest, or has not changed for `_SCHEMA_SETTLE_SECONDS` (no one
    is migrating it: opening it then migrates it, or says why it cannot)."""
    head = _schema_head()
    seen, still_since = None, time.monotonic()
    while (schema := _sqlite_schema_version(db)) is None or schema[1] != head:
        if schema != seen:
            seen, still_since = schema, time.monotonic()
        elif time.monotonic() - still_since > _SCHEMA_SETTLE_SECONDS:
            return
        time.sleep(0.05)


def _sqlite_schema_version(db: Path) -> tuple[int, str | None] | None:
    """(sqlite's schema cookie, alembic's revision) of a store file: the cookie changes with every table or
    column created (https://sqlite.org/pragma.html#pragma_schema_version). None when unreadable."""
    import sqlite3

    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as connection:
            cookie = connection.execute("PRAGMA schema_version").fetchone()[0]
            try:
                revision = connection.execute("SELECT version_num FROM alembic_version").fetchone()
            except sqlite3.OperationalError:  # no alembic_version table yet
                revision = None
            return cookie, revision[0] if revision else None
    except sqlite3.Error:
        return None


def _schema_lock(uri: str) -> AbstractContextManager[Any]:
    """Serialise opening an embedded sqlite store between the workbench's processes on this machine.

    Opening creates or migrates the schema (alembic) when needed; runs started at once on a fresh store
    otherwise race to create the same tables and all but one fail ('table alembic_version already exists').
    Other MLflow clients take no lock: `_client_once_schema_settles` waits those out.
    """
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    from filelock import FileLock

    db = str(Path(uri.removeprefix("sqlite:///")).resolve())
    name = f"workbench-sqlite-{hashlib.sha256(db.encode()).hexdigest()[:16]}.lock"  # not in the user's folder
    return FileLock(Path(tempfile.gettempdir()) / name)


def _store_error(uri: str, exc: Exception) -> WorkbenchError:
    return WorkbenchError(f"tracking.uri: cannot use tracking store {uri!r}: {first_line(exc)}")


def open_run(run_id: str, uri: str | None) -> tuple[Any, Any, str]:
    """(MlflowClient, the run, resolved URI) of an existing run; an unknown id is a one-line user error."""
    from mlflow.exceptions import MlflowException

    resolved = resolve_tracking_uri(uri)
    if resolved.startswith("sqlite:///") and not Path(resolved.removeprefix("sqlite:///")).exists():
        raise WorkbenchError(f"run {run_id}: not found (no tracking store at {resolved})")  # and do not create one
    client, resolved = open_store(resolved)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise WorkbenchError(f"run {run_id}: not found in {resolved}") from None
    if run.info.lifecycle_stage == "deleted":
        raise WorkbenchError(f"run {run_id}: was deleted from {resolved}")
    return client, run, resolved


def _experiment_id(client: Any, name: str) -> str:
    """The experiment's id, created if new; runs that start at once may both find it missing, and one wins."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        found = client.get_experiment_by_name(name)  # created by another run in the meantime
        if found is None:
            raise exc from None
        return found.experiment_id


class Tracker:
    """An open MLflow run. Use as a context manager so the status is set however the block ends."""

    def __init__(self, client: Any, run_id: str, tracking_uri: str, flush_seconds: float = 5.0) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.flush_seconds = flush_seconds
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()
        self._failed_flushes = 0  # consecutive failed flushes during training (backoff exponent)
        self._retry_at = 0.0
        self.ended = False

    @classmethod
    def start(
        cls,
        uri: str | None,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        flush_seconds: float = 5.0,
        parent_run_id: str | None = None,
    ) -> Tracker:
        """Open (or create) the store and experiment and start a run; an unusable store is a user error.

        With `parent_run_id` the run is nested under that one (MLflow's `mlflow.parentRunId` tag), as the
        stages of a chain are under the chain's run.
        """
        tags = {**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter on first use
        logging.getLogger("alembic").setLevel(logging.WARNING)
        client, tracking_uri = open_store(uri)
        try:
            run = client.create_run(_experiment_id(client, experiment), run_name=run_name, tags=tags)
        except Exception as exc:  # MLflow raises many types here (sqlalchemy, OSError, REST errors)
            raise _store_error(tracking_uri, exc) from None
        return cls(client, run.info.run_id, tracking_uri, flush_seconds)

    @classmethod
    def start_on_every_rank(cls, *args: Any, **kwargs: Any) -> Tracker:
        """`start` (same arguments), called by every rank of a multi-process launch at once (one process: `start`).

        Rank 0 creates the run and sends its id to the others, which get a `ReplicaTracker` of the same run: one
        run per training, and only rank 0 writes to it. A store rank 0 cannot use fails every rank.
        """
        from workbench.runtime import broadcast_text, is_main_process

        if not is_main_process():
            run_id = broadcast_text("")
            if not run_id:
                raise WorkbenchError("tracking: rank 0 could not start the run (its error says why)")
            client, tracking_uri = open_store(args[0] if args else kwargs.get("uri"))
            return ReplicaTracker(client, run_id, tracking_uri)
        tracker = None
        try:
            tracker = cls.start(*args, **kwargs)
        finally:
            broadcast_text(tracker.run_id if tracker is not None else "")
        return tracker

    # --- metrics ------------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metric values; they are sent every `flush_seconds`, when 1000 are waiting, and at the end."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._buffer.extend(Metric(metric_key(k), float(v), timestamp, step) for k, v in metrics.items())
        now = time.monotonic()
        due = len(self._buffer) >= _MAX_METRICS_PER_BATCH or now - self._last_flush > self.flush_seconds
        if due and now >= self._retry_at:
            self._flush_or_keep()

    def _flush_or_keep(self) -> None:
        """A flush during training. A store that fails (busy for longer than sqlite's 20 s busy timeout, a server
        restarting) keeps every value for a later try, after an exponential backoff with jitter, and is reported
        once; only the final flush (`finish`) raises."""
        try:
            self.flush()
        except Exception as exc:  # MLflow raises many types (sqlalchemy, OSError, REST errors)
            self._failed_flushes += 1
            delay = min(_MAX_RETRY_SECONDS, self.flush_seconds * 2**self._failed_flushes)
            self._retry_at = time.monotonic() + delay * _JITTER.uniform(0.5, 1.0)
            if self._failed_flushes == 1:
                reason = first_line(exc)
                print(
                    f"tracking: cannot send metrics to {self.tracking_uri} ({reason}); "
                    f"{len(self._buffer)} values kept, retrying with backoff",
                    file=sys.stderr,
                )
        else:
            self._failed_flushes = 0

    def flush(self) -> None:
        while self._buffer:
            batch = self._buffer[:_MAX_METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=batch)
            del self._buffer[: len(batch)]
        self._last_flush = time.monotonic()

    # --- params, tags, artifacts --------------------------------------------------------------------

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(metric_key(k), str(v)) for k, v in params.items()]
        for start in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def get_tag(self, key: str) -> str | None:
        """The run's current value of a tag, read back from the store (one get_run call)."""
        return self.client.get_run(self.run_id).data.tags.get(key)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        folder = None if artifact_path is None else run_artifact_path(artifact_path)
        self.client.log_artifact(self.run_id, str(local_path), folder)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, run_artifact_path(artifact_file))

    # --- lifecycle ----------------------------------------------------------------------------------

    def finish(self, status: str = "FINISHED") -> None:
        """Flush what is buffered, then mark the run FINISHED, FAILED or KILLED; a run already ended stays as it is.

        KILLED is MLflow's status for a run the user stopped (Ctrl-C, `workbench stop`); a stop by a policy rule
        ends FINISHED.
        """
        if self.ended:
            return
        self.ended = True
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.set_tags({workbench_tags.STOP_REASON: str(exc) or "interrupted (Ctrl-C)"})  # a signal names itself
            self.finish("KILLED")
        else:
            self.set_tags({workbench_tags.ERROR: f"{exc_type.__name__}: {exc}"[:5000]})
            self.finish("FAILED")


class ReplicaTracker(Tracker):
    """The run as ranks other than 0 of a multi-process launch hold it: the same run id, reads allowed, and every
    write dropped, since rank 0 logs for all ranks (metrics are reduced to it, snapshots are taken on it)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_params(self, params: Mapping[str, str]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass
