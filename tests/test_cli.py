import subprocess
import sys


def test_help_answers_without_loading_heavy_libraries():
    """`workbench --help` must stay instant: torch, transformers and mlflow load only inside the verbs."""
    code = (
        "import sys\n"
        "from workbench.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'analysis') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "run" in out and "ls" in out
    assert "HEAVY []" in out


def test_each_verb_has_help():
    for verb in ("run", "ls"):
        out = subprocess.run([sys.executable, "-m", "workbench.cli", verb, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: workbench " + verb in out.stdout


def test_unknown_verb_exits_2():
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_a_store_that_refuses_the_params_ends_the_run_failed_and_exits_1(tracking_uri, monkeypatch, capsys):
    from conftest import DEFAULT_CONFIG, TINY_GROKKING
    from mlflow import MlflowClient

    from workbench.cli import main
    from workbench.tracking import Tracker

    def refuse(self, params):
        raise RuntimeError("params rejected")

    monkeypatch.setattr(Tracker, "log_params", refuse)
    assert main(["run", DEFAULT_CONFIG, *TINY_GROKKING, f"tracking.uri={tracking_uri}"]) == 1
    assert "workbench: run FAILED at its start: RuntimeError: params rejected" in capsys.readouterr().err
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and run.data.tags["workbench.error"] == "RuntimeError: params rejected"
