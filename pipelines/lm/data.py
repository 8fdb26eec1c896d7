"""Datasets for the supervised stages: JSONL in TRL's formats, checked once with messages that name the file.

Formats (the columns decide; TRL's names):
    text                        {"text": ...}
    prompt_completion           {"prompt": ..., "completion": ...}
    messages                    {"messages": [{"role": ..., "content": ...}, ...]}
    preference                  {"prompt": ..., "chosen": ..., "rejected": ...}  (prompt optional)
    ranking                     {"prompt": ..., "completions": [...], "ranking": [best index, ...]}
Rankings become preferred-first pairs, every ordered pair of one ranking (Plackett-Luce rankings give
Bradley-Terry comparisons for each pair, as in InstructGPT's reward-model training, Ouyang et al. 2022).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.lm.config import DataConfig
from workbench.errors import WorkbenchError

FORMATS: dict[str, tuple[str, ...]] = {
    "ranking": ("prompt", "completions", "ranking"),
    "preference": ("chosen", "rejected"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, or of every *.jsonl in a directory (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise WorkbenchError(f"data.path: {path} holds no *.jsonl files")
    elif path.is_file():
        files = [path]
    else:
        raise WorkbenchError(f"data.path: {path}: no such file or directory")
    rows = []
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkbenchError(f"{file}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise WorkbenchError(f"{file}:{number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise WorkbenchError(f"data.path: {path} is empty")
    return rows


def detect_format(rows: Sequence[dict[str, Any]], source: str) -> str:
    """The first format (most specific first) whose columns every row has."""
    for name, columns in FORMATS.items():
        if all(all(c in row for c in columns) for row in rows):
            return name
    raise WorkbenchError(
        f"{source}: columns {sorted(rows[0])} match none of TRL's formats "
        f"({'; '.join('/'.join(c) for c in FORMATS.values())})"
    )


def ranking_to_pairs(rows: Sequence[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Every (better, worse) pair of each ranking, preferred first."""
    pairs = []
    for number, row in enumerate(rows, start=1):
        completions, ranking = row["completions"], row["ranking"]
        if sorted(ranking) != list(range(len(completions))):
            raise WorkbenchError(f"{source}: row {number}: ranking must order the indices 0..{len(completions) - 1}")
        for i, better in enumerate(ranking):
            for worse in ranking[i + 1 :]:
                pairs.append({"prompt": row["prompt"], "chosen": completions[better], "rejected": completions[worse]})
    return pairs


def load_stage_data(
    data: DataConfig,
    stage: str,
    accepted: Sequence[str],
    builtin: Callable[[str], list[dict[str, Any]]],
    seed: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train rows, eval rows, format) from `data.path` or, when it is empty, from `builtin(split)`.

    Rankings are turned into pairs where a stage accepts `preference` but not `ranking`; held-out rows
    come from `data.eval_path`, else a seeded `data.eval_fraction` of the file.
    """
    if data.path is None:
        train, held_out = builtin("train"), builtin("eval")
        return train, held_out, detect_format(train, "built-in task")
    train = read_jsonl(data.path)
    fmt = detect_format(train, f"data.path: {data.path}")
    if fmt == "ranking" and "ranking" not in accepted:
        train, fmt = ranking_to_pairs(train, data.path), "preference"
    if fmt not in accepted:
        raise WorkbenchError(
            f"data.path: {data.path} is in the {fmt} format (columns {sorted(train[0])}); the {stage} stage needs "
            f"{' or '.join(accepted)} ({'; '.join('/'.join(FORMATS[a]) for a in accepted)})"
        )
    if data.eval_path is not None:
        held_out = read_jsonl(data.eval_path)
        eval_fmt = detect_format(held_out, f"data.eval_path: {data.eval_path}")
        if eval_fmt == "ranking" and fmt != "ranking":
            held_out = ranking_to_pairs(held_out, data.eval_path)
        elif eval_fmt != fmt:
            raise WorkbenchError(f"data.eval_path: {data.eval_path} is in the {eval_fmt} format, data.path in {fmt}")
        return train, held_out, fmt
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(data.eval_fraction * len(train)))
    if n_eval >= len(train):
        raise WorkbenchError(f"data.path: {data.path} has {len(train)} rows: too few to hold out an eval split")
    return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]], fmt
