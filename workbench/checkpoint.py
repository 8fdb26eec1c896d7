"""Training-state checkpoints a run can be resumed from, stored as run artifacts without pickle.

A checkpoint at step s holds everything the loop needs to take update s+1 exactly as an uninterrupted run
would: model weights, optimizer and LR-scheduler state, the RNG states, the step, and the identity of the
data (split and order) it was trained on. Layout, under the run's artifacts:

    resume/step_{s:08d}/model.safetensors      weights (`safetensors.torch.save_model`: tied weights stored once)
    resume/step_{s:08d}/optimizer.safetensors  every tensor of the optimizer state
    resume/step_{s:08d}/state.json             step, optimizer skeleton, scheduler, RNG, data identity, extra
    resume/latest.json                         {"step": s}: written last, so a crash mid-save leaves the
                                               previous checkpoint in force

Only the latest periodic checkpoint is kept (older ones are deleted where the artifact store can delete;
the policies' own model checkpoints under `checkpoints/` are separate and all kept). Tensors go to
safetensors and everything else to JSON, so loading a checkpoint never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from collections.abc import Callable

    from workbench.tracking import Tracker

RESUME_DIR = "resume"
LATEST_FILE = "latest.json"
FORMAT_VERSION = 1


def step_dir(step: int) -> str:
    return f"{RESUME_DIR}/step_{step:08d}"


def data_identity(*index_tensors: torch.Tensor) -> str:
    """A digest of the example ids (in order) a run trains and evaluates on: a resume on other data is refused."""
    digest = hashlib.sha256()
    for ids in index_tensors:
        digest.update(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


# --- nested state <-> (tensors, JSON) ----------------------------------------------------------------


def _split(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A nested state dict as JSON, each tensor replaced by {"tensor": name} and stored in `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().to("cpu").contiguous()
        return {"tensor": prefix}
    if isinstance(value, dict):
        return {"dict": [[_key(k), _split(v, f"{prefix}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return {"list": [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(f"cannot store {type(value).__name__} at {prefix} in a checkpoint")


def _key(key: Any) -> list:
    """Dict keys keep their type (the optimizer's per-parameter state is keyed by int)."""
    return ["int", key] if isinstance(key, int) else ["str", str(key)]


def _join(node: dict, tensors: dict[str, torch.Tensor], device: str | torch.device) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]].to(device)
    if "dict" in node:
        return {(int(k) if kind == "int" else k): _join(v, tensors, device) for (kind, k), v in node["dict"]}
    if "list" in node:
        return [_join(v, tensors, device) for v in node["list"]]
    return node["value"]


# --- RNG ---------------------------------------------------------------------------------------------


def _rng_state(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, python_state, next_gauss = random.getstate()
    numpy_state = [kind, int(pos), int(has_gauss), float(gauss)]
    return {"numpy": numpy_state, "python": [version, list(python_state), next_gauss]}


def _set_rng_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, python_state, next_gauss = state["python"]
    random.setstate((version, tuple(python_state), next_gauss))


# --- saving --------------------------------------------------------------------------------------------


def save_training_state(
    tracker: Tracker,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_id: str,
    extra: dict[str, Any] | None = None,
    previous: int | None = None,
) -> None:
    """Log the training state at `step` as `resume/step_XXXXXXXX`, point `resume/latest.json` at it, then delete
    the checkpoint at step `previous` (the one it replaces)."""
    from safetensors.torch import save_file, save_model

    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "data_identity": data_id,
        "optimizer": _split(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": _split(scheduler.state_dict(), "scheduler", tensors),
        "rng": _rng_state(tensors),
        "extra": extra or {},
    }
    with tempfile.TemporaryDirectory(prefix="workbench-checkpoint-") as tmp:
        save_model(model, str(Path(tmp) / "model.safetensors"))
        save_file(tensors, str(Path(tmp) / "optimizer.safetensors"))
        (Path(tmp) / "state.json").write_text(json.dumps(state))
        for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
            tracker.log_artifact(Path(tmp) / name, step_dir(step))
    tracker.log_text(json.dumps({"step": step}), f"{RESUME_DIR}/{LATEST_FILE}")
    if previous is not None and previous != step:
        _delete_artifacts(tracker.client, tracker.run_id, step_dir(previous))


def _delete_artifacts(client: Any, run_id: str, path: str) -> None:
    """Delete a run's artifact folder where the store can (local, S3, MLflow's artifact proxy); else keep it."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
    try:
        repo.delete_artifacts(path)
    except NotImplementedError:
        pass  # e.g. a plain HTTP store: the old checkpoint stays, latest.json still names the newest


# --- loading ---------------------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """A checkpoint read back from a run: `restore` puts it into a freshly built model, optimizer and scheduler."""

    run_id: str
    step: int
    data_identity: str
    extra: dict[str, Any]
    _state: dict[str, Any]
    _tensors: dict[str, torch.Tensor]
    _model_file: Path

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, data_id: str) -> None:
        from safetensors.torch import load_model

        if data_id != self.data_identity:
            raise WorkbenchError(
                f"run {self.run_id}: checkpoint at step {self.step} was trained on other data "
                f"(identity {self.data_identity}, now {data_id}); config.yaml and checkpoint disagree"
            )
        device = next(model.parameters()).device
        missing, unexpected = load_model(model, str(self._model_file), strict=False, device=str(device))
        if missing or unexpected:
            raise WorkbenchError(
                f"run {self.run_id}: {step_dir(self.step)}/model.safetensors does not fit the model "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        optimizer.load_state_dict(_join(self._state["optimizer"], self._tensors, device))
        scheduler.load_state_dict(_join(self._state["scheduler"], self._tensors, "cpu"))
        _set_rng_state(self._state["rng"], self._tensors)


def load_training_state(client: Any, run_id: str, into: str | Path) -> TrainingState:
    """The latest checkpoint of a run, downloaded into the folder `into`; a run without one is a user error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    into = Path(into)
    try:
        latest = client.download_artifacts(run_id, f"{RESUME_DIR}/{LATEST_FILE}", str(into))
        step = json.loads(Path(latest).read_text())["step"]
    except Exception:  # MLflow raises several types for a missing artifact
        raise WorkbenchError(f"run {run_id}: has no checkpoint to resume from ({RESUME_DIR}/{LATEST_FILE})") from None
    if not isinstance(step, int) or step < 0:
        raise WorkbenchError(f"run {run_id}: {RESUME_DIR}/{LATEST_FILE}: step must be an int >= 0, got {step!r}")
    where = f"run {run_id}: {step_dir(step)}"
    try:
        local = Path(client.download_artifacts(run_id, step_dir(step), str(into)))
    except Exception:
        raise WorkbenchError(f"{where}: named by {LATEST_FILE} but missing") from None
    local = _inside(local, into, where)
    try:
        state = json.loads((local / "state.json").read_text())
        tensors = load_file(str(local / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise WorkbenchError(f"{where}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or state.get("step") != step:
        raise WorkbenchError(f"{where}/state.json: expected format_version {FORMAT_VERSION} and step {step}")
    return TrainingState(
        run_id=run_id,
        step=step,
        data_identity=state["data_identity"],
        extra=state.get("extra", {}),
        _state=state,
        _tensors=tensors,
        _model_file=local / "model.safetensors",
    )


def _inside(path: Path, root: Path, where: str) -> Path:
    """Artifact paths come from the store: a folder that resolves outside the download root is refused."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise WorkbenchError(f"{where}: resolves outside the download folder")
    return resolved


class PeriodicCheckpoints:
    """A training loop's side of checkpointing: restore at the start, save every `every` steps, keep the latest.

    `extra()` adds the loop's own state (JSON) to each checkpoint; it comes back as `TrainingState.extra`.
    """

    def __init__(
        self,
        tracker: Tracker,
        every: int,
        data_id: str,
        resume: TrainingState | None = None,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.tracker = tracker
        self.every = every
        self.data_id = data_id
        self.resume = resume
        self.extra = extra
        self.latest = resume.step if resume is not None else None

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
        """Load the checkpoint being resumed from (if any) into the loop's objects; the step to start at."""
        if self.resume is None:
            return 0
        self.resume.restore(model, optimizer, scheduler, self.data_id)
        return self.resume.step

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step != self.latest

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        # Flush first: a resume starts at `step` and recomputes nothing before it, so every value logged before
        # `step` must already be in the store.
        self.tracker.flush()
        extra = self.extra() if self.extra is not None else {}
        save_training_state(self.tracker, step, model, optimizer, scheduler, self.data_id, extra, self.latest)
        self.latest = step
