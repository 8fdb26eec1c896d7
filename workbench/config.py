"""Run configuration: YAML files validated by pydantic, with `key.sub=value` overrides.

One pydantic model per stage, registered by its `stage:` name in `STAGE_CONFIGS`; the sub-configs every
stage shares (`train`, `snapshot`, `tracking`, `policies`) are defined once here. Every field is
documented, in the manner of TRL's `*Config` dataclasses.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workbench.errors import WorkbenchError
from workbench.geometry import ONLINE_DEFAULT, Feature


class _Strict(BaseModel):
    # A typo'd key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Strict):
    max_steps: int = Field(3000, gt=0, description="Optimizer steps to run.")
    eval_every: int = Field(10, gt=0, description="Evaluate and log train/eval metrics every N steps.")


class SnapshotConfig(_Strict):
    enabled: bool = Field(True, description="Snapshot hidden states and log online geometry.")
    every: int = Field(50, gt=0, description="Snapshot the probe set every N steps (and at step 0).")
    layers: Literal["all"] | list[int] = Field(
        "all", description="Hidden-state layers to keep: 'all' or indices (0 = embeddings, -1 = last)."
    )
    pooling: Literal["token", "last", "mean", "answer"] = Field(
        "token",
        description="token: every non-pad token (subsampled to max_points); last: last token; "
        "mean: mean over tokens; answer: the position that predicts the answer.",
    )
    max_points: int = Field(4096, gt=0, description="Cap on points per snapshot (token pooling).")
    probes: int = Field(1024, gt=0, description="Size of the fixed held-out probe set.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Stored precision of snapshots.")
    geometry: list[Feature] = Field(
        list(ONLINE_DEFAULT),
        description="Online geometry logged as geom/<feature>/layer_<i> (workbench/geometry.py lists them); "
        "heavy ones (lid_local, tda) cost seconds per snapshot and are better left to `workbench analyze`.",
    )
    geometry_budget_s: float = Field(
        1.0,
        gt=0,
        description="Online geometry time per snapshot; when a snapshot takes longer, its costliest features "
        "move offline for the rest of the run (compute them with `workbench analyze`).",
    )
    mle_neighbors: int = Field(20, gt=1, description="k of the Levina-Bickel MLE estimator.")
    local_neighbors: int = Field(64, gt=2, description="Neighbourhood size of the pointwise (local) LID.")
    tda_landmarks: int = Field(500, gt=1, description="Max-min landmarks persistent homology is computed on.")


class TrackingConfig(_Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here."
    )
    experiment: str = Field("workbench", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name (MLflow picks one when empty).")
    flush_seconds: float = Field(5.0, gt=0, description="Send buffered metrics at least this often.")


class StageConfig(_Strict):
    """Keys every stage accepts (DESIGN.md, public interface)."""

    stage: str
    seed: int = Field(0, description="Seeds data split, model init and probe choice.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
    train: TrainConfig = TrainConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    tracking: TrackingConfig = TrackingConfig()
    policies: list[dict[str, Any]] | str = Field(
        [], description="Early-stop policy rules, or a path to a YAML file of them."
    )

    @field_validator("policies")
    @classmethod
    def _no_policy_engine_yet(cls, value: list[dict[str, Any]] | str) -> list[dict[str, Any]] | str:
        # Accepting rules we would not evaluate would let a user believe a run is guarded when it is not.
        if value:
            raise ValueError("the policy engine is not available in this version; remove 'policies'")
        return value


# --- the grokking stage -------------------------------------------------------------------------------


class TaskConfig(_Strict):
    op: Literal["+", "-", "*", "/", "x^2+xy+y^2"] = Field("+", description="The binary operation a∘b mod p.")
    p: int = Field(97, ge=2, description="The modulus.")
    train_fraction: float = Field(0.4, gt=0, lt=1, description="Fraction of all (a, b) pairs trained on.")

    @model_validator(mode="after")
    def _division_needs_a_field(self) -> TaskConfig:
        if self.op == "/" and not _is_prime(self.p):
            raise ValueError(f"p={self.p} is not prime, but op '/' needs every b != 0 to have an inverse")
        return self


class GrokkingModelConfig(_Strict):
    arch: Literal["llama", "gpt2"] = Field("llama", description="transformers architecture built from config.")
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(512, gt=0, description="Width of the MLP block.")
    num_layers: int = Field(1, gt=0)
    num_heads: int = Field(4, gt=0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GrokkingModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1.0, ge=0, description="AdamW (decoupled) weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warm-up.")


class GrokkingConfig(StageConfig):
    stage: Literal["grokking"] = "grokking"
    task: TaskConfig = TaskConfig()
    model: GrokkingModelConfig = GrokkingModelConfig()
    optim: OptimConfig = OptimConfig()


STAGE_CONFIGS: dict[str, type[StageConfig]] = {"grokking": GrokkingConfig}


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


# --- loading ----------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] = ()) -> StageConfig:
    """Read a YAML config, validate it, then apply `key.sub=value` overrides and validate again.

    Errors are `WorkbenchError`s on one line naming the file (or the override) and the field.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise WorkbenchError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{path}: cannot read config: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise WorkbenchError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    stage = data.get("stage")
    if stage not in STAGE_CONFIGS:
        raise WorkbenchError(f"{path}: stage: expected one of {sorted(STAGE_CONFIGS)}, got {stage!r}")
    model = STAGE_CONFIGS[stage]
    config = _validate(model, data, source=str(path))
    for override in overrides:
        _apply_override(data, override)
        config = _validate(model, data, source=f"override '{override}'")
    return config


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise WorkbenchError(f"override '{override}': expected key.sub=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise WorkbenchError(f"override '{override}': {part} is not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw)  # typed like YAML: 3 -> int, 0.5 -> float, [1, 2] -> list
    except yaml.YAMLError:
        node[leaf] = raw


def _validate(model: type[StageConfig], data: dict[str, Any], source: str) -> StageConfig:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise WorkbenchError(f"{source}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(f"{field}: unknown key")
        else:
            value = error.get("input")
            got = f" (got {value!r})" if isinstance(value, str | int | float) and error["type"] != "missing" else ""
            problems.append(f"{field}: {error['msg'].removeprefix('Value error, ')}{got}")
    return "; ".join(problems)


def flatten(config: StageConfig) -> dict[str, str]:
    """The resolved config as flat MLflow params: {'task.p': '97', ...}."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list | dict) else str(value)

    walk("", config.model_dump(mode="json"))
    return flat


def config_hash(config: StageConfig) -> str:
    """Short content hash of the resolved config: equal hashes, equal settings."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def to_yaml(config: StageConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
