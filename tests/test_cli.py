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
