"""A TRL `DPOTrainer` script with one line added: `callbacks=[WorkbenchCallback.from_config(...)]`.

A tiny Llama (tokenizer trained here with `tokenizers`, nothing downloaded) learns to prefer the right sum of
two digits to a wrong one. The callback snapshots the policy's hidden states and logs TRL's metrics
(`rewards/margins`, `logps/chosen`, ...) with the geometry in one MLflow run.

    python examples/trl_dpo_callback.py --steps 100
    workbench ls
"""

import argparse
import copy
import random

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from workbench import WorkbenchCallback


def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        wrong = (a + b + rng.randrange(1, 9)) % 19
        rows.append({"prompt": f"{a} + {b} =", "chosen": f" {a + b}", "rejected": f" {wrong}"})
    return rows


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    args = parser.parse_args()

    train, held_out = preference_rows(1024, seed=0), preference_rows(64, seed=1)
    tokenizer = word_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in train])
    policy = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy),  # the frozen reference: the policy as it starts
        args=DPOConfig(
            output_dir="dpo-example",
            max_steps=args.steps,
            per_device_train_batch_size=32,
            learning_rate=1e-3,
            logging_steps=max(1, args.steps // 10),
            eval_strategy="steps",
            eval_steps=max(1, args.steps // 2),
            save_strategy="no",
            report_to="none",
            gradient_checkpointing=False,
            bf16=False,
        ),
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(held_out),
        processing_class=tokenizer,
        callbacks=[
            WorkbenchCallback.from_config(
                {
                    "snapshot": {"every": max(1, args.steps // 4), "pooling": "answer", "probes": 64},
                    "tracking": {"uri": args.tracking_uri, "experiment": "trl-dpo-example"},
                },
                probes=held_out,  # the held-out pairs' prompts and chosen answers
            )
        ],
    )
    trainer.train()


if __name__ == "__main__":
    main()
