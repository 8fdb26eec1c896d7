"""Hidden-state snapshots: the fixed probe set, pooling, and the safetensors writer and reader.

Format: run artifacts `snapshots/step_{step:08d}.safetensors`, one tensor per kept layer
(`layer_00` = embeddings output ... `layer_L`), shape [points, hidden], plus `snapshots/index.json`
(probe ids, pooling, dtype, layers, hidden size, which (probe, position) each point is, the list of stored
steps, and `dropped`: steps snapshotted and measured whose file `snapshot.keep` did not store).
Nothing is pickled; the reader checks every file against the index.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import torch

    from workbench.tracking import Tracker

SNAPSHOT_DIR = "snapshots"
INDEX_FILE = "index.json"
FORMAT_VERSION = 1


def snapshot_file(step: int) -> str:
    return f"step_{step:08d}.safetensors"


def layer_name(layer: int) -> str:
    return f"layer_{layer:02d}"


def choose_probe_ids(held_out_ids: Any, n_probes: int, seed: int) -> list[int]:
    """A fixed, seeded sample of held-out example ids; chosen once per run and logged in the index."""
    ids = np.asarray(held_out_ids)
    if len(ids) <= n_probes:
        return sorted(int(i) for i in ids)
    chosen = np.random.default_rng(seed).choice(ids, size=n_probes, replace=False)
    return sorted(int(i) for i in chosen)


@dataclass(frozen=True)
class ProbeSet:
    """Fixed held-out inputs run through the model at every snapshot.

    `answer_positions[i]` is the position whose output predicts probe i's answer (for `answer` pooling);
    `labels` are the probes' answers, kept in the index so plots can colour points by them.
    """

    ids: list[int]
    input_ids: torch.Tensor  # [n, T]
    attention_mask: torch.Tensor  # [n, T], 1 = real token
    answer_positions: torch.Tensor | None = None  # [n]
    labels: list[int] | None = None

    def to(self, device: str) -> ProbeSet:
        move = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device)}
        positions = None if self.answer_positions is None else self.answer_positions.to(device)
        return ProbeSet(self.ids, answer_positions=positions, labels=self.labels, **move)


class Pooler:
    """Turns one layer's hidden states [n, T, H] into points [points, H] the same way at every snapshot."""

    def __init__(self, probe: ProbeSet, pooling: str, max_points: int, seed: int) -> None:
        import torch

        self.pooling = pooling
        mask = probe.attention_mask.bool()
        rows = torch.arange(mask.shape[0], device=mask.device)
        if pooling == "token":
            probe_row, position = mask.nonzero(as_tuple=True)
            if len(probe_row) > max_points:  # a fixed subsample, so every snapshot holds the same points
                keep = torch.randperm(len(probe_row), generator=torch.Generator().manual_seed(seed))[:max_points]
                keep = keep.sort().values.to(mask.device)
                probe_row, position = probe_row[keep], position[keep]
        elif pooling == "answer":
            if probe.answer_positions is None:
                raise WorkbenchError("snapshot.pooling: 'answer' needs a stage whose probes mark the answer position")
            probe_row, position = rows, probe.answer_positions
        elif pooling == "last":
            # Last real token, whichever side the padding is on.
            position = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
            probe_row = rows
        else:  # mean
            probe_row, position = rows, torch.full_like(rows, -1)
        self.probe_row, self.position, self.mask = probe_row, position, mask

    def __call__(self, hidden: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """The points of probes `first_row ... first_row + len(hidden) - 1` (a batch of the probe set), in the
        order they have in the whole snapshot, so batches concatenate to the same points."""
        rows = slice(first_row, first_row + len(hidden))
        if self.pooling == "mean":
            weights = self.mask[rows].unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        here = (self.probe_row >= rows.start) & (self.probe_row < rows.stop)
        return hidden[self.probe_row[here] - first_row, self.position[here]]

    def points(self, probe: ProbeSet) -> list[list[int]]:
        """(probe id, position) of each point; position -1 for mean pooling."""
        return [[probe.ids[r], p] for r, p in zip(self.probe_row.tolist(), self.position.tolist(), strict=True)]


def kept(keep: str, every: int, step: int) -> bool:
    """Whether retention `keep` (`snapshot.keep`) stores the snapshot of `step`, a multiple of `every`.

    Decided from the step alone when the snapshot is taken, so a stored file is never deleted: not every
    MLflow artifact store can delete, and a reader of a live or crashed run sees exactly the stored steps.
    """
    if keep == "all":
        return True
    if keep == "log":
        k = step // every
        return (k & (k - 1)) == 0  # k is 0 or a power of 2
    return step % int(keep.removeprefix("every:")) == 0


class SnapshotWriter:
    """Writes one safetensors file per snapshot step that `keep` stores and keeps `index.json` current, as run
    artifacts."""

    def __init__(self, tracker: Tracker, index: dict[str, Any], keep: str = "all", every: int = 1) -> None:
        self.tracker = tracker
        self.keep, self.every = keep, every
        self.index = {"format_version": FORMAT_VERSION, **index, "keep": keep, "steps": [], "dropped": []}

    def write(self, step: int, layers: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not kept(self.keep, self.every, step):
            self.index["dropped"].append(step)
        else:
            dtype = torch_dtype(self.index["dtype"])
            with tempfile.TemporaryDirectory(prefix="workbench-snapshot-") as tmp:
                path = Path(tmp) / snapshot_file(step)
                save_file({name: t.detach().to("cpu", dtype).contiguous() for name, t in layers.items()}, str(path))
                self.tracker.log_artifact(path, SNAPSHOT_DIR)
            self.index["steps"].append(step)
        # The index is rewritten after each file so a reader of a live or crashed run sees a consistent set.
        self.tracker.log_text(json.dumps(self.index), f"{SNAPSHOT_DIR}/{INDEX_FILE}")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float16": torch.float16, "float32": torch.float32}[name]


# --- reading back -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshots:
    """A run's snapshots: `layers[name]` is [len(steps), points, hidden], rows in `steps` order."""

    steps: list[int]
    layers: dict[str, np.ndarray]
    index: dict[str, Any]


_INDEX_KEYS = ("format_version", "steps", "layers", "pooling", "dtype", "hidden_size", "probe_ids", "points")


def load_snapshots(run_id: str, tracking_uri: str | None = None) -> Snapshots:
    """Download a run's snapshots from any tracking store and load them, checked against the index."""
    from workbench.tracking import open_store

    client, uri = open_store(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="workbench-load-") as tmp, _no_download_bar():  # read into memory
        try:
            local = client.download_artifacts(run_id, SNAPSHOT_DIR, tmp)
        except Exception as exc:  # MLflow raises several types for a missing run or artifact
            reason = str(exc).splitlines()[0]
            raise WorkbenchError(f"run {run_id}: no snapshots found in {uri} ({reason})") from None
        try:
            return read_snapshot_dir(local)
        except WorkbenchError as exc:  # name the run's artifact, not its temporary copy
            raise WorkbenchError(str(exc).replace(tmp, f"run {run_id}: artifacts", 1)) from None


@contextmanager
def _no_download_bar() -> Iterator[None]:
    """MLflow's per-file download progress bar off: snapshots are many small files, and callers show their own."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[key]
        else:
            os.environ[key] = previous


def _check_index(index: Any, index_path: Path) -> None:
    """Every field the reader uses has the type it expects. Steps are integers, so the files they name
    (`step_{step:08d}.safetensors`) are always inside the snapshot folder, whatever the index holds."""
    missing = [key for key in _INDEX_KEYS if key not in index] if isinstance(index, dict) else list(_INDEX_KEYS)
    if missing:
        raise WorkbenchError(f"{index_path}: snapshot index lacks {', '.join(missing)}")
    if index["format_version"] != FORMAT_VERSION:
        raise WorkbenchError(f"{index_path}: format_version {index['format_version']!r}, expected {FORMAT_VERSION}")

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    checks = {  # field: (as expected, what is expected)
        "steps": (isinstance(index["steps"], list) and all(map(count, index["steps"])), "a list of steps >= 0"),
        "layers": (
            isinstance(index["layers"], list) and all(isinstance(n, str) for n in index["layers"]),
            "a list of layer names",
        ),
        "dtype": (index["dtype"] in ("float16", "float32"), "float16 or float32"),
        "hidden_size": (count(index["hidden_size"]), "an integer >= 0"),
        "points": (isinstance(index["points"], list), "a list"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise WorkbenchError(f"{index_path}: {key}: expected {expected}, got {str(index[key])[:80]!r}")


def read_snapshot_dir(directory: str | Path) -> Snapshots:
    """Load `index.json` and every step file in `directory`, rejecting anything that does not match."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    index_path = directory / INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise WorkbenchError(f"{index_path}: snapshot index is missing") from None
    except (ValueError, OSError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
        raise WorkbenchError(f"{index_path}: unreadable snapshot index: {exc}") from None
    _check_index(index, index_path)

    expected_shape = (len(index["points"]), index["hidden_size"])
    expected_dtype = np.dtype(index["dtype"])
    per_layer: dict[str, list[np.ndarray]] = {name: [] for name in index["layers"]}
    for step in index["steps"]:
        path = directory / snapshot_file(step)
        try:
            tensors = load_file(str(path))
        except FileNotFoundError:
            raise WorkbenchError(f"{path}: listed in the index but missing") from None
        except (SafetensorError, OSError, TypeError) as exc:  # TypeError: a dtype numpy lacks, e.g. bfloat16
            raise WorkbenchError(f"{path}: corrupt snapshot file ({exc})") from None
        if sorted(tensors) != sorted(per_layer):
            raise WorkbenchError(f"{path}: holds {sorted(tensors)}, index lists {sorted(per_layer)}")
        for name, array in tensors.items():
            if array.shape != expected_shape or array.dtype != expected_dtype:
                raise WorkbenchError(
                    f"{path}: {name} is {array.dtype}{list(array.shape)}, "
                    f"index says {expected_dtype}{list(expected_shape)}"
                )
            per_layer[name].append(array)
    layers = {
        name: np.stack(arrays) if arrays else np.empty((0, *expected_shape), expected_dtype)
        for name, arrays in per_layer.items()
    }
    return Snapshots(steps=list(index["steps"]), layers=layers, index=index)
