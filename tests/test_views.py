import pytest
import torch

from textdiff.data.views import NUM_VIEWS, apply_view


def test_views_are_the_eight_distinct_dihedral_images():
    x = torch.arange(9.0).reshape(3, 3)
    images = {tuple(apply_view(x, v).flatten().tolist()) for v in range(NUM_VIEWS)}
    assert len(images) == 8
    assert torch.equal(apply_view(x, 0), x)


@pytest.mark.parametrize("view", range(NUM_VIEWS))
def test_views_are_group_elements_of_the_right_order(view):
    """Quarter turns k have order 4/gcd(k, 4); reflections (views 4-7) undo themselves."""
    x = torch.randn(2, 3, 5, 5)
    order = 2 if view >= 4 else {0: 1, 1: 4, 2: 2, 3: 4}[view]
    y = x
    for k in range(order):
        y = apply_view(y, view)
        assert torch.equal(y, x) == (k == order - 1)


def test_bad_view():
    with pytest.raises(ValueError):
        apply_view(torch.zeros(2, 2), 8)
