"""Grokking on modular arithmetic (Power et al. 2022, "Grokking: Generalization beyond overfitting").

A tiny `transformers` decoder reads `a b =` and predicts `a ∘ b mod p` at the `=` position. Trained
full-batch with AdamW and strong weight decay on a fraction of all pairs, it first memorises the train
split (train acc ~1, test acc low) and only much later generalises: test accuracy jumps. The model is a
library model built from config, so its hidden states come out of the same `output_hidden_states` path
every other stage uses (its cost against a hand-written block: docs/architecture.md, "Model").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from analysis.forecast import GENERALISED_ACC, GROKKED_ACC, MEMORISED_ACC
from analysis.fourier import cyclic_order, fourier_gini
from analysis.heldout import heldout_geometry, prediction_confidence
from analysis.series import first_step_at_least, largest_change
from pipelines.grokking.config import GrokkingModelConfig, GrokkingStageConfig, TaskConfig
from workbench import tags
from workbench.artifacts import MODEL_DIR, log_pretrained, model_checkpoint_path
from workbench.checkpoint import PeriodicCheckpoints, data_identity
from workbench.instrument import Instrument
from workbench.liveness import pending_stop_signal
from workbench.policies import PolicyEngine
from workbench.runtime import (
    all_reduce_sum,
    broadcast_flags,
    distributed,
    is_main_process,
    rank_and_world,
    resolve_device,
)
from workbench.snapshots import ProbeSet, choose_probe_ids, layer_name
from workbench.stages import StageResult

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from workbench.resume import Resumption
    from workbench.tracking import Tracker

OPERATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "+": lambda a, b, p: (a + b) % p,
    "-": lambda a, b, p: (a - b) % p,
    "*": lambda a, b, p: (a * b) % p,
    "x^2+xy+y^2": lambda a, b, p: (a * a + a * b + b * b) % p,
}
COMMUTATIVE = {"+", "*", "x^2+xy+y^2"}


@dataclass(frozen=True)
class ModularData:
    """All pairs `a b =` (example id = row), their answers, and a seeded train/test split of the ids."""

    inputs: torch.Tensor  # [N, 3]
    targets: torch.Tensor  # [N]
    train_ids: torch.Tensor
    test_ids: torch.Tensor


def make_dataset(task: TaskConfig, seed: int) -> ModularData:
    p = task.p
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    if task.op == "/":  # division is defined for b != 0 only
        a, b = a[b != 0], b[b != 0]
    targets = _modular_op(task.op, a, b, p)
    inputs = torch.stack([a, b, torch.full_like(a, p)], dim=1)  # token p is "="
    # What is split: each ordered pair, or each unordered one {a, b} with both its orders
    unit = torch.arange(len(a)) if task.split == "ordered" else torch.minimum(a, b) * p + torch.maximum(a, b)
    units = unit.unique()
    order = units[torch.randperm(len(units), generator=torch.Generator().manual_seed(seed))]
    train = torch.isin(unit, order[: max(1, round(task.train_fraction * len(units)))])
    return ModularData(inputs, targets, train.nonzero().squeeze(1), (~train).nonzero().squeeze(1))


def _modular_op(op: str, a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    if op == "/":  # a * b^-1 with b^-1 = b^(p-2) mod p (Fermat's little theorem, p prime)
        inverse = torch.tensor([pow(x, p - 2, p) for x in range(p)])
        return (a * inverse[b]) % p
    return OPERATIONS[op](a, b, p)


def build_model(config: GrokkingModelConfig, vocab_size: int) -> torch.nn.Module:
    """A tiny decoder-only `transformers` model from config: nothing is downloaded."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if config.arch == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab_size,
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads,
                num_key_value_heads=config.num_heads,
                max_position_embeddings=8,
                tie_word_embeddings=False,
            )
        )
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size,
            n_embd=config.hidden_size,
            n_inner=config.intermediate_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_positions=8,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
    )


def make_probe_set(data: ModularData, n_probes: int, seed: int, one_order: bool) -> ProbeSet:
    """Held-out pairs; the answer is predicted at the last position (`=`). With `one_order` (a commutative op)
    only (a, b) with a <= b: a model's state at `=` for (b, a) is all but the one for (a, b), and such
    near-duplicate pairs make every nearest-neighbour estimate read the pair, not the cloud (TwoNN ~0.3)."""
    a, b = data.inputs[data.test_ids, 0], data.inputs[data.test_ids, 1]
    ids = choose_probe_ids(data.test_ids[a <= b] if one_order else data.test_ids, n_probes, seed)
    rows = torch.tensor(ids)
    inputs = data.inputs[rows]
    return ProbeSet(
        ids=ids,
        input_ids=inputs,
        attention_mask=torch.ones_like(inputs),
        answer_positions=torch.full((len(ids),), inputs.shape[1] - 1),
        labels=data.targets[rows].tolist(),
    )


HELDOUT_POINTS = 512  # train inputs and held-out inputs, each, whose states the label-free signals compare


@dataclass(frozen=True)
class HeldoutInputs:
    """Fixed, seeded subsets of the train pairs (with their labels) and of the held-out pairs (inputs only):
    at every evaluation, where the model puts the held-out inputs against the train ones (`analysis.heldout`)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    heldout_x: torch.Tensor

    @classmethod
    def sample(cls, data: ModularData, seed: int, device: str) -> HeldoutInputs:
        train = torch.tensor(choose_probe_ids(data.train_ids, HELDOUT_POINTS, seed))
        heldout = torch.tensor(choose_probe_ids(data.test_ids, HELDOUT_POINTS, seed + 1))
        return cls(data.inputs[train].to(device), data.targets[train].to(device), data.inputs[heldout].to(device))

    def signals(self, model: torch.nn.Module) -> dict[str, float]:
        """`heldout/confidence` and `heldout/<signal>/layer_NN` for every layer after the embeddings (whose
        state at `=` is one point for every input)."""
        with torch.no_grad():
            train = model(input_ids=self.train_x, output_hidden_states=True, logits_to_keep=1)
            heldout = model(input_ids=self.heldout_x, output_hidden_states=True, logits_to_keep=1)
        logits = heldout.logits[:, -1]
        metrics = {"heldout/confidence": prediction_confidence(logits)}
        for layer in range(1, len(train.hidden_states)):
            found = heldout_geometry(
                train.hidden_states[layer][:, -1], self.train_y, heldout.hidden_states[layer][:, -1], logits.argmax(-1)
            )
            metrics.update({f"heldout/{name}/{layer_name(layer)}": value for name, value in found.items()})
        return metrics


@dataclass
class History:
    """The in-memory series the end-of-run summary is computed from."""

    eval_steps: list[int]
    train_acc: list[float]
    eval_acc: list[float]
    geometry: dict[str, list[tuple[int, float]]]
    stopped_at: int | None = None  # the step a policy (or a stop request) ended the run at
    stop_reason: str | None = None

    def record_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        self.eval_steps.append(step)
        self.train_acc.append(metrics["train/acc"])
        self.eval_acc.append(metrics["eval/acc"])

    def extended(self, later: History) -> History:
        """This history followed by a later one (a resumed run's)."""
        keys = sorted(self.geometry.keys() | later.geometry.keys())
        geometry = {k: [*self.geometry.get(k, []), *later.geometry.get(k, [])] for k in keys}
        return History(
            self.eval_steps + later.eval_steps,
            self.train_acc + later.train_acc,
            self.eval_acc + later.eval_acc,
            geometry,
            later.stopped_at,
            later.stop_reason,
        )


def _history_before(resume: Resumption) -> History:
    """The series a resumed run logged before its checkpoint, as `train` keeps them."""
    history = History([], [], [], {})
    for step, metrics in resume.before_checkpoint().items():
        if "train/acc" in metrics and "eval/acc" in metrics:
            history.record_eval(step, metrics)
        for key, value in metrics.items():
            if key.startswith("geom/"):
                history.geometry.setdefault(key.removeprefix("geom/"), []).append((step, value))
    return history


@dataclass
class LoopHooks:
    """What the loop reports to and asks, besides the model and data.

    `log(metrics, step)` records metrics; `instrument` snapshots and logs geometry when due; `engine` sees every
    logged step's metrics and decides; `save_model(step)` keeps a model checkpoint when the engine asks for one;
    `state_checkpoints` saves the whole training state for `workbench resume`.
    """

    log: Callable[[Mapping[str, float], int], None]
    instrument: Instrument | None = None
    engine: PolicyEngine | None = None
    save_model: Callable[[int], None] | None = None
    state_checkpoints: PeriodicCheckpoints | None = None


def train(
    config: GrokkingStageConfig, model: torch.nn.Module, data: ModularData, device: str, hooks: LoopHooks
) -> History:
    """Full-batch AdamW; the model at step s has had s updates, and every metric at s describes it.

    When the engine says so the model is saved, and a stop ends the loop at that step, after its metrics are
    logged, as if it were the last step. The training state (at step s: after s updates, before step s is
    logged) is saved every so often and on SIGINT/SIGTERM, which then end the run; a resumed loop starts at the
    checkpoint's step.

    Under a multi-process launch `model` is DDP-wrapped and each rank trains on every world-th train pair;
    rank 0's engine decides for all ranks, and snapshots and test metrics come from the unwrapped model.
    """
    from accelerate.utils import extract_model_from_parallel

    core = extract_model_from_parallel(model)
    rank, world = rank_and_world()
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay, betas=config.optim.betas
    )
    warmup = config.optim.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    state_checkpoints, instrument, engine = hooks.state_checkpoints, hooks.instrument, hooks.engine
    start = state_checkpoints.restore(core, opt, schedule) if state_checkpoints is not None else 0
    x_train, y_train = data.inputs[data.train_ids].to(device), data.targets[data.train_ids].to(device)
    # Scaling a rank's mean loss by its share of the batch times the number of ranks makes DDP's gradient
    # average the full-batch gradient (up to summation order); `share` is exactly 1 for one process.
    x_shard, y_shard = x_train[rank::world], y_train[rank::world]
    share = len(y_shard) * world / len(y_train)
    x_test, y_test = data.inputs[data.test_ids].to(device), data.targets[data.test_ids].to(device)
    heldout = HeldoutInputs.sample(data, config.seed, device)
    history = History([], [], [], {})
    task = config.task
    bar = tqdm(total=config.train.max_steps, initial=start, desc=f"grokking a{task.op}b mod {task.p}", unit="step")

    group = cyclic_order(task.op, task.p)

    def evaluate(step: int, logits: torch.Tensor, loss: torch.Tensor) -> dict[str, float]:
        loss_sum, correct = all_reduce_sum(loss.item() * len(y_shard), (logits.argmax(-1) == y_shard).sum().item())
        train = {"train/loss": loss_sum / len(y_train), "train/acc": correct / len(y_train)}
        metrics = {**train, **_evaluate(core, x_test, y_test), **heldout.signals(core), "lr": schedule.get_last_lr()[0]}
        hooks.log(metrics, step)
        history.record_eval(step, metrics)
        bar.set_postfix(
            train_acc=f"{metrics['train/acc']:.3f}",
            test_acc=f"{metrics['eval/acc']:.3f}",
            **_latest_lid(history),
            refresh=False,
        )
        return metrics

    for step in range(start, config.train.max_steps + 1):
        if state_checkpoints is not None:
            _save_state_if_due(state_checkpoints, step, (core, opt, schedule), bar)
        logits = model(input_ids=x_shard, logits_to_keep=1).logits[:, -1]
        loss = F.cross_entropy(logits, y_shard)
        geometry = instrument(core, step) if instrument is not None else {}  # before the bar: it shows this LID
        for key, value in geometry.items():
            history.geometry.setdefault(key.removeprefix("geom/"), []).append((step, value))
        due = step % config.train.eval_every == 0 or step == config.train.max_steps
        metrics = evaluate(step, logits, loss) if due else {}
        save = stop = False
        snapshot = instrument is not None and instrument.due(step)
        if snapshot and group is not None:  # with the snapshot, whose layer_00 holds these embeddings
            sparsity = {"embed/fourier_gini": fourier_gini(embedding_rows(core, group).cpu().numpy())}
            hooks.log(sparsity, step)
            geometry = {**geometry, **sparsity}
        if engine is not None and (snapshot or metrics):
            decision = engine.observe(step, {**geometry, **metrics}, snapshot=snapshot)
            save, stop, history.stop_reason = decision.checkpoint, decision.stop, decision.reason
        save, stop = broadcast_flags(save, stop)  # rank 0 decides for every rank: they stop at the same step
        if save and hooks.save_model is not None:
            hooks.save_model(step)
        if stop:
            if not metrics:  # the final metrics describe the model the run ends with
                evaluate(step, logits, loss)
            history.stopped_at = step
            break
        if step == config.train.max_steps:
            break
        opt.zero_grad(set_to_none=True)
        (loss * share).backward()
        opt.step()
        schedule.step()
        bar.update()
    bar.close()
    return history


def _save_state_if_due(checkpoints: PeriodicCheckpoints, step: int, state: tuple, bar: tqdm) -> None:
    """The training state at `step` when a save is due or a SIGINT/SIGTERM arrived; the signal then ends the run."""
    stop_signal = pending_stop_signal()
    if stop_signal is not None or checkpoints.due(step):
        checkpoints.save(step, *state)
    if stop_signal is not None:
        bar.close()
        raise KeyboardInterrupt(f"{stop_signal}: checkpointed at step {step}")


def _evaluate(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        test_logits = model(input_ids=x_test, logits_to_keep=1).logits[:, -1]
        weight_norm = torch.sqrt(sum(p.pow(2).sum() for p in model.parameters()))
    return {
        "eval/loss": F.cross_entropy(test_logits, y_test).item(),
        "eval/acc": (test_logits.argmax(-1) == y_test).float().mean().item(),
        "weight_norm": weight_norm.item(),
    }


def embedding_rows(model: torch.nn.Module, group: list[int]) -> torch.Tensor:
    """The input embeddings of the residues (tokens 0 ... p - 1) in the cyclic group's order."""
    with torch.no_grad():
        return model.get_input_embeddings().weight[group].float()


def _latest_lid(history: History) -> dict[str, str]:
    """The last layer's most recent TwoNN LID, for the progress bar."""
    keys = sorted(k for k in history.geometry if k.startswith("lid_twonn/layer_"))
    return {"lid": f"{history.geometry[keys[-1]][-1][1]:.2f}"} if keys else {}


def summarize(history: History) -> tuple[dict[str, float], list[str]]:
    """Memorisation and grokking steps, and where each layer's geometry changed most after memorisation."""
    memorised = first_step_at_least(history.eval_steps, history.train_acc, MEMORISED_ACC)
    grokked = first_step_at_least(history.eval_steps, history.eval_acc, GROKKED_ACC)
    generalised = first_step_at_least(history.eval_steps, history.eval_acc, GENERALISED_ACC)
    lines = [
        f"memorisation (train acc >= {MEMORISED_ACC}): {_step(memorised)}",
        f"grokking (test acc >= {GROKKED_ACC}): {_step(grokked)};  test acc >= {GENERALISED_ACC}: {_step(generalised)}",
        f"final: train acc {history.train_acc[-1]:.3f}, test acc {history.eval_acc[-1]:.3f}",
    ]
    facts = {"final/train_acc": history.train_acc[-1], "final/eval_acc": history.eval_acc[-1]}
    for name, value in (
        ("memorisation_step", memorised),
        ("grokking_step", grokked),
        ("generalisation_step", generalised),
    ):
        if value is not None:
            facts[f"grokking/{name}"] = float(value)
    if history.geometry and memorised is not None:
        lines.append("largest change between consecutive snapshots after memorisation, per layer:")
        for key, series in sorted(history.geometry.items(), key=lambda kv: (kv[0].split("/")[1], kv[0])):
            steps, values = zip(*series, strict=True)
            found = largest_change(steps, values, start_step=memorised)
            if found is None:
                continue
            step, relative = found
            when = "" if grokked is None else f" ({_relative_to(step, grokked)} grokking)"
            lines.append(f"  {key:<24} {relative:+7.1%} by step {step}{when}")
    return facts, lines


def _step(step: int | None) -> str:
    return "not reached" if step is None else f"step {step}"


def _relative_to(step: int, reference: int) -> str:
    if step == reference:
        return "at"
    return f"{abs(step - reference)} steps {'before' if step < reference else 'after'}"


def run(config: GrokkingStageConfig, tracker: Tracker, resume: Resumption | None = None) -> StageResult:
    """Train and summarise; with `resume` (`workbench resume`), continue a run from its latest checkpoint."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    data = make_dataset(config.task, config.seed)
    model = build_model(config.model, vocab_size=config.task.p + 1).to(device)
    probe = make_probe_set(data, config.snapshot.probes, config.seed, one_order=config.task.op in COMMUTATIVE)
    # Rank 0 alone snapshots (the same probes, whatever the number of processes) and prints the engine's lines.
    instrument = Instrument(config.snapshot, probe.to(device), tracker, seed=config.seed) if is_main_process() else None
    tracker.set_tags({tags.DEVICE: device})
    engine = PolicyEngine.from_config(config.policies, tracker=tracker, console=is_main_process())
    trained = model
    if distributed():
        from accelerate import Accelerator

        trained = Accelerator(cpu=device == "cpu").prepare_model(model)  # DDP: gradients all-reduced each step

    def save_model(step: int) -> None:
        log_pretrained(tracker, model_checkpoint_path(step), model)

    state_checkpoints = None  # multi-process runs are not checkpointed for resume yet (docs/resume.md)
    if not distributed():
        extra = (lambda: {"instrument": instrument.state()}) if instrument is not None else None
        data_id = data_identity(data.train_ids, data.test_ids)
        resume_from = resume.checkpoint if resume is not None else None
        state_checkpoints = PeriodicCheckpoints(tracker, config.train.checkpoint_every, data_id, resume_from, extra)
    if resume is not None:
        resume.replay(engine)
        if instrument is not None:
            instrument.restore(resume.checkpoint.extra["instrument"])
    hooks = LoopHooks(tracker.log_metrics, instrument, engine, save_model, state_checkpoints)
    history = train(config, trained, data, device, hooks)
    if resume is not None:
        history = _history_before(resume).extended(history)
    engine.finish()
    facts, summary = summarize(history)
    tracker.log_metrics(facts, history.eval_steps[-1])  # the last step trained, whether stopped early or not
    if history.stopped_at is not None:
        summary.insert(0, f"stopped at step {history.stopped_at} of {config.train.max_steps}: {history.stop_reason}")
    grokked = facts.get("grokking/grokking_step")
    for firing in (f for f in engine.firings if f.kind == "event"):
        when = f" ({_relative_to(firing.step, int(grokked))} grokking)" if grokked is not None else ""
        summary.insert(2, f"step {firing.step}{when}: {firing.message}")
    model_uri = log_pretrained(tracker, MODEL_DIR, model)  # safetensors, loadable with from_pretrained
    return StageResult(model_uri=model_uri, metrics=facts, summary=summary, ended_by_user=engine.ended_by_user)
