"""Cost of `WorkbenchCallback`: the same TRL SFTTrainer run bare and with the callback, side by side in one process.

The SFT stage's set-up (configs/sft.yaml: the built-in task, a 2-layer d=64 Llama, batch 32) with the
callback at its defaults (`CallbackSnapshotConfig()`: a snapshot every 50 steps of 256 eval-set probes, token
pooling to at most 1 024 points, online TwoNN + MLE + effective rank) logging to a sqlite MLflow store; "bare" is the
same trainer without the callback. Runs alternate (A B B A A B ...) so drift of a shared machine hits both; we report
each pair's ratio and the median, and, timed directly inside the callback run, the seconds spent in the
callback's own methods as a share of the bare run. Both in wall time and in the process's CPU time, which other
jobs on a shared machine inflate far less.

On the real model (`--real`): configs/real/sft.yaml's model, task and LoRA (SmolLM2-135M-Instruct, its chat
template, batch 8) and its snapshot settings, with the callback's overhead budget (`snapshot.max_overhead`, 0.05).

    python benchmarks/callback_overhead.py                  # 300 steps, 3 pairs
    python benchmarks/callback_overhead.py --steps 600 --pairs 5
    python benchmarks/callback_overhead.py --real --steps 50 --pairs 10 \
        --out benchmarks/results/callback_overhead_real.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.lm.config import SFTStageConfig
    from workbench.config import SnapshotConfig

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CALLBACK_EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_train_end")


def timed_train(
    config: SFTStageConfig, with_callback: bool, tmp: Path, snapshot: SnapshotConfig
) -> tuple[Clock, Clock, list[int]]:
    """Wall and CPU seconds of `trainer.train()`, of those the seconds spent inside the callback, and the steps it
    snapshotted."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipelines.lm.models import build_causal_lm, load_pretrained, train_tokenizer
    from pipelines.lm.supervised import lora_config, training_arguments
    from pipelines.lm.task import ReversalTask
    from workbench.callback import WorkbenchCallback
    from workbench.tracking import Tracker

    task = ReversalTask(config.task, config.seed)
    torch.manual_seed(0)
    if config.model.name_or_path is None:
        tokenizer = train_tokenizer(task.pretraining_text(), config.model.vocab_size)
        model = build_causal_lm(config.model, tokenizer)
    else:
        model, tokenizer = load_pretrained(config.model.name_or_path, None)
    inside = Clock()
    callbacks, tracker, callback = [], None, None
    if with_callback:
        tracker = Tracker.start(f"sqlite:///{tmp / 'mlflow.db'}", "callback-overhead")
        callback = WorkbenchCallback(snapshot, tracker=tracker)
        for event in CALLBACK_EVENTS:
            setattr(callback, event, _timed(getattr(callback, event), inside))
        callbacks = [callback]
    args = training_arguments(
        SFTConfig, config, str(tmp / "out"), "cpu", max_length=config.train.max_length, gradient_checkpointing=False
    )
    args = dataclasses.replace(args, eval_strategy="no")  # step time only: both log every 10 steps, neither evaluates
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(task.sft_rows()),
        eval_dataset=Dataset.from_list(task.sft_rows("eval")),
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=lora_config(config.lora),
    )
    total = Clock()
    with total:
        trainer.train()
        if tracker is not None:
            _timed(tracker.finish, inside)()  # the final flush is part of the cost
    index = callback.instrument.writer.index if callback is not None else {"steps": [], "dropped": []}
    return total, inside, sorted(index["steps"] + index["dropped"])


class Clock:
    """Accumulated wall seconds and CPU seconds of this process (all threads) over the `with` blocks. CPU time
    is what a shared machine's other jobs do not inflate much; wall time is what the user waits."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


def _timed(call, clock: Clock):
    def wrapper(*args, **kwargs):
        with clock:
            return call(*args, **kwargs)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--pairs", type=int, default=3, help="bare/callback pairs")
    parser.add_argument(
        "--snapshot-from",
        type=Path,
        default=None,
        help="take the snapshot settings from this stage config (default: the callback's, CallbackSnapshotConfig())",
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="the real model: configs/real/sft.yaml (its snapshot settings unless --snapshot-from), budget 0.05",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "callback_overhead.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from transformers.utils import logging as hf_logging

    from pipelines.lm.config import SFTStageConfig
    from workbench.config import CallbackSnapshotConfig, load_config
    from workbench.runtime import configure_torch_threads

    hf_logging.disable_progress_bar()
    threads = configure_torch_threads()
    real = ROOT / "configs" / "real" / "sft.yaml"
    config = load_config(real) if args.real else SFTStageConfig()
    from_config = args.snapshot_from or (real if args.real else None)
    snapshot = load_config(from_config).snapshot if from_config else CallbackSnapshotConfig()
    if args.real:  # a real model is where the callback's budget matters
        snapshot = snapshot.model_copy(update={"max_overhead": CallbackSnapshotConfig().max_overhead})
    train = config.train.model_copy(update={"eval_every": 10})

    def timed(steps: int, with_callback: bool) -> tuple[Clock, Clock, list[int]]:
        run_config = config.model_copy(update={"train": train.model_copy(update={"max_steps": steps})})
        return timed_train(run_config, with_callback, Path(tmp), snapshot)

    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        timed(3 if args.real else 20, True)  # warm-up: imports, allocator, MLflow schema
        for i in range(args.pairs):
            # A B, then B A: whatever the first run of a pair gains or loses (the allocator, the machine's drift) is
            # shared out.
            if i % 2:
                bare, _, _ = timed(args.steps, False)
                with_cb, inside, snapshots = timed(args.steps, True)
            else:
                with_cb, inside, snapshots = timed(args.steps, True)
                bare, _, _ = timed(args.steps, False)
            pair = {"callback_s": with_cb.wall, "bare_s": bare.wall, "inside_callback_s": inside.wall}
            pair.update(ratio=with_cb.wall / bare.wall, direct_share=inside.wall / bare.wall)
            pair.update(cpu_ratio=with_cb.cpu / bare.cpu, cpu_direct_share=inside.cpu / bare.cpu)
            pair.update(bare_step_ms=1000 * bare.wall / args.steps, snapshot_steps=snapshots)
            pairs.append(pair)
            print(
                f"pair {i}: with callback {with_cb.wall:.2f} s (inside it {inside.wall:.2f} s, snapshots at "
                f"{snapshots}), bare {bare.wall:.2f} s "
                f"({pair['bare_step_ms']:.1f} ms/step), ratio {pair['ratio']:.3f}, "
                f"direct share {100 * pair['direct_share']:.1f} %; CPU time: ratio {pair['cpu_ratio']:.3f}, "
                f"direct share {100 * pair['cpu_direct_share']:.1f} %",
                flush=True,
            )
    ratio = statistics.median(p["ratio"] for p in pairs)
    result = {
        "what": "TRL SFTTrainer on the built-in task "
        f"({real.relative_to(ROOT) if args.real else 'configs/sft.yaml sizes'}), with WorkbenchCallback vs without, "
        "alternating pairs in one process",
        "model": config.model.name_or_path or "2-layer Llama built from config",
        "snapshot_settings": f"{from_config}{' with the callback max_overhead' if args.real else ''}"
        if from_config
        else "CallbackSnapshotConfig() defaults",
        "steps": args.steps,
        "snapshot": snapshot.model_dump(mode="json"),
        "log_every": 10,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {threads}",
        "date": time.strftime("%Y-%m-%d"),
        "pairs": pairs,
        "median_bare_step_ms": statistics.median(p["bare_step_ms"] for p in pairs),
        "median_ratio": ratio,
        "median_overhead_percent": 100 * (ratio - 1),
        "median_direct_share_percent": 100 * statistics.median(p["direct_share"] for p in pairs),
        "median_cpu_overhead_percent": 100 * (statistics.median(p["cpu_ratio"] for p in pairs) - 1),
        "median_cpu_direct_share_percent": 100 * statistics.median(p["cpu_direct_share"] for p in pairs),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"median overhead of the callback: paired {100 * (ratio - 1):+.1f} %, "
        f"timed directly {result['median_direct_share_percent']:.1f} %; in CPU time paired "
        f"{result['median_cpu_overhead_percent']:+.1f} %, directly {result['median_cpu_direct_share_percent']:.1f} % "
        f"-> {args.out}"
    )


if __name__ == "__main__":
    main()
