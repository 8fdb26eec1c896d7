"""Instrumentation any training loop can call: probe snapshots and online geometry every N steps.

`Instrument(snapshot_config, probe_set, tracker)` knows nothing about the stage; called as
`instrument(model, step)` with a model that accepts `output_hidden_states=True` (any `transformers` model), it
snapshots the probe set and logs geometry when `due(step)`.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from workbench import tags
from workbench.config import SnapshotConfig
from workbench.errors import WorkbenchError
from workbench.geometry import compute_geometry
from workbench.policies import log_alert
from workbench.snapshots import Pooler, ProbeSet, SnapshotWriter, layer_name, torch_dtype

if TYPE_CHECKING:
    import torch

    from workbench.tracking import Tracker

T = TypeVar("T")


class Instrument:
    """Every `config.every` steps (and at step 0): run the probes, write a snapshot, log geometry. With
    `config.max_overhead`, a due snapshot is skipped when it would take the run's snapshots over that share of its
    training time."""

    def __init__(self, config: SnapshotConfig, probe: ProbeSet, tracker: Tracker, seed: int = 0) -> None:
        self.config = config
        self.probe = probe
        self.tracker = tracker
        self.pooler = Pooler(probe, config.pooling, config.max_points, seed)
        self.writer: SnapshotWriter | None = None  # created at the first snapshot, when the layer count is known
        self.layers: list[int] = []
        self.online = list(config.geometry)  # shrinks if a snapshot's geometry overruns its time budget
        # `max_overhead` bookkeeping, in seconds of this process: when its first snapshot began, all its snapshots
        # together, and the latest alone (the estimate of the next one's cost).
        self._first_start: float | None = None
        self._spent = self._latest = 0.0
        self._said_skip = False
        self._decided: tuple[int, bool] | None = None  # (step, due): `due`'s answer for the step asked last
        self._warned: set[str] = set()  # problems already reported, so each is said once per run
        self._earlier: dict[str, list[int]] = {"steps": [], "dropped": []}  # a resumed run's snapshots before it

    def state(self) -> dict[str, Any]:
        """What a training-state checkpoint keeps of the instrument (JSON): snapshot steps stored and dropped,
        online features."""
        steps = self.writer.index if self.writer is not None else self._earlier
        return {
            "snapshot_steps": list(steps["steps"]),
            "dropped_steps": list(steps["dropped"]),
            "online_geometry": list(self.online),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's `state()`: the index keeps the earlier snapshots, geometry stays as it was."""
        # A checkpoint written before `snapshot.keep` existed stored every snapshot: none dropped.
        self._earlier = {"steps": list(state["snapshot_steps"]), "dropped": list(state.get("dropped_steps", []))}
        self.online = list(state["online_geometry"])

    def due(self, step: int) -> bool:
        """Whether a snapshot is (or was) due at `step`; decided once per step, so a caller may ask again after it."""
        if self._decided is None or self._decided[0] != step:
            self._decided = (step, self.config.enabled and step % self.config.every == 0 and self._fits(step))
        return self._decided[1]

    def __call__(self, model: Any, step: int) -> dict[str, float]:
        """Snapshot and geometry if due at `step`; returns the logged geometry metrics (else {})."""
        return self.take(model, step) if self.due(step) else {}

    def take(self, model: Any, step: int) -> dict[str, float]:
        """Snapshot and geometry at `step`, due or not: for a caller that decided already (`WorkbenchCallback`
        under FSDP, whose other ranks run the same forward passes once rank 0 has said so)."""
        start = time.perf_counter()
        states = self._pooled_states(model)
        if self.writer is None:
            self._start(states)
        # Geometry reads the states as stored (snapshot.dtype), so `workbench analyze` recomputes what was logged,
        # and copies of one state that float32 round-off set apart (a causal model's first position is one state
        # for every probe starting with that token, computed in batches of other shapes) stay the duplicates
        # they are instead of near-duplicates, which drive TwoNN towards 0.
        kept = {layer_name(i): states[i].to(torch_dtype(self.config.dtype)) for i in self.layers}
        self.writer.write(step, kept)
        metrics: dict[str, float] = {}
        seconds: Counter[str] = Counter()
        for name, points in kept.items():
            values, cost = self._geometry(name, points.float())
            metrics.update({f"geom/{metric}/{name}": value for metric, value in values.items()})
            seconds.update(cost)
        self._keep_within_budget(seconds)
        self.tracker.log_metrics(metrics | self._count(start), step)
        return metrics

    def _pooled_states(self, model: Any) -> list[torch.Tensor]:
        import torch

        def pool(hidden_states: tuple[torch.Tensor, ...], first: int) -> list[torch.Tensor]:
            return [self.pooler(hidden.float(), first) for hidden in hidden_states]

        # All layers' hidden states of a batch are held at once: `probe_batch_size` bounds them.
        batches = probe_forward(model, self.probe, self.config.probe_batch_size, pool)
        return [torch.cat(layer) for layer in zip(*batches, strict=True)]

    def _start(self, states: list[torch.Tensor]) -> None:
        n_layers = len(states)
        requested = range(n_layers) if self.config.layers == "all" else self.config.layers
        if bad := self.config.layers_missing_from(n_layers):  # a loaded model's depth is known only now
            raise WorkbenchError(f"snapshot.layers: {bad} out of range for a model with layers 0..{n_layers - 1}")
        self.layers = sorted({i % n_layers for i in requested})
        self.writer = SnapshotWriter(
            self.tracker,
            {
                "pooling": self.config.pooling,
                "dtype": self.config.dtype,
                "layers": [layer_name(i) for i in self.layers],
                "hidden_size": int(states[0].shape[-1]),
                "probe_ids": self.probe.ids,
                "probe_labels": self.probe.labels,
                "points": self.pooler.points(self.probe),
            },
            self.config.keep,
            self.config.every,
        )
        self.writer.index.update(self._earlier)

    def _geometry(self, layer: str, points: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
        config = self.config
        values, problems, seconds = compute_geometry(
            points, self.online, config.mle_neighbors, config.local_neighbors, config.tda_landmarks
        )
        for problem in problems:
            key = f"{layer}: {problem.split(':')[0]}"
            if key not in self._warned:  # e.g. an embedding layer of a tiny vocabulary, at every snapshot
                self._warned.add(key)
                warnings.warn(f"geometry of {layer} not logged: {problem}", stacklevel=3)
        return values, seconds

    def _count(self, start: float) -> dict[str, float]:
        """Adds the snapshot that began at `start` to the run's snapshot time; with `max_overhead`, returns the
        run's snapshot time over its training time since its first snapshot, as `snapshot/overhead`."""
        now = time.perf_counter()
        self._first_start = start if self._first_start is None else self._first_start
        self._latest = now - start
        self._spent += self._latest
        training = now - self._first_start - self._spent
        if self.config.max_overhead is None or training <= 0:
            return {}
        return {"snapshot/overhead": self._spent / training}

    def _fits(self, step: int) -> bool:
        """With `max_overhead` = b: the run's snapshots, the next one included (costed as the latest), must take at
        most b times the training time since its first snapshot (which is always taken: the starting point)."""
        budget = self.config.max_overhead
        if budget is None or self._first_start is None:
            return True
        training = time.perf_counter() - self._first_start - self._spent
        if self._spent + self._latest <= budget * training:
            return True
        if not self._said_skip:  # said once: later skips follow from the same costs
            self._said_skip = True
            message = (
                f"snapshot at step {step} skipped: the snapshots so far took {self._spent:.1f} s beside {training:.1f} "
                f"s of training, and another of {self._latest:.1f} s would take them over snapshot.max_overhead="
                f"{budget:g}; from here a due snapshot is taken when it fits (snapshot/overhead logs the share)"
            )
            log_alert(self.tracker, step, "snapshot_skipped", message)
            warnings.warn(message, stacklevel=3)
        return False

    def _keep_within_budget(self, seconds: Counter[str]) -> None:
        """Training must not wait on geometry: over budget, the costliest features go offline for good."""
        budget, total = self.config.geometry_budget_s, sum(seconds.values())
        moved = []
        for feature, cost in seconds.most_common():
            if total <= budget:
                break
            self.online.remove(feature)
            moved.append(feature)
            total -= cost
        if moved:
            offline = [f for f in self.config.geometry if f not in self.online]
            self.tracker.set_tags({tags.GEOMETRY_OFFLINE: ",".join(offline)})
            warnings.warn(
                f"online geometry took {sum(seconds.values()):.2f} s per snapshot, over snapshot.geometry_budget_s="
                f"{budget:g}; {', '.join(moved)} no longer computed online: "
                f"`workbench analyze {self.tracker.run_id} --features {','.join(offline)}` computes them from the "
                "snapshots",
                stacklevel=3,
            )


def probe_forward(
    model: Any,
    probe: ProbeSet,
    batch_size: int,
    pool: Callable[[tuple[torch.Tensor, ...], int], T] | None = None,
) -> list[T]:
    """The probe set through `model` in batches with `output_hidden_states=True`; per batch, `pool(hidden_states,
    first_row)` (nothing kept without `pool`: another rank's share of a collective forward).

    Under FSDP every rank runs these same batches, as each forward gathers the sharded parameters from all ranks.
    So every batch runs even after `pool` failed on one, and the error is raised after the last: a rank that left
    early would leave the others waiting in an all-gather.
    """
    import torch

    # transformers' causal LMs take `logits_to_keep`: 1 spares the LM head every probe position but the last (on
    # SmolLM2-135M the head is a fifth of the parameters, and its output a probes x tokens x 49 152 tensor).
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes it on
    head = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    was_training = model.training
    model.eval()
    pooled: list[T] = []
    error: Exception | None = None
    try:
        # no_grad, not inference_mode: FSDP2 reuses the storage it gathers parameters into, and a training step
        # cannot update in place a tensor created in inference mode.
        with torch.no_grad():
            for first in range(0, len(probe.ids), batch_size):
                out = model(
                    input_ids=probe.input_ids[first : first + batch_size],
                    attention_mask=probe.attention_mask[first : first + batch_size],
                    output_hidden_states=True,
                    **head,
                )
                if pool is not None and error is None:
                    try:
                        pooled.append(pool(out.hidden_states, first))
                    except Exception as exc:
                        error = exc
    finally:
        model.train(was_training)
    if error is not None:
        raise error
    return pooled
