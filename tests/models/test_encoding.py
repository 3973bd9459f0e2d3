"""Tests of the on-the-fly sinusoidal day encoding."""

import math

import pytest
import torch

from cropmap.models.encoding import DayEncoding, sinusoidal_encoding


def test_shape_and_dtype():
    days = torch.rand(3, 7) * 365
    code = sinusoidal_encoding(days, 16)
    assert code.shape == (3, 7, 16)
    assert code.dtype == torch.float32


def test_integer_days_become_float():
    code = sinusoidal_encoding(torch.arange(5).view(1, 5), 8)
    assert code.dtype == torch.float32


def test_deterministic():
    days = torch.tensor([[0.0, 10.5, 200.0]])
    assert torch.equal(sinusoidal_encoding(days, 32), sinusoidal_encoding(days, 32))


def test_known_values():
    # Interleaving: even features are sin, odd are cos; frequency of pair i is base**(-2i/dim).
    d, dim, base = 3.0, 4, 1000.0
    code = sinusoidal_encoding(torch.tensor([[d]]), dim, base)[0, 0]
    f1 = base ** (-2 / dim)
    expected = torch.tensor([math.sin(d), math.cos(d), math.sin(d * f1), math.cos(d * f1)])
    assert torch.allclose(code, expected, atol=1e-6)


def test_different_days_differ():
    days = torch.arange(-150, 336, dtype=torch.float32).view(1, -1)
    code = sinusoidal_encoding(days, 128)[0]
    dist = torch.cdist(code, code)
    off_diag = dist + torch.eye(len(code)) * 1e9
    assert off_diag.min() > 1e-3


def test_negative_and_large_days_are_finite():
    days = torch.tensor([[-150.0, -0.5, 0.0, 366.0, 400.25, 900.0]])
    code = sinusoidal_encoding(days, 64)
    assert torch.isfinite(code).all()
    # sin/cos pairs lie on the unit circle.
    pairs = code.view(1, 6, 32, 2)
    assert torch.allclose(pairs.pow(2).sum(-1), torch.ones(1, 6, 32), atol=1e-5)


@pytest.mark.parametrize("dim", [0, 7, 129, -2])
def test_dim_must_be_even_positive(dim):
    with pytest.raises(ValueError):
        sinusoidal_encoding(torch.zeros(1, 2), dim)
    with pytest.raises(ValueError):
        DayEncoding(dim)


def test_module_matches_function():
    enc = DayEncoding(32, base=500.0)
    days = torch.randn(2, 5) * 100
    assert torch.equal(enc(days), sinusoidal_encoding(days, 32, 500.0))
    assert len(list(enc.parameters())) == 0
    assert len(enc.state_dict()) == 0
