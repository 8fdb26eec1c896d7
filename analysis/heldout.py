"""Where a model puts held-out inputs against its train inputs: label-free signals of coming generalisation.

A model that has memorised its train split represents train inputs and held-out inputs differently: the
held-out states sit away from the train states, and a held-out input's nearest train input need not share
the answer the model gives it. A model that generalises maps both onto the same structure. Each signal here
needs held-out *inputs* only (and train labels), never held-out labels, so a live run can compute it.

* ``knn_gap``: mean distance from each held-out state to its nearest train state, over the mean distance from
  each train state to its nearest other train state. Scale free; near 1 when held-out inputs land where train
  inputs do, above 1 when they land elsewhere.
* ``nn_agreement``: share of held-out inputs whose nearest train input's label is the model's own prediction
  for them (a 1-nearest-neighbour classifier on the train states agreeing with the model's head).
* ``lid_ratio``: TwoNN intrinsic dimension (Facco et al. 2017) of the held-out cloud over that of the train cloud.
"""

from __future__ import annotations

import torch

from analysis.lid import TwoNN

SIGNALS = ("knn_gap", "nn_agreement", "lid_ratio")


def heldout_geometry(
    train_states: torch.Tensor,
    train_labels: torch.Tensor,
    heldout_states: torch.Tensor,
    heldout_predictions: torch.Tensor,
) -> dict[str, float]:
    """The three signals of the module docstring for one layer: states [n, d], labels and predictions [n]."""
    if len(train_states) < 3 or len(heldout_states) < 3:
        raise ValueError(
            f"heldout_geometry: needs at least 3 train and 3 held-out states, got {len(train_states)} "
            f"and {len(heldout_states)}"
        )
    gap, nearest = knn_gap(train_states, heldout_states)
    agreement = (train_labels.to(nearest.device)[nearest] == heldout_predictions.to(nearest.device)).double().mean()
    return {
        "knn_gap": gap,
        "nn_agreement": float(agreement),
        "lid_ratio": _twonn(heldout_states) / _twonn(train_states),
    }


def knn_gap(reference: torch.Tensor, query: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean distance from each query state to its nearest reference state, over the mean distance from each
    reference state to its nearest other one (scale free; NaN when the reference states all coincide); and the
    index of each query state's nearest reference state."""
    reference, query = reference.double(), query.double()
    exact = "donot_use_mm_for_euclid_dist"  # coordinate differences: a duplicate is at exactly 0
    nearest_dist, nearest = torch.cdist(query, reference, compute_mode=exact).min(dim=1)
    scale = torch.cdist(reference, reference, compute_mode=exact).fill_diagonal_(float("inf")).min(dim=1).values.mean()
    return (float(nearest_dist.mean() / scale) if scale > 0 else float("nan")), nearest


def _twonn(states: torch.Tensor) -> float:
    try:
        return TwoNN().fit(states.double()).dimension_
    except ValueError:  # too few distinct states (a collapsed layer): no dimension to compare
        return float("nan")


def prediction_confidence(logits: torch.Tensor) -> float:
    """Mean probability the model gives its own answer (max softmax) over inputs [n, classes]."""
    return float(torch.softmax(logits.double(), dim=-1).max(dim=-1).values.mean())
