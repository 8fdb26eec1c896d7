import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Nothing may download weights or datasets during tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.pop("MLFLOW_TRACKING_URI", None)

import pytest  # noqa: E402
import requests  # noqa: E402


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh embedded sqlite store; the working directory is the test's so artifacts land there too."""
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "grokking.yaml")
# The default grokking job shrunk to a few seconds: 11x11 pairs, 20 steps, snapshots at 0, 10, 20.
TINY_GROKKING = [
    "task.p=11",
    "train.max_steps=20",
    "train.eval_every=5",
    "snapshot.every=10",
    "model.hidden_size=32",
    "model.intermediate_size=64",
]


@pytest.fixture
def run_grokking(tracking_uri):
    """Run the tiny grokking job through the CLI into the test's store; returns the newest MLflow run."""
    from mlflow import MlflowClient

    from workbench.cli import main

    def run(*overrides: str, exit_code: int = 0):
        assert main(["run", DEFAULT_CONFIG, *TINY_GROKKING, *overrides, f"tracking.uri={tracking_uri}"]) == exit_code
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name("grokking").experiment_id
        return client.search_runs([experiment], order_by=["attribute.start_time DESC"], max_results=1)[0]

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's binaries (Debian keeps them out of PATH, under /usr/lib/postgresql)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    assert found, "PostgreSQL is not installed: `apt-get install postgresql` (README command 2 does it)"
    return Path(found[-1]).parent


def as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` system user that Debian's package creates."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def wait_until(ready, what: str, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, f"{what} did not start:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    """The URL of an `mlflow server` over PostgreSQL (Debian's `postgresql` package) on 127.0.0.1, the set-up
    docs/scale-out.md describes: a throwaway cluster (initdb, trust auth on 127.0.0.1 only) as its backend store
    and a proxied artifact store. One per test session: its start costs 10-40 s on a shared 2-core machine."""
    bindir = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="workbench-pg-"))
    root.chmod(0o755)  # the postgres user must reach its data directory
    data, sockets, log = root / "data", root / "sockets", root / "postgres.log"
    for path in (data, sockets):
        path.mkdir()
    log.touch()
    if os.geteuid() == 0:
        for path in (data, sockets, log):
            shutil.chown(path, "postgres")
    pg_port, server_port = free_port(), free_port()
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "workbench", "--auth=trust", "-E", "UTF8"]
    subprocess.run(as_postgres_user(initdb), check=True, capture_output=True)
    options = f"-p {pg_port} -k {sockets} -c listen_addresses=127.0.0.1"
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]
    started = subprocess.run(as_postgres_user(pg_ctl), capture_output=True, text=True)
    assert started.returncode == 0, f"PostgreSQL did not start: {started.stderr}\n{log.read_text()[-2000:]}"
    server = None
    try:
        createdb = [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "workbench", "mlflow"]
        subprocess.run(createdb, check=True, capture_output=True)
        backend = f"postgresql://workbench@127.0.0.1:{pg_port}/mlflow"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(server_port)]
        command += ["--workers", "1", "--backend-store-uri", backend]
        command += ["--artifacts-destination", str(root / "artifacts")]  # served: clients upload through the server
        server_log = root / "mlflow-server.log"
        with open(server_log, "w") as out:  # its own session: the server and its uvicorn worker stop together
            server = subprocess.Popen(command, cwd=root, stdout=out, stderr=out, start_new_session=True)
        url = f"http://127.0.0.1:{server_port}"

        def healthy() -> bool:
            assert server.poll() is None, f"mlflow server exited:\n{server_log.read_text()[-3000:]}"
            try:
                return requests.get(f"{url}/health", timeout=2).ok
            except requests.RequestException:
                return False

        wait_until(healthy, "mlflow server", server_log)
        yield url
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        stop = [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
        subprocess.run(as_postgres_user(stop), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
