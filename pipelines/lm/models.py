"""Models and tokenizers for the supervised stages: built from config, trained locally, or loaded by reference.

Nothing here downloads: a tokenizer is trained with `tokenizers` on the stage's own corpus, a tiny model is
built from a `transformers` config, and `model.name_or_path` is a named real model shipped in a package
(`pipelines.lm.real_model`, converted once into a local cache), a local directory or an MLflow artifact URI
(`runs:/<run_id>/model`) that a previous stage logged (`workbench.artifacts.log_pretrained`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.lm.real_model import named_model_dir
from workbench.errors import WorkbenchError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from pipelines.lm.config import ModelConfig

PAD, EOS = "<pad>", "<eos>"
_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:", "s3://", "gs://", "http://", "https://")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme) trained on `texts`: every byte is in the vocabulary, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS)


def build_causal_lm(config: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A tiny decoder-only model from config, sized to the tokenizer: nothing is downloaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    if config.arch == "llama":
        sizes.update(intermediate_size=config.intermediate_size, num_key_value_heads=config.num_heads)
    else:
        sizes.update(n_inner=config.intermediate_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.arch, **sizes))


def load_pretrained(
    name_or_path: str, tracking_uri: str | None, head: str = "causal_lm"
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Model and tokenizer from a named real model, a local directory or an MLflow artifact URI; `head` "reward"
    puts a scalar score head on the model (a fresh one when the checkpoint is a causal LM).

    A directory that does not exist, holds no model, or whose tokenizer does not fit the model's embedding
    is a one-line error naming `model.name_or_path`.
    """
    if name_or_path.startswith(_MLFLOW_SCHEMES):
        import mlflow

        if name_or_path.startswith("runs:/"):
            _require_finished(name_or_path, tracking_uri)
        with tempfile.TemporaryDirectory(prefix="workbench-model-") as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(name_or_path, dst_path=tmp, tracking_uri=tracking_uri)
            except Exception as exc:  # MLflow raises several types for a missing run or artifact
                reason = first_line(exc)
                raise WorkbenchError(f"model.name_or_path: cannot fetch {name_or_path} ({reason})") from None
            return _load_dir(Path(local), name_or_path, head)
    named = named_model_dir(name_or_path)
    if named is not None:
        return _load_dir(named, name_or_path, head)
    path = Path(name_or_path)
    if not path.is_dir():
        raise WorkbenchError(f"model.name_or_path: {name_or_path} is not a directory (nothing is downloaded)")
    return _load_dir(path, name_or_path, head)


def _require_finished(uri: str, tracking_uri: str | None) -> None:
    """A stage that failed or is still running has no model a later stage may build on."""
    from workbench.tracking import open_store

    run_id = uri.removeprefix("runs:/").split("/")[0]
    client, resolved = open_store(tracking_uri)
    try:
        status = client.get_run(run_id).info.status
    except Exception:  # MLflow raises several types for an unknown run id
        raise WorkbenchError(f"model.name_or_path: {uri}: no run {run_id} in {resolved}") from None
    if status != "FINISHED":
        raise WorkbenchError(f"model.name_or_path: {uri}: run {run_id} is {status}, not a finished stage")


def _load_dir(path: Path, name: str, head: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if not (path / "config.json").is_file():
        raise WorkbenchError(f"model.name_or_path: {name} holds no config.json (expected a save_pretrained dir)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"model.name_or_path: {name}: no usable tokenizer ({first_line(exc)})") from None
    if tokenizer.pad_token is None:  # causal LM tokenizers often have none; batches need one
        tokenizer.pad_token = tokenizer.eos_token
    try:
        if head == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, pad_token_id=tokenizer.pad_token_id
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"model.name_or_path: {name}: cannot load the model ({first_line(exc)})") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise WorkbenchError(
            f"model.name_or_path: {name}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{rows} rows; they do not belong together"
        )
    return model, tokenizer
