import pytest
import torch

from textdiff.views import NUM_VIEWS, apply_view, invert_view


def test_views_are_the_eight_distinct_dihedral_images():
    x = torch.arange(9.0).reshape(3, 3)
    images = {tuple(apply_view(x, v).flatten().tolist()) for v in range(NUM_VIEWS)}
    assert len(images) == 8
    assert torch.equal(apply_view(x, 0), x)


@pytest.mark.parametrize("view", range(NUM_VIEWS))
def test_invert_undoes_apply(view):
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(invert_view(apply_view(x, view), view), x)


def test_bad_view():
    with pytest.raises(ValueError):
        apply_view(torch.zeros(2, 2), 8)
