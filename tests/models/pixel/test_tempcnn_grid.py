"""TempCNN on a regular day grid (``grid_days``): what its convolutions see does not depend on
how the irregular series is laid out (padding, interleaved empty dates), and gaps are interpolated."""

from __future__ import annotations

import pytest
import torch

from cropmap.models.pixel.tempcnn import TempCNN


def model(**kw):
    torch.manual_seed(0)
    return TempCNN(2, 3, band_names=["a", "b"], mean=[0.0, 0.0], std=[1.0, 1.0], **kw).eval()


def test_bins_hold_masked_means_and_gaps_are_interpolated():
    m = model(grid_days=10, grid_start=0, grid_end=50)
    x = torch.tensor([[[1.0, 5.0], [3.0, 0.0], [9.0, 9.0]]])
    present = torch.tensor([[[True, True], [True, False], [True, True]]])
    days = torch.tensor([[5.0, 35.0, 0.0]])
    mask = torch.tensor([[True, True, False]])  # the third date is padding: never counted
    val, seen, grid_mask = m.to_grid(*m.prepare(x, present, days, mask))
    assert torch.allclose(val[0, :, 0], torch.tensor([1.0, 5 / 3, 7 / 3, 3.0, 3.0]))
    assert torch.allclose(val[0, :, 1], torch.full((5,), 5.0))  # one observation: held constant
    assert seen[0, :, 0].tolist() == [True, False, False, True, False] and grid_mask.all()
    # two dates in one bin average
    val, _, _ = m.to_grid(torch.tensor([[[2.0, 0], [4.0, 0]]]), torch.tensor([[[True, False], [True, False]]]),
                          torch.tensor([[11.0, 19.0]]), torch.ones(1, 2, dtype=torch.bool))
    assert val[0, 1, 0] == 3.0 and (val[0, :, 1] == 0).all()


def test_output_ignores_padding_and_dates_without_observations():
    m = model(grid_days=10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 12, 2, generator=g)
    days = torch.sort(torch.rand(4, 12, generator=g) * 400 - 100, dim=1).values
    present = torch.ones(4, 12, 2, dtype=torch.bool)
    mask = torch.ones(4, 12, dtype=torch.bool)
    ref = m(x, present, days, mask)
    # append padding holding garbage, and interleave dates where no band was observed
    xp = torch.cat([x, torch.full((4, 5, 2), float("nan"))], 1)
    pp = torch.cat([present, torch.ones(4, 5, 2, dtype=torch.bool)], 1)
    dp = torch.cat([days, torch.full((4, 5), 7.0)], 1)
    mp = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], 1)
    assert torch.allclose(m(xp, pp, dp, mp), ref, atol=1e-5)
    empty = torch.zeros(4, 3, 2, dtype=torch.bool)
    xi = torch.cat([x[:, :6], torch.randn(4, 3, 2), x[:, 6:]], 1)
    pi = torch.cat([present[:, :6], empty, present[:, 6:]], 1)
    di = torch.cat([days[:, :6], days[:, 5:6].expand(4, 3), days[:, 6:]], 1)
    mi = torch.ones(4, 15, dtype=torch.bool)
    assert torch.allclose(m(xi, pi, di, mi), ref, atol=1e-5)


def test_flatten_needs_the_grid_and_has_the_published_shape():
    with pytest.raises(ValueError, match="grid"):
        model(pooling="flatten", grid_days=0)
    m = model(grid_days=10, pooling="flatten")
    assert m.dense[0].in_features == 64 * 55
    assert m(torch.randn(3, 5, 2), torch.ones(3, 5, 2, dtype=torch.bool), torch.rand(3, 5) * 300,
             torch.ones(3, 5, dtype=torch.bool)).shape == (3, 3)
