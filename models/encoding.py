"""Sinusoidal encoding of observation dates.

Satellite time series are irregular: each pixel has its own acquisition dates, and
the season window can start months before 1 January (negative day offsets) and end
after day 365. A transformer is order-free, so *when* an observation was taken must
be injected into its token. We use the classic transformer sinusoidal code, but
evaluated directly on the real (fractional, possibly negative) day value rather than
looked up in a table indexed by day: a table has a fixed range, and day offsets
outside it overflowed in the original implementation.

For a day value ``d`` and ``i = 0 .. dim/2 - 1`` the code is::

    code[2i]     = sin(d * base**(-2i/dim))
    code[2i + 1] = cos(d * base**(-2i/dim))

The highest frequency (``i = 0``) has a period of 2*pi days; with the default
``base = 1000`` the lowest has a period of about 2*pi*1000 days, far longer than a
season, so the code never wraps around within the range of realistic offsets.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["sinusoidal_encoding", "DayEncoding"]


def sinusoidal_encoding(days: Tensor, dim: int, base: float = 1000.0) -> Tensor:
    """Encode day offsets ``(...)`` as ``(..., dim)`` interleaved sin/cos features.

    ``days`` may hold any real values (fractional, negative, beyond 366). The result
    has the floating dtype of ``days`` (float32 for integer input) and lives on its
    device. ``dim`` must be a positive even number.
    """
    if dim <= 0 or dim % 2 != 0:
        raise ValueError(f"dim must be a positive even number, got {dim}")
    if base <= 0:
        raise ValueError(f"base must be positive, got {base}")
    dtype = days.dtype if days.is_floating_point() else torch.float32
    days = days.to(dtype)
    # base**(-2i/dim) written as exp(-(2i/dim) * ln(base)) to stay in floating point.
    exponent = torch.arange(0, dim, 2, device=days.device, dtype=dtype) / dim
    freqs = torch.exp(-exponent * math.log(base))
    angles = days.unsqueeze(-1) * freqs  # (..., dim/2)
    # stack + flatten interleaves sin and cos: [sin0, cos0, sin1, cos1, ...].
    return torch.stack((torch.sin(angles), torch.cos(angles)), dim=-1).flatten(-2)


class DayEncoding(nn.Module):
    """Module form of :func:`sinusoidal_encoding`; it has no parameters or state."""

    def __init__(self, dim: int, base: float = 1000.0) -> None:
        super().__init__()
        if dim <= 0 or dim % 2 != 0:
            raise ValueError(f"dim must be a positive even number, got {dim}")
        self.dim = dim
        self.base = float(base)

    def forward(self, days: Tensor) -> Tensor:
        """Map ``days`` of shape ``(B, T)`` to codes of shape ``(B, T, dim)``."""
        return sinusoidal_encoding(days, self.dim, self.base)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"
