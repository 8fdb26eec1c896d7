from pathlib import Path

import pytest

from pipelines.grokking.config import GrokkingStageConfig
from workbench.cli import main
from workbench.config import config_hash, flatten, load_config
from workbench.errors import WorkbenchError

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "grokking.yaml"


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_default_grokking_config_loads():
    config = load_config(DEFAULT)
    assert isinstance(config, GrokkingStageConfig)
    assert config.task.op == "+" and config.snapshot.pooling == "token"


def test_overrides_are_typed_and_nested():
    config = load_config(DEFAULT, ["train.max_steps=7", "optim.lr=3e-3", "snapshot.layers=[0, -1]", "seed=5"])
    assert config.train.max_steps == 7
    assert config.optim.lr == pytest.approx(3e-3)
    assert config.snapshot.layers == [0, -1]
    assert config.seed == 5


@pytest.mark.parametrize("op", ["-", "*", "+", "/"])
def test_every_operation_can_be_given_on_the_command_line(op):
    # "-" alone is a YAML block list and "*" an alias: a command line means the strings.
    assert load_config(DEFAULT, [f"task.op={op}"]).task.op == op


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stage: grokking\ntrain: {max_stepz: 3}\n", "train.max_stepz: unknown key"),
        ("stage: grokking\noptim: {lr: fast}\n", "optim.lr: Input should be a valid number"),
        ("stage: grokking\ntask: {op: /, p: 91}\n", "task: p=91 is not prime"),
        ("stage: grokking\ntask: {train_fraction: 1.5}\n", "task.train_fraction: Input should be less than 1"),
        ("stage: grokking\ntask: {train_fraction: 0}\n", "task.train_fraction: Input should be greater than 0"),
        ("stage: pretrainn\n", "stage: expected one of"),
        ("stage: grokking\ntrain: [1, 2\n", "invalid YAML at line"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(WorkbenchError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message
    assert "\n" not in message


def test_bad_override_names_the_override():
    with pytest.raises(WorkbenchError, match=r"override 'task.p=abc': task.p: Input should be a valid integer"):
        load_config(DEFAULT, ["task.p=abc"])
    with pytest.raises(WorkbenchError, match=r"override 'train.max_steps': expected key.sub=value"):
        load_config(DEFAULT, ["train.max_steps"])
    with pytest.raises(WorkbenchError, match=r"override 'model.depth=2': model.depth: unknown key"):
        load_config(DEFAULT, ["model.depth=2"])


def test_overrides_that_depend_on_each_other_are_valid_in_any_order():
    # task.chat_template needs model.name_or_path: alone (or first, one at a time) it is refused, together it is not.
    sft = DEFAULT.parent / "sft.yaml"
    both = ["task.chat_template=true", "model.name_or_path=/some/model"]
    for overrides in (both, both[::-1]):
        config = load_config(sft, overrides)
        assert config.task.chat_template and config.model.name_or_path == "/some/model"
    with pytest.raises(WorkbenchError, match=r"^override 'task.chat_template=true': task.chat_template: the models"):
        load_config(sft, ["task.chat_template=true", "train.max_steps=5"])
    # A config left invalid is reported at the override that made it so, whatever follows it.
    with pytest.raises(WorkbenchError, match=r"^override 'train.max_steps=0': train.max_steps: Input should be"):
        load_config(sft, ["seed=1", "train.max_steps=0", "task.chat_template=true", "model.name_or_path=/m"])


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(WorkbenchError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


def test_flatten_and_hash_describe_the_resolved_config():
    a = load_config(DEFAULT)
    b = load_config(DEFAULT, ["task.p=61"])
    flat = flatten(a)
    assert flat["task.p"] == str(a.task.p) and flat["snapshot.geometry"].startswith("[")
    assert config_hash(a) != config_hash(b) and config_hash(a) == config_hash(load_config(DEFAULT))


def test_cli_bad_config_exits_2_with_one_line(tmp_path, tracking_uri, capsys):
    path = write(tmp_path, "stage: grokking\ntrain: {max_steps: many}\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.max_steps" in err and str(path) in err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("config", "layers", "missing", "num_layers"),
    [
        ("grokking.yaml", "[5]", "[5]", 1),  # the default model: embeddings + 1 block = layers 0..1
        ("grokking.yaml", "[0,-3]", "[-3]", 1),
        ("sft.yaml", "[0,9]", "[9]", 2),  # an LM stage that builds its model from model.*
    ],
)
def test_snapshot_layers_a_built_model_lacks_are_refused_before_any_run_exists(
    tmp_path, tracking_uri, capsys, config, layers, missing, num_layers
):
    path = Path(__file__).resolve().parents[1] / "configs" / config
    assert main(["run", str(path), f"snapshot.layers={layers}"]) == 2
    assert capsys.readouterr().err == (
        f"workbench: error: override 'snapshot.layers={layers}': snapshot.layers: {missing} out of range for the "
        f"model built with model.num_layers={num_layers}: layers 0..{num_layers} (0 = embeddings, -1 = last)\n"
    )
    assert not (tmp_path / "mlflow.db").exists()  # no FAILED, empty run left in the store


def test_snapshot_layers_of_a_model_loaded_from_disk_wait_for_the_model():
    from pipelines.lm.config import SFTStageConfig

    config = SFTStageConfig(model={"name_or_path": "/some/model"}, snapshot={"layers": [40]})
    assert config.snapshot.layers == [40]  # its depth is known once it is loaded (Instrument checks it then)
