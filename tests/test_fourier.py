import numpy as np
import pytest

from analysis.fourier import cyclic_order, fourier_gini, gini


def test_gini_of_equal_values_is_0_and_of_one_holder_is_n_minus_1_over_n():
    assert gini(np.ones(5)) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 7.0])) == pytest.approx(3 / 4)
    # by hand: sorted [1, 3], (2*1-2-1)*1 + (2*2-2-1)*3 = 2, over 2 * 4
    assert gini(np.array([3.0, 1.0])) == pytest.approx(2 / 8)
    with pytest.raises(ValueError):
        gini(np.zeros(3))


def test_embeddings_on_one_frequency_are_sparse_and_on_all_of_them_are_not():
    n = 11  # frequencies 1 ... 5
    k = np.arange(n)
    one = np.stack([np.cos(2 * np.pi * 3 * k / n), np.sin(2 * np.pi * 3 * k / n)], axis=1)  # frequency 3 only
    assert fourier_gini(one + 5.0) == pytest.approx(4 / 5)  # the constant (frequency 0) is not counted
    # every frequency with the same power: a cosine of each, one per dimension
    spread = np.stack([np.cos(2 * np.pi * f * k / n) for f in range(1, 6)], axis=1)
    assert fourier_gini(spread) == pytest.approx(0.0, abs=1e-9)
    # shuffling the rows (a memorising model's embeddings owe nothing to the group's order) spreads the power
    assert fourier_gini(one[np.random.default_rng(0).permutation(n)]) < 0.6


def test_the_group_order_makes_multiplication_a_cyclic_shift():
    assert cyclic_order("+", 5) == [0, 1, 2, 3, 4]
    assert cyclic_order("*", 7) == [1, 3, 2, 6, 4, 5]  # powers of 3, the smallest primitive root of 7
    order = cyclic_order("/", 11)
    position = {x: i for i, x in enumerate(order)}
    # a * b lands at the sum of the exponents: multiplication is addition in this order
    assert all(position[(a * b) % 11] == (position[a] + position[b]) % 10 for a in order for b in order)
    assert cyclic_order("x^2+xy+y^2", 7) is None  # no group's operation
    assert cyclic_order("*", 8) is None  # the units mod 8 are not cyclic
