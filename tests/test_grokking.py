import pytest
import torch
from conftest import DEFAULT_CONFIG
from mlflow import MlflowClient

import pipelines.grokking.stage as grokking
from analysis.fourier import cyclic_order, fourier_gini
from analysis.lid import TwoNN
from pipelines.grokking.config import TaskConfig
from workbench.cli import main
from workbench.config import load_config
from workbench.snapshots import load_snapshots


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("+", lambda a, b, p: (a + b) % p),
        ("-", lambda a, b, p: (a - b) % p),
        ("*", lambda a, b, p: (a * b) % p),
        ("x^2+xy+y^2", lambda a, b, p: (a * a + a * b + b * b) % p),
    ],
)
def test_dataset_holds_every_pair_with_its_answer(op, expected):
    data = grokking.make_dataset(TaskConfig(op=op, p=7, train_fraction=0.5), seed=0)
    assert len(data.inputs) == 49
    for (a, b, eq), y in zip(data.inputs.tolist(), data.targets.tolist(), strict=True):
        assert eq == 7 and y == expected(a, b, 7)


def test_division_skips_zero_and_inverts_multiplication():
    data = grokking.make_dataset(TaskConfig(op="/", p=7, train_fraction=0.5), seed=0)
    a, b, y = data.inputs[:, 0], data.inputs[:, 1], data.targets
    assert len(data.inputs) == 42 and bool((b != 0).all())
    assert torch.equal((y * b) % 7, a)


def test_split_is_seeded_disjoint_and_sized_by_the_fraction():
    task = TaskConfig(op="+", p=13, train_fraction=0.3)
    one, again, other = (grokking.make_dataset(task, s) for s in (1, 1, 2))
    assert torch.equal(one.train_ids, again.train_ids) and not torch.equal(one.train_ids, other.train_ids)
    assert len(one.train_ids) == round(0.3 * 169) and len(one.train_ids) + len(one.test_ids) == 169
    assert not set(one.train_ids.tolist()) & set(one.test_ids.tolist())


def test_an_unordered_split_keeps_each_pair_with_its_mirror():
    ordered = grokking.make_dataset(TaskConfig(op="+", p=7, train_fraction=0.5), seed=0)
    data = grokking.make_dataset(TaskConfig(op="+", p=7, train_fraction=0.5, split="unordered"), seed=0)
    train = {tuple(row[:2]) for row in data.inputs[data.train_ids].tolist()}
    test = {tuple(row[:2]) for row in data.inputs[data.test_ids].tolist()}
    assert all((b, a) in train for a, b in train) and all((b, a) in test for a, b in test)
    # 7 * 8 / 2 = 28 unordered pairs, 14 of them trained on: the 7 pairs (a, a) count once, the others twice
    diagonal = sum(a == b for a, b in train)
    assert len(train) == diagonal + 2 * (14 - diagonal) and len(train) + len(test) == 49
    # an ordered split has mirrors on both sides: the test pairs a model can answer from memory
    ordered_train = {tuple(row[:2]) for row in ordered.inputs[ordered.train_ids].tolist()}
    assert any((b, a) in ordered_train for a, b in ordered.inputs[ordered.test_ids][:, :2].tolist())


def test_probes_of_a_commutative_op_hold_one_order_of_each_pair():
    data = grokking.make_dataset(TaskConfig(op="+", p=7, train_fraction=0.5), seed=0)
    pairs = {tuple(row[:2]) for row in data.inputs[data.test_ids].tolist()}
    both = grokking.make_probe_set(data, 1024, seed=0, one_order=False)
    one = grokking.make_probe_set(data, 1024, seed=0, one_order=True)
    assert len(both.ids) == len(pairs)  # every held-out pair fits in 1 024
    # one order: the held-out (a, b) with a <= b, and no pair with a > b (whichever side its mirror is on)
    assert {tuple(row[:2]) for row in one.input_ids.tolist()} == {(a, b) for a, b in pairs if a <= b}

    # COMMUTATIVE names exactly the ops whose answer for (b, a) is the one for (a, b), computed from the ops
    for op in ("+", "-", "*", "/", "x^2+xy+y^2"):
        every = grokking.make_dataset(TaskConfig(op=op, p=7, train_fraction=0.5), seed=0)
        answer = {tuple(row[:2]): y for row, y in zip(every.inputs.tolist(), every.targets.tolist(), strict=True)}
        mirrored = all(answer[b, a] == y for (a, b), y in answer.items() if (b, a) in answer)
        assert mirrored == (op in grokking.COMMUTATIVE), op


def test_tiny_run_logs_metrics_snapshots_and_geometry(tracking_uri, run_grokking, capsys):
    run = run_grokking()
    out = capsys.readouterr().out
    client = MlflowClient(tracking_uri)
    assert run.info.run_id in out and "memorisation" in out and "mlflow ui" in out
    assert run.info.status == "FINISHED"
    assert run.data.params["task.p"] == "11"
    assert run.data.tags["workbench.stage"] == "grokking" and run.data.tags["workbench.device"] == "cpu"
    assert len(run.data.tags["workbench.config_hash"]) == 12
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/acc")] == [0, 5, 10, 15, 20]
    for key in ("train/loss", "train/acc", "eval/loss", "weight_norm", "lr"):
        assert key in run.data.metrics
    layers = ("layer_00", "layer_01")  # embeddings + one block
    logged = [(f, layer) for f in ("lid_twonn", "lid_mle", "eff_rank") for layer in layers]
    # MLE with k=20 needs 21 distinct points; the embeddings of a 12-token vocabulary have 12: not logged, no NaN.
    logged.remove(("lid_mle", "layer_00"))
    assert "geom/lid_mle/layer_00" not in run.data.metrics
    for feature, layer in logged:
        history = client.get_metric_history(run.info.run_id, f"geom/{feature}/{layer}")
        assert [m.step for m in history] == [0, 10, 20]
    snaps = load_snapshots(run.info.run_id, tracking_uri=tracking_uri)
    assert snaps.steps == [0, 10, 20] and sorted(snaps.layers) == list(layers)
    n_probes = len(snaps.index["probe_ids"])
    fraction = load_config(DEFAULT_CONFIG).task.train_fraction
    # one order of each held-out pair {a, b} (66 of them for p = 11; + is commutative): all fit in 1024 probes
    assert n_probes == 66 - round(fraction * 66)
    assert snaps.layers["layer_01"].shape == (3, 3 * n_probes, 32)  # token pooling: 3 tokens per probe
    # The logged geometry is that of the stored (float16) states: `workbench analyze` recomputes it exactly
    twonn = client.get_metric_history(run.info.run_id, "geom/lid_twonn/layer_01")
    from_stored = [TwoNN().fit(states.astype("float32")).dimension_ for states in snaps.layers["layer_01"]]
    assert [m.value for m in twonn] == pytest.approx(from_stored, rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "snapshots", "model"} <= artifacts
    # The embeddings' Fourier sparsity is logged with each snapshot, and is what layer_00 of that snapshot (the
    # embeddings of the probes' tokens) gives, up to float16: a run made before it was logged can be replayed.
    sparsity = client.get_metric_history(run.info.run_id, "embed/fourier_gini")
    assert [m.step for m in sparsity] == [0, 10, 20]
    config = load_config(DEFAULT_CONFIG)
    inputs = grokking.make_dataset(TaskConfig(**{**config.task.model_dump(), "p": 11}), config.seed).inputs
    point = {int(inputs[probe, position]): i for i, (probe, position) in enumerate(snaps.index["points"])}
    rows = [point[token] for token in cyclic_order(config.task.op, 11)]
    from_snapshots = [fourier_gini(states[rows]) for states in snaps.layers["layer_00"]]
    assert [m.value for m in sparsity] == pytest.approx(from_snapshots, abs=2e-3)
    assert len(set(from_snapshots)) == 3  # it moves as the embeddings train


def test_saved_model_loads_back_with_from_pretrained(tracking_uri, run_grokking):
    import mlflow
    from transformers import AutoModelForCausalLM

    run = run_grokking("snapshot.enabled=false")
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", tracking_uri=tracking_uri)
    model = AutoModelForCausalLM.from_pretrained(local)
    assert model.config.hidden_size == 32 and model.config.vocab_size == 12

    # The label-free signals are logged at every evaluation, for the layer after the embeddings only, and the
    # last ones are what the saved (final) model gives on the same seeded train and held-out inputs.
    client = MlflowClient(tracking_uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "heldout/knn_gap/layer_01")] == [
        0,
        5,
        10,
        15,
        20,
    ]
    assert not [k for k in run.data.metrics if k.startswith("heldout/") and k.endswith("layer_00")]
    config = load_config(DEFAULT_CONFIG)
    data = grokking.make_dataset(TaskConfig(**{**config.task.model_dump(), "p": 11}), config.seed)
    recomputed = grokking.HeldoutInputs.sample(data, config.seed, "cpu").signals(model.eval())
    for key in ("heldout/knn_gap/layer_01", "heldout/nn_agreement/layer_01", "heldout/confidence"):
        assert run.data.metrics[key] == pytest.approx(recomputed[key], rel=1e-5)


def test_ctrl_c_mid_run_exits_130_marks_killed_and_keeps_metrics(tracking_uri, run_grokking, monkeypatch):
    real_evaluate, calls = grokking._evaluate, []

    def interrupt_on_third_eval(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args)

    monkeypatch.setattr(grokking, "_evaluate", interrupt_on_third_eval)
    run = run_grokking(exit_code=130)
    assert run.info.status == "KILLED"
    assert [m.step for m in MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "eval/acc")] == [0, 5]


def test_ls_lists_the_run_with_status_and_metrics(tracking_uri, run_grokking, capsys):
    run_grokking("snapshot.enabled=false")
    capsys.readouterr()
    assert main(["ls", "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "FINISHED" in out and "grokking" in out and "eval/acc" in out


@pytest.mark.slow
def test_small_modulus_memorises_then_generalises(tracking_uri, run_grokking):
    """A fast-grokking setting (p=31, half the pairs, weight decay 2): memorise first, then test acc >= 0.95."""
    args = [
        "task.p=31",
        "task.train_fraction=0.5",
        "task.split=ordered",  # mirrors in the train split: the held-out pairs they answer make it fast
        "optim.lr=3e-3",
        "optim.weight_decay=2",
        "model.hidden_size=64",
        "model.intermediate_size=256",
        "train.max_steps=400",
        "train.eval_every=10",
        "snapshot.every=100",
    ]
    run = run_grokking(*args)  # later overrides win over the tiny job's
    metrics = run.data.metrics
    assert "grokking/generalisation_step" in metrics, "test accuracy never reached 0.95"
    assert metrics["grokking/memorisation_step"] < metrics["grokking/generalisation_step"]
    assert metrics["train/acc"] >= 0.99


def test_a_forecast_is_logged_as_an_event_and_reported_in_the_summary(tracking_uri, run_grokking, capsys, monkeypatch):
    import analysis.forecast as forecast

    class FiresAtTen:
        name = "grokking_forecast"

        def observe(self, step, metrics):
            return forecast.ForecastEvent(self.name, step, {"predicted_onset_step": 30}) if step == 10 else None

        def active(self, step):
            return step >= 10

    monkeypatch.setattr(forecast, "FORECASTERS", {"grokking_forecast": FiresAtTen})
    run = run_grokking()
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "event/grokking_forecast")
    assert [(m.step, m.value) for m in history] == [(10, 1.0)]
    assert "step 10: forecast 'grokking_forecast' fired: predicted_onset_step=30" in capsys.readouterr().out


def test_an_op_on_no_cyclic_group_runs_without_the_fourier_sparsity(tracking_uri, run_grokking):
    run = run_grokking("task.op=x^2+xy+y^2")  # no group order to read the embeddings in
    assert run.info.status == "FINISHED"
    assert "embed/fourier_gini" not in run.data.metrics and "geom/eff_rank/layer_01" in run.data.metrics
