"""`WorkbenchCallback`: the workbench's snapshots, geometry and run tracking inside anyone's `Trainer`.

One object added to `transformers.Trainer(callbacks=[...])` or any TRL trainer built on it (`SFTTrainer`,
`RewardTrainer`, `DPOTrainer`, `GRPOTrainer`):

- every `snapshot.every` steps (and at the first step) the probe set goes through the model with
  `output_hidden_states=True` and `Instrument` writes a snapshot and logs `geom/<feature>/layer_<i>`;
- the trainer's own logs go to the same MLflow run under the workbench's names (`loss` -> `train/loss`,
  `eval_loss` -> `eval/loss`, `learning_rate` -> `lr`, `eval_<x>` -> `eval/<x>`), TRL's keys as they are;
- only the main process (rank 0) snapshots and logs; with sharded parameters (FSDP) every rank runs the probe
  forward passes with it, as each gathers the parameters from all ranks;
- instrumentation never ends training: an error in the callback's own work (probes, hidden states, geometry,
  policies, logging) becomes one alert (stderr, and `event/callback_<part>` with its tag in the run) and that
  part stops while training goes on; `strict=True` raises it instead. Settings are checked when the callback is
  made, before training, and a store that cannot be used is refused at `on_train_begin`.

transformers' own `MLflowCallback` would open a second run for the same training, so the callback refuses
to run next to it: set `report_to="none"` (transformers' default since v5) or leave "mlflow" out of it.
"""

from __future__ import annotations

import atexit
import itertools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from transformers import TrainerCallback

from workbench import tags
from workbench.config import (
    CallbackConfig,
    CallbackSnapshotConfig,
    SnapshotConfig,
    TrackingConfig,
    load_callback_config,
)
from workbench.errors import WorkbenchError, first_line
from workbench.instrument import Instrument, probe_forward
from workbench.launch import base_tags, start_run
from workbench.policies import PolicyEngine, load_rules, log_alert
from workbench.runtime import all_reduce_sum, broadcast_flags, broadcast_text, distributed
from workbench.snapshots import ProbeSet, choose_probe_ids

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from workbench.tracking import Tracker

# The trainer's log keys that have another workbench name (README, metric names); `grad_norm`, TRL's
# `rewards/...`, `logps/...`, `entropy` keep theirs, and `eval_<x>` / `train_<x>` become `eval/<x>` / `train/<x>`.
RENAMED_KEYS = {
    "loss": "train/loss",
    "learning_rate": "lr",
    "train_loss": "train/mean_loss",  # the mean over the whole run, logged once at the end
}
T = TypeVar("T")
PROBE_MAX_TOKENS = 128  # longer probes are truncated: snapshots are about geometry, not long contexts


def workbench_metric_name(key: str) -> str:
    """`loss` -> `train/loss`, `eval_loss` -> `eval/loss`, `train_runtime` -> `train/runtime`; others unchanged."""
    if key in RENAMED_KEYS:
        return RENAMED_KEYS[key]
    for prefix in ("eval", "train", "test"):
        if key.startswith(f"{prefix}_"):
            return f"{prefix}/{workbench_metric_name(key.removeprefix(f'{prefix}_')).removeprefix('train/')}"
    return key


class WorkbenchCallback(TrainerCallback):
    """Snapshots, online geometry and MLflow logging for a `transformers` / TRL trainer.

    Args:
        snapshot: what to snapshot and how often (the stage configs' `snapshot` key; default
            `CallbackSnapshotConfig()`: every 50 steps, 256 probes from the eval dataset, token pooling, at most
            1 024 points).
        tracking: where the run goes, when the callback opens its own (`TrackingConfig`).
        tracker: an open run to log into instead (the workbench's stages pass theirs); it is not finished here.
        probes: the fixed probe set: a `ProbeSet`, or rows (a `datasets.Dataset` or a list of dicts with
            `input_ids`, `text`, `prompt`/`completion`, `prompt`/`chosen` or `messages`) sampled with `seed`;
            pass the trainer's eval dataset to probe held-out rows. Default: a seeded sample of the dataset of
            the eval dataloader the trainer hands its callbacks at `on_train_begin` (there only when it has
            evaluated before training), else of its train dataloader's.
        seed: seeds the probe sample and the token subsample of `token` pooling.
        policies: early-stop rules (or a YAML file of them, relative to `policy_dir`), validated here; the
            engine sees every logged value and every snapshot's geometry, and its decision sets
            `control.should_training_stop` (stop) and `control.should_save` (checkpoint).
        strict: raise errors in the callback's own work instead of alerting and going on without that part.
    """

    def __init__(
        self,
        snapshot: SnapshotConfig | None = None,
        tracking: TrackingConfig | None = None,
        *,
        tracker: Tracker | None = None,
        probes: ProbeSet | Sequence[Mapping[str, Any]] | None = None,
        seed: int = 0,
        policies: Sequence[Mapping[str, Any]] | str | Path = (),
        policy_dir: Path | None = None,
        strict: bool = False,
    ) -> None:
        self.snapshot = snapshot or CallbackSnapshotConfig()
        self.tracking = tracking or TrackingConfig()
        self.tracker = tracker
        self.probes = probes
        self.seed = seed
        self.rules = load_rules(policies if policies else [], "policies", policy_dir)  # a bad rule fails here
        self.instrument: Instrument | None = None  # rank 0's
        # With sharded parameters (`_sharded`) every rank runs the probe forward passes, the others with `_probe`.
        self._collective = False
        self._probe: ProbeSet | None = None
        self.engine: PolicyEngine | None = None
        self.strict = strict
        self.disabled: dict[str, str] = {}  # part -> why it stopped: snapshots, policies, logging
        self._save_pending = self._stop_pending = False
        self._owns_run = tracker is None

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any], **kwargs: Any) -> WorkbenchCallback:
        """From a YAML file or a dict with the keys a stage config has: `seed`, `snapshot`, `tracking`, `policies`."""
        config: CallbackConfig = load_callback_config(source)
        policy_dir = None if isinstance(source, Mapping) else Path(source).parent
        kwargs.setdefault("strict", config.strict)
        return cls(
            config.snapshot,
            config.tracking,
            seed=config.seed,
            policies=config.policies,
            policy_dir=policy_dir,
            **kwargs,
        )

    # --- trainer events -------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        _refuse_mlflow_callback(args)  # when the trainer is built, before MLflowCallback could start its run

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _refuse_mlflow_callback(args)  # again, for a callback added after the trainer was built
        step = state.global_step
        # Sharded parameters are gathered from every rank in each forward pass: then every rank runs the probes.
        self._collective = distributed() and _sharded(kwargs["model"])
        if not state.is_world_process_zero:
            if self._collective:  # the same probes as rank 0 (seeded), to run the same forward passes
                self._probe = self._guard("snapshots", step, lambda: self._probe_set_on_device(kwargs))
                self._check_probes_agree(step)
                self._snapshot(kwargs["model"], step)
            return
        if self.tracker is None:
            self.tracker = self._start_run(args, kwargs["model"])
            # Callbacks hear of no exception: a run whose training dies is ended at exit, FAILED, its logs kept.
            atexit.register(self._end_abandoned_run)
        # An engine even without rules, as in the workbench's own loops: forecasters run, `workbench stop` works.
        self.engine = self._guard("policies", step, lambda: PolicyEngine(self.rules, tracker=self.tracker))
        self.instrument = self._guard("snapshots", step, lambda: self._start_instrument(kwargs))
        if self._collective:
            self._check_probes_agree(step)
        self._snapshot(kwargs["model"], step)  # a decision at step 0 is acted on after the first step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._snapshot(kwargs["model"], state.global_step)
        self._act(control, every_rank=True)  # every rank reaches each step end: there rank 0's decision is shared

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.tracker is None or not state.is_world_process_zero or not logs:
            return
        metrics = {
            workbench_metric_name(key): float(value)
            for key, value in logs.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        self._guard("logging", state.global_step, lambda: self.tracker.log_metrics(metrics, state.global_step))
        self._observe(state.global_step, metrics)
        self._act(control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.tracker is None or not state.is_world_process_zero:
            return
        if self.engine is not None:
            self._guard("policies", state.global_step, self.engine.finish)
        if self._owns_run:
            atexit.unregister(self._end_abandoned_run)
            status = "KILLED" if self.ended_by_user else "FINISHED"
            self._guard("logging", state.global_step, lambda: self.tracker.finish(status))
            self._end_owned_run()
        else:
            self._guard("logging", state.global_step, self.tracker.flush)

    @property
    def ended_by_user(self) -> bool:
        """Whether a user's stop request (`workbench stop`, the app) ended the training."""
        return self.engine is not None and self.engine.ended_by_user

    def _end_abandoned_run(self) -> None:
        if self.tracker is not None:
            self.tracker.set_tags({tags.ERROR: "training ended before the trainer's on_train_end (an exception?)"})
            self.tracker.finish("FAILED")
            self._end_owned_run()

    def _end_owned_run(self) -> None:
        """After the run the callback opened has ended, however: its report.html, as every stage run has."""
        from workbench.report import write_run_report  # plotly: only once a run has ended

        write_run_report(self.tracker)  # never raises: a failure is a line and a tag
        self.tracker = None

    # --- helpers --------------------------------------------------------------------------------------

    def _start_run(self, args: TrainingArguments, model: Any) -> Tracker:
        run_tags = {**base_tags("callback"), tags.MODEL_CLASS: type(_unwrap(model)).__name__}
        params = {f"trainer.{k}": v for k, v in args.to_sanitized_dict().items() if len(str(v)) <= 500}
        params.update({f"snapshot.{k}": v for k, v in self.snapshot.model_dump(mode="json").items()})
        # Only rank 0 gets here (on_train_begin): the other ranks neither open nor write the run.
        return start_run(self.tracking, run_tags, {**params, "seed": self.seed}, every_rank=False)

    def _start_instrument(self, trainer_kwargs: Mapping[str, Any]) -> Instrument:
        return Instrument(self.snapshot, self._probe_set_on_device(trainer_kwargs), self.tracker, seed=self.seed)

    def _probe_set_on_device(self, trainer_kwargs: Mapping[str, Any]) -> ProbeSet:
        rows = _dataset(trainer_kwargs.get("eval_dataloader"))
        rows = _dataset(trainer_kwargs.get("train_dataloader")) if rows is None else rows
        device = next(trainer_kwargs["model"].parameters()).device
        return self._probe_set(trainer_kwargs.get("processing_class"), rows).to(str(device))

    def _snapshot(self, model: Any, step: int) -> None:
        due = self.instrument is not None and self.instrument.due(step)
        if self._collective:
            # Rank 0 decides (its snapshots may have stopped after an error) and the others follow, so that all
            # ranks or none enter the forward passes, whose parameter all-gathers need every rank.
            (due,) = broadcast_flags(due)
        if not due:
            return
        if self.instrument is None:  # another rank's share of a collective forward: same batches, outputs unused
            batch_size = self.snapshot.probe_batch_size
            self._guard("snapshots", step, lambda: probe_forward(_unwrap(model), self._probe, batch_size))
            return
        # `take`, not `__call__`: rank 0 told the others a snapshot is due, so it must run whatever `due` says now.
        # Only the forward passes are collective: pooling, writing and geometry after them are rank 0's alone, so
        # an error there cannot leave the other ranks waiting.
        metrics = self._guard("snapshots", step, lambda: self.instrument.take(_unwrap(model), step))
        if metrics is not None:
            self._observe(step, metrics, snapshot=True)

    def _check_probes_agree(self, step: int) -> None:
        """Under FSDP: every rank must hold rank 0's probe set, or their forward passes (their number, at least)
        would not pair up. Probes are a seeded sample of the same rows, but rows can differ between ranks (a
        dataset sharded per rank), so this is checked once; where they differ, rank 0 stops snapshots (and with
        them every rank's forward passes, as it decides when they run)."""
        probe = self.instrument.probe if self.instrument is not None else self._probe
        mine = _fingerprint(probe)
        (differing,) = all_reduce_sum(float(mine != broadcast_text(mine)))
        if differing and self.instrument is not None:
            error = WorkbenchError(
                f"snapshot.probes: {int(differing)} rank(s) built other probes than rank 0 (rows sharded per rank?); "
                "pass probes= the same rows on every rank"
            )
            if self.strict:
                raise error
            self._disable("snapshots", step, error)

    def _observe(self, step: int, metrics: Mapping[str, float], snapshot: bool = False) -> None:
        if self.engine is not None and (metrics or snapshot):
            decision = self._guard("policies", step, lambda: self.engine.observe(step, metrics, snapshot=snapshot))
            if decision is not None:
                self._save_pending |= decision.checkpoint
                self._stop_pending |= decision.stop

    def _guard(self, part: str, step: int, work: Callable[[], T]) -> T | None:
        """`work()` of the callback's `part`; an error in it stops that part, with one alert, and training goes on
        (with `strict`, it is raised). Returns None once the part has stopped."""
        if part in self.disabled:
            return None
        try:
            return work()
        except Exception as exc:
            if self.strict:
                raise
            self._disable(part, step, exc)
            return None

    def _disable(self, part: str, step: int, exc: Exception) -> None:
        why = first_line(exc) if isinstance(exc, WorkbenchError) else f"{type(exc).__name__}: {first_line(exc)}"
        self.disabled[part] = why
        message = f"{part} stopped at step {step}, training goes on: {why}"
        print(f"WorkbenchCallback: {message} (strict=True raises instead)", file=sys.stderr)
        if part == "snapshots":
            self.instrument = None
        elif part == "policies":
            self.engine = None
        if part != "logging" and self.tracker is not None:  # a store that fails to log fails this too
            self._guard("logging", step, lambda: log_alert(self.tracker, step, f"callback_{part}", message))

    def _act(self, control: TrainerControl, every_rank: bool = False) -> None:
        """The engine's decisions as the trainer's own flags, at events after which the trainer reads them:
        `should_save` writes a checkpoint at this step, `should_training_stop` ends training after it.

        Only rank 0 decides. In a distributed run its decision is broadcast at step ends, which every rank
        reaches: a rank that stopped alone would leave the others waiting in their next all-reduce.
        """
        save, stop = self._save_pending, self._stop_pending
        if distributed():
            if not every_rank:
                return  # a decision made in on_log (rank 0 only) waits for the next step end
            save, stop = broadcast_flags(save, stop)
        control.should_save |= save
        control.should_training_stop |= stop
        self._save_pending = False

    def _probe_set(self, tokenizer: Any, trainer_rows: Any) -> ProbeSet:
        if isinstance(self.probes, ProbeSet):
            return self.probes
        rows = self.probes
        if rows is None:
            if trainer_rows is None:
                raise WorkbenchError("no probes: the trainer handed the callback no dataset; pass probes=")
            print(
                "WorkbenchCallback: probes sampled from the trainer's dataloader's rows; pass probes=<eval dataset> to "
                "probe held-out rows",
                file=sys.stderr,
            )
            rows = trainer_rows
        return probe_set_from_rows(rows, tokenizer, self.snapshot.probes, self.seed)


def _refuse_mlflow_callback(args: TrainingArguments) -> None:
    if "mlflow" in (args.report_to or []):
        raise WorkbenchError(
            "report_to includes 'mlflow': transformers would open a second MLflow run next to the workbench's; "
            "set report_to='none' (or leave 'mlflow' out)"
        )


def _unwrap(model: Any) -> Any:
    """The module whose hidden states we want: out of DDP/FSDP/compile wrappers, and out of a peft wrapper
    (whose base model keeps the adapters injected, so its forward is the adapted model's)."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _sharded(model: Any) -> bool:
    """Whether parameters are sharded over the ranks (FSDP2 holds them as DTensors, FSDP1 in its wrappers), so
    that a forward pass needs every rank. DDP replicates them: rank 0 runs the probes alone, at no cost to the
    other ranks' training."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters()
    )


def _fingerprint(probe: ProbeSet | None) -> str:
    """A probe set's tokens as a short hash, to compare between ranks ("none" without a probe set)."""
    if probe is None:
        return "none"
    import hashlib

    digest = hashlib.sha1()
    for tensor in (probe.input_ids, probe.attention_mask):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()


def _dataset(dataloader: Any) -> Any:
    """The dataset behind a dataloader the trainer hands its callbacks (None when there is none)."""
    return getattr(dataloader, "dataset", None) if dataloader is not None else None


def probe_set_from_rows(rows: Iterable[Any], tokenizer: Any, n_probes: int, seed: int) -> ProbeSet:
    """A seeded sample of dataset rows as a padded probe batch (of an iterable dataset: its first `n_probes`).

    Rows may be tokenized the way each trainer leaves them (`input_ids`: Trainer/SFT; `prompt_ids` +
    `chosen_ids`: DPO; `chosen_ids`: reward model), items of a `torch.utils.data.Dataset` (dicts of tensors, or
    tuples whose first item is the token ids), or raw text in TRL's formats. The answer position (for `answer`
    pooling) is the last prompt token, where rows have a prompt.
    """
    import torch

    ids, picked = _sample_rows(rows, n_probes, seed)
    encoded = [_encode_row(row, tokenizer) for row in picked]
    tokens = [t[:PROBE_MAX_TOKENS] for t, _ in encoded]
    prompt_lengths = [p for _, p in encoded]
    pad = getattr(tokenizer, "pad_token_id", None)
    width = max(len(t) for t in tokens)
    input_ids = torch.full((len(tokens), width), pad if pad is not None else 0, dtype=torch.long)
    attention_mask = torch.zeros((len(tokens), width), dtype=torch.long)
    for row, t in enumerate(tokens):
        input_ids[row, : len(t)] = torch.tensor(t, dtype=torch.long)
        attention_mask[row, : len(t)] = 1
    answer_positions = None
    if all(p is not None and 0 < p <= len(t) for p, t in zip(prompt_lengths, tokens, strict=True)):
        answer_positions = torch.tensor([p - 1 for p in prompt_lengths])
    return ProbeSet(ids=ids, input_ids=input_ids, attention_mask=attention_mask, answer_positions=answer_positions)


def _sample_rows(rows: Iterable[Any], n_probes: int, seed: int) -> tuple[list[int], list[Any]]:
    """(row numbers, rows): a seeded sample of a sized dataset, else the first `n_probes` rows of the stream."""
    try:
        size = len(rows)
    except TypeError:  # an IterableDataset (torch or HF datasets): no length, no random access
        picked = list(itertools.islice(iter(rows), n_probes))
        ids = list(range(len(picked)))
    else:
        ids = choose_probe_ids(range(size), n_probes, seed)
        picked = [rows[i] for i in ids]
    if not picked:
        raise WorkbenchError("snapshot.probes: the dataset to take probes from is empty")
    return ids, picked


def _encode_row(row: Any, tokenizer: Any) -> tuple[list[int], int | None]:
    """(token ids, prompt length or None) of one row, whichever format it is in."""
    if isinstance(row, tuple | list):  # a TensorDataset-style item: (input_ids, ...); the rest is not guessed at
        return _token_ids(row[0], "item[0]"), None
    if not isinstance(row, Mapping):
        raise WorkbenchError(
            f"snapshot.probes: a row is a {type(row).__name__}; expected a mapping of columns or a tuple whose first "
            "item is token ids"
        )
    if "input_ids" in row:
        return _unpadded(row)
    if "prompt_ids" in row and "chosen_ids" in row:
        prompt = _token_ids(row["prompt_ids"], "prompt_ids")
        return prompt + _token_ids(row["chosen_ids"], "chosen_ids"), len(prompt)
    if "chosen_ids" in row:
        return _token_ids(row["chosen_ids"], "chosen_ids"), None
    if not {"text", "messages", "prompt"} & set(row):
        raise WorkbenchError(
            f"snapshot.probes: rows have columns {sorted(row)}; expected input_ids, prompt_ids+chosen_ids, "
            "chosen_ids, text, messages or prompt"
        )
    if tokenizer is None:
        raise WorkbenchError("snapshot.probes: text rows need the trainer's tokenizer (processing_class)")
    if "text" in row:
        return _tokenize(tokenizer, row["text"]), None
    if "messages" in row:
        return _tokenize(tokenizer, row["messages"]), None
    answer = row.get("completion", row.get("chosen", [] if isinstance(row["prompt"], list) else ""))
    prompt = _tokenize(tokenizer, row["prompt"])
    # Strings concatenate, and so do conversational prompt/answer lists of messages.
    return _tokenize(tokenizer, row["prompt"] + answer), len(prompt)


def _unpadded(row: Mapping[str, Any]) -> tuple[list[int], int | None]:
    """A tokenized row without its padding (where `attention_mask` is 0). Where `labels` mask the prompt with
    -100, as SFT collators do, the answer starts at the first kept label."""
    ids = _token_ids(row["input_ids"], "input_ids")
    mask = row.get("attention_mask")
    keep = [bool(m) for m in _token_ids(mask, "attention_mask")] if mask is not None else [True] * len(ids)
    labels = row.get("labels")
    labels = _token_ids(labels, "labels") if labels is not None and _is_sequence(labels) else None
    if len(keep) != len(ids) or (labels is not None and len(labels) != len(ids)):
        raise WorkbenchError("snapshot.probes: a row's input_ids, attention_mask and labels differ in length")
    tokens = [t for t, k in zip(ids, keep, strict=True) if k]
    if not tokens:
        raise WorkbenchError("snapshot.probes: a row's attention_mask keeps no token")
    if labels is None:
        return tokens, None
    answer = [label != -100 for label, k in zip(labels, keep, strict=True) if k]
    return tokens, (answer.index(True) if True in answer else None)


def _is_sequence(value: Any) -> bool:
    """A list or a tensor/array of at least one dimension (a class label is a scalar)."""
    return isinstance(value, list | tuple) or getattr(value, "ndim", 0) >= 1


def _token_ids(value: Any, column: str) -> list[int]:
    """Token ids as a list of ints: from a list, a 1-D tensor or array, or a (1, length) one as tokenizers
    return with `return_tensors`."""
    values = value.tolist() if hasattr(value, "tolist") else list(value)
    if values and isinstance(values[0], list):
        if len(values) != 1:
            raise WorkbenchError(f"snapshot.probes: {column} has {len(values)} sequences in one row; expected one")
        values = values[0]
    if not values:
        raise WorkbenchError(f"snapshot.probes: a row's {column} is empty")
    return [int(v) for v in values]


def _tokenize(tokenizer: Any, content: str | list[dict[str, str]]) -> list[int]:
    if isinstance(content, list):  # conversational: the tokenizer's chat template renders it
        content = tokenizer.apply_chat_template(content, tokenize=False)
    return list(tokenizer(content, add_special_tokens=False)["input_ids"])
