"""Label-free signals of generalisation: the states of held-out inputs against those of train inputs."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.heldout import heldout_geometry, prediction_confidence


def test_knn_gap_and_agreement_on_points_worked_by_hand():
    train = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 2])
    heldout = torch.tensor([[0.0, 0.5], [3.0, 0.0], [0.0, 3.0]])
    # Nearest other train point: 1, 1, 2 (mean 4/3). Nearest train point of each held-out one: train 0 at 0.5,
    # train 1 at 2, train 2 at 1 (mean 3.5/3); so the gap is 3.5/4. Predictions 0, 1, 0 against the
    # neighbours' labels 0, 1, 2: two of three agree.
    found = heldout_geometry(train, labels, heldout, torch.tensor([0, 1, 0]))
    assert found["knn_gap"] == pytest.approx(3.5 / 4)
    assert found["nn_agreement"] == pytest.approx(2 / 3)


def test_held_out_states_on_the_train_states_have_no_gap():
    train = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    found = heldout_geometry(train, torch.arange(200), train.clone(), torch.arange(200))
    assert found["knn_gap"] == 0.0 and found["nn_agreement"] == 1.0 and found["lid_ratio"] == pytest.approx(1.0)


def test_lid_ratio_is_held_out_dimension_over_train_dimension():
    g = torch.Generator().manual_seed(1)
    plane = torch.zeros(2000, 6)
    plane[:, :2] = torch.rand(2000, 2, generator=g)
    line = torch.zeros(2000, 6)
    line[:, 0] = torch.rand(2000, generator=g)
    found = heldout_geometry(plane, torch.zeros(2000), line, torch.zeros(2000))
    assert found["lid_ratio"] == pytest.approx(0.5, abs=0.05)  # TwoNN reads ~1 on a line, ~2 on a plane


def test_prediction_confidence_is_the_mean_top_probability():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # softmax (1/4, 3/4) and (1/2, 1/2)
    assert prediction_confidence(logits) == pytest.approx((0.75 + 0.5) / 2)


def test_too_few_states_is_one_clear_error():
    with pytest.raises(ValueError, match="at least 3 train and 3 held-out states, got 2 and 3"):
        heldout_geometry(torch.zeros(2, 2), torch.zeros(2), torch.zeros(3, 2), torch.zeros(3))


def test_knn_gap_by_hand():
    from analysis.heldout import knn_gap

    # Reference: a unit right triangle, each point 1 from its nearest other (scale 1). Queries: one on a reference
    # point (distance 0, nearest 0) and one 2 past (1, 0) (distance 2, nearest 1): gap (0 + 2) / 2 / 1 = 1.
    reference = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    gap, nearest = knn_gap(reference, torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
    assert gap == 1.0 and nearest.tolist() == [0, 1]
    assert math.isnan(knn_gap(torch.zeros(3, 2), torch.ones(2, 2))[0])  # reference states all coincide
