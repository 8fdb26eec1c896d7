"""Run configuration: the keys every stage shares, and loading YAML with `key.sub=value` overrides.

Each stage's own settings live beside its runner (`pipelines/<family>/config.py`), and `workbench.stages`
names the class for each `stage:` value; the sub-configs every stage shares (`train`, `snapshot`, `tracking`,
`policies`) are defined once here. Every field is documented, in the manner of TRL's `*Config` dataclasses.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator

from workbench.errors import WorkbenchError
from workbench.geometry import ONLINE_DEFAULT, Feature
from workbench.policies.rules import load_rules
from workbench.schema import Strict, read_yaml_mapping, validate
from workbench.stages import stage_config_class, stage_names


class TrainConfig(Strict):
    max_steps: int = Field(3000, gt=0, description="Optimizer steps to run.")
    eval_every: int = Field(10, gt=0, description="Evaluate and log train/eval metrics every N steps.")


class SnapshotConfig(Strict):
    enabled: bool = Field(True, description="Snapshot hidden states and log online geometry.")
    every: int = Field(50, gt=0, description="Snapshot the probe set every N steps (and at step 0).")
    keep: str = Field(
        "all",
        description="Which snapshot files the run stores (the geometry of every snapshot is logged either way): "
        "'all'; 'log': snapshot number k = step / every when k is 0 or a power of 2 (0, 1, 2, 4, 8, ... x every), "
        "so S snapshots store at most log2(S) + 2 files; 'every:N': steps that are multiples of N, itself a "
        "multiple of `every`. Decided when each snapshot is taken, so nothing stored is ever deleted.",
    )
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
    probe_batch_size: int = Field(
        256, gt=0, description="Probes per forward pass of a snapshot: bounds the memory of all layers' states."
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="Stored precision of snapshots.")
    geometry: list[Feature] = Field(
        list(ONLINE_DEFAULT),
        description="Online geometry logged as geom/<feature>/layer_<i> (workbench/geometry.py lists them); "
        "heavy ones (lid_local, tda) cost seconds per snapshot and are better left to `workbench analyze`.",
    )
    max_overhead: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Largest share of the run's training time its snapshots (probe forward, writing, online "
        "geometry) may take: a due snapshot that would take them over it, costed as the latest, is skipped (the "
        "first is always taken), with an alert (event/snapshot_skipped) the first time; the share is logged as "
        "snapshot/overhead. Empty: every due snapshot is taken.",
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

    def layers_missing_from(self, hidden_states: int) -> list[int]:
        """The requested `layers` a model with `hidden_states` of them (embeddings, then one per block) lacks."""
        return [] if self.layers == "all" else [i for i in self.layers if not -hidden_states <= i < hidden_states]

    @field_validator("keep")
    @classmethod
    def _valid_keep(cls, value: str, info: ValidationInfo) -> str:
        every = info.data.get("every", 1)  # absent when `every` itself is invalid: that error is reported
        rule, _, n = value.partition(":")
        if value in ("all", "log") or (rule == "every" and n.isdigit() and int(n) > 0 and int(n) % every == 0):
            return value
        raise ValueError(f"expected all, log or every:N with N a positive multiple of snapshot.every ({every})")


def check_built_model_layers(snapshot: SnapshotConfig, num_layers: int) -> None:
    """`snapshot.layers` against a model the stage builds from its config, checked before any run is created: a run
    that could only fail at its first snapshot would be left FAILED and empty in the user's store."""
    if missing := snapshot.layers_missing_from(num_layers + 1):
        raise ValueError(
            f"snapshot.layers: {missing} out of range for the model built with model.num_layers={num_layers}: "
            f"layers 0..{num_layers} (0 = embeddings, -1 = last)"
        )


class TrackingConfig(Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here."
    )
    experiment: str = Field("workbench", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name (MLflow picks one when empty).")
    flush_seconds: float = Field(5.0, gt=0, description="Send buffered metrics at least this often.")


class StageConfig(Strict):
    """Keys every stage accepts: the public interface of a config file."""

    stage: str
    seed: int = Field(0, description="Seeds data split, model init and probe choice.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
    train: TrainConfig = TrainConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    tracking: TrackingConfig = TrackingConfig()
    policies: list[dict[str, Any]] | str = Field(
        [],
        description="Early-stop policy rules, or a path to a YAML file of them, relative to the config file "
        "(docs/policies.md).",
    )

    @field_validator("policies")
    @classmethod
    def _valid_rules(cls, value: list[dict[str, Any]] | str) -> list[dict[str, Any]] | str:
        # Inline rules are checked with the file; a path is read by `workbench run`, which knows the config's folder.
        if isinstance(value, list):
            try:
                load_rules(value)
            except WorkbenchError as exc:
                raise ValueError(str(exc)) from None
        return value


class CallbackSnapshotConfig(SnapshotConfig):
    """Snapshots in someone's own trainer. Its probes are eval rows at their full length through a model of any
    size, and a snapshot's forward pass costs about probes / batch size training forwards, and online geometry
    grows with the square of the points, so fewer probes and points than the built-in stages use: +2.9 % of a
    30 ms SFT step at `every: 50`, against +7.6 % with the stage defaults (benchmarks/results/README.md)."""

    probes: int = Field(256, gt=0, description="Size of the fixed probe set, sampled from the eval dataset.")
    max_points: int = Field(1024, gt=0, description="Cap on points per snapshot (token pooling).")
    max_overhead: float | None = Field(
        0.05,
        gt=0,
        le=1,
        description="Largest share of the run's training time its snapshots may take; a due snapshot that would go "
        "over is skipped (as in the stage configs; empty: every due snapshot is taken). On a real model the probe "
        "forward costs several training steps, so the callback keeps within 5 % by default.",
    )
    keep: str = Field(
        "log",
        description="Which snapshot files the run stores, as in the stage configs (all, log, every:N); 'log' bounds "
        "a long run on a real model: 10 000 steps every 50 store 9 snapshots, 0 ... 6 400 (~330 MB at 30 layers x "
        "576, 1 024 points, float16) where 'all' stores 201 (~7.4 GB).",
    )


class CallbackConfig(Strict):
    """`WorkbenchCallback.from_config`: the keys a stage config has for snapshots, tracking and policies."""

    seed: int = Field(0, description="Seeds the probe choice.")
    snapshot: CallbackSnapshotConfig = CallbackSnapshotConfig()
    tracking: TrackingConfig = TrackingConfig()
    policies: list[dict[str, Any]] | str = Field([], description="Early-stop policy rules, or a path to a YAML file.")
    strict: bool = Field(
        False,
        description="Raise an error in the callback's own work (probes, snapshots, policies, logging) and so end "
        "training; by default it becomes one alert, that part of the callback stops and training goes on.",
    )


def load_callback_config(source: str | Path | Mapping[str, Any]) -> CallbackConfig:
    """A callback config from a YAML file or a dict; errors name the file (or 'callback config') and field."""
    if isinstance(source, Mapping):
        return validate(CallbackConfig, dict(source), source="callback config")
    return validate(CallbackConfig, read_yaml_mapping(Path(source)), source=str(source))


# --- loading ----------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] = ()) -> StageConfig:
    """Read a YAML config, validate it, then apply `key.sub=value` overrides and validate again.

    Errors are `WorkbenchError`s on one line naming the file (or the override) and the field. The overrides are
    validated together, so their order does not matter where one key's check reads another (task.chat_template
    needs model.name_or_path); a config they leave invalid is reported at the first override after which it is.
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    stage = data.get("stage")
    if stage not in stage_names():
        raise WorkbenchError(f"{path}: stage: expected one of {sorted(stage_names())}, got {stage!r}")
    model = stage_config_class(stage)
    config = validate(model, data, source=str(path))
    if not overrides:
        return config
    overridden = copy.deepcopy(data)
    for override in overrides:
        _apply_override(overridden, override)
    try:
        return validate(model, overridden, source="overrides")
    except WorkbenchError:
        for override in overrides:  # the last one at the latest leaves the config as it failed above
            _apply_override(data, override)
            validate(model, data, source=f"override '{override}'")
        raise


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
        value = yaml.safe_load(raw)  # typed like YAML: 3 -> int, 0.5 -> float, [1, 2] -> list
    except yaml.YAMLError:
        value = raw
    # Block syntax is not what a command line means: `task.op=-` is the string "-", not a list [None].
    if isinstance(value, list | dict) and not raw.lstrip().startswith(("[", "{")):
        value = raw
    node[leaf] = value


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
