"""Where a run keeps its models: the final model under `model/`, a policy's `checkpoint` action under
`checkpoints/step_XXXXXXXX/` (as `snapshots.snapshot_file` names snapshots). Every stage writes them here.

These are models to load (`from_pretrained`, or a later stage's `model.name_or_path=runs:/<id>/model`); the
training state `workbench resume` continues from is separate (`resume/`, workbench/checkpoint.py).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.tracking import Tracker

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT = re.compile(rf"{CHECKPOINTS_DIR}/step_(\d{{8}})")


def model_checkpoint_path(step: int) -> str:
    """The artifact folder of the model checkpoint taken at `step`."""
    return f"{CHECKPOINTS_DIR}/step_{step:08d}"


def checkpoint_steps(client: Any, run_id: str) -> list[int]:
    """The steps a run's model checkpoints were taken at, ascending."""
    found = (_CHECKPOINT.fullmatch(a.path) for a in client.list_artifacts(run_id, CHECKPOINTS_DIR) if a.is_dir)
    return sorted(int(m.group(1)) for m in found if m)


def log_tree(tracker: Tracker, root: Path, artifact_path: str) -> str:
    """Every file under the local folder `root` (subfolders kept) as the run's artifacts under `artifact_path`;
    returns their `runs:/` URI."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        folder = path.parent.relative_to(root).as_posix()
        tracker.log_artifact(path, artifact_path if folder == "." else f"{artifact_path}/{folder}")
    return f"runs:/{tracker.run_id}/{artifact_path}"


def log_folder(tracker: Tracker, artifact_path: str, write: Callable[[Path], Any]) -> str:
    """Call `write(folder)` on a temporary folder and keep what it wrote as the run's artifacts under
    `artifact_path` (`log_tree`); returns their `runs:/` URI."""
    with tempfile.TemporaryDirectory(prefix="workbench-artifacts-") as tmp:
        write(Path(tmp))
        return log_tree(tracker, Path(tmp), artifact_path)


def log_pretrained(tracker: Tracker, artifact_path: str, *parts: Any) -> str:
    """`save_pretrained` of each part (a model, its tokenizer) into one artifact folder, loadable with
    `from_pretrained`; returns its `runs:/` URI."""
    return log_folder(tracker, artifact_path, lambda folder: [part.save_pretrained(folder) for part in parts])
