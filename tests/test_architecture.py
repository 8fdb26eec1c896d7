"""The floor plan holds: no import circle, the core never imports a stage, every registered stage resolves, and a
stage's settings can be read without loading torch or TRL."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.stages import STAGES, resumable, stage_config_class, stage_runner

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workbench", "pipelines", "analysis")
CORE = ("workbench", "analysis")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imported(module: str, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    """The repository modules an import statement loads: `from a import b` is a.b when b is a module, else a."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = module if known[module].name == "__init__.py" else module.rpartition(".")[0]
        if node.level:
            base = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1])
            package = f"{base}.{node.module}" if node.module else base
        else:
            package = node.module
        submodules = [f"{package}.{alias.name}" for alias in node.names if f"{package}.{alias.name}" in known]
        targets = submodules if len(submodules) == len(node.names) else [package, *submodules]
    resolved = []
    for target in targets:
        while target and target not in known:  # `import a.b.c` of a name inside a module: the module
            target = target.rpartition(".")[0]
        if target and target != module:
            resolved.append(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    """Every import of every module, those inside functions and under TYPE_CHECKING included."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[name].update(imported(name, node, known))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_graph_reader_sees_lazy_and_type_checking_imports_and_finds_a_planted_cycle():
    graph = import_graph()
    assert "workbench.callback" in graph["workbench"]  # the lazy `WorkbenchCallback` of workbench/__init__.py
    assert "workbench.tracking" in graph["workbench.checkpoint"]  # under TYPE_CHECKING
    assert find_cycle(graph | {"workbench.errors": {"workbench.config"}}) == [
        "workbench.config",
        "workbench.errors",
        "workbench.config",
    ]


def test_no_module_imports_itself_back_through_others():
    assert find_cycle(import_graph()) is None


def test_the_core_never_imports_a_stage():
    reaching_up = sorted(
        (name, target)
        for name, targets in import_graph().items()
        if name.startswith(CORE)
        for target in targets
        if target.split(".")[0] == "pipelines"
    )
    assert reaching_up == []


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_registered_stage_resolves_to_its_config_and_runner(stage):
    required = {"stages": [{"config": "x.yaml"}]} if stage == "chain" else {}  # a chain has no default stages
    assert stage_config_class(stage)(**required).stage == stage
    assert callable(stage_runner(stage))


def test_only_the_grokking_stage_is_resumable():
    assert [stage for stage in STAGES if resumable(stage)] == ["grokking"]


@pytest.mark.parametrize("module", sorted({s.config.partition(":")[0] for s in STAGES.values()}))
def test_a_stage_config_module_imports_neither_torch_nor_trl(module):
    code = (
        f"import sys, {module}; heavy = [m for m in ('torch', 'trl', 'transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""
