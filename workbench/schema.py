"""What every schema in the workbench is built from: strict pydantic models, YAML reading, one-line problems.

Stage configs, the callback's config and policies are validated with these, so a typo'd key, a malformed
file or a wrong type reads the same everywhere: one line naming the file (or source) and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from workbench.errors import WorkbenchError

_Model = TypeVar("_Model", bound=BaseModel)


class Strict(BaseModel):
    """A schema whose unknown keys are errors: a typo'd key must not be a silently ignored setting."""

    model_config = ConfigDict(extra="forbid")


def read_yaml(path: Path, what: str = "config") -> Any:
    """The parsed YAML file; a missing, unreadable or malformed file is a one-line error naming it."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise WorkbenchError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{path}: cannot read {what}: {exc}") from None
    except yaml.YAMLError as exc:
        line, problem = yaml_problem(exc)
        where = f" at line {line}" if line else ""
        raise WorkbenchError(f"{path}: invalid YAML{where}: {problem}") from None


def yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """(line, what is wrong) of a YAML error, on one line: PyYAML's own text spans several."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
    return (mark.line + 1 if mark else None), " ".join(str(problem).split())


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping; anything else is a one-line error naming the file."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise WorkbenchError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def validate(model: type[_Model], data: dict[str, Any], source: str) -> _Model:
    """`model` validated from `data`; problems are one `WorkbenchError` line starting with `source`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise WorkbenchError(f"{source}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """A pydantic error as `field: problem (got value)`, its problems joined on one line."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        if not field:  # a check across fields (a config's model_validator): its message names the fields
            problems.append(error["msg"].removeprefix("Value error, "))
        elif error["type"] == "extra_forbidden":
            problems.append(f"{field}: unknown key")
        else:
            value = error.get("input")
            got = f" (got {value!r})" if isinstance(value, str | int | float) and error["type"] != "missing" else ""
            problems.append(f"{field}: {error['msg'].removeprefix('Value error, ')}{got}")
    return "; ".join(problems)
