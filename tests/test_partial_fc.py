"""Partial FC's sample count: the exact ceiling of num_local · rate (at least 1, at least the
positives), by hand."""

import pytest


@pytest.mark.parametrize("num_local,rate,expected", [
    (70, 0.1, 7), (75, 0.1, 8), (100, 0.29, 29), (10, 0.57, 6), (100, 0.57, 57), (3, 1e-6, 1), (9, 1.0, 9),
])
def test_partial_fc_sample_count_is_an_exact_ceiling(num_local, rate, expected):
    from magloss.distributed.partial_fc import sample_count

    assert sample_count(num_local, rate) == expected                 # by hand: ceil of the decimal product
    assert sample_count(num_local, rate, num_positives=num_local) == num_local
