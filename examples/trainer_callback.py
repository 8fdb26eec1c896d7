"""A plain `transformers.Trainer` script with one line added: `callbacks=[WorkbenchCallback.from_config(...)]`.

A tiny Llama learns to continue counting sequences (nothing is downloaded). Only public APIs are used, and
`report_to="none"`: the callback logs the trainer's metrics to its own MLflow run, next to the snapshots.

    python examples/trainer_callback.py --steps 200
    workbench ls
"""

import argparse
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from workbench import WorkbenchCallback


def counting_rows(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    """Sequences start, start+1, ... (mod vocab): a pattern a small model learns in a few hundred steps."""
    starts = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ((s + torch.arange(length)) % vocab).tolist()} for s in starts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    args = parser.parse_args()

    config = yaml.safe_load((Path(__file__).parent / "instrument.yaml").read_text())
    config["snapshot"]["every"] = max(1, args.steps // 4)
    config["tracking"]["uri"] = args.tracking_uri

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
        )
    )
    train = Dataset.from_list([{**r, "labels": r["input_ids"]} for r in counting_rows(2048, 16, 64, seed=0)])
    held_out = Dataset.from_list([{**r, "labels": r["input_ids"]} for r in counting_rows(64, 16, 64, seed=1)])
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir="trainer-example",
            max_steps=args.steps,
            per_device_train_batch_size=32,
            learning_rate=3e-3,
            logging_steps=max(1, args.steps // 10),
            eval_strategy="steps",
            eval_steps=max(1, args.steps // 4),
            save_strategy="no",
            report_to="none",
        ),
        train_dataset=train,
        eval_dataset=held_out,
        callbacks=[WorkbenchCallback.from_config(config, probes=held_out)],  # probes: held-out rows
    )
    trainer.train()


if __name__ == "__main__":
    main()
